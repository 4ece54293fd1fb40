"""TLS material: load the configured PEM pair or make a self-signed one once.

The generated pair lives in ``data_dir/tls/`` and is reused across restarts, so
clients that pinned it keep working. Server contexts allow TLS 1.2 and newer only.

Outbound SMTP uses :class:`ClientTLS`: an unverified (opportunistic) or a
verified connection creator per remote host name.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mailbox_appliance import durable


def load_pair(cert_path: str, key_path: str):
    """Load and check a PEM certificate and its key; raises on any mismatch."""
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    return cert, key


def load_chain(cert_path: str) -> list:
    """The certificates after the first in ``cert_path`` (a fullchain.pem).

    Clients only trust the server certificate if the intermediates are sent
    along with it, so they go into the context's extra chain.
    """
    with open(cert_path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    return [crypto.X509.from_cryptography(c) for c in certs[1:]]


def names_host(cert, hostname: str) -> bool:
    """True if ``cert`` (pyOpenSSL X509) names ``hostname`` in its CN or SAN."""
    c = cert.to_cryptography()
    hostname = hostname.lower()
    cns = [a.value.lower() for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        sans = [n.lower() for n in c.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        sans = []
    return hostname in cns and hostname in sans


def generate_self_signed(hostname: str, cert_path: str, key_path: str) -> None:
    """Write a self-signed certificate for ``hostname`` (key file mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        # An end-entity certificate (CA:FALSE): clients that pin it, such as
        # mbsync's CertificateFile, accept it whatever name they connect to.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    # Written and synced before being renamed into place, so a crash leaves
    # the old pair or the new one, never an empty file.
    durable.replace_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()), 0o600, sync_dir=False)
    durable.replace_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _self_signed_pair(config):
    """Load data_dir/tls/{cert,key}.pem, making them first if needed.

    The pair is kept across restarts. It is only made again when it is missing,
    does not load (it is the appliance's own, so a broken one is useless), or
    no longer names ``server.hostname``.
    """
    tls_dir = os.path.join(config.server.data_dir, "tls")
    cert_path = os.path.join(tls_dir, "cert.pem")
    key_path = os.path.join(tls_dir, "key.pem")
    hostname = config.server.hostname
    if os.path.exists(cert_path) and os.path.exists(key_path):
        try:
            cert, key = load_pair(cert_path, key_path)
        except (ValueError, crypto.Error, SSL.Error):
            pass
        else:
            if names_host(cert, hostname):
                return cert, key, cert_path
    generate_self_signed(hostname, cert_path, key_path)
    cert, key = load_pair(cert_path, key_path)
    return cert, key, cert_path


def server_context_factory(config):
    """The server TLS context for ``config``: configured pair or self-signed one."""
    cert_path, key_path = config.tls.certificate, config.tls.key
    chain = []
    if cert_path:
        cert, key = load_pair(cert_path, key_path)
        chain = load_chain(cert_path)
    else:
        cert, key, cert_path = _self_signed_pair(config)
    return ssl.CertificateOptions(
        privateKey=key, certificate=cert, extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        # No session cache: one less piece of state shared between clients.
        enableSessions=False,
    ), cert_path


def load_trust_root(ca_file: str):
    """A Twisted trust root of every certificate in the PEM bundle ``ca_file``."""
    with open(ca_file, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs])


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Encrypts without checking the server's certificate (opportunistic TLS).

    It still sends the host name (SNI), so a server with several
    certificates shows the one meant for that name.
    """

    def __init__(self, options, hostname: str):
        self._options = options
        self._sni = None
        if hostname and not (isIPAddress(hostname) or isIPv6Address(hostname)):
            try:
                self._sni = hostname.encode("idna")
            except UnicodeError:
                self._sni = None

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._options.getContext(), None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class ClientTLS:
    """Client TLS connection creators for outbound SMTP.

    ``creator(hostname, verify)``: with ``verify`` the server must show a
    certificate valid for ``hostname`` (checked with service-identity) that
    chains to ``ca_file``'s certificates, or to the system's when it is
    empty; without, any certificate will do, and TLS 1.0 is still accepted:
    encryption that any server offers beats plain text (Postfix's
    opportunistic default).
    """

    def __init__(self, ca_file: str = ""):
        # The bundle is read once, at start-up, never on the reactor later.
        self._trust = load_trust_root(ca_file) if ca_file else None
        self._unverified = ssl.CertificateOptions(
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0, enableSessions=False)

    def creator(self, hostname: str, verify: bool):
        if not verify:
            return _UnverifiedClientTLS(self._unverified, hostname)
        trust = self._trust if self._trust is not None else ssl.platformTrust()
        return ssl.optionsForClientTLS(hostname, trustRoot=trust)

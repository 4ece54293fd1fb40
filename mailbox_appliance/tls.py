"""TLS material: load the configured PEM pair or make a self-signed one once.

The generated pair lives in ``data_dir/tls/`` and is reused across restarts, so
clients that pinned it keep working. Server contexts allow TLS 1.2 and newer only.
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    tmp = key_path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    os.rename(tmp, key_path)
    with open(cert_path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.rename(cert_path + ".tmp", cert_path)


def server_context_factory(config):
    """The server TLS context for ``config``: configured pair or self-signed one."""
    cert_path, key_path = config.tls.certificate, config.tls.key
    if not cert_path:
        tls_dir = os.path.join(config.server.data_dir, "tls")
        cert_path = os.path.join(tls_dir, "cert.pem")
        key_path = os.path.join(tls_dir, "key.pem")
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            generate_self_signed(config.server.hostname, cert_path, key_path)
    cert, key = load_pair(cert_path, key_path)
    return ssl.CertificateOptions(
        privateKey=key, certificate=cert,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        # Renegotiation by the client is a DoS lever and useless for mail.
        enableSessions=False,
    ), cert_path

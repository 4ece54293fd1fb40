"""Tests of mailbox_appliance.tls: the self-signed pair, a configured pair, TLS >= 1.2."""

import datetime
import os
import socket
import ssl
import stat
import threading
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import protocol, reactor, threads
from twisted.internet import ssl as tssl
from twisted.trial import unittest

from mailbox_appliance import config, tls

HOST = "mx.example.test"


def make_config(data_dir, hostname=HOST, certificate="", key=""):
    return config.Config(
        path="",
        server=config.ServerConfig(hostname=hostname, data_dir=data_dir),
        tls=config.TLSConfig(certificate=certificate, key=key))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def names(cert_pem):
    cert = x509.load_pem_x509_certificate(cert_pem)
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    sans = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    return cns, sans


class _Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\n")


class SelfSignedTests(unittest.TestCase):

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.cert_path = os.path.join(self.data_dir, "tls", "cert.pem")
        self.key_path = os.path.join(self.data_dir, "tls", "key.pem")

    def test_generated_into_data_dir(self):
        options, cert_path = tls.server_context_factory(make_config(self.data_dir))
        self.assertIsInstance(options, tssl.CertificateOptions)
        self.assertEqual(cert_path, self.cert_path)
        self.assertTrue(os.path.isfile(self.cert_path))
        self.assertTrue(os.path.isfile(self.key_path))
        self.assertEqual(stat.S_IMODE(os.stat(self.key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.key_path)).st_mode)
                         & 0o077, 0)
        self.assertEqual(names(read(self.cert_path)), ([HOST], [HOST]))
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.cert_path))),
                         ["cert.pem", "key.pem"])     # no .tmp left behind
        # The pair on disk is the pair in the context.
        tls.load_pair(self.cert_path, self.key_path)

    def test_kept_across_restarts(self):
        tls.server_context_factory(make_config(self.data_dir))
        cert, key = read(self.cert_path), read(self.key_path)
        # A "restart": a fresh Config object for the same data_dir.
        _, cert_path = tls.server_context_factory(make_config(self.data_dir))
        self.assertEqual(cert_path, self.cert_path)
        self.assertEqual(read(self.cert_path), cert)
        self.assertEqual(read(self.key_path), key)

    def test_remade_when_hostname_changes(self):
        tls.server_context_factory(make_config(self.data_dir))
        old = read(self.cert_path)
        tls.server_context_factory(make_config(self.data_dir, hostname="mx2.example.test"))
        self.assertNotEqual(read(self.cert_path), old)
        self.assertEqual(names(read(self.cert_path)),
                         (["mx2.example.test"], ["mx2.example.test"]))

    def test_remade_when_broken(self):
        # A truncated pair (say, a crash of an older version) is the
        # appliance's own and useless: it is made again instead of failing.
        os.makedirs(os.path.dirname(self.cert_path))
        with open(self.cert_path, "wb"), open(self.key_path, "wb"):
            pass
        tls.server_context_factory(make_config(self.data_dir))
        self.assertEqual(names(read(self.cert_path)), ([HOST], [HOST]))
        tls.load_pair(self.cert_path, self.key_path)

    def test_remade_when_one_file_missing(self):
        tls.server_context_factory(make_config(self.data_dir))
        old = read(self.cert_path)
        os.remove(self.key_path)
        tls.server_context_factory(make_config(self.data_dir))
        self.assertNotEqual(read(self.cert_path), old)
        tls.load_pair(self.cert_path, self.key_path)


class ConfiguredPairTests(unittest.TestCase):

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.data_dir = os.path.join(self.dir, "var")
        self.cert = os.path.join(self.dir, "pki", "mail.pem")
        self.key = os.path.join(self.dir, "pki", "mail.key")
        tls.generate_self_signed("configured.example.test", self.cert, self.key)

    def test_configured_pair_used(self):
        cfg = make_config(self.data_dir, certificate=self.cert, key=self.key)
        options, cert_path = tls.server_context_factory(cfg)
        self.assertEqual(cert_path, self.cert)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "tls")))
        return serve(options, handshake(verify=self.cert)).addCallback(
            lambda result: self.assertEqual(
                result[1], x509.load_pem_x509_certificate(read(self.cert)).public_bytes(
                    serialization.Encoding.DER)))

    def test_mismatched_pair_refused(self):
        other_cert = os.path.join(self.dir, "other", "c.pem")
        other_key = os.path.join(self.dir, "other", "k.pem")
        tls.generate_self_signed(HOST, other_cert, other_key)
        cfg = make_config(self.data_dir, certificate=self.cert, key=other_key)
        self.assertRaises(SSL.Error, tls.server_context_factory, cfg)

    def test_intermediates_are_sent(self):
        # fullchain.pem: leaf then intermediate. A client that trusts only the
        # root verifies the server only if the intermediate is sent along.
        root_key, root = _ca("Test Root", None, None)
        inter_key, inter = _ca("Test Intermediate", root_key, root)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _cert(HOST, leaf_key.public_key(), inter_key, inter, ca=False)
        chain = os.path.join(self.dir, "fullchain.pem")
        key = os.path.join(self.dir, "privkey.pem")
        root_path = os.path.join(self.dir, "root.pem")
        with open(chain, "wb") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM)
                    + inter.public_bytes(serialization.Encoding.PEM))
        with open(key, "wb") as f:
            f.write(leaf_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        with open(root_path, "wb") as f:
            f.write(root.public_bytes(serialization.Encoding.PEM))
        options, _ = tls.server_context_factory(
            make_config(self.data_dir, certificate=chain, key=key))
        return serve(options, handshake(verify=root_path)).addCallback(
            lambda result: self.assertEqual(result[0][:5], "TLSv1"))


def _ca(name, issuer_key, issuer):
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _cert(name, key.public_key(), issuer_key or key, issuer, ca=True)


def _cert(name, public_key, issuer_key, issuer, ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def handshake(maximum=None, minimum=None, weak=False, verify=None):
    """A blocking TLS client: returns (version, peer certificate DER) or raises."""
    def client(port):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if verify:
                ctx.load_verify_locations(verify)
                ctx.check_hostname = False
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if weak:
                # Debian's default security level refuses to even offer
                # TLS 1.0/1.1; level 0 lets this client try.
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            if minimum is not None:
                ctx.minimum_version = minimum
            if maximum is not None:
                ctx.maximum_version = maximum
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOST) as s:
                s.recv(6)
                return s.version(), s.getpeercert(binary_form=True)
    return client


def serve(options, client):
    """Listen on loopback with ``options``; run ``client(port)`` in a thread."""
    port = reactor.listenSSL(0, protocol.Factory.forProtocol(_Greeter), options,
                             interface="127.0.0.1")
    d = threads.deferToThread(client, port.getHost().port)

    def done(result):
        return port.stopListening().addCallback(lambda _: result)
    return d.addBoth(done)


def old_tls_works_here(data_dir):
    """Can this client do TLS 1.1 at all (against a permissive server)?"""
    cert = os.path.join(data_dir, "c.pem")
    key = os.path.join(data_dir, "k.pem")
    tls.generate_self_signed(HOST, cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.minimum_version = ssl.TLSVersion.TLSv1
        sctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    sctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def accept():
        try:
            conn, _ = listener.accept()
            with sctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"hello\n")
        except (OSError, ssl.SSLError):
            pass
    t = threading.Thread(target=accept)
    t.start()
    try:
        version, _ = handshake(maximum=ssl.TLSVersion.TLSv1_1,
                               minimum=ssl.TLSVersion.TLSv1, weak=True)(
            listener.getsockname()[1])
        return version == "TLSv1.1"
    except (OSError, ssl.SSLError):
        return False
    finally:
        t.join()
        listener.close()


class ProtocolVersionTests(unittest.TestCase):

    def setUp(self):
        self.options, _ = tls.server_context_factory(make_config(os.path.abspath(self.mktemp())))

    def test_context_excludes_old_protocols(self):
        ctx = self.options.getContext()
        options = ctx.set_options(0)      # returns the options in force
        for flag in ("OP_NO_SSLv3", "OP_NO_TLSv1", "OP_NO_TLSv1_1"):
            self.assertTrue(options & getattr(SSL, flag), flag)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    def test_tls12_handshake_succeeds(self):
        d = serve(self.options, handshake(maximum=ssl.TLSVersion.TLSv1_2))
        return d.addCallback(lambda result: self.assertEqual(result[0], "TLSv1.2"))

    def test_tls13_handshake_succeeds(self):
        d = serve(self.options, handshake(minimum=ssl.TLSVersion.TLSv1_3))
        return d.addCallback(lambda result: self.assertEqual(result[0], "TLSv1.3"))

    def test_tls11_handshake_refused(self):
        if not old_tls_works_here(self.mktemp()):
            raise unittest.SkipTest("this OpenSSL cannot offer TLS 1.1 even at SECLEVEL=0, "
                                    "so the server's refusal cannot be observed")
        d = serve(self.options, handshake(maximum=ssl.TLSVersion.TLSv1_1,
                                          minimum=ssl.TLSVersion.TLSv1, weak=True))
        d = self.assertFailure(d, ssl.SSLError)
        # Refused by the server ("protocol version" alert), not by the client.
        return d.addCallback(lambda e: self.assertIn("PROTOCOL_VERSION", str(e)))

    def test_tls10_handshake_refused(self):
        if not old_tls_works_here(self.mktemp()):
            raise unittest.SkipTest("this OpenSSL cannot offer old TLS versions even at "
                                    "SECLEVEL=0")
        d = serve(self.options, handshake(maximum=ssl.TLSVersion.TLSv1,
                                          minimum=ssl.TLSVersion.TLSv1, weak=True))
        d = self.assertFailure(d, ssl.SSLError)
        return d.addCallback(lambda e: self.assertIn("PROTOCOL_VERSION", str(e)))


class HelperTests(unittest.TestCase):

    def test_names_host(self):
        d = os.path.abspath(self.mktemp())
        tls.generate_self_signed(HOST, os.path.join(d, "c"), os.path.join(d, "k"))
        cert, _ = tls.load_pair(os.path.join(d, "c"), os.path.join(d, "k"))
        self.assertTrue(tls.names_host(cert, HOST))
        self.assertTrue(tls.names_host(cert, HOST.upper()))
        self.assertFalse(tls.names_host(cert, "other.example.test"))

    def test_load_chain_of_single_certificate_is_empty(self):
        d = os.path.abspath(self.mktemp())
        tls.generate_self_signed(HOST, os.path.join(d, "c"), os.path.join(d, "k"))
        self.assertEqual(tls.load_chain(os.path.join(d, "c")), [])


"""DKIM signing keys: made by ``mailappliance dkim keygen``, loaded by the signer.

A key lives in ``data_dir/<key_dir>/<domain>.<selector>.key`` (key_dir is
``[antispam.dkim] key_dir``, "dkim" by default), readable by the
appliance's user only (mode 0600, the folder 0700). An RSA key is PEM
(PKCS#1, as OpenDKIM's and most tools' keys are, so a key can be brought
along); an Ed25519 key (RFC 8463) is PEM PKCS#8.

The public half is published by the domain's administrator as a TXT record
(RFC 6376 3.6.1)::

    mail._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MIIBIjAN..." "..."

DNS strings hold at most 255 octets, so the record is given as several
strings, which a verifier joins. :func:`generate` returns that line;
:func:`keygen_command` is the command's whole behaviour (the CLI prints
what it returns).

Keys are read once and kept (:class:`KeyStore`), and read again when the
file changes (a new key of the same name put in place is used from the next
message on, no restart).
"""

from __future__ import annotations

import base64
import glob
import os
import re
import tempfile
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

SUFFIX = ".key"
MIN_BITS = 1024         # RFC 8301 3.2: verifiers refuse smaller RSA keys
MAX_BITS = 8192
_SELECTOR = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                       r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$")
EXIT_OK, EXIT_FAILED = 0, 1


class KeyFileError(Exception):
    """A key file that cannot be used (unreadable, not a key, a kind we do not sign with)."""


def algorithm_kind(algorithm: str) -> str:
    """"rsa" or "ed25519" for a key kind or a DKIM algorithm name ("rsa-sha256"...)."""
    a = (algorithm or "rsa").lower()
    return "ed25519" if a.startswith("ed25519") else "rsa"


def valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.match(selector or "")) and len(selector) <= 253


def key_path(data_dir, key_dir, domain, selector) -> str:
    return os.path.join(data_dir, key_dir, f"{domain.lower()}.{selector.lower()}{SUFFIX}")


# --- the DNS record -------------------------------------------------------

def dns_strings(text: str, size=255) -> list:
    """``text`` cut into DNS character-strings of at most ``size`` octets."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def txt_record(domain, selector, kind, public_b64) -> str:
    """The zone-file line to publish for a key (RFC 6376 3.6.1 tags)."""
    value = f"v=DKIM1; k={kind}; p={public_b64}"
    strings = " ".join(f'"{s}"' for s in dns_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def public_b64(private_key) -> tuple:
    """(kind, p= value) of a private key object (cryptography)."""
    pub = private_key.public_key()
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519", base64.b64encode(raw).decode("ascii")
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return "rsa", base64.b64encode(der).decode("ascii")


# --- making a key ---------------------------------------------------------

def _owner_of(path):
    """(uid, gid) to give new files when running as root: data_dir's owner."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _chown(path, owner):
    if owner is not None:
        try:
            os.chown(path, *owner)
        except OSError:
            pass


def generate(data_dir, key_dir, domain, selector, bits=2048, algorithm="rsa",
             force=False) -> str:
    """Make a key, write it (mode 0600) and return the TXT record to publish.

    Raises FileExistsError if the key exists and not ``force``, ValueError
    for a bad selector or size. As root, the folder and file are given to
    the owner of ``data_dir`` (the appliance's user), who must read them.
    """
    kind = algorithm_kind(algorithm)
    domain, selector = domain.lower().rstrip("."), selector.lower()
    if not valid_selector(selector):
        raise ValueError(f"invalid selector {selector!r}")
    if kind == "rsa" and not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"RSA key size must be {MIN_BITS} to {MAX_BITS} bits (RFC 8301)")
    path = key_path(data_dir, key_dir, domain, selector)
    if os.path.exists(path) and not force:
        raise FileExistsError(path)
    owner = _owner_of(data_dir)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        _chown(folder, owner)
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    # Written beside and renamed: an old key is replaced whole or not at all.
    fd, tmp = tempfile.mkstemp(prefix=".keygen-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        _chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return txt_record(domain, selector, *public_b64(key))


def keygen_command(config, domain, selector=None, bits=2048, force=False, algorithm=None):
    """``mailappliance dkim keygen DOMAIN [--selector S] [--bits N] [--force]``.

    Returns (exit code, text to print). The selector defaults to
    ``[antispam.dkim] selector``, the kind of key to its ``algorithm``.
    Refuses a domain that is not one of ``[server] domains`` and an existing
    key (without ``force``; the existing key's record is shown instead).
    """
    dk = config.antispam.dkim
    selector = (selector or dk.selector).lower()
    name = (domain or "").strip().lower().rstrip(".")
    local = {d.lower().rstrip(".") for d in config.server.domains}
    if name not in local:
        return EXIT_FAILED, (f"{domain}: not one of this server's domains "
                             f"({', '.join(sorted(local))})")
    if not valid_selector(selector):
        return EXIT_FAILED, f"{selector}: not a valid selector (a DNS label like \"mail\")"
    path = key_path(config.server.data_dir, dk.key_dir, name, selector)
    if os.path.exists(path) and not force:
        try:
            record = record_of(path, name, selector)
        except KeyFileError as e:
            record = f"(the existing key cannot be read: {e})"
        return EXIT_FAILED, (f"{path} exists; use --force to replace it. Its DNS record:\n"
                             f"{record}")
    try:
        record = generate(config.server.data_dir, dk.key_dir, name, selector, bits=bits,
                          algorithm=algorithm or dk.algorithm, force=force)
    except ValueError as e:
        return EXIT_FAILED, str(e)
    except OSError as e:
        return EXIT_FAILED, f"{path}: {e.strerror or e}"
    return EXIT_OK, (f"Key written to {path}\n"
                     f"Publish this DNS record, then mail from {name} is signed with it:\n"
                     f"{record}")


# --- loading a key --------------------------------------------------------

class SigningKey:
    """A loaded key: ``kind`` ("rsa"/"ed25519"), ``private`` (what dkimpy signs
    with: PEM for RSA, the base64 seed for Ed25519), ``selector``, ``path``."""

    def __init__(self, kind, private, selector, path, bits=0):
        self.kind = kind
        self.private = private
        self.selector = selector
        self.path = path
        self.bits = bits

    @property
    def algorithm(self) -> bytes:
        return b"ed25519-sha256" if self.kind == "ed25519" else b"rsa-sha256"


def read_key(path, selector) -> SigningKey:
    """Read and check one key file. Raises KeyFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception as e:      # cryptography raises several kinds for bad input
        raise KeyFileError(f"{path}: not a PEM private key without a password "
                           f"({type(e).__name__})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey("ed25519", base64.b64encode(seed), selector, path, 256)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_BITS:
            # Every verifier would call the signature a failure (RFC 8301).
            raise KeyFileError(f"{path}: an RSA key of {key.key_size} bits; DKIM needs at "
                               f"least {MIN_BITS}")
        # dkimpy reads PKCS#1 or PKCS#8 PEM with LF line ends: give it
        # PKCS#1 whatever the file had.
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return SigningKey("rsa", pem, selector, path, key.key_size)
    raise KeyFileError(f"{path}: neither an RSA nor an Ed25519 key")


def record_of(path, domain, selector) -> str:
    """The TXT record of an existing key file."""
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(65536), password=None)
    except Exception as e:      # unreadable, or not a key (several kinds)
        raise KeyFileError(f"{type(e).__name__}") from None
    return txt_record(domain, selector, *public_b64(key))


class KeyStore:
    """The signing keys under one folder, read once and again when a file changes.

    ``get(domain)`` (blocking: call it in a worker thread) returns the
    SigningKey for ``domain``: the one of the configured ``selector``, or
    else the newest ``<domain>.*.key`` (a key made with ``--selector``);
    None when the domain has none. A file that cannot be read is passed
    over; ``get_with_problem`` also says why, the first time after the file
    changed (for the log).
    """

    def __init__(self, folder, selector="mail"):
        self.folder = folder
        self.selector = selector.lower()
        self._lock = threading.Lock()
        self._cache = {}            # path -> ((mtime_ns, size, ino), SigningKey | None)

    def _candidates(self, domain):
        preferred = os.path.join(self.folder, f"{domain}.{self.selector}{SUFFIX}")
        if os.path.exists(preferred):
            return [(preferred, self.selector)]
        pattern = os.path.join(glob.escape(self.folder), glob.escape(domain) + ".*" + SUFFIX)
        found = []
        for path in glob.glob(pattern):
            selector = os.path.basename(path)[len(domain) + 1:-len(SUFFIX)]
            if valid_selector(selector):
                try:
                    found.append((os.stat(path).st_mtime_ns, path, selector))
                except OSError:
                    continue
        return [(p, s) for _, p, s in sorted(found, reverse=True)]

    def get(self, domain):
        return self.get_with_problem(domain)[0]

    def get_with_problem(self, domain):
        """(SigningKey or None, problem text or "")."""
        domain = domain.lower().rstrip(".")
        if "/" in domain or domain.startswith(".") or not domain:
            return None, ""
        problems = []
        for path, selector in self._candidates(domain):
            key, problem = self._load(path, selector)
            if problem:
                problems.append(problem)
            if key is not None:
                return key, "; ".join(problems)
        return None, "; ".join(problems)

    def _load(self, path, selector):
        try:
            st = os.stat(path)
        except OSError:
            return None, ""
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1], ""
        problem = ""
        try:
            key = read_key(path, selector)
        except KeyFileError as e:
            key, problem = None, str(e)
        with self._lock:
            self._cache[path] = (stamp, key)
        return key, problem

"""Helpers for IMAP tests: a raw client that sends exact bytes and reads tagged answers."""

import socket
import ssl

from tests.smtp_helpers import RawClient


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawIMAP(RawClient):
    """RawClient speaking IMAP: reads the greeting, waits for tagged answers."""

    def __init__(self, port, timeout=10):
        super().__init__(port, timeout=timeout)
        self.greeting = self.line(decode=False)

    def line(self, decode=False):
        return super().line(decode=decode)

    def until_tag(self, tag: bytes):
        """Lines up to and including the one starting with ``tag``."""
        lines = []
        while True:
            l = self.line()
            lines.append(l)
            if l.startswith(tag + b" "):
                return lines

    def cmd(self, tag, text):
        self.send(tag.encode() + b" " + text.encode() + b"\r\n")
        return self.until_tag(tag.encode())

    def starttls(self):
        self.send(b"t0 STARTTLS\r\n")
        assert self.until_tag(b"t0")[-1].startswith(b"t0 OK")
        self.sock = client_context().wrap_socket(self.sock)
        self.buf = b""

    def quiet(self, wait=0.5):
        """Whatever arrives within ``wait`` seconds (b"" if nothing)."""
        self.sock.settimeout(wait)
        try:
            return self.buf + self.sock.recv(65536)
        except (socket.timeout, ssl.SSLError):
            return self.buf
        finally:
            self.sock.settimeout(10)


"""Helpers for IMAP tests: a raw client that sends exact bytes and reads tagged answers."""

import socket
import ssl


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawIMAP:
    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

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

    def close(self):
        self.sock.close()

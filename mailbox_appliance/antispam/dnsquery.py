"""TXT lookups for the content filters (DKIM keys, DMARC policies), on the reactor.

DKIM and DMARC both ask one question: the TXT records at a name built from
a header field (``<selector>._domainkey.<d=>``, ``_dmarc.<From domain>``).
They ask it through the appliance's twisted.names resolver (the ``[dns]
servers``, with its cache), never blocking, under a deadline of their own.
What a caller needs to tell apart is only three outcomes, which
:func:`lookup_txt` gives:

- records found: a list of their texts (the strings of each record joined,
  RFC 6376 3.6.2.2 and RFC 7489 6.6.3 both read a record that way);
- no such name or no TXT records: an empty list (a permanent answer);
- anything else (SERVFAIL, refused, a timeout, a malformed reply):
  :class:`TempError` - the answer may differ later, so the caller must
  never turn it into a rejection.

The names come from mail, i.e. from anyone: :func:`dns_name` accepts only
names DNS could hold, so a hostile ``d=`` can neither reach the resolver
with odd bytes nor make the header fields we write carry them.
"""

from __future__ import annotations

import re

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError

# One label: letters, digits, hyphen, and underscore (_domainkey, _dmarc, and
# selectors that use it); no empty label, at most 63 octets.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Records longer than this are not keys or policies anyone publishes.
MAX_TXT = 16384


class TempError(Exception):
    """The DNS answer could not be had now (SERVFAIL, timeout...): try again later."""


def dns_name(text) -> str | None:
    """``text`` as a lower-case ASCII domain name, or None if DNS could not hold it.

    Accepts str or bytes; a trailing dot is dropped; at least two labels.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(l) for l in labels):
        return None
    return name


def _texts(result) -> list:
    answers = result[0] if isinstance(result, tuple) else result
    out = []
    for rr in answers:
        if rr.type != dns.TXT:
            continue            # the CNAME records of a chain
        text = b"".join(rr.payload.data)
        if len(text) <= MAX_TXT:
            out.append(text)
    return out


def lookup_txt(resolver, reactor, name, timeout):
    """A Deferred of the TXT texts (bytes) at ``name``: [] for NXDOMAIN or
    NODATA; fails with :class:`TempError` for every other failure or after
    ``timeout`` seconds on ``reactor``'s clock."""
    try:
        d = resolver.lookupText(name)
    except Exception as e:          # a resolver refusing the name outright
        return defer.fail(TempError(f"lookup of {name} failed: {type(e).__name__}"))
    d.addTimeout(timeout, reactor)

    def failed(failure):
        if failure.check(DNSNameError):
            return []
        if failure.check(defer.TimeoutError):
            raise TempError(f"DNS timeout looking up TXT {name}")
        raise TempError(f"DNS error looking up TXT {name}: {failure.type.__name__}")
    return d.addCallbacks(_texts, failed)

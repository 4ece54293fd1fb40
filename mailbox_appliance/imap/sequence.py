"""IMAP sequence sets (RFC 3501 9: ``1:5,7,10:*``)."""

from __future__ import annotations

import re

_SET = re.compile(r"^(\d+|\*)(:(\d+|\*))?(,(\d+|\*)(:(\d+|\*))?)*$")


class SequenceSetError(ValueError):
    """Not a valid sequence set."""


def parse_sequence_set(text: str):
    """A list of (low, high) ranges; ``*`` is None. Raises SequenceSetError."""
    if not _SET.match(text) or len(text) > 100000:
        raise SequenceSetError(text[:50])
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        lo_v = None if lo == "*" else int(lo)
        hi_v = lo_v if not hi else (None if hi == "*" else int(hi))
        if lo_v == 0 or hi_v == 0:
            raise SequenceSetError("0 is not a valid message number")
        ranges.append((lo_v, hi_v))
    return ranges


def resolve(ranges, largest):
    """The ranges with ``*`` replaced by ``largest`` and each range ordered (lo <= hi)."""
    out = []
    for lo, hi in ranges:
        lo = largest if lo is None else lo
        hi = largest if hi is None else hi
        if lo > hi:
            lo, hi = hi, lo
        out.append((lo, hi))
    return out


def contains(ranges, value, largest):
    """Whether ``value`` is in the set (``*`` meaning ``largest``)."""
    return any(lo <= value <= hi for lo, hi in resolve(ranges, largest))

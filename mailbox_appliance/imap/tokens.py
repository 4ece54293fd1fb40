"""How parsed IMAP command arguments are represented.

The command parser turns the arguments of a command into Python values:

* ``Atom`` (a ``str`` subclass) for atoms, including fetch attributes with a
  section such as ``BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>`` kept whole,
  sequence sets (``1:5,7,*``) and flags (``\\Seen``);
* ``bytes`` for quoted strings and literals (their octets, unescaped);
* ``list`` for parenthesized lists.

NIL stays the atom ``NIL``: only the command knows whether it means "nothing"
or a mailbox that happens to be called NIL.
"""


class Atom(str):
    """An IMAP atom; compare case-insensitively with ``upper()`` where IMAP says so."""

    __slots__ = ()

    def __repr__(self):
        return f"Atom({str.__repr__(self)})"


def astring(token):
    """An astring argument (atom or string) as text, or None if it is neither."""
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(token, Atom):
        return str(token)
    return None

"""The mail log: one Postfix-style line per event, keyed by queue id.

Lines are built with plain string formatting and handed to twisted.logger
under a trivial format, because the logger's own formatter parses its format
string on every event and these lines are written several times per message.
The values stay available as event fields for structured observers.
"""


def mail_event(logger, text, **fields):
    """Log one mail event line, e.g. ``<qid>: to=<...>, status=sent (...)``."""
    logger.info("{mail_log}", mail_log=text, **fields)

"""The checks at the door: each a policy object (``IPolicyCheck``) in its own module.

Like Postfix's restriction lists, every check has a name, the SMTP stages it
looks at and one ``check()``; ``registry.build_checks`` makes the configured
ones for a listener. They log their reason and count their verdicts, and
none of them turns a DNS error into a 5xx.
"""

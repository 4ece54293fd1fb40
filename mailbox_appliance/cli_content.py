"""The content-filter commands of ``mailappliance``.

    mailappliance [--config PATH] spam explain FILE [--sender A] [--recipient A]
                  [--client-ip IP] [--helo NAME] [--json]
    mailappliance [--config PATH] dkim keygen DOMAIN [--selector S] [--bits N] [--force]
    mailappliance [--config PATH] bayes train --spam|--ham PATH [--user ADDRESS]

``spam explain`` runs the content filters of the configuration on one
message file, as the MX would at end of data, and prints each filter's
findings, the score and what the MX would do, delivering nothing. Door
checks (SPF, block lists) need the SMTP dialogue and are not run; the
DNS-based filters (DKIM, DMARC) ask the configured DNS servers.
``dkim keygen`` writes a signing key under ``data_dir`` and prints the TXT
record to publish. ``bayes train`` teaches the Bayesian filter from a
Maildir, an mbox file or one message file; it is safe beside a running
appliance (the token database is in WAL mode).
"""

from __future__ import annotations

import json
import os

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_commands(sub, json_flag):
    """Register the commands on the admin command's subparsers."""
    s = sub.add_parser("spam", help="show how the content filters judge a message")
    s.set_defaults(func=cmd_spam, action=None)
    ssub = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ssub.add_parser("explain", parents=[json_flag],
                        help="each filter's verdict and score for a message file")
    p.add_argument("file", help="the message (RFC 5322 file)")
    p.add_argument("--sender", default="", help="envelope sender to assume")
    p.add_argument("--recipient", action="append", default=[],
                   help="envelope recipient to assume (repeatable)")
    p.add_argument("--client-ip", default="", help="client address to assume")
    p.add_argument("--helo", default="", help="HELO name to assume")

    d = sub.add_parser("dkim", help="DKIM signing keys")
    d.set_defaults(func=cmd_dkim, action=None)
    dsub = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = dsub.add_parser("keygen", help="make a signing key for a local domain and print "
                                       "the DNS record to publish")
    p.add_argument("domain", help="one of [server] domains")
    p.add_argument("--selector", default=None, help="selector (default [antispam.dkim] "
                                                    "selector)")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--force", action="store_true", help="replace an existing key")

    b = sub.add_parser("bayes", help="train the Bayesian filter")
    b.set_defaults(func=cmd_bayes, action=None)
    bsub = b.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = bsub.add_parser("train", help="learn messages as spam or as ham")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--spam", action="store_true", help="the messages are spam")
    kind.add_argument("--ham", action="store_true", help="the messages are wanted mail")
    p.add_argument("path", help="a Maildir, an mbox file or one message file")
    p.add_argument("--user", default=None, help="learn for this user only (an address)")


def _load(args):
    from mailbox_appliance.cli import load_config
    return load_config(args)


def _run_on_reactor(work):
    """Run ``work(reactor)`` (a coroutine function) on a fresh reactor; its result."""
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure
    out = []

    def go():
        d = defer.ensureDeferred(work(reactor))
        d.addBoth(out.append).addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    result = out[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def cmd_spam(args) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    limit = cfg.antispam.content.max_scan_size
    try:
        with open(args.file, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        print(f"mailappliance: cannot read {args.file}: {e.strerror}", file=args.err)
        return EXIT_FAILED
    if len(raw) > limit:
        print(f"mailappliance: {args.file} is larger than max_scan_size ({limit} octets): "
              "the MX would not scan it", file=args.err)
        return EXIT_FAILED
    # A file saved by a mail client has LF line ends; the MX sees CRLF.
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    doc = _run_on_reactor(lambda reactor: explain(cfg, reactor, raw, args))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True), file=args.out)
    else:
        print(render_explanation(doc), file=args.out)
    return EXIT_OK


async def explain(cfg, reactor, raw, args):
    """What every content filter says of ``raw``: a JSON-able document."""
    from twisted.internet import threads
    from mailbox_appliance.antispam.message import ScannedMessage
    from mailbox_appliance.antispam.registry import content_scan, open_content_state
    from mailbox_appliance.dns import make_resolver
    from mailbox_appliance.smtp.session import SessionState

    c = cfg.antispam.content
    # Read only: explaining a message must not change what the appliance learned.
    state = open_content_state(cfg, reactor, read_only=True)
    services = list(state.values())
    for svc in services:
        await _maybe(svc.startService())
    try:
        resolver = make_resolver(reactor, cfg)
        scan = content_scan(cfg, reactor, resolver, state, even_if_off=True)
        msg = await threads.deferToThread(
            ScannedMessage.parse, raw, sender=args.sender,
            recipients=tuple(args.recipient), client_ip=args.client_ip, helo=args.helo)
        session = SessionState(client_ip=args.client_ip, helo=args.helo)
        j = await scan.evaluate(msg, session)
    finally:
        for svc in reversed(services):
            await _maybe(svc.stopService())
    filters = []
    for name, result, problem in j.results:
        entry = {"filter": name, "problem": problem}
        if result is not None:
            entry.update(hits=result.hits, auth=result.auth,
                         headers=[f"{n}: {v}" for n, v in result.headers],
                         action=result.action, reason=result.reason,
                         verdict=result.verdict.reply if result.verdict else None)
        filters.append(entry)
    if j.verdict is not None:
        outcome = f"refused: {j.verdict.reply}"
    elif j.action == "discard":
        outcome = "accepted and discarded"
    elif j.action == "hold":
        outcome = "accepted and held in the queue"
    elif j.action == "junk":
        outcome = "delivered into Junk" + (" (spam)" if j.spam else "")
    else:
        outcome = "delivered into the inbox"
    return {"filters": filters, "score": float(j.score), "tag_score": c.tag_score,
            "reject_score": c.reject_score, "spam": j.spam, "outcome": outcome,
            "fields": [f"{n}: {v}" for n, v in scan.summary_fields(j)],
            "size": len(raw), "parts": msg.parts, "truncated": msg.truncated}


async def _maybe(result):
    from twisted.internet import defer
    if isinstance(result, defer.Deferred):
        await result


def render_explanation(doc) -> str:
    from mailbox_appliance.cli import _display
    lines = [f"message: {doc['size']} octets, {doc['parts']} MIME parts"
             + (" (parsed in part: over a bound)" if doc["truncated"] else "")]
    for f in doc["filters"]:
        line = f"{f['filter']}: "
        if f["problem"]:
            lines.append(line + f["problem"])
            continue
        if "hits" not in f:
            lines.append(line + "no opinion")
            continue
        hits = ", ".join(f"{n}={v:+.1f}" for n, v in sorted(f["hits"].items())) or "no hits"
        lines.append(line + hits)
        for extra in ("auth", "headers"):
            for item in f[extra]:
                lines.append(f"    {item}")
        for key in ("action", "verdict", "reason"):
            if f.get(key):
                lines.append(f"    {key}: {f[key]}")
    lines.append(f"score: {doc['score']:.1f} (tag at {doc['tag_score']:.1f}, "
                 f"reject at {doc['reject_score']:.1f})")
    lines.append(f"outcome: {doc['outcome']}")
    for field in doc["fields"]:
        lines += [p.replace("\t", "    ") for p in field.split("\r\n")]
    return "\n".join(_display(line) for line in lines)


def cmd_dkim(args) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    from mailbox_appliance.antispam import dkim_keys
    code, text = dkim_keys.keygen_command(cfg, args.domain,
                                          args.selector or cfg.antispam.dkim.selector,
                                          args.bits, args.force)
    print(text, file=args.out if code == EXIT_OK else args.err)
    return code


def cmd_bayes(args) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    from mailbox_appliance.antispam import bayes_train
    code, text = bayes_train.train_command(cfg, os.path.abspath(args.path), args.spam,
                                           user=args.user)
    print(text, file=args.out if code == EXIT_OK else args.err)
    return code

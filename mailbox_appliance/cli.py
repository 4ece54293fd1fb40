"""The ``mailappliance`` admin command.

    mailappliance [--config PATH] check-config [PATH]
    mailappliance [--config PATH] queue [list] [--json]
    mailappliance [--config PATH] queue show ID [--json] [--body]
    mailappliance [--config PATH] queue flush [ID|DOMAIN] [--json]
    mailappliance [--config PATH] queue hold|release|delete ID [--json]
    mailappliance [--config PATH] greylist [list] [--json]
    mailappliance [--config PATH] greylist whitelist|delete IP SENDER RECIPIENT [--json]
    mailappliance [--config PATH] spam explain FILE [--json]
    mailappliance [--config PATH] dkim keygen DOMAIN [--selector S]
    mailappliance [--config PATH] bayes train --spam|--ham PATH [--user ADDRESS]

(The last three are in ``cli_content.py``.)

It reads the same configuration and ``data_dir`` as a running appliance and
never needs it stopped. Listing and showing read the queue files (safe at
any time). Flush, hold, release and delete go through the appliance's
control socket (``data_dir/control.sock``) when it runs, so its scheduler
makes the change; when nothing listens there, hold, release and delete
move or remove the files themselves (nothing else touches them then).
The greylist commands open the state database (``data_dir/state.sqlite3``)
themselves: it is in WAL mode, so this is safe beside a running appliance.

Exit codes: 0 done, 1 no such message or the action failed, 2 the
configuration is wrong.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

from mailbox_appliance import config as config_module

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# Queue ids are made by Spool.new_qid: hex digits. Anything else is not one
# (and could name a path outside the queue).
_QID = re.compile(r"^[0-9A-Za-z]{1,64}$")
_TARGET = re.compile(r"^[0-9A-Za-z@._-]{1,255}$")
# How much of a message ``queue show`` reads for its header block.
MAX_SHOW_HEADERS = 256 * 1024
RECORDS = (".done", ".status")


class _Failed(Exception):
    """An action could not be done; the message is for the administrator."""


def _config_path(args):
    return args.config or os.environ.get("MAILAPPLIANCE_CONFIG") or "etc/mailappliance.toml"


def load_config(args):
    """The configuration the command names, or None once the error is printed."""
    try:
        return config_module.load(_config_path(args))
    except config_module.ConfigError as e:
        print(f"mailappliance: configuration error: {e}", file=args.err)
        return None


def _display(text) -> str:
    """Text safe to print on a terminal: no control characters (escape sequences)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def cmd_check_config(args) -> int:
    path = args.path or _config_path(args)
    try:
        cfg = config_module.load(path)
        config_module.check_rule_files(cfg)
    except config_module.ConfigError as e:
        print(f"mailappliance: configuration error: {e}", file=args.err)
        return EXIT_CONFIG
    print(f"{cfg.path}: configuration ok", file=args.out)
    return EXIT_OK


# -- reading the queue ----------------------------------------------------------

class QueueFolders:
    """The queue's folders under one data_dir, as the admin command sees them."""

    def __init__(self, data_dir):
        self.root = os.path.join(data_dir, "queue")
        self.active = os.path.join(self.root, "active")
        self.hold = os.path.join(self.root, "hold")
        self.socket = os.path.join(data_dir, "control.sock")

    def messages(self):
        """Every readable message of active/ and hold/, oldest first; and the unreadable."""
        from mailbox_appliance.queue.spool import SpoolError, read_queue_file
        found, bad = [], []
        for folder, held in ((self.active, False), (self.hold, True)):
            try:
                names = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            for name in names:
                if "." in name:
                    continue            # .done / .status records
                try:
                    m = read_queue_file(name, os.path.join(folder, name))
                except FileNotFoundError:
                    continue            # delivered (or moved) while we listed
                except (OSError, SpoolError, ValueError) as e:
                    bad.append((name, str(e)))
                    continue
                m.held = held
                found.append(m)
        found.sort(key=lambda m: (m.envelope.arrival, m.qid))
        return found, bad

    def find(self, qid):
        """The message with this queue id (active/ first, then hold/), or None."""
        from mailbox_appliance.queue.spool import SpoolError, read_queue_file
        if not _QID.match(qid or ""):
            return None
        for folder, held in ((self.active, False), (self.hold, True)):
            path = os.path.join(folder, qid)
            try:
                m = read_queue_file(qid, path)
            except FileNotFoundError:
                continue
            except (OSError, SpoolError, ValueError) as e:
                raise _Failed(f"{qid}: unreadable queue file: {e}") from e
            m.held = held
            return m
        return None


def _state(m, idx):
    if f"{idx}:*" in m.done:
        return "done"
    if idx in m.last:
        return "deferred"
    return "pending"


def _age(seconds):
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _local_time(ts, fmt="%a %b %d %H:%M:%S"):
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime(fmt) if ts else "-"


def _iso(ts):
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def message_document(m, now):
    """What the JSON output says of one message."""
    env = m.envelope
    recipients = []
    for idx, address in enumerate(env.recipients):
        last = m.last.get(idx)
        recipients.append({
            "address": address,
            "status": _state(m, idx),
            "notify": env.notify_of(idx),
            "orcpt": env.orcpt_of(idx),
            "last": None if last is None else {
                "status": last.get("status", ""),
                "enhanced": last.get("enhanced", ""),
                "reply": last.get("reply", ""),
                "remote_mta": last.get("remote_mta", ""),
                "at": last.get("at", 0.0),
            },
        })
    return {
        "id": m.qid,
        "held": m.held,
        "size": m.size,
        "arrival": env.arrival,
        "arrival_date": _iso(env.arrival),
        "age": max(0.0, now - env.arrival) if env.arrival else None,
        "sender": env.sender,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "protocol": env.protocol,
        "auth": env.auth,
        "ret": env.ret,
        "envid": env.envid,
        "notice": env.notice,
        "attempts": m.attempts,
        "next_attempt": m.next_attempt or None,
        "next_attempt_date": _iso(m.next_attempt),
        "recipients": recipients,
    }


def _recipient_lines(m, indent):
    lines = []
    for idx, address in enumerate(m.envelope.recipients):
        state = _state(m, idx)
        lines.append(f"{indent}{_display(address)}  [{state}]")
        last = m.last.get(idx)
        if state == "deferred" and last:
            about = [_display(last.get("reply", "")) or "no reason recorded"]
            if last.get("remote_mta"):
                about.append("from " + _display(last["remote_mta"]))
            lines.append(f"{indent}    ({', '.join(about)})")
    return lines


def cmd_queue_list(args, folders, now) -> int:
    messages, bad = folders.messages()
    if args.json:
        _dump([message_document(m, now) for m in messages], args.out)
        return EXIT_OK
    out = args.out
    if not messages and not bad:
        print("Mail queue is empty", file=out)
        return EXIT_OK
    print(f"{'-Queue ID-':<17} {'--Size--':>9} {'----Arrival Time----':<20} "
          f"{'-Age-':>8}  -Sender/Recipient-------", file=out)
    indent = " " * (17 + 1 + 9 + 1 + 20 + 1 + 8 + 2)
    for m in messages:
        mark = "!" if m.held else " "
        sender = _display(m.envelope.sender) or "MAILER-DAEMON"
        age = _age(now - m.envelope.arrival) if m.envelope.arrival else "-"
        print(f"{m.qid}{mark:<{max(1, 17 - len(m.qid))}} {m.size:>9} "
              f"{_local_time(m.envelope.arrival):<20} {age:>8}  {sender}", file=out)
        if m.attempts:
            nxt = (", next " + _local_time(m.next_attempt)) if m.next_attempt and not m.held \
                else ""
            print(f"{indent}({m.attempts} attempt{'s' if m.attempts != 1 else ''}{nxt})",
                  file=out)
        for line in _recipient_lines(m, indent):
            print(line, file=out)
        print("", file=out)
    for name, why in bad:
        print(f"{_display(name)}  (unreadable: {_display(why)})", file=out)
    held = sum(1 for m in messages if m.held)
    kbytes = (sum(m.size for m in messages) + 1023) // 1024
    print(f"-- {kbytes} Kbytes in {len(messages)} message(s)"
          + (f", {held} held" if held else ""), file=out)
    return EXIT_OK


def _read_headers(m):
    from mailbox_appliance.queue.dsn import header_block
    with open(m.path, "rb") as f:
        f.seek(m.body_offset)
        data = f.read(MAX_SHOW_HEADERS + 4)
    return header_block(data)


def cmd_queue_show(args, folders, now) -> int:
    m = folders.find(args.id)
    if m is None:
        return _not_found(args, args.id)
    try:
        headers = _read_headers(m)
    except FileNotFoundError:
        return _not_found(args, args.id)     # delivered since
    if args.json:
        doc = message_document(m, now)
        doc["headers"] = headers.decode("utf-8", "replace")
        if args.body:
            doc["message"] = _read_message(m).decode("utf-8", "replace")
        _dump(doc, args.out)
        return EXIT_OK
    out, env = args.out, m.envelope
    age = f" ({_age(now - env.arrival)} ago)" if env.arrival else ""
    client = " ".join(x for x in (_display(env.helo),
                                  f"[{_display(env.client_ip)}]" if env.client_ip else "") if x)
    via = _display(env.protocol) + (f", authenticated as {_display(env.auth)}"
                                     if env.auth else "")
    rows = [("Queue ID", m.qid + ("  (on hold)" if m.held else "")),
            ("Size", f"{m.size} bytes"),
            ("Arrival", (_local_time(env.arrival, "%Y-%m-%d %H:%M:%S %z") or "-") + age),
            ("Sender", f"<{_display(env.sender)}>"),
            ("Client", f"{client or '-'} ({via})")]
    dsn = " ".join(x for x in (f"RET={_display(env.ret)}" if env.ret else "",
                               f"ENVID={_display(env.envid)}" if env.envid else "") if x)
    if dsn:
        rows.append(("DSN", dsn))
    if env.notice:
        rows.append(("Notice", env.notice))
    attempts = str(m.attempts)
    if m.next_attempt and not m.held:
        attempts += ", next " + _local_time(m.next_attempt, "%Y-%m-%d %H:%M:%S %z")
    rows.append(("Attempts", attempts))
    for name, value in rows:
        print(f"{name + ':':<11} {value}", file=out)
    print("Recipients:", file=out)
    for idx, address in enumerate(env.recipients):
        extra = " ".join(x for x in (
            f"NOTIFY={_display(env.notify_of(idx))}" if env.notify_of(idx) else "",
            f"ORCPT={_display(env.orcpt_of(idx))}" if env.orcpt_of(idx) else "") if x)
        print(f"  {_display(address)}  [{_state(m, idx)}]" + (f"  {extra}" if extra else ""),
              file=out)
        last = m.last.get(idx)
        if last and _state(m, idx) != "done":
            when = _local_time(last.get("at", 0), "%Y-%m-%d %H:%M:%S")
            host = f", from {_display(last['remote_mta'])}" if last.get("remote_mta") else ""
            print(f"      last: {_display(last.get('reply', ''))} (at {when}{host})", file=out)
    print("", file=out)
    if args.body:
        _write_raw(_read_message(m), out)
    else:
        # Header text is the sender's: shown, but never as terminal controls.
        for line in headers.decode("utf-8", "replace").split("\r\n"):
            if line:
                print(_display(line.replace("\t", " ")), file=out)
    return EXIT_OK


def _read_message(m):
    with open(m.path, "rb") as f:
        f.seek(m.body_offset)
        return f.read()


def _write_raw(data, out):
    buffer = getattr(out, "buffer", None)
    out.flush()
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode("utf-8", "replace"))


def _dump(doc, out):
    print(json.dumps(doc, indent=2, ensure_ascii=True), file=out)


def _not_found(args, qid):
    message = f"no such message in the queue: {_display(qid)}"
    if args.json:
        _dump({"ok": False, "error": message}, args.out)
    print(f"mailappliance: {message}", file=args.err)
    return EXIT_FAILED


# -- acting on the queue ----------------------------------------------------------

def _move_offline(folders, qid, to_hold):
    """Move a message and its records between active/ and hold/; 1, or 0 if there."""
    from mailbox_appliance.durable import fsync_dir
    src, dst = (folders.active, folders.hold) if to_hold else (folders.hold, folders.active)
    if not os.path.exists(os.path.join(src, qid)):
        if os.path.exists(os.path.join(dst, qid)):
            return 0
        raise KeyError(qid)
    os.makedirs(dst, mode=0o700, exist_ok=True)
    # Records first, as Spool.move does: a crash between leaves records
    # beside their message's other folder, which the spool's recovery mends.
    for ext in RECORDS:
        try:
            os.rename(os.path.join(src, qid + ext), os.path.join(dst, qid + ext))
        except FileNotFoundError:
            pass
    os.rename(os.path.join(src, qid), os.path.join(dst, qid))
    fsync_dir(src)
    fsync_dir(dst)
    return 1


def _delete_offline(folders, qid):
    from mailbox_appliance.durable import fsync_dir
    for folder in (folders.active, folders.hold):
        path = os.path.join(folder, qid)
        if os.path.exists(path):
            # The message first, its records after (as Spool.remove).
            os.unlink(path)
            for ext in RECORDS:
                try:
                    os.unlink(path + ext)
                except FileNotFoundError:
                    pass
            fsync_dir(folder)
            return 1
    raise KeyError(qid)


def _offline(folders, op, target):
    if op == "hold":
        return _move_offline(folders, target, True), ""
    if op == "release":
        return _move_offline(folders, target, False), ""
    if op == "delete":
        return _delete_offline(folders, target), ""
    return 0, "appliance not running: the queue is run at start"


def cmd_queue_action(args, folders, now) -> int:
    from mailbox_appliance.queue.control import ControlError, ControlUnavailable, send_command
    op = args.action
    target = getattr(args, "id", None) or getattr(args, "target", None)
    if op == "flush" and target is not None and not _TARGET.match(target):
        return _fail(args, f"not a queue id or domain: {target}")
    if op != "flush" and not _QID.match(target or ""):
        return _not_found(args, target)
    note = ""
    try:
        reply = send_command(folders.socket, op, target)
    except ControlUnavailable:
        try:
            count, note = _offline(folders, op, target)
        except KeyError:
            return _not_found(args, target)
        except OSError as e:
            return _fail(args, f"{op} {target}: {e.strerror or e}")
        reply = {"ok": True, "count": count}
    except ControlError as e:
        return _fail(args, str(e))
    if not reply.get("ok"):
        if reply.get("code") == "not_found":
            return _not_found(args, target)
        return _fail(args, str(reply.get("error", "the appliance refused")))
    count = reply.get("count", 0)
    if args.json:
        _dump({"ok": True, "count": count, **({"note": note} if note else {})}, args.out)
        return EXIT_OK
    print(_describe(op, target, count, note), file=args.out)
    return EXIT_OK


def _describe(op, target, count, note):
    if note:
        return note
    if op == "flush":
        what = f" for {_display(target)}" if target else ""
        return f"{count} message(s) scheduled for delivery now{what}"
    if op == "hold":
        return f"{target}: held" if count else f"{target}: already on hold"
    if op == "release":
        return f"{target}: released" if count else f"{target}: was not on hold"
    return f"{target}: deleted"


def _fail(args, message):
    if args.json:
        _dump({"ok": False, "error": message}, args.out)
    print(f"mailappliance: {_display(message)}", file=args.err)
    return EXIT_FAILED


QUEUE_COMMANDS = {"list": cmd_queue_list, "show": cmd_queue_show, "flush": cmd_queue_action,
                  "hold": cmd_queue_action, "release": cmd_queue_action,
                  "delete": cmd_queue_action}


def cmd_queue(args) -> int:
    cfg = load_config(args)
    if cfg is None:
        return EXIT_CONFIG
    folders = QueueFolders(cfg.server.data_dir)
    action = args.action or "list"
    try:
        return QUEUE_COMMANDS[action](args, folders, time.time())
    except _Failed as e:
        return _fail(args, str(e))


# -- the greylist -------------------------------------------------------------------------

def _greylist_triplet(args):
    """(network, sender, recipient) of the command line, or raise _Failed.

    IP is a client address or a network as ``greylist list`` shows it
    (192.0.2.0/24); SENDER may be ``<>`` (or "") for the null sender.
    """
    import ipaddress
    from mailbox_appliance.antispam.greylist import client_network, path_text
    ip = args.ip.strip()
    if "/" in ip:
        try:
            ip = str(ipaddress.ip_network(ip, strict=False).network_address)
        except ValueError:
            raise _Failed(f"not an IP address or network: {ip}") from None
    network = client_network(ip)
    if network is None:
        raise _Failed(f"not an IP address or network: {args.ip}")
    sender, recipient = path_text(args.sender), path_text(args.recipient)
    for what, value in (("sender", sender), ("recipient", recipient)):
        if len(value) > 320 or any(not c.isprintable() or c.isspace() for c in value):
            raise _Failed(f"not an address: {what} {value}")
    if not recipient or "@" not in recipient:
        raise _Failed(f"not an address: recipient {args.recipient}")
    if sender and "@" not in sender:
        raise _Failed(f"not an address: sender {args.sender} (<> for the null sender)")
    return network, sender, recipient


def _entry_document(e):
    doc = e.as_dict()
    doc["first_seen_date"] = _iso(e.first_seen)
    doc["last_seen_date"] = _iso(e.last_seen)
    doc["whitelisted_until_date"] = _iso(e.whitelisted_until)
    return doc


def cmd_greylist_list(args, cfg, path, now) -> int:
    from mailbox_appliance import state
    if not os.path.exists(path):
        entries = []            # greylisting never ran: nothing to create here
    else:
        conn = state.connect(path)
        try:
            entries = state.list_entries(conn)
        finally:
            conn.close()
    if args.json:
        _dump([_entry_document(e) for e in entries], args.out)
        return EXIT_OK
    out = args.out
    if not entries:
        print("Greylist is empty", file=out)
        return EXIT_OK
    print(f"{'-Network-':<20} {'-First seen-':<20} {'-Passes-':>8}  {'-Status-':<32} "
          "-Sender -> Recipient-", file=out)
    for e in entries:
        if e.whitelisted(now):
            status = "whitelisted until " + _local_time(e.whitelisted_until, "%Y-%m-%d %H:%M")
        elif e.whitelisted_until:
            status = "whitelisting ended"
        else:
            status = f"pending, {e.attempts} deferred"
        print(f"{_display(e.network):<20} {_local_time(e.first_seen):<20} {e.passes:>8}  "
              f"{status:<32} <{_display(e.sender)}> -> <{_display(e.recipient)}>", file=out)
    whitelisted = sum(1 for e in entries if e.whitelisted(now))
    print(f"-- {len(entries)} triplet(s), {whitelisted} whitelisted", file=out)
    return EXIT_OK


def _open_for_writing(cfg, path):
    """The state database, created if needed with the owner of data_dir."""
    from mailbox_appliance import state
    return state.open_for_writing(path)


def cmd_greylist_change(args, cfg, path, now) -> int:
    from mailbox_appliance import state
    network, sender, recipient = _greylist_triplet(args)
    if args.action == "delete" and not os.path.exists(path):
        return _no_triplet(args, network, sender, recipient)
    conn = _open_for_writing(cfg, path)
    try:
        if args.action == "whitelist":
            until = now + config_module.parse_duration(cfg.antispam.greylist.auto_whitelist)
            entry = state.whitelist_entry(conn, network, sender, recipient, now, until)
        elif not state.delete_entry(conn, network, sender, recipient):
            return _no_triplet(args, network, sender, recipient)
    finally:
        conn.close()
    what = f"{network} <{_display(sender)}> -> <{_display(recipient)}>"
    if args.json:
        doc = {"ok": True, "network": network, "sender": sender, "recipient": recipient}
        if args.action == "whitelist":
            doc["whitelisted_until"] = entry.whitelisted_until
            doc["whitelisted_until_date"] = _iso(entry.whitelisted_until)
        _dump(doc, args.out)
    elif args.action == "whitelist":
        print(f"{what}: whitelisted until "
              f"{_local_time(entry.whitelisted_until, '%Y-%m-%d %H:%M:%S %z')}", file=args.out)
    else:
        print(f"{what}: deleted", file=args.out)
    return EXIT_OK


def _no_triplet(args, network, sender, recipient):
    message = (f"no such greylist triplet: {network} <{_display(sender)}> -> "
               f"<{_display(recipient)}>")
    if args.json:
        _dump({"ok": False, "error": message}, args.out)
    print(f"mailappliance: {message}", file=args.err)
    return EXIT_FAILED


GREYLIST_COMMANDS = {"list": cmd_greylist_list, "whitelist": cmd_greylist_change,
                     "delete": cmd_greylist_change}


def cmd_greylist(args) -> int:
    import sqlite3
    from mailbox_appliance import state
    cfg = load_config(args)
    if cfg is None:
        return EXIT_CONFIG
    path = os.path.join(cfg.server.data_dir, state.FILENAME)
    action = args.action or "list"
    try:
        return GREYLIST_COMMANDS[action](args, cfg, path, time.time())
    except _Failed as e:
        return _fail(args, str(e))
    except (sqlite3.Error, OSError) as e:
        return _fail(args, f"state database {path}: {e}")


def cmd_stats(args) -> int:
    """What the running appliance's checks and filters have done since it started."""
    from mailbox_appliance.queue.control import ControlError, ControlUnavailable, send_command
    cfg = load_config(args)
    if cfg is None:
        return EXIT_CONFIG
    try:
        reply = send_command(QueueFolders(cfg.server.data_dir).socket, "stats")
    except ControlUnavailable:
        return _fail(args, "the appliance is not running (its counters live in the process)")
    except ControlError as e:
        return _fail(args, str(e))
    if not reply.get("ok") or not isinstance(reply.get("counters"), dict):
        return _fail(args, str(reply.get("error", "the appliance refused")))
    counters = reply["counters"]
    if args.json:
        _dump(counters, args.out)
        return EXIT_OK
    rows = []
    for key, n in sorted(counters.items()):
        check, _, outcome = key.partition(":")
        rows.append((_display(check), _display(outcome), str(n)))
    if not rows:
        print("nothing counted yet", file=args.out)
    width = [max(len(r[i]) for r in rows) for i in range(2)] if rows else [0, 0]
    for check, outcome, n in rows:
        print(f"{check:<{width[0]}}  {outcome:<{width[1]}}  {n:>8}", file=args.out)
    return EXIT_OK


def build_parser():
    parser = argparse.ArgumentParser(prog="mailappliance",
                                     description="Mail appliance admin command")
    parser.add_argument("--config", help="configuration file (default: $MAILAPPLIANCE_CONFIG, "
                                         "else etc/mailappliance.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("path", nargs="?", help="configuration file to check")
    p.set_defaults(func=cmd_check_config)

    q = sub.add_parser("queue", help="list, inspect and act on the mail queue")
    q.set_defaults(func=cmd_queue, action=None, json=False, body=False)
    # "queue --json" lists, as plain "queue" does.
    q.add_argument("--json", action="store_true", help="print JSON")
    qsub = q.add_subparsers(dest="action", metavar="ACTION")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON")
    qsub.add_parser("list", parents=[json_flag], help="list the queued and held messages")
    p = qsub.add_parser("show", parents=[json_flag], help="one message's envelope, "
                                                          "status and headers")
    p.add_argument("id", help="queue id")
    p.add_argument("--body", action="store_true", help="print the whole message")
    p = qsub.add_parser("flush", parents=[json_flag],
                        help="attempt delivery now (everything, a queue id or a domain)")
    p.add_argument("target", nargs="?", default=None, help="queue id or domain")
    for name, text in (("hold", "stop delivering a message until released"),
                       ("release", "take a message off hold"),
                       ("delete", "remove a message without delivering it")):
        p = qsub.add_parser(name, parents=[json_flag], help=text)
        p.add_argument("id", help="queue id")

    g = sub.add_parser("greylist", help="list, whitelist and delete greylisting triplets")
    g.set_defaults(func=cmd_greylist, action=None, json=False)
    g.add_argument("--json", action="store_true", help="print JSON")
    gsub = g.add_subparsers(dest="action", metavar="ACTION")
    gsub.add_parser("list", parents=[json_flag],
                    help="triplets with first seen, passes and whitelisting")
    for name, text in (("whitelist", "let a triplet through from now on (for auto_whitelist)"),
                       ("delete", "forget a triplet (its next delivery is a first sight)")):
        p = gsub.add_parser(name, parents=[json_flag], help=text)
        p.add_argument("ip", help="client address, or its network as listed")
        p.add_argument("sender", help="envelope sender (<> for the null sender)")
        p.add_argument("recipient", help="envelope recipient")

    p = sub.add_parser("stats", parents=[json_flag],
                       help="counts of what the running appliance's checks, content "
                            "filters and rules did since it started")
    p.set_defaults(func=cmd_stats)

    from mailbox_appliance.cli_content import add_commands
    add_commands(sub, json_flag)
    from mailbox_appliance.cli_lists import add_commands as add_list_commands
    add_list_commands(sub, json_flag)
    return parser


def main(argv=None, out=None, err=None) -> int:
    """Run the command; ``out`` and ``err`` default to the process's streams."""
    args = build_parser().parse_args(argv)
    args.out = out if out is not None else sys.stdout
    args.err = err if err is not None else sys.stderr
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

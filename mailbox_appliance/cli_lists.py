"""``mailappliance list ...``: the administrator's commands for mailing lists.

    mailappliance list [list] [--json]
    mailappliance list create LIST@DOMAIN --owner ADDR [--owner ADDR ...]
                              [--moderator ADDR ...] [--subject TEXT]
                              [--scenario OPERATION=NAME ...]
    mailappliance list delete LIST@DOMAIN
    mailappliance list show LIST@DOMAIN [--json]
    mailappliance list add LIST@DOMAIN ADDRESS [NAME ...]
    mailappliance list del LIST@DOMAIN ADDRESS
    mailappliance list held LIST@DOMAIN [--json]

They work on the state database (``data_dir/state.sqlite3``) directly, as
``greylist`` does: SQLite in WAL mode lets them run beside the appliance,
which reads the lists from the same file. A list's domain must be one of
``[lists] domains`` (by default the server's domains). Scenario choices
are kept in the list's settings (``{"scenarios": {"send": "private"}}``);
the names must be scenarios the appliance ships (lists.md 2.6), the
defaults being the safer ones of 2.7.
"""

from __future__ import annotations

import os
import time

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2



def add_commands(sub, json_flag):
    """The ``list`` sub-commands, on the admin command's parser."""
    p = sub.add_parser("list", help="create, show and change mailing lists")
    p.set_defaults(func=cmd_list, action=None, json=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    lsub = p.add_subparsers(dest="action", metavar="ACTION")
    lsub.add_parser("list", parents=[json_flag], help="every list, with its counts")
    c = lsub.add_parser("create", parents=[json_flag], help="create a list")
    c.add_argument("list", metavar="LIST@DOMAIN")
    c.add_argument("--owner", action="append", required=True, metavar="ADDRESS",
                   help="an owner (repeat for more)")
    c.add_argument("--moderator", action="append", default=[], metavar="ADDRESS",
                   help="a moderator (repeat for more; without one the owners moderate)")
    c.add_argument("--subject", default="", help="what the list is about")
    c.add_argument("--scenario", action="append", default=[], metavar="OPERATION=NAME",
                   help="the list's scenario for an operation, e.g. send=private")
    c.add_argument("--tag", default="", metavar="TEXT",
                   help="subject tag of the copies, e.g. [team]")
    c.add_argument("--footer", default="", metavar="TEXT",
                   help="text added at the end of each copy (never to signed mail)")
    c.add_argument("--max-size", type=int, default=0, metavar="BYTES",
                   help="largest post taken (default 5 MiB)")
    for name, text in (("delete", "delete a list, its members and its held requests"),
                       ("show", "settings, owners, moderators, members and held requests"),
                       ("held", "the posts and requests waiting for a token")):
        q = lsub.add_parser(name, parents=[json_flag], help=text)
        q.add_argument("list", metavar="LIST@DOMAIN")
    a = lsub.add_parser("add", parents=[json_flag], help="subscribe an address (no mail sent)")
    a.add_argument("list", metavar="LIST@DOMAIN")
    a.add_argument("address")
    a.add_argument("name", nargs="*", help="the member's display name")
    d = lsub.add_parser("del", parents=[json_flag], help="unsubscribe an address (no mail sent)")
    d.add_argument("list", metavar="LIST@DOMAIN")
    d.add_argument("address")


class _Refused(Exception):
    """What the command refuses, in one line."""


def cmd_list(args) -> int:
    import sqlite3
    from mailbox_appliance import cli, state
    from mailbox_appliance.state_lists import ListError
    cfg = cli.load_config(args)
    if cfg is None:
        return EXIT_CONFIG
    path = os.path.join(cfg.server.data_dir, state.FILENAME)
    action = args.action or "list"
    try:
        if action in ("create", "add"):
            # Lists are made only where list mail is received; one whose
            # domain has left [lists] domains can still be shown and deleted.
            _check_domain(cfg, args.list)
        if action in READS:
            # Read only, outside a write transaction: never holding up the
            # appliance's greylist writes; nothing created just to read.
            conn = (state.open_read_only(path, "SELECT count(*) FROM lists")
                    if os.path.exists(path) else None)
        else:
            conn = cli._open_for_writing(cfg, path)
        try:
            doc, text = ACTIONS[action](args, cfg, conn)
        finally:
            if conn is not None:
                conn.close()
    except (_Refused, ListError) as e:
        return cli._fail(args, str(e))
    except (sqlite3.Error, OSError) as e:
        return cli._fail(args, f"state database {path}: {e}")
    if args.json:
        cli._dump(doc, args.out)
    else:
        print(text, file=args.out)
    return EXIT_OK


def _check_domain(cfg, address):
    domain = address.rpartition("@")[2].lower()
    if "@" not in address:
        raise _Refused(f"expected LIST@DOMAIN, got {_shown(address)}")
    if domain not in cfg.lists.list_domains(cfg.server):
        raise _Refused(f"{_shown(domain)} is not a list domain (see [lists] domains)")


def _settled(d):
    """The result of a Deferred that has already fired (the in-memory LDAP tree
    answers at once); its error raised."""
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the directory did not answer at once")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def directory_conflicts(cfg, address):
    """The addresses of a new list (``LIST@``, ``-request``, ``-owner``...) that a
    user or alias of the directory already has: mail to them would no longer reach
    that user. Read from the embedded directory's LDIF file with the appliance's
    own look-up filter; None when the directory is an external LDAP server, which
    this offline command does not ask."""
    from mailbox_appliance.directory.embedded import load_ldif
    from mailbox_appliance.directory.ldap import lookup_filter
    from mailbox_appliance.lists import addresses as la
    if cfg.directory.url:
        return None
    name, _, domain = address.lower().rpartition("@")
    if domain not in cfg.server.domains:
        return []
    root = _settled(load_ldif(cfg.directory.ldif))
    bare = domain == cfg.server.domains[0]
    taken = []
    for kind in (la.POST, la.REQUEST, la.SUBSCRIBE, la.UNSUBSCRIBE, la.OWNER, la.EDITOR,
                 la.BOUNCES):
        candidate = la.list_address(name, domain, kind)
        if _settled(root.search(filterObject=lookup_filter(candidate, bare))):
            taken.append(candidate)
    return taken


def _shown(text):
    from mailbox_appliance.cli import _display
    return _display(str(text)[:120])


def _tx(conn, fn, *args, **kw):
    """A change, in one write transaction."""
    from mailbox_appliance.state import in_transaction
    return in_transaction(conn, fn, *args, **kw)


def _read(conn, fn, *args, **kw):
    """A read: no transaction (each query sees a consistent snapshot), so a
    read-only connection works and the appliance's writes never wait."""
    return fn(conn, *args, **kw)


def _existing(conn, address):
    from mailbox_appliance import state_lists as sl
    ml = _read(conn, sl.get_list, address) if conn is not None else None
    if ml is None:
        raise _Refused(f"no such list: {_shown(address)}")
    return ml


def scenario_exists(operation, name) -> bool:
    """Whether the appliance ships the scenario file ``OPERATION.NAME``."""
    from mailbox_appliance.lists.scenario import ScenarioLibrary
    return name in ScenarioLibrary().shipped_names(operation)


def _scenarios(choices):
    from mailbox_appliance.lists.scenario import OPERATIONS
    out = {}
    for choice in choices:
        operation, _, name = choice.partition("=")
        if operation not in OPERATIONS:
            raise _Refused(f"--scenario {_shown(choice)}: unknown operation (expected one of "
                           + ", ".join(OPERATIONS) + ")")
        if not scenario_exists(operation, name):
            raise _Refused(f"--scenario {_shown(choice)}: no scenario {operation}.{_shown(name)}")
        out[operation] = name
    return out


def do_create(args, cfg, conn):
    from mailbox_appliance import state_lists as sl
    scenarios = _scenarios(args.scenario)
    try:
        taken = directory_conflicts(cfg, args.list)
    except Exception as e:
        raise _Refused(f"the directory {cfg.directory.ldif} could not be read: {e}")
    if taken:
        raise _Refused(f"{', '.join(taken)}: already a user's or alias's address in the "
                       "directory (choose another list name)")
    for address in args.owner + args.moderator:
        if not sl.address_ok(address):
            raise _Refused(f"not an address: {_shown(address)}")

    settings = {"scenarios": scenarios} if scenarios else {}
    if len(args.tag) > 50 or len(args.footer) > 4000 or args.max_size < 0 or \
            any(not c.isprintable() for c in args.tag):
        raise _Refused("--tag is at most 50 printable characters, --footer 4000, "
                       "--max-size a number of bytes")
    for key, value in (("subject_tag", args.tag), ("footer", args.footer.replace("\\n", "\n")),
                       ("max_size", args.max_size)):
        if value:
            settings[key] = value

    def create(conn):
        ml = sl.create_list(conn, args.list, subject=args.subject, settings=settings,
                            now=time.time(), robot=cfg.lists.robot)
        for address in args.owner:
            sl.add_role(conn, ml.address, address, "owner")
        for address in args.moderator:
            sl.add_role(conn, ml.address, address, "moderator")
        return ml
    ml = _tx(conn, create)
    return _document(conn, ml), f"{ml.address}: created"


def do_delete(args, cfg, conn):
    from mailbox_appliance import state_lists as sl
    ml = _existing(conn, args.list)
    _tx(conn, sl.delete_list, ml.address)
    return {"ok": True, "list": ml.address}, f"{ml.address}: deleted"


def do_add(args, cfg, conn):
    from mailbox_appliance import state_lists as sl
    ml = _existing(conn, args.list)
    added = _tx(conn, sl.add_member, ml.address, args.address, " ".join(args.name),
                now=time.time())
    what = "subscribed" if added else "already a member"
    return ({"ok": True, "list": ml.address, "address": args.address.lower(), "added": added},
            f"{ml.address}: {_shown(args.address.lower())} {what}")


def do_del(args, cfg, conn):
    from mailbox_appliance import state_lists as sl
    ml = _existing(conn, args.list)
    if not _tx(conn, sl.remove_member, ml.address, args.address):
        raise _Refused(f"{ml.address}: {_shown(args.address)} is not a member")
    return ({"ok": True, "list": ml.address, "address": args.address.lower()},
            f"{ml.address}: {_shown(args.address.lower())} unsubscribed")


def _document(conn, ml, members=True):
    from mailbox_appliance import state_lists as sl
    doc = {"list": ml.address, "subject": ml.subject, "settings": ml.settings,
           "created": ml.created, "posts": ml.post_sequence,
           "owners": [a for a, _ in _read(conn, sl.role_holders, ml.address, "owner")],
           "moderators": [a for a, _ in _read(conn, sl.role_holders, ml.address, "moderator")],
           "member_count": _read(conn, sl.count_members, ml.address),
           "held": [_held_document(h) for h in _read(conn, sl.held_waiting, ml.address)]}
    if members:
        doc["members"] = [{"address": m.address, "name": m.name, "mode": m.mode,
                           "bounce_score": m.bounce_score} for m in _all_members(conn, ml)]
    return doc


def _all_members(conn, ml, page=1000):
    """Every member, read a page at a time."""
    from mailbox_appliance import state_lists as sl
    after = ""
    while True:
        batch = _read(conn, sl.members, ml.address, limit=page, after=after)
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1].address


def _held_document(h):
    return {"id": h.id, "kind": h.kind, "requester": h.requester, "target": h.target,
            "action": h.action, "subject": h.subject, "created": h.created,
            "expires": h.expires}


def do_show(args, cfg, conn):
    ml = _existing(conn, args.list)
    doc = _document(conn, ml)
    scenarios = doc["settings"].get("scenarios", {})
    lines = [f"list:        {ml.address}",
             f"subject:     {_shown(ml.subject) or '-'}",
             f"owners:      {', '.join(doc['owners']) or '-'}",
             f"moderators:  {', '.join(doc['moderators']) or '(the owners)'}",
             "scenarios:   " + (", ".join(f"{k}={v}" for k, v in sorted(scenarios.items()))
                                or "the defaults"),
             f"tag:         {_shown(ml.settings.get('subject_tag', '')) or '-'}",
             f"footer:      {'yes' if ml.settings.get('footer') else '-'}",
             f"posts:       {ml.post_sequence}",
             f"held:        {len(doc['held'])}",
             f"members:     {doc['member_count']}"]
    for m in doc["members"]:
        name = f" ({_shown(m['name'])})" if m["name"] else ""
        mode = "" if m["mode"] == "mail" else f" [{m['mode']}]"
        lines.append(f"  {m['address']}{name}{mode}")
    return doc, "\n".join(lines)


def do_held(args, cfg, conn):
    ml = _existing(conn, args.list)
    held = _document(conn, ml, members=False)["held"]
    if not held:
        return held, f"{ml.address}: nothing held"
    lines = [f"{'-Id-':>6}  {'-Kind-':<11} {'-Since-':<17} {'-From-':<30} -Subject or request-"]
    for h in held:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(h["created"]))
        what = h["subject"] or f"{h['action']} {h['target']}".strip()
        lines.append(f"{h['id']:>6}  {h['kind']:<11} {since:<17} "
                     f"{_shown(h['requester']):<30} {_shown(what)}")
    return held, "\n".join(lines)


def do_all(args, cfg, conn):
    from mailbox_appliance import state_lists as sl
    lists = _read(conn, sl.all_lists) if conn is not None else []
    docs = [_document(conn, ml, members=False) for ml in lists]
    if not docs:
        return docs, "no lists"
    lines = [f"{d['list']}: {d['member_count']} member(s), {len(d['owners'])} owner(s), "
             f"{len(d['held'])} held" for d in docs]
    return docs, "\n".join(lines)


READS = ("list", "show", "held")
ACTIONS = {"list": do_all, "create": do_create, "delete": do_delete, "show": do_show,
           "add": do_add, "del": do_del, "held": do_held}

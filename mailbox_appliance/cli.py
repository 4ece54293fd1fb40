"""The ``mailappliance`` admin command.

    mailappliance [--config PATH] check-config [PATH]
    mailappliance [--config PATH] queue [list]

It reads the same configuration and ``data_dir`` as a running appliance and
never needs it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from mailbox_appliance import config as config_module


def _config_path(args):
    return args.config or os.environ.get("MAILAPPLIANCE_CONFIG") or "etc/mailappliance.toml"


def cmd_check_config(args) -> int:
    path = args.path or _config_path(args)
    try:
        cfg = config_module.load(path)
    except config_module.ConfigError as e:
        print(f"mailappliance: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.path}: configuration ok")
    return 0


def cmd_queue(args) -> int:
    from mailbox_appliance.queue.spool import SpoolError, read_queue_file
    try:
        cfg = config_module.load(_config_path(args))
    except config_module.ConfigError as e:
        print(f"mailappliance: configuration error: {e}", file=sys.stderr)
        return 2
    active = os.path.join(cfg.server.data_dir, "queue", "active")
    if not os.path.isdir(active):
        print("Mail queue is empty")
        return 0
    count = 0
    for name in sorted(os.listdir(active)):
        if name.endswith(".done"):
            continue
        try:
            m = read_queue_file(name, os.path.join(active, name))
        except (OSError, SpoolError, ValueError) as e:
            print(f"{name}  (unreadable: {e})")
            continue
        count += 1
        when = datetime.datetime.fromtimestamp(m.envelope.arrival).strftime("%a %b %d %H:%M:%S")
        print(f"{m.qid:<16} {m.size:>9} {when}  <{m.envelope.sender}>")
        for idx, r in enumerate(m.envelope.recipients):
            state = "done" if f"{idx}:*" in m.done else "pending"
            print(f"{'':<27} {r}  [{state}]")
    print(f"-- {count} message(s) in queue" if count else "Mail queue is empty")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailappliance", description="Mail appliance admin command")
    parser.add_argument("--config", help="configuration file (default: $MAILAPPLIANCE_CONFIG, "
                                         "else etc/mailappliance.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("path", nargs="?", help="configuration file to check")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("queue", help="list the messages waiting in the queue")
    p.add_argument("action", nargs="?", default="list", choices=["list"])
    p.set_defaults(func=cmd_queue)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

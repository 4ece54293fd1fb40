"""twistd glue: the ``mailappliance`` options and makeService()."""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.python import usage

from mailbox_appliance import config as config_module
from mailbox_appliance.appliance import ListenerError


class Options(usage.Options):
    """Options of ``twistd mailappliance``."""

    synopsis = "[--config PATH]"
    longdesc = ("Runs the whole mail appliance (MX, queue, local delivery, directory) "
                "from one TOML configuration file. Default configuration: the "
                "MAILAPPLIANCE_CONFIG environment variable, else etc/mailappliance.toml. "
                "Relative paths in it are relative to its folder. A bad configuration "
                "or a port that cannot be bound stops start-up with one line on stderr "
                "and exit status 2; 'mailappliance check-config PATH' checks a file "
                "without starting anything.")
    optParameters = [
        ["config", "c", None,
         "Path of the TOML configuration file (see README, 'Configuration reference')."],
    ]

    def postOptions(self):
        if not self["config"]:
            self["config"] = os.environ.get("MAILAPPLIANCE_CONFIG", "etc/mailappliance.toml")


def _fail(message):
    """Print one line on the real stderr and stop start-up with status 2.

    twistd may already have pointed ``sys.stderr`` at its log, so the original
    stream is used: the administrator starting the process must see the line.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write("mailappliance: " + " ".join(str(message).splitlines()) + "\n")
    stream.flush()
    raise SystemExit(2)


class _StartupGuard(service.MultiService):
    """Holds the Appliance; a listener that cannot be bound ends start-up in one line.

    The Appliance binds its ports synchronously in privilegedStartService (so a
    port in use stops start-up rather than being logged and ignored); twistd
    would print that exception as a traceback, so it is caught here.
    """

    def __init__(self, appliance, config):
        super().__init__()
        self.appliance = appliance
        self.config = config
        appliance.setServiceParent(self)

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except ListenerError as e:
            _fail(f"cannot start: {self.config.path}: {e}; "
                  "expected a free address this user may bind")


def makeService(options):
    """Load the configuration and build the Appliance, or exit with one line."""
    try:
        cfg = config_module.load(options["config"])
        config_module.check_rule_files(cfg)
    except config_module.ConfigError as e:
        _fail(f"configuration error: {e}")
    from mailbox_appliance.appliance import Appliance
    try:
        appliance = Appliance(cfg)
    except OSError as e:
        # data_dir (or data_dir/tls) that cannot be created or written.
        _fail(f"cannot start: {cfg.path}: [server] data_dir {cfg.server.data_dir}: {e}; "
              "expected a folder this user may write")
    return _StartupGuard(appliance, cfg)

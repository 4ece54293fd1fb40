"""twistd glue: the ``mailappliance`` options and makeService()."""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from mailbox_appliance import config as config_module


class Options(usage.Options):
    """Options of ``twistd mailappliance``."""

    synopsis = "[--config PATH]"
    longdesc = ("Runs the whole mail appliance (MX, queue, local delivery, directory) "
                "from one TOML configuration file. Default configuration: the "
                "MAILAPPLIANCE_CONFIG environment variable, else etc/mailappliance.toml.")
    optParameters = [
        ["config", "c", None,
         "Path of the TOML configuration file (see README, 'Configuration reference')."],
    ]

    def postOptions(self):
        if not self["config"]:
            self["config"] = os.environ.get("MAILAPPLIANCE_CONFIG", "etc/mailappliance.toml")


def makeService(options):
    """Load the configuration and build the Appliance, or exit with one line."""
    try:
        cfg = config_module.load(options["config"])
        from mailbox_appliance.appliance import Appliance
        return Appliance(cfg)
    except config_module.ConfigError as e:
        sys.stderr.write(f"mailappliance: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    except OSError as e:
        sys.stderr.write(f"mailappliance: cannot start: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)

#!/usr/bin/env bash
# Quick start: set up if needed and run the appliance in the foreground on the
# example configuration (etc/mailappliance.toml: loopback ports above 1024, the
# embedded LDAP directory from etc/directory.ldif, state under var/).
#   scripts/run.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/twistd ] || scripts/setup.sh
config="${1:-etc/mailappliance.toml}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/twistd -n --pidfile= mailappliance --config "$config"

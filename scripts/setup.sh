#!/usr/bin/env bash
# Prepare a fresh machine: a virtualenv in .venv with the appliance installed,
# and (when run as root on Debian) the command-line peers the tests drive.
#   scripts/setup.sh [--system]   --system: also apt-get install swaks, slapd, ldap-utils, curl,
#                                 isync (mbsync), fetchmail, opendkim (a real milter) and
#                                 postfix (for its smtp-sink;
#                                 Postfix itself is left unconfigured and stopped)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--system" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for pkg in swaks slapd ldap-utils curl isync fetchmail opendkim opendkim-tools postfix; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
      export DEBIAN_FRONTEND=noninteractive
      # Only smtp-sink is wanted from postfix: no mail system is set up.
      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
      apt-get update -qq
      apt-get install -y -qq $missing >/dev/null
    fi
  else
    echo "note: not root or not Debian; tests that need swaks or slapd will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Installed like a user would (pip install .), so packaging is exercised too;
# tests and the quick start still run the code of this checkout.
.venv/bin/python -m pip install -q ".[ed25519]" 2> >(grep -v "is ignored" >&2) >/dev/null

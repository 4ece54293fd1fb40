#!/usr/bin/env bash
# Set up (virtualenv, and as root the Debian peers swaks/slapd) and run the
# whole test suite with trial. Extra arguments select tests, e.g.
#   scripts/test.sh tests.test_smtp_receiver
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --system
# One process by default (about a minute); the e2e tests pick free ports and
# temp dirs, so TRIAL_ARGS=-j2 runs them side by side too.
# A hung test must not hang the run: trial is stopped after TEST_TIMEOUT
# seconds (the whole suite takes a few minutes).
exec timeout --kill-after=30 "${TEST_TIMEOUT:-1500}" env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m twisted.trial \
  ${TRIAL_ARGS:-} "${@:-tests}"

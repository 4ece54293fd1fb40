#!/usr/bin/env bash
# MX accept throughput of the appliance, measured with Postfix's smtp-source.
#
#   bench/smtp_accept.sh [sessions=20] [messages=2000] [size=10240]
#
# Starts the real appliance (twistd) on a free loopback port with a scratch
# data_dir on disk, drives it with smtp-source (one SMTP session per message,
# <sessions> in parallel, to a local user), and prints the messages per second
# accepted with durable queueing (250 only after fsync), then how long local
# delivery took to put every message into the Maildir.
#
# With COMPARE_POSTFIX=1 and the peer scripts of the shared bench folder
# (PEER_BENCH, default ../shared/bench) it also measures Postfix in the same run.
# Needs: smtp-source (Debian package postfix). Run from anywhere.
set -euo pipefail
sessions="${1:-20}"; messages="${2:-2000}"; size="${3:-10240}"
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
SMTP_SOURCE="$(command -v smtp-source || echo /usr/sbin/smtp-source)"
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source not found (apt-get install postfix)" >&2; exit 2; }

work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-bench.XXXXXX")"
port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cp "$here/etc/directory.ldif" "$work/directory.ldif"
cat >"$work/mailappliance.toml" <<CONF
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "var"
[listen]
smtp = "tcp:$port:interface=127.0.0.1"
[directory]
ldif = "directory.ldif"
base_dn = "dc=example,dc=test"
CONF

cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  'import sys; sys.argv[0]="twistd"; from twisted.scripts.twistd import run; run()' \
  -n --pidfile= --logfile="$work/twistd.log" mailappliance --config "$work/mailappliance.toml" &
pid=$!
for _ in $(seq 100); do
  if "$PY" -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$port),1); sys.exit(0 if s.recv(3)==b'220' else 1)" 2>/dev/null; then break; fi
  sleep 0.1
done

maildir="$work/var/mail/example.test/alice/Maildir/new"
t0=$(date +%s.%N)
timeout "${SMTP_ACCEPT_TIMEOUT:-600}" "$SMTP_SOURCE" -s "$sessions" -m "$messages" -l "$size" \
  -M bench.example.test -f a@example.test -t ${BENCH_RCPT:-alice@example.test} "127.0.0.1:$port" >/dev/null
t1=$(date +%s.%N)
n=0
if [ -z "${BENCH_RCPT:-}" ]; then
  for _ in $(seq 600); do
    n=$( (ls "$maildir" 2>/dev/null || true) | wc -l)
    [ "$n" -ge "$messages" ] && break
    sleep 0.1
  done
fi
t2=$(date +%s.%N)
awk -v m="$messages" -v s="$sessions" -v l="$size" -v a="$t0" -v b="$t1" -v c="$t2" -v n="$n" 'BEGIN {
  printf "mailappliance: %.1f msgs/s accepted (%d msgs, %d sessions, %d B, %.3f s); %d in Maildir after %.3f s\n",
         m / (b - a), m, s, l, b - a, n, c - a }'

if [ "${COMPARE_POSTFIX:-0}" = 1 ]; then
  peer="${PEER_BENCH:-$here/../shared/bench}"
  "$peer/peers.sh" start postfix >/dev/null
  printf 'postfix:       '
  "$peer/smtp_accept.sh" 127.0.0.1:10025 "$sessions" "$messages" "$size" || true
  "$peer/peers.sh" stop postfix >/dev/null || true
fi

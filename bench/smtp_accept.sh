#!/usr/bin/env bash
# MX accept throughput of the appliance, measured with Postfix's smtp-source.
#
#   bench/smtp_accept.sh [sessions=20] [messages=2000] [size=10240]
#
# Starts the real appliance (twistd) on a free loopback port with a scratch
# data_dir on disk, drives it with smtp-source (one SMTP session per message,
# <sessions> in parallel, to a local user), and prints the messages per second
# accepted with durable queueing (250 only after fsync) while local delivery
# runs, then how long it took until every message was in the Maildir.
#
# ROUNDS=N repeats the measurement (default 1) and prints the median.
# COMPARE_POSTFIX=1 also measures Postfix in each round, right after the
# appliance, with the peer scripts of the shared bench folder (PEER_BENCH,
# default ../shared/bench relative to the checkout), and prints the ratio.
# BENCH_RCPT=addr sends to another recipient (e.g. carol@example.test, who
# forwards outside: accept only, nothing delivered locally).
# Needs smtp-source (Debian package postfix). Loopback only; stops by itself.
set -euo pipefail
sessions="${1:-20}"; messages="${2:-2000}"; size="${3:-10240}"
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$here/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
SMTP_SOURCE="$(command -v smtp-source || echo /usr/sbin/smtp-source)"
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source not found (apt-get install postfix)" >&2; exit 2; }
rounds="${ROUNDS:-1}"
peer="${PEER_BENCH:-$here/../shared/bench}"
rcpt="${BENCH_RCPT:-alice@example.test}"
. "$here/bench/lib.sh"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

run_appliance() {
  local work port pid t0 t1 t2 n maildir
  work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-bench.XXXXXX")"
  port="$(free_port)"
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
  start_appliance "$work" "$work/mailappliance.toml" "$port"
  pid=$APPLIANCE_PID
  maildir="$work/var/mail/example.test/alice/Maildir/new"
  t0=$(date +%s.%N)
  timeout "${SMTP_ACCEPT_TIMEOUT:-600}" "$SMTP_SOURCE" -s "$sessions" -m "$messages" -l "$size" \
    -M bench.example.test -f a@example.test -t "$rcpt" "127.0.0.1:$port" >/dev/null
  t1=$(date +%s.%N)
  n=0
  if [ "$rcpt" = alice@example.test ]; then
    for _ in $(seq 600); do
      n=$( (ls "$maildir" 2>/dev/null || true) | wc -l)
      [ "$n" -ge "$messages" ] && break
      sleep 0.1
    done
  fi
  t2=$(date +%s.%N)
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$work"
  awk -v m="$messages" -v a="$t0" -v b="$t1" -v c="$t2" -v n="$n" -v s="$sessions" -v l="$size" 'BEGIN {
    printf "%.1f mailappliance: %.1f msgs/s accepted (%d msgs, %d sessions, %d B, %.3f s); %d in Maildir after %.3f s\n",
           m / (b - a), m / (b - a), m, s, l, b - a, n, c - a }'
}

results=()
for r in $(seq "$rounds"); do
  line="$(run_appliance)"
  ours="${line%% *}"
  echo "round $r: ${line#* }"
  if [ "${COMPARE_POSTFIX:-0}" = 1 ]; then
    "$peer/peers.sh" start postfix >/dev/null
    pf="$("$peer/smtp_accept.sh" 127.0.0.1:10025 "$sessions" "$messages" "$size" || echo "0 msgs/s (failed)")"
    "$peer/peers.sh" stop postfix >/dev/null || true
    theirs="${pf%% *}"
    echo "round $r: postfix:       $pf"
    ratio="$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
    echo "round $r: ratio mailappliance/postfix = $ratio"
    results+=("$ours $theirs $ratio")
  else
    results+=("$ours")
  fi
done
if [ "$rounds" -gt 1 ]; then
  printf 'median mailappliance: %s msgs/s\n' "$(printf '%s\n' "${results[@]}" | awk '{print $1}' | median)"
  if [ "${COMPARE_POSTFIX:-0}" = 1 ]; then
    printf 'median postfix: %s msgs/s; median ratio: %s\n' \
      "$(printf '%s\n' "${results[@]}" | awk '{print $2}' | median)" \
      "$(printf '%s\n' "${results[@]}" | awk '{print $3}' | median)"
  fi
fi

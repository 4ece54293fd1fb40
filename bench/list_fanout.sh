#!/usr/bin/env bash
# Fan-out of one mailing-list post, end to end: one post in over SMTP, one VERP copy
# per member out by MX.
#
#   bench/list_fanout.sh [members=10000] [domains=500]
#
# Starts, on loopback only and all in a scratch folder on disk:
#   - bench/relay_dns.py, an authoritative DNS server for d000.bench, d001.bench, ...
#     (<domains> of them; each: MX 10 mx.dNNN.bench, A 127.0.0.1), on a free UDP+TCP port;
#   - Postfix's smtp-sink with running counters (-c), the "remote" MX of every domain;
#   - the real appliance (twistd) with its MX listener, the list domain
#     lists.example.test, [dns] servers pointing at the DNS server, [delivery]
#     smtp_port at the sink, the door checks and content filters off (the post comes
#     from a .bench domain whose MX is loopback) and a DKIM key for the list domain.
# Before the appliance starts, the admin command creates team@lists.example.test
# (send=public: anyone may post) and bench/list_fanout_load.py subscribes the members
# mNNNNN@dKKK.bench, spread evenly over the domains, in one database transaction.
# Then it posts once to the list over plain SMTP and waits until the sink's message
# count has grown by one per member (each copy has its own VERP envelope sender, so
# each is a transaction of its own). Printed: the seconds from the 250 of the post
# to the last copy at the sink, and the appliance's peak resident memory (VmHWM) at
# the end and just before the post, in MB. The target for 10,000 members at 500
# domains: under 60 s and 200 MB. Run it with fewer members too (1000 500): beyond
# the member list itself, the peak should not grow with the member count.
# Members: 1 to 99999; domains: 1 to 1000.
#
# ROUNDS=N repeats the measurement with a fresh appliance each time (default 1) and
# prints medians. POST_SIZE: octets of the post (default 4096). FANOUT_TIMEOUT:
# seconds one measurement may take from the 250 (default 300). KEEP_LOGS=1 keeps
# the scratch folder (the appliance's twistd.log). DELIVERY_TOML: extra lines for the
# appliance's [delivery] section, e.g. DELIVERY_TOML='max_connections = 100'.
# PYTHON: an interpreter with the appliance's dependencies. Everything started is
# stopped on exit; safe to re-run.
set -euo pipefail
members="${1:-10000}"; domains="${2:-500}"
here="$(cd "$(dirname "$0")/.." && pwd)"
. "$here/bench/lib.sh"
need_python_and_sink
rounds="${ROUNDS:-1}"
timeout_s="${FANOUT_TIMEOUT:-300}"
size="${POST_SIZE:-4096}"
list=team@lists.example.test

work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-fanout.XXXXXX")"
chmod 755 "$work"       # smtp-sink may drop to nobody
APPLIANCE_PID=""
cleanup() {
  local p
  set +e
  for p in "$APPLIANCE_PID" "${SINK_PID:-}" "${DNS_PID:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
cli() {  # CONFIG ARGS...: the admin command of this checkout
  local conf="$1"; shift
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m mailbox_appliance.cli \
    --config "$conf" "$@"
}

# ---- the DNS server and the sink, shared by every round ----
start_bench_dns "$work" "$domains"
start_sink "$work"     # its counters in $work/sink.count

run_round() {  # round: sets LINE to "<seconds> <peak MB> <start MB> text"
  local dir="$work/appliance.$1" port conf ok
  mkdir -p "$dir"
  port="$(free_port)"
  conf="$dir/mailappliance.toml"
  cat >"$dir/directory.ldif" <<LDIF
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Bench

dn: uid=owner,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: owner
cn: List Owner
sn: Owner
mail: owner@example.test
mailLocalAddress: postmaster@example.test
userPassword: bench-fanout-secret
LDIF
  cat >"$conf" <<CONF
[server]
hostname = "mail.example.test"
domains = ["example.test", "lists.example.test"]
data_dir = "var"
[listen]
smtp = "tcp:$port:interface=127.0.0.1"
[directory]
ldif = "directory.ldif"
base_dn = "dc=example,dc=test"
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[delivery]
smtp_port = $SINK_PORT
${DELIVERY_TOML:-}
[lists]
domains = ["lists.example.test"]
listmasters = ["owner@example.test"]
[antispam.helo]
reject_invalid = false
[antispam.dns]
check_sender_mx = false
[antispam.spf]
enabled = false
[antispam.greylist]
enabled = false
[antispam.content]
enabled = false
CONF
  LINE=""; ok=0
  cli "$conf" dkim keygen lists.example.test >/dev/null
  cli "$conf" list create "$list" --owner owner@example.test --subject "Fan-out bench" \
    --scenario send=public >&2
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$here/bench/list_fanout_load.py" \
    members "$conf" "$list" --members "$members" --domains "$domains" >&2
  if start_appliance "$dir" "$conf" "$port" >&2; then
    if LINE="$("$PY" "$here/bench/list_fanout_load.py" post 127.0.0.1 "$port" "$list" \
        --pid "$APPLIANCE_PID" --sink-counter "$work/sink.count" --expect "$members" \
        --size "$size" --timeout "$timeout_s")"; then
      ok=1
    else
      echo "round $1: not every copy arrived (or the post was refused)" >&2
    fi
  fi
  kill "$APPLIANCE_PID" 2>/dev/null || true; wait "$APPLIANCE_PID" 2>/dev/null || true
  APPLIANCE_PID=""
  # twistd rotates its log every MB: twistd.log is the newest part.
  if [ "$ok" = 0 ] || grep -qE 'Traceback|Unhandled' "$dir"/twistd.log*; then
    failed=1
    echo "--- the end of the appliance's log (DNS socket lines left out):" >&2
    grep -vE 'DNSDatagramProtocol|UDP Port' "$dir/twistd.log" | tail -n 15 >&2 || true
  fi
  [ "${KEEP_LOGS:-0}" = 1 ] || rm -rf "$dir"
  LINE="${LINE:-0 0 0 failed}"
}

echo "list fan-out: 1 post of $size B to $members members at $domains domains;" \
  "DNS 127.0.0.1:$DNS_PORT, smtp-sink 127.0.0.1:$SINK_PORT"
results=(); failed=0
for r in $(seq "$rounds"); do
  run_round "$r"
  echo "round $r: ${LINE#* * * }"
  results+=("$LINE")
done
col() { printf '%s\n' "${results[@]}" | awk -v c="$1" '{print $c}' | median; }
printf 'median: %s s from the 250 to the last copy, peak RSS %s MB (%s MB before the post)' \
  "$(col 1)" "$(col 2)" "$(col 3)"
printf ' for %s members at %s domains (target: under 60 s and 200 MB)\n' "$members" "$domains"
[ "$failed" = 0 ]

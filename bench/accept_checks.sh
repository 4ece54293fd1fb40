#!/usr/bin/env bash
# What the checks at the door cost: MX accept throughput with them off and on.
#
#   bench/accept_checks.sh [sessions=20] [messages=2000] [size=10240]
#
# The accept benchmark of bench/smtp_accept.sh (Postfix's smtp-source, one SMTP
# session per message, <sessions> in parallel, to a local user, 250 only after
# fsync, local delivery running), run in each round against two appliances that
# differ only in their [antispam.*] tables:
#   off: no DNSBL, no sender MX check, no SPF, no greylisting;
#   on:  DNSBL with two zones (bl1.test, bl2.test), the sender MX check, SPF and
#        greylisting (delay 1 s), the client's triplet whitelisted beforehand by
#        one greylisted attempt and its retry (so every timed message passes the
#        greylist lookup and refreshes the whitelisting, as a known sender's do).
# In both: HELO checks and reverse DNS off, connection and message rate limits
# far above the load (every client is 127.0.0.1), relay_networks empty (else
# 127.0.0.1 would be exempt from the checks), [dns] servers at
# bench/checks_dns.py, a DNS server on loopback that serves the sender's domain
# bench.test (MX, A, SPF TXT passing 127.0.0.0/8) and NXDOMAIN for the client on
# both block lists. The order of the two runs alternates from round to round.
#
# Printed per round: msgs/s off and on and the cost (1 - on/off) in %, with the
# CPU time per message of the appliance (and of the DNS server, and the DNS
# queries per message, for "on"); at the end the medians. Every message must be
# accepted: smtp-source's complaints and the Maildir count are checked, and a
# run that lost any is reported as FAILED (exit status 1).
#
# The content scan at end of data is off in both runs, so the figure is the door
# checks' alone.
#
# WHAT=content measures the content filters instead, as the content issue asks:
# the door checks off in both runs, and
#   off: [antispam.content] enabled = false;
#   on:  every content filter but the milters: DKIM verification, DMARC (the
#        DNS server answers for _dmarc.bench.test), the built-in rules and Bayes
#        with a trained token database (BAYES_CORPUS: a folder with spam/ and
#        ham/ of message files, default the shared corpus beside the checkout,
#        else the tests' small fixtures), copied into each run's data_dir.
# Messages filed into Junk count as delivered.
#
# ROUNDS=N rounds (default 3). CHECKS: the checks of "on", a subset of
# "dnsbl mx spf greylist" (the default, all four), to see what each costs.
# DNS_NEGATIVE_TTL: the negative TTL of the DNS server's zones (default 60; 0:
# NXDOMAIN without SOA, nothing cacheable).
# KEEP_LOGS=1 keeps the scratch folder (twistd logs, smtp-source output).
# PYTHON: an interpreter with the appliance's dependencies (default the
# checkout's .venv). Needs smtp-source (Debian package postfix). Loopback only;
# everything started is stopped on exit.
set -euo pipefail
sessions="${1:-20}"; messages="${2:-2000}"; size="${3:-10240}"
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$here/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c 'import twisted.names' 2>/dev/null \
  || { echo "$PY lacks twisted; set PYTHON to the appliance's interpreter" >&2; exit 2; }
SMTP_SOURCE="$(command -v smtp-source || echo /usr/sbin/smtp-source)"
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source not found (apt-get install postfix)" >&2; exit 2; }
rounds="${ROUNDS:-3}"
what="${WHAT:-door}"
case "$what" in door|content) ;; *) echo "WHAT: door or content" >&2; exit 2;; esac
negative_ttl="${DNS_NEGATIVE_TTL:-60}"
on_checks="${CHECKS:-dnsbl mx spf greylist}"
for c in $on_checks; do
  case "$c" in dnsbl|mx|spf|greylist) ;; *) echo "CHECKS: unknown check $c" >&2; exit 2;; esac
done
domain=bench.test
sender="a@$domain"
rcpt=alice@example.test
helo=client.bench.test
tick="$(getconf CLK_TCK)"
. "$here/bench/lib.sh"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# CPU time (user + system, in clock ticks) a process has used so far.
# (cpu_ticks PID PID: the process's main thread, the reactor's.)
cpu_ticks() { sed 's/^.*) //' "/proc/$1${2:+/task/$2}/stat" 2>/dev/null | awk '{print $12 + $13}'; }

# Queries the DNS server has answered so far, all types.
dns_queries() {
  rm -f "$work/dns.stats"
  kill -USR1 "$dns_pid"
  for _ in $(seq 50); do [ -s "$work/dns.stats" ] && break; sleep 0.05; done
  awk '{n += $2} END {print n + 0}' "$work/dns.stats" 2>/dev/null || echo 0
}

work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-checks.XXXXXX")"
dns_pid=""; APPLIANCE_PID=""
cleanup() {
  set +e
  for p in "$APPLIANCE_PID" "$dns_pid"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

"$PY" "$here/bench/checks_dns.py" --port-file "$work/dns.port" --stats-file "$work/dns.stats" \
  --domain "$domain" --zones bl1.test,bl2.test --negative-ttl "$negative_ttl" \
  2>"$work/dns.log" &
dns_pid=$!
for _ in $(seq 100); do [ -s "$work/dns.port" ] && break; sleep 0.1; done
[ -s "$work/dns.port" ] || { echo "the DNS server did not start; see $work/dns.log" >&2; exit 1; }
dns_port="$(cat "$work/dns.port")"

# write_config FILE PORT off|on
write_config() {
  local checks="$3"
  cat >"$1" <<CONF
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "var"
# Empty on purpose: a relay_networks client skips every check.
relay_networks = []
[listen]
smtp = "tcp:$2:interface=127.0.0.1"
[directory]
ldif = "directory.ldif"
base_dn = "dc=example,dc=test"
[dns]
servers = ["127.0.0.1:$dns_port"]
timeout = 10
[antispam.connection]
greet_pause = "0s"
max_connections_per_ip = 10000
max_connection_rate = 1000000
max_message_rate = 1000000
[antispam.helo]
reject_invalid = false
reject_our_name = false
require_resolvable = false
CONF
  has() { [ "$what" = door ] && [ "$checks" = on ] && [[ " $on_checks " == *" $1 "* ]]; }
  if [ "$what" = content ] && [ "$checks" = on ]; then
    cat >>"$1" <<CONF
[antispam.content]
enabled = true
[antispam.dkim]
verify = true
sign = false
[antispam.bayes]
min_spam = 5
min_ham = 5
CONF
  else
    cat >>"$1" <<CONF
[antispam.content]
enabled = false
CONF
  fi
  cat >>"$1" <<CONF
[antispam.dns]
check_sender_mx = $(has mx && echo true || echo false)
require_rdns = "off"
dnsbl = [$(has dnsbl && echo '"bl1.test", "bl2.test"')]
[antispam.spf]
enabled = $(has spf && echo true || echo false)
[antispam.greylist]
enabled = $(has greylist && echo true || echo false)
delay = "1s"
CONF
}

# pass_greylist PORT: the triplet of the timed run (client 127.0.0.1, sender,
# recipient) tried until its RCPT is accepted (first a 451 when greylisting is
# on, a retry after the delay); no message is sent. Prints the attempts.
pass_greylist() {
  "$PY" - "$1" "$sender" "$rcpt" "$helo" <<'PY'
import smtplib, sys, time
port, sender, rcpt, helo = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
for attempt in range(1, 31):
    s = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60)
    s.ehlo()
    code, text = s.mail(sender)
    if code != 250:
        sys.exit(f"MAIL FROM:<{sender}>: {code} {text.decode()}")
    code, text = s.rcpt(rcpt)
    s.quit()
    if code == 250:
        print(attempt)
        sys.exit(0)
    if code // 100 != 4:
        sys.exit(f"RCPT TO:<{rcpt}>: {code} {text.decode()}")
    time.sleep(1.2)
sys.exit("still greylisted after 30 attempts")
PY
}

# run_one off|on: one appliance, one timed smtp-source run. Sets RESULT to
# "rate appliance_ms_per_msg dns_ms_per_msg dns_queries_per_msg ok|FAILED
# reactor_thread_ms_per_msg" and
# DETAIL to a line for humans.
run_one() {
  local mode="$1" dir port maildir t0 t1 a0 a1 m0 m1 d0 d1 q0 q1 n rc=0 errs attempts
  dir="$work/$mode.$r"
  mkdir -p "$dir"
  port="$(free_port)"
  cp "$here/etc/directory.ldif" "$dir/directory.ldif"
  write_config "$dir/mailappliance.toml" "$port" "$mode"
  if [ "$what" = content ] && [ "$mode" = on ]; then
    mkdir -p "$dir/var" && cp "$work/bayes/var/bayes.sqlite3" "$dir/var/"
  fi
  start_appliance "$dir" "$dir/mailappliance.toml" "$port"
  attempts="$(pass_greylist "$port")"
  maildir="$dir/var/mail/example.test/alice/Maildir"
  a0="$(cpu_ticks "$APPLIANCE_PID")"; m0="$(cpu_ticks "$APPLIANCE_PID" "$APPLIANCE_PID")"; d0="$(cpu_ticks "$dns_pid")"; q0="$(dns_queries)"
  t0=$(date +%s.%N)
  timeout "${SMTP_ACCEPT_TIMEOUT:-600}" "$SMTP_SOURCE" -s "$sessions" -m "$messages" \
    -l "$size" -M "$helo" -f "$sender" -t "$rcpt" "127.0.0.1:$port" \
    >"$dir/smtp-source.out" 2>"$dir/smtp-source.err" || rc=$?
  t1=$(date +%s.%N)
  a1="$(cpu_ticks "$APPLIANCE_PID")"; m1="$(cpu_ticks "$APPLIANCE_PID" "$APPLIANCE_PID")"; d1="$(cpu_ticks "$dns_pid")"; q1="$(dns_queries)"
  n=0
  for _ in $(seq 600); do
    n=$( (ls "$maildir/new" "$maildir/.Junk/new" 2>/dev/null || true) | grep -c '^[0-9]' || true)
    [ "$n" -ge "$messages" ] && break
    sleep 0.1
  done
  kill "$APPLIANCE_PID" 2>/dev/null; wait "$APPLIANCE_PID" 2>/dev/null || true
  APPLIANCE_PID=""
  errs="$(wc -l <"$dir/smtp-source.err")"
  RESULT="$(awk -v m="$messages" -v a="$t0" -v b="$t1" -v tk="$tick" \
    -v ca="$((a1 - a0))" -v cm="$((m1 - m0))" -v cd="$((d1 - d0))" -v q="$((q1 - q0))" \
    -v ok="$([ "$rc" = 0 ] && [ "$errs" = 0 ] && [ "$n" = "$messages" ] && echo ok || echo FAILED)" \
    'BEGIN { printf "%.1f %.2f %.2f %.2f %s %.2f", m / (b - a), 1000 * ca / tk / m,
             1000 * cd / tk / m, q / m, ok, 1000 * cm / tk / m }')"
  DETAIL="$(echo "$RESULT" | awk -v mode="$mode" -v n="$n" -v m="$messages" -v rc="$rc" \
    -v e="$errs" -v at="$attempts" '{
      printf "%-3s %7.1f msgs/s, appliance %.2f ms CPU/msg (reactor thread %.2f)", mode, $1, $2, $6
      if (mode == "on") printf ", DNS server %.2f ms CPU/msg, %.2f queries/msg, greylist passed at attempt %d", $3, $4, at
      printf "; %d/%d in Maildir", n, m
      if ($5 != "ok") printf " FAILED (smtp-source exit %d, %d error lines)", rc, e
    }')"
  [ "${KEEP_LOGS:-0}" = 1 ] || rm -rf "$dir"
}

if [ "$what" = content ]; then
  # One trained token database, copied into every "on" run.
  corpus="${BAYES_CORPUS:-$here/../shared/corpus}"
  [ -d "$corpus/spam" ] || corpus="$here/tests/fixtures/bayes"
  mkdir -p "$work/bayes"
  printf '[server]\nhostname = "mail.example.test"\ndomains = ["example.test"]\ndata_dir = "var"\n[directory]\nldif = "directory.ldif"\nbase_dn = "dc=example,dc=test"\n' \
    >"$work/bayes/mailappliance.toml"
  cp "$here/etc/directory.ldif" "$work/bayes/"
  for kind in spam ham; do
    PYTHONPATH="$here" "$PY" -m mailbox_appliance.cli --config "$work/bayes/mailappliance.toml" \
      bayes train "--$kind" "$corpus/$kind" | tail -1
  done
  echo "accept with the content filters off and on: $messages msgs, $sessions sessions, $size B, $rounds rounds"
else
  echo "accept with the door checks off and on ($on_checks): $messages msgs, $sessions sessions, $size B, $rounds rounds"
fi
costs=(); offs=(); ons=(); failed=0
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for mode in $order; do
    run_one "$mode"
    echo "round $r: $DETAIL"
    [ "$(echo "$RESULT" | awk '{print $5}')" = ok ] || failed=1
    if [ "$mode" = off ]; then off="${RESULT%% *}"; else on="${RESULT%% *}"; fi
  done
  cost="$(awk -v a="$off" -v b="$on" 'BEGIN { printf "%.1f", (a > 0 ? 100 * (1 - b / a) : 0) }')"
  echo "round $r: off $off msgs/s, on $on msgs/s, cost $cost %"
  offs+=("$off"); ons+=("$on"); costs+=("$cost")
done
printf 'median: off %s msgs/s, on %s msgs/s, cost %s %%%s\n' \
  "$(printf '%s\n' "${offs[@]}" | median)" "$(printf '%s\n' "${ons[@]}" | median)" \
  "$(printf '%s\n' "${costs[@]}" | median)" \
  "$([ "$what" = door ] && echo ' (target: under 30 %)')"
[ "$failed" = 0 ] || { echo "FAILED: some messages were not accepted (KEEP_LOGS=1 to see why)" >&2; exit 1; }

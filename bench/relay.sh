#!/usr/bin/env bash
# Relay throughput of the appliance, end to end: submission in, SMTP out by MX.
#
#   bench/relay.sh [messages=2000] [connections=20] [size=10240] [domains=200]
#
# Starts, on loopback only and all in a scratch folder on disk:
#   - bench/relay_dns.py, an authoritative DNS server for d000.bench ... d199.bench
#     (each: MX 10 mx.dNNN.bench, A 127.0.0.1), on a free UDP+TCP port;
#   - Postfix's smtp-sink with running counters (-c), the "remote" MX of every domain;
#   - the real appliance (twistd) with a submission listener (STARTTLS + AUTH),
#     [dns] servers pointing at the DNS server and [delivery] smtp_port at the sink.
# bench/relay_load.py then submits the messages (STARTTLS, AUTH PLAIN as a user of a
# scratch LDIF, each message to one recipient, the domains in turn) and waits until
# the sink has them all. Printed: accepted/s (submission replies) and delivered/s
# (messages at the sink / time from the first connection to the last message there).
#
# ROUNDS=N repeats the measurement (default 3) and prints medians.
# COMPARE_POSTFIX=1 (needs root) also runs, in each round right after the appliance,
# a private Postfix instance that relays the same load to the same sink: STARTTLS and
# AUTH PLAIN through a private Dovecot auth service (POSTFIX_AUTH=0: plain SMTP from
# 127.0.0.1 without AUTH instead), routing every *.bench domain to the sink with a
# regexp transport map (Postfix's resolver cannot be pointed at a DNS port), stock
# concurrency otherwise. It prints both figures and the ratio delivered/s ours/Postfix.
# PER_SESSION=N: N messages per submission session, then a new one (default 0: each
# of the <connections> sessions stays open and carries its share).
# RELAY_TIMEOUT: seconds one measurement may take (default 300). KEEP_LOGS=1 keeps
# the scratch folder (logs, Postfix's maillog). DELIVERY_TOML: extra lines for the
# appliance's [delivery] section, e.g. DELIVERY_TOML='max_per_domain = 20'.
# PYTHON: an interpreter with the appliance's dependencies (twisted.names for the
# DNS server). Everything started is stopped on exit; safe to re-run.
set -euo pipefail
messages="${1:-2000}"; connections="${2:-20}"; size="${3:-10240}"; domains="${4:-200}"
here="$(cd "$(dirname "$0")/.." && pwd)"
. "$here/bench/lib.sh"
need_python_and_sink
rounds="${ROUNDS:-3}"
compare="${COMPARE_POSTFIX:-0}"
pf_auth="${POSTFIX_AUTH:-1}"
timeout_s="${RELAY_TIMEOUT:-300}"
per_session="${PER_SESSION:-0}"
user=bench@example.test; password=bench-relay-secret

if [ "$compare" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "COMPARE_POSTFIX=1 needs root (a private Postfix instance)" >&2; exit 2
fi
if [ "$compare" = 1 ] && ! command -v postfix >/dev/null; then
  echo "installing postfix (smtp-sink, the peer)" >&2
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
if [ "$compare" = 1 ] && [ "$pf_auth" = 1 ] && ! command -v dovecot >/dev/null; then
  echo "dovecot not installed: Postfix takes the load without AUTH (POSTFIX_AUTH=0)" >&2
  pf_auth=0
fi

work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-relay.XXXXXX")"
chmod 755 "$work"       # Postfix's and Dovecot's unprivileged processes reach their files
app_pid=""; pf_started=""; dovecot_started=""
cleanup() {
  local p
  set +e
  # The appliance runs in a $(...) subshell: its pid is in a file.
  [ -s "$work/appliance.pid" ] && app_pid="$(cat "$work/appliance.pid")"
  for p in "$app_pid" "${SINK_PID:-}" "${DNS_PID:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  [ -n "$pf_started" ] && postfix -c "$work/postfix/etc" stop >/dev/null 2>&1
  if [ -n "$dovecot_started" ] && [ -f "$work/dovecot/run/master.pid" ]; then
    p="$(cat "$work/dovecot/run/master.pid")"
    kill "$p" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# ---- the DNS server and the sink, shared by every measurement of the run ----
start_bench_dns "$work" "$domains"
dns_port="$DNS_PORT"
start_sink "$work"     # its counters in $work/sink.count
sink_port="$SINK_PORT"

cat >"$work/directory.ldif" <<LDIF
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Bench

dn: uid=bench,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: bench
cn: Bench
sn: Bench
mail: $user
userPassword: $password
LDIF

load() {  # label port [relay_load options...]: one measurement against the sink
  local label="$1" port="$2"; shift 2
  python3 "$here/bench/relay_load.py" 127.0.0.1 "$port" --label "$label" \
    --messages "$messages" --connections "$connections" --size "$size" --domains "$domains" \
    --per-session "$per_session" --sender "$user" --sink-counter "$work/sink.count" \
    --timeout "$timeout_s" "$@"
}

run_appliance() {  # round: prints "<accepted/s> <delivered/s> text"
  local dir="$work/appliance.$1" port line
  mkdir -p "$dir"
  cp "$work/directory.ldif" "$dir/"
  port="$(free_port)"
  cat >"$dir/mailappliance.toml" <<CONF
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "var"
[listen]
smtp = ""
submission = "tcp:$port:interface=127.0.0.1"
[directory]
ldif = "directory.ldif"
base_dn = "dc=example,dc=test"
[dns]
servers = ["127.0.0.1:$dns_port"]
[delivery]
smtp_port = $sink_port
${DELIVERY_TOML:-}
CONF
  line=""
  if start_appliance "$dir" "$dir/mailappliance.toml" "$port" >&2; then
    echo "$APPLIANCE_PID" >"$work/appliance.pid"
    line="$(load mailappliance "$port" --user "$user" --password "$password")" \
      || echo "mailappliance: errors (refusals or mail missing at the sink)" >&2
  fi
  kill "$APPLIANCE_PID" 2>/dev/null; wait "$APPLIANCE_PID" 2>/dev/null || true
  rm -f "$work/appliance.pid"
  if [ -z "$line" ] || [ "${line%% *}" = 0.0 ]; then
    echo "--- the end of the appliance's log:" >&2; tail -n 15 "$dir/twistd.log" >&2 || true
  fi
  [ "${KEEP_LOGS:-0}" = 1 ] || rm -rf "$dir"
  echo "${line:-0 0 mailappliance: failed}"
}

# ---- the Postfix peer: a private instance that relays *.bench to the sink ----
setup_postfix() {
  local pf="$work/postfix" etc="$work/postfix/etc" relay
  pf_port="$(free_port)"
  mkdir -p "$etc" "$pf/spool" "$pf/data"
  chown postfix:postfix "$pf/data"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=relay.bench.test" \
    -keyout "$etc/key.pem" -out "$etc/cert.pem" >/dev/null 2>&1
  printf '/\\.bench$/ smtp:[127.0.0.1]:%s\n' "$sink_port" >"$etc/transport"
  if [ "$pf_auth" = 1 ]; then
    relay="permit_sasl_authenticated, reject_unauth_destination"
  else
    relay="permit_mynetworks, reject_unauth_destination"
  fi
  cat >"$etc/main.cf" <<EOF
# Relay benchmark peer: takes mail on 127.0.0.1:$pf_port, relays *.bench to the sink.
compatibility_level = 3.6
config_directory = $etc
queue_directory = $pf/spool
data_directory = $pf/data
meta_directory = $(postconf -dh meta_directory)
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
myhostname = relay.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
biff = no
alias_maps =
alias_database =
local_recipient_maps =
# Only *.bench goes anywhere, and only to the sink; everything else bounces.
relayhost =
relay_domains =
transport_maps = regexp:$etc/transport
default_transport = error:outside the relay benchmark
local_transport = error:no local delivery
virtual_transport = error:no local delivery
smtp_dns_support_level = disabled
smtpd_relay_restrictions = $relay
smtpd_recipient_restrictions =
smtpd_tls_security_level = may
smtpd_tls_cert_file = $etc/cert.pem
smtpd_tls_key_file = $etc/key.pem
smtpd_tls_auth_only = yes
smtp_tls_security_level = may
smtpd_sasl_auth_enable = $([ "$pf_auth" = 1 ] && echo yes || echo no)
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
EOF
  cat >"$etc/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$pf_port inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  postfix -c "$etc" set-permissions >/dev/null 2>&1 || true
  postfix -c "$etc" check
  if [ "$pf_auth" = 1 ]; then setup_dovecot_auth; fi
  postfix -c "$etc" start >/dev/null 2>&1 || postfix -c "$etc" start
  pf_started=1
  wait_listen "$pf_port"
}

# Postfix's AUTH needs a SASL server: a Dovecot that runs only its auth service,
# listening in the Postfix queue's private/ folder, with the bench user's password.
setup_dovecot_auth() {
  local d="$work/dovecot"
  mkdir -p "$d/run" "$d/state"
  echo "$user:{PLAIN}$password::::::" >"$d/passwd"
  cat >"$d/dovecot.conf" <<EOF
instance_name = relay-bench-auth
base_dir = $d/run
state_dir = $d/state
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = $d/dovecot.log
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $d/passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  unix_listener $work/postfix/spool/private/auth {
    mode = 0660
    user = postfix
    group = postfix
  }
}
EOF
  dovecot -c "$d/dovecot.conf"
  dovecot_started=1
  for _ in $(seq 50); do [ -S "$work/postfix/spool/private/auth" ] && return 0; sleep 0.1; done
  echo "the Dovecot auth service did not start; see $d/dovecot.log" >&2; return 1
}

run_postfix() {
  local line
  if [ "$pf_auth" = 1 ]; then
    line="$(load postfix "$pf_port" --user "$user" --password "$password")" || true
  else
    line="$(load postfix "$pf_port" --no-tls)" || true
  fi
  echo "${line:-0 0 postfix: failed}"
}

[ "$compare" = 1 ] && setup_postfix
echo "relay: $messages msgs of $size B over $connections submission connections to $domains domains;" \
  "DNS 127.0.0.1:$dns_port, smtp-sink 127.0.0.1:$sink_port"
[ "$compare" = 1 ] && [ "$pf_auth" = 0 ] && \
  echo "note: Postfix gets the load over plain SMTP from 127.0.0.1 without AUTH (mynetworks)"
[ "$compare" = 1 ] && echo "note: Postfix routes *.bench by a transport map (no DNS), the appliance by MX lookups"
results=()
for r in $(seq "$rounds"); do
  line="$(run_appliance "$r")"
  read -r acc del _ <<<"$line"
  echo "round $r: ${line#* * }"
  if [ "$compare" = 1 ]; then
    pf="$(run_postfix)"
    read -r pacc pdel _ <<<"$pf"
    echo "round $r: ${pf#* * }"
    ratio="$(awk -v a="$del" -v b="$pdel" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
    echo "round $r: delivered/s ratio mailappliance/postfix = $ratio"
    results+=("$acc $del $pacc $pdel $ratio")
  else
    results+=("$acc $del")
  fi
done
col() { printf '%s\n' "${results[@]}" | awk -v c="$1" '{print $c}' | median; }
printf 'median mailappliance: %s msgs/s accepted, %s msgs/s delivered\n' "$(col 1)" "$(col 2)"
if [ "$compare" = 1 ]; then
  printf 'median postfix:       %s msgs/s accepted, %s msgs/s delivered\n' "$(col 3)" "$(col 4)"
  printf 'median delivered/s ratio mailappliance/postfix: %s (target: at least 0.5)\n' "$(col 5)"
fi

#!/usr/bin/env bash
# IMAP and POP3 speed of the appliance on a generated 10,000-message INBOX.
#
#   bench/imap_pop3.sh [messages=10000]
#
# Writes a deterministic mailbox with the shared bench's gen_mailbox.py into a
# scratch data_dir (user test@example.test, password "pass"), starts the real
# appliance with IMAP and POP3 on free loopback ports (plaintext logins allowed
# from loopback, as the peer Dovecot instance does), then runs the shared
# imap_bench.py and pop3_bench.py against it. COMPARE_DOVECOT=1 also sets up
# the shared Dovecot instance on the same generated mailbox and runs the same
# scripts against it. PEER_BENCH: the shared bench folder (default
# ../shared/bench relative to the checkout). Loopback only; stops by itself.
set -euo pipefail
count="${1:-10000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$here/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
peer="${PEER_BENCH:-$here/../shared/bench}"
work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailappliance-imapbench.XXXXXX")"
chmod 755 "$work"     # the peer Dovecot's unprivileged processes must reach its files
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ "${COMPARE_DOVECOT:-0}" = 1 ] && "$peer/dovecot_bench.sh" stop "$work/dovecot" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

. "$here/bench/lib.sh"
imap_port="$(free_port)"; pop3_port="$(free_port)"; smtp_port="$(free_port)"
maildir="$work/var/mail/example.test/test/Maildir"
mkdir -p "$maildir"
python3 "$peer/gen_mailbox.py" --count "$count" --out "$maildir" >/dev/null
cat >"$work/directory.ldif" <<LDIF
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Bench

dn: uid=test,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: test
cn: Test
sn: Test
mail: test@example.test
userPassword: pass
LDIF
cat >"$work/mailappliance.toml" <<CONF
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "var"
plaintext_auth_networks = ["127.0.0.0/8"]
[imap]
max_user_ip_connections = 1000
[listen]
smtp = "tcp:$smtp_port:interface=127.0.0.1"
imap = "tcp:$imap_port:interface=127.0.0.1"
pop3 = "tcp:$pop3_port:interface=127.0.0.1"
[directory]
ldif = "directory.ldif"
base_dn = "dc=example,dc=test"
CONF
start_appliance "$work" "$work/mailappliance.toml" "$imap_port"
pid=$APPLIANCE_PID
echo "== mailappliance ($count messages)"
python3 "$peer/imap_bench.py" 127.0.0.1 "$imap_port" test@example.test pass --server-pid "$pid" \
  ${IMAP_BENCH_ARGS:-}
python3 "$peer/pop3_bench.py" 127.0.0.1 "$pop3_port" test@example.test pass ${POP3_BENCH_ARGS:-}

if [ "${COMPARE_DOVECOT:-0}" = 1 ]; then
  d="$work/dovecot"
  "$peer/dovecot_bench.sh" setup "$d" >/dev/null
  mkdir -p "$d/mail/example.test/test"
  python3 "$peer/gen_mailbox.py" --count "$count" --out "$d/mail/example.test/test/Maildir" >/dev/null
  chown -R vmail:vmail "$d/mail"
  "$peer/dovecot_bench.sh" start "$d" >/dev/null
  echo "== dovecot ($count messages)"
  python3 "$peer/imap_bench.py" 127.0.0.1 10143 test@example.test pass ${IMAP_BENCH_ARGS:-}
  python3 "$peer/pop3_bench.py" 127.0.0.1 10110 test@example.test pass ${POP3_BENCH_ARGS:-}
fi

# Shared by the bench scripts; sourced, not run. Needs $here (the checkout) and $PY.

# need_python_and_sink: check that $PY (set here from $PYTHON, else the checkout's
# .venv, else python3) has twisted, and find Postfix's smtp-sink ($SMTP_SINK);
# exit 2 with a hint otherwise.
need_python_and_sink() {
  PY="${PYTHON:-$here/.venv/bin/python}"
  [ -x "$PY" ] || PY=python3
  "$PY" -c 'import twisted.names' 2>/dev/null \
    || { echo "$PY lacks twisted; set PYTHON to the appliance's interpreter" >&2; exit 2; }
  SMTP_SINK="$(command -v smtp-sink || echo /usr/sbin/smtp-sink)"
  [ -x "$SMTP_SINK" ] || { echo "smtp-sink not found (apt-get install postfix)" >&2; exit 2; }
}

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_appliance WORKDIR CONFIG PORT: run twistd in the background on CONFIG
# (log in WORKDIR/twistd.log), set APPLIANCE_PID, wait until PORT greets.
start_appliance() {
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'import sys; sys.argv[0]="twistd"; from twisted.scripts.twistd import run; run()' \
    -n --pidfile= --logfile="$1/twistd.log" mailappliance --config "$2" &
  APPLIANCE_PID=$!
  for _ in $(seq 100); do
    if "$PY" -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$3),1); sys.exit(0 if s.recv(4) in (b'220 ', b'* OK') else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "the appliance did not start; see $1/twistd.log" >&2
  return 1
}

# wait_listen PORT: wait until something listens on 127.0.0.1:PORT (TCP).
wait_listen() {
  for _ in $(seq 100); do
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

# start_bench_dns WORKDIR DOMAINS: bench/relay_dns.py in the background for
# d000.bench ... (DOMAINS of them; log WORKDIR/dns.log); sets DNS_PID and DNS_PORT.
start_bench_dns() {
  "$PY" "$here/bench/relay_dns.py" --port-file "$1/dns.port" --domains "$2" \
    >"$1/dns.log" 2>&1 &
  DNS_PID=$!
  for _ in $(seq 100); do [ -s "$1/dns.port" ] && break; sleep 0.1; done
  [ -s "$1/dns.port" ] || { echo "the DNS server did not start; see $1/dns.log" >&2; return 1; }
  DNS_PORT="$(cat "$1/dns.port")"
}

# start_sink WORKDIR: Postfix's smtp-sink ($SMTP_SINK) in the background on a free
# loopback port, its running counters (-c: sess=, quit=, mesg=, rewritten after
# every message) in WORKDIR/sink.count; sets SINK_PID and SINK_PORT.
start_sink() {
  SINK_PORT="$(free_port)"
  "$SMTP_SINK" -u nobody -c -4 -h sink.bench.test "127.0.0.1:$SINK_PORT" 256 \
    >"$1/sink.count" 2>"$1/sink.err" &
  SINK_PID=$!
  wait_listen "$SINK_PORT"
}

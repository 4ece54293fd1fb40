# Shared by the bench scripts; sourced, not run. Needs $here (the checkout) and $PY.

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

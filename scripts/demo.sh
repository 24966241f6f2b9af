#!/bin/sh
# `make demo`: runs demo-server under lowport with host port $DEMO_PORT published to port 80 inside,
# prints what /whoami returns from the host, and stops cleanly.
#
# lowport is meant for unprivileged users. When this script runs as root, it runs lowport as uid 65534
# (nobody) from a copy of the binaries in a temporary directory, which is the real situation.
set -eu
bindir=${1:-target/debug}
port=${DEMO_PORT:-8080}
work=$(mktemp -d /tmp/lowport-demo.XXXXXX)
chmod 755 "$work"
cp "$bindir/lowport" "$bindir/demo-server" "$work/"
lowport_pid=""

cleanup() {
    if [ -n "$lowport_pid" ] && kill -0 "$lowport_pid" 2>/dev/null; then
        kill -TERM "$lowport_pid" 2>/dev/null || true
        wait "$lowport_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

as_user=""
if [ "$(id -u)" = 0 ]; then
    as_user="setpriv --reuid=65534 --regid=65534 --clear-groups --"
    echo "demo: running lowport as uid 65534 (you are root; lowport is for everyone else)"
fi

echo "demo: \$ lowport run -p $port:80 -- demo-server"
# shellcheck disable=SC2086
(cd / && exec $as_user "$work/lowport" run -p "$port:80" --ready-fd 3 -- "$work/demo-server" 3>"$work/ready.json") &
lowport_pid=$!

# The readiness line comes once demo-server accepts on the port; the loop also notices an early exit.
i=0
until [ -s "$work/ready.json" ] && curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do
    if ! kill -0 "$lowport_pid" 2>/dev/null; then
        wait "$lowport_pid" || status=$?
        echo "demo: lowport exited early (status ${status:-0}); its message is above" >&2
        lowport_pid=""
        exit 1
    fi
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then
        echo "demo: demo-server did not answer on port $port within 10 s" >&2
        exit 1
    fi
    sleep 0.05
done

echo "demo: ready: $(cat "$work/ready.json")"
echo "demo: \$ curl http://127.0.0.1:$port/whoami"
curl -fsS "http://127.0.0.1:$port/whoami"
echo
echo "demo: on the host, lowport is:"
grep -E '^(Uid|CapEff|CapPrm):' "/proc/$lowport_pid/status" | sed 's/^/demo:   /'
echo "demo: stopping (SIGTERM to lowport, which passes it to demo-server)"
kill -TERM "$lowport_pid"
status=0
wait "$lowport_pid" || status=$?
lowport_pid=""
echo "demo: lowport exited with status $status"
exit "$status"

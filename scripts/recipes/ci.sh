#!/bin/sh
# CI without sudo (docs/recipes.md): run the tests against nginx on its real port 80, under lowport,
# published on host port $PORT; stop it afterwards, also when the tests fail.
#
#   scripts/recipes/ci.sh [TEST-COMMAND [ARGS...]]      (default: make check)
#
# The script's status is the tests' status, or 1 when nginx never became ready (lowport's or nginx's
# message is then on stderr, and the tests do not run).
set -eu
PORT=${PORT:-8080}          # the host port the tests connect to
SITE=${SITE:-$PWD/site}     # nginx's directory, with nginx.conf (listen 80): see docs/usage.md#nginx
NAME=${NAME:-web}           # the instance's name, for lowport stop
[ $# -gt 0 ] || set -- make check
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

mkfifo "$tmp/ready"; lowport run --name "$NAME" -p "$PORT:80" --ready-fd 3 -- nginx -e stderr -p "$SITE" -c nginx.conf 3>"$tmp/ready" &
read -r _ < "$tmp/ready" || exit 1    # returns once nginx accepts on $PORT; end of file: it never will
trap 'lowport stop "$NAME"; rm -rf "$tmp"' EXIT; "$@"

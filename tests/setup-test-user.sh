#!/bin/sh
# Creates the unprivileged test user that the --userns subids tests run as, with subordinate uid and
# gid ranges. Needs root; idempotent. Used by `make test` and .ci/run.
set -eu
user=lowport-test
if ! getent passwd "$user" >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
fi
grep -q "^$user:" /etc/subuid 2>/dev/null || usermod --add-subuids 300000-365535 "$user"
grep -q "^$user:" /etc/subgid 2>/dev/null || usermod --add-subgids 300000-365535 "$user"

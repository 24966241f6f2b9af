#!/bin/sh
# Set-up for `make demo` and `make test` on a fresh Debian or Ubuntu machine: the programs the demo and
# the tests use, and the unprivileged test user with subordinate id ranges (tests/setup-test-user.sh).
# As root it installs what is missing; as any other user it names what to install and goes on.
set -eu
cd "$(dirname "$0")/.."

# program:package pairs
needed="curl:curl setpriv:util-linux unshare:util-linux newuidmap:uidmap newgidmap:uidmap bash:bash nginx:nginx-light lighttpd:lighttpd dnsmasq:dnsmasq iperf3:iperf3 ps:procps ip:iproute2 setcap:libcap2-bin pasta:passt systemd-analyze:systemd systemd-socket-activate:systemd man:man-db strace:strace"
missing=""
for pair in $needed; do
    prog=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$prog" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$prog" ]; then
        case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
    fi
done

if [ "$(id -u)" = 0 ]; then
    if [ -n "$missing" ]; then
        echo "setup: installing$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >/dev/null
    fi
    tests/setup-test-user.sh
elif [ -n "$missing" ]; then
    echo "setup: some tests need packages that are not installed:$missing" >&2
    echo "setup: install them as root (apt install$missing), or those tests report what they lack" >&2
fi

#!/usr/bin/env python3
"""`make bench`: lowport against direct loopback and its peers, on this machine, in one run.

For each setup (direct loopback, lowport --forward handoff, the lowport relay (--forward relay),
lowport --socket-activation, rootlesskit with its builtin and slirp4netns port drivers, pasta) it starts
iperf3 -s and demo-server inside the setup's namespaces, drives them from the host through the published
ports, and measures:

  * iperf3 throughput, one stream and four streams;
  * HTTP requests/s with keep-alive and with a new connection per request (wrk against demo-server /);
  * HTTP echo throughput (wrk POSTing 1 MiB bodies to demo-server /echo), the throughput figure that
    socket activation can be measured with too (iperf3 cannot take an inherited socket);
  * nginx (Debian's nginx-light, unprivileged, its config in a temporary directory) serving a 1 KiB
    static file with keep-alive, under direct loopback, lowport handoff and relay, rootlesskit builtin
    and pasta;
  * the nginx proxy_pass chain: wrk -> a front nginx in the setup -> proxy_pass to an app (a second
    nginx, 1 KiB body) on the host's loopback, reached with each launcher's host-loopback option
    (lowport --host-loopback PORT, rootlesskit's slirp4netns 10.0.2.2, pasta's gateway mapping), against
    the same chain with no namespaces;
  * the start-up time of `... -- true` (median of many runs), also with --host-loopback and --net pasta,
    and pasta's own start-up on an existing namespace;
  * the forwarder's resident memory with 1000 idle forwarded connections open.

It prints one table of absolute figures, ratios to direct loopback and the project's goals, writes it
to docs/benchmarks.md with the machine it ran on, and draws the ratios to docs/benchmarks.png.

For the lowport setups the harness checks who holds the published host listener once the servers are
up: the server itself with --forward handoff (a bind handoff cannot take falls back to the relay without
a word), lowport with --forward relay.

Everything runs as an unprivileged user, as lowport is used. As root, the harness installs the peers
(and nginx-light, its service kept from starting) from Debian's packages and runs every setup as the
test user `lowport-test` (rootlesskit needs its /etc/subuid range; uid 65534 when that user cannot be
had), from copies of the binaries in a temporary directory.

Network: pasta copies the addresses and routes of the namespace it starts in, and gives the namespace
outbound traffic through them. So that nothing a setup does can reach the machine's real gateway, the
harness (as root) creates a network namespace `lp-bench` with a veth pair to a peer namespace
`lp-bench-peer` (10.78.0.2/24 and fd78::2/64 here, 10.78.0.1 and fd78::1 there, the default routes via
the peer), re-executes itself in `lp-bench` with `ip netns exec` and runs every setup there, the direct
baseline too, so that the ratios compare like with like; it deletes both namespaces at the end, also
after an error or Ctrl-C. Not as root it cannot create them, and skips what runs pasta.

Environment: BENCH_QUICK=1 for a short smoke run (written under target/bench/, leaving docs/ alone),
BENCH_REPEAT=N runs of each throughput figure (median), BENCH_OUT=DIR. BENCH_ONLY=LIST runs only the
listed rows (comma-separated: iperf1, iperf4, keepalive, newconn, echo, nginx, proxy, startup, rss; iperf
and http name groups), e.g. BENCH_ONLY=proxy,startup; such a partial run is written under target/bench/
too. BENCH_PROXY_KEEPALIVE=0 runs the proxy_pass chain without upstream keep-alive (a new connection
to the app for each request) instead of the default `keepalive 64`.

Only the standard library, plus matplotlib for the chart (skipped with a message when missing).
"""

import datetime
import http.client
import json
import os
import platform
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
RELEASE = os.path.join(ROOT, "target", "release")

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0", "no", "false")
DURATION = 1 if QUICK else 5  # seconds, for iperf3 -t and wrk -d
REPEAT = int(os.environ.get("BENCH_REPEAT", "1" if QUICK else "3"))
STARTUP_RUNS = 5 if QUICK else 30
STARTUP_WARMUP = 2 if QUICK else 3
IDLE_CONNS = 1000
ECHO_BODY = 1 << 20
NGINX_FILE = 1024  # bytes of the static file nginx serves
# The proxy_pass chain's upstream: connections kept alive to the app (nginx's `keepalive N`), or 0 for a
# new connection to the app per request.
PROXY_KEEPALIVE = 0 if os.environ.get("BENCH_PROXY_KEEPALIVE", "") in ("0", "no", "false") else 64
READY_TIMEOUT = 20.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# program -> Debian package
PROGRAMS = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "rootlesskit": "rootlesskit",
    "slirp4netns": "slirp4netns",
    "pasta": "passt",
    "setpriv": "util-linux",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "newuidmap": "uidmap",
    "newgidmap": "uidmap",
    "ip": "iproute2",
    "nginx": "nginx-light",
}
PEER_PACKAGES = ["iperf3", "wrk", "rootlesskit", "slirp4netns", "passt", "nginx-light"]
# The peers in the handoff goals ("ahead of every peer"): the other rootless forwarders.
PEERS = ["rk_builtin", "rk_slirp", "pasta"]

# Metrics, in table order: key, label, unit, higher is better.
ALL_METRICS = [
    ("iperf1", "iperf3, 1 stream", "Gbit/s", True),
    ("iperf4", "iperf3, 4 streams", "Gbit/s", True),
    ("keepalive", "HTTP keep-alive", "req/s", True),
    ("newconn", "HTTP new connections", "conn/s", True),
    ("echo", "HTTP echo, 1 MiB bodies", "MiB/s", True),
    ("nginx", "nginx keep-alive, 1 KiB file", "req/s", True),
    ("proxy", "nginx proxy_pass to an app on the host's loopback, 1 KiB", "req/s", True),
    ("startup", "start-up of `-- true` (median)", "ms", False),
    ("rss", f"forwarder RSS, {IDLE_CONNS} idle connections", "MiB", False),
]
METRIC = {m[0]: m for m in ALL_METRICS}
# BENCH_ONLY: the rows to run (all when unset), with names for groups of them.
ONLY_GROUPS = {"iperf": ["iperf1", "iperf4"], "http": ["keepalive", "newconn", "echo"]}


def parse_only(text):
    if not text.strip():
        return [m[0] for m in ALL_METRICS]
    want = set()
    for word in (w.strip() for w in text.split(",")):
        if word in ONLY_GROUPS:
            want.update(ONLY_GROUPS[word])
        elif word in METRIC:
            want.add(word)
        elif word:
            sys.exit(f"bench: BENCH_ONLY: unknown row {word!r} (rows: {', '.join(METRIC)}; groups: "
                     f"{', '.join(ONLY_GROUPS)})")
    return [m[0] for m in ALL_METRICS if m[0] in want]


ONLY = parse_only(os.environ.get("BENCH_ONLY", ""))
PARTIAL = len(ONLY) < len(ALL_METRICS)
METRICS = [m for m in ALL_METRICS if m[0] in ONLY]
RATIO_METRICS = [m for m in ["iperf1", "iperf4", "keepalive", "newconn", "echo", "nginx", "proxy"] if m in ONLY]
# The rows measured against iperf3 -s and demo-server, launched together in each setup.
SERVER_METRICS = [m for m in ["iperf1", "iperf4", "echo", "keepalive", "newconn", "rss"] if m in ONLY]
# The test network namespaces (see the docstring); addresses of lp-bench's side and of the peer's.
NETNS, PEER_NETNS = "lp-bench", "lp-bench-peer"
NETNS_ADDRS = (("10.78.0.2/24", "10.78.0.1/24", "10.78.0.1"), ("fd78::2/64", "fd78::1/64", "fd78::1"))


def log(msg):
    print(f"bench: {msg}", flush=True)


def which(prog):
    return shutil.which(prog, path=PATH + ":" + os.environ.get("PATH", ""))


# --------------------------------------------------------------------------------------------------
# Set-up: packages, the user to run as, the work directory


def ensure_packages():
    """Installs the missing peers as root; otherwise names the packages to install."""
    missing = sorted({pkg for prog, pkg in PROGRAMS.items() if not which(prog)})
    if not missing:
        return
    if os.geteuid() == 0:
        log(f"installing from Debian's packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=False)
        # nginx-light would start a system nginx on port 80; policy-rc.d (exit 101) forbids it.
        policy = "/usr/sbin/policy-rc.d"
        guard = "nginx-light" in missing and not os.path.exists(policy)
        if guard:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\n# make bench: no service starts while it installs packages\nexit 101\n")
            os.chmod(policy, 0o755)
        try:
            r = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        finally:
            if guard:
                os.unlink(policy)
        if r.returncode != 0:
            log(f"apt-get install failed ({r.stderr.strip().splitlines()[-1:]}); going on without them")
    else:
        log(f"not root: these packages are missing: {' '.join(missing)}"
            f" (install them with: sudo apt install {' '.join(missing)})")
    still = sorted({pkg for prog, pkg in PROGRAMS.items() if not which(prog)})
    if still:
        log(f"still missing: {' '.join(still)}; the setups that need them are skipped")


class Runner:
    """Runs commands as the unprivileged benchmark user."""

    def __init__(self, work):
        self.work = work
        self.root = os.geteuid() == 0
        if self.root:
            self.uid, self.gid, self.name = self._pick_user()
            self.prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
            home = os.path.join(work, "home")
            run = os.path.join(work, "run")
            for d, mode in ((home, 0o755), (run, 0o700)):
                os.mkdir(d, mode)
                os.chown(d, self.uid, self.gid)
            self.env = {"PATH": PATH, "HOME": home, "XDG_RUNTIME_DIR": run, "LANG": "C.UTF-8",
                        "USER": self.name, "LOGNAME": self.name, "TMPDIR": run}
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            self.name = pwd.getpwuid(self.uid).pw_name
            self.prefix = []
            self.env = dict(os.environ)
            self.env["PATH"] = self.env.get("PATH", PATH) + ":/usr/sbin:/sbin"
            if not self.env.get("XDG_RUNTIME_DIR"):
                run = os.path.join(work, "run")
                os.mkdir(run, 0o700)
                self.env["XDG_RUNTIME_DIR"] = run
        self.python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        # The benchmark's uids on the host: the user's and its subordinate ones (others_cpu).
        self.uids = [(self.uid, 1)] + subid_ranges(self.name)

    def _pick_user(self):
        """lowport-test has /etc/subuid and /etc/subgid ranges, which rootlesskit needs; every setup
        runs as the same user, for fairness. Falls back to uid 65534 (rootlesskit then fails)."""
        user = "lowport-test"
        setup = os.path.join(ROOT, "tests", "setup-test-user.sh")
        if not has_subids(user) and os.access(setup, os.X_OK):
            subprocess.run([setup], check=False)
        if has_subids(user):
            pw = pwd.getpwnam(user)
            return pw.pw_uid, pw.pw_gid, user
        log(f"user {user} with subordinate ids is missing; running as uid 65534 (rootlesskit will fail)")
        return 65534, 65534, "nobody"

    def argv(self, argv):
        return self.prefix + list(argv)

    def run(self, argv, timeout, **kw):
        return subprocess.run(self.argv(argv), env=self.env, cwd=self.work, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False, **kw)

    def popen(self, argv, logfile):
        out = open(logfile, "wb")
        try:
            return subprocess.Popen(self.argv(argv), env=self.env, cwd=self.work,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            out.close()


def subid_ranges(user):
    """The user's ranges in /etc/subuid, as (first, count)."""
    ranges = []
    try:
        with open("/etc/subuid") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == user and parts[1].isdigit() and parts[2].isdigit():
                    ranges.append((int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return ranges


def has_subids(user):
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                if not any(line.split(":")[0] == user for line in f):
                    return False
        except OSError:
            return False
    return True


class TunAccess:
    """pasta and slirp4netns open /dev/net/tun as the user; Debian's default mode 0666 allows it, but
    some machines ship it 0600. As root the harness opens it up for the run and restores it after."""

    def __init__(self, runner):
        self.restore = None
        self.note = None
        path = "/dev/net/tun"
        if not os.path.exists(path):
            self.note = "/dev/net/tun does not exist: pasta and slirp4netns cannot work"
            return
        r = runner.run(["sh", "-c", f"test -r {path} && test -w {path}"], timeout=10)
        if r.returncode == 0:
            return
        mode = os.stat(path).st_mode & 0o777
        if runner.root:
            os.chmod(path, 0o666)
            self.restore = mode
            self.note = f"/dev/net/tun was mode {mode:04o}; the harness set it to 0666 for the run (restored after)"
            log(self.note)
        else:
            self.note = f"/dev/net/tun is mode {mode:04o} and not usable by {runner.name}: pasta and slirp4netns will fail"
            log(self.note)

    def close(self):
        if self.restore is not None:
            os.chmod("/dev/net/tun", self.restore)
            self.restore = None


# --------------------------------------------------------------------------------------------------
# The test network namespaces


def netns_inode(name):
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def in_test_netns():
    """Whether this process runs in lp-bench (set up by the harness's own parent)."""
    return netns_inode(NETNS) is not None and os.stat("/proc/self/ns/net").st_ino == netns_inode(NETNS)


def ip(*args, check=True):
    r = subprocess.run([which("ip") or "ip", *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {last_line(r.stderr) or f'exit status {r.returncode}'}")
    return r


class TestNet:
    """lp-bench and its peer lp-bench-peer, joined by a veth pair; the default routes of lp-bench go
    to the peer, where nothing answers. Root only."""

    def __init__(self):
        self.made = []
        for name in (NETNS, PEER_NETNS):
            if netns_inode(name) is not None:
                pids = ip("netns", "pids", name, check=False).stdout.split()
                if pids:
                    raise RuntimeError(f"network namespace {name} exists with processes in it ({' '.join(pids)}): "
                                       "is another make bench running?")
                log(f"deleting the network namespace {name} left by an earlier run")
                ip("netns", "del", name)
        try:
            for name in (NETNS, PEER_NETNS):
                ip("netns", "add", name)
                self.made.append(name)
                ip("-n", name, "link", "set", "lo", "up")
            ip("-n", NETNS, "link", "add", "lpb0", "type", "veth", "peer", "name", "lpb1", "netns", PEER_NETNS)
            for (mine, peer, gw) in NETNS_ADDRS:
                extra = ("nodad",) if ":" in mine else ()
                ip("-n", NETNS, "addr", "add", mine, "dev", "lpb0", *extra)
                ip("-n", PEER_NETNS, "addr", "add", peer, "dev", "lpb1", *extra)
            ip("-n", NETNS, "link", "set", "lpb0", "up")
            ip("-n", PEER_NETNS, "link", "set", "lpb1", "up")
            for (_, _, gw) in NETNS_ADDRS:
                ip("-n", NETNS, "-6" if ":" in gw else "-4", "route", "add", "default", "via", gw)
        except BaseException:
            self.close()
            raise
        if os.path.isdir(f"/etc/netns/{NETNS}"):
            # ip netns exec would bind-mount these over /etc.
            log(f"note: /etc/netns/{NETNS} exists; ip netns exec mounts its files over /etc for the run")

    def close(self):
        """Ends what is left in the namespaces (the harness stops its own launches; this is for a run
        that was cut short) and deletes them, the veth pair with them."""
        for name in reversed(self.made):
            pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if pids:
                log(f"killed {len(pids)} process(es) left in the network namespace {name}")
            ip("netns", "del", name, check=False)
        self.made = []


def run_in_test_netns():
    """As root: creates the test namespaces, runs this script again inside lp-bench, and deletes them
    whatever happens. Ctrl-C (SIGINT), SIGTERM and SIGHUP are passed on to the run, once, and the
    namespaces go after it has tidied up."""
    net = TestNet()
    child = None
    caught = []

    def forward(signum, _frame):
        caught.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        log(f"running in the network namespace {NETNS} (veth to {PEER_NETNS}; default routes via "
            f"{NETNS_ADDRS[0][2]} and {NETNS_ADDRS[1][2]})")
        # A session of its own: a Ctrl-C at the terminal reaches it once, through forward().
        child = subprocess.Popen([which("ip") or "ip", "netns", "exec", NETNS, sys.executable,
                                  os.path.abspath(__file__)], env=dict(os.environ, BENCH_IN_NETNS=NETNS),
                                 start_new_session=True)
        if caught:  # a signal that came before the child existed
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        net.close()
        log(f"deleted the network namespaces {NETNS} and {PEER_NETNS}")
        for sig, handler in old.items():
            signal.signal(sig, handler)


def default_gateway4():
    """The IPv4 gateway of this network namespace's default route, or None."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == "00000000" and int(fields[3], 16) & 2:  # RTF_GATEWAY
                    return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------------------------------
# Processes


def cpu_busy(seconds):
    """The fraction of all CPUs' time spent on anything but idle and iowait over `seconds`."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


QUIET = {"waited": 0, "busy": 0, "disturbed": 0, "disturbed_kept": 0}


def wait_quiet():
    """Waits (a while) for other work on the machine to stop before a measurement: with 2 cores, a
    compiler running beside the benchmark halves its figures. Counts the times it gave up."""
    deadline = time.monotonic() + (5 if QUICK else 30)
    first = True
    while True:
        busy = cpu_busy(0.25)
        if busy < 0.12:
            return
        if first:
            QUIET["waited"] += 1
            first = False
        if time.monotonic() > deadline:
            QUIET["busy"] += 1
            return


def others_cpu(bench_uids):
    """CPU seconds used so far by the processes that are not the benchmark's: other users' processes
    (a build, a test run), with their reaped children; kernel threads and this harness excluded. The
    benchmark's are those of its user and of the user's subordinate ids (`bench_uids`, (first, count)
    ranges): nginx's worker, uid 0 inside a namespace with the subordinate ids mapped, switches to
    nobody, a subordinate uid on the host."""
    total = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, 2):
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            if any(first <= uid < first + count for first, count in bench_uids):
                continue
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        if rest[1] == "2":  # a kernel thread
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        total[comm] = total.get(comm, 0) + sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def guarded(fn, bench_uids):
    """Runs a measurement once the machine is quiet, and again (twice at most) when other work took
    more than 5% of the CPUs meanwhile; keeps the last run."""
    for attempt in range(3):
        wait_quiet()
        c0, t0 = others_cpu(bench_uids), time.monotonic()
        result = fn()
        c1 = others_cpu(bench_uids)
        used = {comm: c1[comm] - c0.get(comm, 0) for comm in c1}
        share = sum(used.values()) / max((time.monotonic() - t0) * (os.cpu_count() or 1), 0.1)
        if share <= 0.05:
            return result
        QUIET["disturbed"] += 1
        top = ", ".join(c for c, v in sorted(used.items(), key=lambda x: -x[1])[:3] if v > 0)
        log(f"other work ({top}) took {share:.0%} of the CPUs during the measurement; "
            + ("measuring again" if attempt < 2 else "keeping it"))
    QUIET["disturbed_kept"] += 1
    return result


def proc_table():
    """pid -> (ppid, state, comm) for every process visible now."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(rest[1]), rest[0], comm)
    return table


def descendants(pid, table=None):
    table = table or proc_table()
    children = {}
    for p, (pp, _, _) in table.items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Launch:
    """A namespace launcher running the servers, in its own session so that nothing leaks."""

    def __init__(self, runner, argv, logfile):
        self.argv = argv
        self.logfile = logfile
        self.proc = runner.popen(argv, logfile)
        self.pid = self.proc.pid  # setpriv execs the launcher: same pid

    def log_tail(self, n=3):
        try:
            with open(self.logfile, errors="replace") as f:
                lines = [l.strip() for l in f if l.strip() and "syslog" not in l]
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"launcher exited with status {self.proc.returncode}: {self.log_tail()}")

    def stop(self):
        """SIGTERM to the launcher, then SIGKILL to whatever of its process tree is left. Returns the
        processes that outlived the launcher (a launcher that takes its children along leaves none)."""
        tree = [self.pid] + descendants(self.pid)
        names = proc_table()
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.3)
        leftover_names = []
        if not alive(self.pid):
            leftover_names = [names.get(p, (0, "", "?"))[2] for p in tree[1:] if alive(p)]
        for p in [self.pid] + tree[1:]:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.05)
        still = [p for p in tree if alive(p)]
        if still:
            log(f"warning: processes {still} survived SIGKILL")
        return leftover_names


# --------------------------------------------------------------------------------------------------
# Readiness


def free_port():
    """A port free on every IPv4 and IPv6 address, as the kernel hands them out."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
    except OSError:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(port, launch, deadline, what="demo-server"):
    """GET /healthz through the published port until it answers 200 (the server inside is up)."""
    last = "no answer"
    while time.monotonic() < deadline:
        launch.check()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200:
                return
            last = f"HTTP {r.status} {body[:40]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer on port {port} within {READY_TIMEOUT:.0f} s ({last})")


def wait_iperf(port, launch, deadline):
    """Speaks the first step of iperf3's control protocol: after the 37-byte cookie the server sends
    its first state byte. A relay whose inner port is not listening yet closes instead."""
    last = "no answer"
    while time.monotonic() < deadline:
        launch.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"benchreadinessprobe0000000000000000\x00\x00")
                if s.recv(1):
                    return
                last = "closed"
        except OSError as e:
            last = repr(e)
        time.sleep(0.05)
    raise RuntimeError(f"iperf3 -s did not answer on port {port} within {READY_TIMEOUT:.0f} s ({last})")


def listener_holders(port):
    """The pids holding a listening TCP socket of this (the host's) network namespace on `port`, and
    whether some process's descriptors could not be read."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            pass
    holders, unreadable = set(), False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except PermissionError:
            unreadable = True
            continue
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    holders.add(int(entry))
                    break
            except OSError:
                pass
    return holders, unreadable


def upstream_holders(port):
    """Who holds the host's client ends of the established TCP connections to 127.0.0.1:`port` (the
    proxy chain's app): a count per process name, `?` for a socket no readable process holds."""
    inodes = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        inodes[f"socket:[{fields[9]}]"] = set()
        except OSError:
            pass
    add_holders(inodes)
    counts = {}
    for comms in inodes.values():
        who = "nginx" if "nginx" in comms else "+".join(sorted(comms)) or "?"
        counts[who] = counts.get(who, 0) + 1
    return counts


def add_holders(inodes):
    """Adds to each `socket:[INODE]` key of `inodes` the names of the processes holding that socket."""
    table = proc_table()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in inodes:
                inodes[link].add(table.get(int(entry), (0, "", "?"))[2])


def accepted_by(port, n=8):
    """Opens `n` connections to 127.0.0.1:`port` and says who accepted them: a count per process name
    holding the server's end (`queued` while none does after a second)."""
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        mine = {s.getsockname()[1] for s in socks}
        deadline = time.monotonic() + 1
        while True:
            inodes = {}
            with open("/proc/net/tcp") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote = fields[1].rsplit(":", 1), fields[2].rsplit(":", 1)
                    if fields[3] == "01" and int(local[1], 16) == port and int(remote[1], 16) in mine:
                        inodes[f"socket:[{fields[9]}]"] = set()
            add_holders(inodes)
            if all(inodes.values()) and len(inodes) == n or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        counts = {}
        for comms in list(inodes.values()) + [set()] * (n - len(inodes)):
            who = "+".join(sorted(comms)) or "queued"
            counts[who] = counts.get(who, 0) + 1
        return counts
    finally:
        for s in socks:
            s.close()


def check_forwarding(setup, launch, ports):
    """With --forward handoff the server must hold the published host listener, with --forward relay
    lowport (the launcher's own process). A bind that handoff cannot take over (one lowport cannot see,
    say) is relayed without a word: its figures would be the relay's. When lowport keeps a copy of a
    handed-over listener, a few connections show who accepts: the server, or lowport relaying. Returns
    a note when the holders could not be read or lowport holds a copy; raises when the check fails."""
    if not setup.forward:
        return None
    deadline = time.monotonic() + 2
    notes = []
    for port in ports:
        while True:
            holders, unreadable = listener_holders(port)
            # The servers: not the launcher, nor a process of lowport's own beside it.
            table = proc_table()
            ours = {p for p in holders if p == launch.pid or table.get(p, (0, "", "?"))[2] == "lowport"}
            inside = holders - ours
            if setup.forward == "handoff":
                ok = bool(inside) and not ours
            else:
                ok = launch.pid in holders
            if ok:
                break
            if time.monotonic() > deadline:
                if unreadable and not (holders if setup.forward == "handoff" else inside):
                    return f"who holds the host listener on port {port} could not be read; not checked"
                names = sorted(f"{table.get(p, (0, '', '?'))[2]} ({'the launcher' if p == launch.pid else p})"
                               for p in holders) or ["nobody"]
                if setup.forward == "handoff" and inside:
                    counts = accepted_by(port)
                    text = ", ".join(f"{n} by {who}" for who, n in sorted(counts.items(), key=lambda x: -x[1]))
                    if set(counts) <= {table.get(p, (0, "", "?"))[2] for p in inside}:
                        # Without ports and pids, so that the rounds' notes are one.
                        log(f"{setup.label}: port {port}: held by {', '.join(names)}; test connections "
                            f"accepted {text}")
                        servers = ", ".join(sorted(set(counts)))
                        notes.append(f"lowport keeps a copy of the handed-over host listener (the launcher "
                                     f"holds it beside {servers}), but {servers} accepted every test "
                                     "connection: handed off")
                        break
                    raise RuntimeError(f"--forward handoff: the host listener on port {port} is held by "
                                       f"{', '.join(names)}, and test connections were accepted {text}")
                raise RuntimeError(f"--forward {setup.forward}: the host listener on port {port} is held by "
                                   f"{', '.join(names)}"
                                   + (" (the port was relayed, not handed off)" if setup.forward == "handoff"
                                      else ""))
            time.sleep(0.05)
    return "; ".join(notes) or None
    deadline = time.monotonic() + 2
    for port in ports:
        while True:
            holders, unreadable = listener_holders(port)
            # The servers: not the launcher, nor a process of lowport's own beside it (a copy of the
            # host socket in lowport's host-side helper is no handoff).
            table = proc_table()
            inside = {p for p in holders if p != launch.pid and table.get(p, (0, "", "?"))[2] != "lowport"}
            if setup.forward == "handoff":
                ok = bool(inside) and launch.pid not in holders
            else:
                ok = launch.pid in holders
            if ok:
                break
            if time.monotonic() > deadline:
                if unreadable and not (holders if setup.forward == "handoff" else inside):
                    return f"who holds the host listener on port {port} could not be read; not checked"
                table = proc_table()
                names = sorted(f"{table.get(p, (0, '', '?'))[2]} ({'the launcher' if p == launch.pid else p})"
                               for p in holders) or ["nobody"]
                raise RuntimeError(f"--forward {setup.forward}: the host listener on port {port} is held by "
                                   f"{', '.join(names)}"
                                   + (" (the port was relayed, not handed off)" if setup.forward == "handoff"
                                      else ""))
            time.sleep(0.05)
    return None


# --------------------------------------------------------------------------------------------------
# Measurements


def last_line(text):
    lines = [l.strip() for l in (text or "").splitlines() if l.strip() and "syslog" not in l]
    return lines[-1] if lines else ""


def iperf3(runner, port, streams):
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(DURATION), "-J"]
    if streams > 1:
        argv += ["-P", str(streams)]
    for attempt in range(2):
        r = runner.run(argv, timeout=DURATION + 30)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {"error": last_line(r.stderr) or f"exit status {r.returncode}, no JSON"}
        if "error" not in data and r.returncode == 0:
            return data["end"]["sum_received"]["bits_per_second"] / 1e9, None
        err = data.get("error", f"exit status {r.returncode}")
        time.sleep(0.5)  # the server may still be tidying up the previous test
    raise RuntimeError(f"iperf3: {err}")


WRK_RE = re.compile(r"Requests/sec:\s*([\d.]+)")
WRK_TOTAL = re.compile(r"(\d+) requests in")
WRK_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(runner, url, conns, threads, extra=()):
    argv = ["wrk", "-c", str(conns), "-t", str(threads), "-d", f"{DURATION}s", "--timeout", "5s", *extra, url]
    r = runner.run(argv, timeout=DURATION + 30)
    m = WRK_RE.search(r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk: {last_line(r.stderr) or last_line(r.stdout) or f'exit status {r.returncode}'}")
    rate = float(m.group(1))
    total = int(WRK_TOTAL.search(r.stdout).group(1)) if WRK_TOTAL.search(r.stdout) else 0
    note = None
    errs = WRK_SOCKERR.search(r.stdout)
    bad = WRK_NON2XX.search(r.stdout)
    problems = []
    if errs:
        c, rd, w, t = map(int, errs.groups())
        # With Connection: close, wrk counts nothing for the server's close; anything here is real.
        if c + rd + w + t:
            problems.append(f"socket errors: connect {c}, read {rd}, write {w}, timeout {t}")
    if bad:
        problems.append(f"{bad.group(1)} non-2xx responses")
    if problems:
        note = f"{'; '.join(problems)} of {total} requests"
        if total == 0 or (int(bad.group(1)) if bad else 0) > total * 0.01:
            raise RuntimeError(f"wrk: {note}")
    return rate, note


def startup_helper(n, warmup, argv):
    """Runs inside the benchmark user's own process (`--startup-helper`), so that the timing holds
    only the launch itself, not setpriv or Python's start."""
    times, errors = [], []
    i = 0
    # A launch that fails now and then (rootlesskit's builtin driver can race a command that exits at
    # once) is run again; one that fails often is reported as failed.
    def hopeless():
        return len(errors) > n // 3 or (len(errors) >= 3 and len(errors) > i)

    while i < warmup + n and not hopeless():
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            # e.g. pasta stays up when its namespace side failed: take its whole session down.
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            errors.append("did not exit within 20 s")
            continue
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            errors.append(f"exit status {p.returncode}: {last_line(err.decode(errors='replace'))}")
            continue
        if i >= warmup:
            times.append(dt)
        i += 1
    if hopeless():
        print(json.dumps({"error": errors[0]}))
    else:
        print(json.dumps({"times": times, "errors": errors}))


def attach_helper(n, warmup, argv):
    """pasta's own start-up, in the benchmark user's process (`--attach-helper`): for each run, first
    (not timed) a user and network namespace of its own, made by unshare the way lowport --userns
    single makes them, then the wall time of `argv` with {pid} replaced by the namespace's process and
    {pidfile} by a file for pasta's pid: pasta's first process returns once the namespace's interface
    is configured and leaves the rest in the background, which is then stopped, as is the namespace."""
    times, errors = [], []
    pidfile = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"bench-pasta.{os.getpid()}.pid")
    own = os.stat("/proc/self/ns/net").st_ino
    i = 0
    while i < warmup + n and not (len(errors) > n // 3 or (len(errors) >= 3 and len(errors) > i)):
        holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "--", "sleep", "60"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            # Once unshare has written the maps it runs sleep.
            deadline = time.monotonic() + 5
            while True:
                try:
                    with open(f"/proc/{holder.pid}/comm") as f:
                        ready = f.read().strip() == "sleep"
                    ready = ready and os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own
                except OSError:
                    ready = False
                if ready or holder.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            if not ready:
                errors.append("unshare --user --map-root-user --net did not start")
                continue
            cmd = [a.replace("{pid}", str(holder.pid)).replace("{pidfile}", pidfile) for a in argv]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=20, check=False)
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                errors.append(f"exit status {p.returncode}: {last_line(p.stderr.decode(errors='replace'))}")
                continue
            if i >= warmup:
                times.append(dt)
            i += 1
        except subprocess.TimeoutExpired:
            errors.append("did not return within 20 s")
        finally:
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            try:
                os.unlink(pidfile)
            except OSError:
                pass
            holder.kill()
            holder.wait()
    if not times or len(times) < n:
        print(json.dumps({"error": errors[0] if errors else "no run"}))
    else:
        print(json.dumps({"times": times, "errors": errors}))


# pasta with lowport --net pasta's options (every forward and the gateway mapping off), attached to a
# namespace's process; see attach_helper. lowport adds --foreground and waits for the pid pasta writes
# once the namespace is set up: the same point in pasta's start-up at which its first process exits.
PASTA_ATTACH = ["pasta", "--config-net", "-q", "-t", "none", "-u", "none", "-T", "none", "-U", "none",
                "--no-map-gw", "-P", "{pidfile}", "{pid}"]


def measure_startup(runner, argv, attach=False):
    helper = os.path.join(runner.work, "bench.py")
    wait_quiet()
    mode = "--attach-helper" if attach else "--startup-helper"
    r = runner.run([runner.python, helper, mode, str(STARTUP_RUNS), str(STARTUP_WARMUP),
                    "--", *argv], timeout=300)
    try:
        data = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"start-up helper: {last_line(r.stderr) or 'no output'}")
    if "error" in data:
        raise RuntimeError(data["error"])
    times = [t * 1000 for t in data["times"]]
    note = f"{len(times)} runs, min {min(times):.1f}, max {max(times):.1f} ms"
    if data.get("errors"):
        note += f"; {len(data['errors'])} more run(s) failed and were run again: {data['errors'][0]}"
    return {"value": statistics.median(times), "runs": times, "note": note}


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def accept_queue(port):
    """Connections waiting in the accept queue of the listeners on `port` (the rx_queue column of a
    listening socket in /proc/net/tcp*), or None when no listener is found."""
    total, found = 0, False
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, queues = fields[1], fields[3], fields[4]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        found = True
                        total += int(queues.split(":")[1], 16)
        except OSError:
            pass
    return total if found else None


def wait_accepted(port, deadline):
    while time.monotonic() < deadline:
        q = accept_queue(port)
        if q is None or q == 0:
            return
        time.sleep(0.02)
    raise RuntimeError(f"the listener on {port} did not accept every connection in time")


def measure_rss(port, pids_fn, launch):
    """Opens IDLE_CONNS connections that send nothing, waits until the listener has accepted them all
    and the forwarder's memory has settled, then sums VmRSS over the forwarder's processes."""
    raise_nofile(IDLE_CONNS)
    socks = []
    try:
        deadline = time.monotonic() + 60
        for start in range(0, IDLE_CONNS, 100):
            batch = []
            for _ in range(min(100, IDLE_CONNS - start)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", port))
                if err not in (0, 115):  # EINPROGRESS
                    s.close()
                    raise RuntimeError(f"connect: {os.strerror(err)}")
                batch.append(s)
                socks.append(s)
            pending = set(batch)
            while pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(pending)} connections did not complete")
                _, w, _ = select.select([], list(pending), [], 1.0)
                for s in w:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise RuntimeError(f"connect: {os.strerror(err)}")
                    pending.discard(s)
            wait_accepted(port, deadline)
        launch.check()
        # Let the forwarder finish its inner connections and its memory settle.
        pids = pids_fn()
        prev, stable_since = None, time.monotonic()
        settle_deadline = time.monotonic() + 10
        while time.monotonic() < settle_deadline:
            cur = sum(vm_rss_kib(p) for _, p in pids)
            if cur != prev:
                prev, stable_since = cur, time.monotonic()
            elif time.monotonic() - stable_since >= 0.6:
                break
            time.sleep(0.1)
        parts = [(name, vm_rss_kib(p)) for name, p in pids]
        open_count = 0
        for s in socks:
            try:
                data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                open_count += 1 if data else 0
            except BlockingIOError:
                open_count += 1
            except OSError:
                pass
        total = sum(k for _, k in parts) / 1024
        note = " + ".join(f"{name} {kib / 1024:.1f}" for name, kib in parts)
        if open_count < len(socks):
            note += f"; only {open_count} of {len(socks)} connections still open"
        return {"value": total, "runs": [total], "note": note, "open": open_count}
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------------
# Setups


def inner_script(demo, http_port, iperf_port):
    # Same script everywhere: a generous open-file limit, iperf3 -s beside demo-server. iperf3 binds
    # its default dual-stack [::] socket; under handoff it gets the 127.0.0.1 publication as
    # [::ffff:127.0.0.1]. The clients are IPv4 in every setup.
    lim = 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"'
    iperf = f"iperf3 -s -p {iperf_port} >/dev/null 2>&1 & " if iperf_port else ""
    return f"{lim}; {iperf}exec {demo} --port {http_port}"


def proxy_conf(upstream):
    """The front nginx of the proxy_pass chain: everything to the app at `upstream` (HOST:PORT), with
    PROXY_KEEPALIVE connections to it kept alive (HTTP/1.1 without `Connection: close`), or nginx's
    default of a new connection per request (HTTP/1.0) when 0."""
    if PROXY_KEEPALIVE:
        keep = f"\n        keepalive {PROXY_KEEPALIVE};"
        http11 = '\n            proxy_http_version 1.1;\n            proxy_set_header Connection "";'
    else:
        keep = http11 = ""
    return f"""upstream app {{
        server {upstream};{keep}
    }}
    server {{
        listen {{listen}};
        location / {{
            proxy_pass http://app;{http11}
        }}
    }}"""


def nginx_setup(runner, name, listen, upstream=None):
    """A directory of nginx's own (config, pid file, logs, temporary paths) owned by the benchmark
    user, and the command that runs nginx from it in the foreground: master and one worker. It serves
    the files of nginx-www, or with `upstream` passes every request on to it (proxy_conf)."""
    d = os.path.join(runner.work, "nginx", name)
    os.makedirs(d)
    www = os.path.join(runner.work, "nginx-www")
    conf = os.path.join(d, "nginx.conf")
    if upstream:
        server = proxy_conf(upstream).replace("{listen}", listen)
    else:
        server = f"""server {{
        listen {listen};
        root {www};
    }}"""
    with open(conf, "w") as f:
        f.write(f"""daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/html;
    sendfile on;
    keepalive_requests 1000000;
    {server}
}}
""")
    if runner.root:
        os.chown(d, runner.uid, runner.gid)
        os.chown(conf, runner.uid, runner.gid)
    return [which("nginx") or "/usr/sbin/nginx", "-e", os.path.join(d, "error.log"), "-p", d, "-c", conf]


_HELP = {}


def lowport_has(ctx, option):
    """Whether this lowport build knows `option` (in `lowport run --help`)."""
    if ctx["lowport"] not in _HELP:
        r = subprocess.run([ctx["lowport"], "run", "--help"], capture_output=True, text=True, check=False)
        _HELP[ctx["lowport"]] = r.stdout + r.stderr
    return re.search(re.escape(option) + r"\b(?!-)", _HELP[ctx["lowport"]]) is not None


class Setup:
    key = ""
    label = ""
    needs = ()
    iperf = True  # whether iperf3 can be measured in this setup
    nginx = False  # whether the nginx row is measured in this setup
    proxy = False  # whether the proxy_pass chain is measured in this setup
    forward = None  # lowport's --forward, checked: "handoff" (the server holds the listener) or "relay"

    def __init__(self, ctx):
        self.ctx = ctx

    def missing(self):
        """None when the setup can run, or why not."""
        gone = [p for p in self.needs if not which(p)]
        if gone:
            pkgs = sorted({PROGRAMS.get(p, p) for p in gone})
            return f"{', '.join(gone)} not installed (Debian package {', '.join(pkgs)})"
        return None

    def launch_argv(self, http_hp, iperf_hp):
        raise NotImplementedError

    def startup_argv(self, port):
        raise NotImplementedError

    def nginx_argv(self, hp, runner, name):
        """nginx with port 80 of the namespace published on 127.0.0.1:hp."""
        raise NotImplementedError

    def proxy_missing(self):
        """None when the proxy_pass chain can run, or why not."""
        return None

    def proxy_argv(self, hp, app, runner, name):
        """The front nginx of the proxy_pass chain, port 80 of the namespace published on
        127.0.0.1:hp, passing requests to the app on the host's 127.0.0.1:app."""
        raise NotImplementedError

    def forwarder(self, launch):
        """(name, pid) of the processes whose memory is the forwarder's."""
        return [(self.label.split()[0], launch.pid)]


class Direct(Setup):
    key, label, needs = "direct", "direct loopback", ("iperf3", "wrk", "unshare")
    nginx = True
    proxy = True

    def launch_argv(self, http_hp, iperf_hp):
        return ["sh", "-c", inner_script(self.ctx["demo"], http_hp, iperf_hp)]

    def nginx_argv(self, hp, runner, name):
        return nginx_setup(runner, name, f"127.0.0.1:{hp}")

    def proxy_argv(self, hp, app, runner, name):
        return nginx_setup(runner, name, f"127.0.0.1:{hp}", upstream=f"127.0.0.1:{app}")

    def startup_argv(self, port):
        return ["unshare", "-Urn", "true"]

    def forwarder(self, launch):
        return None


class LowportRelay(Setup):
    key, label, needs = "lowport", "lowport relay", ("iperf3", "wrk")
    # Explicitly: the default, --forward auto, hands the ports to servers that bind them.
    extra = ("--forward", "relay")
    startup_extra = extra
    forward = "relay"
    nginx = True

    def launch_argv(self, http_hp, iperf_hp):
        return [self.ctx["lowport"], "run", *self.extra, "-p", f"127.0.0.1:{http_hp}:80",
                "-p", f"127.0.0.1:{iperf_hp}:5201", "--",
                "sh", "-c", inner_script(self.ctx["demo"], 80, 5201)]

    def startup_argv(self, port, single=False):
        userns = ("--userns", "single") if single else ()
        return [self.ctx["lowport"], "run", *self.startup_extra, *userns, "-p", "0:80", "--", "true"]

    def nginx_argv(self, hp, runner, name):
        return [self.ctx["lowport"], "run", *self.extra, "-p", f"127.0.0.1:{hp}:80", "--",
                *nginx_setup(runner, name, "80")]

    def forwarder(self, launch):
        return [("lowport", launch.pid)]


class LowportHandoff(LowportRelay):
    key, label = "handoff", "lowport handoff"
    extra = ("--forward", "handoff")
    # Start-up as the user types it: the default --forward auto sets up the handoff the same way.
    startup_extra = ()
    forward = "handoff"
    proxy = True

    def missing(self):
        why = super().missing()
        if why:
            return why
        if not lowport_has(self.ctx, "--forward"):
            return "this lowport has no --forward yet"
        return None

    def proxy_missing(self):
        if not lowport_has(self.ctx, "--host-loopback"):
            return "this lowport has no --host-loopback yet"
        return None

    def proxy_argv(self, hp, app, runner, name):
        # As the user types it: the default --forward auto hands port 80 to nginx (checked).
        return [self.ctx["lowport"], "run", "-p", f"127.0.0.1:{hp}:80", "--host-loopback", str(app), "--",
                *nginx_setup(runner, name, "80", upstream=f"127.0.0.1:{app}")]


class LowportNoPreserve(LowportRelay):
    key, label = "lowport_nops", "lowport relay, --no-preserve-source"
    extra = ("--forward", "relay", "--no-preserve-source")
    startup_extra = extra
    nginx = False


class LowportActivation(Setup):
    key, label, needs = "activation", "lowport --socket-activation", ("wrk",)
    iperf = False

    def missing(self):
        why = super().missing()
        if why:
            return why
        r = subprocess.run([self.ctx["lowport"], "run", "--help"], capture_output=True, text=True, check=False)
        if "socket-activation" not in r.stdout:
            return "this lowport has no --socket-activation yet"
        return None

    def launch_argv(self, http_hp, iperf_hp):
        # demo-server takes the inherited socket (LISTEN_FDS); iperf3 cannot, so it is not started.
        return [self.ctx["lowport"], "run", "--socket-activation", "-p", f"127.0.0.1:{http_hp}:80", "--",
                "sh", "-c", inner_script(self.ctx["demo"], 80, None)]

    def startup_argv(self, port):
        return [self.ctx["lowport"], "run", "--socket-activation", "-p", "0:80", "--", "true"]

    def forwarder(self, launch):
        return [("lowport", launch.pid)]


class Rootlesskit(Setup):
    needs = ("iperf3", "wrk", "rootlesskit", "slirp4netns", "nsenter", "ip", "newuidmap")
    driver = ""

    def base(self):
        return ["rootlesskit", "--net=slirp4netns", f"--port-driver={self.driver}", "--disable-host-loopback"]

    def launch_argv(self, http_hp, iperf_hp):
        return [*self.base(), "-p", f"127.0.0.1:{http_hp}:80/tcp", "-p", f"127.0.0.1:{iperf_hp}:5201/tcp",
                "--", "sh", "-c", inner_script(self.ctx["demo"], 80, 5201)]

    def startup_argv(self, port):
        return [*self.base(), "-p", f"127.0.0.1:{port}:80/tcp", "--", "true"]

    def nginx_argv(self, hp, runner, name):
        return [*self.base(), "-p", f"127.0.0.1:{hp}:80/tcp", "--", *nginx_setup(runner, name, "80")]

    def forwarder(self, launch):
        # The parent holds the host side, its child (re-executed rootlesskit, in the namespaces) dials
        # inside; slirp4netns carries the traffic only with its own port driver.
        table = proc_table()
        kids = [p for p, (pp, _, _) in table.items() if pp == launch.pid]
        out = [("rootlesskit parent", launch.pid)]
        for p in kids:
            comm = table[p][2]
            if comm == "slirp4netns":
                if self.driver == "slirp4netns":
                    out.append(("slirp4netns", p))
            else:
                out.append(("rootlesskit child", p))
        return out


class RootlesskitBuiltin(Rootlesskit):
    key, label, driver = "rk_builtin", "rootlesskit builtin", "builtin"
    nginx = True
    proxy = True

    def proxy_argv(self, hp, app, runner, name):
        # Without --disable-host-loopback: slirp4netns maps 10.0.2.2 to the host's 127.0.0.1.
        base = [a for a in self.base() if a != "--disable-host-loopback"]
        return [*base, "-p", f"127.0.0.1:{hp}:80/tcp", "--",
                *nginx_setup(runner, name, "80", upstream=f"10.0.2.2:{app}")]


class RootlesskitSlirp(Rootlesskit):
    key, label, driver = "rk_slirp", "rootlesskit slirp4netns", "slirp4netns"


class Pasta(Setup):
    key, label, needs = "pasta", "pasta", ("iperf3", "wrk", "pasta")
    nginx = True
    proxy = True

    def missing(self):
        why = super().missing()
        if why:
            return why
        if not self.ctx["netns"]:
            return (f"pasta runs only in the test network namespace {NETNS}, which the harness creates as "
                    "root (pasta would take this machine's routes)")
        return None

    def proxy_missing(self):
        if not self.ctx["gateway"]:
            return "no IPv4 default gateway here, which pasta maps to the host's loopback"
        return None

    def proxy_argv(self, hp, app, runner, name):
        # pasta maps its namespace's default gateway (lp-bench's, copied) to the host's loopback.
        return self.attached(runner, name, hp, upstream=f"{self.ctx['gateway']}:{app}")

    def launch_argv(self, http_hp, iperf_hp):
        return ["pasta", "--config-net", "-t", f"127.0.0.1/{http_hp}:80", "-t", f"127.0.0.1/{iperf_hp}:5201",
                "-u", "none", "-T", "none", "-U", "none",
                "--", "sh", "-c", inner_script(self.ctx["demo"], 80, 5201)]

    def startup_argv(self, port):
        return ["pasta", "--config-net", "-t", f"127.0.0.1/{port}:80", "-u", "none", "-T", "none",
                "-U", "none", "--", "true"]

    def nginx_argv(self, hp, runner, name):
        return self.attached(runner, name, hp)

    def attached(self, runner, name, hp, upstream=None):
        # nginx's worker, started as uid 0, always calls setgid and initgroups, which fail in the
        # one-id user namespace pasta makes for a command. So nginx starts in namespaces of its own
        # with the subordinate ids mapped (unshare --map-auto), and pasta attaches to them once unshare
        # has run nginx, that is once the namespaces exist and newuidmap has written their id maps.
        nginx = " ".join(nginx_setup(runner, name, "80", upstream=upstream))
        script = ("unshare --user --map-root-user --map-auto --net -- " + nginx + " & pid=$!; i=0; "
                  'while [ "$(cat /proc/$pid/comm 2>/dev/null)" != nginx ] || '
                  '[ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do '
                  "i=$((i + 1)); [ $i -lt 500 ] || exit 1; sleep 0.01; done; "
                  f"exec pasta --config-net -f -t 127.0.0.1/{hp}:80 -u none -T none -U none $pid")
        return ["sh", "-c", script]

    def forwarder(self, launch):
        return [("pasta", launch.pid)]


SETUPS = [Direct, LowportHandoff, LowportRelay, LowportNoPreserve, LowportActivation, RootlesskitBuiltin,
          RootlesskitSlirp, Pasta]


def start_servers(setup, runner, tag):
    """Launches the setup with iperf3 -s and demo-server inside; returns (launch, http_hp, iperf_hp)."""
    http_hp, iperf_hp = free_port(), free_port()
    while iperf_hp == http_hp:
        iperf_hp = free_port()
    launch = Launch(runner, setup.launch_argv(http_hp, iperf_hp),
                    os.path.join(runner.work, f"{setup.key}.{tag}.log"))
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        wait_http(http_hp, launch, deadline)
        if setup.iperf:
            wait_iperf(iperf_hp, launch, deadline)
        note = check_forwarding(setup, launch, [http_hp] + ([iperf_hp] if setup.iperf else []))
        if note:
            log(f"{setup.label}: {note}")
    except BaseException:
        launch.stop()
        raise
    return launch, http_hp, iperf_hp


def measure_nginx(setup, runner, res, rnd, metric="nginx"):
    """nginx in the setup, on its own: wrk with keep-alive against the 1 KiB file. With metric "proxy",
    the proxy_pass chain: first the app (nginx serving the file, straight on the host's 127.0.0.1),
    then the front nginx in the setup, which passes the requests on to it."""
    hp = free_port()
    label = f"{setup.label}: {METRIC[metric][1]}"
    app = None
    launch = None
    try:
        if metric == "proxy":
            port = free_port()
            while port == hp:
                port = free_port()
            app = Launch(runner, nginx_setup(runner, f"app.{setup.key}.{rnd}", f"127.0.0.1:{port}"),
                         os.path.join(runner.work, f"{setup.key}.app.{rnd}.log"))
            wait_http(port, app, time.monotonic() + READY_TIMEOUT, what="the app nginx")
            argv = setup.proxy_argv(hp, port, runner, f"{setup.key}.proxy.{rnd}")
        else:
            argv = setup.nginx_argv(hp, runner, f"{setup.key}.{rnd}")
        launch = Launch(runner, argv, os.path.join(runner.work, f"{setup.key}.{metric}.{rnd}.log"))
        # Through the chain: the front nginx answers /healthz only from the app.
        wait_http(hp, launch, time.monotonic() + READY_TIMEOUT,
                  what="nginx" if metric == "nginx" else "the proxy_pass chain")
        check = check_forwarding(setup, launch, [hp])
        if check:
            log(f"{setup.label}: {metric}: {check}")
        value, note = guarded(lambda: wrk(runner, f"http://127.0.0.1:{hp}/1k", 50, 2), runner.uids)
        if check:
            note = f"{note}; {check}" if note else check
        if metric == "proxy" and setup.forward == "handoff" and PROXY_KEEPALIVE:
            # The front nginx keeps its connections to the app open after wrk: with lowport's connect
            # handoff nginx holds their host sockets; relayed, lowport holds them.
            held = upstream_holders(port)
            text = ", ".join(f"{n} held by {comm}" for comm, n in sorted(held.items(), key=lambda x: -x[1]))
            if "lowport" in held or "nginx" not in held:
                held_note = ("the host's connections to the app were held by "
                             f"{', '.join(sorted(held)) or 'no process'}, not by nginx: lowport relayed them "
                             "(no connect handoff)")
                note = f"{note}; {held_note}" if note else held_note
            log(f"{setup.label}: the host's connections to the app: {text or 'none'}")
        record(res, metric, value, note)
        log(f"{label}: {fmt_value(metric, value)}" + (f" ({note})" if note else ""))
    except Exception as e:  # noqa: BLE001
        reason = str(e) or type(e).__name__
        record(res, metric, error=reason)
        log(f"{label}: failed: {reason}")
    finally:
        outlived = launch.stop() if launch else []
        if app:
            app.stop()
    if outlived and setup.key != "direct":
        res.setdefault("outlived", set()).update(outlived)


def record(res, key, value=None, note=None, error=None):
    slot = res.setdefault(key, {"runs": [], "notes": [], "errors": []})
    if error is not None:
        slot["errors"].append(error)
    else:
        slot["runs"].append(value)
        if note:
            slot["notes"].append(note)


def run_round(setup, runner, raw, rnd, with_rss):
    """One launch of the setup and one run of each throughput and rate measurement; the rounds go
    through every setup in turn, so that a disturbance on the machine touches them all alike."""
    res = raw.setdefault(setup.key, {})
    log(f"{setup.label}: round {rnd + 1} of {REPEAT}")
    # nginx first, in launches of its own, before the new-connection test of demo-server leaves the
    # kernel freeing sockets; then the proxy_pass chain, likewise.
    for metric, wanted in (("nginx", setup.nginx), ("proxy", setup.proxy)):
        if metric not in ONLY:
            continue
        why = None if wanted else "not measured in this setup"
        if why is None and not which("nginx"):
            why = f"nginx not installed (Debian package {PROGRAMS['nginx']})"
        if wanted and why is None and metric == "proxy":
            missing = setup.proxy_missing()
            if missing:
                log(f"{setup.label}: {METRIC[metric][1]}: failed: {missing}")
                record(res, metric, error=missing)
                continue
        if why:
            res[metric] = {"na": why}
        else:
            measure_nginx(setup, runner, res, rnd, metric)
    if not SERVER_METRICS:
        return
    try:
        launch, http_hp, iperf_hp = start_servers(setup, runner, rnd)
    except Exception as e:  # noqa: BLE001 - a setup that fails is reported, and the run goes on
        reason = str(e) or type(e).__name__
        log(f"{setup.label}: failed to start: {reason}")
        for key in [k for k in SERVER_METRICS if k != "rss"] + (["rss"] if with_rss and "rss" in ONLY else []):
            record(res, key, error=reason)
        return
    url = f"http://127.0.0.1:{http_hp}"
    steps = [
        ("iperf1", lambda: iperf3(runner, iperf_hp, 1)),
        ("iperf4", lambda: iperf3(runner, iperf_hp, 4)),
        # Before the keep-alive test: pasta's (2023) echo throughput drops to a quarter after one, until
        # a new-connection test; measured first, every setup's figure comes from the same state.
        ("echo", lambda: scale_echo(wrk(runner, url + "/echo", 4, 2, ["-s", setup.ctx["echo_lua"]]))),
        ("keepalive", lambda: wrk(runner, url + "/", 50, 2)),
        # Last: the kernel frees the sockets of ~100k short connections for a while afterwards.
        ("newconn", lambda: wrk(runner, url + "/", 50, 2, ["-H", "Connection: close"])),
    ]
    try:
        for key, fn in steps:
            if key not in ONLY:
                continue
            if key.startswith("iperf") and not setup.iperf:
                res[key] = {"na": "iperf3 cannot take an inherited socket"}
                continue
            try:
                launch.check()
                value, note = guarded(fn, runner.uids)
                record(res, key, value, note)
                log(f"{setup.label}: {METRIC[key][1]}: {fmt_value(key, value)}" + (f" ({note})" if note else ""))
            except Exception as e:  # noqa: BLE001
                record(res, key, error=str(e) or type(e).__name__)
                log(f"{setup.label}: {METRIC[key][1]}: failed: {str(e) or type(e).__name__}")
        if with_rss and "rss" in ONLY:
            if setup.forwarder(launch) is None:
                res["rss"] = {"na": "no forwarder"}
            else:
                try:
                    r = measure_rss(http_hp, lambda: setup.forwarder(launch), launch)
                    record(res, "rss", r["value"], r["note"])
                    log(f"{setup.label}: RSS: {r['value']:.1f} MiB ({r['note']})")
                except Exception as e:  # noqa: BLE001
                    record(res, "rss", error=str(e) or type(e).__name__)
                    log(f"{setup.label}: RSS: failed: {str(e) or type(e).__name__}")
    finally:
        outlived = launch.stop()
    if outlived and setup.key != "direct":
        res.setdefault("outlived", set()).update(outlived)
        log(f"{setup.label}: {len(outlived)} process(es) outlived the launcher "
            f"({', '.join(sorted(set(outlived)))}); the harness killed them")


def run_startup(setup, runner, raw):
    """Start-up, with nothing else of the setup running."""
    res = raw.setdefault(setup.key, {})
    todo = [("startup", setup.startup_argv(free_port()))]
    if setup.key in ("lowport", "handoff"):
        # The default (--userns auto) maps subordinate ids through newuidmap when the user has
        # ranges; the single-id map, the cheapest mode, is shown beside it.
        todo.append(("startup_single", setup.startup_argv(0, single=True)))
    if setup.key == "handoff":
        lp = [setup.ctx["lowport"], "run", "--userns", "single"]
        todo.append(("startup_hostlo", None if lowport_has(setup.ctx, "--host-loopback")
                     else "this lowport has no --host-loopback yet",
                     [*lp, "--host-loopback", str(free_port()), "--", "true"]))
        why = None
        if not setup.ctx["netns"]:
            why = f"runs pasta, which runs only in the test network namespace {NETNS} (root)"
        elif not which("pasta"):
            why = "pasta not installed (Debian package passt)"
        elif not lowport_has(setup.ctx, "--net"):
            why = "this lowport has no --net pasta yet"
        todo.append(("startup_netpasta", why, [*lp, "--net", "pasta", "--", "true"]))
    if setup.key == "pasta":
        # pasta alone as lowport --net pasta starts it, on a namespace that exists already.
        todo.append(("startup_attach", None, PASTA_ATTACH))
    for item in todo:
        key, why, argv = item if len(item) == 3 else (item[0], None, item[1])
        if why:
            res[key] = {"error": why}
            log(f"{setup.label}: {key.replace('_', ' ')}: failed: {why}")
            continue
        try:
            r = measure_startup(runner, argv, attach=key == "startup_attach")
            res[key] = r
            log(f"{setup.label}: {key.replace('_', ' ')}: {r['value']:.1f} ms ({r['note']})")
        except Exception as e:  # noqa: BLE001
            res[key] = {"error": str(e) or type(e).__name__}
            log(f"{setup.label}: {key.replace('_', ' ')}: failed: {res[key]['error']}")


def summarize(raw):
    """Medians of the runs; a figure with no successful run is the first error."""
    results = {}
    for skey, res in raw.items():
        out = {}
        for key, slot in res.items():
            if key == "outlived":
                out[key] = sorted(slot)
            elif isinstance(slot, dict) and "runs" in slot and "errors" in slot:
                if slot["runs"]:
                    note = "; ".join(dict.fromkeys(slot["notes"])) or None
                    if slot["errors"]:
                        extra = f"{len(slot['errors'])} of {len(slot['runs']) + len(slot['errors'])} runs failed: {slot['errors'][0]}"
                        note = f"{note}; {extra}" if note else extra
                    out[key] = {"value": statistics.median(slot["runs"]), "runs": slot["runs"], "note": note}
                else:
                    out[key] = {"error": slot["errors"][0]}
            else:
                out[key] = slot
        results[skey] = out
    return results


def scale_echo(result):
    rate, note = result
    return rate * ECHO_BODY / (1 << 20), note


# --------------------------------------------------------------------------------------------------
# Goals, the table, the report


def goals(setup_key, metric):
    """(text, check(value, ratio, best peer ratio or None) -> bool) or None."""
    at_least = lambda g: (f"≥ {g:.2f}×", lambda v, r, p: r is not None and r >= g)  # noqa: E731
    # Handoff: at least g of direct loopback (when g is given) and ahead of every peer that was measured.
    ahead = lambda g=None: ((f"≥ {g:.2f}×, " if g else "") + "> peers",  # noqa: E731
                            lambda v, r, p: r is not None and (g is None or r >= g) and (p is None or r > p))
    table = {
        ("handoff", "iperf1"): ahead(0.97),
        ("handoff", "iperf4"): ahead(),
        ("handoff", "keepalive"): ahead(0.97),
        ("handoff", "newconn"): ahead(0.97),
        ("handoff", "echo"): ahead(0.97),
        ("handoff", "nginx"): ahead(),
        ("handoff", "proxy"): ahead(0.90),
        ("handoff", "startup_single"): ("≤ 5 ms", lambda v, r, p: v <= 5.0),
        ("handoff", "startup_hostlo"): ("≤ 5 ms", lambda v, r, p: v <= 5.0),
        ("lowport", "iperf1"): at_least(0.85),
        ("lowport", "keepalive"): at_least(0.65),
        ("lowport", "newconn"): at_least(0.60),
        ("lowport", "startup"): ("≤ 5 ms", lambda v, r, p: v <= 5.0),
        ("lowport", "rss"): ("≤ 8 MiB", lambda v, r, p: v <= 8.0),
        ("activation", "keepalive"): at_least(0.97),
        ("activation", "newconn"): at_least(0.97),
        # The iperf3 goal of socket activation, measured by HTTP echo: iperf3 cannot be activated.
        ("activation", "echo"): at_least(0.97),
        ("activation", "iperf1"): ("≥ 0.97×", None),
    }
    return table.get((setup_key, metric))


def fmt_value(metric, v):
    if metric.startswith("iperf"):
        return f"{v:.1f} Gbit/s"
    if metric in ("keepalive", "newconn", "nginx", "proxy"):
        return f"{v:,.0f} {METRIC[metric][2]}"
    if metric == "echo":
        return f"{v:,.0f} MiB/s"
    if metric.startswith("startup"):
        return f"{v:.1f} ms"
    if metric == "rss":
        return f"{v:.1f} MiB"
    return f"{v}"


def build_rows(results, setups):
    """One row per metric and setup: metric, setup, result, ratio, goal, met."""
    rows = []
    base = results.get("direct", {})
    for key, label, unit, _ in METRICS:
        # The best ratio among the peers, for the handoff goals.
        peer = None
        b = base.get(key, {})
        for s in setups:
            v = results.get(s.key, {}).get(key, {}).get("value")
            if s.key in PEERS and v is not None and b.get("value"):
                if peer is None or v / b["value"] > peer[1]:
                    peer = (s.label, v / b["value"])
        entries = []
        by_key = {s.key: s for s in setups}
        for s in setups:
            entries.append((s, key, s.label))
            if key == "startup":
                for skey, mkey, slabel in STARTUP_EXTRA.get(s.key, []):
                    if skey in by_key:
                        entries.append((by_key[skey], mkey, slabel))
        for s, mkey, slabel in entries:
            res = results.get(s.key, {})
            r = res.get(mkey, {})
            ratio = None
            if "skipped" in res:
                text = f"skipped: {res['skipped']}"
            elif "error" in r:
                text = f"failed: {r['error']}"
            elif "na" in r:
                text = f"n/a ({r['na']})"
            elif "value" in r:
                text = fmt_value(mkey, r["value"])
                runs = r.get("runs") or []
                if key in RATIO_METRICS and len(runs) > 1 and r["value"]:
                    text += f" ±{(max(runs) - min(runs)) / 2 / r['value']:.0%}"
                b = base.get(key, {})
                if "value" in b and b["value"] and key != "rss":
                    ratio = r["value"] / b["value"]
            else:
                text = "not measured"
            g = goals(s.key, mkey)
            goal_text, met, missed = "", "", ""
            if g:
                goal_text = g[0] + (" (as echo)" if (s.key, mkey) == ("activation", "echo") else "")
                if g[1] is None:
                    met = "see echo" if "na" in r else ""
                elif "value" in r and (ratio is not None or "×" not in g[0] and "peers" not in g[0]):
                    met = "met" if g[1](r["value"], ratio, peer and peer[1]) else "NOT MET"
                    # What the summary says of a goal not met.
                    if "peers" in g[0]:
                        missed = f"{ratio:.3f}×" + (f", best peer {peer[0]} {peer[1]:.3f}×" if peer else "")
                    elif "×" in g[0]:
                        missed = f"{ratio:.3f}×"
                    else:
                        missed = text
                else:
                    met = "not checked"
            ratio_text = "—" if ratio is None else (f"{ratio:.2f}" if s.key != "direct" else "1.00")
            rows.append({"metric": f"{label} ({unit})", "setup": slabel, "result": text, "raw_ratio": ratio,
                         "ratio": ratio_text, "goal": goal_text, "met": met, "missed": missed,
                         "note": r.get("note")})
    return rows


# The start-up rows besides each setup's own: setup whose row follows -> (setup of the figure, key,
# label). pasta's start-up on an existing namespace follows lowport --net pasta, for comparison.
STARTUP_EXTRA = {
    "handoff": [("handoff", "startup_single", "lowport handoff, --userns single"),
                ("handoff", "startup_hostlo", "lowport, --userns single --host-loopback P"),
                ("handoff", "startup_netpasta", "lowport, --userns single --net pasta"),
                ("pasta", "startup_attach", "pasta alone, attached to an existing namespace")],
    "lowport": [("lowport", "startup_single", "lowport relay, --userns single")],
}

HEADERS = ["metric", "setup", "result", "× direct", "goal", "met"]


def row_cells(row):
    return [row["metric"], row["setup"], row["result"], row["ratio"], row["goal"], row["met"]]


def goal_summary(rows):
    met = [r for r in rows if r["met"] == "met"]
    missed = [f"{r['setup']}, {r['metric']}: {r['missed']} (goal {r['goal']})"
              for r in rows if r["met"] == "NOT MET"]
    unchecked = [r for r in rows if r["met"] == "not checked"]
    text = f"Goals: {len(met)} met, {len(missed)} not met"
    if unchecked:
        text += f", {len(unchecked)} not checked (a figure failed)"
    return text + (": " + "; ".join(missed) + "." if missed else ".")


def print_table(rows):
    cells = [HEADERS] + [row_cells(r) for r in rows]
    widths = [min(max(len(c[i]) for c in cells), 70) for i in range(len(HEADERS))]
    prev = None
    for i, c in enumerate(cells):
        if i > 1 and c[0] != prev:
            print()
        shown = list(c)
        if i > 0 and c[0] == prev:
            shown[0] = ""
        prev = c[0]
        print("  ".join(s[:70].ljust(w) for s, w in zip(shown, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine_info(ctx, runner):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def pkg(name):
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True,
                           check=False)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "not installed"

    lp = subprocess.run([ctx["lowport"], "--version"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=False).stdout.strip()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "os": distro(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lowport": f"{lp} (git {commit})" if commit else lp,
        "user": f"{runner.name} (uid {runner.uid})",
        "versions": {p: pkg(p) for p in PEER_PACKAGES},
    }


def distro():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def md_escape(s):
    if len(s) > 200:
        s = s[:197] + "..."
    return s.replace("|", "\\|")


def write_markdown(path, rows, info, results, notes, png_name):
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append("lowport against direct loopback and its peers, measured by `make bench` "
             "(`scripts/bench/bench.py`) in one run on one machine. The ratios (`× direct`) are to direct "
             "loopback in the same run, which is the figure to compare across machines: on a 2-core machine "
             "the client, the server and the forwarder share the CPUs, the same way in every setup.")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- CPU: {info['cpu']}, {info['cores']} cores; memory {info['memory']}")
    L.append(f"- kernel {info['kernel']}, {info['os']}")
    L.append(f"- date: {info['date']}")
    L.append(f"- lowport: {info['lowport']}, release build")
    L.append("- peers (Debian packages): " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    L.append(f"- every setup ran as {info['user']}, not root; clients on the host, servers inside; "
             f"CPUs busy with other work just before the run: {info.get('busy', '?')}")
    L.append(f"- network: {info['network']}")
    if PARTIAL:
        L.append(f"- a partial run (BENCH_ONLY): {', '.join(ONLY)}")
    L.append(f"- {'QUICK smoke run: ' if QUICK else ''}iperf3 -t {DURATION}, wrk -d {DURATION}s; each figure is "
             f"the median of {REPEAT} round(s), and each round launches every setup afresh in turn, so that a "
             "disturbance touches all setups alike; every measurement starts only once the CPUs are idle. "
             f"Start-up: median of {STARTUP_RUNS} runs after {STARTUP_WARMUP} warm-up runs")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append(goal_summary(rows))
    L.append("")
    L.append("| " + " | ".join(HEADERS) + " |")
    L.append("|" + "|".join(["---", "---", "---:", "---:", "---", "---"]) + "|")
    prev = None
    for r in rows:
        c = [md_escape(x) for x in row_cells(r)]
        if c[0] == prev:
            c[0] = ""
        else:
            prev = c[0]
            c[0] = f"**{c[0]}**"
        if r["met"] == "NOT MET":
            c[5] = "**not met**"
        L.append("| " + " | ".join(c) + " |")
    L.append("")
    L.append(f"![ratios to direct loopback]({png_name})")
    L.append("")
    L.append("## What is measured")
    L.append("")
    L.append(
        "- **Setups.** *direct loopback*: iperf3 -s and demo-server on the host, the client straight to "
        "them (the baseline). *lowport handoff*: `lowport run --forward handoff -p 127.0.0.1:H:80 "
        "-p 127.0.0.1:H2:5201 -- sh -c 'iperf3 -s -p 5201 & exec demo-server --port 80'`: when a server "
        "binds a published port's wildcard address, lowport hands it the host socket (seccomp user "
        "notification and ADDFD), and the server accepts the host's clients itself, no relay; demo-server "
        "is the unmodified release build, and iperf3 the Debian package as it is (its dual-stack `[::]` "
        "socket gets the 127.0.0.1 publication as `[::ffff:127.0.0.1]`). After "
        "start-up the harness checks in /proc that the host listeners are held by the servers, not by "
        "lowport (and by lowport in the relay setups), and fails the setup otherwise. *lowport relay*: "
        "the same with `--forward relay` (the default, `--forward auto`, would hand off), client addresses "
        "preserved; *lowport relay, --no-preserve-source* the same without source-address preservation. "
        "*lowport --socket-activation*: demo-server accepts the host socket itself (iperf3 cannot take an "
        "inherited socket, so its throughput is measured with HTTP echo). *rootlesskit*: `rootlesskit "
        "--net=slirp4netns --port-driver=builtin|slirp4netns --disable-host-loopback -p 127.0.0.1:H:80/tcp "
        "-- ...`. *pasta*: `pasta --config-net -t 127.0.0.1/H:80 -u none -T none -U none -- ...`.")
    L.append(
        f"- **Network.** As root the harness runs everything, the direct baseline included, in a network "
        f"namespace of its own, `{NETNS}`: a veth pair to a peer namespace `{PEER_NETNS}` "
        f"({NETNS_ADDRS[0][0]} and {NETNS_ADDRS[1][0]} on its side, {NETNS_ADDRS[0][1]} and "
        f"{NETNS_ADDRS[1][1]} on the peer's), and its default routes via the peer. pasta copies the "
        "addresses and routes of the namespace it starts in; there they lead to the peer, where nothing "
        "answers, not to the machine's gateway. The \"host\" of every setup, where the clients and the "
        f"proxy chain's app run, is `{NETNS}`; its loopback is the same kernel path as the machine's. "
        "The harness enters it with `ip netns exec` (which mounts a sysfs of the namespace over /sys) and "
        "deletes both namespaces at the end.")
    L.append(
        "- **Order** in each round: nginx, then the proxy_pass chain (launches of their own), then iperf3 "
        "1 stream, 4 streams, HTTP echo, "
        "keep-alive, new connections (echo before keep-alive because pasta's echo throughput drops to about "
        "a quarter after a keep-alive test; new connections last because the kernel goes on freeing their "
        "sockets afterwards). "
        "**±** after a figure is half the range of the rounds relative to the median: a goal within that "
        "distance of its mark is not settled by one run (BENCH_REPEAT=5 narrows it).")
    L.append(
        f"- **iperf3**: `iperf3 -c 127.0.0.1 -p H -t {DURATION}` (and `-P 4`), receiver's figure. "
        f"**HTTP keep-alive**: `wrk -c 50 -t 2 -d {DURATION}s` against demo-server `/`; **new connections**: "
        "the same with `-H 'Connection: close'`, one TCP connection per request. **HTTP echo**: wrk POSTs "
        "1 MiB bodies to `/echo` over 4 connections, MiB/s of bodies each way.")
    L.append(
        f"- **nginx**: Debian's nginx-light (`/usr/sbin/nginx -e DIR/error.log -p DIR -c DIR/nginx.conf`), "
        "run by the benchmark user with `daemon off; master_process on; worker_processes 1;`, its pid file, "
        "error log and temporary paths in a directory of its own, `access_log off`, `sendfile on`, "
        f"`keepalive_requests 1000000`; `wrk -c 50 -t 2 -d {DURATION}s http://127.0.0.1:H/1k` fetches a "
        f"{NGINX_FILE}-byte file over kept-alive connections. nginx listens on `127.0.0.1:H` directly on the "
        "host, on `80` in the namespaces of `lowport run --forward handoff|relay -p 127.0.0.1:H:80 -- nginx "
        "...` and `rootlesskit --net=slirp4netns --port-driver=builtin ... -- nginx ...`. Under pasta it "
        "cannot run as pasta starts commands: its worker, started as uid 0, calls setgid and initgroups, "
        "which fail in pasta's one-id user namespace; so nginx runs under `unshare --user --map-root-user "
        "--map-auto --net` (the subordinate ids mapped, as lowport's default and rootlesskit map them) and "
        "`pasta --config-net -f -t 127.0.0.1/H:80 -u none -T none -U none PID` attaches to its namespaces. "
        "The other setups have no nginx figure.")
    if PROXY_KEEPALIVE:
        upstream = (f"`upstream app {{ server ADDR:A; keepalive {PROXY_KEEPALIVE}; }}` and `location / {{ "
                    "proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }`")
        why = (f"Upstream keep-alive (`keepalive {PROXY_KEEPALIVE}`: more idle connections kept than wrk's "
               "50, so that the front nginx reuses its connections to the app, each for up to nginx's default "
               "1000 requests), the usual configuration for an app behind nginx: the row measures requests "
               "going through each setup's path to the host's loopback, not connection set-up, which the "
               "new connections row measures. `BENCH_PROXY_KEEPALIVE=0` runs the chain with nginx's default "
               "instead, HTTP/1.0 and a new connection to the app per request.")
    else:
        upstream = "`upstream app { server ADDR:A; }` and `location / { proxy_pass http://app; }`"
        why = ("No upstream keep-alive (`BENCH_PROXY_KEEPALIVE=0`): nginx's default, HTTP/1.0 and a new "
               "connection to the app per request.")
    L.append(
        "- **nginx proxy_pass chain**: the app, a second nginx configured as above and serving the same "
        f"{NGINX_FILE}-byte file on `127.0.0.1:A` of the host, in no namespace of the setup, started first; "
        f"then the front nginx, the same configuration with {upstream}; `wrk -c 50 -t 2 -d {DURATION}s "
        "http://127.0.0.1:H/1k` goes through both. *direct loopback* (the row's baseline): the front nginx "
        "on `127.0.0.1:H` of the host, ADDR `127.0.0.1`. *lowport handoff*: `lowport run -p 127.0.0.1:H:80 "
        "--host-loopback A -- nginx ...`, ADDR `127.0.0.1`, unchanged from the baseline (the default "
        "`--forward auto`, handoff, checked as above). *rootlesskit builtin*: `rootlesskit --net=slirp4netns "
        "--port-driver=builtin -p 127.0.0.1:H:80/tcp -- nginx ...` without `--disable-host-loopback`, ADDR "
        "`10.0.2.2`, which slirp4netns maps to the host's 127.0.0.1. *pasta*: nginx under unshare as in the "
        "nginx row, `pasta --config-net -f -t 127.0.0.1/H:80 -u none -T none -U none PID`, ADDR the "
        f"namespace's default gateway (copied from {NETNS}: {NETNS_ADDRS[0][2]}), which pasta maps to the "
        "host's loopback by default. " + why)
    L.append(
        "- **Goals** of handoff: iperf3 one stream, HTTP keep-alive, new connections and echo at 0.97× of "
        "direct loopback or better; on every throughput and rate row, a ratio above every peer's "
        "(rootlesskit with either port driver and pasta; `> peers`), checked against the peers that gave a "
        "figure; start-up with `--userns single` within 5 ms. With `--host-loopback` (issue 9): the "
        "proxy_pass chain at 0.90× of the same chain without namespaces or better and ahead of rootlesskit "
        "and pasta; start-up with `--userns single --host-loopback PORT` within 5 ms.")
    L.append(
        "- **Start-up**: wall time of `lowport run -p 0:80 -- true` (lowport handoff: the default "
        "`--forward auto`, which sets up the handoff, seccomp listener included, on this kernel; lowport "
        "relay: with `--forward relay`), `unshare -Urn true` (direct), and each peer's forwarding set-up "
        "with one published port and `-- true`, timed with `time.perf_counter` around the child's run in a "
        "Python process that already runs as the benchmark user. lowport's default `--userns auto` maps "
        "the user's subordinate ids through newuidmap/newgidmap when the user has ranges (the benchmark "
        "user does); `--userns single` is the one-id map: `lowport run --userns single -p 0:80 -- true`, "
        "and the same with `--forward relay`. Then `lowport run --userns single --host-loopback PORT -- "
        "true` (a free PORT, nothing listening on it) and `lowport run --userns single --net pasta -- "
        "true`, which starts pasta and waits for it; beside it pasta's own start-up as lowport starts it, "
        "on a namespace that exists already: for each run `unshare --user --map-root-user --net sleep` "
        "first, not timed, then the wall time of `" + " ".join(PASTA_ATTACH).replace("{pidfile}", "FILE")
        .replace("{pid}", "PID") + "`, whose first process returns once the namespace's interface is "
        "configured and leaves pasta running in the background (stopped after each run).")
    L.append(
        f"- **RSS**: {IDLE_CONNS} connections opened from Python to the published HTTP port, each having sent "
        "nothing; once the listener's accept queue is empty and the memory has settled, VmRSS from "
        "/proc/PID/status summed over the forwarder's processes: lowport itself; rootlesskit's parent and "
        "its child (plus slirp4netns with the slirp4netns port driver, which then carries the "
        "connections); pasta. With handoff and socket activation lowport holds no connection, so this is "
        "its idle size.")
    if notes:
        L.append("")
        L.append("## Notes from this run")
        L.append("")
        for n in notes:
            L.append(f"- {n}")
    L.append("")
    L.append("Run it again with `make bench` (as root it installs iperf3, wrk, rootlesskit, slirp4netns, "
             "passt and nginx-light, and runs everything as the unprivileged test user); `make bench BENCH_QUICK=1` is a "
             "short smoke run written under target/bench/, and `make bench BENCH_ONLY=proxy,startup` runs only "
             "those rows (also written there).")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def collect_notes(results, setups, tun, rows):
    notes = []
    if tun.note:
        notes.append(tun.note)
    for s in setups:
        res = results.get(s.key, {})
        if res.get("outlived"):
            names = ", ".join(sorted(set(res["outlived"])))
            notes.append(f"{s.label}: {len(res['outlived'])} process(es) ({names}) were still running after "
                         "the launcher exited on SIGTERM; the harness killed them.")
        for key, *_ in METRICS:
            r = res.get(key, {})
            if r.get("note") and (key not in ("startup", "rss") or "failed" in r["note"]):
                notes.append(f"{s.label}, {METRIC[key][1]}: {r['note']}")
            if key == "rss" and r.get("note") and ("+" in r["note"] or ";" in r["note"]):
                notes.append(f"{s.label}, RSS in MiB: {r['note']}")
    return notes


# --------------------------------------------------------------------------------------------------
# The chart


def draw_chart(data_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(data_path) as f:
        data = json.load(f)
    results, labels, info = data["results"], data["labels"], data["info"]
    ratio_metrics = data.get("ratio_metrics", RATIO_METRICS)
    order = [k for k in data["order"] if k != "direct" and "skipped" not in results.get(k, {})]
    colors = {"handoff": "#9467bd", "lowport": "#1f77b4", "lowport_nops": "#6baed6", "activation": "#08306b",
              "rk_builtin": "#ff7f0e", "rk_slirp": "#fdae6b", "pasta": "#2ca02c", "direct": "#7f7f7f"}
    fig = plt.figure(figsize=(13, 10.5))
    gs = fig.add_gridspec(2, 2, height_ratios=[1.35, 1])
    ax = fig.add_subplot(gs[0, :])
    base = results.get("direct", {})
    n = max(len(order), 1)
    width = 0.8 / n
    goal_marks = {("lowport", "iperf1"): 0.85, ("lowport", "keepalive"): 0.65, ("lowport", "newconn"): 0.60,
                  ("activation", "echo"): 0.97, ("activation", "keepalive"): 0.97,
                  ("activation", "newconn"): 0.97, ("handoff", "iperf1"): 0.97, ("handoff", "keepalive"): 0.97,
                  ("handoff", "newconn"): 0.97, ("handoff", "echo"): 0.97, ("handoff", "proxy"): 0.90}
    for i, key in enumerate(order):
        xs, ys = [], []
        for j, m in enumerate(ratio_metrics):
            r, b = results.get(key, {}).get(m, {}), base.get(m, {})
            if "value" in r and "value" in b and b["value"]:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["value"] / b["value"])
                g = goal_marks.get((key, m))
                if g:
                    ax.plot([xs[-1] - width / 2, xs[-1] + width / 2], [g, g], color="red", lw=2)
        ax.bar(xs, ys, width * 0.92, label=labels[key], color=colors.get(key))
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    short = {"proxy": "nginx proxy_pass,\nto a host app"}
    ax.set_xticks(range(len(ratio_metrics)))
    ax.set_xticklabels([short.get(m, METRIC[m][1].replace(", ", ",\n")) for m in ratio_metrics])
    ax.set_ylabel("ratio to direct loopback (higher is better)")
    top = max([1.0] + [p.get_height() for p in ax.patches])
    ax.set_ylim(0, top + 0.25)
    ax.set_title("Throughput and request rates, ratio to direct loopback (dashed line at 1); red: goals")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, ncol=min(len(order), 6),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)

    ax2 = fig.add_subplot(gs[1, 0])
    names, vals, cols = [], [], []
    for key in ["direct"] + order:
        for skey, mkey, lab in [(key, "startup", labels[key])] + STARTUP_EXTRA.get(key, []):
            r = results.get(skey, {}).get(mkey, {})
            if "value" in r:
                names.append(lab)
                vals.append(r["value"])
                cols.append(colors.get(skey))
    ax2.barh(names, vals, color=cols)
    ax2.set_xscale("log")
    ax2.invert_yaxis()
    for y, v in enumerate(vals):
        ax2.text(v * 1.05, y, f"{v:.1f} ms", va="center", fontsize=8)
    ax2.axvline(5, color="red", lw=1)
    ax2.set_xlim(min(vals + [1]) * 0.5, max(vals + [10]) * 4)
    ax2.set_title("Start-up of `-- true`, median ms, log scale (red: goal)", fontsize=10)
    ax2.tick_params(axis="y", labelsize=8)

    ax3 = fig.add_subplot(gs[1, 1])
    names, vals, cols = [], [], []
    for key in order:
        r = results.get(key, {}).get("rss", {})
        if "value" in r:
            names.append(labels[key])
            vals.append(r["value"])
            cols.append(colors.get(key))
    ax3.barh(names, vals, color=cols)
    ax3.invert_yaxis()
    for y, v in enumerate(vals):
        ax3.text(v + max(vals + [1]) * 0.01, y, f"{v:.1f} MiB", va="center", fontsize=8)
    ax3.axvline(8, color="red", lw=1)
    ax3.set_xlim(0, max(vals + [8]) * 1.25)
    ax3.set_title(f"Forwarder RSS, {IDLE_CONNS} idle connections, MiB (red: goal)", fontsize=10)
    ax3.tick_params(axis="y", labelsize=8)

    fig.suptitle(f"lowport benchmarks — {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, "
                 f"{info['date']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png_path, dpi=110)


def chart_python(install):
    """This interpreter or Debian's python3, whichever has matplotlib; with `install`, as root, installs
    python3-matplotlib when neither has it (before the run enters its network namespace, where no
    package can be fetched)."""
    candidates = [sys.executable]
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") and os.access("/usr/bin/python3", os.X_OK):
        candidates.append("/usr/bin/python3")

    def has_mpl(py):
        return subprocess.run([py, "-c", "import matplotlib"], capture_output=True, check=False).returncode == 0

    py = next((p for p in candidates if has_mpl(p)), None)
    if py is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing python3-matplotlib from Debian's packages for the chart")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "python3-matplotlib"],
                       env=env, stdout=subprocess.DEVNULL, check=False)
        py = next((p for p in candidates if has_mpl(p)), None)
    return py


def chart(data_path, png_path):
    """Draws with this interpreter's matplotlib, or Debian's python3 (python3-matplotlib); otherwise
    says why there is no chart."""
    py = chart_python(install=not os.environ.get("BENCH_IN_NETNS"))
    if py is None:
        log("no chart: matplotlib is missing (install python3-matplotlib: sudo apt install python3-matplotlib)")
        return False
    r = subprocess.run([py, os.path.abspath(__file__), "--chart", data_path, png_path], check=False)
    if r.returncode != 0:
        log("the chart could not be drawn (see above)")
        return False
    return True


# --------------------------------------------------------------------------------------------------


def shown(path):
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def interrupted(_signum, _frame):
    raise KeyboardInterrupt


def main():
    inside = os.environ.get("BENCH_IN_NETNS") == NETNS
    if inside and not in_test_netns():
        sys.exit(f"bench: BENCH_IN_NETNS={NETNS} is set, but this is not the network namespace {NETNS}")
    if not inside:
        ensure_packages()
    for prog in ("lowport", "demo-server"):
        if not os.access(os.path.join(RELEASE, prog), os.X_OK):
            sys.exit(f"bench: {RELEASE}/{prog} is missing; build first (make release, or make bench)")
    if not inside and os.geteuid() == 0:
        if not which("ip"):
            sys.exit("bench: ip (Debian package iproute2) is needed for the test network namespace")
        chart_python(install=True)
        try:
            sys.exit(run_in_test_netns())
        except RuntimeError as e:
            sys.exit(f"bench: cannot set up the test network namespace: {e}")
    # In lp-bench (or not root, on the host): a SIGTERM tidies up as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupted)
    out_dir = os.environ.get("BENCH_OUT") or (os.path.join(ROOT, "target", "bench") if QUICK or PARTIAL
                                               else os.path.join(ROOT, "docs"))
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.join(ROOT, "target", "bench")
    try:
        os.makedirs(data_dir, exist_ok=True)
        if not os.access(data_dir, os.W_OK):
            raise PermissionError(data_dir)
    except OSError:
        data_dir = out_dir

    work = tempfile.mkdtemp(prefix="lowport-bench.")
    os.chmod(work, 0o755)
    tun = None
    try:
        # Copies the benchmark user can read and run, wherever the checkout is.
        for prog in ("lowport", "demo-server"):
            shutil.copy2(os.path.join(RELEASE, prog), os.path.join(work, prog))
            os.chmod(os.path.join(work, prog), 0o755)
        shutil.copy2(os.path.abspath(__file__), os.path.join(work, "bench.py"))
        os.chmod(os.path.join(work, "bench.py"), 0o644)
        echo_lua = os.path.join(work, "echo.lua")
        with open(echo_lua, "w") as f:
            f.write('wrk.method = "POST"\n'
                    f'wrk.body = string.rep("x", {ECHO_BODY})\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        os.chmod(echo_lua, 0o644)
        # nginx's document root: the 1 KiB file and /healthz, which the readiness probe asks for.
        www = os.path.join(work, "nginx-www")
        os.mkdir(www, 0o755)
        os.mkdir(os.path.join(work, "nginx"), 0o755)
        for name, body in (("1k", b"x" * (NGINX_FILE - 1) + b"\n"), ("healthz", b"ok\n")):
            with open(os.path.join(www, name), "wb") as f:
                f.write(body)
            os.chmod(os.path.join(www, name), 0o644)

        runner = Runner(work)
        ctx = {"lowport": os.path.join(work, "lowport"), "demo": os.path.join(work, "demo-server"),
               "echo_lua": echo_lua, "netns": inside, "gateway": default_gateway4()}
        busy = cpu_busy(1.0)
        log(f"{'quick smoke run, ' if QUICK else ''}running every setup as {runner.name} (uid {runner.uid})"
            f"{' via setpriv' if runner.root else ''}; binaries copied to {work}")
        tun = TunAccess(runner)
        setups = [cls(ctx) for cls in SETUPS]
        raw = {}
        runnable = []
        for s in setups:
            why = s.missing()
            if why:
                log(f"{s.label}: skipped: {why}")
                raw[s.key] = {"skipped": why}
            else:
                runnable.append(s)
        for rnd in range(REPEAT):
            for s in runnable:
                try:
                    run_round(s, runner, raw, rnd, with_rss=rnd == REPEAT - 1)
                except Exception as e:  # noqa: BLE001 - keep going whatever one setup does
                    traceback.print_exc()
                    raw.setdefault(s.key, {})["harness_error"] = str(e)
        for s in runnable:
            if "startup" in ONLY:
                run_startup(s, runner, raw)
        results = summarize(raw)
        for key, res in results.items():
            if "harness_error" in res and not any("value" in v for v in res.values() if isinstance(v, dict)):
                res["skipped"] = f"harness error: {res['harness_error']}"

        info = machine_info(ctx, runner)
        info["busy"] = f"{busy:.0%}"
        info["network"] = (f"every setup ran in the test network namespace {NETNS} (a veth pair to {PEER_NETNS}, "
                           f"default routes via {NETNS_ADDRS[0][2]} and {NETNS_ADDRS[1][2]})" if inside else
                           "the machine's own (not run as root: no test network namespace, so nothing ran pasta)")
        rows = build_rows(results, setups)
        notes = collect_notes(results, setups, tun, rows)
        if busy > 0.15 or any(QUIET.values()):
            notes.insert(0, f"other work ran on the machine beside the benchmark (CPUs {busy:.0%} busy just before "
                            f"it started): {QUIET['waited']} measurement(s) waited for the CPUs to go idle "
                            f"({QUIET['busy']} gave up after 30 s), and {QUIET['disturbed']} were measured again "
                            "because other processes took more than 5% of the CPUs meanwhile "
                            f"({QUIET['disturbed_kept']} kept after three tries)")
        print()
        print(f"lowport benchmarks: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['date']}")
        print("peers: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + f"; lowport {info['lowport']}")
        print()
        print_table(rows)
        print()
        print(goal_summary(rows))
        print()
        for n in notes:
            print(f"note: {n}")

        md = os.path.join(out_dir, "benchmarks.md")
        png = os.path.join(out_dir, "benchmarks.png")
        data_path = os.path.join(data_dir, "results.json")
        with open(data_path, "w") as f:
            json.dump({"results": results, "info": info, "order": [s.key for s in setups],
                       "labels": {s.key: s.label for s in setups}, "quick": QUICK, "only": ONLY,
                       "ratio_metrics": RATIO_METRICS}, f, indent=1)
        write_markdown(md, rows, info, results, notes, os.path.basename(png))
        log(f"wrote {shown(md)} (raw figures: {shown(data_path)})")
        if chart(data_path, png):
            log(f"wrote {shown(png)}")
    finally:
        if tun:
            tun.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--startup-helper", "--attach-helper"):
        sep = sys.argv.index("--")
        helper = startup_helper if sys.argv[1] == "--startup-helper" else attach_helper
        helper(int(sys.argv[2]), int(sys.argv[3]), sys.argv[sep + 1:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--chart":
        draw_chart(sys.argv[2], sys.argv[3])
    else:
        try:
            main()
        except KeyboardInterrupt:
            # The launches and the namespaces are gone by now (finally blocks).
            log("interrupted")
            sys.exit(130)

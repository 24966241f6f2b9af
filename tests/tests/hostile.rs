//! Hardening (issue 7): a hostile server inside cannot reach lowport or its pid-1 helper, forwarded
//! signals reach a server that switched uid, the command gets the caller's limits and environment back,
//! and resource shortages end in a message rather than a panic.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;

use lowport_tests::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;

const PYTHON: &str = "/usr/bin/python3";

/// A child process killed (and reaped) when the test ends, however it ends. Its stdout and stderr,
/// when piped, are read by threads so that a process that keeps them open cannot hang the test.
struct Running {
    child: Child,
    out: Option<Receiver<String>>,
    err: Option<Receiver<String>>,
}

fn read_in_background(mut r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

impl Running {
    /// Spawns `cmd` with stdout and stderr piped; stdin is whatever `cmd` says (null by default).
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().map(read_in_background);
        let err = child.stderr.take().map(read_in_background);
        Running { child, out, err }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to [`PATIENCE`] for the exit; on time-out kills the process and fails the test.
    /// Returns the exit code, stdout and stderr.
    fn finish(mut self, what: &str) -> (i32, String, String) {
        let Some(status) = wait_with_deadline(&mut self.child, PATIENCE) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let err = self
                .err
                .take()
                .and_then(|rx| rx.recv_timeout(PATIENCE).ok())
                .unwrap_or_default();
            panic!("{what}: lowport did not exit within {PATIENCE:?}; stderr: {err}");
        };
        let collect = |rx: Option<Receiver<String>>, name: &str| {
            rx.map(|rx| {
                rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
                    panic!("{what}: lowport exited but its {name} stayed open: a process was left behind")
                })
            })
            .unwrap_or_default()
        };
        let out = collect(self.out.take(), "stdout");
        let err = collect(self.err.take(), "stderr");
        (exit_code(status), out, err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first host id of the test user's subordinate range in /etc/subuid (inside id 1).
fn subuid_start() -> u32 {
    let text = std::fs::read_to_string("/etc/subuid").unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{SUBID_USER}:")))
        .and_then(|l| l.split(':').nth(1)?.parse().ok())
        .expect("a range for the test user in /etc/subuid")
}

/// The host uid a process inside runs as: first field of `Uid:` in /proc/PID/status.
fn host_uid(pid: u32) -> Option<u32> {
    proc_status_field(pid, "Uid")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Each line of stderr that starts as lowport's own error messages do.
fn has_lowport_message(err: &str) -> bool {
    err.lines().any(|l| l.starts_with("lowport: "))
}

// --- 1. A hostile server inside ----------------------------------------------------------------

/// Run as the command: tries to take over the pid-1 helper and lowport, and prints one JSON line per
/// attempt. The first line names the host pids it aimed at.
const HOSTILE: &str = r#"
import ctypes, errno, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_PTRACE, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 101, 434, 438
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000

def report(attempt, result, err):
    print(json.dumps({"attempt": attempt, "ok": result >= 0,
                      "errno": 0 if result >= 0 else err}), flush=True)
    return result >= 0

def ppid(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])

# /proc is the host's procfs: /proc/self is this process's host pid, PPid is in host pids.
me = int(os.readlink("/proc/self"))
helper = ppid(me)
lowport = ppid(helper)
print(json.dumps({"me": me, "helper": helper, "lowport": lowport}), flush=True)

r = libc.syscall(SYS_PTRACE, PTRACE_ATTACH, 1, 0, 0)
if report("ptrace(PTRACE_ATTACH, 1)", r, ctypes.get_errno()):
    # Let the helper go again, so that lowport can still end.
    try:
        os.waitpid(1, WALL)
    except OSError:
        pass
    libc.syscall(SYS_PTRACE, PTRACE_DETACH, 1, 0, 0)

pidfd = libc.syscall(SYS_PIDFD_OPEN, 1, 0)
pidfd_errno = ctypes.get_errno()
for fd in range(11):
    if pidfd < 0:
        report("pidfd_getfd(pidfd_open(1) failed, %d)" % fd, -1, pidfd_errno)
        continue
    r = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if report("pidfd_getfd(pidfd_open(1), %d)" % fd, r, ctypes.get_errno()):
        os.close(r)

for name, pid in (("helper", helper), ("lowport", lowport)):
    try:
        os.close(os.open("/proc/%d/mem" % pid, os.O_RDWR))
        report("open /proc/%d/mem O_RDWR (%s)" % (pid, name), 0, 0)
    except OSError as e:
        report("open /proc/%d/mem O_RDWR (%s)" % (pid, name), -1, e.errno)
"#;

/// Runs the hostile script under `lowport` (already given its `run` options up to `--`) and checks
/// that every attempt failed for lack of permission.
fn hostile_server_gets_nothing(mut cmd: Command, tag: &str) {
    if !require(Path::new(PYTHON).exists(), "/usr/bin/python3") {
        return;
    }
    let dir = TempDir::new(tag, None);
    let script = dir.write("hostile.py", HOSTILE);
    cmd.arg(PYTHON).arg(&script);
    let run = Running::spawn(&mut cmd);
    let lowport_pid = run.pid();
    let (code, out, err) = run.finish("the hostile script");
    assert_eq!(
        code, 0,
        "the script itself must run to its end; stderr: {err}"
    );
    let mut lines = out.lines().map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("bad line {l:?} ({e}); stdout: {out}"))
    });
    let pids = lines.next().expect("the script's first line");
    assert_eq!(
        pids["lowport"], lowport_pid,
        "the script must aim at the real lowport: {pids}"
    );
    let attempts: Vec<serde_json::Value> = lines.collect();
    assert_eq!(attempts.len(), 1 + 11 + 2, "every attempt reported: {out}");
    let succeeded: Vec<&serde_json::Value> = attempts.iter().filter(|a| a["ok"] == true).collect();
    assert!(
        succeeded.is_empty(),
        "a server inside reached the helper or lowport: {succeeded:?}\n(helper and lowport must be non-dumpable; all attempts: {out})"
    );
    // A refusal, not an accident: EPERM or EACCES, or EBADF for a descriptor the helper does not hold
    // (the kernel checks the permission before it looks the descriptor up).
    for a in &attempts {
        let errno = a["errno"].as_i64().unwrap_or_default() as i32;
        let getfd = a["attempt"]
            .as_str()
            .unwrap_or_default()
            .starts_with("pidfd_getfd");
        assert!(
            errno == libc::EPERM || errno == libc::EACCES || (getfd && errno == libc::EBADF),
            "failed for another reason than a refused permission: {a}"
        );
    }
}

/// With `--userns single`, the server (root inside, the caller's uid outside) can neither ptrace the
/// pid-1 helper, nor take its descriptors with pidfd_getfd, nor open the helper's or lowport's memory.
#[test]
fn a_hostile_server_cannot_reach_the_helper_or_lowport_with_a_single_id() {
    let mut cmd = lowport();
    cmd.args(["run", "--userns", "single", "--"]);
    hostile_server_gets_nothing(cmd, "single");
}

/// The same with `--userns subids`, run by the test user that has subordinate ranges.
#[test]
fn a_hostile_server_cannot_reach_the_helper_or_lowport_with_subids() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    cmd.args(["run", "--userns", "subids", "--"]);
    hostile_server_gets_nothing(cmd, "subids");
}

// --- 2. Signals reach a command that switched uid ----------------------------------------------

/// SIGTERM sent to lowport reaches a command that switched to uid 33 inside (`--userns subids`):
/// lowport exits with 143 instead of waiting for ever, and the command is gone.
#[test]
fn sigterm_reaches_a_command_that_switched_uid() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    run_args(&mut cmd, &["--userns", "subids"])
        .args(["setpriv", "--reuid=33", "--regid=33", "--clear-groups"])
        .args(["sleep", "1000"]);
    let mut launch = Launch::start(cmd);
    let sleeper = launch.pid;
    // Only once the command runs as uid 33 does the signal test anything.
    let uid_33 = subuid_start() + 32;
    eventually("the command to switch to uid 33", || {
        (host_uid(sleeper)? == uid_33).then_some(())
    });
    launch.signal(Signal::SIGTERM);
    let status = wait_with_deadline(&mut launch.child, PATIENCE);
    let err = if status.is_some() {
        launch.stderr()
    } else {
        String::new()
    };
    let status = status.unwrap_or_else(|| {
        panic!(
            "lowport did not exit within {PATIENCE:?} of SIGTERM: the signal never reached the command running as uid 33"
        )
    });
    assert_eq!(exit_code(status), 143, "{err}");
    assert!(!err.contains("cannot pass"), "{err}");
    eventually("the command to be gone", || {
        (!process_exists(sleeper)).then_some(())
    });
}

/// A DNS query for test.lowport from 127.0.0.9 to 127.0.0.1:PORT (argv[1]), retried until answered;
/// prints the A record of the answer.
const DNS_QUERY: &str = r#"
import socket, struct, sys, time
port = int(sys.argv[1])
name = b"".join(bytes([len(p)]) + p for p in b"test.lowport".split(b"."))
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.9", 0))
s.settimeout(0.5)
deadline = time.time() + 20
while time.time() < deadline:
    s.sendto(q, ("127.0.0.1", port))
    try:
        r = s.recv(512)
    except socket.timeout:
        continue
    print(socket.inet_ntoa(r[-4:]))
    break
"#;

/// dnsmasq as packaged, in the foreground (`-k`): it binds UDP port 53 as root inside, switches to
/// nobody (another uid under `--userns subids`), answers a query through the UDP relay, and stops
/// when lowport gets SIGTERM.
#[test]
fn dnsmasq_switching_user_answers_and_stops_on_sigterm() {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/sbin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if !require(dnsmasq.is_some(), "dnsmasq (package dnsmasq)") {
        return;
    }
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    run_args(
        &mut cmd,
        &["--userns", "subids", "-p", "127.0.0.1:0:53/udp"],
    )
    .arg(dnsmasq.unwrap())
    .args([
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--port=53",
        "--listen-address=127.0.0.1",
        "--address=/test.lowport/192.0.2.77",
        "--pid-file",
        "--log-facility=-",
    ]);
    let mut launch = Launch::start(cmd);
    let dir = TempDir::new("dnsmasq", None);
    let query = dir.write("query.py", DNS_QUERY);
    let (code, out, err) = run_to_end(
        unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON))
            .arg(&query)
            .arg(launch.host_port().to_string()),
    );
    assert_eq!((code, out.trim()), (0, "192.0.2.77"), "{err}");
    let server = launch.pid;
    assert_ne!(
        host_uid(server),
        Some(uid),
        "dnsmasq switched to another uid than the caller's"
    );
    launch.signal(Signal::SIGTERM);
    let status = launch.wait();
    let stderr = launch.stderr();
    assert!(status.code().is_some(), "{stderr}");
    assert!(!process_exists(server), "dnsmasq is gone: {stderr}");
    assert!(!stderr.contains("cannot pass"), "{stderr}");
}

/// lighttpd as packaged: it binds port 80 as root inside, switches to www-data, serves a GET through
/// the relay, and stops when lowport gets SIGTERM.
#[test]
fn lighttpd_switching_to_www_data_serves_and_stops_on_sigterm() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let lighttpd = ["/usr/sbin/lighttpd", "/usr/bin/lighttpd"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let www = nix::unistd::User::from_name("www-data").ok().flatten();
    if !require(
        lighttpd.is_some() && www.is_some(),
        "lighttpd (package lighttpd) and the www-data user",
    ) {
        return;
    }
    let www_uid = www.unwrap().uid.as_raw();
    let dir = TempDir::new("lighttpd", None);
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::set_permissions(
        dir.path().join("www"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    dir.write("www/index.html", "served by lighttpd under lowport\n");
    let d = dir.path().display();
    // No server.errorlog: lighttpd keeps the stderr it was given (reopening /dev/stderr as root
    // inside is refused).
    let conf = dir.write(
        "lighttpd.conf",
        &format!(
            "server.port = 80\nserver.username = \"www-data\"\nserver.groupname = \"www-data\"\n\
             server.document-root = \"{d}/www\"\nserver.pid-file = \"{d}/lighttpd.pid\"\n\
             server.upload-dirs = ( \"{d}\" )\nindex-file.names = ( \"index.html\" )\n"
        ),
    );
    // lighttpd, root inside, writes its pid file here before it switches user.
    nix::unistd::chown(
        dir.path(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .unwrap();

    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    run_args(&mut cmd, &["--userns", "subids", "-p", "127.0.0.1:0:80"])
        .arg(lighttpd.unwrap())
        .args(["-D", "-f"])
        .arg(&conf);
    let mut launch = Launch::start(cmd);
    let body = eventually("lighttpd to answer", || {
        match http(launch.addr(), "GET", "/", b"") {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    });
    assert_eq!(
        String::from_utf8_lossy(&body),
        "served by lighttpd under lowport\n"
    );
    let server = launch.pid;
    let www_host_uid = subuid_start() + www_uid - 1;
    eventually("lighttpd to run as www-data", || {
        (host_uid(server)? == www_host_uid).then_some(())
    });
    launch.signal(Signal::SIGTERM);
    // lighttpd's own status is 0 as a rule (1 was seen once under load): only the prompt exit counts.
    assert!(
        wait_with_deadline(&mut launch.child, PATIENCE).is_some(),
        "lowport did not exit within {PATIENCE:?} of SIGTERM: the signal never reached lighttpd running as www-data"
    );
    let err = launch.stderr();
    assert!(!err.contains("cannot pass"), "{err}");
    assert!(!has_lowport_message(&err), "{err}");
    eventually("lighttpd to be gone", || {
        (!process_exists(server)).then_some(())
    });
}

// --- 3. The caller's soft open-file limit --------------------------------------------------------

/// lowport raises its own soft RLIMIT_NOFILE, but the command gets the caller's back: `ulimit -Sn`
/// says the same under lowport as without it.
#[test]
fn the_command_gets_the_callers_soft_open_file_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let hard = if is_root() { 20000 } else { hard.min(20000) };
    let soft = 1000;
    if !require(hard > soft, "an open-file hard limit above 1000") {
        return;
    }
    let limited = |cmd: &mut Command| {
        // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)
            });
        }
    };
    let mut plain = unprivileged_as(NOBODY, NOBODY, "/bin/sh".as_ref());
    plain.args(["-c", "ulimit -Sn"]);
    limited(&mut plain);
    let (code, without, err) = run_to_end(&mut plain);
    assert_eq!(code, 0, "{err}");
    assert_eq!(without.trim(), soft.to_string(), "the limit the caller set");

    let mut cmd = lowport();
    cmd.args(["run", "--", "sh", "-c", "ulimit -Sn"]);
    limited(&mut cmd);
    let (code, under, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        under.trim(),
        without.trim(),
        "the command's soft open-file limit under lowport"
    );
}

// --- 4. The whole environment with a setcap'd lowport ------------------------------------------

/// glibc's secure mode strips LD_LIBRARY_PATH, TMPDIR, TZDIR, LOCPATH, GCONV_PATH and RES_OPTIONS
/// from a binary with a file capability; the command must still get every one the caller set.
#[test]
fn a_setcap_lowport_passes_the_callers_whole_environment() {
    let Some((_dir, bin)) = setcap_copy("env") else {
        return;
    };
    let vars = [
        ("LD_LIBRARY_PATH", "/nonexistent/lowport-lib"),
        ("TMPDIR", "/nonexistent/lowport-tmp"),
        ("TZDIR", "/nonexistent/lowport-zoneinfo"),
        ("LOCPATH", "/nonexistent/lowport-locale"),
        ("GCONV_PATH", "/nonexistent/lowport-gconv"),
        ("RES_OPTIONS", "ndots:3"),
        ("LOWPORT_TEST_PLAIN", "kept"),
    ];
    let mut cmd = unprivileged_as(NOBODY, NOBODY, &bin);
    cmd.args(["run", "--", "env"]).envs(vars);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    let missing: Vec<String> = vars
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .filter(|kv| !out.lines().any(|l| l == kv))
        .collect();
    assert!(
        missing.is_empty(),
        "missing from the command's environment: {missing:?}\nenv: {out}"
    );
}

// --- 5. Empty command, inherited LISTEN_*, a command that daemonizes ---------------------------

/// An empty command name is a command that is not found: 127, as a shell says, not 126.
#[test]
fn an_empty_command_name_is_not_found() {
    let (code, _, err) = run_to_end(lowport().args(["run", "--", ""]));
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("command not found"), "{err}");
}

/// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES meant for lowport (from its own parent) never reach the
/// command, which would otherwise take descriptor 3 for a socket.
#[test]
fn inherited_listen_variables_do_not_reach_the_command() {
    let mut cmd = lowport();
    cmd.args(["run", "--", "env"]).envs([
        ("LISTEN_PID", "2"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_FDNAMES", "x"),
    ]);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    let leaked: Vec<&str> = out.lines().filter(|l| l.starts_with("LISTEN_")).collect();
    assert!(leaked.is_empty(), "reached the command: {leaked:?}");
}

/// A command that starts a background process and exits: lowport warns that it "left" processes and
/// to run it in the "foreground", exits with the command's status, and the background process is gone.
#[test]
fn a_command_that_daemonizes_is_warned_about_and_cleaned_up() {
    // A distinctive argument finds the background sleep among the host's processes.
    let tag = format!("1000.{}", std::process::id());
    let mut cmd = lowport();
    cmd.args(["run", "--", "sh", "-c"])
        .arg(format!("sleep {tag} & echo started; read _; exit 3"))
        .stdin(Stdio::piped());
    let mut run = Running::spawn(&mut cmd);
    let lowport_pid = run.pid();
    let stdin = run.child.stdin.take().unwrap();
    // The background sleep, found under lowport in the host's /proc, is the event to wait for.
    let sleeper = eventually("the background sleep to start", || {
        descendants(lowport_pid).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c == format!("sleep\0{tag}\0").as_bytes())
        })
    });
    // End of input: the shell's `read` returns and it exits 3, leaving the sleep behind.
    drop(stdin);
    let (code, out, err) = run.finish("a command that left a background process");
    assert_eq!(out, "started\n");
    assert_eq!(code, 3, "the command's own status; stderr: {err}");
    assert!(
        err.contains("left") && err.contains("foreground"),
        "a warning that the command left processes and should run in the foreground: {err:?}"
    );
    eventually("the background sleep to be gone", || {
        (!process_exists(sleeper)).then_some(())
    });
}

// --- 6. Socket activation with a port that needed the file capability --------------------------

/// `--socket-activation` would hand a port below ip_unprivileged_port_start, bound only thanks to the
/// file capability, to an arbitrary command: refused with status 2 before anything starts, for TCP and
/// for UDP.
#[test]
fn socket_activation_refuses_a_port_bound_with_the_file_capability() {
    let start = sysctl("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    if !require(start > 700, "a host where ports below 700 need privilege") {
        return;
    }
    let Some((_dir, bin)) = setcap_copy("activation") else {
        return;
    };
    let port = (700..start.min(1000) as u16)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok()
        })
        .expect("a free port between 700 and 1000");
    for publish in [
        format!("127.0.0.1:{port}:80"),
        format!("127.0.0.1:{port}:80/udp"),
    ] {
        let mut cmd = unprivileged_as(NOBODY, NOBODY, &bin);
        cmd.args(["run", "--socket-activation", "-p", &publish, "--"])
            .args(["sh", "-c", "echo started"]);
        let (code, out, err) = run_to_end(&mut cmd);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(code, 2, "-p {publish}: {err}");
        assert!(err.contains("--socket-activation"), "-p {publish}: {err}");
        assert!(err.contains(&port.to_string()), "-p {publish}: {err}");
        assert_eq!(out, "", "-p {publish}: the command must not start");
    }
}

// --- 7. Shortages end in a message, not a panic ------------------------------------------------

/// A uid with no passwd entry and no process, so that RLIMIT_NPROC counts only lowport's own threads
/// and processes (uid 65534 runs the other tests' processes in parallel).
fn unused_uid() -> u32 {
    let mut used = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(uid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse().ok())
            .and_then(host_uid)
        {
            used.insert(uid);
        }
    }
    (60000..65000)
        .find(|u| {
            !used.contains(u)
                && nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*u))
                    .ok()
                    .flatten()
                    .is_none()
        })
        .expect("an unused uid between 60000 and 65000")
}

/// With RLIMIT_NPROC too low for lowport's threads and processes, lowport either manages or ends with
/// a "lowport: " message and status 125 (or 2), never a panic (status 101).
#[test]
fn too_few_processes_is_a_message_not_a_panic() {
    if !require(is_root(), "root, to run lowport as a uid of its own") {
        return;
    }
    let uid = unused_uid();
    // Without -p, with a port to hand off (the host socket factory, the handoff thread), and with
    // a UDP port (the UDP relay's thread too).
    let publish = [None, Some("127.0.0.1:0:80"), Some("127.0.0.1:0:53/udp")];
    for (nproc, publish) in (1..=7u64).flat_map(|n| publish.map(|p| (n, p))) {
        let mut cmd = unprivileged_as(uid, uid, &lowport_bin());
        cmd.args(["run", "--userns", "single"]);
        if let Some(spec) = publish {
            cmd.args(["-p", spec]);
        }
        cmd.args(["--", "true"]);
        // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec; the limit
        // binds once setpriv has switched to `uid`.
        unsafe {
            cmd.pre_exec(move || {
                setrlimit(Resource::RLIMIT_NPROC, nproc, nproc).map_err(std::io::Error::from)
            });
        }
        let (code, _, err) = run_to_end(&mut cmd);
        assert!(!err.contains("panicked"), "nproc {nproc}: {err}");
        assert_ne!(code, 101, "nproc {nproc}: {err}");
        if code != 0 {
            assert!(
                code == 125 || code == 2,
                "nproc {nproc}: status {code}: {err}"
            );
            assert!(has_lowport_message(&err), "nproc {nproc}: {err}");
        }
        // Nothing of the run is left, not even a zombie: lowport reaps what it started, also when it
        // fails (an init that does not reap would keep them, counted against the limit).
        let left: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                proc_status_field(*pid, "Uid")
                    .is_some_and(|u| u.split_whitespace().next() == Some(&uid.to_string()))
            })
            .collect();
        assert!(
            left.is_empty(),
            "nproc {nproc}, -p {publish:?}: processes of uid {uid} left: {left:?}"
        );
    }
}

/// 55 published ports with 64 descriptors in all (soft and hard): a "lowport: " message and status
/// 125 or 2, never a panic.
#[test]
fn too_few_descriptors_for_the_ports_is_a_message_not_a_panic() {
    let mut cmd = lowport();
    cmd.arg("run");
    for port in 1001..=1055 {
        cmd.args(["-p", &format!("127.0.0.1:0:{port}")]);
    }
    cmd.args(["--", "true"]);
    // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| setrlimit(Resource::RLIMIT_NOFILE, 64, 64).map_err(std::io::Error::from));
    }
    let (code, _, err) = run_to_end(&mut cmd);
    assert!(!err.contains("panicked"), "{err}");
    assert!(code == 125 || code == 2, "status {code}: {err}");
    assert!(err.trim_start().starts_with("lowport: "), "{err}");
}

/// A command on the user's terminal cannot type into it (TIOCSTI, TIOCLINUX): what it pushed would be
/// read by the user's shell once lowport exits, outside every namespace. The terminal here is a pty
/// that the test makes the controlling terminal of lowport's session, as a login shell's is.
#[test]
fn the_command_cannot_type_into_the_users_terminal() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = pty.slave;
    let script = "import fcntl, termios, sys\n\
        try:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x'); print('injected')\n\
        except OSError as e: print('refused', e.errno)\n";
    let mut cmd = lowport();
    cmd.args(["run", "--userns", "single", "--", PYTHON, "-c", script]);
    let slave_fd = std::os::fd::AsRawFd::as_raw_fd(&slave);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, ioctl, dup2.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::unistd::dup2(slave_fd, 0)?;
            Ok(())
        });
    }
    let (code, out, err) = run_to_end(&mut cmd);
    drop(slave);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("refused {}", libc::EPERM),
        "TIOCSTI on the controlling terminal must fail with EPERM: {err}"
    );
}

/// Started from a script, the command shares the script's process group; `kill(0, ...)` from the
/// command must not reach the script or its other children. A `sleep` started by the same shell, in
/// the same group, stands for them.
#[test]
fn the_command_cannot_signal_the_callers_process_group() {
    let dir = TempDir::new("pgrp", None);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pidfile = dir.path().join("sleep.pid");
    let script = format!(
        "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {pid}; {lowport} run --userns single -- {py} -c 'import os, signal; os.kill(0, signal.SIGTERM)' </dev/null; echo lowport=$?",
        pid = pidfile.display(),
        lowport = lowport_bin().display(),
        py = PYTHON,
    );
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new("/bin/sh"));
    cmd.args(["-c", &script]).process_group(0);
    let (code, out, err) = run_to_end(&mut cmd);
    let sleep: u32 = std::fs::read_to_string(&pidfile)
        .expect("the shell wrote the sleep's pid")
        .trim()
        .parse()
        .unwrap();
    let alive = process_exists(sleep);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sleep as i32), Signal::SIGKILL);
    assert_eq!(code, 0, "the calling shell survived: {out} {err}");
    assert!(
        alive,
        "the sleep in the caller's process group was killed: {out} {err}"
    );
    assert!(
        out.contains("lowport=143"),
        "the command killed itself only: {out} {err}"
    );
}

/// Run as another program of the same user: starts the setcap'd lowport (argv[1]) publishing a
/// privileged port (argv[2]) again and again, and meanwhile tries pidfd_getfd on every descriptor of
/// lowport and of its children. Prints "stolen PORT" when it holds a socket bound to that port.
const THIEF: &str = r#"
import ctypes, os, socket, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
lowport, spec, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def family(pid):
    out = [pid]
    for p in out:
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                out += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out
for attempt in range(25):
    p = subprocess.Popen([lowport, "run", "--userns", "single", "-p", spec, "--", "/bin/sleep", "5"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 0.4
    while time.time() < deadline:
        for pid in family(p.pid):
            try:
                pfd = os.pidfd_open(pid)
            except OSError:
                continue
            for fd in range(3, 12):
                r = libc.syscall(438, pfd, fd, 0)
                if r < 0:
                    continue
                try:
                    s = socket.socket(fileno=r)
                    if s.getsockname()[1] == port:
                        print("stolen", port, "from", pid, flush=True)
                        p.kill(); p.wait(); sys.exit(0)
                    s.detach()
                except OSError:
                    pass
                os.close(r)
            os.close(pfd)
    p.kill(); p.wait()
print("nothing stolen")
"#;

/// A setcap'd lowport binds its privileged host port and must never let another program of the same
/// user take that socket (and send from port 700 with it): the process that holds it is never
/// dumpable, not even while the namespaces are set up. Before, lowport made itself dumpable to write
/// its id maps.
#[test]
fn a_setcap_lowport_never_lets_its_user_take_the_privileged_socket() {
    let start = sysctl("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    if !require(start > 700, "a host where ports below 700 need privilege") {
        return;
    }
    let Some((dir, bin)) = setcap_copy("thief") else {
        return;
    };
    let port = (700..start.min(1000) as u16)
        .rev()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port between 700 and 1000");
    let thief = dir.write("thief.py", THIEF);
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON));
    cmd.arg(&thief)
        .arg(&bin)
        .arg(format!("127.0.0.1:{port}:80"))
        .arg(port.to_string());
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "nothing stolen", "{err}");
}

/// Ctrl-C on the terminal lowport runs on reaches the command once: the terminal signals the whole
/// foreground group (lowport, its pid-1 helper and the command), and neither lowport nor the helper
/// may pass on a second copy.
#[test]
fn ctrl_c_on_a_terminal_reaches_the_command_once() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let (master, slave) = (pty.master, pty.slave);
    let script = "import signal, sys, time\n\
        count = 0\n\
        def on_int(sig, frame):\n    global count\n    count += 1\n\
        signal.signal(signal.SIGINT, on_int)\n\
        print('ready', flush=True)\n\
        while count == 0:\n    time.sleep(0.01)\n\
        time.sleep(1)\n\
        print('count', count, flush=True)\n";
    let mut cmd = lowport();
    cmd.args(["run", "--userns", "single", "--", PYTHON, "-c", script]);
    let slave_fd = std::os::fd::AsRawFd::as_raw_fd(&slave);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, ioctl, dup2.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in 0..=2 {
                nix::unistd::dup2(slave_fd, fd)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start lowport on the pty");
    drop(slave);
    let mut terminal = std::fs::File::from(master);
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        let mut terminal = terminal.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = terminal.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    eventually("the command to be ready", || {
        output.lock().unwrap().contains("ready").then_some(())
    });
    use std::io::Write as _;
    terminal.write_all(&[3]).expect("type Ctrl-C"); // VINTR
    let status = wait_with_deadline(&mut child, PATIENCE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = output.lock().unwrap().clone();
    drop(terminal);
    drop(reader);
    assert!(status.is_some(), "lowport did not exit: {text}");
    assert!(text.contains("count 1"), "SIGINT must arrive once: {text}");
}

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

# The command's /proc is a procfs of its own pid namespace, mounted by lowport's helper in the
# command's mount namespace. A hostile server is root there and unmounts it: below is the host's
# procfs, where /proc/self is this process's host pid and PPid is in host pids.
import subprocess
subprocess.run(["umount", "/proc"], check=True)
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

/// Descriptors the caller left open without close-on-exec (a CI runner's pipes, a shell's) do not
/// reach the command, where the server could use them to reach the caller's world: it gets 0, 1 and
/// 2 only. `--preserve-fds 2` passes on 3 and 4, and still not 200. A descriptor it names that is
/// not open, or that --ready-fd takes, is refused before anything starts.
#[test]
fn the_callers_descriptors_reach_the_command_only_when_preserved() {
    for (options, expected) in [
        (&[][..], ""),
        (&["--preserve-fds", "2"][..], "open 3\nopen 4\npassed\n"),
    ] {
        let mut cmd = lowport();
        cmd.arg("run")
            .args(options)
            .args(["--", "/bin/sh", "-c", DESCRIPTOR_PROBE]);
        let _writers = leave_descriptors_open(&mut cmd);
        let (code, out, err) = run_to_end(&mut cmd);
        assert_eq!((code, out.as_str()), (0, expected), "{options:?}: {err}");
    }
    for (options, says) in [
        (
            &["--preserve-fds", "3"][..],
            "--preserve-fds 3: descriptor 5 is not open",
        ),
        (
            &["--preserve-fds", "2", "--ready-fd", "4"][..],
            "--ready-fd 4 is among the descriptors --preserve-fds 2 passes on",
        ),
        (
            &[
                "--preserve-fds",
                "1",
                "--socket-activation",
                "-p",
                "127.0.0.1:0:80",
            ][..],
            "--preserve-fds 1 cannot be combined with --socket-activation",
        ),
    ] {
        let mut cmd = lowport();
        cmd.arg("run").args(options).args(["--", "true"]);
        let _writers = leave_descriptors_open(&mut cmd);
        let (code, _, err) = run_to_end(&mut cmd);
        assert_eq!(code, 2, "{options:?}: {err}");
        assert!(err.contains(says), "{options:?}: {err}");
    }
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
// --- 8. Host sockets the command holds reach nothing else on the host --------------------------

/// Run as the command, by mode (argv[1]; argv[2] the secret host port, argv[3] the allowed one):
/// binds the published port 80 as any server does, which lowport answers with a host socket, and
/// then tries to reach the host's loopback elsewhere with it, or to listen with a host socket. Each
/// attempt prints "WHAT: ok" or "WHAT: errno N"; a connection made prints "reached " and what the
/// service at the other end said.
const HOSTILE_CONNECT: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <linux/io_uring.h>

/* Each attempt prints "WHAT: ok" or "WHAT: errno N"; a connection that is made prints what the
   service at the other end said, as "reached BANNER". */

static int secret, allowed;

static void report(const char *what, long r, int err) {
    if (r >= 0) printf("%s: ok\n", what);
    else printf("%s: errno %d\n", what, err);
    fflush(stdout);
}
#define TRY(what, expr) ({ long r_ = (expr); int e_ = errno; report(what, r_, e_); errno = e_; r_; })

static void banner(int s) {
    char buf[64] = {0};
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (read(s, buf, sizeof buf - 1) > 0) {
        buf[strcspn(buf, "\n")] = 0;
        printf("reached %s\n", buf);
    } else {
        printf("reached nothing\n");
    }
    fflush(stdout);
}

static struct sockaddr_in loopback4(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* The published port 80 ([::]:80 for v6), as any server binds it: lowport hands it a host socket. */
static int published(int v6) {
    int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    int one = 1, zero = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(80)};
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(80)};
    if (v6) setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if ((v6 ? bind(s, (void *)&a6, sizeof a6) : bind(s, (void *)&a4, sizeof a4)) < 0 || listen(s, 8) < 0) {
        perror("bind 80");
        exit(2);
    }
    struct sockaddr_in6 got;
    socklen_t len = sizeof got;
    getsockname(s, (void *)&got, &len);
    printf("port 80 is %s\n", ntohs(got.sin6_port) == 80 ? "an inner socket" : "a host socket");
    fflush(stdout);
    return s;
}

/* A handed listener turned back into a plain socket. */
static int disconnected(int v6) {
    int s = published(v6);
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    TRY("connect(AF_UNSPEC)", connect(s, &unspec, sizeof unspec));
    return s;
}

static long int80(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory", "r8", "r9", "r10", "r11");
    return r;
}

/* One IORING_OP_CONNECT: its result, or minus the errno of the set-up. */
static int uring_connect(int fd, void *addr, unsigned len) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) return -1000 - errno;
    char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof *sqes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) return -1000 - errno;
    unsigned tail = *(unsigned *)(sq + p.sq_off.tail);
    unsigned i = tail & *(unsigned *)(sq + p.sq_off.ring_mask);
    memset(&sqes[i], 0, sizeof sqes[i]);
    sqes[i].opcode = IORING_OP_CONNECT;
    sqes[i].fd = fd;
    sqes[i].addr = (unsigned long)addr;
    sqes[i].off = len; /* addr2: the address length */
    ((unsigned *)(sq + p.sq_off.array))[i] = i;
    __atomic_store_n((unsigned *)(sq + p.sq_off.tail), tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) return -1000 - errno;
    unsigned head = *(unsigned *)(cq + p.cq_off.head);
    struct io_uring_cqe *cqes = (void *)(cq + p.cq_off.cqes);
    return cqes[head & *(unsigned *)(cq + p.cq_off.ring_mask)].res;
}

static volatile int stop;
static volatile unsigned short *port_word;
/* Flips the port of the address being connected to between the allowed and the secret one. */
static void *flip(void *arg) {
    (void)arg;
    while (!stop) {
        *port_word = htons(secret);
        for (volatile int i = 0; i < 50; i++) {}
        *port_word = htons(allowed);
        for (volatile int i = 0; i < 50; i++) {}
    }
    return NULL;
}

static int swap_a, swap_b, swap_at;
/* Puts a host socket and an inner one in turn at one descriptor number. */
static void *swapper(void *arg) {
    (void)arg;
    while (!stop) {
        dup2(swap_a, swap_at);
        dup2(swap_b, swap_at);
    }
    return NULL;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    const char *mode = argv[1];
    secret = atoi(argv[2]);
    allowed = argc > 3 ? atoi(argv[3]) : 0;
    struct sockaddr_in to_secret = loopback4(secret);
    if (!strcmp(mode, "unspec")) {
        int s = disconnected(0);
        if (TRY("connect to the secret port", connect(s, (void *)&to_secret, sizeof to_secret)) == 0) banner(s);
    } else if (!strcmp(mode, "shutdown")) {
        int s = published(0);
        TRY("shutdown(SHUT_RD) of the listener", shutdown(s, SHUT_RD));
        if (TRY("connect to the secret port", connect(s, (void *)&to_secret, sizeof to_secret)) == 0) banner(s);
    } else if (!strcmp(mode, "fastopen")) {
        int s = disconnected(0);
        if (TRY("sendto MSG_FASTOPEN", sendto(s, "x", 1, MSG_FASTOPEN, (void *)&to_secret, sizeof to_secret)) >= 0) banner(s);
        struct iovec iov = {"x", 1};
        struct msghdr m = {.msg_name = &to_secret, .msg_namelen = sizeof to_secret, .msg_iov = &iov, .msg_iovlen = 1};
        if (TRY("sendmsg MSG_FASTOPEN", sendmsg(s, &m, MSG_FASTOPEN)) >= 0) banner(s);
        struct mmsghdr mm = {.msg_hdr = m};
        if (TRY("sendmmsg MSG_FASTOPEN", sendmmsg(s, &mm, 1, MSG_FASTOPEN)) >= 0) banner(s);
        int one = 1;
        setsockopt(s, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &one, sizeof one);
        if (TRY("TCP_FASTOPEN_CONNECT then connect", connect(s, (void *)&to_secret, sizeof to_secret)) == 0) {
            TRY("write", write(s, "x", 1));
            banner(s);
        }
    } else if (!strcmp(mode, "nested")) {
        int s = disconnected(0);
        pid_t child = fork();
        if (child == 0) {
            TRY("unshare(CLONE_NEWUSER | CLONE_NEWNET)", unshare(CLONE_NEWUSER | CLONE_NEWNET));
            if (TRY("connect to the secret port from a nested namespace", connect(s, (void *)&to_secret, sizeof to_secret)) == 0) banner(s);
            _exit(0);
        }
        waitpid(child, NULL, 0);
    } else if (!strcmp(mode, "i386")) {
        int s = disconnected(0);
        /* The i386 system call ABI, from this 64-bit process: the address must be below 4 GiB. */
        struct sockaddr_in *low = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
        *low = to_secret;
        long r = int80(362 /* i386 connect */, s, (long)low, sizeof *low);
        report("i386 connect to the secret port", r < 0 ? -1 : 0, (int)-r);
        if (r == 0) banner(s);
    } else if (!strcmp(mode, "uring")) {
        int s = disconnected(0);
        int r = uring_connect(s, &to_secret, sizeof to_secret);
        if (r <= -1000) report("io_uring_setup", -1, -1000 - r);
        else report("IORING_OP_CONNECT to the secret port", r < 0 ? -1 : 0, -r);
        if (r == 0) banner(s);
    } else if (!strcmp(mode, "short-v6")) {
        int s = disconnected(1);
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(secret)};
        a.sin6_addr.s6_addr[15] = 1; /* ::1 */
        TRY("connect to [::1]:secret, 28 bytes", connect(s, (void *)&a, 28));
        /* The kernel takes a sockaddr_in6 without its scope id (RFC 2133's 24 bytes). */
        if (TRY("connect to [::1]:secret, 24 bytes", connect(s, (void *)&a, 24)) == 0) banner(s);
    } else if (!strcmp(mode, "exec-only")) {
        int s = disconnected(0);
        struct sockaddr_in *page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *page = to_secret;
        /* Execute-only with the default protection key: the kernel still reads the page for the
           process's own system calls, but process_vm_readv, which lowport reads addresses with,
           refuses a mapping without PROT_READ. */
        TRY("pkey_mprotect(PROT_EXEC, 0)", syscall(SYS_pkey_mprotect, page, 4096, PROT_EXEC, 0));
        if (TRY("connect to the secret port, the address execute-only", connect(s, (void *)page, sizeof *page)) == 0) banner(s);
    } else if (!strcmp(mode, "rewrite-host") || !strcmp(mode, "rewrite-inner")) {
        /* Connects to the allowed port while a thread rewrites the port to the secret one and back. */
        int host = !strcmp(mode, "rewrite-host");
        int s = host ? disconnected(0) : -1;
        struct sockaddr_in *addr = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *addr = loopback4(allowed);
        port_word = &addr->sin_port;
        pthread_t t;
        pthread_create(&t, NULL, flip, NULL);
        int reached_secret = 0, reached_allowed = 0, tries;
        for (tries = 0; tries < 400 && !reached_secret; tries++) {
            if (host) {
                struct sockaddr unspec = {.sa_family = AF_UNSPEC};
                connect(s, &unspec, sizeof unspec);
            } else {
                if (s >= 0) close(s);
                s = socket(AF_INET, SOCK_STREAM, 0);
            }
            if (connect(s, (void *)addr, sizeof *addr) != 0) continue;
            char buf[64] = {0};
            struct timeval tv = {5, 0};
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            if (read(s, buf, sizeof buf - 1) > 0) {
                if (!strncmp(buf, "secret", 6)) reached_secret++;
                else reached_allowed++;
            }
        }
        stop = 1;
        pthread_join(t, NULL);
        printf("%d tries: reached allowed %d times, secret %d times\n", tries, reached_allowed, reached_secret);
    } else if (!strcmp(mode, "swap")) {
        /* connect(N) to the secret port while a thread puts a host socket and an inner one at N in
           turn: lowport looks at one, the kernel may connect the other. */
        swap_a = disconnected(0);
        swap_b = socket(AF_INET, SOCK_STREAM, 0);
        swap_at = socket(AF_INET, SOCK_STREAM, 0);
        pthread_t t;
        pthread_create(&t, NULL, swapper, NULL);
        int eperm = 0, refused = 0, other = 0, tries, made = 0;
        for (tries = 0; tries < 3000 && !made; tries++) {
            if (connect(swap_at, (void *)&to_secret, sizeof to_secret) == 0) made = 1;
            else if (errno == EPERM) eperm++;
            else if (errno == ECONNREFUSED) refused++;
            else other++;
        }
        stop = 1;
        pthread_join(t, NULL);
        printf("%d tries: EPERM %d, ECONNREFUSED %d, other %d, connected %d\n", tries, eperm, refused, other, made);
        if (made) banner(swap_a);
    } else if (!strcmp(mode, "listen")) {
        /* A socket lowport connected to the allowed host service, turned back into a plain socket,
           then made a listener. */
        struct sockaddr_in to_allowed = loopback4(allowed);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (TRY("connect to the allowed port", connect(s, (void *)&to_allowed, sizeof to_allowed)) == 0) banner(s);
        /* Handed over, or relayed (the connect ran inside): the network namespace's cookie tells. */
        unsigned long long mine = 0, inner = 1;
        socklen_t clen = sizeof mine;
        int other = socket(AF_INET, SOCK_STREAM, 0);
        getsockopt(s, SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, &mine, &clen);
        clen = sizeof inner;
        getsockopt(other, SOL_SOCKET, 71, &inner, &clen);
        close(other);
        printf("the socket is %s\n", mine == inner ? "an inner socket" : "a host socket");
        struct sockaddr unspec = {.sa_family = AF_UNSPEC};
        TRY("connect(AF_UNSPEC)", connect(s, &unspec, sizeof unspec));
        if (TRY("listen", listen(s, 8)) == 0) {
            struct sockaddr_in me;
            socklen_t len = sizeof me;
            getsockname(s, (void *)&me, &len);
            printf("listening on %s:%d\n", inet_ntoa(me.sin_addr), ntohs(me.sin_port));
            fflush(stdout);
            struct timeval tv = {5, 0};
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            int c = accept(s, NULL, NULL);
            if (c >= 0) {
                write(c, "the server inside\n", 18);
                close(c);
            }
            report("accept", c, errno);
        }
    } else if (!strcmp(mode, "rebind")) {
        /* Closes the handed socket and binds port 80 again. */
        close(published(0));
        int s = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(80)};
        TRY("bind port 80 again", bind(s, (void *)&a, sizeof a));
    } else {
        return 64;
    }
    return 0;
}
"#;

/// The program of [`HOSTILE_CONNECT`], built once, beside the copies of lowport that uid 65534 can
/// run; `None` (after `require`) without gcc and the io_uring header.
fn hostile_connect() -> Option<std::path::PathBuf> {
    static BUILT: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let source = bin_dir().join("hostile_connect.c");
        let bin = bin_dir().join("hostile_connect");
        std::fs::write(&source, HOSTILE_CONNECT).unwrap();
        let ok = Command::new("gcc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&bin)
            .arg(&source)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| {
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
            bin
        })
    });
    require(
        built.is_some(),
        "gcc and the Linux io_uring header (linux/io_uring.h)",
    )
    .then(|| built.clone())?
}

/// A service of the user's on the host's loopback that answers every connection with `banner` and a
/// newline: on 127.0.0.1, and with `v6` also on [::1] with the same port. It serves until the tests
/// end.
fn host_service(banner: &'static str, v6: bool) -> u16 {
    use std::net::TcpListener;
    let serve = |listener: TcpListener| {
        std::thread::spawn(move || {
            for mut client in listener.incoming().flatten() {
                use std::io::Write;
                let _ = writeln!(client, "{banner}");
            }
        });
    };
    for _ in 0..100 {
        let v4 = TcpListener::bind(("127.0.0.1", 0)).expect("a port on 127.0.0.1");
        let port = v4.local_addr().unwrap().port();
        if v6 {
            let Ok(v6) = TcpListener::bind(("::1", port)) else {
                continue;
            };
            serve(v6);
        }
        serve(v4);
        return port;
    }
    panic!("no port free on both 127.0.0.1 and [::1]");
}

/// Runs [`HOSTILE_CONNECT`] in `mode` under lowport with `options`, and returns its output, once it
/// said that port 80 is a host socket (`None`, after `require`, where handoff cannot be used).
fn hostile_connect_run(options: &[&str], mode: &str, ports: &[u16]) -> Option<String> {
    let program = hostile_connect()?;
    let mut cmd = lowport();
    cmd.arg("run")
        .args(options)
        .arg("--")
        .arg(&program)
        .arg(mode);
    cmd.args(ports.iter().map(u16::to_string));
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{mode}: {out}\n{err}");
    let binds_80 = !matches!(mode, "listen" | "rewrite-inner");
    if binds_80
        && !require(
            out.contains("port 80 is a host socket"),
            "socket handoff (Linux 5.9), so that the command holds a host socket",
        )
    {
        return None;
    }
    Some(out)
}

/// A handed listener, turned back into a plain socket with connect(AF_UNSPEC) (or with
/// shutdown(SHUT_RD), which does the same to a listener), cannot connect to a service on the host's
/// loopback: EPERM.
#[test]
fn a_handed_socket_turned_back_into_a_plain_one_cannot_connect_to_the_host() {
    let secret = host_service("secret", false);
    for mode in ["unspec", "shutdown"] {
        let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], mode, &[secret]) else {
            return;
        };
        assert!(
            out.contains(&format!(
                "connect to the secret port: errno {}",
                libc::EPERM
            )),
            "{mode}: {out}"
        );
        assert!(!out.contains("reached"), "{mode}: {out}");
    }
}

/// A send with MSG_FASTOPEN connects too: sendto, sendmsg and sendmmsg with the flag, and a connect
/// after TCP_FASTOPEN_CONNECT, on a handed socket turned back into a plain one, fail with EPERM.
#[test]
fn a_handed_socket_cannot_fast_open_a_connection_to_the_host() {
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "fastopen", &[secret]) else {
        return;
    };
    for what in [
        "sendto MSG_FASTOPEN",
        "sendmsg MSG_FASTOPEN",
        "sendmmsg MSG_FASTOPEN",
        "TCP_FASTOPEN_CONNECT then connect",
    ] {
        assert!(
            out.contains(&format!("{what}: errno {}", libc::EPERM)),
            "{what}: {out}"
        );
    }
    assert!(!out.contains("reached"), "{out}");
}

/// A process of a namespace of its own (user and network) that holds a handed socket cannot connect
/// it to the host either.
#[test]
fn a_handed_socket_in_a_nested_namespace_cannot_connect_to_the_host() {
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "nested", &[secret]) else {
        return;
    };
    assert!(
        out.contains("unshare(CLONE_NEWUSER | CLONE_NEWNET): ok"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "connect to the secret port from a nested namespace: errno {}",
            libc::EPERM
        )),
        "{out}"
    );
    assert!(!out.contains("reached"), "{out}");
}

/// With --host-loopback ALLOWED, a connect to 127.0.0.1:ALLOWED gets a host socket that lowport
/// connected to the address it read once: a thread of the command that rewrites the port to another
/// host service's while the connect waits never reaches that service.
#[test]
fn a_rewritten_address_never_takes_a_connect_elsewhere_on_the_host() {
    let secret = host_service("secret", false);
    let allowed = host_service("allowed", false);
    let allowed_arg = allowed.to_string();
    let options = ["--host-loopback", &allowed_arg];
    let Some(out) = hostile_connect_run(&options, "rewrite-inner", &[secret, allowed]) else {
        return;
    };
    assert!(out.contains(", secret 0 times"), "{out}");
    assert!(!out.contains("reached allowed 0 times"), "{out}");
}

/// A connect lowport handed over, checked again as event loops do (connect() once more on the same
/// socket), gets what the kernel says without lowport: lowport makes the call itself on the host
/// socket, with the address it read, and lets none through.
#[test]
fn a_handed_connect_checked_again_behaves_as_without_lowport() {
    if !require(Path::new(PYTHON).exists(), "/usr/bin/python3") {
        return;
    }
    let allowed = host_service("allowed", false);
    let script = format!(
        "import errno, select, socket\n\
         name = lambda r: errno.errorcode.get(r, str(r))\n\
         s = socket.socket(); s.setblocking(False)\n\
         print('connect', name(s.connect_ex(('127.0.0.1', {allowed}))))\n\
         select.select([], [s], [], 5)\n\
         print('again', name(s.connect_ex(('127.0.0.1', {allowed}))))\n\
         print('and again', name(s.connect_ex(('127.0.0.1', {allowed}))))\n\
         s.setblocking(True); print('read', s.recv(64).decode().strip())\n"
    );
    let mut cmd = lowport();
    cmd.args(["run", "--host-loopback", &allowed.to_string(), "--"])
        .args([PYTHON, "-c", &script]);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{out}\n{err}");
    // The kernel: 0 or EINPROGRESS, then 0 once (the connect completed), then EISCONN.
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        matches!(lines.first(), Some(&"connect 0" | &"connect EINPROGRESS")),
        "{out}\n{err}"
    );
    assert_eq!(
        lines.get(1..),
        Some(&["again 0", "and again EISCONN", "read allowed"][..]),
        "{out}\n{err}"
    );
}

/// The same race on a handed listener turned back into a plain socket: its connect to the allowed
/// address must not become one to another host service.
#[test]
fn a_rewritten_address_cannot_take_a_handed_socket_elsewhere_on_the_host() {
    let secret = host_service("secret", false);
    let allowed = host_service("allowed", false);
    let allowed_arg = allowed.to_string();
    let options = ["-p", "127.0.0.1:0:80", "--host-loopback", &allowed_arg];
    let Some(out) = hostile_connect_run(&options, "rewrite-host", &[secret, allowed]) else {
        return;
    };
    assert!(out.contains(", secret 0 times"), "{out}");
}

/// A handed IPv6 socket, turned back into a plain one, connects with a 24-byte sockaddr_in6 (RFC
/// 2133's, without the scope id), which the kernel takes: it must be refused as the 28-byte one is.
#[test]
fn a_short_ipv6_address_cannot_take_a_handed_socket_to_the_host() {
    if !require(
        std::net::TcpListener::bind(("::1", 0)).is_ok(),
        "IPv6 on the host's loopback",
    ) {
        return;
    }
    let secret = host_service("secret", true);
    let Some(out) = hostile_connect_run(&["-p", "[::1]:0:80"], "short-v6", &[secret]) else {
        return;
    };
    assert!(
        out.contains(&format!(
            "connect to [::1]:secret, 28 bytes: errno {}",
            libc::EPERM
        )),
        "{out}"
    );
    assert!(!out.contains("reached secret"), "{out}");
}

/// An address lowport cannot read (on an execute-only page, which process_vm_readv refuses and the
/// kernel reads for the process itself) must not let a handed socket connect to the host.
#[cfg(target_arch = "x86_64")]
#[test]
fn an_address_lowport_cannot_read_cannot_take_a_handed_socket_to_the_host() {
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "exec-only", &[secret]) else {
        return;
    };
    assert!(out.contains("pkey_mprotect(PROT_EXEC, 0): ok"), "{out}");
    assert!(!out.contains("reached secret"), "{out}");
}

/// The i386 system call ABI, which a 64-bit program reaches with `int $0x80`, must not let a handed
/// socket connect to the host.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "known hole, in docs/security.md: the filter does not stop the i386 ABI's socket calls (a 64-bit program can make them with int $0x80); run it to see whether a change closes it"]
fn a_32_bit_connect_cannot_take_a_handed_socket_to_the_host() {
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "i386", &[secret]) else {
        return;
    };
    if !require(
        !out.contains(&format!("errno {}", libc::ENOSYS)),
        "the i386 system call ABI (CONFIG_IA32_EMULATION)",
    ) {
        return;
    }
    assert!(!out.contains("reached secret"), "{out}");
}

/// io_uring's IORING_OP_CONNECT never meets seccomp: it must not let a handed socket connect to the
/// host either.
#[test]
#[ignore = "known hole, in docs/security.md: io_uring never meets seccomp; run it to see whether a change closes it"]
fn an_io_uring_connect_cannot_take_a_handed_socket_to_the_host() {
    let disabled = sysctl("kernel/io_uring_disabled").unwrap_or(0);
    if !require(
        disabled == 0,
        &format!("io_uring open to unprivileged processes (sysctl kernel.io_uring_disabled is {disabled})"),
    ) {
        return;
    }
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "uring", &[secret]) else {
        return;
    };
    if !require(
        !out.contains("io_uring_setup: errno"),
        "io_uring_setup to work for the command",
    ) {
        return;
    }
    assert!(!out.contains("reached secret"), "{out}");
}

/// A connect on a descriptor number where another thread puts a host socket and an inner one in turn:
/// what lowport inspected must be what the kernel connects.
#[test]
#[ignore = "known hole, in docs/security.md: a connect lowport lets through is looked up again by the kernel, and another thread can swap the descriptor in between; run it to see whether a change closes it"]
fn a_swapped_descriptor_cannot_take_a_handed_socket_to_the_host() {
    let secret = host_service("secret", false);
    let Some(out) = hostile_connect_run(&["-p", "127.0.0.1:0:80"], "swap", &[secret]) else {
        return;
    };
    assert!(out.contains(", connected 0"), "{out}");
    assert!(!out.contains("reached secret"), "{out}");
}

/// A socket that lowport connected to a --host-loopback service, turned back into a plain socket,
/// must not become a listener on the host: it is bound to a host port of lowport's choice, on every
/// address.
#[test]
#[ignore = "known hole, in docs/security.md: listen() is not stopped (stopping it makes it fail with EINTR under signals); a socket lowport connected can listen on the host's loopback; run it to see whether a change closes it"]
fn a_socket_connected_to_a_host_service_cannot_listen_on_the_host() {
    let Some(program) = hostile_connect() else {
        return;
    };
    let allowed = host_service("allowed", false);
    let mut cmd = lowport();
    cmd.args(["run", "--host-loopback", &allowed.to_string(), "--"])
        .arg(&program)
        .args(["listen", "0", &allowed.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn lowport");
    let err = read_in_background(child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut out = String::new();
    let mut reached = None;
    while let Ok(line) = lines.recv_timeout(PATIENCE) {
        out.push_str(&line);
        out.push('\n');
        if let Some(port) = line
            .strip_prefix("listening on ")
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
        {
            // The listener is a host one if a client on the host's loopback gets the server's line.
            reached = std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .and_then(|mut s| {
                    s.set_read_timeout(Some(PATIENCE)).ok()?;
                    let mut text = String::new();
                    s.read_to_string(&mut text).ok()?;
                    Some((port, text))
                });
        }
    }
    let status = wait_with_deadline(&mut child, PATIENCE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = err.recv_timeout(PATIENCE).unwrap_or_default();
    assert!(
        out.contains("connect to the allowed port: ok") && out.contains("reached allowed"),
        "the command must reach the allowed service: {out}\n{err}"
    );
    assert!(
        reached.is_none(),
        "a client on the host reached the command on host port {:?}: {out}\n{err}",
        reached
    );
}

/// The listener of [`a_socket_connected_to_a_host_service_cannot_listen_on_the_host`], where the
/// command still gets one, is at least on the host's loopback only: lowport binds a socket it connects
/// to a host loopback service to a loopback address, so that no other machine reaches the command.
#[test]
fn a_socket_connected_to_a_host_service_never_listens_on_every_host_address() {
    let allowed = host_service("allowed", false);
    let allowed_arg = allowed.to_string();
    // A connect that takes longer than lowport waits for is relayed instead (under load): again.
    for _ in 0..5 {
        let Some(out) =
            hostile_connect_run(&["--host-loopback", &allowed_arg], "listen", &[0, allowed])
        else {
            return;
        };
        assert!(out.contains("reached allowed"), "{out}");
        if !out.contains("the socket is a host socket") {
            continue;
        }
        assert!(
            !out.contains("listening on 0.0.0.0:"),
            "the command listens on every address of the host: {out}"
        );
        return;
    }
    panic!("the connect to the allowed port was relayed five times out of five");
}

/// With --host-loopback, lowport's handoff thread, which stops the relay of a port when the server
/// binds it, must not die doing so: many runs at once, each binding port 80, then trying a connect
/// (refused). Its thread once had a descriptor table of its own, and woke tokio's runtime through a
/// descriptor number of that table (EPIPE or EBADF, a panic); the command's binds and connects then
/// failed or hung. A race (whether lowport's runtime existed when the thread copied the table): on
/// that code, a few runs in a hundred panicked here, so this test fails only now and then.
#[test]
fn the_handoff_thread_survives_binds_under_load_with_host_loopback() {
    let secret = host_service("secret", false);
    let allowed = host_service("allowed", false);
    if hostile_connect().is_none() {
        return;
    }
    let runs: Vec<_> = (0..24)
        .map(|_| {
            std::thread::spawn(move || {
                let program = hostile_connect().expect("built above");
                let mut cmd = lowport();
                cmd.args(["run", "-p", "127.0.0.1:0:80", "--host-loopback"])
                    .arg(allowed.to_string())
                    .arg("--")
                    .arg(program)
                    .args(["unspec", &secret.to_string()]);
                run_to_end(&mut cmd)
            })
        })
        .collect();
    for run in runs {
        let (code, out, err) = run.join().unwrap();
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(
            out.contains(&format!(
                "connect to the secret port: errno {}",
                libc::EPERM
            )),
            "{out}\n{err}"
        );
    }
}

/// With --host-loopback, a server that closes the socket it was handed and binds port 80 again gets
/// the host port again, as without it: lowport keeps no copy of a socket it handed over.
#[test]
fn a_handed_socket_closed_by_the_server_is_free_again_with_host_loopback() {
    let allowed = host_service("allowed", false);
    let allowed_arg = allowed.to_string();
    let options = ["-p", "127.0.0.1:0:80", "--host-loopback", &allowed_arg];
    let Some(out) = hostile_connect_run(&options, "rebind", &[0]) else {
        return;
    };
    assert!(
        out.contains("bind port 80 again: ok"),
        "the second bind must get the host port again: {out}"
    );
}

//! Named instances and a private /proc: `lowport ps`, `exec`, `stop` and `port`, all as the
//! unprivileged user who started the instance, each test with its own XDG_RUNTIME_DIR.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lowport_tests::*;

/// An XDG_RUNTIME_DIR of 65534's own, as a login session would give it.
struct Runtime(TempDir);

impl Runtime {
    fn new(tag: &str) -> Runtime {
        let dir = TempDir::new(tag, Some((NOBODY, NOBODY)));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        Runtime(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// `lowport ARGS` as 65534 with this runtime directory.
    fn lowport(&self, args: &[&str]) -> Command {
        let mut cmd = lowport();
        cmd.env("XDG_RUNTIME_DIR", self.path()).args(args);
        cmd
    }

    /// Runs `lowport ARGS` to the end: (status, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        run_to_end(&mut self.lowport(args))
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.path().join("lowport").join(name)
    }
}

fn python() -> &'static str {
    "/usr/bin/python3"
}

/// `lowport run --name NAME OPTIONS --ready-fd 3 -- python3 -m http.server 80`, ready.
fn start_http(rt: &Runtime, name: &str, options: &[&str]) -> Launch {
    let mut cmd = rt.lowport(&["run", "--name", name, "-p", "127.0.0.1:0:80"]);
    cmd.args(options)
        .args(["--ready-fd", "3", "--", python(), "-m", "http.server", "80"])
        .current_dir("/");
    let launch = Launch::start(cmd);
    eventually("the server to answer", || {
        matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))).then_some(())
    });
    launch
}

#[test]
fn ps_lists_a_named_instance_and_forgets_it_when_it_ends() {
    let rt = Runtime::new("inst-ps");
    let mut launch = start_http(&rt, "web", &["--forward", "relay"]);
    let (code, out, err) = rt.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no line for web in:\n{out}"));
    assert!(line.contains(&launch.child.id().to_string()), "{line}");
    assert!(
        line.contains(&format!("127.0.0.1:{}->80/tcp (relay)", launch.host_port())),
        "{line}"
    );
    assert!(line.contains("http.server"), "{line}");
    let (_, json, _) = rt.run(&["ps", "--json"]);
    let states: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(states[0]["name"], "web");
    assert_eq!(states[0]["pid"], launch.child.id());
    assert_eq!(states[0]["ports"][0]["host_port"], launch.host_port());
    // Only the user may enter the state directory.
    let meta = fs::metadata(rt.instance_dir("web")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);

    launch.signal(nix::sys::signal::Signal::SIGTERM);
    launch.wait();
    assert!(
        !rt.instance_dir("web").exists(),
        "the state directory outlived lowport"
    );
    let (_, out, _) = rt.run(&["ps"]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn a_killed_instance_is_cleaned_up_and_its_name_is_free_again() {
    let rt = Runtime::new("inst-kill");
    let mut launch = start_http(&rt, "web", &[]);
    launch.signal(nix::sys::signal::Signal::SIGKILL);
    launch.wait();
    assert!(rt.instance_dir("web").join("state.json").exists());
    let (code, out, _) = rt.run(&["ps"]);
    assert_eq!(code, 0);
    assert!(!out.contains("web"), "a dead instance is listed:\n{out}");
    assert!(
        !rt.instance_dir("web").exists(),
        "ps left the stale directory"
    );
    let _again = start_http(&rt, "web", &[]);
}

#[test]
fn names_are_unique_and_derived_from_the_command() {
    let rt = Runtime::new("inst-names");
    let _web = start_http(&rt, "web", &[]);
    let (code, _, err) = rt.run(&["run", "--name", "web", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("an instance named 'web' is already running")
            && err.contains("lowport stop web"),
        "{err}"
    );
    let (code, _, err) = rt.run(&["run", "--name", "../x", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a valid name"), "{err}");

    // Without --name: the program's name, then -2.
    let mut cmd = rt.lowport(&["run", "--ready-fd", "3", "--", "/bin/sleep", "30"]);
    cmd.current_dir("/");
    let _first = Launch::start(cmd);
    let mut cmd = rt.lowport(&["run", "--ready-fd", "3", "--", "/bin/sleep", "30"]);
    cmd.current_dir("/");
    let _second = Launch::start(cmd);
    let (_, out, _) = rt.run(&["ps"]);
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["sleep", "sleep-2", "web"], "{out}");
}

#[test]
fn ps_inside_lists_only_the_commands_processes() {
    let (code, out, err) =
        run_to_end(lowport().args(["run", "--", "/bin/ps", "-e", "-o", "pid=,comm="]));
    assert_eq!(code, 0, "{err}");
    let procs: Vec<(u32, String)> = out
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // pid 1 is lowport's helper, pid 2 the command; nothing of the host.
    assert_eq!(procs.len(), 2, "{out}");
    assert_eq!(procs[0].0, 1);
    assert_eq!(procs[1], (2, "ps".to_owned()));
    assert!(!err.contains("private /proc"), "{err}");
    // /proc/<getpid()> is the process itself, and /proc/1 is not the host's init.
    let (code, out, err) = run_to_end(lowport().args([
        "run",
        "--",
        "/bin/sh",
        "-c",
        "echo $$; cat /proc/$$/comm; cat /proc/1/cmdline | tr '\\0' ' '",
    ]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "{out}");
    assert_eq!(lines[1], "sh", "{out}");
    assert!(lines[2].contains("lowport"), "{out}");
    // Nothing changed on the host's side: its /proc is still the host's.
    assert!(Path::new(&format!("/proc/{}", std::process::id())).exists());
}

#[test]
fn exec_runs_a_command_in_the_namespaces_as_root() {
    let rt = Runtime::new("inst-exec");
    let launch = start_http(&rt, "web", &["--forward", "relay"]);
    assert!(
        launch.ready_line.contains("\"relay\""),
        "{}",
        launch.ready_line
    );
    let (code, out, err) = rt.run(&[
        "exec",
        "web",
        "--",
        "/bin/sh",
        "-c",
        "id -u; cat /proc/sys/net/ipv4/ip_unprivileged_port_start; ps -e -o comm= | sort | tr '\\n' ' '",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    assert_eq!(lines[1], "0", "{out}");
    // The instance's pid namespace and private /proc: its processes, and the exec'd ones.
    assert!(
        lines[2].contains("python3") && lines[2].contains("lowport"),
        "{out}"
    );
    assert!(
        !lines[2].contains("cargo"),
        "the host's processes show: {out}"
    );
    // The server on its inner port, from inside.
    let script =
        "import urllib.request,sys; print(urllib.request.urlopen('http://127.0.0.1:80/').status)";
    let (code, out, err) = rt.run(&["exec", "web", "--", python(), "-c", script]);
    assert_eq!((code, out.trim()), (0, "200"), "{err}");
    // The command's own status comes back.
    let (code, _, _) = rt.run(&["exec", "web", "--", "/bin/sh", "-c", "exit 7"]);
    assert_eq!(code, 7);
    let (code, _, err) = rt.run(&["exec", "web", "--", "/nonexistent"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("command not found"), "{err}");
    let (code, _, err) = rt.run(&["exec", "nope", "--", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no instance named 'nope'") && err.contains("web"),
        "{err}"
    );
    drop(launch);
}

/// The command of `lowport exec` gets none of the descriptors its caller left open (the server may
/// trace it once it runs, and take them), but those `--preserve-fds` names.
#[test]
fn exec_passes_on_only_the_descriptors_asked_for() {
    let rt = Runtime::new("inst-fds");
    let launch = start_http(&rt, "web", &[]);
    for (options, expected) in [
        (&[][..], ""),
        (&["--preserve-fds", "1"][..], "open 3\npassed\n"),
    ] {
        let mut cmd = rt.lowport(&["exec"]);
        cmd.args(options)
            .args(["web", "--", "/bin/sh", "-c", DESCRIPTOR_PROBE]);
        let _writers = leave_descriptors_open(&mut cmd);
        let (code, out, err) = run_to_end(&mut cmd);
        assert_eq!((code, out.as_str()), (0, expected), "{options:?}: {err}");
    }
    let mut cmd = rt.lowport(&["exec", "--preserve-fds", "3", "web", "--", "true"]);
    let _writers = leave_descriptors_open(&mut cmd);
    let (code, _, err) = run_to_end(&mut cmd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("descriptor 5 is not open"), "{err}");
    drop(launch);
}

/// Where close_range(2) cannot mark descriptors close-on-exec (Linux before 5.11, or a seccomp
/// profile that refuses it), lowport marks each that /proc/self/fd lists: strace makes the call fail
/// with ENOSYS and with EPERM, and the commands of `run` and of `exec` (which reads /proc before it
/// joins the instance's namespaces) still get none of the descriptors left open.
#[test]
fn without_close_range_the_command_still_gets_no_descriptor_left_open() {
    let strace = tool(&["/usr/bin/strace", "/bin/strace"]);
    if !require(strace.is_some(), "strace") {
        return;
    }
    let rt = Runtime::new("inst-noclose");
    let launch = start_http(&rt, "web", &[]);
    let trace = rt.path().join("trace");
    for errno in ["ENOSYS", "EPERM"] {
        for args in [
            &["run", "--", "/bin/sh", "-c", DESCRIPTOR_PROBE][..],
            &["exec", "web", "--", "/bin/sh", "-c", DESCRIPTOR_PROBE][..],
        ] {
            let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(strace.unwrap()));
            cmd.env("XDG_RUNTIME_DIR", rt.path())
                .args(["-f", "-qq", "-e", "trace=close_range", "-o"])
                .arg(&trace)
                .arg("-e")
                .arg(format!("inject=close_range:error={errno}"))
                .arg(lowport_bin())
                .args(args);
            let _left_open = leave_descriptors_open(&mut cmd);
            let (code, out, err) = run_to_end(&mut cmd);
            let traced = fs::read_to_string(&trace).unwrap_or_default();
            assert!(
                traced.contains("(INJECTED)"),
                "{errno} {args:?}: close_range was not made to fail: {traced}"
            );
            assert_eq!((code, out.as_str()), (0, ""), "{errno} {args:?}: {err}");
        }
    }
    drop(launch);
}

/// With handoff the server listens on the host's socket, not on its port inside; lowport mirrors
/// the port on loopback inside, so clients there reach it. A port added later could reach the
/// server only from the host's loopback, and would show every client as 127.0.0.1: refused.
#[test]
fn a_handed_port_is_reachable_inside_and_cannot_be_added_to() {
    let rt = Runtime::new("inst-mirror");
    let launch = start_http(&rt, "web", &["--forward", "handoff"]);
    assert!(
        launch.ready_line.contains("\"handoff\""),
        "{}",
        launch.ready_line
    );
    let script =
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:80/').status)";
    let (code, out, err) = rt.run(&["exec", "web", "--", python(), "-c", script]);
    assert_eq!((code, out.trim()), (0, "200"), "{err}");
    let (code, _, err) = rt.run(&["port", "add", "web", "127.0.0.1:0:80"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("would show every client as 127.0.0.1"),
        "{err}"
    );
    let (_, ps, _) = rt.run(&["ps"]);
    assert_eq!(ps.matches("->80/tcp").count(), 1, "{ps}");
    // The server's own socket is still the host's, and serves.
    assert!(matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))));
}

#[test]
fn exec_reloads_nginx_through_its_pid_file() {
    if !require(nginx_bin().is_some(), "nginx (apt-get install nginx-light)") {
        return;
    }
    let rt = Runtime::new("inst-nginx");
    let dir = TempDir::new("inst-nginx-conf", Some((NOBODY, NOBODY)));
    let conf = NginxConf {
        workers: 1,
        user: "root root",
        log_level: "notice",
        http: "access_log off;",
        server: "listen 80; location / { return 200 \"hello\\n\"; }",
    };
    dir.write("nginx.conf", &conf.text(dir.path()));
    let mut cmd = rt.lowport(&[
        "run",
        "--name",
        "web",
        "-p",
        "127.0.0.1:0:80",
        "--ready-fd",
        "3",
        "--",
    ]);
    cmd.args(nginx_command(&dir)).current_dir("/");
    let mut launch = Launch::start(cmd);
    eventually("nginx to answer", || {
        matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))).then_some(())
    });
    let pid_file = fs::read_to_string(dir.path().join("nginx.pid")).unwrap();
    // The pid file holds nginx's pid in its own namespace.
    assert_eq!(pid_file.trim(), "2");
    let mut reload = rt.lowport(&["exec", "web", "--"]);
    reload.args(nginx_command(&dir)).args(["-s", "reload"]);
    let (code, _, err) = run_to_end(&mut reload);
    assert_eq!(code, 0, "nginx -s reload failed: {err}");
    eventually("nginx to answer after the reload", || {
        matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))).then_some(())
    });
    launch.signal(nix::sys::signal::Signal::SIGTERM);
    launch.wait();
    let err = launch.stderr();
    assert!(
        err.contains("signal 1 (SIGHUP) received"),
        "no reload in nginx's log:\n{err}"
    );
}

#[test]
fn port_add_publishes_a_new_port_and_rm_withdraws_it() {
    let rt = Runtime::new("inst-port");
    let launch = start_http(&rt, "web", &["--forward", "relay"]);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let spec = format!("127.0.0.1:{port}:80");
    let (code, out, err) = rt.run(&["port", "add", "web", &spec]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("127.0.0.1:{port}->80/tcp (relay)")),
        "{out}"
    );
    let added: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, _) = http(added, "GET", "/", b"").expect("the added port answers");
    assert_eq!(status, 200);
    let (_, ps, _) = rt.run(&["ps"]);
    assert!(ps.contains(&format!("127.0.0.1:{port}->80/tcp")), "{ps}");

    // The same host port again: in use.
    let (code, _, err) = rt.run(&["port", "add", "web", &spec]);
    assert_ne!(code, 0);
    assert!(err.contains("already in use"), "{err}");

    let (code, out, err) = rt.run(&["port", "rm", "web", &format!("{port}")]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(&format!(":{port}->")), "{out}");
    eventually("the removed port to refuse", || {
        std::net::TcpStream::connect_timeout(&added, Duration::from_secs(1))
            .is_err()
            .then_some(())
    });
    // Removed, the host port is free again, for anyone.
    eventually("the removed port to be free", || {
        std::net::TcpListener::bind(added).ok().map(drop)
    });
    // The first port still works.
    assert!(matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))));
    let (code, _, err) = rt.run(&["port", "rm", "web", &format!("{port}")]);
    assert_eq!(code, 1);
    assert!(err.contains("no published port matches"), "{err}");
    let (code, _, err) = rt.run(&["port", "add", "web", "nonsense"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn stop_stops_the_command_and_waits_for_lowport() {
    let rt = Runtime::new("inst-stop");
    let mut launch = start_http(&rt, "web", &[]);
    let (code, _, err) = rt.run(&["stop", "web"]);
    assert_eq!(code, 0, "{err}");
    // stop returned only once lowport had exited: no waiting here.
    let status = launch.child.try_wait().unwrap();
    let status = status.unwrap_or_else(|| {
        // The zombie is reaped by this test, so try_wait may need an instant.
        launch.wait()
    });
    assert_eq!(exit_code(status), 128 + 15, "python3 dies of the SIGTERM");
    assert!(!rt.instance_dir("web").exists());
    let (code, _, err) = rt.run(&["stop", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("no instance named 'web'"), "{err}");
}

#[test]
fn stop_kills_an_instance_whose_command_ignores_sigterm() {
    let rt = Runtime::new("inst-stubborn");
    let mut cmd = rt.lowport(&[
        "run",
        "--name",
        "stubborn",
        "--ready-fd",
        "3",
        "--",
        "/bin/sh",
        "-c",
        "trap '' TERM; while :; do sleep 0.1; done",
    ]);
    cmd.current_dir("/");
    let mut launch = Launch::start(cmd);
    let (code, _, err) = rt.run(&["stop", "--time", "1", "stubborn"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("did not stop within 1 s") && err.contains("killed"),
        "{err}"
    );
    let status = launch.wait();
    assert_eq!(exit_code(status), 128 + 9);
}

#[test]
fn another_user_cannot_reach_an_instance() {
    if !require(is_root(), "root, to play another user") {
        return;
    }
    let rt = Runtime::new("inst-other");
    let _launch = start_http(&rt, "web", &[]);
    // Another unprivileged user cannot even enter the directory.
    if let Some((uid, gid)) = subid_user() {
        let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
        cmd.env("XDG_RUNTIME_DIR", rt.path())
            .args(["exec", "web", "--", "true"]);
        let (code, _, err) = run_to_end(&mut cmd);
        assert_ne!(code, 0);
        assert!(
            err.contains("not safe") || err.contains("ermission denied"),
            "{err}"
        );
    }
    // Root can reach the socket, but the instance checks who is calling.
    let name = fs::read_to_string(rt.instance_dir("web").join("control")).unwrap();
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let addr = nix::sys::socket::UnixAddr::new_abstract(name.trim().as_bytes()).unwrap();
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).unwrap();
    let _ = nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        br#"{"request":"exec"}"#,
        nix::sys::socket::MsgFlags::empty(),
    );
    let mut buf = [0u8; 4096];
    let n = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.contains("belongs to another user"), "{reply}");
}

/// The server runs as the user and can read the state directory, but the control socket lives in
/// the host's network namespace (an abstract name): neither its own instance's nor another's is
/// reachable from inside, so a hostile server cannot stop, change or enter the user's instances.
#[test]
fn a_server_inside_cannot_reach_any_control_socket() {
    let rt = Runtime::new("inst-hostile");
    let _other = start_http(&rt, "other", &[]);
    let script = r#"
import os, socket, sys
root = os.path.join(os.environ["XDG_RUNTIME_DIR"], "lowport")
for name in sorted(os.listdir(root)):
    with open(os.path.join(root, name, "control")) as f:
        address = "\0" + f.read().strip()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(address)
        s.send(b'{"request":"stop"}')
        print(name, "reached:", s.recv(4096))
    except OSError as e:
        print(name, "refused:", e.errno)
"#;
    let (code, out, err) = rt.run(&["run", "--name", "hostile", "--", python(), "-c", script]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostile refused: 111"), "{out}");
    assert!(out.contains("other refused: 111"), "{out}");
    assert!(!out.contains("reached"), "{out}");
    let (_, ps, _) = rt.run(&["ps"]);
    assert!(
        ps.contains("other "),
        "the other instance was stopped: {ps}"
    );
}

// ---------------------------------------------------------------------------------------------
// Attacks: what a hostile server inside, or another local user, tries against named instances.
// The server runs as the user on the host and can read and write $XDG_RUNTIME_DIR/lowport, so a
// script it runs does what the server could; the scripts wait for marker files in `Markers`.
// ---------------------------------------------------------------------------------------------

/// A directory of 65534's where the tests and the scripts leave marker files for each other.
struct Markers(TempDir);

impl Markers {
    fn new(tag: &str) -> Markers {
        Markers(TempDir::new(tag, Some((NOBODY, NOBODY))))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn file(&self, name: &str) -> String {
        self.path().join(name).display().to_string()
    }

    fn create(&self, name: &str) {
        fs::write(self.path().join(name), "").unwrap();
    }

    fn wait_for(&self, name: &str) -> String {
        eventually(&format!("the marker {name}"), || {
            fs::read_to_string(self.path().join(name)).ok()
        })
    }
}

/// `lowport run --name NAME -- python3 -c SCRIPT ARGS...`, running once lowport reports it ready.
fn start_script(rt: &Runtime, name: &str, script: &str, args: &[&str]) -> Launch {
    let mut cmd = rt.lowport(&[
        "run",
        "--name",
        name,
        "--ready-fd",
        "3",
        "--",
        python(),
        "-c",
        script,
    ]);
    cmd.args(args).current_dir("/");
    Launch::start(cmd)
}

/// A pty for a test to play the user's terminal; neither end leaks into what the test starts.
/// Spawns `cmd` in a session of its own whose controlling terminal, and standard descriptors, are
/// `pty`'s slave: as a user's `lowport exec` in a terminal.
fn spawn_on_terminal(
    cmd: &mut std::process::Command,
    pty: &nix::pty::OpenptyResult,
) -> std::process::Child {
    let slave = std::os::fd::AsRawFd::as_raw_fd(&pty.slave);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, ioctl, dup2.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::unistd::setsid()?;
            if libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in 0..3 {
                nix::unistd::dup2(slave, fd)?;
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn test_pty() -> nix::pty::OpenptyResult {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    pty
}

/// `lowport exec` joins the server's user namespace, where the server is root: the exec client is
/// then, to the kernel, a process the server may trace, although it runs in the host's pid namespace
/// with the user's terminal. The server unmounts its private /proc, finds the client in the host's,
/// and tries its memory, environment and descriptors.
#[test]
fn a_server_cannot_reach_into_a_lowport_exec_client() {
    let rt = Runtime::new("atk-client");
    let marks = Markers::new("atk-client-marks");
    let script = r#"
import ctypes, errno, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
marks = sys.argv[1]
if libc.umount2(b"/proc", 2) != 0:
    sys.exit("umount /proc: %s" % errno.errorcode[ctypes.get_errno()])
while not os.path.exists(marks + "/started"):
    time.sleep(0.05)
found = []
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if len(argv) > 2 and argv[0].endswith(b"lowport") and argv[1] == b"exec":
        found.append(p)
results = []
for p in found:
    for what, probe in (("mem", lambda: os.close(os.open(f"/proc/{p}/mem", os.O_RDWR))),
                        ("environ", lambda: open(f"/proc/{p}/environ", "rb").read()),
                        ("fd", lambda: os.listdir(f"/proc/{p}/fd"))):
        try:
            probe(); results.append(f"{what}: ok")
        except OSError as e:
            results.append(f"{what}: {errno.errorcode[e.errno]}")
with open(marks + "/result.tmp", "w") as f:
    f.write(f"clients: {len(found)}\n" + "\n".join(results) + "\n")
os.rename(marks + "/result.tmp", marks + "/result")
time.sleep(60)
"#;
    let _hostile = start_script(&rt, "hostile", script, &[&marks.file("")]);
    let wait = format!(
        "touch {}; i=0; while [ ! -e {} ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done",
        marks.file("started"),
        marks.file("result")
    );
    let (code, _, err) = rt.run(&["exec", "hostile", "--", "/bin/sh", "-c", &wait]);
    assert_eq!(code, 0, "{err}");
    let result = marks.wait_for("result");
    // This test's client, and those of the other tests running now: none may be reached.
    assert!(
        !result.starts_with("clients: 0\n") && result.contains(": EACCES"),
        "{result}"
    );
    assert!(
        !result.contains(": ok"),
        "the server reached the exec client:\n{result}"
    );
}

/// The server rewrites another instance's `control` file with its own control socket's name: the
/// user's `lowport exec victim` would then join the hostile server's namespaces, `port add` hand it
/// a host socket, and `stop` stop the wrong instance.
#[test]
fn a_forged_control_file_does_not_send_the_user_to_another_instance() {
    let rt = Runtime::new("atk-forge");
    let marks = Markers::new("atk-forge-marks");
    let _victim = start_http(&rt, "victim", &[]);
    let script = r#"
import os, sys, time
root = os.path.join(os.environ["XDG_RUNTIME_DIR"], "lowport")
own = open(os.path.join(root, "hostile", "control")).read()
with open(os.path.join(root, "victim", "control"), "w") as f:
    f.write(own)
open(sys.argv[1] + "/forged", "w").close()
time.sleep(60)
"#;
    let mut hostile = start_script(&rt, "hostile", script, &[&marks.file("")]);
    marks.wait_for("forged");
    let (code, out, err) = rt.run(&["exec", "victim", "--", "/bin/echo", "joined"]);
    assert_ne!(code, 0, "exec victim joined another instance: {out}");
    assert!(
        err.contains("instance 'victim'") && err.contains("'hostile'"),
        "{err}"
    );
    let (code, _, err) = rt.run(&["port", "add", "victim", "127.0.0.1:0:80"]);
    assert_ne!(code, 0, "{err}");
    let (code, _, err) = rt.run(&["stop", "victim"]);
    assert_ne!(code, 0, "{err}");
    assert!(
        hostile.child.try_wait().unwrap().is_none(),
        "stop victim stopped the hostile instance"
    );
    let (_, ps, _) = rt.run(&["ps"]);
    assert!(ps.contains("victim ") && ps.contains("hostile "), "{ps}");
}

/// Abstract socket names are listed in /proc/net/unix for everyone to read, and anyone may connect
/// to them. Another user opens every connection the backlog takes and never sends a byte; the
/// user's `lowport stop` must still be answered.
#[test]
fn another_user_cannot_hold_the_control_socket() {
    if !require(is_root(), "root, to play another user") {
        return;
    }
    let rt = Runtime::new("atk-hold");
    let mut held = start_http(&rt, "held", &[]);
    let script = r#"
import socket, sys, time
names = {l.split()[-1] for l in open("/proc/net/unix") if "@lowport/65534/held/" in l}
held = []
for name in names:
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect("\0" + name[1:])
        except OSError:
            break
        held.append(s)
print(len(names), len(held), flush=True)
time.sleep(60)
"#;
    let mut other = unprivileged_as(65533, 65533, Path::new(python()));
    other
        .args(["-c", script])
        .stdout(std::process::Stdio::piped());
    let mut other = other.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let counts: Vec<u32> = line
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[0], 1, "the other user does not see the name: {line}");
    assert!(counts[1] > 0, "the other user could not connect: {line}");
    let (code, _, err) = rt.run(&["stop", "held"]);
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(code, 0, "{err}");
    held.wait();
}

/// The server writes its own state.json: the user's `lowport ps` prints the command, and must not
/// pass the server's escape sequences (window titles, screen clearing, and on some terminals
/// answers typed back) to the user's terminal.
#[test]
fn ps_does_not_print_a_forged_states_escape_sequences() {
    let rt = Runtime::new("atk-escape");
    let marks = Markers::new("atk-escape-marks");
    let script = r#"
import json, os, sys, time
marks = sys.argv[1]
while not os.path.exists(marks + "/go"):
    time.sleep(0.05)
path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "lowport", "hostile", "state.json")
state = json.load(open(path))
state["command"] = ["\x1b]2;owned\x07\x1b[2J\x9b31m"]
state["ports"] = [{"protocol": "tcp\x1b[1m", "host_ip": "\x1b[H", "host_port": 1, "port": 1,
                   "mode": "relay\r"}]
with open(path + ".new", "w") as f:
    json.dump(state, f)
os.rename(path + ".new", path)
open(marks + "/forged", "w").close()
time.sleep(60)
"#;
    let _hostile = start_script(&rt, "hostile", script, &[&marks.file("")]);
    marks.create("go");
    marks.wait_for("forged");
    let (code, out, err) = rt.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostile "), "{out}");
    assert!(
        !out.contains(|c: char| c.is_control() && c != '\n'),
        "ps printed control characters: {out:?}"
    );
    assert!(out.contains("\\x1b]2;owned"), "{out:?}");
}

/// The server replaces the files a client reads with FIFOs (or links to /dev/zero): `lowport ps`
/// and `exec` must not wait for ever, nor read without end.
#[test]
fn clients_do_not_hang_on_a_fifo_in_the_state_directory() {
    let rt = Runtime::new("atk-fifo");
    let marks = Markers::new("atk-fifo-marks");
    let script = r#"
import os, sys, time
marks = sys.argv[1]
while not os.path.exists(marks + "/go"):
    time.sleep(0.05)
d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "lowport", "hostile")
for name in ("state.json", "control"):
    os.unlink(os.path.join(d, name))
    os.mkfifo(os.path.join(d, name), 0o600)
open(marks + "/forged", "w").close()
time.sleep(60)
"#;
    let _hostile = start_script(&rt, "hostile", script, &[&marks.file("")]);
    marks.create("go");
    marks.wait_for("forged");
    let (code, out, err) = rt.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostile "), "{out}");
    let (code, _, err) = rt.run(&["exec", "hostile", "--", "/bin/true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach instance 'hostile'"), "{err}");
}

/// Without XDG_RUNTIME_DIR the state lives in /tmp/lowport-UID, where another user could make the
/// directory first. Here a sticky, world-writable runtime directory stands for /tmp (the real one
/// is shared with the other tests): another user's directory, open or a symlink to one of the
/// user's own, is refused, and a run without --name still runs.
#[test]
fn another_users_state_directory_is_refused() {
    if !require(is_root(), "root, to play another user") {
        return;
    }
    let shared = TempDir::new("atk-squat", None);
    fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let mine = TempDir::new("atk-squat-mine", Some((NOBODY, NOBODY)));
    fs::set_permissions(mine.path(), fs::Permissions::from_mode(0o700)).unwrap();
    for plant in ["dir", "symlink"] {
        let squat = shared.path().join("lowport");
        let _ = fs::remove_file(&squat);
        let _ = fs::remove_dir(&squat);
        let mut make = unprivileged_as(65533, 65533, Path::new("/bin/sh"));
        make.arg("-c");
        if plant == "dir" {
            make.arg(format!("mkdir -m 777 {}", squat.display()));
        } else {
            make.arg(format!(
                "ln -s {} {}",
                mine.path().display(),
                squat.display()
            ));
        }
        assert!(make.status().unwrap().success());
        let mut cmd = lowport();
        cmd.env("XDG_RUNTIME_DIR", shared.path())
            .args(["run", "--name", "web", "--", "/bin/true"]);
        let (code, _, err) = run_to_end(&mut cmd);
        assert_eq!(code, 125, "{plant}: {err}");
        assert!(err.contains("is not safe to use"), "{plant}: {err}");
        let mut cmd = lowport();
        cmd.env("XDG_RUNTIME_DIR", shared.path())
            .args(["run", "--", "/bin/true"]);
        let (code, _, err) = run_to_end(&mut cmd);
        assert_eq!(code, 0, "{plant}: {err}");
        assert!(err.contains("this run has no name"), "{plant}: {err}");
        assert!(
            fs::read_dir(mine.path()).unwrap().next().is_none(),
            "{plant}: lowport wrote through the planted link"
        );
        let _ = fs::remove_file(&squat);
        let _ = fs::remove_dir(&squat);
    }
}

/// `lowport exec` from the user's terminal: the command it starts runs in the server's namespaces,
/// where the server is root and may open the command's descriptors through /proc. Were the user's
/// terminal among them, the server would keep it after the exec ended, read what the user types
/// next in their shell (a password, say) and write to it. The test's pty is the user's terminal.
#[test]
fn a_server_cannot_keep_the_terminal_of_an_exec() {
    let rt = Runtime::new("atk-tty");
    let marks = Markers::new("atk-tty-marks");
    let script = r#"
import errno, os, sys, time
marks = sys.argv[1]
def wait(name):
    while not os.path.exists(marks + "/" + name):
        time.sleep(0.05)
wait("started")
tty = None
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"exec-marker" in argv:
        tty = os.open(f"/proc/{p}/fd/0", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
open(marks + "/grabbed", "w").close()
wait("ended")
results = []
try:
    os.write(tty, b"\r\nPassword: "); results.append("write: ok")
except OSError as e:
    results.append(f"write: {errno.errorcode[e.errno]}")
time.sleep(0.5)
try:
    results.append(f"read: {os.read(tty, 100)!r}")
except OSError as e:
    results.append(f"read: {errno.errorcode[e.errno]}")
with open(marks + "/result.tmp", "w") as f:
    f.write("\n".join(results) + "\n")
os.rename(marks + "/result.tmp", marks + "/result")
time.sleep(60)
"#;
    let _hostile = start_script(&rt, "hostile", script, &[&marks.file("")]);
    let pty = test_pty();
    if is_root() {
        // A login gives the user's terminal to the user.
        nix::unistd::fchown(
            std::os::fd::AsRawFd::as_raw_fd(&pty.slave),
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            None,
        )
        .unwrap();
    }
    let wait = format!(
        "touch {}; i=0; while [ ! -e {} ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done",
        marks.file("started"),
        marks.file("grabbed")
    );
    let mut cmd = rt.lowport(&[
        "exec",
        "hostile",
        "--",
        "/bin/sh",
        "-c",
        &wait,
        "exec-marker",
    ]);
    let mut child = spawn_on_terminal(&mut cmd, &pty);
    let status = wait_with_deadline(&mut child, PATIENCE).expect("lowport exec hung");
    let mut shown = [0u8; 4096];
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&pty.master),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let n =
        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&pty.master), &mut shown).unwrap_or(0);
    assert_eq!(
        exit_code(status),
        0,
        "{}",
        String::from_utf8_lossy(&shown[..n])
    );
    // The user types into their shell, now that the exec is over.
    nix::unistd::write(&pty.master, b"secret\n").unwrap();
    marks.create("ended");
    let result = marks.wait_for("result");
    assert!(
        !result.contains("write: ok") && !result.contains("secret"),
        "the server kept the user's terminal:\n{result}"
    );
}

/// The server is root in the mount namespace where `lowport exec` looks its command up, and may
/// trace the command once it runs: what the exec'd command does is the server's to choose. Here it
/// mounts its own program over /bin/true, which sends SIGTERM to its process group. Started from a
/// script, the exec'd command must not share the script's group, where the script and its other
/// children (a `sleep` stands for them) live outside every namespace of the server.
#[test]
fn a_server_cannot_signal_the_process_group_of_an_exec() {
    let rt = Runtime::new("atk-pgrp");
    let marks = Markers::new("atk-pgrp-marks");
    let trojan = marks.0.write("trojan", "#!/bin/sh\nkill -TERM 0\n");
    fs::set_permissions(&trojan, fs::Permissions::from_mode(0o755)).unwrap();
    let script = r#"
import ctypes, errno, sys, time
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND = 4096
if libc.mount(sys.argv[1].encode(), b"/bin/true", None, MS_BIND, None) != 0:
    sys.exit("mount: %s" % errno.errorcode[ctypes.get_errno()])
open(sys.argv[2] + "/mounted", "w").close()
time.sleep(60)
"#;
    let _hostile = start_script(
        &rt,
        "hostile",
        script,
        &[&trojan.display().to_string(), &marks.file("")],
    );
    marks.wait_for("mounted");
    let pidfile = marks.path().join("sleep.pid");
    let shell = format!(
        "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {pid}; {lowport} exec hostile -- /bin/true </dev/null; echo exec=$?",
        pid = pidfile.display(),
        lowport = lowport_bin().display(),
    );
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new("/bin/sh"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.env("XDG_RUNTIME_DIR", rt.path()).args(["-c", &shell]);
    let (code, out, err) = run_to_end(&mut cmd);
    let sleep: u32 = fs::read_to_string(&pidfile)
        .expect("the shell wrote the sleep's pid")
        .trim()
        .parse()
        .unwrap();
    let alive = process_exists(sleep);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleep as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(code, 0, "the calling shell was killed: {out} {err}");
    assert!(
        alive,
        "the sleep in the caller's group was killed: {out} {err}"
    );
    assert!(out.contains("exec=143"), "{out} {err}");
}

/// A process of the user's own on the host may reach the control socket. A message larger than any
/// request, with as many descriptors as a message can carry, is refused; lowport keeps none of
/// them, and answers the next client.
#[test]
fn a_huge_request_with_many_descriptors_is_refused_and_nothing_is_kept() {
    if !require(is_root(), "root, to count lowport's descriptors") {
        return;
    }
    let rt = Runtime::new("atk-huge");
    let launch = start_http(&rt, "web", &[]);
    let open_fds = || {
        fs::read_dir(format!("/proc/{}/fd", launch.child.id()))
            .unwrap()
            .count()
    };
    let before = open_fds();
    let script = r#"
import os, socket, sys
name = open(sys.argv[1]).read().strip()
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(250)]
for size in (200000, 100):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect("\0" + name)
    socket.send_fds(s, [b"{" * size], fds)
    print(s.recv(65536).decode(), flush=True)
"#;
    let control = rt.instance_dir("web").join("control");
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(python()));
    cmd.args(["-c", script, &control.display().to_string()]);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("not a request").count(), 2, "{out}");
    assert_eq!(open_fds(), before, "lowport kept descriptors it was sent");
    let (code, _, err) = rt.run(&["port", "rm", "web", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no published port matches"), "{err}");
}

/// The server removes its own instance's directory (it runs as the user): `ps` no longer lists the
/// instance, but lowport goes on serving, and ends as it would have, without removing what a new
/// instance of the same name has put there since.
#[test]
fn an_instance_whose_directory_vanished_serves_and_ends_cleanly() {
    let rt = Runtime::new("atk-vanish");
    let mut launch = start_http(&rt, "web", &["--forward", "relay"]);
    let removal = format!("rm -rf {}", rt.instance_dir("web").display());
    let mut rm = unprivileged_as(NOBODY, NOBODY, Path::new("/bin/sh"));
    assert!(rm.args(["-c", &removal]).status().unwrap().success());
    let (code, out, _) = rt.run(&["ps"]);
    assert_eq!((code, out.lines().count()), (0, 1), "{out}");
    // Its control socket is still there, found by no one: a new instance takes the name.
    let _second = start_http(&rt, "web", &[]);
    assert!(matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))));
    launch.signal(nix::sys::signal::Signal::SIGTERM);
    let status = launch.wait();
    assert_eq!(exit_code(status), 128 + 15);
    let err = launch.stderr();
    assert!(!err.contains("panicked"), "{err}");
    // The directory is the second instance's now, and the first one's end left it alone.
    let (_, ps, _) = rt.run(&["ps"]);
    assert!(ps.contains("web "), "{ps}");
}

/// What the server could take from the exec'd command through /proc/PID/fd: only its standard
/// descriptors, not the namespaces, the control connection, the relay's own (pty master,
/// signalfd, pidfd), or what the caller left open. With and without a terminal.
#[test]
fn an_exec_command_holds_only_its_standard_descriptors() {
    let rt = Runtime::new("atk-fds");
    let _web = start_http(&rt, "web", &[]);
    let list = "for f in /proc/$$/fd/*; do printf '%s ' ${f##*/}; done";
    // 0 to 2, and 3: the directory the glob reads.
    let plain = "0 1 2 3";
    let mut cmd = rt.lowport(&["exec", "web", "--", "/bin/sh", "-c", list]);
    let _left_open = leave_descriptors_open(&mut cmd);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), plain);
    let pty = test_pty();
    // (Without descriptors left open here: they would take the numbers of the test's pty.)
    let mut cmd = rt.lowport(&["exec", "web", "--", "/bin/sh", "-c", list]);
    let mut child = spawn_on_terminal(&mut cmd, &pty);
    let status = wait_with_deadline(&mut child, PATIENCE).expect("lowport exec hung");
    assert_eq!(exit_code(status), 0);
    drop(pty.slave);
    let mut shown = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&pty.master), &mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&shown).trim(), plain);
}

//! Exit statuses, signal forwarding, and cleanup when lowport dies, even by SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use lowport_tests::*;
use nix::sys::signal::Signal;

#[test]
fn exit_status_is_the_commands() {
    for (script, want) in [("exit 0", 0), ("exit 7", 7), ("exit 255", 255)] {
        let (code, _, err) = run_to_end(lowport().args(["run", "--", "sh", "-c", script]));
        assert_eq!(code, want, "{script}: {err}");
    }
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_n() {
    for (sig, want) in [("KILL", 137), ("TERM", 143), ("SEGV", 139)] {
        let (code, _, err) =
            run_to_end(lowport().args(["run", "--", "sh", "-c", &format!("kill -{sig} $$")]));
        assert_eq!(code, want, "kill -{sig}: {err}");
    }
}

/// A command that reports each signal it receives on stdout, one name per line.
const TRAPPER: &str = r#"
for s in INT TERM HUP QUIT USR1 USR2 WINCH; do trap "echo $s" $s; done
echo ready
while :; do sleep 0.05; done
"#;

#[test]
fn every_forwarded_signal_reaches_the_command() {
    let mut cmd = lowport();
    cmd.args(["run", "--", "sh", "-c", TRAPPER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // As from a terminal: run from a background job of a script (`cargo test &`, nohup), the tests
    // ignore SIGINT, SIGQUIT or SIGHUP, lowport keeps them ignored for the command as any program
    // does (docs/usage.md), and sh cannot trap a signal ignored when it started.
    // SAFETY: sigaction is async-signal-safe, and nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            for sig in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGHUP] {
                nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl)?;
            }
            Ok(())
        });
    }
    // Killed when the test ends, failed or not: a lowport left running would hold the test's output
    // open.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(cmd.spawn().unwrap());
    let lowport_pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    // Lines through a channel, so that a lost signal fails the test instead of hanging it.
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |after: &str| {
        lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no line from the command {after}"))
    };
    assert_eq!(next_line("at start"), "ready");
    for (sig, name) in [
        (Signal::SIGINT, "INT"),
        (Signal::SIGTERM, "TERM"),
        (Signal::SIGHUP, "HUP"),
        (Signal::SIGQUIT, "QUIT"),
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
        (Signal::SIGWINCH, "WINCH"),
    ] {
        nix::sys::signal::kill(lowport_pid, sig).unwrap();
        let line = next_line(&format!("after sending {sig}"));
        assert_eq!(line, name, "after sending {sig}");
    }
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "lowport must keep running: the command handled every signal"
    );
}

#[test]
fn sigterm_to_lowport_ends_a_default_command_with_143() {
    let mut launch = Launch::start({
        let mut cmd = lowport();
        // No -p: nothing would serve it, and readiness waits for a server on every published port.
        cmd.args(["run", "--ready-fd", "3", "--", "sleep", "1000"]);
        cmd
    });
    let sleeper = launch.pid;
    assert!(process_exists(sleeper));
    launch.signal(Signal::SIGTERM);
    assert_eq!(exit_code(launch.wait()), 143);
    eventually("sleep to be gone", || {
        (!process_exists(sleeper)).then_some(())
    });
}

#[test]
fn sigkill_of_lowport_leaves_no_process_and_frees_the_port() {
    // demo-server with a second process beside it, like nginx's master and workers.
    let mut launch = Launch::start({
        let mut cmd = lowport();
        cmd.args([
            "run",
            "-p",
            "127.0.0.1:0:80",
            "--ready-fd",
            "3",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "sleep 1000 & {} & wait",
            demo_server_bin().display()
        ));
        cmd
    });
    wait_healthy(launch.addr());
    let port = launch.host_port();
    let tree = descendants(launch.child.id());
    assert!(
        tree.len() >= 4,
        "helper, sh, sleep and demo-server expected, found {tree:?}"
    );
    launch.signal(Signal::SIGKILL);
    assert_eq!(exit_code(launch.wait()), 137);
    eventually("every process of the launch to be gone", || {
        let left: Vec<_> = tree.iter().filter(|p| process_exists(**p)).collect();
        left.is_empty().then_some(())
    });
    eventually("the host port to be free", || {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    });
}

#[test]
fn the_command_sees_uid_0_in_an_interactive_shell() {
    if !require(std::path::Path::new("/bin/bash").exists(), "bash") {
        return;
    }
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave;
    let mut cmd = lowport();
    cmd.args(["run", "--", "bash", "--norc", "-i"])
        .env("PS1", "prompt$ ")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and the TIOCSCTTY ioctl are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    use std::io::{Read, Write};
    master
        .write_all(b"echo uid=$(id -u) tty=$(tty >/dev/null && echo yes)\nexit 3\n")
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once no process holds the terminal; parallel tests may hold a copy, so the
        // test does not wait for that.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let status = wait_with_deadline(&mut child, PATIENCE).expect("the shell did not exit");
    // The shell has exited, so its output is all in the terminal: read until the line the command
    // printed is complete (the echo of the input starts with "echo", not "uid="), or the reader
    // ends.
    let printed = |out: &[u8]| {
        String::from_utf8_lossy(out)
            .split('\n')
            .rev()
            .skip(1)
            .any(|line| line.trim_start_matches("prompt$ ").starts_with("uid="))
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut out = Vec::new();
    while !printed(&out) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => out.extend(chunk),
            Err(_) => break,
        }
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("uid=0 tty=yes"), "shell output: {out:?}");
    assert_eq!(exit_code(status), 3, "shell output: {out:?}");
}

/// A forwarded signal must leave the relay as it was: serving, and idle when there is no traffic.
#[test]
fn the_relay_keeps_serving_after_forwarded_signals() {
    let mut cmd = lowport();
    // demo-server ignores SIGHUP and SIGWINCH (an ignored disposition survives exec).
    cmd.args([
        "run",
        "-p",
        "127.0.0.1:0:80",
        "--ready-fd",
        "3",
        "--",
        "sh",
        "-c",
    ])
    .arg(format!("trap '' HUP; exec {}", demo_server_bin().display()));
    let launch = Launch::start(cmd);
    wait_healthy(launch.addr());
    for sig in [Signal::SIGHUP, Signal::SIGWINCH, Signal::SIGHUP] {
        launch.signal(sig);
        for _ in 0..5 {
            let (status, _) =
                http(launch.addr(), "GET", "/healthz", b"").expect("served after a signal");
            assert_eq!(status, 200);
        }
    }
    // Idle now: a thread left spinning on the signal queue would burn a whole CPU.
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", launch.child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    // Idle means no connection left to relay: wait for lowport to have closed every one.
    eventually("lowport to close the relayed connections", || {
        relayed_sockets(&launch).is_empty().then_some(())
    });
    // Spinning is a negative with no event to wait for: CPU time is measured over a fixed window,
    // an observation, not a synchronisation.
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu_ticks() - before;
    assert!(
        used < 30,
        "lowport used {used} ticks of CPU in one idle second"
    );
}

#[test]
fn root_can_run_lowport_too() {
    // uid 0 is the caller in containers and in nested use; the kernel then needs CAP_SETFCAP at unshare.
    let (code, out, err) = if is_root() {
        run_to_end(std::process::Command::new(lowport_bin()).args([
            "run",
            "--",
            "cat",
            "/proc/self/uid_map",
        ]))
    } else {
        run_to_end(lowport().args(["run", "--"]).arg(lowport_bin()).args([
            "run",
            "--",
            "cat",
            "/proc/self/uid_map",
        ]))
    };
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(row, ["0", "0", "1"], "{out}");
}

#[test]
fn lowport_runs_inside_lowport() {
    let (code, out, err) = run_to_end(
        lowport()
            .args(["run", "--"])
            .arg(lowport_bin())
            .args(["run", "--", "id", "-u"]),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "0\n");
}

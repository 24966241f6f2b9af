//! Readiness means the server accepts: `--ready-fd` and systemd's READY=1 come only once a server
//! that takes its time has bound (and listens on) every published port; `--ready-timeout` ends a run
//! whose server never does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};

use lowport_tests::*;
use nix::sys::signal::Signal;

/// An echo server that sleeps 1 s, writes `marker` (just before its bind), binds 0.0.0.0:80 and for
/// TCP listens, and writes whether it sees NOTIFY_SOCKET to `env`.
const SLOW_SERVER: &str = r#"
import os, socket, sys, time
proto, marker, env = sys.argv[1], sys.argv[2], sys.argv[3]
open(env, "w").write(repr(sorted(k for k in os.environ if k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"))))
time.sleep(1)
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
open(marker, "w").write("binding")
s.bind(("0.0.0.0", 80))
if proto == "udp":
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(c.recv(2048))
    c.close()
"#;

struct Server {
    dir: TempDir,
}

impl Server {
    fn new(tag: &str) -> Server {
        let dir = TempDir::new(tag, Some((NOBODY, NOBODY)));
        dir.write("server.py", SLOW_SERVER);
        Server { dir }
    }

    fn args(&self, proto: &str) -> Vec<String> {
        let p = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            "/usr/bin/python3".into(),
            p("server.py"),
            proto.into(),
            p("marker"),
            p("env"),
        ]
    }

    fn has_bound(&self) -> bool {
        self.dir.path().join("marker").exists()
    }

    fn env_seen(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("env")).unwrap_or_default()
    }
}

/// One exchange with the echo server, without retrying: the port must be served at once.
fn echo(proto: &str, addr: SocketAddr) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    if proto == "udp" {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.send_to(b"hello", addr).unwrap();
        let n = s.recv(&mut buf).expect("an answer to the first datagram");
        buf.truncate(n);
    } else {
        let mut s = TcpStream::connect(addr).expect("connect once ready");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(b"hello").unwrap();
        buf.clear();
        s.read_to_end(&mut buf).unwrap();
    }
    buf
}

#[test]
fn ready_fd_waits_for_a_server_that_binds_a_second_late() {
    for (forward, proto) in [
        ("handoff", "tcp"),
        ("handoff", "udp"),
        ("relay", "tcp"),
        ("relay", "udp"),
    ] {
        let server = Server::new(&format!("ready-{forward}-{proto}"));
        let mut cmd = lowport();
        cmd.args([
            "run",
            "--forward",
            forward,
            "-p",
            &format!("127.0.0.1:0:80/{proto}"),
            "--ready-fd",
            "3",
            "--",
        ])
        .args(server.args(proto));
        let launch = Launch::start(cmd);
        assert!(
            server.has_bound(),
            "{forward} {proto}: ready before the server's bind: {}",
            launch.ready_line
        );
        assert!(
            launch
                .ready_line
                .contains(&format!("\"mode\":\"{forward}\"")),
            "{}",
            launch.ready_line
        );
        assert_eq!(echo(proto, launch.addr()), b"hello", "{forward} {proto}");
    }
}

#[test]
fn a_server_that_never_binds_is_reported_and_stopped() {
    let dir = TempDir::new("ready-timeout", Some((NOBODY, NOBODY)));
    let report = dir.path().join("ready.json");
    let script = format!(
        "exec {} run --ready-timeout 1s -p 127.0.0.1:0:80 -p 127.0.0.1:0:53/udp --forward relay --ready-fd 3 -- sleep 1000 3>{}",
        lowport_bin().display(),
        report.display()
    );
    let (code, _, err) = run_to_end(
        unprivileged_as(NOBODY, NOBODY, std::path::Path::new("/bin/sh")).args(["-c", &script]),
    );
    assert_eq!(code, 124, "{err}");
    assert!(
        err.contains("did not become ready within 1s")
            && err.contains("-p 127.0.0.1:0:80/tcp: nothing listens on port 80/tcp")
            && err.contains("-p 127.0.0.1:0:53/udp: nothing is bound on port 53/udp"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "",
        "no ready line"
    );
}

/// lowport, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn recv_text(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// READY=1 with lowport's pid only once the server has bound, STOPPING=1 on SIGTERM, and no
/// NOTIFY_SOCKET for the command; `address` is NOTIFY_SOCKET's value for `socket`.
fn notify_protocol(tag: &str, socket: UnixDatagram, address: &str) {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let server = Server::new(tag);
    let mut cmd = lowport();
    cmd.args(["run", "-p", "127.0.0.1:0:80", "--"])
        .args(server.args("tcp"))
        .env("NOTIFY_SOCKET", address)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut lowport = Running(cmd.spawn().unwrap());
    let ready = recv_text(&socket);
    assert!(
        server.has_bound(),
        "READY=1 before the server's bind: {ready:?}"
    );
    let pid = lowport.0.id();
    assert!(
        ready.starts_with(&format!(
            "READY=1\nMAINPID={pid}\nSTATUS=serving 127.0.0.1:"
        )),
        "{ready:?}"
    );
    assert_eq!(
        server.env_seen(),
        "[]",
        "the command saw the notify variables"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(recv_text(&socket), "STOPPING=1\n");
    let status = wait_with_deadline(&mut lowport.0, PATIENCE).expect("lowport exits");
    assert_eq!(exit_code(status), 143);
}

#[test]
fn systemd_hears_ready_after_the_bind_then_stopping() {
    let dir = TempDir::new("ready-notify", Some((NOBODY, NOBODY)));
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    notify_protocol("ready-notify-path", socket, path.to_str().unwrap());
}

#[test]
fn an_abstract_notify_socket_is_reached_from_the_host_namespace() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("lowport-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    notify_protocol("ready-notify-abstract", socket, &format!("@{name}"));
}

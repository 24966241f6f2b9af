//! Reaching out (issue 9): `--host-loopback`, `--dns` and `--net pasta`, each checked with real
//! servers (nginx, dnsmasq, Python's http.server) and lowport as an unprivileged user, and each
//! against a run without the option that fails the same check, so that every test can fail:
//! - `--host-loopback PORT[-LAST][/tcp|udp]`: nginx with a production `proxy_pass
//!   http://127.0.0.1:APP;` serves a host app's answer (502 without); only the named ports and
//!   protocol reach the host's loopback, IPv6 included; a refused host connection is a reset inside;
//! - `--dns`: the C library's resolver inside gets answers from a test resolver on the host's
//!   loopback (UDP) and a raw query over TCP does too, also from a resolver on a non-loopback
//!   address, which lowport makes local inside;
//! - `--net pasta`: outbound traffic reaches the test's peer, the host's loopback stays closed, the
//!   published ports still serve host clients (handoff and relay), pasta stops with the run, and a
//!   missing pasta or an inaccessible /dev/net/tun ends in a message;
//! - the readiness line's `net`, `host_loopback` and `dns`, and bad values as usage errors.
//!
//! Three tests were written against launcher bugs, and failed until they were fixed: the first
//! datagram of a new UDP flow to the host was dropped (so a DNS lookup waited for its own retry),
//! and a /dev/net/tun that the user cannot open was not named with its fix under Debian 12's pasta.
//!
//! Network rule: nothing here sends to anything but loopback and network namespaces the tests make.
//! Every test that reads a resolv.conf (`--dns`, `--net pasta`) runs lowport in a network namespace of
//! its own and in a private mount namespace where /etc/resolv.conf is the test's file, so that it
//! never asks the machine's resolver, even on a bug; pasta runs only in a namespace whose default route
//! leads to the test's peer namespace. pasta gets the test's own /dev/net/tun (a device node bind-
//! mounted over it in that mount namespace, mode 0666 or 0600 as the test needs), so the host's device
//! keeps its mode and tests running in parallel never depend on each other's changes.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lowport_tests::*;
use nix::sys::signal::Signal;

const PYTHON: &str = "/usr/bin/python3";
const CURL: &str = "/usr/bin/curl";
const GETENT: &str = "/usr/bin/getent";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A process of the test's (a host service, a resolver, the peer's server), killed and reaped when
/// the test ends, however it ends.
struct Service {
    child: Child,
    out: Output,
}

impl Service {
    fn start(cmd: &mut Command) -> Service {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a service");
        let out = Output::default();
        out.feed(child.stdout.take().unwrap());
        out.feed(child.stderr.take().unwrap());
        Service { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn text(&self) -> String {
        self.out.text()
    }

    fn wait_for(&self, needle: &str) {
        self.out.wait_for(needle)
    }

    /// How often `needle` is in the output, once it is there at least `n` times (its lines may still
    /// be on their way from the pipe when the client has its answer).
    fn count_at_least(&self, needle: &str, n: usize) -> usize {
        eventually(&format!("{n} times {needle:?} in the output"), || {
            let count = self.text().matches(needle).count();
            (count >= n).then_some(count)
        })
    }

    /// The first word after `key` on the first output line that has it, once there is one; None
    /// when the process exits first (a port that was taken, for instance).
    fn wait_word_after(&mut self, key: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text();
            if let Some(word) = text
                .lines()
                .find_map(|l| l.split_once(key))
                .and_then(|(_, rest)| rest.split_whitespace().next())
            {
                return Some(word.to_owned());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Let the readers take the last lines, for the caller's message.
                std::thread::sleep(Duration::from_millis(50));
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {key:?} in the output:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A lowport that runs a server, with the command's and lowport's output collected.
type Lowport = Watched;

/// `lowport run OPTIONS -- COMMAND...` to its end, as uid 65534: exit code, stdout, stderr.
fn inside(options: &[&str], command: &[&str]) -> (i32, String, String) {
    let mut cmd = lowport();
    cmd.arg("run").args(options).arg("--").args(command);
    run_to_end(&mut cmd)
}

/// `curl -sS -g --max-time 5 URL` inside `lowport run OPTIONS`: curl's exit code (or lowport's, when
/// it fails), the body, and the whole of stderr for messages.
fn curl_inside(options: &[&str], url: &str) -> (i32, String, String) {
    inside(options, &[CURL, "-sS", "-g", "--max-time", "5", url])
}

fn url(host: &str, port: u16, path: &str) -> String {
    if host.contains(':') {
        format!("http://[{host}]:{port}{path}")
    } else {
        format!("http://{host}:{port}{path}")
    }
}

/// Python's http.server as uid 65534 on `bind`:`port` (0: a free port), serving `greeting.txt` =
/// `text`, in `netns` when given; with the port it listens on. None when the port was taken.
fn try_http_app(
    tag: &str,
    bind: &str,
    port: u16,
    text: &str,
    netns: Option<&TestNetns>,
) -> Option<(TempDir, Service, u16)> {
    let dir = TempDir::new(tag, None);
    dir.write("greeting.txt", text);
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON));
    cmd.args(["-u", "-m", "http.server", &port.to_string(), "--bind", bind])
        .arg("--directory")
        .arg(dir.path());
    if netns.is_some() {
        confine(&mut cmd, netns, &[]);
    }
    let mut app = Service::start(&mut cmd);
    let port: u16 = app.wait_word_after(" port ")?.parse().unwrap();
    Some((dir, app, port))
}

fn http_app(tag: &str, bind: &str, text: &str) -> (TempDir, Service, u16) {
    try_http_app(tag, bind, 0, text, None).expect("http.server on a free port")
}

/// A small HTTP server on ADDR and each PORT of argv (0: a free port) that answers every request
/// with "hello from ADDR port PORT" and logs "request on PORT"; prints "listening PORT..." once it
/// listens, or exits 3 when a port is taken.
const HELLO: &str = r#"
import socket, sys, threading
addr = sys.argv[1]
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
socks = []
for p in sys.argv[2:]:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((addr, int(p)))
    except OSError as e:
        print("busy", p, e, flush=True)
        sys.exit(3)
    s.listen(16)
    socks.append(s)
print("listening", " ".join(str(s.getsockname()[1]) for s in socks), flush=True)
def serve(s):
    port = s.getsockname()[1]
    while True:
        c, _ = s.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            more = c.recv(4096)
            if not more:
                break
            data += more
        print("request on", port, flush=True)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from %s port %d\n" % (addr.encode(), port))
        c.close()
for s in socks[1:]:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
serve(socks[0])
"#;

/// [`HELLO`] as uid 65534 on `addr` and `ports`; with the ports it listens on, or None when one was
/// taken.
fn try_hello(
    dir: &TempDir,
    addr: &str,
    ports: &[u16],
    netns: Option<&TestNetns>,
) -> Option<(Service, Vec<u16>)> {
    let script = dir.write("hello.py", HELLO);
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON));
    cmd.arg("-u").arg(&script).arg(addr);
    cmd.args(ports.iter().map(u16::to_string));
    if netns.is_some() {
        confine(&mut cmd, netns, &[]);
    }
    let mut svc = Service::start(&mut cmd);
    svc.wait_word_after("listening")?;
    let line = svc
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("listening ").map(str::to_owned))
        .unwrap();
    let ports = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    Some((svc, ports))
}

/// A pseudo-random port from 20000 to 28999, below the kernel's ephemeral range (where the other
/// tests' port 0 binds land), for tests that need given port numbers.
fn pick_port(attempt: u32) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mix = (nanos / 1000)
        .wrapping_add(std::process::id().wrapping_mul(31))
        .wrapping_add(attempt.wrapping_mul(977));
    20000 + (mix % 9000) as u16
}

/// nginx as a reverse proxy, configured as in production: `listen 80;` and `proxy_pass
/// http://UPSTREAM;` (nginx speaks HTTP/1.0 to its upstream and closes each connection).
fn nginx_proxy(tag: &str, upstream: &str) -> TempDir {
    let owner = (caller_uid(), if is_root() { NOBODY } else { caller_uid() });
    let dir = TempDir::new(tag, Some(owner));
    let access_log = format!("access_log {}/access.log;", dir.path().display());
    let server =
        format!("listen 80;\n    location / {{\n      proxy_pass http://{upstream};\n    }}");
    let conf = NginxConf {
        workers: 1,
        user: "root root",
        log_level: "notice",
        http: &access_log,
        server: &server,
    };
    dir.write("nginx.conf", &conf.text(dir.path()));
    dir
}

/// GET `path` once the server answers at all: the status and the body.
fn get_once_up(addr: SocketAddr, path: &str) -> (u16, String) {
    eventually("the server to answer", || {
        http(addr, "GET", path, b"")
            .ok()
            .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
    })
}

// ---------------------------------------------------------------------------------------------
// 1. --host-loopback: TCP
// ---------------------------------------------------------------------------------------------

const APP_TEXT: &str = "the app on the host's loopback\n";

/// The case the issue starts from: nginx under lowport with `proxy_pass http://127.0.0.1:APP;` and
/// the app on the host's 127.0.0.1:APP. With `--host-loopback APP` a host client gets the app's
/// answer through nginx (the app logs nginx's HTTP/1.0 request); without it the same configuration
/// answers 502, as nginx's connect is refused inside.
#[test]
fn nginx_proxy_pass_reaches_an_app_on_the_hosts_loopback() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let (_app_dir, app, app_port) = http_app("proxy-app", "127.0.0.1", APP_TEXT);
    let nginx = nginx_proxy("proxy-nginx", &format!("127.0.0.1:{app_port}"));
    let start = |options: &[&str]| {
        let mut cmd = lowport();
        run_args(&mut cmd, &[&["-p", "127.0.0.1:0:80"], options].concat())
            .args(nginx_command(&nginx));
        Lowport::start(cmd)
    };

    let with = start(&["--host-loopback", &app_port.to_string()]);
    let (status, body) = get_once_up(with.launch.addr(), "/greeting.txt");
    assert_eq!(
        (status, body.as_str()),
        (200, APP_TEXT),
        "{}\napp:\n{}",
        with.context(),
        app.text()
    );
    app.wait_for("\"GET /greeting.txt HTTP/1.0\" 200");
    drop(with);

    let without = start(&[]);
    let (status, body) = get_once_up(without.launch.addr(), "/greeting.txt");
    assert_eq!(status, 502, "{body}\n{}", without.context());
    without
        .out
        .wait_for("(111: Connection refused) while connecting to upstream");
    assert_eq!(
        app.text().matches("GET /greeting.txt").count(),
        1,
        "only the run with --host-loopback reached the app:\n{}",
        app.text()
    );
}

/// `--host-loopback APP` opens that port and no other: a second host server on 127.0.0.1:OTHER (and
/// [::1]:OTHER) stays unreachable from inside, while APP answers in the same kind of run; without the
/// option APP is unreachable too.
#[test]
fn only_the_named_host_loopback_port_is_reachable() {
    let (_d1, app, app_port) = http_app("only-app", "127.0.0.1", APP_TEXT);
    let (_d2, other, other_port) = http_app("only-other", "127.0.0.1", "the other service\n");
    let app_arg = app_port.to_string();
    let open = ["--host-loopback", app_arg.as_str()];

    let (code, body, err) = curl_inside(&open, &url("127.0.0.1", app_port, "/greeting.txt"));
    assert_eq!((code, body.as_str()), (0, APP_TEXT), "{err}");

    let (code, body, err) = curl_inside(&open, &url("127.0.0.1", other_port, "/greeting.txt"));
    assert_eq!(
        code, 7,
        "127.0.0.1:{other_port} should be refused inside: {body}{err}"
    );
    if has_ipv6() {
        let (code, body, err) = curl_inside(&open, &url("::1", other_port, "/greeting.txt"));
        assert_eq!(
            code, 7,
            "[::1]:{other_port} should be refused inside: {body}{err}"
        );
    }

    let (code, body, err) = curl_inside(&[], &url("127.0.0.1", app_port, "/greeting.txt"));
    assert_eq!(code, 7, "without --host-loopback: {body}{err}");

    assert!(
        !other.text().contains("GET "),
        "the other host service got a request:\n{}",
        other.text()
    );
    assert_eq!(
        app.count_at_least("GET /greeting.txt", 1),
        1,
        "{}",
        app.text()
    );
}

/// `--host-loopback FIRST-LAST` opens each port of the range and not the next one; `/udp` opens UDP
/// only, so the same range as `/udp` leaves its TCP ports closed.
#[test]
fn a_range_opens_each_of_its_ports_and_no_other() {
    let dir = TempDir::new("range", None);
    let (hello, ports) = (0..50)
        .find_map(|attempt| {
            let base = pick_port(attempt);
            try_hello(&dir, "127.0.0.1", &[base, base + 1, base + 2], None)
        })
        .expect("three consecutive free ports");
    let (first, last) = (ports[0], ports[1]);
    let range = format!("{first}-{last}");
    for port in [first, last] {
        let (code, body, err) =
            curl_inside(&["--host-loopback", &range], &url("127.0.0.1", port, "/"));
        assert_eq!(
            (code, body.as_str()),
            (0, format!("hello from 127.0.0.1 port {port}\n").as_str()),
            "--host-loopback {range}: {err}"
        );
    }
    let next = ports[2];
    let (code, body, err) = curl_inside(&["--host-loopback", &range], &url("127.0.0.1", next, "/"));
    assert_eq!(code, 7, "port {next} is outside {range}: {body}{err}");
    let udp = format!("{range}/udp");
    let (code, body, err) = curl_inside(&["--host-loopback", &udp], &url("127.0.0.1", first, "/"));
    assert_eq!(code, 7, "--host-loopback {udp} opened TCP: {body}{err}");
    assert_eq!(
        hello.count_at_least("request on ", 2),
        2,
        "{}",
        hello.text()
    );
}

/// Inside, [::1]:PORT reaches the host's [::1]:PORT and 127.0.0.1:PORT the host's 127.0.0.1:PORT:
/// two host servers on the same port number, one per family, each answer their own family's clients.
/// Without the option, [::1]:PORT is refused inside.
#[test]
fn ipv6_loopback_inside_reaches_the_hosts_ipv6_loopback() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let dir6 = TempDir::new("hello6", None);
    let dir4 = TempDir::new("hello4", None);
    // A free port on ::1, then 127.0.0.1 on the same number (retried when another test took it).
    let (v6, v4, port) = (0..20)
        .find_map(|_| {
            let (v6, ports) = try_hello(&dir6, "::1", &[0], None)?;
            let (v4, _) = try_hello(&dir4, "127.0.0.1", &ports, None)?;
            Some((v6, v4, ports[0]))
        })
        .expect("a port free on both ::1 and 127.0.0.1");
    let open = ["--host-loopback".to_owned(), port.to_string()];
    let open: Vec<&str> = open.iter().map(String::as_str).collect();
    for host in ["::1", "127.0.0.1"] {
        let (code, body, err) = curl_inside(&open, &url(host, port, "/"));
        assert_eq!(
            (code, body.as_str()),
            (0, format!("hello from {host} port {port}\n").as_str()),
            "{host}: {err}"
        );
    }
    let (code, body, err) = curl_inside(&[], &url("::1", port, "/"));
    assert_eq!(code, 7, "without --host-loopback: {body}{err}");
    assert_eq!(v6.count_at_least("request on", 1), 1, "{}", v6.text());
    assert_eq!(v4.count_at_least("request on", 1), 1, "{}", v4.text());
}

/// Connects to 127.0.0.1:PORT (argv), sends a request and reads; prints what the program saw:
/// "refused" (the connect), "reset" (at the connect or after it), "eof" (an empty answer), "answer" or
/// "timeout".
const CONNECT_AND_READ: &str = r#"
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("answer" if s.recv(100) else "eof")
except socket.timeout:
    print("timeout")
except OSError as e:
    print({errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset", errno.EPIPE: "reset"}.get(e.errno, e))
"#;

/// A connection to a named host port where nothing listens fails inside as it would on the host: the
/// connect is refused (a connect handoff tries the host service itself, while the program waits),
/// and with `--forward relay`, which accepts inside first, the connection is reset, so the program
/// sees a failure, not an empty answer (which it could take for a response) or a hang. Without the
/// option it is refused, as nothing listens inside.
#[test]
fn a_refused_host_connection_is_refused_or_reset_inside() {
    // Bound but not listening: every connect to it is refused, and no other test can take the port.
    let held = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&held),
        &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
    )
    .unwrap();
    let port = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(
        std::os::fd::AsRawFd::as_raw_fd(&held),
    )
    .unwrap()
    .port()
    .to_string();
    let dir = TempDir::new("reset", None);
    let script = dir.write("connect.py", CONNECT_AND_READ);
    let command = [PYTHON, script.to_str().unwrap(), &port];
    let (_, out, err) = inside(&["--host-loopback", &port], &command);
    assert_eq!(out.trim(), "refused", "with --host-loopback {port}: {err}");
    let (_, out, err) = inside(&["--forward", "relay", "--host-loopback", &port], &command);
    assert_eq!(
        out.trim(),
        "reset",
        "with --forward relay --host-loopback {port}: {err}"
    );
    let (_, out, err) = inside(&[], &command);
    assert_eq!(out.trim(), "refused", "without --host-loopback: {err}");
}

// ---------------------------------------------------------------------------------------------
// 2. --host-loopback: UDP
// ---------------------------------------------------------------------------------------------

/// A UDP echo on ADDR PORT (argv; 0: a free port) answering "TAG: DATAGRAM"; prints "udp PORT", and
/// "got DATAGRAM" for each datagram.
const UDP_ECHO: &str = r#"
import socket, sys
addr, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
print("udp", s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(65536)
    print("got", data.decode(errors="replace"), flush=True)
    s.sendto(tag.encode() + b": " + data, peer)
"#;

/// Sends TEXT to HOST PORT (argv) over UDP from a connected socket, up to three times a second
/// apart; prints the answer, "refused" (ICMP port unreachable: nothing listens) or "no answer".
const UDP_ASK: &str = r#"
import socket, sys
host, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(1)
for _ in range(3):
    s.send(text.encode())
    try:
        print(s.recv(65536).decode())
        sys.exit(0)
    except socket.timeout:
        continue
    except ConnectionRefusedError:
        print("refused")
        sys.exit(1)
print("no answer")
sys.exit(1)
"#;

/// `--host-loopback U/udp`: a client inside sends to 127.0.0.1:U and gets the host echo's answer. A
/// second echo on the host's 127.0.0.1:V is not reached (refused inside, and it received nothing);
/// without the option, or with `--host-loopback U` (TCP), U is refused inside too.
#[test]
fn udp_reaches_a_host_loopback_service_and_no_other() {
    let dir = TempDir::new("udp-echo", None);
    let echo = dir.write("echo.py", UDP_ECHO);
    let ask = dir.write("ask.py", UDP_ASK);
    let start_echo = |tag: &str| {
        let mut svc = Service::start(
            unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON))
                .arg("-u")
                .arg(&echo)
                .args(["127.0.0.1", "0", tag]),
        );
        let port: u16 = svc.wait_word_after("udp ").unwrap().parse().unwrap();
        (svc, port)
    };
    let (named, u) = start_echo("named");
    let (other, v) = start_echo("other");
    let ask_inside = |options: &[&str], port: u16, text: &str| {
        let port = port.to_string();
        let (code, out, err) = inside(
            options,
            &[PYTHON, ask.to_str().unwrap(), "127.0.0.1", &port, text],
        );
        (code, out.trim().to_owned(), err)
    };
    let open = format!("{u}/udp");

    let (code, out, err) = ask_inside(&["--host-loopback", &open], u, "ping-u");
    assert_eq!((code, out.as_str()), (0, "named: ping-u"), "{err}");
    named.wait_for("got ping-u\n");

    let (code, out, err) = ask_inside(&["--host-loopback", &open], v, "ping-v");
    assert_eq!((code, out.as_str()), (1, "refused"), "{err}");

    let (code, out, err) = ask_inside(&[], u, "ping-none");
    assert_eq!((code, out.as_str()), (1, "refused"), "{err}");
    let (code, out, err) = ask_inside(&["--host-loopback", &u.to_string()], u, "ping-tcp");
    assert_eq!((code, out.as_str()), (1, "refused"), "{err}");

    assert!(
        !other.text().contains("got "),
        "the other UDP service got a datagram:\n{}",
        other.text()
    );
    assert_eq!(named.text().matches("got ").count(), 1, "{}", named.text());
}

/// The first datagram of a flow reaches the host service: a client inside that sends one datagram
/// and waits 2 s gets its answer (a DNS client, for one, sends each query from a new socket and
/// waits seconds before it asks again).
#[test]
fn udp_the_first_datagram_of_a_flow_reaches_the_host_service() {
    let dir = TempDir::new("udp-first", None);
    let echo = dir.write("echo.py", UDP_ECHO);
    let once = dir.write("once.py", UDP_ONCE);
    let mut svc = Service::start(
        unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON))
            .arg("-u")
            .arg(&echo)
            .args(["127.0.0.1", "0", "first"]),
    );
    let port = svc.wait_word_after("udp ").unwrap();
    let (code, out, err) = inside(
        &["--host-loopback", &format!("{port}/udp")],
        &[PYTHON, once.to_str().unwrap(), "127.0.0.1", &port, "one"],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "first: one"),
        "{err}\n{}",
        svc.text()
    );
}

/// Sends TEXT to HOST PORT (argv) once, and prints the answer or "no answer" after 2 s.
const UDP_ONCE: &str = r#"
import socket, sys
host, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(2)
s.send(text.encode())
try:
    print(s.recv(65536).decode())
except socket.timeout:
    print("no answer")
    sys.exit(1)
"#;

// ---------------------------------------------------------------------------------------------
// 3. --dns
// ---------------------------------------------------------------------------------------------

/// One query for the A record of NAME (argv) over TCP to SERVER port 53; prints the address, or
/// "refused" / "unreachable" when the connection fails.
const DNS_TCP_QUERY: &str = r#"
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
qname = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\0"
q = struct.pack(">HHHHHH", 0x4c50, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
try:
    s = socket.create_connection((server, 53), timeout=5)
except ConnectionRefusedError:
    print("refused")
    sys.exit(1)
except OSError as e:
    print("unreachable", e)
    sys.exit(1)
s.sendall(struct.pack(">H", len(q)) + q)
def recv(n):
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise SystemExit("the connection closed early")
        data += more
    return data
r = recv(struct.unpack(">H", recv(2))[0])
answers = struct.unpack(">H", r[6:8])[0]
print(socket.inet_ntoa(r[-4:]) if answers else "no answer")
"#;

/// The test resolv.conf's options: the C library's defaults (5 s before it asks again), so that a
/// lost first query shows as a slow lookup (`a_dns_lookup_is_answered_at_the_first_attempt`).
const RESOLV_OPTIONS: &str = "";

const TEST_NAME: &str = "test.lowport";
const TEST_ADDR: &str = "192.0.2.7";

fn dnsmasq_bin() -> Option<&'static str> {
    tool(&["/usr/sbin/dnsmasq", "/sbin/dnsmasq"])
}

/// dnsmasq as root in `netns`, on `addr` port 53 (UDP and TCP), answering from `records` alone
/// (`--host-record` values) and logging each query.
fn start_dnsmasq(netns: &TestNetns, addr: &str, records: &[&str]) -> Service {
    let mut cmd = Command::new(dnsmasq_bin().unwrap());
    cmd.args([
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--pid-file",
        "--log-facility=-",
        "--log-queries",
    ])
    .arg(format!("--listen-address={addr}"))
    .args(records.iter().map(|r| format!("--host-record={r}")));
    confine(&mut cmd, Some(netns), &[]);
    let dnsmasq = Service::start(&mut cmd);
    dnsmasq.wait_for("started, version");
    dnsmasq
}

/// A host of the test's own for `--dns`: a network namespace with dnsmasq on `addr` (answering
/// test.lowport with 192.0.2.7) and a resolv.conf naming it, which lowport alone sees as
/// /etc/resolv.conf. Fields drop in order: dnsmasq, the files, then the namespace.
struct Resolver {
    dnsmasq: Service,
    files: TempDir,
    netns: TestNetns,
}

impl Resolver {
    /// None (after `require`) when the machine cannot do it. A non-loopback `addr` goes on one end
    /// of a veth pair inside the namespace (this kernel has no dummy interfaces).
    fn start(tag: &str, addr: &str) -> Option<Resolver> {
        Self::start_with(tag, addr, RESOLV_OPTIONS)
    }

    /// The same, with `options` as the resolv.conf's `options` line ("" for none).
    fn start_with(tag: &str, addr: &str, options: &str) -> Option<Resolver> {
        if !require(dnsmasq_bin().is_some(), "dnsmasq (package dnsmasq)") {
            return None;
        }
        let netns = TestNetns::new(tag)?;
        if !addr.starts_with("127.") {
            netns.ip(&[
                "link", "add", "lpo0", "type", "veth", "peer", "name", "lpo1",
            ]);
            netns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "lpo0"]);
            netns.ip(&["link", "set", "lpo0", "up"]);
            netns.ip(&["link", "set", "lpo1", "up"]);
        }
        let files = TempDir::new(tag, None);
        let options = if options.is_empty() {
            String::new()
        } else {
            format!("options {options}\n")
        };
        files.write("resolv.conf", &format!("nameserver {addr}\n{options}"));
        files.write("tcp_query.py", DNS_TCP_QUERY);
        let record = format!("{TEST_NAME},{TEST_ADDR}");
        let dnsmasq = start_dnsmasq(&netns, addr, &[&record]);
        Some(Resolver {
            dnsmasq,
            files,
            netns,
        })
    }

    /// `lowport run OPTIONS -- COMMAND...` to its end, as uid 65534, in the namespace and with the
    /// test's resolv.conf.
    fn inside(&self, options: &[&str], command: &[&str]) -> (i32, String, String) {
        let resolv = self.files.path().join("resolv.conf");
        let mut cmd = lowport();
        confine(
            &mut cmd,
            Some(&self.netns),
            &[(&resolv, Path::new("/etc/resolv.conf"))],
        );
        cmd.arg("run").args(options).arg("--").args(command);
        run_to_end(&mut cmd)
    }

    fn tcp_query(&self) -> PathBuf {
        self.files.path().join("tcp_query.py")
    }

    /// The name looked up inside over UDP by the C library (`getent hosts`), and over TCP by a
    /// single query to `addr`: (getent's status and output, the TCP query's output).
    fn lookups(&self, options: &[&str], addr: &str) -> ((i32, String), String) {
        let (code, out, err) = self.inside(options, &[GETENT, "hosts", TEST_NAME]);
        let udp = (code, format!("{out}{err}"));
        let script = self.tcp_query();
        let (_, out, err) = self.inside(
            options,
            &[PYTHON, script.to_str().unwrap(), addr, TEST_NAME],
        );
        (udp, format!("{}{err}", out.trim()))
    }
}

/// `--dns` with a resolver on the host's loopback (127.0.0.53, where systemd-resolved listens): the
/// C library's lookup inside (UDP) and a query over TCP both get the test resolver's answer, and the
/// resolver logs the queries. Without `--dns` both fail: nothing inside listens on 127.0.0.53:53.
#[test]
fn dns_answers_from_a_resolver_on_the_hosts_loopback() {
    let Some(dns) = Resolver::start("dns-lo", "127.0.0.53") else {
        return;
    };
    let ((code, out), tcp) = dns.lookups(&["--dns"], "127.0.0.53");
    assert_eq!(
        code,
        0,
        "getent hosts {TEST_NAME}: {out}\n{}",
        dns.dnsmasq.text()
    );
    assert!(out.starts_with(&format!("{TEST_ADDR} ")), "{out}");
    assert_eq!(tcp, TEST_ADDR, "over TCP:\n{}", dns.dnsmasq.text());
    dns.dnsmasq.wait_for(&format!("query[A] {TEST_NAME} from "));

    let ((code, out), tcp) = dns.lookups(&[], "127.0.0.53");
    assert_eq!(code, 2, "getent hosts without --dns: {out}");
    assert_eq!(tcp, "refused", "over TCP without --dns");
}

/// `--dns` with a resolver on an address that is not loopback (10.83.0.53): lowport makes the address
/// local inside, so the lookups over UDP and TCP reach it there and go on from the host. Without
/// `--dns` the namespace has no route to it.
#[test]
fn dns_reaches_a_resolver_on_a_non_loopback_address() {
    let Some(dns) = Resolver::start("dns-addr", "10.83.0.53") else {
        return;
    };
    let ((code, out), tcp) = dns.lookups(&["--dns"], "10.83.0.53");
    assert_eq!(
        code,
        0,
        "getent hosts {TEST_NAME}: {out}\n{}",
        dns.dnsmasq.text()
    );
    assert!(out.starts_with(&format!("{TEST_ADDR} ")), "{out}");
    assert_eq!(tcp, TEST_ADDR, "over TCP:\n{}", dns.dnsmasq.text());

    let ((code, out), tcp) = dns.lookups(&[], "10.83.0.53");
    assert_eq!(code, 2, "getent hosts without --dns: {out}");
    assert!(
        tcp.starts_with("unreachable"),
        "over TCP without --dns: {tcp}"
    );
}

/// A lookup inside is answered at its first attempt, as on the host: with the C library's default
/// timeout (5 s), `getent hosts` (an AAAA and an A query, each from a new socket) ends in well under
/// a second. On the host the same lookup takes milliseconds.
#[test]
fn a_dns_lookup_is_answered_at_the_first_attempt() {
    let Some(dns) = Resolver::start_with("dns-first", "127.0.0.53", "") else {
        return;
    };
    let started = Instant::now();
    let (code, out, err) = dns.inside(&["--dns"], &[GETENT, "hosts", TEST_NAME]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        took < Duration::from_secs(2),
        "getent hosts {TEST_NAME} took {took:?}: a query went unanswered at its first attempt\n{}",
        dns.dnsmasq.text()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. --net pasta
// ---------------------------------------------------------------------------------------------

const PEER_TEXT: &str = "the page of the test's peer\n";
const PEER_PORT: u16 = 8000;

fn pasta_bin() -> Option<&'static str> {
    tool(&["/usr/bin/pasta", "/usr/local/bin/pasta", "/bin/pasta"])
}

/// A network of the test's own for pasta, which copies the host's addresses and routes:
///   host  veth0  10.8N.0.2/24, default route via 10.8N.0.1  (lowport and pasta run here)
///   peer  veth1  10.8N.0.1/24, Python's http.server on port 8000 as uid 65534
/// The peer forwards nothing, so the peer's server is all that the command inside can reach through
/// pasta. lowport gets the test's /dev/net/tun (a device node of the mode asked for) and a
/// resolv.conf naming 127.0.0.53, bind-mounted in a mount namespace of its own.
/// Fields drop in order: the peer's server, the files, the peer namespace, the host namespace.
struct PastaNet {
    peer_server: Service,
    _www: TempDir,
    files: TempDir,
    peer_addr: String,
    _peer: TestNetns,
    host: TestNetns,
}

impl PastaNet {
    /// None (after `require`) when the machine cannot do it.
    fn new(tag: &str, subnet: u8, tun_mode: u32) -> Option<PastaNet> {
        if !require(pasta_bin().is_some(), "pasta (package passt)")
            || !require(
                Path::new("/dev/net/tun").exists(),
                "/dev/net/tun (the tun module)",
            )
        {
            return None;
        }
        let host = TestNetns::new(&format!("{tag}-host"))?;
        let peer = TestNetns::new(&format!("{tag}-peer"))?;
        let (host_addr, peer_addr) = (format!("10.{subnet}.0.2"), format!("10.{subnet}.0.1"));
        host.ip(&[
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            peer.name(),
        ]);
        host.ip(&["addr", "add", &format!("{host_addr}/24"), "dev", "veth0"]);
        peer.ip(&["addr", "add", &format!("{peer_addr}/24"), "dev", "veth1"]);
        host.ip(&["link", "set", "veth0", "up"]);
        peer.ip(&["link", "set", "veth1", "up"]);
        host.ip(&["route", "add", "default", "via", &peer_addr]);

        let files = TempDir::new(&format!("{tag}-files"), None);
        // Only root needs to reach the device node: it is bind-mounted before lowport drops to 65534.
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let tun = files.path().join("tun");
        nix::sys::stat::mknod(
            &tun,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(tun_mode),
            nix::sys::stat::makedev(10, 200),
        )
        .expect("mknod the test's tun device");
        // mknod applied the umask.
        std::fs::set_permissions(&tun, std::fs::Permissions::from_mode(tun_mode)).unwrap();
        files.write("resolv.conf", "nameserver 127.0.0.53\n");

        let (www, peer_server, _) = try_http_app(
            &format!("{tag}-www"),
            &peer_addr,
            PEER_PORT,
            PEER_TEXT,
            Some(&peer),
        )
        .expect("the peer's http.server");
        Some(PastaNet {
            peer_server,
            _www: www,
            files,
            peer_addr,
            _peer: peer,
            host,
        })
    }

    /// lowport as uid 65534 in the host namespace, with the test's /dev/net/tun and resolv.conf.
    fn lowport(&self) -> Command {
        let tun = self.files.path().join("tun");
        let resolv = self.files.path().join("resolv.conf");
        let mut cmd = lowport();
        confine(
            &mut cmd,
            Some(&self.host),
            &[
                (&tun, Path::new("/dev/net/tun")),
                (&resolv, Path::new("/etc/resolv.conf")),
            ],
        );
        cmd
    }

    /// `lowport run OPTIONS -- COMMAND...` to its end: exit code, stdout, stderr.
    fn inside(&self, options: &[&str], command: &[&str]) -> (i32, String, String) {
        let mut cmd = self.lowport();
        cmd.arg("run").args(options).arg("--").args(command);
        run_to_end(&mut cmd)
    }

    fn peer_url(&self) -> String {
        url(&self.peer_addr, PEER_PORT, "/greeting.txt")
    }

    /// The pasta processes in the host namespace.
    fn pastas(&self) -> Vec<(u32, String, u32)> {
        self.host
            .processes()
            .into_iter()
            .filter(|(_, comm, _)| comm.starts_with("pasta") || comm.starts_with("passt"))
            .collect()
    }

    /// Nothing is left in the host namespace but the test's own `services`, within a second of
    /// lowport's exit (pasta gets SIGTERM as lowport ends).
    fn assert_nothing_left(&self, services: &[u32], context: &str) {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left: Vec<(u32, String, u32)> = self
                .host
                .processes()
                .into_iter()
                .filter(|(pid, _, _)| !services.contains(pid))
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left in the host namespace after lowport exited (pid, name, uid): {left:?}\n{context}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `--net pasta`: curl inside gets the peer's page (the packets leave through pasta, the only way
/// out of the namespace), and pasta is gone once lowport has exited. Without `--net pasta` the same
/// curl fails: the namespace has no route out.
#[test]
fn pasta_reaches_the_test_peer_and_without_it_nothing_does() {
    let Some(net) = PastaNet::new("pasta-out", 81, 0o666) else {
        return;
    };
    let (code, body, err) = net.inside(
        &["--net", "pasta"],
        &[CURL, "-sS", "--max-time", "5", &net.peer_url()],
    );
    assert_eq!((code, body.as_str()), (0, PEER_TEXT), "{err}");
    net.peer_server
        .wait_for("\"GET /greeting.txt HTTP/1.1\" 200");
    net.assert_nothing_left(&[], &err);

    let (code, body, err) = net.inside(&[], &[CURL, "-sS", "--max-time", "5", &net.peer_url()]);
    assert_eq!(code, 7, "without --net pasta: {body}{err}");
    assert_eq!(
        net.peer_server.text().matches("GET /greeting.txt").count(),
        1,
        "{}",
        net.peer_server.text()
    );
}

/// pasta's defaults would make the host's loopback reachable inside (at 127.0.0.1, and at the
/// gateway's address); lowport turns that off (`-T none`, `--no-map-gw`; checked by hand: plain
/// `pasta --config-net`, and lowport with a `pasta` in PATH that drops those options, reached this
/// test's service both ways). In one `--net pasta` run the peer answers (pasta is the way out) while a
/// service on the host namespace's 127.0.0.1:P is reached at neither address; `--host-loopback P`
/// then opens it.
#[test]
fn pasta_leaves_the_hosts_loopback_closed_until_named() {
    let Some(net) = PastaNet::new("pasta-lo", 82, 0o666) else {
        return;
    };
    let dir = TempDir::new("pasta-lo-hello", None);
    let (hello, ports) =
        try_hello(&dir, "127.0.0.1", &[0], Some(&net.host)).expect("the host's loopback service");
    let port = ports[0];
    // Each URL in turn, with what curl got.
    let script = "for u in \"$@\"; do \
                  if body=$(/usr/bin/curl -sS --max-time 2 \"$u\"); then echo \"reached $u: $body\"; \
                  else echo \"closed $u\"; fi; done";
    let (loopback, gateway) = (url("127.0.0.1", port, "/"), url(&net.peer_addr, port, "/"));
    let peer = net.peer_url();
    let (code, out, err) = net.inside(
        &["--net", "pasta"],
        &["/bin/sh", "-c", script, "sh", &peer, &loopback, &gateway],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("reached {peer}: {PEER_TEXT}closed {loopback}\nclosed {gateway}\n"),
        "{err}"
    );
    assert!(
        !hello.text().contains("request on"),
        "the host's loopback service got a request:\n{}",
        hello.text()
    );
    let (code, body, err) = net.inside(
        &["--net", "pasta", "--host-loopback", &port.to_string()],
        &[CURL, "-sS", "--max-time", "5", &loopback],
    );
    assert_eq!(
        (code, body.as_str()),
        (0, format!("hello from 127.0.0.1 port {port}\n").as_str()),
        "{err}"
    );
}

/// With `--net pasta` and a published port, nginx (`proxy_pass http://peer.lowport:8000;`) serves a
/// client of the host namespace on the published port (handed off, and with `--forward relay`
/// relayed: the relay's routes must not swallow the outbound traffic), fetching the page from the
/// peer through pasta, by a name the mirrored resolver answers (--net pasta implies --dns). The
/// readiness line reports pasta and the resolver. pasta runs as the caller while lowport runs, and
/// after SIGTERM nothing of the run is left in the host namespace.
#[test]
fn pasta_with_a_published_port_serves_host_clients_and_stops_with_the_run() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)")
        || !require(dnsmasq_bin().is_some(), "dnsmasq (package dnsmasq)")
    {
        return;
    }
    let Some(net) = PastaNet::new("pasta-pub", 85, 0o666) else {
        return;
    };
    let record = format!("peer.lowport,{}", net.peer_addr);
    let dnsmasq = start_dnsmasq(&net.host, "127.0.0.53", &[&record]);
    let nginx = nginx_proxy("pasta-nginx", &format!("peer.lowport:{PEER_PORT}"));
    for (forward, mode) in [("auto", "handoff"), ("relay", "relay")] {
        let mut cmd = net.lowport();
        run_args(
            &mut cmd,
            &[
                "--net",
                "pasta",
                "--forward",
                forward,
                "-p",
                "127.0.0.1:0:80",
            ],
        )
        .args(nginx_command(&nginx));
        let run = Lowport::start(cmd);
        let ready = run.ready();
        assert_eq!(ready["net"], "pasta", "{}", run.context());
        assert_eq!(
            ready["dns"],
            serde_json::json!(["127.0.0.53"]),
            "{}",
            run.context()
        );
        assert_eq!(ready["ports"][0]["mode"], mode, "{}", run.context());
        let pastas = net.pastas();
        assert!(
            pastas.iter().any(|(_, _, uid)| *uid == caller_uid()),
            "no pasta of uid {} in the host namespace while lowport runs: {pastas:?}\n{}",
            caller_uid(),
            run.context()
        );

        let page = url("127.0.0.1", run.launch.host_port(), "/greeting.txt");
        let body = eventually("nginx to serve the peer's page", || {
            let out = confine(&mut Command::new(CURL), Some(&net.host), &[])
                .args(["-sS", "-f", "--max-time", "5", &page])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        assert_eq!(body, PEER_TEXT, "--forward {forward}: {}", run.context());
        dnsmasq.wait_for("query[A] peer.lowport from ");

        let Lowport { mut launch, out } = run;
        launch.signal(Signal::SIGTERM);
        let status = launch.wait();
        // nginx ends on SIGTERM with status 0, and lowport with nginx's status.
        assert_eq!(exit_code(status), 0, "{}", out.text());
        net.assert_nothing_left(&[dnsmasq.pid()], &out.text());
    }
}

/// With a /dev/net/tun that the caller cannot open (mode 0600, owned by root), `--net pasta` fails
/// before the command runs: status 125, a message from lowport, the peer never contacted and nothing
/// of the run left.
#[test]
fn pasta_without_access_to_dev_net_tun_fails_before_the_command() {
    let Some(net) = PastaNet::new("pasta-tun", 86, 0o600) else {
        return;
    };
    let started = Instant::now();
    let (code, _, err) = net.inside(
        &["--net", "pasta"],
        &[CURL, "-sS", "--max-time", "5", &net.peer_url()],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.starts_with("lowport: --net pasta: "), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    net.assert_nothing_left(&[], &err);
    assert!(
        !net.peer_server.text().contains("GET "),
        "{}",
        net.peer_server.text()
    );
}

/// The same failure names its fix, as `--help` promises for a missing /dev/net/tun access.
#[test]
fn pasta_without_access_to_dev_net_tun_names_the_fix() {
    let Some(net) = PastaNet::new("pasta-tunfix", 87, 0o600) else {
        return;
    };
    let (code, _, err) = net.inside(&["--net", "pasta"], &["/bin/true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("chmod 0666 /dev/net/tun"), "{err}");
}

/// `--net pasta` without pasta in PATH names the package to install, and exits 125.
#[test]
fn pasta_missing_names_the_package() {
    let Some(netns) = TestNetns::new("pasta-missing") else {
        return;
    };
    let files = TempDir::new("pasta-missing", None);
    let resolv = files.write("resolv.conf", "nameserver 127.0.0.53\n");
    std::fs::create_dir(files.path().join("empty")).unwrap();
    let mut cmd = lowport();
    confine(
        &mut cmd,
        Some(&netns),
        &[(&resolv, Path::new("/etc/resolv.conf"))],
    );
    cmd.env("PATH", files.path().join("empty"))
        .args(["run", "--net", "pasta", "--", "/bin/true"]);
    let (code, _, err) = run_to_end(&mut cmd);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("install the passt package"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 5. The readiness line
// ---------------------------------------------------------------------------------------------

fn ready_of(mut cmd: Command) -> (serde_json::Value, String) {
    let mut launch = Launch::start({
        cmd.stdin(Stdio::null());
        cmd
    });
    launch.wait();
    (
        serde_json::from_str(&launch.ready_line).unwrap(),
        launch.stderr(),
    )
}

/// `--ready-fd` reports what the command may reach: `net` ("none" by default), `host_loopback` (each
/// value with its protocol) and `dns` (the resolvers of resolv.conf that lowport mirrors; a link-local
/// one, which cannot be reached inside, is left out and warned about). pasta's line is checked in
/// `pasta_with_a_published_port_serves_host_clients_and_stops_with_the_run`.
#[test]
fn the_readiness_line_reports_what_the_command_may_reach() {
    let mut cmd = lowport();
    run_args(&mut cmd, &[]).arg("/bin/true");
    let (v, _) = ready_of(cmd);
    assert_eq!(v["net"], "none", "{v}");
    assert_eq!(v["host_loopback"], serde_json::json!([]), "{v}");
    assert_eq!(v["dns"], serde_json::json!([]), "{v}");

    let mut cmd = lowport();
    run_args(
        &mut cmd,
        &[
            "--host-loopback",
            "3000",
            "--host-loopback",
            "53/udp",
            "--host-loopback",
            "8000-8010",
        ],
    )
    .arg("/bin/true");
    let (v, _) = ready_of(cmd);
    assert_eq!(
        v["host_loopback"],
        serde_json::json!(["3000/tcp", "53/udp", "8000-8010/tcp"]),
        "{v}"
    );
    assert_eq!(v["dns"], serde_json::json!([]), "{v}");

    let Some(netns) = TestNetns::new("ready-dns") else {
        return;
    };
    let files = TempDir::new("ready-dns", None);
    let resolv = files.write(
        "resolv.conf",
        "# test\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 10.84.0.53\nsearch lowport\n",
    );
    let mut cmd = lowport();
    confine(
        &mut cmd,
        Some(&netns),
        &[(&resolv, Path::new("/etc/resolv.conf"))],
    );
    run_args(&mut cmd, &["--dns"]).arg("/bin/true");
    let (v, err) = ready_of(cmd);
    assert_eq!(v["net"], "none", "{v}");
    assert_eq!(
        v["dns"],
        serde_json::json!(["127.0.0.53", "10.84.0.53"]),
        "{v}\n{err}"
    );
    assert!(
        err.contains("fe80::1%eth0"),
        "no warning about the link-local resolver: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Bad input
// ---------------------------------------------------------------------------------------------

/// The lines of a usage error that say something (clap adds a blank line and "For more information,
/// try '--help'.").
fn message_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect()
}

/// Bad `--host-loopback` values exit 2 with one line that quotes the value and names the problem.
#[test]
fn bad_host_loopback_values_are_usage_errors() {
    for (value, problem) in [
        ("0", "port 0 is not a port a service listens on"),
        ("9-3", "the range ends below its start"),
        ("3000/sctp", "'sctp' is not a protocol"),
        ("1-2000", "a range may name at most 1024"),
        ("db", "is not a port or range"),
    ] {
        let (code, _, err) = inside(&["--host-loopback", value], &["/bin/true"]);
        assert_eq!(code, 2, "--host-loopback {value}: {err}");
        let lines = message_lines(&err);
        assert_eq!(lines.len(), 1, "--host-loopback {value}: {err}");
        assert!(
            lines[0].contains(&format!("'{value}'")) && lines[0].contains(problem),
            "--host-loopback {value}: {err}"
        );
    }
}

/// `--dns` with a resolv.conf that names no nameserver exits 2 with one line saying so; the same
/// file without `--dns` is no error (lowport does not read it).
#[test]
fn dns_without_a_nameserver_is_a_usage_error() {
    let Some(netns) = TestNetns::new("dns-none") else {
        return;
    };
    let files = TempDir::new("dns-none", None);
    let resolv = files.write(
        "resolv.conf",
        "# no resolver\nsearch lowport\noptions edns0\n",
    );
    let run = |options: &[&str]| {
        let mut cmd = lowport();
        confine(
            &mut cmd,
            Some(&netns),
            &[(&resolv, Path::new("/etc/resolv.conf"))],
        );
        cmd.arg("run").args(options).args(["--", "/bin/true"]);
        run_to_end(&mut cmd)
    };
    let (code, _, err) = run(&["--dns"]);
    assert_eq!(code, 2, "{err}");
    let lines = message_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("names no nameserver"), "{err}");
    let (code, _, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
}

// ---------------------------------------------------------------------------------------------
// The connect handoff
// ---------------------------------------------------------------------------------------------

/// Connects to 127.0.0.1:PORT (argv) once, then the way an event loop does (nginx's ngx_event_connect_peer):
/// a non-blocking socket registered with epoll for EPOLLOUT, edge-triggered, before connect(); then
/// waits for epoll to say it is writable, sends a request, reads the answer. Prints "same" or "host"
/// (whether the connected socket belongs to the network namespace of a new socket made here:
/// SO_NETNS_COOKIE), then the answer's first line.
const EPOLL_CLIENT: &str = r#"
import errno, select, socket, sys
SO_NETNS_COOKIE = 71
port = int(sys.argv[1])
cookie = lambda s: s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
# A blocking connect first: lowport then knows this process, and must still find the epoll
# instance made after it.
socket.create_connection(("127.0.0.1", port)).close()
s = socket.socket()
s.setblocking(False)
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLET)
try:
    s.connect(("127.0.0.1", port))
except BlockingIOError:
    pass
events = ep.poll(5)
if not events:
    print("epoll never reported the socket"); sys.exit(1)
err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
if err:
    print("connect failed:", errno.errorcode.get(err, err)); sys.exit(1)
print("same" if cookie(s) == cookie(socket.socket()) else "host")
s.setblocking(True)
s.sendall(b"GET /greeting.txt HTTP/1.0\r\n\r\n")
print(s.makefile("rb").readline().decode().strip())
"#;

/// With handoff (the default), a program that connects to a `--host-loopback` address holds a socket
/// of the host's network namespace, connected to the host service directly (lowport relays nothing),
/// and an event loop that registered its socket with epoll before connecting is told when it is
/// connected. With `--forward relay` the program's socket stays its own and lowport relays.
#[test]
fn a_connect_to_a_host_service_gets_the_host_socket_itself() {
    let (_dir, _app, port) = http_app("connect-handoff", "127.0.0.1", "hello from the host\n");
    let script_dir = TempDir::new("connect-handoff-client", None);
    let client = script_dir.write("client.py", EPOLL_CLIENT);
    let port = port.to_string();
    let command = [PYTHON, client.to_str().unwrap(), &port];

    let (code, out, err) = inside(&["--host-loopback", &port], &command);
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"host"), "{out}\n{err}");
    assert!(
        lines.get(1).is_some_and(|l| l.contains(" 200 ")),
        "{out}\n{err}"
    );

    let (code, out, err) = inside(&["--forward", "relay", "--host-loopback", &port], &command);
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"same"), "{out}\n{err}");
    assert!(
        lines.get(1).is_some_and(|l| l.contains(" 200 ")),
        "{out}\n{err}"
    );
}

/// Opens one connection to 127.0.0.1:PORT (argv) and leaves it idle, then asks for /greeting.txt on
/// a second one; prints its status line, or "no answer" after 2 s.
const TWO_AT_ONCE: &str = r#"
import socket, sys
port = int(sys.argv[1])
idle = socket.create_connection(("127.0.0.1", port))
second = socket.create_connection(("127.0.0.1", port))
second.settimeout(2)
second.sendall(b"GET /greeting.txt HTTP/1.0\r\n\r\n")
try:
    print(second.makefile("rb").readline().decode().strip() or "no answer")
except socket.timeout:
    print("no answer")
"#;

/// Relayed connections to a host service are bounded by the same limit as published ports', which
/// is sized to the open-file limit also when no TCP port is published: a second connection is served
/// while a first one stays open.
#[test]
fn relayed_connections_to_a_host_service_are_not_served_one_at_a_time() {
    let (_dir, _app, port) = http_app("two-at-once", "127.0.0.1", APP_TEXT);
    let scripts = TempDir::new("two-at-once-client", None);
    let client = scripts.write("two.py", TWO_AT_ONCE);
    let port = port.to_string();
    let (code, out, err) = inside(
        &["--forward", "relay", "--host-loopback", &port],
        &[PYTHON, client.to_str().unwrap(), &port],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(" 200 "), "{out}\n{err}");
}

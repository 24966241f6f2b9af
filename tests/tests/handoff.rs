//! Socket handoff (`--forward auto|handoff|relay`): when the server binds a published port on the
//! wildcard address, lowport answers the bind with the host socket itself. Each test runs a real
//! server under lowport as an unprivileged user and checks, from the host, that:
//! - the server's process (not lowport's) holds the host's listening socket (`ss -lnp`);
//! - lowport holds no relayed connection while a client is connected (`ss -tnp`, /proc/PID/fd);
//! - the server sees each client's real address (127.0.0.9 and ::1) and the host port as its own.
//!
//! And that the fallbacks keep working: `--forward relay`, a nested lowport, a host port that needed
//! privilege, a 32-bit server, an io_uring bind, a client that arrives before the server binds.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lowport_tests::*;
use nix::sys::signal::Signal;

const PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A lowport run whose command's stdout and lowport's (and the command's) stderr are collected.
struct Server {
    watched: Watched,
}

impl std::ops::Deref for Server {
    type Target = Watched;

    fn deref(&self) -> &Watched {
        &self.watched
    }
}

impl Server {
    fn start(cmd: Command) -> Server {
        Server {
            watched: Watched::start(cmd),
        }
    }

    /// The host port of the first published mapping.
    fn port(&self) -> u16 {
        self.launch.host_port()
    }

    fn lowport_pid(&self) -> u32 {
        self.launch.child.id()
    }

    /// The command's process and its descendants (host pids).
    fn server_pids(&self) -> HashSet<u32> {
        let mut pids: HashSet<u32> = descendants(self.launch.pid).into_iter().collect();
        pids.insert(self.launch.pid);
        pids
    }

    /// lowport's own processes: lowport, its host socket factory and the pid-1 helper; everything
    /// in lowport's tree that is not the command's.
    fn lowport_pids(&self) -> HashSet<u32> {
        let server = self.server_pids();
        let mut pids: HashSet<u32> = descendants(self.lowport_pid())
            .into_iter()
            .filter(|p| !server.contains(p))
            .collect();
        pids.insert(self.lowport_pid());
        pids
    }

    /// The `mode` of each published mapping in the readiness report, as "tcp 0.0.0.0 handoff".
    fn modes(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.launch.ready_line).unwrap();
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{} {} {}",
                    p["protocol"].as_str().unwrap_or("?"),
                    p["host_ip"].as_str().unwrap_or("?"),
                    p["mode"].as_str().unwrap_or("(no mode)")
                )
            })
            .collect()
    }
}

/// One socket as `ss -H -n -p` lists it.
#[derive(Debug, Clone)]
struct SsEntry {
    local: String,
    /// (process name, pid) for each process holding the socket.
    users: Vec<(String, u32)>,
}

impl SsEntry {
    fn pids(&self) -> HashSet<u32> {
        self.users.iter().map(|(_, p)| *p).collect()
    }
}

/// `ss -H -n -p ARGS`, parsed.
fn ss(args: &[&str]) -> Vec<SsEntry> {
    let out = Command::new("ss")
        .args(["-H", "-n", "-p"])
        .args(args)
        .output()
        .expect("run ss (package iproute2)");
    assert!(
        out.status.success(),
        "ss {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let users = fields
                .iter()
                .find(|f| f.starts_with("users:"))
                .map(|f| parse_users(f))
                .unwrap_or_default();
            let addrs: Vec<&str> = fields
                .iter()
                .copied()
                .filter(|f| !f.starts_with("users:") && f.contains(':'))
                .collect();
            Some(SsEntry {
                // The peer's address follows the local one.
                local: addrs.get(..2)?[0].to_string(),
                users,
            })
        })
        .collect()
}

/// `users:(("nginx",pid=12,fd=6),("nginx",pid=13,fd=6))` into names and pids.
fn parse_users(field: &str) -> Vec<(String, u32)> {
    field
        .split("(\"")
        .skip(1)
        .filter_map(|part| {
            let (name, rest) = part.split_once('"')?;
            let pid = rest.split("pid=").nth(1)?;
            let pid: String = pid.chars().take_while(char::is_ascii_digit).collect();
            Some((name.to_owned(), pid.parse().ok()?))
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// The listening (TCP) or bound (UDP) sockets on the host's `port` of one family ('4' or '6').
fn host_listeners(proto: Proto, family: char, port: u16) -> Vec<SsEntry> {
    let kind = match proto {
        Proto::Tcp => "-t",
        Proto::Udp => "-u",
    };
    let fam = format!("-{family}");
    ss(&["-l", kind, &fam, &format!("sport = :{port}")])
}

/// The server's processes, and only them, hold every listening socket of `family` on the host port:
/// the host socket was handed over, lowport keeps no copy.
fn assert_server_listens(server: &Server, proto: Proto, family: char, port: u16) {
    let entries = host_listeners(proto, family, port);
    let ours = server.server_pids();
    assert!(
        !entries.is_empty(),
        "no IPv{family} {proto:?} socket listens on host port {port}\n{}",
        server.context()
    );
    for e in &entries {
        assert!(
            !e.users.is_empty() && e.pids().is_subset(&ours),
            "host socket {} (IPv{family} {proto:?}) is held by {:?}, expected only the server's processes {ours:?} (lowport is {})\n{}",
            e.local,
            e.users,
            server.lowport_pid(),
            server.context()
        );
    }
}

/// lowport (not the server) holds the listening socket of `family` on the host port: it relays.
fn assert_lowport_listens(server: &Server, proto: Proto, family: char, port: u16) {
    let entries = host_listeners(proto, family, port);
    assert!(
        !entries.is_empty(),
        "no IPv{family} socket listens on host port {port}\n{}",
        server.context()
    );
    for e in &entries {
        assert!(
            e.pids().contains(&server.lowport_pid()),
            "host socket {} is held by {:?}, expected lowport ({}), which relays\n{}",
            e.local,
            e.users,
            server.lowport_pid(),
            server.context()
        );
    }
}

/// A TCP connection from `source` to `to`.
fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage};
    let src = SocketAddr::new(source.parse().unwrap(), 0);
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(PATIENCE))?;
    Ok(s)
}

/// Connects from `source` to the host port and, while the connection is open, checks that the
/// server's process holds its end and lowport holds no relayed connection at all.
fn assert_direct_connection(server: &Server, source: &str, to: SocketAddr) {
    let client = connect_from(source, to).expect("connect to the host port");
    let me = client.local_addr().unwrap();
    let filter = format!("sport = :{} and dport = :{}", to.port(), me.port());
    let ours = server.server_pids();
    let accepted = eventually("the server to accept the connection", || {
        ss(&["-t", "state", "established", &filter])
            .into_iter()
            .find(|e| !e.users.is_empty())
    });
    assert!(
        accepted.pids().is_subset(&ours),
        "the host end of the connection is held by {:?}, expected the server's processes {ours:?}\n{}",
        accepted.users,
        server.context()
    );
    let relayed = relayed_sockets(&server.launch);
    assert!(
        relayed.is_empty(),
        "lowport holds relayed connections {relayed:?} while the server holds the host socket\n{}",
        server.context()
    );
    let lowport = server.lowport_pids();
    let held: Vec<SsEntry> = ss(&["-t", "state", "established"])
        .into_iter()
        .filter(|e| !e.pids().is_disjoint(&lowport))
        .collect();
    assert!(
        held.is_empty(),
        "lowport's processes hold established connections: {held:?}"
    );
    drop(client);
}

/// No process of lowport's own (lowport, its factory, the pid-1 helper) holds the listening socket of
/// `family` on `port`: count its descriptors whose inode is the socket's.
fn assert_lowport_holds_no_copy(server: &Server, proto: Proto, family: char, port: u16) {
    let table = match (proto, family) {
        (Proto::Tcp, '4') => "/proc/net/tcp",
        (Proto::Tcp, _) => "/proc/net/tcp6",
        (Proto::Udp, '4') => "/proc/net/udp",
        (Proto::Udp, _) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(table).unwrap();
    let want = format!(":{port:04X}");
    let inodes: HashSet<u64> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = proto == Proto::Udp || f.get(3) == Some(&"0A");
            (f.get(1)?.ends_with(&want) && listening).then(|| f.get(9)?.parse().ok())?
        })
        .collect();
    assert!(
        !inodes.is_empty(),
        "no socket on host port {port} in {table}"
    );
    for pid in server.lowport_pids() {
        let copies = held_sockets(pid).intersection(&inodes).count();
        assert_eq!(
            copies,
            0,
            "process {pid} of lowport ({}) holds {copies} descriptor(s) of the handed-over host socket on port {port}",
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim()
        );
    }
    let server_holds = server
        .server_pids()
        .iter()
        .any(|p| !held_sockets(*p).is_disjoint(&inodes));
    assert!(server_holds, "no server process holds the host socket");
}

/// `curl -sS --max-time 5 ARGS URL`: the exit code and the body.
fn curl(args: &[&str], url: &str) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "-g", "--max-time", "5"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// GETs / from 127.0.0.9 until the server answers 200 (it may still be starting).
fn get_v4(port: u16) -> String {
    eventually("the server to answer 127.0.0.9", || {
        let (code, body) = curl(
            &["--interface", "127.0.0.9", "-f"],
            &format!("http://127.0.0.9:{port}/"),
        );
        (code == 0).then_some(body)
    })
}

fn get_v6(port: u16) -> String {
    eventually("the server to answer ::1", || {
        let (code, body) = curl(&["-f"], &format!("http://[::1]:{port}/"));
        (code == 0).then_some(body)
    })
}

fn python(script_dir: &TempDir, name: &str, script: &str) -> Vec<String> {
    let path = script_dir.write(name, script);
    vec![PYTHON.into(), "-u".into(), path.display().to_string()]
}

/// lowport as the caller `who` (uid 65534 by default), `run -p PUBLISH OPTIONS --ready-fd 3 -- COMMAND`.
/// A Python server from `script` (saved as `name` in a directory of its own, removed with the
/// returned guard) under `lowport run OPTIONS`, as uid 65534.
fn python_server(tag: &str, options: &[&str], name: &str, script: &str) -> (TempDir, Server) {
    let dir = TempDir::new(tag, None);
    let server = Server::start(lowport_run(None, options, &python(&dir, name, script)));
    (dir, server)
}

fn lowport_run(who: Option<(u32, u32)>, options: &[&str], command: &[String]) -> Command {
    let mut cmd = match who {
        Some((uid, gid)) => unprivileged_as(uid, gid, &lowport_bin()),
        None => lowport(),
    };
    run_args(&mut cmd, options).args(command);
    cmd
}

fn host_uid(pid: u32) -> Option<u32> {
    proc_status_field(pid, "Uid")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// 1. nginx
// ---------------------------------------------------------------------------------------------

/// An nginx directory: configuration with `listen 80; listen [::]:80;`, an access log of
/// `$remote_addr $server_port`, and www/index.html. `user` is the workers' `user` line.
fn nginx_dir(tag: &str, owner: (u32, u32), user: &str, extra: &str) -> TempDir {
    let dir = TempDir::new(tag, Some(owner));
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::set_permissions(
        dir.path().join("www"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    dir.write("www/index.html", "nginx handed\n");
    write_nginx_conf(&dir, user, extra);
    dir
}

fn write_nginx_conf(dir: &TempDir, user: &str, extra: &str) {
    let d = dir.path().display();
    let http = format!(
        "log_format peers '$remote_addr $server_port';\n  access_log {d}/access.log peers;"
    );
    let server = format!("listen 80;\n    listen [::]:80;\n    root {d}/www;\n    {extra}");
    let conf = NginxConf {
        workers: 2,
        user,
        log_level: "notice",
        http: &http,
        server: &server,
    };
    dir.write("nginx.conf", &conf.text(dir.path()));
}

fn access_log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default()
}

/// nginx serves both families on the host sockets themselves, and logs each client's real address
/// with the host port as its own.
fn nginx_serves_on_the_host_sockets(server: &Server, dir: &TempDir) {
    let port = server.port();
    assert_eq!(get_v4(port), "nginx handed\n");
    // nginx writes the log line after the response has gone out.
    let logged = |line: String| {
        let deadline = Instant::now() + PATIENCE;
        while !access_log(dir).contains(&line) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        access_log(dir).contains(&line)
    };
    assert!(
        logged(format!("127.0.0.9 {port}\n")),
        "nginx's access log should show 127.0.0.9 and the host port {port}:\n{}\n{}",
        access_log(dir),
        server.context()
    );
    assert_server_listens(server, Proto::Tcp, '4', port);
    assert_direct_connection(
        server,
        "127.0.0.9",
        SocketAddr::from(([127, 0, 0, 9], port)),
    );
    if has_ipv6() {
        assert_eq!(get_v6(port), "nginx handed\n");
        assert!(
            logged(format!("::1 {port}\n")),
            "nginx's access log should show ::1 and the host port {port}:\n{}",
            access_log(dir)
        );
        assert_server_listens(server, Proto::Tcp, '6', port);
        assert_direct_connection(server, "::1", format!("[::1]:{port}").parse().unwrap());
    }
    assert!(
        server.modes().iter().all(|m| m.ends_with(" handoff")),
        "{:?}",
        server.modes()
    );
}

#[test]
fn nginx_serves_both_families_on_the_host_sockets() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let caller = (caller_uid(), if is_root() { NOBODY } else { caller_uid() });
    let dir = nginx_dir("nginx", caller, "root root", "");
    let server = Server::start(lowport_run(None, &["-p", "0:80"], &nginx_command(&dir)));
    nginx_serves_on_the_host_sockets(&server, &dir);
}

/// Under subordinate ids nginx's workers run as www-data (another host uid), and accept on the host
/// sockets their master was handed.
#[test]
fn nginx_with_www_data_workers_under_subids_serves_on_the_host_sockets() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let www = nix::unistd::User::from_name("www-data").ok().flatten();
    if !require(www.is_some(), "the www-data user") {
        return;
    }
    let dir = nginx_dir("nginx-subids", (uid, gid), "www-data www-data", "");
    let server = Server::start(lowport_run(
        Some((uid, gid)),
        &["--userns", "subids", "-p", "0:80"],
        &nginx_command(&dir),
    ));
    nginx_serves_on_the_host_sockets(&server, &dir);
    // The workers, as www-data, hold the host socket too.
    let text = std::fs::read_to_string("/etc/subuid").unwrap();
    let start: u32 = text
        .lines()
        .find(|l| l.starts_with(&format!("{SUBID_USER}:")))
        .and_then(|l| l.split(':').nth(1)?.parse().ok())
        .expect("a range for the test user in /etc/subuid");
    let www_host = start + www.unwrap().uid.as_raw() - 1;
    let listeners = host_listeners(Proto::Tcp, '4', server.port());
    let holders: Vec<u32> = listeners.iter().flat_map(|e| e.pids()).collect();
    assert!(
        holders.iter().any(|p| host_uid(*p) == Some(www_host)),
        "a www-data worker (host uid {www_host}) should hold the host socket; holders {holders:?}"
    );
}

/// An app on the host's loopback that answers each request after `DELAY` seconds (argv: DELAY);
/// prints its port.
const SLOW_APP: &str = r#"
import socket, sys, threading, time
delay = float(sys.argv[1])
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    c.recv(65536)
    time.sleep(delay)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nslow app\n")
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// nginx's workers, as www-data (another uid inside, and dumpable again: nginx makes them so), proxy to
/// an app on the host's loopback through `--host-loopback`: while a request is in flight, the
/// connection to the app belongs to a worker, not to lowport (the connect was handed a host socket).
#[test]
fn nginx_workers_as_www_data_connect_to_a_host_service_directly() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    if !require(
        nix::unistd::User::from_name("www-data")
            .ok()
            .flatten()
            .is_some(),
        "the www-data user",
    ) {
        return;
    }
    let app_dir = TempDir::new("slow-app", None);
    let app_script = app_dir.write("app.py", SLOW_APP);
    let mut app = KillOnDrop(
        Command::new(PYTHON)
            .args(["-u", app_script.to_str().unwrap(), "1.5"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(app.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let app_port: u16 = line.trim().parse().unwrap();
    let dir = nginx_dir(
        "nginx-upstream",
        (uid, gid),
        "www-data www-data",
        &format!("location /app/ {{ proxy_pass http://127.0.0.1:{app_port}/; }}"),
    );
    let server = Server::start(lowport_run(
        Some((uid, gid)),
        &[
            "--log-level",
            "debug",
            "--userns",
            "subids",
            "-p",
            "127.0.0.1:0:80",
            "--host-loopback",
            &app_port.to_string(),
        ],
        &nginx_command(&dir),
    ));
    let addr: SocketAddr = ([127, 0, 0, 1], server.port()).into();
    eventually("nginx to serve", || {
        http(addr, "GET", "/", b"").ok().filter(|(s, _)| *s == 200)
    });
    // A connect that lowport cannot hand over (its source port taken at that moment, say) is
    // relayed, by design; a worker whose connects are never handed over fails all three tries.
    let lowport_pid = server.launch.child.id();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let request = std::thread::spawn(move || http(addr, "GET", "/app/", b""));
        let deadline = Instant::now() + PATIENCE;
        let holders = loop {
            let conns = ss(&[
                "-t",
                "-4",
                "state",
                "established",
                &format!("dport = :{app_port}"),
            ]);
            let pids: HashSet<u32> = conns.iter().flat_map(|e| e.pids()).collect();
            if !pids.is_empty() {
                break pids;
            }
            if request.is_finished() || Instant::now() > deadline {
                panic!(
                    "no connection to the app seen; the request gave {:?}\n{}",
                    request
                        .join()
                        .unwrap()
                        .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned())),
                    server.context()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (status, body) = request.join().unwrap().unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (200, "slow app\n"),
            "{}",
            server.context()
        );
        let handed = !holders.contains(&lowport_pid)
            && holders
                .iter()
                .all(|p| proc_status_field(*p, "Name").is_some_and(|n| n.contains("nginx")));
        if handed {
            drop(app);
            return;
        }
        seen.push(holders);
    }
    panic!(
        "the connection to the app was lowport's (relayed, not handed) every time: {seen:?} (lowport is {lowport_pid})\n{}",
        server.context()
    );
}

/// A child process killed and reaped when dropped, a failing test included.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Python's http.server
// ---------------------------------------------------------------------------------------------

fn http_server(bind: &str) -> (TempDir, Server) {
    let dir = TempDir::new(&format!("http-server-{}", bind.replace(':', "6")), None);
    dir.write("index.html", "python handed\n");
    let command: Vec<String> = [
        PYTHON,
        "-u",
        "-m",
        "http.server",
        "80",
        "--bind",
        bind,
        "--directory",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.path().display().to_string()])
    .collect();
    let server = Server::start(lowport_run(None, &["-p", "0:80"], &command));
    (dir, server)
}

#[test]
fn python_http_server_on_0_0_0_0_gets_the_ipv4_host_socket() {
    let (_dir, server) = http_server("0.0.0.0");
    let port = server.port();
    // getsockname() in the server shows the host port.
    server
        .out
        .wait_for(&format!("Serving HTTP on 0.0.0.0 port {port} "));
    assert_eq!(get_v4(port), "python handed\n");
    server.out.wait_for("127.0.0.9 - - [");
    assert_server_listens(&server, Proto::Tcp, '4', port);
    assert_direct_connection(
        &server,
        "127.0.0.9",
        SocketAddr::from(([127, 0, 0, 9], port)),
    );
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
    if has_ipv6() {
        // An IPv4-only server gets no IPv6 client, as on the host; the client is told promptly.
        let (code, out) = curl(&[], &format!("http://[::1]:{port}/"));
        assert!(
            code != 0 && code != 28,
            "an IPv6 client of an IPv4-only server: curl exit {code} (0 = served, 28 = hung): {out}"
        );
    }
}

#[test]
fn python_http_server_on_ipv6_wildcard_is_dual_stack_on_the_host() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let (_dir, server) = http_server("::");
    let port = server.port();
    server
        .out
        .wait_for(&format!("Serving HTTP on :: port {port} "));
    assert_eq!(get_v4(port), "python handed\n");
    server.out.wait_for("::ffff:127.0.0.9 - - [");
    assert_eq!(get_v6(port), "python handed\n");
    server.out.wait_for("\n::1 - - [");
    // One dual-stack host socket took the place of the 0.0.0.0 and [::] pair.
    assert_server_listens(&server, Proto::Tcp, '6', port);
    let v4 = host_listeners(Proto::Tcp, '4', port);
    assert!(
        v4.is_empty(),
        "the dual-stack server's host socket should replace lowport's 0.0.0.0:{port}: {v4:?}"
    );
    assert_direct_connection(
        &server,
        "127.0.0.9",
        SocketAddr::from(([127, 0, 0, 9], port)),
    );
    assert_direct_connection(&server, "::1", format!("[::1]:{port}").parse().unwrap());
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '6', port);
}

// ---------------------------------------------------------------------------------------------
// 3. iperf3
// ---------------------------------------------------------------------------------------------

#[test]
fn iperf3_server_measures_on_the_host_socket() {
    let Some(iperf3) = tool(&["/usr/bin/iperf3"]) else {
        require(false, "iperf3 (package iperf3)");
        return;
    };
    let command: Vec<String> = [iperf3, "-s", "-p", "80", "--forceflush"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = Server::start(lowport_run(None, &["-p", "0:80"], &command));
    let port = server.port();
    server.out.wait_for("Server listening on 80");
    // iperf3 binds [::] dual-stack (or 0.0.0.0 where there is no IPv6).
    let family = if has_ipv6() { '6' } else { '4' };
    assert_server_listens(&server, Proto::Tcp, family, port);
    let run = |args: &[&str]| {
        let (code, out, err) = run_to_end(Command::new(iperf3).args(args));
        assert_eq!(code, 0, "iperf3 {args:?}: {out}{err}\n{}", server.context());
    };
    let p = port.to_string();
    // iperf3 closes its listening socket after each test and binds again (a fresh host socket each
    // time): wait for its n-th "Server listening" before the next client.
    let listening = |n: usize| {
        eventually("iperf3 to listen again", || {
            (server.out.text().matches("Server listening on 80").count() >= n).then_some(())
        })
    };
    run(&["-c", "127.0.0.9", "-B", "127.0.0.9", "-p", &p, "-t", "1"]);
    server.out.wait_for("Accepted connection from ");
    let text = server.out.text();
    assert!(
        text.contains("127.0.0.9") && text.contains(&format!("port {p} connected to")),
        "iperf3 should see 127.0.0.9 on its local port {p} (the host's):\n{text}"
    );
    if has_ipv6() {
        listening(2);
        run(&["-c", "::1", "-p", &p, "-t", "1"]);
        eventually("iperf3 to log the IPv6 client", || {
            server
                .out
                .text()
                .contains("Accepted connection from ::1")
                .then_some(())
        });
    }
    listening(if has_ipv6() { 3 } else { 2 });
    assert_server_listens(&server, Proto::Tcp, family, port);
    assert_lowport_holds_no_copy(&server, Proto::Tcp, family, port);
    assert!(
        relayed_sockets(&server.launch).is_empty(),
        "{:?}",
        relayed_sockets(&server.launch)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. UDP: dnsmasq
// ---------------------------------------------------------------------------------------------

/// A DNS query for test.lowport from SOURCE to DEST:PORT (argv), retried until answered; prints the A
/// record and the address the answer came from.
const DNS_QUERY: &str = r#"
import socket, struct, sys, time
source, dest, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in dest else socket.AF_INET
name = b"".join(bytes([len(p)]) + p for p in b"test.lowport".split(b"."))
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((source, 0))
s.settimeout(0.5)
deadline = time.time() + 15
while time.time() < deadline:
    s.sendto(q, (dest, port))
    try:
        r, frm = s.recvfrom(512)
    except socket.timeout:
        continue
    print(socket.inet_ntoa(r[-4:]), frm[0], frm[1])
    break
"#;

#[test]
fn dnsmasq_answers_on_the_host_udp_sockets() {
    let Some(dnsmasq) = tool(&["/usr/sbin/dnsmasq", "/sbin/dnsmasq"]) else {
        require(false, "dnsmasq (package dnsmasq)");
        return;
    };
    // dnsmasq switches to nobody after its binds: that needs subordinate ids.
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let dir = TempDir::new("dnsmasq", None);
    let query = dir.write("query.py", DNS_QUERY);
    // No --listen-address: dnsmasq binds the wildcard addresses, 0.0.0.0:53 and [::]:53.
    let command: Vec<String> = [
        dnsmasq,
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--port=53",
        "--address=/test.lowport/192.0.2.77",
        "--pid-file",
        "--log-facility=-",
        "--log-queries",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start(lowport_run(
        Some((uid, gid)),
        &[
            "--userns",
            "subids",
            "--forward",
            "handoff",
            "-p",
            "0:53/udp",
        ],
        &command,
    ));
    let port = server.port();
    let ask = |source: &str, dest: &str| {
        let (code, out, err) = run_to_end(
            unprivileged_as(NOBODY, NOBODY, Path::new(PYTHON))
                .arg(&query)
                .args([source, dest, &port.to_string()]),
        );
        assert_eq!(code, 0, "{err}");
        out
    };
    let answer = ask("127.0.0.9", "127.0.0.1");
    assert_eq!(
        answer.trim(),
        format!("192.0.2.77 127.0.0.1 {port}"),
        "{}",
        server.context()
    );
    server.out.wait_for("query[A] test.lowport from 127.0.0.9");
    assert_server_listens(&server, Proto::Udp, '4', port);
    assert_lowport_holds_no_copy(&server, Proto::Udp, '4', port);
    if has_ipv6() {
        let answer = ask("::1", "::1");
        assert_eq!(answer.trim(), format!("192.0.2.77 ::1 {port}"));
        server.out.wait_for("query[A] test.lowport from ::1");
        assert_server_listens(&server, Proto::Udp, '6', port);
        assert_lowport_holds_no_copy(&server, Proto::Udp, '6', port);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A Go/Node-style dual-stack listener
// ---------------------------------------------------------------------------------------------

/// Answers each connection with "PEER_IP LOCAL_PORT" and closes it.
const DUAL_STACK: &str = r#"
import socket
s = socket.create_server(("", 80), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening on port", s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("%s %d\n" % (peer[0], c.getsockname()[1])).encode())
    c.close()
"#;

fn read_reply(mut s: TcpStream) -> String {
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("a reply");
    reply
}

#[test]
fn a_dual_stack_listener_gets_one_host_socket_for_both_families() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let (_dir, server) = python_server("dualstack", &["-p", "0:80"], "dual.py", DUAL_STACK);
    let port = server.port();
    server.out.wait_for(&format!("listening on port {port}\n"));
    let v4 = read_reply(connect_from("127.0.0.9", ([127, 0, 0, 9], port).into()).unwrap());
    assert_eq!(v4, format!("::ffff:127.0.0.9 {port}\n"));
    let v6 = read_reply(connect_from("::1", format!("[::1]:{port}").parse().unwrap()).unwrap());
    assert_eq!(v6, format!("::1 {port}\n"));
    assert_server_listens(&server, Proto::Tcp, '6', port);
    assert!(host_listeners(Proto::Tcp, '4', port).is_empty());
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '6', port);
}

// ---------------------------------------------------------------------------------------------
// 6. Binding again: close and rebind, SO_REUSEPORT groups, nginx reload
// ---------------------------------------------------------------------------------------------

/// Three times: bind 0.0.0.0:80, say so, serve one client ("ROUND PEER LOCAL_PORT"), close.
const REBIND: &str = r#"
import socket
for i in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80))
    s.listen(16)
    print("round %d listening on port %d" % (i, s.getsockname()[1]), flush=True)
    c, peer = s.accept()
    c.sendall(("%d %s %d\n" % (i, peer[0], c.getsockname()[1])).encode())
    c.close()
    s.close()
print("all rounds done", flush=True)
"#;

#[test]
fn a_server_that_closes_and_binds_again_gets_a_host_socket_each_time() {
    let (_dir, server) = python_server("rebind", &["-p", "0:80"], "rebind.py", REBIND);
    let port = server.port();
    for round in 0..3 {
        server
            .out
            .wait_for(&format!("round {round} listening on port {port}\n"));
        assert_server_listens(&server, Proto::Tcp, '4', port);
        assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
        let reply = read_reply(connect_from("127.0.0.9", ([127, 0, 0, 9], port).into()).unwrap());
        assert_eq!(
            reply,
            format!("{round} 127.0.0.9 {port}\n"),
            "{}",
            server.context()
        );
    }
    server.out.wait_for("all rounds done\n");
    let out = server.out.clone();
    let mut launch = server.watched.launch;
    assert!(launch.wait().success(), "{}", out.text());
}

/// Three SO_REUSEPORT sockets on 0.0.0.0:80; each connection is answered with the index of the socket
/// that accepted it.
const REUSEPORT: &str = r#"
import select, socket
socks = []
for i in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", 80))
    s.listen(64)
    socks.append(s)
print("listening on ports", [s.getsockname()[1] for s in socks], flush=True)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        c, peer = s.accept()
        c.sendall(("%d %s\n" % (socks.index(s), peer[0])).encode())
        c.close()
"#;

#[test]
fn so_reuseport_workers_each_get_a_host_socket_and_all_serve() {
    let (_dir, server) = python_server("reuseport", &["-p", "0:80"], "reuseport.py", REUSEPORT);
    let port = server.port();
    server
        .out
        .wait_for(&format!("listening on ports [{port}, {port}, {port}]\n"));
    let listeners = host_listeners(Proto::Tcp, '4', port);
    assert_eq!(
        listeners.len(),
        3,
        "three host sockets in the SO_REUSEPORT group: {listeners:?}\n{}",
        server.context()
    );
    assert_server_listens(&server, Proto::Tcp, '4', port);
    let mut seen = HashSet::new();
    for _ in 0..300 {
        let reply = read_reply(connect_from("127.0.0.9", ([127, 0, 0, 9], port).into()).unwrap());
        let (index, peer) = reply.trim().split_once(' ').expect("INDEX PEER");
        assert_eq!(peer, "127.0.0.9");
        seen.insert(index.to_owned());
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "every socket of the group serves: {seen:?}");
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
}

/// The nginx master's children (its workers), host pids.
fn nginx_workers(master: u32) -> HashSet<u32> {
    descendants(master).into_iter().collect()
}

#[test]
fn nginx_reloaded_with_sighup_keeps_serving_on_the_host_sockets() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let caller = (caller_uid(), if is_root() { NOBODY } else { caller_uid() });
    let dir = nginx_dir("nginx-reload", caller, "root root", "");
    let server = Server::start(lowport_run(None, &["-p", "0:80"], &nginx_command(&dir)));
    let port = server.port();
    assert_eq!(get_v4(port), "nginx handed\n");
    let old_workers = eventually("nginx's workers", || {
        let w = nginx_workers(server.launch.pid);
        (w.len() == 2).then_some(w)
    });
    // A new location shows that the new configuration is in force.
    write_nginx_conf(
        &dir,
        "root root",
        "location = /reloaded { return 200 \"reloaded\\n\"; }",
    );
    server.launch.signal(Signal::SIGHUP);
    eventually("nginx to serve the new configuration", || {
        let (code, body) = curl(
            &["--interface", "127.0.0.9"],
            &format!("http://127.0.0.9:{port}/reloaded"),
        );
        (code == 0 && body == "reloaded\n").then_some(())
    });
    eventually("the old workers to exit", || {
        nginx_workers(server.launch.pid)
            .is_disjoint(&old_workers)
            .then_some(())
    });
    assert!(access_log(&dir).contains(&format!("127.0.0.9 {port}\n")));
    assert_server_listens(&server, Proto::Tcp, '4', port);
    assert_direct_connection(
        &server,
        "127.0.0.9",
        SocketAddr::from(([127, 0, 0, 9], port)),
    );
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
    if has_ipv6() {
        assert_eq!(get_v6(port), "nginx handed\n");
        assert_server_listens(&server, Proto::Tcp, '6', port);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Signals during bind
// ---------------------------------------------------------------------------------------------

/// Binds 20 sockets in turn (bind, listen, close) while SIGALRM fires every 50 µs; prints one JSON
/// line per bind with the number of calls it took and the errors seen, then serves one client on a
/// 21st socket. argv[1] "restart" installs the handler with SA_RESTART (siginterrupt False), as C
/// servers usually do; "default" keeps Python's (no SA_RESTART).
const SIGNALS: &str = r#"
import json, signal, socket, sys
count = 0
def tick(sig, frame):
    global count
    count += 1
signal.signal(signal.SIGALRM, tick)
if sys.argv[1] == "restart":
    signal.siginterrupt(signal.SIGALRM, False)
signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)
for i in range(21):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    calls, errors = 0, []
    while True:
        calls += 1
        try:
            s.bind(("0.0.0.0", 80))
            break
        except InterruptedError as e:
            errors.append(e.errno)
        except OSError as e:
            errors.append(e.errno)
            break
        if calls > 1000:
            break
    port = s.getsockname()[1]
    s.listen(4)
    print(json.dumps({"i": i, "calls": calls, "errors": errors, "port": port}), flush=True)
    if i == 20:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        print(json.dumps({"signals": count}), flush=True)
        c, peer = s.accept()
        c.sendall(("%s %d\n" % (peer[0], c.getsockname()[1])).encode())
        c.close()
    s.close()
"#;

/// `eintr_allowed`: whether a call may fail with EINTR before a retry succeeds (see the test
/// without SA_RESTART).
fn binds_under_a_signal_storm(mode: &str, eintr_allowed: bool) {
    let dir = TempDir::new(&format!("signals-{mode}"), None);
    let mut command = python(&dir, "signals.py", SIGNALS);
    command.push(mode.into());
    let server = Server::start(lowport_run(None, &["-p", "0:80"], &command));
    let port = server.port();
    server.out.wait_for("{\"signals\": ");
    let text = server.out.text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let binds: Vec<&serde_json::Value> = lines.iter().filter(|v| v.get("i").is_some()).collect();
    assert_eq!(binds.len(), 21, "{text}");
    let signals = lines.iter().find_map(|v| v["signals"].as_u64()).unwrap();
    assert!(
        signals >= 21,
        "the timer fired only {signals} times:\n{text}"
    );
    let bad: Vec<&&serde_json::Value> = binds
        .iter()
        .filter(|b| {
            let errors = b["errors"].as_array().cloned().unwrap_or_default();
            let only_eintr = errors.iter().all(|e| e == 4);
            let calls_ok = if eintr_allowed {
                only_eintr && b["calls"].as_u64() == Some(errors.len() as u64 + 1)
            } else {
                b["calls"] == 1 && errors.is_empty()
            };
            !calls_ok || b["port"] != port
        })
        .collect();
    assert!(
        bad.is_empty(),
        "every bind should succeed ({}) and end on host port {port}; these did not (errno 4 is EINTR, 22 EINVAL: a socket handed twice, 98 EADDRINUSE):\n{}\nfull output:\n{}",
        if eintr_allowed { "after EINTRs only" } else { "at its first call" },
        bad.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n"),
        server.context()
    );
    assert_server_listens(&server, Proto::Tcp, '4', port);
    let reply = read_reply(connect_from("127.0.0.9", ([127, 0, 0, 9], port).into()).unwrap());
    assert_eq!(reply, format!("127.0.0.9 {port}\n"));
}

#[test]
fn binds_interrupted_by_signals_with_sa_restart_succeed_once_each() {
    binds_under_a_signal_storm("restart", false);
}

/// Python installs its handlers without SA_RESTART. A signal that arrives while a stopped bind
/// waits for lowport, before lowport has read it, makes the kernel end the call with EINTR (after
/// the read, WAIT_KILLABLE_RECV keeps it waiting); on the host bind() never does. What lowport
/// guarantees: the call that fails did nothing (no socket handed, so the retry is not EINVAL), and
/// a retry succeeds on the host port. docs/usage.md says so.
#[test]
fn binds_interrupted_by_signals_without_sa_restart_fail_only_with_eintr_and_retry_cleanly() {
    binds_under_a_signal_storm("default", true);
}

// ---------------------------------------------------------------------------------------------
// 8. Fallbacks
// ---------------------------------------------------------------------------------------------

#[test]
fn forward_relay_keeps_the_host_socket_in_lowport_and_relays_real_addresses() {
    let dir = TempDir::new("relay", None);
    dir.write("index.html", "relayed\n");
    let command: Vec<String> = [PYTHON, "-u", "-m", "http.server", "80", "--bind", "0.0.0.0"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--directory".into(), dir.path().display().to_string()])
        .collect();
    let server = Server::start(lowport_run(
        None,
        &["--forward", "relay", "-p", "0:80"],
        &command,
    ));
    let port = server.port();
    assert!(
        server.modes().iter().all(|m| m.ends_with(" relay")),
        "{:?}",
        server.modes()
    );
    // The server's own socket is port 80 inside.
    server.out.wait_for("Serving HTTP on 0.0.0.0 port 80 ");
    assert_eq!(get_v4(port), "relayed\n");
    server.out.wait_for("127.0.0.9 - - [");
    assert_lowport_listens(&server, Proto::Tcp, '4', port);
    // While a client is connected, lowport holds the relayed connection.
    let client = connect_from("127.0.0.9", ([127, 0, 0, 9], port).into()).unwrap();
    eventually("lowport to relay the connection", || {
        (!relayed_sockets(&server.launch).is_empty()).then_some(())
    });
    drop(client);
}

#[test]
fn readiness_reports_the_mode_of_each_port() {
    let dir = TempDir::new("modes", None);
    // The server serves every published port, UDP included: readiness waits for each.
    let script = DUAL_STACK.replacen(
        "\nwhile True:",
        "\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('0.0.0.0', 53))\nwhile True:",
        1,
    );
    let command = python(&dir, "dual.py", &script);
    let server = Server::start(lowport_run(
        None,
        &["--forward", "handoff", "-p", "0:80", "-p", "0:53/udp"],
        &command,
    ));
    let modes = server.modes();
    assert!(
        !modes.is_empty() && modes.iter().all(|m| m.ends_with(" handoff")),
        "{modes:?}"
    );
    assert_eq!(modes.len(), server.launch.ports.len());
    drop(server);
    // Under auto, UDP ports are relayed: a handed UDP socket could send anywhere from the host's
    // network namespace.
    let server = Server::start(lowport_run(
        None,
        &[
            "--forward",
            "auto",
            "-p",
            "127.0.0.1:0:80",
            "-p",
            "127.0.0.1:0:53/udp",
        ],
        &command,
    ));
    assert_eq!(
        server.modes(),
        ["tcp 127.0.0.1 handoff", "udp 127.0.0.1 relay"]
    );
}

#[test]
fn forward_handoff_with_socket_activation_is_bad_usage() {
    let (code, _, err) = run_to_end(lowport().args([
        "run",
        "--forward",
        "handoff",
        "--socket-activation",
        "-p",
        "0:80",
        "--",
        "true",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("lowport: "), "{err}");
}

/// lowport inside lowport: the inner one cannot get a seccomp listener (one per filter chain) and
/// relays; the outer one hands its host socket to the inner lowport, whose bind it sees.
#[test]
fn a_nested_lowport_relays_for_its_server() {
    let dir = TempDir::new("nested", Some((caller_uid(), caller_uid_gid())));
    dir.write("index.html", "nested\n");
    let inner_ready = dir.path().join("inner-ready.json");
    let script = format!(
        "exec {lowport} run --ready-fd 4 -p 8081:80 -- {PYTHON} -u -m http.server 80 --bind 0.0.0.0 --directory {d} 4>{ready}",
        lowport = lowport_bin().display(),
        d = dir.path().display(),
        ready = inner_ready.display(),
    );
    let server = Server::start(lowport_run(
        None,
        &["-p", "0:8081"],
        &["/bin/sh".into(), "-c".into(), script],
    ));
    let port = server.port();
    let ready = eventually("the inner lowport's readiness", || {
        let text = std::fs::read_to_string(&inner_ready).ok()?;
        text.ends_with('\n').then_some(text)
    });
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let inner_modes: Vec<&str> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["mode"].as_str().unwrap_or("(none)"))
        .collect();
    assert!(
        !inner_modes.is_empty() && inner_modes.iter().all(|m| *m == "relay"),
        "the inner lowport relays: {ready}"
    );
    assert_eq!(get_v4(port), "nested\n", "{}", server.context());
    // The server, two namespaces down, still sees the client's own address.
    server.out.wait_for("127.0.0.9 - - [");
    // The inner lowport (the outer one's command) holds the host socket, and the outer relays nothing.
    assert_server_listens(&server, Proto::Tcp, '4', port);
    let inner = server.launch.pid;
    assert!(
        host_listeners(Proto::Tcp, '4', port)
            .iter()
            .all(|e| e.pids().contains(&inner)),
        "the inner lowport ({inner}) holds the host socket"
    );
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
}

fn caller_uid_gid() -> u32 {
    if is_root() {
        NOBODY
    } else {
        nix::unistd::getgid().as_raw()
    }
}

/// A host port below the host's ip_unprivileged_port_start, bound through the file capability, is
/// never handed to the server: lowport keeps it and relays.
#[test]
fn a_privileged_host_port_stays_relayed() {
    let start = sysctl("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    if !require(start > 100, "a host where ports below 100 need privilege") {
        return;
    }
    let Some((dir, bin)) = setcap_copy("privileged") else {
        return;
    };
    dir.write("index.html", "privileged\n");
    let low = (20..100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free low port");
    let mut cmd = unprivileged_as(NOBODY, NOBODY, &bin);
    run_args(
        &mut cmd,
        &["-p", &format!("127.0.0.1:{low}:80"), "-p", "127.0.0.1:0:81"],
    )
    .args([
        PYTHON,
        "-u",
        "-c",
        "import http.server, threading, functools, sys\n\
         h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
         a = http.server.ThreadingHTTPServer(('0.0.0.0', 80), h)\n\
         b = http.server.ThreadingHTTPServer(('0.0.0.0', 81), h)\n\
         print('ports', a.server_address[1], b.server_address[1], flush=True)\n\
         threading.Thread(target=b.serve_forever, daemon=True).start()\n\
         a.serve_forever()\n",
    ])
    .arg(dir.path());
    let server = Server::start(cmd);
    let high = server.launch.ports[1].host_port;
    assert_eq!(
        server.modes(),
        ["tcp 127.0.0.1 relay", "tcp 127.0.0.1 handoff"],
        "{}",
        server.context()
    );
    // Port 80 inside kept its own socket; port 81 was handed the host one.
    server.out.wait_for(&format!("ports 80 {high}\n"));
    let (code, body) = curl(
        &["--interface", "127.0.0.9"],
        &format!("http://127.0.0.1:{low}/"),
    );
    assert_eq!((code, body.as_str()), (0, "privileged\n"));
    server.out.wait_for("127.0.0.9 - - [");
    assert_lowport_listens(&server, Proto::Tcp, '4', low);
    assert_server_listens(&server, Proto::Tcp, '4', high);
}

/// i386 code that never uses libc: socket, SO_REUSEADDR, bind 0.0.0.0:80, listen, then answer each
/// client with one line. Its bind goes through the compat ABI, which the filter does not report.
const I386_SERVER: &str = r#"
static long sys5(long n, long a, long b, long c, long d, long e) {
    long r;
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e) : "memory");
    return r;
}
void _start(void) {
    unsigned char addr[16] = {2, 0, 0, 80};
    int one = 1;
    long s = sys5(359, 2, 1, 0, 0, 0);                       /* socket(AF_INET, SOCK_STREAM, 0) */
    sys5(366, s, 1, 2, (long)&one, sizeof one);             /* setsockopt(SO_REUSEADDR) */
    if (sys5(361, s, (long)addr, 16, 0, 0) < 0) sys5(1, 3, 0, 0, 0, 0);   /* bind, or exit 3 */
    if (sys5(363, s, 16, 0, 0, 0) < 0) sys5(1, 4, 0, 0, 0, 0);           /* listen, or exit 4 */
    sys5(4, 1, (long)"listening\n", 10, 0, 0);
    for (;;) {
        long c = sys5(364, s, 0, 0, 0, 0);                    /* accept4 */
        if (c >= 0) {
            sys5(4, c, (long)"hello from i386\n", 16, 0, 0);
            sys5(6, c, 0, 0, 0, 0);
        }
    }
}
"#;

#[test]
fn a_32_bit_server_is_relayed() {
    let dir = TempDir::new("i386", None);
    let source = dir.write("server.c", I386_SERVER);
    let bin = dir.path().join("server32");
    let built = Command::new("gcc")
        .args([
            "-m32",
            "-nostdlib",
            "-static",
            "-ffreestanding",
            "-fno-pie",
            "-no-pie",
            "-fno-stack-protector",
            "-O1",
            "-o",
        ])
        .arg(&bin)
        .arg(&source)
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(built, "gcc able to build i386 code (gcc -m32)") {
        return;
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(lowport_run(
        None,
        &["-p", "127.0.0.1:0:80"],
        &[bin.display().to_string()],
    ));
    let port = server.port();
    server.out.wait_for("listening\n");
    let reply = read_reply(eventually("the i386 server to answer", || {
        connect_from("127.0.0.9", ([127, 0, 0, 1], port).into()).ok()
    }));
    assert_eq!(reply, "hello from i386\n");
    assert_lowport_listens(&server, Proto::Tcp, '4', port);
}

/// A server that binds 0.0.0.0:80 with io_uring's IORING_OP_BIND (Linux 6.11) instead of bind(2),
/// through the raw io_uring_setup and io_uring_enter system calls and the rings mapped by hand (no
/// liburing). It prints the port its socket got, then listen()s and answers each client with a line
/// holding the client's address, and waits for the client to close. With the argument `probe` it
/// only tries IORING_OP_BIND on 127.0.0.1:0, where it runs, and says how that went.
const URING_SERVER: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
/* enum io_uring_op: IORING_OP_BIND is 56 and IORING_OP_LISTEN 57 since Linux 6.11; older headers
   do not name them. */
#define OP_BIND 56

static const char *stage = "";

#define U32(base, off) ((unsigned *)((char *)(base) + (off)))

/* Binds `fd` to `addr` with one IORING_OP_BIND: 0, or minus the errno of the step named by `stage`. */
static int uring_bind(int fd, const struct sockaddr_in *addr) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    stage = "io_uring_setup";
    int ring = syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) return -errno;
    stage = "mmap";
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    void *sq = mmap(0, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    void *cq = mmap(0, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) return -errno;

    unsigned tail = *U32(sq, p.sq_off.tail);
    unsigned index = tail & *U32(sq, p.sq_off.ring_mask);
    struct io_uring_sqe *sqe = &sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = OP_BIND;
    sqe->fd = fd;
    sqe->addr = (unsigned long)addr;     /* the address */
    sqe->addr2 = sizeof *addr;           /* its length */
    U32(sq, p.sq_off.array)[index] = index;
    __atomic_store_n(U32(sq, p.sq_off.tail), tail + 1, __ATOMIC_RELEASE);

    stage = "io_uring_enter";
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) return -errno;
    stage = "the completion queue";
    unsigned head = *U32(cq, p.cq_off.head);
    if (head == __atomic_load_n(U32(cq, p.cq_off.tail), __ATOMIC_ACQUIRE)) return -EIO;
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)((char *)cq + p.cq_off.cqes);
    int res = cqes[head & *U32(cq, p.cq_off.ring_mask)].res;
    __atomic_store_n(U32(cq, p.cq_off.head), head + 1, __ATOMIC_RELEASE);
    stage = "IORING_OP_BIND";
    munmap(sq, sq_len);
    munmap(cq, cq_len);
    munmap(sqes, sqes_len);
    close(ring);
    return res;
}

int main(int argc, char **argv) {
    int probe = argc > 1 && strcmp(argv[1], "probe") == 0;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(probe ? 0 : 80);
    addr.sin_addr.s_addr = htonl(probe ? INADDR_LOOPBACK : INADDR_ANY);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
        perror("socket");
        return 2;
    }
    int r = uring_bind(s, &addr);
    if (r < 0) {
        printf("%s errno %d\n", stage, -r);
        return 3;
    }
    if (probe) {
        printf("IORING_OP_BIND ok\n");
        return 0;
    }
    socklen_t len = sizeof addr;
    getsockname(s, (struct sockaddr *)&addr, &len);
    if (listen(s, 8) < 0) {
        perror("listen");
        return 4;
    }
    printf("bound port %d with io_uring\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t peer_len = sizeof peer;
        int c = accept(s, (struct sockaddr *)&peer, &peer_len);
        if (c < 0) continue;
        char ip[INET_ADDRSTRLEN] = "?";
        inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
        printf("accepted %s\n", ip);
        fflush(stdout);
        dprintf(c, "%s\n", ip);
        char buf[64];
        while (read(c, buf, sizeof buf) > 0) {}
        close(c);
    }
}
"#;

/// A bind done with io_uring's IORING_OP_BIND never reaches seccomp, so lowport, which planned a
/// handoff for the port, never hears of it: it keeps the host socket and relays, and the server
/// still sees each client's real address.
#[test]
fn an_io_uring_bind_is_relayed() {
    let disabled = sysctl("kernel/io_uring_disabled").unwrap_or(0);
    if !require(
        disabled == 0,
        &format!("io_uring open to unprivileged processes (sysctl kernel.io_uring_disabled is {disabled})"),
    ) {
        return;
    }
    let dir = TempDir::new("uring", None);
    let source = dir.write("server.c", URING_SERVER);
    let bin = dir.path().join("uring-server");
    let built = Command::new("gcc")
        .args(["-O1", "-Wall", "-o"])
        .arg(&bin)
        .arg(&source)
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(
        built,
        "gcc and the Linux io_uring headers (linux/io_uring.h)",
    ) {
        return;
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Whether this kernel lets lowport's user bind with io_uring at all.
    let probe = unprivileged_as(NOBODY, NOBODY, &bin)
        .arg("probe")
        .stdin(Stdio::null())
        .output()
        .expect("run the io_uring probe");
    let said = String::from_utf8_lossy(&probe.stdout).into_owned();
    let einval = format!("IORING_OP_BIND errno {}\n", libc::EINVAL);
    if !require(
        said != einval,
        "Linux 6.11 or later: this kernel answers io_uring's IORING_OP_BIND with EINVAL",
    ) {
        return;
    }
    let setup_refused = [libc::ENOSYS, libc::EPERM]
        .iter()
        .any(|e| said == format!("io_uring_setup errno {e}\n"));
    if !require(
        !setup_refused,
        &format!("io_uring_setup to work for uid {NOBODY}: {}", said.trim()),
    ) {
        return;
    }
    assert!(
        probe.status.success() && said == "IORING_OP_BIND ok\n",
        "the io_uring probe: {said}{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let server = Server::start(lowport_run(
        None,
        &["-p", "127.0.0.1:0:80"],
        &[bin.display().to_string()],
    ));
    let port = server.port();
    // lowport planned a handoff...
    assert_eq!(
        server.modes(),
        ["tcp 127.0.0.1 handoff"],
        "{}",
        server.context()
    );
    // ...but never saw the bind: the server's socket is port 80 of its own namespace, not the host's.
    server.out.wait_for("with io_uring\n");
    assert!(
        server.out.text().contains("bound port 80 with io_uring\n"),
        "the io_uring bind was handed a host socket\n{}",
        server.context()
    );
    assert_lowport_listens(&server, Proto::Tcp, '4', port);
    let ours = server.server_pids();
    for e in host_listeners(Proto::Tcp, '4', port) {
        assert!(
            e.pids().is_disjoint(&ours),
            "the server ({ours:?}) holds host socket {}: {:?}\n{}",
            e.local,
            e.users,
            server.context()
        );
    }
    // The client is served through the relay, and the server sees its real address.
    let client = eventually("the io_uring server to accept", || {
        connect_from("127.0.0.9", ([127, 0, 0, 1], port).into()).ok()
    });
    let mut line = String::new();
    BufReader::new(&client)
        .read_line(&mut line)
        .expect("a line from the server");
    assert_eq!(line, "127.0.0.9\n", "{}", server.context());
    assert!(
        !relayed_sockets(&server.launch).is_empty(),
        "lowport relays the open connection\n{}",
        server.context()
    );
    server.out.wait_for("accepted 127.0.0.9\n");
    drop(client);
    assert_lowport_listens(&server, Proto::Tcp, '4', port);
}

// ---------------------------------------------------------------------------------------------
// 9. Before the server binds
// ---------------------------------------------------------------------------------------------

/// Clients that connect while the server sleeps before its bind are served or refused at once; none
/// waits until curl's time-out.
#[test]
fn clients_before_the_bind_are_served_or_refused_never_left_hanging() {
    let dir = TempDir::new("late", None);
    dir.write("index.html", "late\n");
    let script = format!(
        "sleep 1; exec {PYTHON} -u -m http.server 80 --bind 0.0.0.0 --directory {}",
        dir.path().display()
    );
    let server = Server::start(lowport_run(
        None,
        &["-p", "0:80"],
        &["/bin/sh".into(), "-c".into(), script],
    ));
    let port = server.port();
    let url = format!("http://127.0.0.9:{port}/");
    let started = Instant::now();
    let mut clients = Vec::new();
    // Clients through the second before the bind (and just after it).
    for _ in 0..12 {
        let url = url.clone();
        clients.push(std::thread::spawn(move || {
            let t = Instant::now();
            let (code, out) = curl(&["--interface", "127.0.0.9"], &url);
            (code, out, t.elapsed())
        }));
        std::thread::sleep(Duration::from_millis(100));
    }
    let results: Vec<(i32, String, Duration)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    let hung: Vec<&(i32, String, Duration)> = results
        .iter()
        .filter(|(code, _, took)| *code == 28 || *took > Duration::from_secs(4))
        .collect();
    assert!(
        hung.is_empty(),
        "clients that connected before the bind hung (curl exit 28 is its time-out): {hung:?}\nall: {results:?}\n{}",
        server.context()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    for (code, out, _) in &results {
        assert!(
            *code == 0 && out == "late\n" || [7, 52, 56].contains(code),
            "a client is served or refused: exit {code}, {out}"
        );
    }
    assert_eq!(get_v4(port), "late\n");
    assert_server_listens(&server, Proto::Tcp, '4', port);
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
}

// ---------------------------------------------------------------------------------------------
// 10. No copy left behind
// ---------------------------------------------------------------------------------------------

/// After the handoff no process of lowport's holds a descriptor of the host socket, for both
/// families, and a server exiting leaves the port free at once (nobody else holds it).
#[test]
fn lowport_keeps_no_copy_of_a_handed_over_socket() {
    let dir = TempDir::new("nocopy", None);
    let script = "import signal, socket\n\
        socks = []\n\
        for fam, addr in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::')):\n\
        \x20   try:\n\
        \x20       s = socket.socket(fam, socket.SOCK_STREAM)\n\
        \x20   except OSError:\n\
        \x20       continue\n\
        \x20   if fam == socket.AF_INET6:\n\
        \x20       s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
        \x20   s.bind((addr, 80))\n\
        \x20   s.listen(8)\n\
        \x20   socks.append(s)\n\
        print('bound', len(socks), flush=True)\n\
        signal.pause()\n";
    let server = Server::start(lowport_run(
        None,
        &["-p", "0:80"],
        &python(&dir, "nocopy.py", script),
    ));
    let port = server.port();
    server.out.wait_for("bound ");
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '4', port);
    assert_server_listens(&server, Proto::Tcp, '4', port);
    if has_ipv6() {
        assert_lowport_holds_no_copy(&server, Proto::Tcp, '6', port);
        assert_server_listens(&server, Proto::Tcp, '6', port);
    }
    // The server goes; nothing listens on the host port any more: lowport kept nothing.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.launch.pid as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let mut launch = server.watched.launch;
    launch.wait();
    assert!(host_listeners(Proto::Tcp, '4', port).is_empty());
    assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Regressions found by attacking the handoff as a hostile server
// ---------------------------------------------------------------------------------------------

/// Binds `[::]:80` dual-stack with SO_REUSEPORT (the fresh-socket path) and reports IPV6_V6ONLY.
const DUAL_STACK_REUSEPORT: &str = r#"
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 80))
s.listen(8)
print("v6only %d port %d" % (s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), s.getsockname()[1]), flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("%s\n" % peer[0]).encode())
    c.close()
"#;

/// With only `[::]` published, a server asking for a dual-stack socket must not get the host's IPv4
/// wildcard too: the socket it gets is IPv6-only, and 127.0.0.1 on that port stays unserved.
#[test]
fn a_dual_stack_bind_never_takes_an_unpublished_ipv4_wildcard() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let dir = TempDir::new("v6only", None);
    let server = Server::start(lowport_run(
        None,
        &["-p", "[::]:0:80"],
        &python(&dir, "dual.py", DUAL_STACK_REUSEPORT),
    ));
    let port = server.port();
    server.out.wait_for(&format!("v6only 1 port {port}\n"));
    let v6 = read_reply(connect_from("::1", format!("[::1]:{port}").parse().unwrap()).unwrap());
    assert_eq!(v6, "::1\n");
    assert_server_listens(&server, Proto::Tcp, '6', port);
    assert!(
        host_listeners(Proto::Tcp, '4', port).is_empty(),
        "nothing may listen on 0.0.0.0:{port}: {:?}",
        host_listeners(Proto::Tcp, '4', port)
    );
    let refused = TcpStream::connect(("127.0.0.1", port));
    assert!(
        refused.is_err(),
        "an IPv4 client reached the server through an unpublished address"
    );
}

/// Binds an IPv6-only TCP socket to `[::]:port` on the host, as another program could.
fn v6only_bind(port: u16) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6};
    let fd = nix::sys::socket::socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    let any = SockaddrIn6::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ));
    nix::sys::socket::bind(fd.as_raw_fd(), &any)?;
    Ok(fd)
}

/// Binds 0.0.0.0:80, then [::]:80 dual-stack, which fails with EADDRINUSE as on the host; waits.
const FAILED_DUAL_BIND: &str = r#"
import socket, time
a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
a.bind(("0.0.0.0", 80)); a.listen(8)
b = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
try:
    b.bind(("::", 80)); print("dual bind ok", flush=True)
except OSError as e:
    print("dual bind errno %d" % e.errno, flush=True)
time.sleep(60)
"#;

/// A fresh bind that the host refuses leaves the port's other family reserved and refusing, not
/// listening with nobody to accept (a client there would hang) and not free for another program.
#[test]
fn a_refused_fresh_bind_leaves_the_port_reserved_and_refusing() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let (_dir, server) =
        python_server("faileddual", &["-p", "0:80"], "failed.py", FAILED_DUAL_BIND);
    let port = server.port();
    server.out.wait_for("dual bind errno 98\n");
    let started = std::time::Instant::now();
    let v6 = TcpStream::connect_timeout(
        &format!("[::1]:{port}").parse().unwrap(),
        Duration::from_secs(5),
    );
    assert!(
        v6.is_err() && started.elapsed() < Duration::from_secs(2),
        "an IPv6 client must be refused at once: {v6:?} after {:?}",
        started.elapsed()
    );
    // IPv6-only: a dual-stack bind would collide with the server's own 0.0.0.0 socket and fail
    // even with the IPv6 port free.
    let other = v6only_bind(port);
    assert!(
        other.is_err(),
        "the IPv6 host port must stay reserved: another program bound [::]:{port} (IPv6-only)"
    );
    assert!(host_listeners(Proto::Tcp, '6', port).is_empty());
}

/// Binds 0.0.0.0:80 as uid 33 and reports the outcome; then, as root inside, reports again.
const PORT_START: &str = r#"
import os, socket
def attempt(who):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", 80)); print("%s bound %d" % (who, s.getsockname()[1]), flush=True)
    except OSError as e:
        print("%s errno %d" % (who, e.errno), flush=True)
    return s
pid = os.fork()
if pid == 0:
    os.setgid(33); os.setuid(33)
    attempt("uid33")
    os._exit(0)
os.waitpid(pid, 0)
# Kept, so that lowport reports readiness: the host socket root was handed listens.
kept = attempt("root")
import time; time.sleep(1000)
"#;

/// `--port-start` keeps its meaning with handoff: lowport answers a bind before the kernel checks
/// the namespace's ip_unprivileged_port_start, so it checks it itself. A uid without
/// CAP_NET_BIND_SERVICE inside gets EACCES for port 80, as with the relay; root inside gets the
/// host socket.
#[test]
fn port_start_still_applies_to_handed_ports() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let dir = TempDir::new("portstart", Some((uid, gid)));
    let server = Server::start(lowport_run(
        Some((uid, gid)),
        &["--userns", "subids", "--port-start", "1024", "-p", "0:80"],
        &python(&dir, "portstart.py", PORT_START),
    ));
    let port = server.port();
    server.out.wait_for("uid33 errno 13\n");
    server.out.wait_for(&format!("root bound {port}\n"));
}

/// A dual-stack server (Go, Node, Java, iperf3 bind `[::]` so) and an IPv4 host address alone
/// (`-p 127.0.0.1:H:80`): its IPv6 socket gets that address as `::ffff:127.0.0.1`, which serves
/// IPv4 alone, and the family stays the one it asked for.
#[test]
fn a_dual_stack_server_takes_an_ipv4_only_host_address_as_mapped() {
    let (_dir, server) = python_server("mapped", &["-p", "127.0.0.1:0:80"], "dual.py", DUAL_STACK);
    let port = server.port();
    server.out.wait_for(&format!("listening on port {port}\n"));
    let reply = read_reply(connect_from("127.0.0.9", ([127, 0, 0, 1], port).into()).unwrap());
    assert_eq!(
        reply,
        format!("::ffff:127.0.0.9 {port}\n"),
        "{}",
        server.context()
    );
    assert_server_listens(&server, Proto::Tcp, '6', port);
    assert_lowport_holds_no_copy(&server, Proto::Tcp, '6', port);
    assert!(
        TcpStream::connect(("127.0.0.9", port)).is_err(),
        "only the published address, 127.0.0.1, may be served"
    );
}

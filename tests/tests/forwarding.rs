//! Forwarding that loses nothing: UDP, IPv6, real client addresses, socket activation, and host ports
//! below 1024 through the file capability.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use lowport_tests::*;

fn launch(publish: &[&str], extra: &[&str], server_args: &[&str]) -> Launch {
    let mut cmd = lowport();
    cmd.arg("run");
    for p in publish {
        cmd.args(["-p", p]);
    }
    cmd.args(["--ready-fd", "3"])
        .args(extra)
        .arg("--")
        .arg(demo_server_bin())
        .args(server_args);
    Launch::start(cmd)
}

/// A host port free for now on 127.0.0.1.
fn free_port(protocol: &str) -> u16 {
    if protocol == "udp" {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// lowport publishing a port that nothing serves inside, which is never ready (so no --ready-fd:
/// see docs/usage.md, Readiness), at host ports picked by the test on 127.0.0.1; returns once the
/// first, a TCP one, accepts.
fn start_unready(mut cmd: std::process::Command, ports: &[(&str, u16)]) -> Launch {
    let child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let ports: Vec<ReadyPort> = ports
        .iter()
        .map(|&(protocol, host_port)| ReadyPort {
            protocol: protocol.into(),
            host_ip: "127.0.0.1".into(),
            host_port,
            port: 0,
        })
        .collect();
    let first = SocketAddr::from(([127, 0, 0, 1], ports[0].host_port));
    eventually("lowport's host socket", || TcpStream::connect(first).ok());
    Launch {
        pid: child.id(),
        child,
        ports,
        ready_line: String::new(),
    }
}

fn port_of(launch: &Launch, protocol: &str, family_v6: bool) -> u16 {
    launch
        .ports
        .iter()
        .find(|p| p.protocol == protocol && p.host_ip.contains(':') == family_v6)
        .unwrap_or_else(|| panic!("no {protocol} port in {}", launch.ready_line))
        .host_port
}

fn has_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// GET /whoami from a chosen local source address; returns the JSON and the client's own address.
fn whoami_from(source: &str, to: SocketAddr) -> (serde_json::Value, SocketAddr) {
    let src: SocketAddr = SocketAddr::new(source.parse().unwrap(), 0);
    let sock = if src.is_ipv4() {
        nix::sys::socket::AddressFamily::Inet
    } else {
        nix::sys::socket::AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(
        sock,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &nix::sys::socket::SockaddrStorage::from(src),
    )
    .unwrap();
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &nix::sys::socket::SockaddrStorage::from(to),
    )
    .unwrap();
    let mut s = TcpStream::from(fd);
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let (status, body) = parse_response(&response).unwrap();
    assert_eq!(status, 200);
    (serde_json::from_slice(&body).unwrap(), me)
}

/// Sends one datagram of `len` bytes from `source` and returns demo-server's JSON reply and our address.
fn udp_echo_from(source: &str, to: SocketAddr, len: usize) -> (serde_json::Value, SocketAddr) {
    let sock = UdpSocket::bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let me = sock.local_addr().unwrap();
    let payload = vec![b'x'; len];
    let mut buf = vec![0u8; 65536];
    // The server inside may still be starting: a lost datagram is retried, as a UDP client would.
    let n = eventually("a UDP reply", || {
        sock.send_to(&payload, to).ok()?;
        sock.recv(&mut buf).ok()
    });
    (serde_json::from_slice(&buf[..n]).unwrap(), me)
}

#[test]
fn tcp_server_sees_each_clients_own_address_and_port() {
    let launch = launch(&["0:80"], &["--forward", "relay"], &[]);
    wait_healthy(launch.addr());
    let (who, me) = whoami_from("127.0.0.9", launch.addr());
    assert_eq!(who["peer_ip"], "127.0.0.9", "{who}");
    assert_eq!(who["peer_port"], me.port(), "{who}");
    if has_ipv6() {
        let to = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port_of(&launch, "tcp", true));
        let (who, me) = whoami_from("::1", to);
        assert_eq!(who["peer_ip"], "::1", "{who}");
        assert_eq!(who["peer_port"], me.port(), "{who}");
        assert_eq!(
            who["local_addr"], "[::1]:80",
            "an IPv6 client goes to IPv6 inside: {who}"
        );
    }
}

#[test]
fn no_preserve_source_shows_the_relay_instead() {
    let launch = launch(
        &["127.0.0.1:0:80"],
        &["--no-preserve-source", "--forward", "relay"],
        &[],
    );
    wait_healthy(launch.addr());
    let (who, me) = whoami_from("127.0.0.9", launch.addr());
    assert_eq!(who["peer_ip"], "127.0.0.1", "{who}");
    assert_ne!(who["peer_port"], me.port(), "{who}");
}

#[test]
fn udp_replies_go_back_to_each_client_with_its_address() {
    let launch = launch(&["127.0.0.1:0:53/udp"], &[], &["--udp-echo", "53"]);
    let to = SocketAddr::from(([127, 0, 0, 1], launch.host_port()));
    wait_for_udp_server(to);
    let mut clients = Vec::new();
    for source in ["127.0.0.9", "127.0.0.10", "127.0.0.1"] {
        clients.push((source, udp_echo_from(source, to, 100)));
    }
    for (source, (reply, me)) in clients {
        assert_eq!(reply["peer_ip"], source, "{reply}");
        assert_eq!(reply["peer_port"], me.port(), "{reply}");
        assert_eq!(reply["len"], 100);
    }
    // The largest IPv4 UDP payload arrives whole.
    let (reply, _) = udp_echo_from("127.0.0.9", to, 65507);
    assert_eq!(reply["len"], 65507, "{reply}");
}

#[test]
fn udp_without_preserved_source_still_answers_the_right_client() {
    let launch = launch(
        &["127.0.0.1:0:53/udp"],
        &["--no-preserve-source", "--forward", "relay"],
        &["--udp-echo", "53"],
    );
    let to = SocketAddr::from(([127, 0, 0, 1], launch.host_port()));
    wait_for_udp_server(to);
    let (reply, _) = udp_echo_from("127.0.0.9", to, 10);
    assert_eq!(reply["peer_ip"], "127.0.0.1", "{reply}");
}

/// Sends one datagram of `len` bytes at a time, each from a fresh socket on `source` (so each opens a
/// new flow in lowport), until a reply satisfies `want`; returns it and the address it answered.
/// lowport picks a flow's family inside when the flow opens and keeps it, so a client that wants to
/// see a change inside (the server binding its second family) must come from a new address.
fn udp_echo_until(
    source: &str,
    to: SocketAddr,
    len: usize,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, SocketAddr) {
    let deadline = std::time::Instant::now() + PATIENCE;
    let payload = vec![b'x'; len];
    let mut buf = vec![0u8; 65536];
    let mut last = None;
    loop {
        let sock = UdpSocket::bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let me = sock.local_addr().unwrap();
        if sock.send_to(&payload, to).is_ok() {
            if let Ok(n) = sock.recv(&mut buf) {
                let reply: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
                if want(&reply) {
                    return (reply, me);
                }
                last = Some(reply);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; the last reply: {last:?}"
        );
    }
}

/// Waits until demo-server (binding 0.0.0.0, then [::]) answers a new flow from a loopback client of
/// `to`'s family over that same family inside.
///
/// lowport picks a flow's family inside when the flow opens, from which families have the port
/// bound (/proc/net/udp, then udp6, re-read at most every 250 ms), and keeps it for the flow's
/// lifetime. While the server is starting that picture can be wrong: an IPv6 client that comes
/// between the two binds goes to IPv4, and an IPv4 client whose look-up straddles both binds
/// (udp: nothing yet, udp6: bound) goes to IPv6. Either way the server sees the client under the
/// other family's loopback address. Once a flow has gone the right way with the server up, every
/// later look-up sees both families.
fn wait_for_udp_server(to: SocketAddr) {
    let source = if to.is_ipv4() { "127.0.0.1" } else { "::1" };
    udp_echo_until(
        source,
        to,
        1,
        "the server to answer a loopback client over the client's own family",
        |reply| reply["peer_ip"] == source,
    );
}

#[test]
fn udp_over_ipv6_and_fallback_to_an_ipv4_only_server() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let launch = launch(&["[::1]:0:53/udp"], &[], &["--udp-echo", "53"]);
    let to = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), launch.host_port());
    wait_for_udp_server(to);
    let (reply, me) = udp_echo_from("::1", to, 1000);
    assert_eq!(reply["peer_ip"], "::1", "{reply}");
    assert_eq!(reply["peer_port"], me.port(), "{reply}");
    assert_eq!(reply["len"], 1000, "{reply}");
    drop(launch);

    // An IPv4-only server: an IPv6 client that is ::1 is on the host's loopback, so it is shown as
    // 127.0.0.1 with its own port (see Target::source_for). Fresh clients again: a flow opened
    // before the server bound 0.0.0.0 went to IPv6, where nothing will answer.
    let launch = launch_v4_only_udp();
    let to = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), launch.host_port());
    let (reply, me) = udp_echo_until(
        "::1",
        to,
        10,
        "an IPv4-only server to answer an IPv6 client",
        |_| true,
    );
    assert_eq!(
        reply["peer_ip"], "127.0.0.1",
        "an IPv6 loopback client of an IPv4-only server is shown as IPv4 loopback: {reply}"
    );
    assert_eq!(reply["peer_port"], me.port(), "{reply}");
}

fn launch_v4_only_udp() -> Launch {
    launch(
        &["[::1]:0:53/udp"],
        &[],
        &["--bind", "0.0.0.0", "--udp-echo", "53"],
    )
}

#[test]
fn ipv4_clients_reach_an_ipv6_only_server() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    let launch = launch(&["127.0.0.1:0:80"], &[], &["--bind", "::1"]);
    wait_healthy(launch.addr());
    let who = get_json(launch.addr(), "/whoami");
    assert_eq!(who["local_addr"], "[::1]:80", "{who}");
}

#[test]
fn ipv6_host_addresses_are_published() {
    if !require(has_ipv6(), "IPv6 on loopback") {
        return;
    }
    for spec in ["[::1]:0:80", "[::]:0:80"] {
        let launch = launch(&[spec], &[], &[]);
        assert_eq!(launch.ports.len(), 1, "{}", launch.ready_line);
        assert!(
            launch.ports[0].host_ip.contains(':'),
            "{}",
            launch.ready_line
        );
        let addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), launch.host_port());
        wait_healthy(addr);
        assert_eq!(get_json(addr, "/whoami")["peer_ip"], "::1");
    }
}

#[test]
fn tcp_and_udp_share_one_port_number() {
    // A port number free for both protocols on 127.0.0.1.
    let port = eventually("a port free for TCP and UDP", || {
        let t = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = t.local_addr().ok()?.port();
        UdpSocket::bind(("127.0.0.1", port)).ok().map(|_| port)
    });
    let tcp = format!("127.0.0.1:{port}:53/tcp");
    let udp = format!("127.0.0.1:{port}:53/udp");
    let launch = launch(
        &[&tcp, &udp],
        &["--forward", "relay"],
        &["--port", "53", "--udp-echo", "53"],
    );
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    wait_healthy(to);
    assert_eq!(get_json(to, "/whoami")["local_addr"], "127.0.0.1:53");
    let (reply, _) = udp_echo_from("127.0.0.1", to, 5);
    assert_eq!(reply["len"], 5);
    drop(launch);
}

/// The kernel's "port unreachable" for the first datagram closes the flow at once, not after
/// `--udp-timeout`: the next datagram opens a fresh flow, which finds the server once it listens.
#[test]
fn a_udp_flow_to_a_port_where_nothing_listens_is_closed_at_once() {
    // demo-server without --udp-echo: nothing listens on UDP port 53 inside.
    let mut cmd = lowport();
    cmd.args([
        "--log-level",
        "debug",
        "run",
        "--forward",
        "relay",
        "--udp-timeout",
        "60s",
    ]);
    let (tcp, udp) = (free_port("tcp"), free_port("udp"));
    cmd.args([
        "--ready-timeout",
        "10m",
        "-p",
        &format!("127.0.0.1:{tcp}:80"),
        "-p",
        &format!("127.0.0.1:{udp}:53/udp"),
        "--",
    ])
    .arg(demo_server_bin());
    let mut launch = start_unready(cmd, &[("tcp", tcp), ("udp", udp)]);
    let stderr = launch
        .child
        .stderr
        .take()
        .expect("lowport's stderr is piped");
    let (lines, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    wait_healthy(launch.addr());
    let udp_port = launch
        .ports
        .iter()
        .find(|p| p.protocol == "udp")
        .expect("the UDP port")
        .host_port;
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"x", ("127.0.0.1", udp_port)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("UDP flow closed")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match log.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "the flow was not closed within 10 s (--udp-timeout is 60 s):\n{}",
                seen.join("\n")
            ),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("nothing listens on the UDP port inside")),
        "{}",
        seen.join("\n")
    );
}

/// A client of a port where nothing listens inside is closed with a warning, but five clients in a
/// row write one warning, not five: a client could otherwise fill the log.
#[test]
fn nothing_listens_is_warned_at_most_once_in_ten_seconds() {
    let mut cmd = lowport();
    let port = free_port("tcp");
    cmd.args([
        "run",
        "--forward",
        "relay",
        "--ready-timeout",
        "10m",
        "-p",
        &format!("127.0.0.1:{port}:8000"),
        "--",
    ])
    .arg(demo_server_bin());
    let mut launch = start_unready(cmd, &[("tcp", port)]);
    let stderr = launch
        .child
        .stderr
        .take()
        .expect("lowport's stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    for _ in 0..5 {
        // lowport accepts, finds nothing on port 8000 inside, and closes: end of stream or reset.
        let mut s = TcpStream::connect(launch.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        let closed = loop {
            match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) => break true,
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => break false,
            }
        };
        assert!(
            closed,
            "lowport closes a client when nothing listens inside"
        );
    }
    launch.signal(nix::sys::signal::Signal::SIGTERM);
    launch.wait();
    let text = reader.join().unwrap();
    let warnings = text.matches("nothing listens on the port inside").count();
    assert_eq!(warnings, 1, "{text}");
}

#[test]
fn idle_udp_flows_are_closed_after_the_timeout() {
    let launch = launch(
        &["127.0.0.1:0:53/udp"],
        &["--udp-timeout", "300ms", "--forward", "relay"],
        &["--udp-echo", "53"],
    );
    let to = SocketAddr::from(([127, 0, 0, 1], launch.host_port()));
    let sockets = || {
        std::fs::read_dir(format!("/proc/{}/fd", launch.child.id()))
            .unwrap()
            .count()
    };
    let (_, _) = udp_echo_from("127.0.0.9", to, 1);
    let (_, _) = udp_echo_from("127.0.0.10", to, 1);
    let with_flows = sockets();
    eventually("the idle flows to close", || {
        (sockets() <= with_flows - 2).then_some(())
    });
    // A new datagram from the same client opens a new flow.
    let (reply, _) = udp_echo_from("127.0.0.9", to, 3);
    assert_eq!(reply["len"], 3);
}

#[test]
fn socket_activation_hands_the_host_socket_to_the_server() {
    let launch = launch(&["127.0.0.1:0:80"], &["--socket-activation"], &[]);
    wait_healthy(launch.addr());
    let (who, me) = whoami_from("127.0.0.9", launch.addr());
    assert_eq!(who["activated"], true, "{who}");
    // Accepted straight from the host socket: the local address is the host's, not port 80 inside.
    assert_eq!(
        who["local_addr"],
        format!("127.0.0.1:{}", launch.host_port()),
        "{who}"
    );
    assert_eq!(who["peer_ip"], "127.0.0.9", "{who}");
    assert_eq!(who["peer_port"], me.port(), "{who}");
    // The server holds the host's listening socket, and lowport holds no copy: nothing is relayed.
    let inode = listening_inode(launch.host_port()).expect("the host socket in /proc/net/tcp");
    assert!(
        socket_inodes(launch.pid).contains(&inode),
        "demo-server holds the host socket"
    );
    assert!(
        !socket_inodes(launch.child.id()).contains(&inode),
        "lowport must not hold the host socket"
    );
}

/// The inode of the listening TCP socket on `port` in the host's network namespace.
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1)?.ends_with(&want) && f.get(3)? == &"0A")
            .then(|| f.get(9).map(|s| s.to_string()))?
    })
}

fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn socket_activation_environment_follows_systemd() {
    let (code, out, err) = run_to_end(lowport().args([
        "run", "--socket-activation", "-p", "127.0.0.1:0:80", "-p", "127.0.0.1:0:53/udp", "--", "sh", "-c",
        "echo $LISTEN_FDS $LISTEN_FDNAMES; [ \"$LISTEN_PID\" = $$ ] && echo pid-ok; ls /proc/self/fd/3 /proc/self/fd/4 >/dev/null && echo fds-ok",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "2 tcp-80:udp-53\npid-ok\nfds-ok\n", "{err}");
}

/// Sockets are passed in blocking mode, as systemd passes them (sd_listen_fds(3)): a server written
/// for socket activation, here Python's, accepts on fd 3 without making it blocking first.
#[test]
fn socket_activation_passes_blocking_sockets() {
    // The server reports the mode it was given, then accepts (after select, so that a non-blocking
    // socket does not fail the accept before the client arrives).
    let script = "import fcntl, os, select, socket\n\
        mode = 'non-blocking' if fcntl.fcntl(3, fcntl.F_GETFL) & os.O_NONBLOCK else 'blocking'\n\
        s = socket.socket(fileno=3)\n\
        select.select([s], [], [])\n\
        c, _ = s.accept()\n\
        c.sendall(mode.encode())\n\
        c.close()\n";
    let mut cmd = lowport();
    run_args(&mut cmd, &["--socket-activation", "-p", "127.0.0.1:0:80"]).args([
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    let mut launch = Launch::start(cmd);
    let mut reply = String::new();
    let mut conn = std::net::TcpStream::connect(launch.addr()).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    std::io::Read::read_to_string(&mut conn, &mut reply).unwrap();
    assert_eq!(reply, "blocking");
    let status = launch.wait();
    assert!(status.success(), "{}", launch.stderr());
}

#[test]
fn file_capability_binds_a_low_host_port_then_holds_nothing() {
    let start = sysctl("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    let setcap = ["/usr/sbin/setcap", "/sbin/setcap"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if !require(
        is_root() && setcap.is_some(),
        "root and setcap (package libcap2-bin)",
    ) || !require(start > 100, "a host where ports below 100 need privilege")
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lowport-setcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("lowport");
    std::fs::copy(lowport_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = std::process::Command::new(setcap.unwrap())
        .arg("cap_net_bind_service=ep")
        .arg(&bin)
        .status()
        .unwrap();
    assert!(status.success());
    // A free port below 100 on 127.0.0.1.
    let port = (20..100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free low port");
    let mut cmd = unprivileged_as(NOBODY, NOBODY, &bin);
    run_args(&mut cmd, &["-p", &format!("127.0.0.1:{port}:80")]).arg(demo_server_bin());
    let launch = Launch::start(cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_healthy(addr);
    assert_eq!(get_json(addr, "/whoami")["uid"], 0);
    let pid = launch.child.id();
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), bin);
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            proc_status_field(pid, set).unwrap(),
            "0000000000000000",
            "{set} of the running lowport"
        );
    }
    drop(launch);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `script` with bash as root in a new network namespace of the test's own, with `lo` up and
/// $LOWPORT and $DEMO naming the binaries; returns its stdout, or None (after `require`) when the
/// machine cannot do that.
fn in_test_netns(script: &str) -> Option<String> {
    let tools = ["unshare", "ip", "curl", "bash", "timeout", "dd"]
        .iter()
        .all(|t| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !require(
        is_root() && tools,
        "root, unshare, ip (iproute2), curl, bash and coreutils, to build a test network namespace",
    ) {
        return None;
    }
    let out = std::process::Command::new("unshare")
        .args([
            "--net",
            "bash",
            "-c",
            &format!("set -eu\nip link set lo up\n{script}"),
        ])
        .env("LOWPORT", lowport_bin())
        .env("DEMO", demo_server_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    Some(stdout)
}

/// Clients with addresses that are not loopback: a network namespace of the test's own, with a veth
/// pair carrying 10.99.0.1 and fd00:99::1, where lowport runs (as uid 65534) and the clients connect
/// from those addresses. Inside lowport's namespace these addresses do not exist, which is the case
/// the routing set-up is for.
#[test]
fn non_loopback_clients_keep_their_address() {
    let Some(out) = in_test_netns(
        r#"
ip link add lp0 type veth peer name lp1
ip link set lp1 up
ip addr add 10.99.0.1/24 dev lp0
ip addr add fd00:99::1/64 dev lp0 nodad
ip link set lp0 up
ready=$(mktemp)
setpriv --reuid=65534 --regid=65534 --clear-groups -- "$LOWPORT" run -p 0:80 -p 0:53/udp --ready-fd 3 -- \
    "$DEMO" --udp-echo 53 3>"$ready" 2>/dev/null &
lp=$!
trap 'kill $lp 2>/dev/null; wait $lp 2>/dev/null; rm -f "$ready"' EXIT
for i in $(seq 200); do [ -s "$ready" ] && break; sleep 0.05; done
tcp=$(sed 's/.*"tcp","host_ip":"0.0.0.0","host_port":\([0-9]*\).*/\1/' "$ready")
udp=$(sed 's/.*"udp","host_ip":"0.0.0.0","host_port":\([0-9]*\).*/\1/' "$ready")
for i in $(seq 200); do curl -fs "http://127.0.0.1:$tcp/healthz" >/dev/null && break; sleep 0.05; done
echo "tcp4 $(curl -fsS "http://10.99.0.1:$tcp/whoami" | grep '"peer_ip"')"
echo "tcp6 $(curl -fsS -g "http://[fd00:99::1]:$tcp/whoami" | grep '"peer_ip"')"
exec 4<>/dev/udp/10.99.0.1/$udp
printf ping >&4
# One read(2) takes one whole datagram (the shell's read would take a byte and lose the rest).
reply=$(timeout 5 dd bs=65536 count=1 status=none <&4 || echo timeout)
echo "udp4 $reply"
"#,
    ) else {
        return;
    };
    assert!(out.contains("tcp4   \"peer_ip\": \"10.99.0.1\""), "{out}");
    assert!(out.contains("tcp6   \"peer_ip\": \"fd00:99::1\""), "{out}");
    assert!(out.contains("udp4 {\"peer_ip\":\"10.99.0.1\""), "{out}");
}

/// When the host lets unprivileged users bind low ports (its own ip_unprivileged_port_start), `-p 80:80`
/// just works. The test sets that threshold in a network namespace of its own, not on the machine.
#[test]
fn host_sysctl_allowing_low_ports_makes_port_80_work() {
    let Some(out) = in_test_netns(
        r#"
echo 80 > /proc/sys/net/ipv4/ip_unprivileged_port_start
ready=$(mktemp)
setpriv --reuid=65534 --regid=65534 --clear-groups -- "$LOWPORT" run -p 127.0.0.1:80:80 --ready-fd 3 -- "$DEMO" 3>"$ready" &
lp=$!
trap 'kill $lp 2>/dev/null; wait $lp 2>/dev/null; rm -f "$ready"' EXIT
for i in $(seq 200); do curl -fs http://127.0.0.1:80/healthz >/dev/null && break; sleep 0.05; done
echo "whoami $(curl -fsS http://127.0.0.1:80/whoami | grep '"uid"')"
"#,
    ) else {
        return;
    };
    assert!(out.contains("whoami   \"uid\": 0,"), "{out}");
}

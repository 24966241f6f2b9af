//! What the relay does for clients: connections a client left half-open give their slot back, no
//! client from elsewhere is shown to the server as loopback (RFC 7600 and RFC 6052 addresses across
//! families), UDP flows are bounded, idle connections hold no pipe, and a connection limit must fit
//! the open-file limit.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lowport_tests::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tool_exists(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory for an nginx run by the caller of lowport (uid 65534 when the tests are root): the
/// configuration, its pid file and temporary files, and www/index.html. `server` is the body of the
/// one `server { }` block; the document root is already set.
fn nginx_dir(tag: &str, server: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("lowport-clients-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "nginx\n").unwrap();
    // One process, no user switch: in lowport's default mapping uid 0 is the only uid inside, and
    // nginx would otherwise chown its temporary directories to nobody.
    let root = format!("root {}/www;\n    {server}", dir.display());
    let conf = NginxConf {
        workers: 0,
        user: "root root",
        log_level: "warn",
        http: "access_log off;",
        server: &root,
    };
    std::fs::write(dir.join("nginx.conf"), conf.text(&dir)).unwrap();
    let uid = nix::unistd::Uid::from_raw(caller_uid());
    let gid = nix::unistd::Gid::from_raw(if is_root() {
        NOBODY
    } else {
        nix::unistd::getgid().as_raw()
    });
    for p in [dir.clone(), dir.join("www"), dir.join("www/index.html")] {
        nix::unistd::chown(&p, Some(uid), Some(gid)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    TempDir(dir)
}

/// The nginx command line for a directory from [`nginx_dir`].
fn nginx_args(dir: &Path) -> Vec<String> {
    vec![
        nginx_bin().unwrap().to_owned(),
        "-e".into(),
        "stderr".into(),
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        dir.join("nginx.conf").display().to_string(),
    ]
}

/// Descriptors of `pid` whose link starts with `prefix` ("socket:", "pipe:"), or all with "".
fn fds_of(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Script prelude for [`in_client_netns`]: runs in a new network namespace (the test's "host"), with
/// a second namespace of clients ($NS) joined to it by a veth pair:
///   host side   lp0  192.0.2.1/24  2001:db8::1/64
///   clients     lp1  192.0.2.5/24  2001:db8::5/64
/// Functions: `launch ARGS...` starts `lowport run --forward relay --ready-fd 3 ARGS...` (these tests
/// check the relay's address rules) as uid 65534 and waits for its
/// ready line ($READY); `port tcp|udp 0.0.0.0|::` reads a host port from it; `stop` ends every lowport
/// started; `client CMD...` runs CMD among the clients; `peer` extracts peer_ip from JSON on stdin;
/// `wait_http URL` waits until a server answers; `udp WHERE HOST PORT` sends one datagram (WHERE is
/// `client` or `env`) and prints the reply.
const PRELUDE: &str = r#"
set -eu
ip link set lo up
started=""
LOG=$(mktemp)
stop() {
    for p in $started; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    started=""
}
cleanup() {
    stop
    ip netns del "$NS" 2>/dev/null || true
    echo "--- lowport stderr" >&2; cat "$LOG" >&2; rm -f "$LOG"
}
trap cleanup EXIT
ip netns add "$NS"
ip link add lp0 type veth peer name lp1
ip link set lp1 netns "$NS"
ip addr add 192.0.2.1/24 dev lp0
ip addr add 2001:db8::1/64 dev lp0 nodad
ip link set lp0 up
ip -n "$NS" link set lo up
ip -n "$NS" addr add 192.0.2.5/24 dev lp1
ip -n "$NS" addr add 2001:db8::5/64 dev lp1 nodad
ip -n "$NS" link set lp1 up
client() { ip netns exec "$NS" "$@"; }
launch() {
    local ready i
    ready=$(mktemp)
    setpriv --reuid=65534 --regid=65534 --clear-groups -- "$LOWPORT" run --forward relay --ready-fd 3 "$@" 3>"$ready" 2>>"$LOG" &
    started="$started $!"
    for i in $(seq 400); do [ -s "$ready" ] && break; sleep 0.05; done
    READY=$(cat "$ready")
    rm -f "$ready"
    [ -n "$READY" ] || { echo "lowport did not report readiness" >&2; exit 1; }
}
port() {
    echo "$READY" | sed -n "s/.*\"$1\",\"host_ip\":\"$2\",\"host_port\":\([0-9]*\).*/\1/p"
}
peer() {
    grep -o '"peer_ip": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/'
}
wait_http() {
    local i
    for i in $(seq 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -g "$1" || true)" != 000 ] && return 0
        sleep 0.05
    done
    echo "nothing answers $1" >&2
    exit 1
}
udp() {
    local where=$1 host=$2 port=$3 r i
    for i in $(seq 10); do
        # One read(2) takes one whole datagram (the shell's read would take a byte and lose the rest).
        r=$($where bash -c 'exec 4<>"/dev/udp/$0/$1"; printf ping >&4; timeout 1 dd bs=65536 count=1 status=none <&4' "$host" "$port" || true)
        [ -n "$r" ] && { echo "$r"; return 0; }
    done
    echo timeout
}
"#;

/// Runs `script` (after [`PRELUDE`]) with bash as root in a network namespace of its own, beside a
/// namespace of clients; returns its stdout, or None (after `require`) when the machine cannot do it.
/// `tag` names the clients' namespace, with the test's pid, so that parallel tests never share one.
fn in_client_netns(tag: &str, envs: &[(&str, &str)], script: &str) -> Option<String> {
    let tools = [
        "unshare", "ip", "curl", "bash", "timeout", "dd", "setpriv", "sed", "grep",
    ]
    .iter()
    .all(|t| tool_exists(t));
    if !require(
        is_root() && tools,
        "root, unshare, ip (iproute2), curl, setpriv and coreutils, to build test network namespaces",
    ) || !require(
        Path::new("/proc/net/if_inet6").exists(),
        "IPv6 in the kernel",
    ) {
        return None;
    }
    let ns = format!("lowport-{tag}-{}", std::process::id());
    let out = std::process::Command::new("timeout")
        .args(["120", "unshare", "--net", "bash", "-c"])
        .arg(format!("{PRELUDE}\n{script}"))
        .env("NS", &ns)
        .env("LOWPORT", lowport_bin())
        .env("DEMO", demo_server_bin())
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    // The trap removes it; this is for a script killed by the timeout.
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(std::process::Stdio::null())
        .status();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    Some(stdout)
}

/// The value after `key ` on the output line that starts with it.
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
        .trim()
}

// ---------------------------------------------------------------------------------------------
// 1. Half-closed connections
// ---------------------------------------------------------------------------------------------

#[test]
fn half_closed_timeout_is_documented() {
    let (code, out, err) = run_to_end(lowport().args(["run", "--help"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--half-closed-timeout"), "{out}");
}

/// Three clients connect and never send a byte nor close; nginx gives up on them after its
/// client_header_timeout and closes its side. Their half-closed connections then move nothing, and
/// after --half-closed-timeout lowport must close them and give their slots to the fourth client.
#[test]
fn lazy_clients_dropped_by_the_server_free_their_slots() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let dir = nginx_dir(
        "lazy",
        "listen 80;\n    client_header_timeout 1s;\n    location / { }",
    );
    let mut cmd = lowport();
    run_args(
        &mut cmd,
        &[
            "--forward",
            "relay",
            "--max-connections",
            "3",
            "--half-closed-timeout",
            "2s",
            "-p",
            "127.0.0.1:0:80",
        ],
    )
    .args(nginx_args(&dir.0));
    let launch = Launch::start(cmd);
    eventually("nginx to answer", || {
        matches!(http(launch.addr(), "GET", "/", b""), Ok((200, _))).then_some(())
    });

    let mut lazy: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(launch.addr()).unwrap())
        .collect();
    // The fourth asks at once; its request waits with it for a free slot.
    let mut fourth = TcpStream::connect(launch.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();

    // nginx closes each lazy client after about a second; lowport passes that end on.
    for s in &mut lazy {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        // A read with SO_RCVTIMEO can fail with EINTR when the process is stopped and continued, even
        // without a signal handler (signal(7)); one run here saw it. That is no answer from nginx.
        let read = loop {
            match s.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        assert_eq!(
            read.expect("nginx closes a silent client"),
            0,
            "end of stream from nginx"
        );
    }

    fourth
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
    let mut response = Vec::new();
    let read = fourth.read_to_end(&mut response);
    assert!(
        read.is_ok(),
        "the fourth client was not served within 8 s ({:?}): the half-closed lazy connections still hold every slot",
        read.err()
    );
    let (status, body) = parse_response(&response).unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"nginx\n"[..]));
    // The lazy clients never closed: they keep their sockets to the end of the test.
    drop(lazy);
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Client addresses across families, and without preserved sources
// ---------------------------------------------------------------------------------------------

/// nginx listens on IPv4 only and lets only 127.0.0.1 in: an IPv6 client from elsewhere must not
/// arrive as 127.0.0.1.
#[test]
fn ipv6_clients_of_an_ipv4_only_server_are_never_loopback() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let dir = nginx_dir(
        "acl",
        "listen 80;\n    location / { allow 127.0.0.1; deny all; }",
    );
    let nginx = nginx_args(&dir.0).join(" ");
    let Some(out) = in_client_netns(
        "acl",
        &[("NGINX_CMD", &nginx)],
        r#"
launch -p 0:80 -- $NGINX_CMD
p4=$(port tcp 0.0.0.0); p6=$(port tcp ::)
wait_http "http://127.0.0.1:$p4/"
echo "local4 $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$p4/")"
echo "client4 $(client curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://192.0.2.1:$p4/")"
echo "client6 $(client curl -s -o /dev/null -w '%{http_code}' --max-time 5 -g "http://[2001:db8::1]:$p6/")"
"#,
    ) else {
        return;
    };
    assert_eq!(line(&out, "local4"), "200", "{out}");
    assert_eq!(line(&out, "client4"), "403", "{out}");
    assert_eq!(
        line(&out, "client6"),
        "403",
        "an IPv6 client from 2001:db8::5 got through an allow-127.0.0.1 rule: {out}"
    );
}

#[test]
fn ipv6_clients_of_an_ipv4_only_server_show_as_192_0_0_8() {
    let Some(out) = in_client_netns(
        "v6to4",
        &[],
        r#"
launch -p 0:80 -- "$DEMO" --bind 0.0.0.0
p4=$(port tcp 0.0.0.0); p6=$(port tcp ::)
wait_http "http://127.0.0.1:$p4/healthz"
echo "client6 $(client curl -sS --max-time 5 -g "http://[2001:db8::1]:$p6/whoami" | peer)"
echo "loopback6 $(curl -sS --max-time 5 -g "http://[::1]:$p6/whoami" | peer)"
echo "client4 $(client curl -sS --max-time 5 "http://192.0.2.1:$p4/whoami" | peer)"
"#,
    ) else {
        return;
    };
    assert_eq!(line(&out, "client6"), "192.0.0.8", "{out}");
    assert_eq!(line(&out, "loopback6"), "127.0.0.1", "{out}");
    assert_eq!(line(&out, "client4"), "192.0.2.5", "{out}");
}

/// demo-server on ::1 only: IPv4 clients arrive over IPv6 inside, as RFC 6052 addresses.
#[test]
fn ipv4_clients_of_an_ipv6_only_server_show_as_64_ff9b() {
    let Some(out) = in_client_netns(
        "v4to6",
        &[],
        r#"
launch -p 0:80 -- "$DEMO" --bind ::1
p4=$(port tcp 0.0.0.0); p6=$(port tcp ::)
wait_http "http://127.0.0.1:$p4/healthz"
echo "client4 $(client curl -sS --max-time 5 "http://192.0.2.1:$p4/whoami" | peer)"
echo "loopback4 $(curl -sS --max-time 5 --interface 127.0.0.9 "http://127.0.0.1:$p4/whoami" | peer)"
echo "client6 $(client curl -sS --max-time 5 -g "http://[2001:db8::1]:$p6/whoami" | peer)"
"#,
    ) else {
        return;
    };
    assert_eq!(line(&out, "client4"), "64:ff9b::c000:205", "{out}");
    assert_eq!(line(&out, "loopback4"), "::1", "{out}");
    assert_eq!(line(&out, "client6"), "2001:db8::5", "{out}");
}

#[test]
fn no_preserve_source_shows_other_clients_as_192_0_0_8() {
    let Some(out) = in_client_netns(
        "nopreserve",
        &[],
        r#"
launch -p 0:80 --no-preserve-source -- "$DEMO"
p4=$(port tcp 0.0.0.0); p6=$(port tcp ::)
wait_http "http://127.0.0.1:$p4/healthz"
echo "client4 $(client curl -sS --max-time 5 "http://192.0.2.1:$p4/whoami" | peer)"
echo "loopback4 $(curl -sS --max-time 5 --interface 127.0.0.9 "http://127.0.0.1:$p4/whoami" | peer)"
echo "client6 $(client curl -sS --max-time 5 -g "http://[2001:db8::1]:$p6/whoami" | peer)"
echo "loopback6 $(curl -sS --max-time 5 -g "http://[::1]:$p6/whoami" | peer)"
"#,
    ) else {
        return;
    };
    assert_eq!(line(&out, "client4"), "192.0.0.8", "{out}");
    assert_eq!(line(&out, "loopback4"), "127.0.0.1", "{out}");
    assert_eq!(line(&out, "client6"), "64:ff9b::c000:8", "{out}");
    assert_eq!(line(&out, "loopback6"), "::1", "{out}");
}

// ---------------------------------------------------------------------------------------------
// 4, 5. UDP
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_clients_from_elsewhere_are_never_loopback() {
    let Some(out) = in_client_netns(
        "udp",
        &[],
        r#"
launch -p 0:53/udp -- "$DEMO" --bind 0.0.0.0 --udp-echo 53
u4=$(port udp 0.0.0.0); u6=$(port udp ::)
echo "loopback4 $(udp env 127.0.0.1 "$u4" | peer)"
echo "client6 $(udp client 2001:db8::1 "$u6" | peer)"
echo "client4 $(udp client 192.0.2.1 "$u4" | peer)"
stop
launch -p 0:53/udp --no-preserve-source -- "$DEMO" --bind 0.0.0.0 --udp-echo 53
u4=$(port udp 0.0.0.0)
echo "nopreserve_loopback4 $(udp env 127.0.0.1 "$u4" | peer)"
echo "nopreserve_client4 $(udp client 192.0.2.1 "$u4" | peer)"
"#,
    ) else {
        return;
    };
    assert_eq!(line(&out, "loopback4"), "127.0.0.1", "{out}");
    assert_eq!(line(&out, "client6"), "192.0.0.8", "{out}");
    assert_eq!(line(&out, "client4"), "192.0.2.5", "{out}");
    assert_eq!(line(&out, "nopreserve_loopback4"), "127.0.0.1", "{out}");
    assert_eq!(line(&out, "nopreserve_client4"), "192.0.0.8", "{out}");
}

/// Sends one datagram from `sock` and returns the reply, retrying a lost one.
fn udp_ask(sock: &UdpSocket, to: SocketAddr) -> serde_json::Value {
    let mut buf = [0u8; 2048];
    let n = eventually("a UDP reply", || {
        sock.send_to(b"ping", to).ok()?;
        sock.recv(&mut buf).ok()
    });
    serde_json::from_slice(&buf[..n]).unwrap()
}

#[test]
fn udp_flow_limit_closes_the_least_recently_used_flow() {
    let mut cmd = lowport();
    cmd.args([
        "--log-level",
        "warn",
        "run",
        "--forward",
        "relay",
        "--max-udp-flows",
        "8",
        "-p",
        "127.0.0.1:0:53/udp",
        "--ready-fd",
        "3",
        "--",
    ])
    .arg(demo_server_bin())
    .args(["--udp-echo", "53"]);
    let mut launch = Launch::start(cmd);
    let lowport_pid = launch.child.id();
    let to = SocketAddr::from(([127, 0, 0, 1], launch.host_port()));
    let new_client = || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        sock
    };
    // The server is up once one flow is answered.
    let first = new_client();
    udp_ask(&first, to);
    let before = fds_of(lowport_pid, "");
    let started = Instant::now();
    let mut clients = vec![first];
    let mut most = before;
    for _ in 0..49 {
        let sock = new_client();
        let reply = udp_ask(&sock, to);
        assert_eq!(
            reply["peer_port"],
            sock.local_addr().unwrap().port(),
            "{reply}"
        );
        clients.push(sock);
        most = most.max(fds_of(lowport_pid, ""));
    }
    let elapsed = started.elapsed();
    assert_eq!(clients.len(), 50);
    assert!(
        most <= before + 8 + 8,
        "50 flows with --max-udp-flows 8 took lowport from {before} to {most} descriptors"
    );
    // An evicted client is answered again, on a new flow.
    let reply = udp_ask(&clients[0], to);
    assert_eq!(
        reply["peer_port"],
        clients[0].local_addr().unwrap().port(),
        "{reply}"
    );
    launch.signal(nix::sys::signal::Signal::SIGTERM);
    launch.wait();
    let stderr = launch.stderr();
    let warnings = stderr.matches("UDP flow limit").count();
    assert!(warnings >= 1, "the limit is reported: {stderr}");
    assert!(
        warnings as u64 <= 1 + elapsed.as_secs(),
        "the warning is rate-limited, {warnings} in {elapsed:?}: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6, 7. Descriptors
// ---------------------------------------------------------------------------------------------

/// One keep-alive request on `s`; returns the status once the whole response has arrived.
fn keepalive_get(s: &mut TcpStream) -> std::io::Result<u16> {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before the whole response",
            ));
        }
        response.extend_from_slice(&buf[..n]);
        let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if response.len() >= split + 4 + length {
            return parse_response(&response).map(|(status, _)| status);
        }
    }
}

#[test]
fn idle_connections_hold_no_pipe() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if !require(hard >= 4096, "an open-file hard limit of 4096 or more") {
        return;
    }
    const N: usize = 200;
    let mut cmd = lowport();
    run_args(
        &mut cmd,
        &[
            "-p",
            "127.0.0.1:0:80",
            "--forward",
            "relay",
            "--max-connections",
            "300",
        ],
    )
    .arg(demo_server_bin());
    let launch = Launch::start(cmd);
    let pid = launch.child.id();
    wait_healthy(launch.addr());
    // The baseline once lowport's socket count holds still: a relayed /healthz connection still
    // closing, or a socket of set-up not yet closed, would count otherwise (a run here once
    // stayed one short of the target for the whole wait).
    let mut sockets_before = fds_of(pid, "socket:");
    eventually("lowport's sockets to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = fds_of(pid, "socket:");
        let settled = now == sockets_before;
        sockets_before = now;
        settled.then_some(())
    });
    let mut conns: Vec<TcpStream> = (0..N)
        .map(|_| {
            let s = TcpStream::connect(launch.addr()).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            s
        })
        .collect();
    // Each relayed connection is two sockets in lowport: the client's and the one inside.
    eventually("lowport to relay every connection", || {
        (fds_of(pid, "socket:") >= sockets_before + 2 * N).then_some(())
    });
    let pipes = fds_of(pid, "pipe:");
    assert!(
        pipes <= 130,
        "{N} connections that never sent a byte: lowport holds {pipes} pipe descriptors"
    );
    // Each connection carries one request, one at a time, and then stays open, idle between
    // requests as keep-alive connections are.
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(
            keepalive_get(s).unwrap_or_else(|e| panic!("#{i}: {e}")),
            200
        );
    }
    let pipes = fds_of(pid, "pipe:");
    assert!(
        pipes <= 130,
        "{N} idle keep-alive connections: lowport holds {pipes} pipe descriptors"
    );
    // Every connection still works.
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(
            keepalive_get(s).unwrap_or_else(|e| panic!("#{i}: {e}")),
            200
        );
    }
}

#[test]
fn max_connections_must_fit_the_open_file_limit() {
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(prlimit) = prlimit else {
        require(false, "prlimit (util-linux)");
        return;
    };
    let run = |max: &str| {
        let mut cmd = unprivileged_as(NOBODY, NOBODY, prlimit.as_ref());
        cmd.args(["--nofile=1000:1000", "--"])
            .arg(lowport_bin())
            .args([
                "run",
                "--max-connections",
                max,
                "-p",
                "127.0.0.1:0:80",
                "--",
                "true",
            ]);
        run_to_end(&mut cmd)
    };
    let (code, _, err) = run("5000");
    assert_eq!(
        code, 2,
        "5000 connections cannot fit 1000 descriptors: {err}"
    );
    assert!(
        err.contains("--max-connections") && err.contains("ulimit -n"),
        "{err}"
    );
    // A limit that fits runs as before.
    let (code, _, err) = run("100");
    assert_eq!(code, 0, "{err}");
}

/// The flow limit is shared by every UDP host socket, and so is the eviction: flows on one cannot
/// keep another's clients out. Two host sockets: 127.0.0.1 and [::1], both to port 53 inside.
#[test]
fn udp_flows_of_one_host_socket_cannot_shut_out_another() {
    if !require(
        std::net::UdpSocket::bind("[::1]:0").is_ok(),
        "IPv6 on loopback",
    ) {
        return;
    }
    let mut cmd = lowport();
    run_args(
        &mut cmd,
        &[
            "--forward",
            "relay",
            "--max-udp-flows",
            "2",
            "-p",
            "127.0.0.1:0:53/udp",
            "-p",
            "[::1]:0:53/udp",
        ],
    )
    .arg(demo_server_bin())
    .args(["--udp-echo", "53"]);
    let launch = Launch::start(cmd);
    let v4 = launch
        .ports
        .iter()
        .find(|p| !p.host_ip.contains(':'))
        .unwrap();
    let v6 = launch
        .ports
        .iter()
        .find(|p| p.host_ip.contains(':'))
        .unwrap();
    let a = SocketAddr::from(([127, 0, 0, 1], v4.host_port));
    let b = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), v6.host_port);
    let client = |bind: &str| {
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        sock
    };
    let a_clients: Vec<UdpSocket> = (0..2).map(|_| client("127.0.0.1:0")).collect();
    for c in &a_clients {
        udp_ask(c, a);
    }
    for _ in 0..3 {
        let c = client("[::1]:0");
        let reply = udp_ask(&c, b);
        assert_eq!(
            reply["peer_port"],
            c.local_addr().unwrap().port(),
            "{reply}"
        );
    }
}

//! Stress scenarios, run by `make stress` (not by `make test`: every test here is `#[ignore]`).
//!
//! Each scenario prints its figures on one line, `stress: NAME: key=value ...`, before it asserts,
//! so a failing run still shows them. Run them one at a time (`--test-threads=1`): they measure
//! lowport's descriptors, memory and latency, and share the machine's ports and CPUs.
//!
//! ```console
//! $ cargo test -p lowport-tests --test stress -- --ignored --test-threads=1 --nocapture
//! ```

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use lowport_tests::*;

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// Prints the figures of a scenario as one line.
fn report(name: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("stress: {name}: {}", line.join(" "));
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}MiB", kib as f64 / 1024.0)
}

/// Raises this process's soft open-file limit to its hard limit (lowport, started through setpriv,
/// inherits it) and returns the new limit.
fn raise_own_nofile() -> u64 {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_field(pid, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soft open-file limit of `pid`, from /proc/PID/limits.
fn nofile_of(pid: u32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/PID/limits");
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
        .expect("Max open files in /proc/PID/limits")
}

fn alive(launch: &mut Launch) -> bool {
    matches!(launch.child.try_wait(), Ok(None))
}

/// The samples of a [`Sampler`].
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    peak_fds: usize,
    peak_rss_kib: u64,
    last_fds: usize,
    last_rss_kib: u64,
}

/// Samples a process's descriptor count and RSS on a thread, every `every`, until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples::default()));
        let thread = {
            let stop = stop.clone();
            let samples = samples.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let (Some(fds), Some(rss)) = (fd_count(pid), rss_kib(pid)) {
                        let mut s = samples.lock().unwrap();
                        s.peak_fds = s.peak_fds.max(fds);
                        s.peak_rss_kib = s.peak_rss_kib.max(rss);
                        s.last_fds = fds;
                        s.last_rss_kib = rss;
                    }
                    std::thread::sleep(every);
                }
            })
        };
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn now(&self) -> Samples {
        *self.samples.lock().unwrap()
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.now()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Collects lowport's stderr (and the command's, which shares it) on a thread, so that a chatty
/// lowport never blocks on a full pipe.
struct StderrLog(Arc<Mutex<Vec<u8>>>);

impl StderrLog {
    fn take(launch: &mut Launch) -> StderrLog {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = launch
            .child
            .stderr
            .take()
            .expect("lowport's stderr is piped");
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        StderrLog(buf)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines that contain any of `words`.
    fn lines_with(&self, words: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| words.iter().any(|w| l.contains(w)))
            .map(str::to_owned)
            .collect()
    }
}

/// The failed checks of a scenario, reported all at once, with lowport's stderr.
struct Checks<'a> {
    name: &'static str,
    log: &'a StderrLog,
    failed: Vec<String>,
}

impl<'a> Checks<'a> {
    fn new(name: &'static str, log: &'a StderrLog) -> Checks<'a> {
        Checks {
            name,
            log,
            failed: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failed.push(what());
        }
    }

    /// Panics with every failed check; a panic in lowport (or the server) fails any scenario.
    fn done(mut self) {
        let panics = self.log.lines_with(&["panicked"]);
        self.check(panics.is_empty(), || {
            format!("a panic: {}", panics.join("\n"))
        });
        if !self.failed.is_empty() {
            let text = self.log.text();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{}: {} check(s) failed:\n- {}\nlast lines of lowport's stderr:\n{}",
                self.name,
                self.failed.len(),
                self.failed.join("\n- "),
                tail.join("\n")
            );
        }
    }
}

/// `lowport run --forward relay LOWPORT_ARGS --ready-fd 3 -- demo-server SERVER_ARGS`, with its
/// stderr collected. These scenarios load the relay, so they ask for it: with handoff, the default,
/// lowport would carry none of the load.
fn launch_demo(lowport_args: &[&str], server_args: &[&str]) -> (Launch, StderrLog) {
    let mut cmd = lowport();
    cmd.args(["run", "--forward", "relay"])
        .args(lowport_args)
        .args(["--ready-fd", "3", "--"])
        .arg(demo_server_bin())
        .args(server_args);
    let mut launch = Launch::start(cmd);
    let log = StderrLog::take(&mut launch);
    (launch, log)
}

/// The host address of the first published port of `protocol` ("tcp" or "udp").
fn port_of(launch: &Launch, protocol: &str) -> SocketAddr {
    let p = launch
        .ports
        .iter()
        .find(|p| p.protocol == protocol)
        .unwrap_or_else(|| panic!("no {protocol} port in {}", launch.ready_line));
    SocketAddr::new(p.host_ip.parse().expect("host_ip"), p.host_port)
}

/// One request with its own connection and short timeouts; true when the answer is 200.
fn quick_get(addr: SocketAddr, timeout: Duration) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        Ok(matches!(parse_response(&response), Ok((200, _))))
    };
    attempt().unwrap_or(false)
}

/// Retries [`quick_get`] until it succeeds or `limit` passes; returns how long it took.
fn served_within(addr: SocketAddr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let left = limit.saturating_sub(start.elapsed());
        if quick_get(addr, left.min(Duration::from_secs(3))) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Reads one HTTP response with a Content-Length body from a keep-alive connection.
fn read_keepalive_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no content-length in {head:?}")))?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// 1. Ten thousand idle connections
// ---------------------------------------------------------------------------------------------

const IDLE_CLIENTS: usize = 10_000;

/// How many of `fds` (non-blocking connects) are established, and how many failed.
fn connect_states(fds: &[OwnedFd]) -> (usize, usize) {
    let mut established = 0;
    let mut failed = 0;
    for batch in fds.chunks(4096) {
        let mut polls: Vec<PollFd> = batch
            .iter()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLOUT))
            .collect();
        poll_all(&mut polls, PollTimeout::ZERO);
        for p in &polls {
            let r = p.revents().unwrap_or(PollFlags::empty());
            if r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                failed += 1;
            } else if r.contains(PollFlags::POLLOUT) {
                established += 1;
            }
        }
    }
    (established, failed)
}

/// poll(2), retried on EINTR; returns how many descriptors are ready.
fn poll_all(polls: &mut [PollFd], timeout: PollTimeout) -> usize {
    loop {
        match nix::poll::poll(polls, timeout) {
            Ok(n) => return n as usize,
            Err(Errno::EINTR) => continue,
            Err(e) => panic!("poll: {e}"),
        }
    }
}

#[test]
#[ignore = "stress: run by make stress"]
fn ten_thousand_idle_connections() {
    let hard = raise_own_nofile();
    if !require(
        hard >= IDLE_CLIENTS as u64 + 2000,
        "an open-file hard limit of at least 12000 (ulimit -Hn) for 10,000 client sockets",
    ) {
        return;
    }
    let (mut launch, log) = launch_demo(&["-p", "127.0.0.1:0:80"], &[]);
    let addr = launch.addr();
    wait_healthy(addr);
    let pid = launch.child.id();
    let limit = nofile_of(pid);
    let idle_fds = settled_fds(pid);
    let idle_rss = rss_kib(pid).unwrap_or(0);
    let sampler = Sampler::start(pid, Duration::from_millis(100));

    let SocketAddr::V4(v4) = addr else {
        unreachable!("published on 127.0.0.1")
    };
    let target = SockaddrIn::from(v4);
    let start = Instant::now();
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(IDLE_CLIENTS);
    for i in 0..IDLE_CLIENTS {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap_or_else(|e| panic!("socket #{i}: {e}"));
        match socket::connect(fd.as_raw_fd(), &target) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(e) => panic!("connect #{i}: {e}"),
        }
        fds.push(fd);
    }
    let issued = start.elapsed();

    // Clients beyond lowport's connection limit and the backlog stay in SYN-SENT, retrying: the
    // count grows as far as it will and then holds. Wait for one second without change.
    let mut established = 0;
    let mut failed = 0;
    let mut settled_at = start.elapsed();
    let mut unchanged_since = Instant::now();
    let settle_limit = Instant::now() + Duration::from_secs(30);
    loop {
        let (e, f) = connect_states(&fds);
        if (e, f) != (established, failed) {
            (established, failed) = (e, f);
            settled_at = start.elapsed();
            unchanged_since = Instant::now();
        }
        if unchanged_since.elapsed() >= Duration::from_secs(1) || Instant::now() > settle_limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Hold them all a moment longer while lowport is sampled.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(2) && alive(&mut launch) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = sampler.now();
    let alive_with_all = alive(&mut launch);

    drop(fds);
    let recovered = served_within(addr, Duration::from_secs(15));
    let samples = sampler.finish();
    let fds_after = fd_count(pid).unwrap_or(0);
    let bad = log.lines_with(&["dropped", "panicked", "cannot"]);
    report(
        "ten_thousand_idle_connections",
        &[
            ("clients", IDLE_CLIENTS.to_string()),
            ("issued", ms(issued)),
            ("established", established.to_string()),
            ("failed", failed.to_string()),
            ("settled_after", ms(settled_at)),
            ("nofile", limit.to_string()),
            (
                "max_connections_at_most",
                (limit.saturating_sub(64) / 6).to_string(),
            ),
            ("idle_fds", idle_fds.to_string()),
            ("peak_fds", samples.peak_fds.to_string()),
            ("fds_with_all_open", during.last_fds.to_string()),
            ("fds_after", fds_after.to_string()),
            ("idle_rss", mib(idle_rss)),
            ("peak_rss", mib(samples.peak_rss_kib)),
            ("served_after_close", recovered.map_or("never".into(), ms)),
            ("bad_log_lines", bad.len().to_string()),
        ],
    );
    let mut checks = Checks::new("ten_thousand_idle_connections", &log);
    checks.check(alive_with_all, || {
        "lowport exited with the connections open".into()
    });
    checks.check(alive(&mut launch), || "lowport exited".into());
    checks.check(samples.peak_fds as u64 <= limit, || {
        format!(
            "lowport had {} descriptors open, above its limit of {limit}",
            samples.peak_fds
        )
    });
    checks.check(established > 0 && failed == 0, || {
        format!("{established} connections established, {failed} failed")
    });
    checks.check(
        recovered.is_some_and(|d| d <= Duration::from_secs(10)),
        || {
            format!(
                "a new client must get 200 within 10 s of closing the 10,000 (took {recovered:?})"
            )
        },
    );
    checks.check(bad.is_empty(), || {
        format!(
            "lowport's stderr has lines with dropped/panicked/cannot:\n{}",
            bad.join("\n")
        )
    });
    checks.done();
}

// ---------------------------------------------------------------------------------------------
// 2. Lazy clients
// ---------------------------------------------------------------------------------------------

/// nginx gives up on a client that does not finish its request headers within 1 s and closes its
/// side; a client that then neither sends nor closes leaves a half-closed connection, which
/// `--half-closed-timeout` must end so its slot serves someone else.
#[test]
#[ignore = "stress: run by make stress"]
fn lazy_clients_do_not_keep_the_slots() {
    raise_own_nofile();
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    if !require(nginx.is_some(), "nginx (package nginx-light)") {
        return;
    }
    let dir = nginx_dir();
    let mut cmd = lowport();
    run_args(
        &mut cmd,
        &[
            "-p",
            "127.0.0.1:0:80",
            "--forward",
            "relay",
            "--max-connections",
            "3",
            "--half-closed-timeout",
            "2s",
        ],
    )
    .arg(nginx.unwrap())
    .args(["-e", "stderr", "-p"])
    .arg(&dir)
    .arg("-c")
    .arg(dir.join("nginx.conf"));
    let mut launch = match Launch::try_start(&mut cmd) {
        Ok(launch) => launch,
        Err(e) => {
            report(
                "lazy_clients_do_not_keep_the_slots",
                &[("lowport", "refused-to-start".into())],
            );
            let _ = fs::remove_dir_all(&dir);
            panic!("{e}");
        }
    };
    let log = StderrLog::take(&mut launch);
    let addr = launch.addr();
    eventually("nginx to answer", || {
        matches!(http(addr, "GET", "/", b""), Ok((200, _))).then_some(())
    });

    // Three clients that start a request and never finish it, nor read, nor close.
    let lazy: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect a lazy client");
            s.write_all(b"GET / HTTP/1.1\r\nHost: lazy\r\n")
                .expect("start a request");
            s
        })
        .collect();
    let start = Instant::now();
    let answer = (|| -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect_timeout(&addr, PATIENCE)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        parse_response(&response)
    })();
    let waited = start.elapsed();
    let alive_after = alive(&mut launch);
    report(
        "lazy_clients_do_not_keep_the_slots",
        &[
            ("lazy_clients", lazy.len().to_string()),
            ("max_connections", "3".into()),
            ("client_header_timeout", "1s".into()),
            ("half_closed_timeout", "2s".into()),
            (
                "new_client",
                match &answer {
                    Ok((status, _)) => status.to_string(),
                    Err(e) => format!("{:?}", e.kind()),
                },
            ),
            ("served_after", ms(waited)),
        ],
    );
    drop(lazy);
    drop(launch);
    let _ = fs::remove_dir_all(&dir);
    let mut checks = Checks::new("lazy_clients_do_not_keep_the_slots", &log);
    checks.check(alive_after, || "lowport exited".into());
    match &answer {
        Ok((status, body)) => checks.check(
            *status == 200 && body == b"served by nginx under lowport\n",
            || format!("the new client got {status} {:?}", String::from_utf8_lossy(body)),
        ),
        Err(e) => checks.check(false, || {
            format!("the new client was not served within 10 s while three lazy clients held the slots: {e}")
        }),
    }
    // The lazy clients hold every slot until nginx gives up on them (1 s) at the earliest; sooner
    // would mean the limit was not reached and this test measured nothing.
    checks.check(waited >= Duration::from_millis(900), || {
        format!("served after {waited:?}: the lazy clients did not hold the three slots")
    });
    checks.check(waited <= Duration::from_secs(8), || {
        format!("served only after {waited:?}; expected about 1 s (nginx) + 2 s (--half-closed-timeout)")
    });
    checks.done();
}

/// A directory with nginx's configuration (client_header_timeout 1s, one process, its temporary
/// paths inside), owned by the uid lowport runs as, which is root inside.
fn nginx_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowport-stress-nginx-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www")).unwrap();
    fs::write(
        dir.join("www/index.html"),
        "served by nginx under lowport\n",
    )
    .unwrap();
    let server = format!("listen 80; root {}/www;", dir.display());
    let conf = NginxConf {
        workers: 0,
        user: "root root",
        log_level: "warn",
        http: "access_log off;\n  client_header_timeout 1s;",
        server: &server,
    };
    fs::write(dir.join("nginx.conf"), conf.text(&dir)).unwrap();
    if is_root() {
        for p in [
            dir.clone(),
            dir.join("www"),
            dir.join("www/index.html"),
            dir.join("nginx.conf"),
        ] {
            nix::unistd::chown(
                &p,
                Some(nix::unistd::Uid::from_raw(NOBODY)),
                Some(nix::unistd::Gid::from_raw(NOBODY)),
            )
            .unwrap();
        }
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// 3. UDP flood
// ---------------------------------------------------------------------------------------------

const UDP_FLOWS: usize = 20_000;
const UDP_BATCH: usize = 32;

/// Keep-alive GET /healthz through lowport, back to back with a short pause, until `stop`.
fn measure_latency(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Vec<Duration>, usize, Option<String>)> {
    std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut errors = 0usize;
        let mut first_error = None;
        let mut buf = Vec::new();
        let mut conn: Option<TcpStream> = None;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let result = (|| -> std::io::Result<u16> {
                if conn.is_none() {
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.set_nodelay(true)?;
                    conn = Some(s);
                }
                let s = conn.as_mut().unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")?;
                read_keepalive_response(s, &mut buf)
            })();
            match result {
                Ok(200) => times.push(t.elapsed()),
                other => {
                    errors += 1;
                    first_error.get_or_insert(format!("{other:?}"));
                    conn = None;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (times, errors, first_error)
    })
}

#[test]
#[ignore = "stress: run by make stress"]
fn udp_flood_keeps_memory_and_tcp_latency_bounded() {
    raise_own_nofile();
    let (mut launch, log) = launch_demo(
        &[
            "-p",
            "127.0.0.1:0:53/udp",
            "-p",
            "127.0.0.1:0:80",
            "--udp-timeout",
            "2s",
        ],
        &["--udp-echo", "53"],
    );
    let udp = port_of(&launch, "udp");
    let tcp = port_of(&launch, "tcp");
    wait_healthy(tcp);
    let pid = launch.child.id();
    let idle_fds = settled_fds(pid);
    let idle_rss = rss_kib(pid).unwrap_or(0);

    let sampler = Sampler::start(pid, Duration::from_millis(25));
    let stop = Arc::new(AtomicBool::new(false));
    // The same requests, at the same time, through a second lowport that gets no datagram: the
    // difference is what the flood costs lowport's TCP relaying, beyond what it costs the machine.
    let (unflooded, _unflooded_log) = launch_demo(&["-p", "127.0.0.1:0:80"], &[]);
    wait_healthy(unflooded.addr());
    let latency = measure_latency(tcp, stop.clone());
    let control = measure_latency(unflooded.addr(), stop.clone());

    // 20,000 distinct source ports, each bound explicitly (a port the kernel hands out again
    // would reuse a flow), 32 at a time: each sends one datagram, waits at most 50 ms for the
    // answer, and closes.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let mut next_port: u32 = 1024;
    let (mut sent, mut answered, mut send_errors) = (0usize, 0usize, 0usize);
    let mut payload_ok = true;
    while sent < UDP_FLOWS && Instant::now() < deadline && next_port <= 65535 {
        let mut batch: Vec<(UdpSocket, u16)> = Vec::with_capacity(UDP_BATCH);
        while batch.len() < UDP_BATCH && sent + batch.len() < UDP_FLOWS && next_port <= 65535 {
            let port = next_port as u16;
            next_port += 1;
            if let Ok(s) = UdpSocket::bind(("127.0.0.1", port)) {
                batch.push((s, port));
            }
        }
        for (s, _) in &batch {
            s.set_nonblocking(true).unwrap();
            if s.send_to(b"stress", udp).is_err() {
                send_errors += 1;
            }
        }
        sent += batch.len();
        let mut waiting: Vec<usize> = (0..batch.len()).collect();
        let wait_until = Instant::now() + Duration::from_millis(50);
        while !waiting.is_empty() {
            let left = wait_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut polls: Vec<PollFd> = waiting
                .iter()
                .map(|&i| PollFd::new(batch[i].0.as_fd(), PollFlags::POLLIN))
                .collect();
            let timeout = PollTimeout::try_from(left.as_millis().max(1) as i32).unwrap();
            if poll_all(&mut polls, timeout) == 0 {
                break;
            }
            let ready: Vec<bool> = polls
                .iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(polls);
            let mut still = Vec::new();
            for (k, &i) in waiting.iter().enumerate() {
                if !ready[k] {
                    still.push(i);
                    continue;
                }
                let mut reply = [0u8; 256];
                if let Ok(n) = batch[i].0.recv(&mut reply) {
                    answered += 1;
                    // {"peer_ip":"127.0.0.1","peer_port":N,"len":6}: the source port came through.
                    let text = String::from_utf8_lossy(&reply[..n]);
                    if !text.contains(&format!("\"peer_port\":{}", batch[i].1)) {
                        payload_ok = false;
                    }
                }
            }
            waiting = still;
        }
    }
    let flood_time = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut times, latency_errors, first_latency_error) = latency.join().unwrap();
    let (mut control_times, _, _) = control.join().unwrap();
    drop(unflooded);
    control_times.sort();
    let during = sampler.now();
    times.sort();
    let (p50, p99) = (percentile(&times, 50), percentile(&times, 99));
    let max = times.last().copied().unwrap_or_default();

    // The flows time out after 2 s without traffic: lowport's descriptors come back and its
    // memory shrinks.
    let expiry = Instant::now();
    let mut fds_after = fd_count(pid).unwrap_or(0);
    let mut rss_after = rss_kib(pid).unwrap_or(0);
    while expiry.elapsed() < Duration::from_secs(12) {
        fds_after = fd_count(pid).unwrap_or(0);
        rss_after = rss_kib(pid).unwrap_or(0);
        if fds_after <= idle_fds + 4 && rss_after < 16 * 1024 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let expired_after = expiry.elapsed();
    let samples = sampler.finish();
    let alive_after = alive(&mut launch);
    let text = log.text();
    report(
        "udp_flood_keeps_memory_and_tcp_latency_bounded",
        &[
            ("flows", sent.to_string()),
            ("answered", answered.to_string()),
            ("send_errors", send_errors.to_string()),
            ("flood_time", ms(flood_time)),
            (
                "flows_per_s",
                format!("{:.0}", sent as f64 / flood_time.as_secs_f64()),
            ),
            ("idle_rss", mib(idle_rss)),
            ("peak_rss", mib(during.peak_rss_kib)),
            ("rss_after", mib(rss_after)),
            ("idle_fds", idle_fds.to_string()),
            ("peak_fds", samples.peak_fds.to_string()),
            ("fds_after", fds_after.to_string()),
            ("expired_after", ms(expired_after)),
            ("tcp_requests", times.len().to_string()),
            ("tcp_errors", latency_errors.to_string()),
            ("tcp_p50", ms(p50)),
            ("tcp_p99", ms(p99)),
            ("tcp_max", ms(max)),
            ("unflooded_tcp_p50", ms(percentile(&control_times, 50))),
            ("unflooded_tcp_p99", ms(percentile(&control_times, 99))),
            (
                "flow_limit_logged",
                text.contains("UDP flow limit").to_string(),
            ),
        ],
    );
    let mut checks = Checks::new("udp_flood_keeps_memory_and_tcp_latency_bounded", &log);
    checks.check(alive_after, || "lowport exited".into());
    checks.check(sent == UDP_FLOWS, || {
        format!("the flood did not finish within 60 s ({sent} flows sent)")
    });
    checks.check(answered * 10 >= sent * 9, || {
        format!("only {answered} of {sent} flows were answered within 50 ms")
    });
    checks.check(payload_ok, || "a reply named another source port".into());
    checks.check(latency_errors == 0, || {
        format!("{latency_errors} TCP requests failed during the flood: {first_latency_error:?}")
    });
    checks.check(times.len() >= 100, || {
        format!("only {} TCP requests during the flood", times.len())
    });
    checks.check(during.peak_rss_kib < 32 * 1024, || {
        format!(
            "lowport's RSS reached {} during the flood (limit 32 MiB)",
            mib(during.peak_rss_kib)
        )
    });
    checks.check(p99 < Duration::from_millis(5), || {
        format!(
            "TCP p99 {} during the flood (limit 5 ms; {} through an unflooded lowport at the same time)",
            ms(p99),
            ms(percentile(&control_times, 99))
        )
    });
    checks.check(fds_after <= idle_fds + 4, || {
        format!("lowport still had {fds_after} descriptors 12 s after the flood (idle: {idle_fds})")
    });
    checks.check(rss_after < 16 * 1024, || {
        format!(
            "lowport's RSS was {} 12 s after the flood (limit 16 MiB once the flows expired)",
            mib(rss_after)
        )
    });
    checks.done();
}

// ---------------------------------------------------------------------------------------------
// 4. Clients that reset mid-transfer
// ---------------------------------------------------------------------------------------------

const RESETTING_CLIENTS: usize = 2_000;
const RESET_CONCURRENCY: usize = 32;

/// POSTs a few hundred KiB to /echo, reads a little of the echo, sends a little more, and resets
/// the connection (SO_LINGER 0).
fn reset_mid_transfer(addr: SocketAddr, i: usize) -> std::io::Result<()> {
    let total = 192 * 1024 + (i % 8) * 32 * 1024;
    let first = 64 * 1024 + (i % 5) * 24 * 1024;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
    )?;
    let body = vec![b'r'; first];
    s.write_all(&body)?;
    let mut got = [0u8; 4096];
    let n = s.read(&mut got)?;
    if n == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    // Some more, without waiting for it to be taken: the reset then meets data in flight.
    s.set_nonblocking(true)?;
    let _ = s.write(&body[..(total - first).min(first)]);
    nix::sys::socket::setsockopt(
        &s,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    Ok(())
}

#[test]
#[ignore = "stress: run by make stress"]
fn clients_resetting_mid_transfer() {
    raise_own_nofile();
    let (mut launch, log) = launch_demo(&["-p", "127.0.0.1:0:80"], &[]);
    let addr = launch.addr();
    wait_healthy(addr);
    let pid = launch.child.id();
    // Warm up with the same number of clean transfers, so that pooled pipes count as idle.
    let warm: Vec<JoinHandle<bool>> = (0..RESET_CONCURRENCY)
        .map(|_| {
            std::thread::spawn(move || {
                let body = vec![b'w'; 256 * 1024];
                matches!(http(addr, "POST", "/echo", &body), Ok((200, b)) if b == body)
            })
        })
        .collect();
    assert!(
        warm.into_iter().all(|t| t.join().unwrap()),
        "clean transfers failed"
    );
    let idle_fds = settled_fds(pid);
    let idle_rss = rss_kib(pid).unwrap_or(0);

    let sampler = Sampler::start(pid, Duration::from_millis(50));
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Instant::now();
    let workers: Vec<JoinHandle<()>> = (0..RESET_CONCURRENCY)
        .map(|_| {
            let next = next.clone();
            let failures = failures.clone();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= RESETTING_CLIENTS {
                    return;
                }
                if let Err(e) = reset_mid_transfer(addr, i) {
                    failures.lock().unwrap().push(format!("client {i}: {e}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let storm = start.elapsed();
    let alive_after = alive(&mut launch);

    // Every relay of a reset client ends: lowport's descriptors come back to the idle figure.
    let back = Instant::now();
    let mut fds_after = fd_count(pid).unwrap_or(0);
    while back.elapsed() < Duration::from_secs(10) && fds_after > idle_fds + 8 {
        std::thread::sleep(Duration::from_millis(50));
        fds_after = fd_count(pid).unwrap_or(0);
    }
    let returned_after = back.elapsed();
    let samples = sampler.finish();
    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let last = http(addr, "POST", "/echo", &body);
    let last_ok = matches!(&last, Ok((200, b)) if *b == body);
    let failures = failures.lock().unwrap().clone();
    report(
        "clients_resetting_mid_transfer",
        &[
            ("clients", RESETTING_CLIENTS.to_string()),
            ("concurrency", RESET_CONCURRENCY.to_string()),
            ("failures", failures.len().to_string()),
            ("time", ms(storm)),
            ("idle_fds", idle_fds.to_string()),
            ("peak_fds", samples.peak_fds.to_string()),
            ("fds_after", fds_after.to_string()),
            ("fds_back_after", ms(returned_after)),
            ("idle_rss", mib(idle_rss)),
            ("peak_rss", mib(samples.peak_rss_kib)),
            ("rss_after", mib(samples.last_rss_kib)),
            ("final_request_ok", last_ok.to_string()),
        ],
    );
    let mut checks = Checks::new("clients_resetting_mid_transfer", &log);
    checks.check(alive_after, || "lowport exited".into());
    checks.check(failures.is_empty(), || {
        format!(
            "{} clients failed before their reset, such as {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        )
    });
    checks.check(fds_after <= idle_fds + 8, || {
        format!("lowport has {fds_after} descriptors 10 s after the resets (idle: {idle_fds})")
    });
    checks.check(last_ok, || {
        format!(
            "the request after the resets: {:?}",
            last.as_ref().map(|(s, b)| (s, b.len()))
        )
    });
    checks.done();
}

// ---------------------------------------------------------------------------------------------
// 5. The server killed mid-transfer
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "stress: run by make stress"]
fn server_killed_mid_transfer() {
    raise_own_nofile();
    let (mut launch, log) = launch_demo(&["-p", "127.0.0.1:0:80"], &[]);
    let addr = launch.addr();
    wait_healthy(addr);
    let server = launch.pid;
    let cmdline = fs::read(format!("/proc/{server}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("demo-server"),
        "the ready line's pid {server} is not demo-server: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let processes = descendants(launch.child.id());

    // A 1 GiB upload, echoed as it goes: the writer streams, this thread reads.
    let mut reader = TcpStream::connect(addr).unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = reader.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let writing = std::thread::spawn(move || -> u64 {
        let _ = writer
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n");
        let chunk = vec![b'k'; 64 * 1024];
        let mut sent = 0u64;
        while sent < 1 << 30 && writer.write_all(&chunk).is_ok() {
            sent += chunk.len() as u64;
        }
        sent
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    while received < 16 << 20 {
        match reader.read(&mut buf) {
            Ok(0) => panic!("end of the echo after {received} bytes, before the kill"),
            Ok(n) => received += n,
            Err(e) => panic!("reading the echo after {received} bytes: {e}"),
        }
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server as i32), Signal::SIGKILL)
        .expect("kill the server");
    let killed = Instant::now();
    let end = loop {
        match reader.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => received += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "hang".to_owned();
            }
            Err(e) => break format!("{:?}", e.kind()),
        }
    };
    let client_saw_end = killed.elapsed();
    drop(reader);
    let status = wait_with_deadline(&mut launch.child, Duration::from_secs(10));
    let lowport_exited = killed.elapsed();
    let sent = writing.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left: Vec<u32> = processes.clone();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&p| process_exists(p));
        std::thread::sleep(Duration::from_millis(20));
    }
    left.retain(|&p| process_exists(p));
    let code = status.map(exit_code);
    report(
        "server_killed_mid_transfer",
        &[
            ("echoed_before_kill", (16 << 20).to_string()),
            ("received", received.to_string()),
            ("uploaded", sent.to_string()),
            ("client_end", end.clone()),
            ("client_saw_end_after", ms(client_saw_end)),
            (
                "lowport_exit",
                code.map_or("none".into(), |c| c.to_string()),
            ),
            ("lowport_exited_after", ms(lowport_exited)),
            ("processes_before", processes.len().to_string()),
            ("processes_left", left.len().to_string()),
        ],
    );
    let mut checks = Checks::new("server_killed_mid_transfer", &log);
    checks.check(
        end != "hang" && client_saw_end <= Duration::from_secs(10),
        || {
            format!(
                "the client saw neither end-of-file nor a reset within 10 s of the kill ({end})"
            )
        },
    );
    checks.check(code == Some(137), || {
        format!("lowport's status after its command was killed by SIGKILL: {code:?}, expected 137")
    });
    checks.check(left.is_empty(), || {
        format!("processes left behind: {left:?}")
    });
    checks.done();
}

/// A server that closes its listener and binds again, 1000 times, under handoff: each bind is
/// answered with a fresh host socket from the factory. lowport's descriptors and memory, and the
/// factory's descriptors, must stay flat (bypass4netns #115 leaked over long runs), and every
/// client is served.
#[test]
#[ignore]
fn a_server_that_binds_a_thousand_times() {
    const CYCLES: usize = 1000;
    let dir = std::env::temp_dir().join(format!("lowport-stress-rebind-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.join("rebind.py");
    fs::write(
        &script,
        format!(
            r#"
import socket
for i in range({CYCLES}):
    family = socket.AF_INET6 if i % 2 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 80))
    s.listen(8)
    c, _ = s.accept()
    c.sendall(b"%d\n" % i)
    c.close()
    s.close()
"#
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = lowport();
    cmd.args([
        "run",
        "--forward",
        "handoff",
        "-p",
        "0:80",
        "--ready-fd",
        "3",
        "--",
    ])
    .args(["/usr/bin/python3", script.to_str().unwrap()]);
    let mut launch = Launch::start(cmd);
    let log = StderrLog::take(&mut launch);
    let pid = launch.child.id();
    let addr = launch.addr();
    let factory = || {
        descendants(pid).into_iter().find(|c| {
            *c != pid
                && proc_status_field(*c, "PPid").is_some_and(|p| p == pid.to_string())
                && proc_status_field(*c, "NSpid").is_some_and(|n| n.split_whitespace().count() == 1)
        })
    };
    let fetch = |expect: usize| -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            // Between two binds the port is free and the client is refused; it tries again.
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut line = String::new();
                if s.read_to_string(&mut line).is_ok() && line.trim() == expect.to_string() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    };
    let mut checks = Checks::new("a_server_that_binds_a_thousand_times", &log);
    let warmup = 50;
    for i in 0..warmup {
        checks.check(fetch(i), || format!("client {i} served"));
    }
    let fds_before = settled_fds(pid);
    let rss_before = rss_kib(pid).unwrap_or(0);
    let factory_pid = factory();
    let factory_fds_before = factory_pid.and_then(fd_count);
    let started = Instant::now();
    let mut served = warmup;
    for i in warmup..CYCLES {
        if fetch(i) {
            served += 1;
        } else {
            checks.check(false, || format!("client {i} served"));
            break;
        }
    }
    let took = started.elapsed();
    let fds_after = fd_count(pid).unwrap_or(0);
    let rss_after = rss_kib(pid).unwrap_or(0);
    let factory_fds_after = factory_pid.and_then(fd_count);
    let status = wait_with_deadline(&mut launch.child, PATIENCE);
    report(
        "a_server_that_binds_a_thousand_times",
        &[
            ("served", served.to_string()),
            (
                "binds_per_s",
                format!("{:.0}", (served - warmup) as f64 / took.as_secs_f64()),
            ),
            ("lowport_fds", format!("{fds_before}->{fds_after}")),
            (
                "lowport_rss",
                format!("{}->{}", mib(rss_before), mib(rss_after)),
            ),
            (
                "factory_fds",
                format!("{factory_fds_before:?}->{factory_fds_after:?}"),
            ),
        ],
    );
    checks.check(served == CYCLES, || {
        format!("{served} of {CYCLES} clients served")
    });
    checks.check(fds_after <= fds_before, || {
        format!("lowport's descriptors grew from {fds_before} to {fds_after}")
    });
    checks.check(rss_after <= rss_before + 1024, || {
        format!("lowport's memory grew from {rss_before} KiB to {rss_after} KiB")
    });
    checks.check(factory_fds_before.is_some() && factory_fds_after == factory_fds_before, || {
        format!("the factory's descriptors went from {factory_fds_before:?} to {factory_fds_after:?}")
    });
    checks.check(status.map(exit_code) == Some(0), || {
        format!("lowport exited with {status:?} after the server's last bind")
    });
    checks.done();
    let _ = fs::remove_dir_all(&dir);
}

/// A client that connects to a host service 3000 times, through the connect handoff (`--host-loopback`):
/// every connect is handed a host socket, lowport's descriptors and memory stay flat, and nothing is
/// left behind. Half the connects are blocking, half are made the way event loops make them
/// (non-blocking, registered with epoll before connecting), so the epoll re-registration is loaded too.
#[test]
#[ignore = "stress: run by make stress"]
fn three_thousand_connects_to_a_host_service() {
    const CONNECTS: usize = 3000;
    const WARMUP: usize = 200;
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in service.incoming().flatten() {
            let _ = conn.write_all(b"host\n");
        }
    });
    // The client writes its progress here, as the uid lowport runs as.
    let uid = caller_uid();
    let gid = if is_root() {
        NOBODY
    } else {
        nix::unistd::getgid().as_raw()
    };
    let dir = TempDir::new("stress-connects", Some((uid, gid)));
    let progress = dir.path().join("progress").display().to_string();
    let script = dir.write(
        "connects.py",
        &format!(
            r#"
import os, select, socket, sys, time
SO_NETNS_COOKIE = 71
port, total, warmup, progress = {port}, {CONNECTS}, {WARMUP}, "{progress}"
own = socket.socket().getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
def note(text):
    with open(progress + ".tmp", "w") as f: f.write(text)
    os.rename(progress + ".tmp", progress)
handed = answered = 0
started = None
for i in range(total):
    if i == warmup:
        note("warm"); time.sleep(1); started = time.monotonic()
    s = socket.socket()
    if i % 2:
        s.setblocking(False)
        ep = select.epoll()
        ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLET)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        if not ep.poll(5): break
        ep.close()
        s.setblocking(True)
    else:
        s.connect(("127.0.0.1", port))
    handed += s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8) != own
    answered += s.makefile("rb").readline() == b"host\n"
    s.close()
took = time.monotonic() - started
note(f"done {{handed}} {{answered}} {{(total - warmup) / took:.0f}}")
time.sleep(3)
"#
        ),
    );
    let mut cmd = lowport();
    cmd.args([
        "run",
        "--host-loopback",
        &port.to_string(),
        "--ready-fd",
        "3",
        "--",
    ])
    .args(["/usr/bin/python3", script.to_str().unwrap()]);
    let mut launch = Launch::start(cmd);
    let log = StderrLog::take(&mut launch);
    let pid = launch.child.id();
    let mut checks = Checks::new("three_thousand_connects_to_a_host_service", &log);
    let read = || fs::read_to_string(&progress).unwrap_or_default();
    eventually("the client's warm-up", || (read() == "warm").then_some(()));
    let fds_before = settled_fds(pid);
    let rss_before = rss_kib(pid).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = String::new();
    while Instant::now() < deadline {
        done = read();
        if done.starts_with("done") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let fds_after = settled_fds(pid);
    let rss_after = rss_kib(pid).unwrap_or(0);
    let figures: Vec<&str> = done.split_whitespace().collect();
    let status = wait_with_deadline(&mut launch.child, PATIENCE);
    report(
        "three_thousand_connects_to_a_host_service",
        &[
            ("connects", CONNECTS.to_string()),
            ("handed", figures.get(1).unwrap_or(&"?").to_string()),
            ("answered", figures.get(2).unwrap_or(&"?").to_string()),
            ("connects_per_s", figures.get(3).unwrap_or(&"?").to_string()),
            ("lowport_fds", format!("{fds_before}->{fds_after}")),
            (
                "lowport_rss",
                format!("{}->{}", mib(rss_before), mib(rss_after)),
            ),
        ],
    );
    let all = CONNECTS.to_string();
    checks.check(figures.get(1) == Some(&all.as_str()), || {
        format!("not every connect was handed a host socket: {done}")
    });
    checks.check(figures.get(2) == Some(&all.as_str()), || {
        format!("not every connect reached the host service: {done}")
    });
    checks.check(fds_after <= fds_before, || {
        format!("lowport's descriptors grew from {fds_before} to {fds_after}")
    });
    checks.check(rss_after <= rss_before + 1024, || {
        format!("lowport's memory grew from {rss_before} KiB to {rss_after} KiB")
    });
    checks.check(status.map(exit_code) == Some(0), || {
        format!("lowport exited with {status:?}")
    });
    checks.done();
}

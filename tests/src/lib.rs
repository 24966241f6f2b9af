//! Support for lowport's integration tests: they drive the real `lowport` and `demo-server` binaries
//! as an unprivileged user, which is the product's real situation.
//!
//! When the tests run as root (CI does), every launch goes through `setpriv` to uid/gid 65534 with no
//! supplementary groups, from copies of the binaries in a directory that uid can read. Anything a test
//! needs and the machine lacks is reported on stderr; under `CI=true` that fails the test, elsewhere the
//! test returns early with the reason printed, never silently green.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The uid and gid the tests run lowport as when they are root.
pub const NOBODY: u32 = 65534;

/// The test user with subordinate id ranges, created by `make test` (tests/setup-test-user.sh) as root.
pub const SUBID_USER: &str = "lowport-test";

/// Generous bound for anything that should take milliseconds; only reached when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Reports a missing prerequisite: fails under CI, otherwise prints why the test does not run and
/// returns false so the test can return.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs {what}, and CI must provide it");
    }
    // Straight to the process's stderr: the test harness captures eprintln! of passing tests, and a
    // skip must not look like a pass.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: this test needs {what}");
    record_skip(what);
    false
}

/// Appends "TEST: needs WHAT" to the file named by `LOWPORT_SKIPPED`, if set: `make test` lists that
/// file at the end, since the harness reports a test that returned early as "ok".
fn record_skip(what: &str) {
    let Some(list) = std::env::var_os("LOWPORT_SKIPPED").filter(|v| !v.is_empty()) else {
        return;
    };
    // The harness names each test's thread after the test (with --test-threads=1 it runs tests on
    // the main thread instead).
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .unwrap_or_else(|| "a test in ".to_owned() + &test_binary());
    // One write per line to a file opened for appending: lines from tests running in parallel, in
    // this process or another, do not interleave.
    let line = format!("{test}: needs {what}\n");
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&list)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(err) = written {
        let _ = writeln!(
            std::io::stderr().lock(),
            "cannot record the skip in {}: {err}",
            Path::new(&list).display()
        );
    }
}

/// The name of the test executable without cargo's hash, such as "forwarding".
fn test_binary() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, _hash)) => name.to_owned(),
        None => stem,
    }
}

/// The target directory of this build (`target/debug` for `cargo test`).
pub fn target_dir() -> PathBuf {
    // tests run from target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The directory with copies of the binaries that uid 65534 can read and execute.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = target_dir();
        remove_stale_bin_dirs();
        let dir = std::env::temp_dir().join(format!("lowport-test-bin-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create the binary directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["lowport", "demo-server"] {
            let from = src.join(name);
            assert!(
                from.is_file(),
                "{} is missing: build the workspace first (cargo build --workspace; make test does)",
                from.display()
            );
            let to = dir.join(name);
            fs::copy(&from, &to).expect("copy a binary");
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    })
}

/// Removes the binary directories of test processes that have ended: the harness gives no hook at
/// exit, and each run of every test binary leaves one (about 80 MB of debug binaries), which filled
/// a machine's disk after a day of runs.
fn remove_stale_bin_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lowport-test-bin-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

pub fn lowport_bin() -> PathBuf {
    bin_dir().join("lowport")
}

pub fn demo_server_bin() -> PathBuf {
    bin_dir().join("demo-server")
}

/// A command that runs `program` as an unprivileged user: as uid/gid `uid` through setpriv when the
/// tests are root, as the current user otherwise.
pub fn unprivileged_as(uid: u32, gid: u32, program: &Path) -> Command {
    if is_root() {
        // By full path: a test may give the command a PATH without it.
        let mut cmd = Command::new(if Path::new("/usr/bin/setpriv").exists() {
            "/usr/bin/setpriv"
        } else {
            "setpriv"
        });
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        cmd.current_dir("/");
        cmd
    } else {
        Command::new(program)
    }
}

/// `lowport` as uid 65534 (or the current unprivileged user).
pub fn lowport() -> Command {
    unprivileged_as(NOBODY, NOBODY, &lowport_bin())
}

/// The uid lowport runs as in these tests.
pub fn caller_uid() -> u32 {
    if is_root() {
        NOBODY
    } else {
        nix::unistd::getuid().as_raw()
    }
}

/// One published mapping from the `--ready-fd` report.
#[derive(Clone, Debug)]
pub struct ReadyPort {
    pub protocol: String,
    pub host_ip: String,
    pub host_port: u16,
    pub port: u16,
}

/// A running `lowport run`, killed when dropped.
pub struct Launch {
    pub child: Child,
    pub pid: u32,
    pub ports: Vec<ReadyPort>,
    pub ready_line: String,
}

impl Launch {
    /// Starts `cmd` (a lowport command line ending in `run ...`) with `--ready-fd 3` appended before
    /// the command, and waits for the readiness line.
    pub fn start(mut cmd: Command) -> Launch {
        Self::try_start(&mut cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(cmd: &mut Command) -> Result<Launch, String> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let write_fd = write.as_raw_fd();
        // SAFETY: between fork and exec only dup2, which is async-signal-safe, runs.
        unsafe {
            cmd.pre_exec(move || {
                if write_fd == 3 {
                    nix::fcntl::fcntl(
                        3,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                } else {
                    nix::unistd::dup2(write_fd, 3)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn lowport: {e}"))?;
        drop(write);
        let line = read_line_within(read, PATIENCE);
        match line {
            Some(line) if !line.trim().is_empty() => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| format!("bad ready line {line:?}: {e}"))?;
                let pid = v["pid"].as_u64().ok_or("no pid in the ready line")? as u32;
                let ports = v["ports"]
                    .as_array()
                    .ok_or("no ports in the ready line")?
                    .iter()
                    .map(|p| ReadyPort {
                        protocol: p["protocol"].as_str().unwrap_or_default().to_owned(),
                        host_ip: p["host_ip"].as_str().unwrap_or_default().to_owned(),
                        host_port: p["host_port"].as_u64().unwrap_or_default() as u16,
                        port: p["port"].as_u64().unwrap_or_default() as u16,
                    })
                    .collect();
                Ok(Launch {
                    child,
                    pid,
                    ports,
                    ready_line: line,
                })
            }
            _ => {
                let _ = child.kill();
                let status = child.wait().ok();
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                Err(format!(
                    "lowport did not report readiness (status {status:?}); stderr: {err}"
                ))
            }
        }
    }

    /// The host port of the first mapping on `family` ("4" or "6").
    pub fn host_port(&self) -> u16 {
        self.ports.first().expect("a published port").host_port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.host_port()))
    }

    /// Sends `sig` to lowport itself.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("kill lowport");
    }

    /// Waits for lowport to exit, up to [`PATIENCE`].
    pub fn wait(&mut self) -> ExitStatus {
        wait_with_deadline(&mut self.child, PATIENCE).expect("lowport did not exit in time")
    }

    /// The rest of lowport's stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_line_within(fd: OwnedFd, limit: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(fs::File::from(fd)).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open descriptors of `pid`, from /proc.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A shell script that prints `open N` for each of descriptors 3, 4 and 200 it has, then what it
/// reads from 3 when it has 3 (see [`leave_descriptors_open`]).
pub const DESCRIPTOR_PROBE: &str = "for fd in 3 4 200; do [ -e /proc/$$/fd/$fd ] && echo open $fd; done; [ -e /proc/$$/fd/3 ] && cat <&3; true";

/// Makes `cmd` start with descriptors left open without close-on-exec, as a CI runner or a shell may
/// leave them: 3 a pipe holding `passed`, 4 /dev/null, and 200 a pipe holding `secret` (both
/// pipes' write ends closed, so a reader gets the line and then the end). Returns the test's own
/// copies, to keep until `cmd` has started.
pub fn leave_descriptors_open(cmd: &mut Command) -> [OwnedFd; 3] {
    // Above every target number, so that no dup2 below overwrites a source still to be moved.
    let high = |fd: &dyn AsRawFd| -> OwnedFd {
        let fd = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(500))
            .expect("dup above 500");
        // SAFETY: fcntl returned this new descriptor, and nothing else owns it.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    };
    let pipe_with = |text: &str| {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        nix::unistd::write(&write, text.as_bytes()).expect("write to the pipe");
        high(&read)
    };
    let sources = [
        pipe_with("passed\n"),
        high(&fs::File::open("/dev/null").expect("/dev/null")),
        pipe_with("secret\n"),
    ];
    let moves = [
        (sources[0].as_raw_fd(), 3),
        (sources[1].as_raw_fd(), 4),
        (sources[2].as_raw_fd(), 200),
    ];
    // SAFETY: between fork and exec only dup2, which is async-signal-safe, runs; it leaves the new
    // numbers without close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in moves {
                nix::unistd::dup2(from, to)?;
            }
            Ok(())
        });
    }
    sources
}

/// The numbers of `pid`'s open descriptors, or `None` once it is gone.
pub fn fd_numbers(pid: u32) -> Option<Vec<u32>> {
    Some(
        fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

/// How many descriptor numbers below `limit` `pid` leaves free: what an open-file limit of `limit`
/// lets it open. RLIMIT_NOFILE bounds the numbers, not the count, so a descriptor it inherited at
/// a number above `limit` (one a CI runner leaves open, say) takes nothing from it.
pub fn free_fds_below(pid: u32, limit: u32) -> Option<usize> {
    let open = fd_numbers(pid)?;
    Some(limit as usize - open.iter().filter(|&&fd| fd < limit).count())
}

/// The open-file limit that leaves `pid` exactly `spare` free descriptor numbers, counted once its
/// count holds still ([`settled_fds`]).
pub fn limit_leaving(pid: u32, spare: usize) -> u32 {
    settled_fds(pid);
    let open: std::collections::BTreeSet<u32> = fd_numbers(pid)
        .expect("lowport's /proc/PID/fd")
        .into_iter()
        .collect();
    let mut free = 0;
    (0u32..)
        .find(|fd| {
            if !open.contains(fd) {
                free += 1;
            }
            free == spare
        })
        .expect("a free number")
        + 1
}

/// Samples `pid`'s descriptor count every 50 ms until five samples in a row agree (at most
/// [`PATIENCE`]); returns the count.
pub fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + PATIENCE;
    let mut last = usize::MAX;
    let mut same = 0;
    loop {
        let n = fd_count(pid).expect("lowport's /proc/PID/fd");
        if n == last {
            same += 1;
            if same >= 5 {
                return n;
            }
        } else {
            same = 0;
            last = n;
        }
        if Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` until it returns `Some`, up to [`PATIENCE`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 exchange with `Connection: close`; returns the status code and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE)?;
    s.set_read_timeout(Some(PATIENCE))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    parse_response(&response)
}

pub fn parse_response(response: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = || {
        std::io::Error::other(format!(
            "bad HTTP response: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        ))
    };
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&response[..split]).map_err(|_| bad())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = &response[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body).ok_or_else(bad)?
        } else {
            body.to_vec()
        },
    ))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&body[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// GET `path` once the server inside answers `/healthz`; the relay is up at readiness, the server may
/// still be starting.
pub fn wait_healthy(addr: SocketAddr) {
    eventually("demo-server to answer /healthz", || {
        match http(addr, "GET", "/healthz", b"") {
            Ok((200, _)) => Some(()),
            _ => None,
        }
    });
}

/// Adds `run OPTIONS --ready-fd 3 --` to a lowport command, which `Launch::start` reads readiness
/// from; the command to run follows.
pub fn run_args<'a>(cmd: &'a mut Command, options: &[&str]) -> &'a mut Command {
    cmd.arg("run").args(options).args(["--ready-fd", "3", "--"])
}

/// `lowport run -p PUBLISH --ready-fd 3 OPTIONS -- demo-server`, once demo-server answers /healthz.
pub fn start_demo(publish: &str, options: &[&str]) -> Launch {
    let mut cmd = lowport();
    cmd.args(["run", "-p", publish, "--ready-fd", "3"])
        .args(options)
        .arg("--")
        .arg(demo_server_bin());
    let launch = Launch::start(cmd);
    wait_healthy(launch.addr());
    launch
}

pub fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, b"").expect("GET");
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON body")
}

/// Every descendant of `pid` (host pids), read from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may contain spaces and parentheses; fields resume after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let cur = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie still has a /proc entry; it counts as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A status line of /proc/PID/status, such as "CapEff".
pub fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// The uid and gid of the test user with subordinate ranges, when the tests are root and it exists
/// (after `require`).
pub fn subid_user() -> Option<(u32, u32)> {
    let ids = user_ids(SUBID_USER);
    require(
        ids.is_some() && is_root(),
        &format!("root, to run as the test user {SUBID_USER} (make test creates it)"),
    )
    .then_some(ids?)
}

/// The uid and gid of `user` from the passwd database, if it exists.
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(user).ok().flatten()?;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// Runs lowport to completion with `args`; returns the exit code and stderr.
pub fn run_to_end(cmd: &mut Command) -> (i32, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let status = wait_with_deadline(&mut child, PATIENCE).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("lowport hung");
    });
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (exit_code(status), out, err)
}

/// The exit code, or 128 + N for a signal as a shell reports it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The content of /proc/sys for a sysctl, as a number.
pub fn sysctl(path: &str) -> Option<u64> {
    fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `/proc/net/tcp` state of a listening socket.
pub const TCP_LISTEN: u8 = 0x0A;

/// One TCP socket from `/proc/PID/net/tcp` or `tcp6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpEntry {
    pub local_port: u16,
    pub remote_port: u16,
    /// The kernel's TCP state number: 1 established, 6 TIME_WAIT, 0x0A listening, ...
    pub state: u8,
    /// 0 for a socket no file refers to (TIME_WAIT, or not yet accepted).
    pub inode: u64,
}

/// Every TCP socket (IPv4 and IPv6) of the network namespace that `pid` is in.
pub fn tcp_sockets(pid: u32) -> Vec<TcpEntry> {
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    Some(TcpEntry {
                        local_port: port(f.get(1)?)?,
                        remote_port: port(f.get(2)?)?,
                        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                        inode: f.get(9)?.parse().ok()?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The inodes of the sockets among `pid`'s open files.
pub fn held_sockets(pid: u32) -> std::collections::HashSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The TCP sockets lowport holds other than its listeners: for each relayed connection, the
/// accepted client's socket (in the host's network namespace, the tests' own) and the socket to the
/// server (in the command's namespace). Empty when the relay holds no connection.
pub fn relayed_sockets(launch: &Launch) -> Vec<TcpEntry> {
    let held = held_sockets(launch.child.id());
    let mut seen = std::collections::HashSet::new();
    tcp_sockets(std::process::id())
        .into_iter()
        .chain(tcp_sockets(launch.pid))
        .filter(|s| s.state != TCP_LISTEN && held.contains(&s.inode) && seen.insert(s.inode))
        .collect()
}

/// A directory that the test removes when it ends, however it ends.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory that every uid may read and search, owned by `owner` (uid, gid) when given.
    pub fn new(tag: &str, owner: Option<(u32, u32)>) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lowport-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if let (Some((uid, gid)), true) = (owner, is_root()) {
            nix::unistd::chown(
                &dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .unwrap();
        }
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file every uid may read.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of lowport with the file capability cap_net_bind_service, in a directory of its own; None
/// (after `require`) when the tests are not root or setcap is missing.
pub fn setcap_copy(tag: &str) -> Option<(TempDir, PathBuf)> {
    let setcap = ["/usr/sbin/setcap", "/sbin/setcap"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if !require(
        is_root() && setcap.is_some(),
        "root and setcap (package libcap2-bin)",
    ) {
        return None;
    }
    let dir = TempDir::new(tag, None);
    let bin = dir.path().join("lowport");
    fs::copy(lowport_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new(setcap.unwrap())
        .arg("cap_net_bind_service=ep")
        .arg(&bin)
        .status()
        .unwrap();
    assert!(status.success(), "setcap failed");
    Some((dir, bin))
}

/// The `ip` program (package iproute2), if installed.
pub fn ip_bin() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// A network namespace of the test's own (`ip netns add lpo-TAG-PID`) with `lo` up, deleted when
/// dropped. What runs in it reaches nothing of the machine's network: only its own loopback and the
/// interfaces the test adds. Drop the processes started in it first (declare it before them).
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// `None` (after `require`) when the tests are not root or `ip` is missing.
    pub fn new(tag: &str) -> Option<TestNetns> {
        if !require(
            is_root() && ip_bin().is_some(),
            "root and ip (package iproute2), to make network namespaces",
        ) {
            return None;
        }
        let name = format!("lpo-{tag}-{}", std::process::id());
        // One left by a test run killed before its guards ran.
        let _ = Command::new(ip_bin().unwrap())
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let netns = TestNetns { name };
        netns.run_ip(&["netns", "add", &netns.name]);
        netns.ip(&["link", "set", "lo", "up"]);
        Some(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn run_ip(&self, args: &[&str]) {
        let out = Command::new(ip_bin().expect("ip"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        self.run_ip(&all);
    }

    /// The namespace's inode number, as `/proc/PID/ns/net` names it (`net:[INODE]`).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(Path::new("/run/netns").join(&self.name))
            .expect("the namespace's file in /run/netns")
            .ino()
    }

    /// Every live process in the namespace: (pid, command name, host uid).
    pub fn processes(&self) -> Vec<(u32, String, u32)> {
        let want = format!("net:[{}]", self.inode());
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
                    && process_exists(*pid)
            })
            .map(|pid| {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let uid = proc_status_field(pid, "Uid")
                    .and_then(|u| u.split_whitespace().next()?.parse().ok())
                    .unwrap_or(u32::MAX);
                (pid, comm.trim().to_owned(), uid)
            })
            .collect()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new(ip_bin().unwrap_or("ip"))
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Makes `cmd` start in `netns` (when given) and, when `binds` is not empty, in a private mount
/// namespace of its own where each `(file, over)` has `file` bind-mounted over the path `over`: the
/// host's files stay as they are, and only this command and what it starts (lowport, its host side,
/// pasta) see the test's `/etc/resolv.conf` or `/dev/net/tun`. The tests must be root (see
/// [`TestNetns::new`]); `cmd` is typically [`lowport`], which then drops to uid 65534 in there.
pub fn confine<'a>(
    cmd: &'a mut Command,
    netns: Option<&TestNetns>,
    binds: &[(&Path, &Path)],
) -> &'a mut Command {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL");
    let binds: Vec<(CString, CString)> = binds.iter().map(|(f, o)| (cstr(f), cstr(o))).collect();
    let netns: Option<OwnedFd> = netns.map(|n| {
        fs::File::open(Path::new("/run/netns").join(n.name()))
            .expect("open the test's network namespace")
            .into()
    });
    // SAFETY: between fork and exec only unshare, mount and setns run, which are system calls; every
    // path was made into a CString before the fork, so nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            use nix::mount::{mount, MsFlags};
            if !binds.is_empty() {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                // Nothing mounted from here on reaches the host's mount namespace.
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                for (file, over) in &binds {
                    mount(
                        Some(file.as_c_str()),
                        over.as_c_str(),
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )?;
                }
            }
            if let Some(fd) = &netns {
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            Ok(())
        });
    }
    cmd
}

/// The first of `paths` that exists (a tool Debian may install in one of several places).
pub fn tool(paths: &[&'static str]) -> Option<&'static str> {
    paths.iter().copied().find(|p| Path::new(p).exists())
}

/// Whether this machine has IPv6 on its loopback.
pub fn has_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Everything a process wrote on its stdout and stderr so far, read by threads as it comes.
#[derive(Clone, Default)]
pub struct Output(std::sync::Arc<std::sync::Mutex<String>>);

impl Output {
    pub fn feed(&self, r: impl Read + Send + 'static) {
        let buf = self.0.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                buf.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the output holds `needle`.
    pub fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in the output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A lowport run whose command's stdout and lowport's (and the command's) stderr are collected as
/// they come.
pub struct Watched {
    pub launch: Launch,
    pub out: Output,
}

impl Watched {
    /// Starts `cmd` (a `lowport run ... --ready-fd 3` command) and waits for its ready line.
    pub fn start(mut cmd: Command) -> Watched {
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut launch = Launch::start(cmd);
        let out = Output::default();
        out.feed(launch.child.stdout.take().unwrap());
        out.feed(launch.child.stderr.take().unwrap());
        Watched { launch, out }
    }

    /// The ready line, parsed.
    pub fn ready(&self) -> serde_json::Value {
        serde_json::from_str(&self.launch.ready_line).unwrap()
    }

    /// The ready line and the output so far, for a failing assertion's message.
    pub fn context(&self) -> String {
        format!(
            "ready line: {}\noutput:\n{}",
            self.launch.ready_line,
            self.out.text()
        )
    }
}

/// Debian's nginx, where it is installed.
pub fn nginx_bin() -> Option<&'static str> {
    tool(&["/usr/sbin/nginx", "/usr/bin/nginx"])
}

/// An nginx.conf for the tests: no daemon, its pid file and temporary files in `dir`, logs to
/// stderr, one `http { server { } }`.
pub struct NginxConf<'a> {
    /// Worker processes under a master; 0 for one process with no master.
    pub workers: u32,
    /// The `user` directive's value: `root root` where uid 0 is the only uid inside.
    pub user: &'a str,
    /// The `error_log stderr` level.
    pub log_level: &'a str,
    /// Directives of the `http` block before the temporary paths (`access_log off;` at least).
    pub http: &'a str,
    /// The body of the one `server` block.
    pub server: &'a str,
}

impl NginxConf<'_> {
    /// The configuration's text, with paths in `dir`.
    pub fn text(&self, dir: &Path) -> String {
        let d = dir.display();
        let processes = match self.workers {
            0 => "master_process off;\n".to_owned(),
            n => format!("master_process on;\nworker_processes {n};\n"),
        };
        format!(
            "daemon off;\n{processes}user {user};\npid {d}/nginx.pid;\nerror_log stderr {level};\n\
             events {{ worker_connections 64; }}\nhttp {{\n  {http}\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    {server}\n  }}\n}}\n",
            user = self.user,
            level = self.log_level,
            http = self.http,
            server = self.server,
        )
    }
}

/// `nginx -e stderr -p DIR -c DIR/nginx.conf`: nginx with its configuration, prefix and logs in `dir`.
pub fn nginx_command(dir: &TempDir) -> Vec<String> {
    vec![
        nginx_bin().unwrap().to_owned(),
        "-e".into(),
        "stderr".into(),
        "-p".into(),
        dir.path().display().to_string(),
        "-c".into(),
        dir.path().join("nginx.conf").display().to_string(),
    ]
}

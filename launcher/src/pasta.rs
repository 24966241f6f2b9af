//! `--net pasta`: full outbound traffic through pasta (package passt), as podman gives rootless
//! containers.
//!
//! pasta has to be started from the host's namespaces: it keeps its own sockets there and reaches the
//! namespace through a tap device it makes inside. So lowport's host side (`hostside`) starts it,
//! once lowport has made and set up its namespaces, with
//!
//! ```text
//! pasta --config-net -t none -u none -T none -U none --no-map-gw --quiet --foreground -P PIPE LOWPORT_PID
//! ```
//!
//! - `--config-net`: pasta gives the tap the host's addresses and routes;
//! - `-t none -u none -T none -U none`: no port is forwarded either way, published ports stay
//!   lowport's (pasta's default would forward every port a process inside listens on);
//! - `--no-map-gw`: the gateway address is not the host's loopback;
//! - `LOWPORT_PID`: pasta joins lowport's user and network namespaces;
//! - `--foreground`: pasta stays the host side's child. This version of pasta does not quit when the
//!   process it was given exits (its tap device keeps the namespace alive), so it must die with
//!   lowport: it gets SIGTERM when the host side dies (PR_SET_PDEATHSIG), and the host side dies
//!   with lowport, even when lowport is killed.
//!
//! pasta writes its pid to the pipe once it has set the namespace up; the host side waits for that,
//! so the command starts with its way out ready. lowport asks the host side to stop and reap pasta
//! when the run ends.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::hostside::{Channel, OP_PASTA, OP_PASTA_STOP};
use crate::sys;

/// Marks an answer that lowport's own checks wrote, not pasta.
const CHECKED: &str = "checked: ";

/// How long pasta may take to set the namespace up (40-80 ms here).
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `--net`: the command's way out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// Nothing out but what lowport relays (--host-loopback, --dns).
    #[default]
    None,
    /// Full outbound traffic through pasta.
    Pasta,
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Net::None => "none",
            Net::Pasta => "pasta",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PastaError {
    #[error("--net pasta: pasta is not installed (no `pasta` in PATH); install the passt package (Debian and Ubuntu: apt install passt; Fedora: dnf install passt), or leave out --net pasta")]
    Missing,
    #[error("--net pasta: {0}")]
    Failed(String),
}

/// The pasta program, from PATH.
pub fn find() -> Result<PathBuf, PastaError> {
    find_in(std::env::var_os("PATH"))
}

/// The pasta program, from the directories of `path` (`/usr/bin:/bin` when unset).
pub fn find_in(path: Option<OsString>) -> Result<PathBuf, PastaError> {
    let path = path.unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join("pasta"))
        .find(|p| {
            nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file()
        })
        .ok_or(PastaError::Missing)
}

/// pasta, running for lowport's namespaces; stopped (and reaped by the host side) when dropped.
#[derive(Debug)]
pub struct Pasta {
    channel: Channel,
}

impl Drop for Pasta {
    fn drop(&mut self) {
        let mut text = [0u8; 256];
        if let Err(err) = self.channel.call(OP_PASTA_STOP, [0; 3], &mut text) {
            debug!(
                ?err,
                "cannot ask the host side to stop pasta (it stops when lowport does)"
            );
        }
    }
}

/// Asks the host side to start pasta for lowport's namespaces, and waits until the namespace is set
/// up. Call after `netns` set-up, before the command starts.
pub fn start(channel: Channel) -> Result<Pasta, PastaError> {
    let started = Instant::now();
    let mut text = [0u8; 2048];
    let (n, _) = channel
        .call(OP_PASTA, [std::process::id() as i32, 0, 0], &mut text)
        .map_err(|e| PastaError::Failed(format!("lowport's host side did not answer: {e}")))?;
    match text[..n].split_first() {
        Some((b'+', _)) => {}
        Some((b'-', said)) => {
            let said = String::from_utf8_lossy(said);
            return Err(PastaError::Failed(match said.strip_prefix(CHECKED) {
                Some(checked) => checked.to_owned(),
                None => explain(&said),
            }));
        }
        _ => {
            return Err(PastaError::Failed(
                "lowport's host side stopped while starting pasta".into(),
            ))
        }
    }
    debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "pasta is ready"
    );
    Ok(Pasta { channel })
}

/// pasta's own words, without its noise (it tries syslog first, and warns about a family it has
/// no route for), with the fix for the failures a user meets.
fn explain(said: &str) -> String {
    let lines: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Failed to send") && !l.contains("syslog"))
        .collect();
    // "No external routable interface for IPv6" alone is a warning: pasta goes on with IPv4.
    let fatal: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("No external routable interface for IPv"))
        .collect();
    let no_route = fatal.is_empty() && !lines.is_empty();
    let said = if fatal.is_empty() {
        lines.join("; ")
    } else {
        fatal.join("; ")
    };
    let fix = if no_route
        || said.contains("No routable interface")
        || said.contains("External interface not usable")
    {
        "; pasta copies the host's addresses and routes, and this host has no default route: connect the host to a network, or leave out --net pasta"
    } else {
        ""
    };
    format!("pasta failed: {said}{fix}")
}

/// The device pasta opens as you.
pub const TUN: &str = "/dev/net/tun";

/// The checks pasta itself makes with less helpful words: the tun device (normally [`TUN`]), which
/// it opens as you.
pub fn check_tun(device: &std::path::Path) -> Result<(), String> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device);
    let path = device.display();
    match opened.map_err(|e| e.raw_os_error().unwrap_or(0)) {
        Ok(_) => Ok(()),
        Err(libc::ENOENT | libc::ENXIO | libc::ENODEV) => Err(format!(
            "{path} does not exist here, and pasta needs it: load the tun module (sudo modprobe tun) or, in a container, pass the device in (podman and docker: --device /dev/net/tun)"
        )),
        Err(errno @ (libc::EACCES | libc::EPERM)) => Err(format!(
            "pasta cannot open {path} ({}): it must be readable and writable by you, as distributions ship it (crw-rw-rw-): sudo chmod 0666 {path}",
            io::Error::from_raw_os_error(errno)
        )),
        Err(errno) => Err(format!(
            "pasta cannot open {path}: {}",
            io::Error::from_raw_os_error(errno)
        )),
    }
}

/// The host side's part: pasta as a child of the host side, in the foreground, so that it dies with
/// the host side (which dies with lowport): pasta itself stays up as long as something holds the
/// namespace, and its tap device does.
#[derive(Debug, Default)]
pub struct HostSide {
    child: Option<nix::unistd::Pid>,
    /// pasta's standard error, drained while it runs (a full pipe would stop it).
    stderr: Option<OwnedFd>,
}

impl HostSide {
    /// Starts pasta for the namespaces of `pid` and waits until it has set them up; what went
    /// wrong otherwise.
    pub fn start(&mut self, pid: i32) -> Result<(), String> {
        if self.child.is_some() {
            return Err("pasta was started already".into());
        }
        if let Err(checked) = find()
            .map_err(|e| e.to_string())
            .and_then(|_| check_tun(TUN.as_ref()))
        {
            return Err(format!("{CHECKED}{checked}"));
        }
        match self.run(pid) {
            Err(text) if text.is_empty() => Err("pasta failed and said nothing".into()),
            other => other,
        }
    }

    /// pasta's standard error while it runs, for the host side's poll loop.
    pub fn stderr(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.stderr.as_ref().map(AsFd::as_fd)
    }

    /// Reads what pasta wrote (to the debug log); drops the pipe at end-of-file.
    pub fn drain(&mut self) {
        let Some(pipe) = &self.stderr else { return };
        let said = read_available(pipe, Duration::ZERO);
        if said.is_empty() {
            self.stderr = None;
        }
        for line in said.lines() {
            debug!(line, "pasta");
        }
    }

    /// Stops pasta (SIGTERM, then SIGKILL after a second) and reaps it.
    pub fn stop(&mut self) {
        self.stderr = None;
        let Some(child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    return;
                }
                Err(nix::errno::Errno::EINTR) => {}
                _ => return,
            }
        }
    }

    fn run(&mut self, pid: i32) -> Result<(), String> {
        let program = find().map_err(|e| e.to_string())?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot make a pipe: {e}"))?;
        let (pid_read, pid_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot make a pipe: {e}"))?;
        let pidfile = format!("/proc/self/fd/{}", pid_write.as_raw_fd());
        let target = pid.to_string();
        let args: Vec<CString> = [
            program.as_os_str().as_bytes(),
            b"--config-net",
            b"-t",
            b"none",
            b"-u",
            b"none",
            b"-T",
            b"none",
            b"-U",
            b"none",
            b"--no-map-gw",
            b"--quiet",
            b"--foreground",
            b"-P",
            pidfile.as_bytes(),
            target.as_bytes(),
        ]
        .iter()
        .map(|a| CString::new(*a).expect("no NUL in pasta's arguments"))
        .collect();
        let child = match sys::fork().map_err(|e| format!("cannot start pasta: {e}"))? {
            nix::unistd::ForkResult::Child => {
                // pasta dies with the host side, which dies with lowport.
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
                sys::exec_with_stdio(&args, err_write.as_fd(), pid_write.as_raw_fd())
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(err_write);
        drop(pid_write);
        self.child = Some(child);
        // pasta writes its pid once the namespace is set up, and exits at the first error.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !read_available(&pid_read, Duration::from_millis(5))
                .trim()
                .is_empty()
            {
                hostside_nonblocking(&err_read);
                self.stderr = Some(err_read);
                return Ok(());
            }
            match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {}
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    self.stop();
                    return Err(format!(
                        "pasta did not set the namespace up within {} s; it was stopped",
                        START_TIMEOUT.as_secs()
                    ));
                }
                Ok(status) => {
                    self.child = None;
                    let said = read_available(&err_read, Duration::ZERO);
                    let said = said.trim();
                    return Err(if said.is_empty() {
                        format!("pasta ended with {status:?} and said nothing")
                    } else {
                        said.to_owned()
                    });
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("cannot wait for pasta: {e}")),
            }
        }
    }
}

fn hostside_nonblocking(fd: &OwnedFd) {
    let _ = crate::hostside::set_nonblocking(fd);
}

/// What a pipe holds now, or once something arrives within `wait`; never waits for end-of-file.
fn read_available(pipe: &OwnedFd, wait: Duration) -> String {
    let mut fds = [nix::poll::PollFd::new(
        pipe.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = nix::poll::PollTimeout::try_from(wait).unwrap_or(nix::poll::PollTimeout::MAX);
    if !matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0) {
        return String::new();
    }
    if crate::hostside::set_nonblocking(pipe).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let Ok(copy) = pipe.try_clone() else {
        return String::new();
    };
    let mut file = std::fs::File::from(copy);
    let mut buf = [0u8; 4096];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 || out.len() > 16 * 1024 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

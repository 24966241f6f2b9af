//! `--net pasta`: full outbound traffic through pasta (package passt), as podman gives rootless
//! containers.
//!
//! pasta has to be started from the host's namespaces: it keeps its own sockets there and reaches the
//! namespace through a tap device it makes inside. So lowport's host side (`hostside`) starts it,
//! once lowport has made and set up its namespaces, with
//!
//! ```text
//! pasta --config-net -t none -u none -T none -U none --no-map-gw --quiet -P PIPE LOWPORT_PID
//! ```
//!
//! - `--config-net`: pasta gives the tap the host's addresses and routes;
//! - `-t none -u none -T none -U none`: no port is forwarded either way, published ports stay
//!   lowport's (pasta's default would forward every port a process inside listens on);
//! - `--no-map-gw`: the gateway address is not the host's loopback;
//! - `LOWPORT_PID`: pasta joins lowport's user and network namespaces, and quits when they are gone.
//!
//! pasta configures the namespace, then its first process exits and a daemon carries on; the host
//! side waits for that exit, so the command starts with its way out ready, and reads the daemon's
//! pid from the pipe. lowport stops the daemon when the run ends.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::hostside::{Channel, OP_PASTA};
use crate::sys;

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
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join("pasta"))
        .find(|p| {
            nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file()
        })
        .ok_or(PastaError::Missing)
}

/// The running pasta daemon; stopped when dropped.
#[derive(Debug)]
pub struct Pasta {
    pidfd: OwnedFd,
}

impl Drop for Pasta {
    fn drop(&mut self) {
        if let Err(err) = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGTERM) {
            debug!(?err, "cannot stop pasta (it has exited already)");
        }
    }
}

/// Asks the host side to start pasta for lowport's namespaces, and waits until the namespace is set
/// up. Call after `netns` set-up, before the command starts.
pub fn start(channel: &Channel) -> Result<Pasta, PastaError> {
    let started = Instant::now();
    let mut text = [0u8; 2048];
    let (n, pidfd) = channel
        .call(OP_PASTA, [std::process::id() as i32, 0, 0], &mut text)
        .map_err(|e| PastaError::Failed(format!("lowport's host side did not answer: {e}")))?;
    match pidfd {
        Some(pidfd) => {
            debug!(
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "pasta is ready"
            );
            Ok(Pasta { pidfd })
        }
        None => Err(PastaError::Failed(explain(&String::from_utf8_lossy(
            &text[..n],
        )))),
    }
}

/// pasta's own words, with the fix for the failures a user meets.
fn explain(said: &str) -> String {
    let said = said.trim();
    let fix = if said.contains("/dev/net/tun") {
        if said.contains("No such file") {
            "; this system has no /dev/net/tun: load the tun module (sudo modprobe tun) or, in a container, pass the device in (--device /dev/net/tun)"
        } else {
            "; /dev/net/tun must be readable and writable by you, as distributions ship it (mode 0666): sudo chmod 0666 /dev/net/tun"
        }
    } else if said.contains("default route") || said.contains("No routable interface") {
        "; pasta copies the host's addresses and routes, and this host has no default route: connect the host to a network, or leave out --net pasta"
    } else {
        ""
    };
    format!("pasta failed: {said}{fix}")
}

/// The host side's part: starts pasta and waits for its first process.
#[derive(Debug, Default)]
pub struct HostSide {
    started: bool,
}

impl HostSide {
    /// Starts pasta for the namespaces of `pid`; the pidfd of its daemon, or what went wrong.
    pub fn start(&mut self, pid: i32) -> (String, Option<OwnedFd>) {
        if std::mem::replace(&mut self.started, true) {
            return ("pasta was started already".into(), None);
        }
        match run_pasta(pid) {
            Ok(pidfd) => (String::new(), Some(pidfd)),
            Err(text) => (text, None),
        }
    }
}

fn run_pasta(pid: i32) -> Result<OwnedFd, String> {
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
        b"-P",
        pidfile.as_bytes(),
        target.as_bytes(),
    ]
    .iter()
    .map(|a| CString::new(*a).expect("no NUL in pasta's arguments"))
    .collect();
    let child = match sys::fork().map_err(|e| format!("cannot start pasta: {e}"))? {
        nix::unistd::ForkResult::Child => {
            sys::exec_with_stdio(&args, err_write.as_fd(), pid_write.as_raw_fd())
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(err_write);
    drop(pid_write);
    // pasta's first process exits once the namespace is set up, or at the first error.
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(format!(
                    "pasta did not set the namespace up within {} s; it was stopped",
                    START_TIMEOUT.as_secs()
                ));
            }
            Ok(status) => break status,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("cannot wait for pasta: {e}")),
        }
    };
    // pasta's daemon may keep the pipes open: read what is there, never up to end-of-file.
    let said = read_available(&err_read, Duration::ZERO);
    if status != nix::sys::wait::WaitStatus::Exited(child, 0) {
        let said = said.trim();
        return Err(if said.is_empty() {
            format!("pasta ended with {status:?} and said nothing")
        } else {
            said.to_owned()
        });
    }
    // The daemon writes its pid, possibly just after the first process has exited.
    let written = read_available(&pid_read, Duration::from_secs(2));
    let daemon: i32 = written
        .trim()
        .parse()
        .map_err(|_| format!("pasta started but wrote no pid ('{}')", written.trim()))?;
    sys::pidfd_open(nix::unistd::Pid::from_raw(daemon))
        .map_err(|e| format!("pasta's daemon (pid {daemon}) is gone already: {e}"))
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

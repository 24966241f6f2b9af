//! Socket activation, systemd's protocol (sd_listen_fds(3)).
//!
//! A parent that already holds listening sockets (systemd, `systemd-socket-activate`, or lowport
//! publishing a port) passes them as descriptors 3, 4, … and sets `LISTEN_PID` to our pid and
//! `LISTEN_FDS` to their count. `LISTEN_PID` is what keeps a grandchild that inherits the environment
//! from mistaking descriptors 3.. for sockets meant for it.

use std::env;
use std::os::fd::RawFd;

use nix::errno::Errno;
use thiserror::Error;

use crate::sys::{self, InheritedProblem, InheritedSocket};
use crate::Sockets;

/// The first inherited descriptor (SD_LISTEN_FDS_START).
pub const FIRST_FD: RawFd = 3;

/// Variables of the protocol; all three are removed from our environment once read.
const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("socket activation: LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error("socket activation: LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error(
        "socket activation: LISTEN_FDS={count} but fd {fd} is not open: {} \
         (the parent must pass the sockets as fds 3 to {last})",
        .source.desc(),
        last = FIRST_FD as u64 + u64::from(*.count) - 1
    )]
    NotOpen {
        fd: RawFd,
        count: u32,
        #[source]
        source: Errno,
    },
    #[error("socket activation: inherited fd {fd} is not a socket")]
    NotSocket { fd: RawFd },
    #[error(
        "socket activation: inherited fd {fd} is a {family} socket \
         (demo-server serves IPv4 and IPv6 sockets only)"
    )]
    Family { fd: RawFd, family: String },
    #[error(
        "socket activation: inherited fd {fd} is a {kind} socket \
         (demo-server serves TCP listening sockets and UDP sockets)"
    )]
    Type { fd: RawFd, kind: String },
    #[error(
        "socket activation: inherited fd {fd} is a TCP socket that is not listening \
         (the parent must call listen() on it before passing it)"
    )]
    NotListening { fd: RawFd },
    #[error("socket activation: cannot {what} on inherited fd {fd}: {}", .source.desc())]
    Setup {
        fd: RawFd,
        what: &'static str,
        #[source]
        source: Errno,
    },
}

/// Reads the activation variables, removes them from the environment, and adopts the inherited
/// sockets. `Ok(None)` means we were not socket-activated (no variables, or they name another pid).
///
/// Call it first thing in `main`, while the process has one thread: it edits the environment, which
/// is not safe while other threads may read it, and it must adopt fds 3.. before anything else in
/// the process opens a file and could be given one of those numbers.
pub fn take_from_env() -> Result<Option<Sockets>, ActivationError> {
    let pid = env::var_os(LISTEN_PID);
    let fds = env::var_os(LISTEN_FDS);
    // Removed whether or not they were for us, as sd_listen_fds(unset_environment=1) does, so that
    // nothing we start can misread them.
    env::remove_var(LISTEN_PID);
    env::remove_var(LISTEN_FDS);
    env::remove_var(LISTEN_FDNAMES);

    let pid = pid.map(|v| v.to_string_lossy().into_owned());
    let fds = fds.map(|v| v.to_string_lossy().into_owned());
    let Some(count) = inherited_count(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(None);
    };

    let mut sockets = Sockets::default();
    for i in 0..count {
        // inherited_count bounds `count` so that this cannot overflow.
        let fd = FIRST_FD + i as RawFd;
        match sys::adopt_inherited(fd) {
            Ok(InheritedSocket::Tcp(l)) => sockets.tcp.push(l),
            Ok(InheritedSocket::Udp(u)) => sockets.udp.push(u),
            Err(problem) => return Err(explain(fd, count, problem)),
        }
    }
    Ok(Some(sockets))
}

/// How many sockets the environment says we inherited; `None` when they are not for us.
///
/// `pid` and `fds` are the raw values of `LISTEN_PID` and `LISTEN_FDS`. Follows sd_listen_fds: no
/// `LISTEN_PID`, or one naming another process, means "not activated"; a value that does not parse
/// is an error rather than something to guess about.
pub fn inherited_count(
    pid: Option<&str>,
    fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<u32>, ActivationError> {
    let Some(pid) = pid else { return Ok(None) };
    let parsed: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
    if parsed != our_pid {
        return Ok(None);
    }
    let Some(fds) = fds else { return Ok(None) };
    let count: u32 = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))?;
    // Descriptor numbers are ints; 3 + count must stay representable (as in sd_listen_fds).
    if count > (RawFd::MAX - FIRST_FD) as u32 {
        return Err(ActivationError::BadCount(fds.to_owned()));
    }
    Ok((count > 0).then_some(count))
}

fn explain(fd: RawFd, count: u32, problem: InheritedProblem) -> ActivationError {
    match problem {
        InheritedProblem::NotOpen(source) => ActivationError::NotOpen { fd, count, source },
        InheritedProblem::NotSocket => ActivationError::NotSocket { fd },
        InheritedProblem::Family(family) => ActivationError::Family {
            fd,
            family: family.map_or_else(|| "non-IP".to_owned(), |f| format!("{f:?}")),
        },
        InheritedProblem::Type(ty) => ActivationError::Type {
            fd,
            kind: ty.map_or_else(|| "raw or packet".to_owned(), |t| format!("{t:?}")),
        },
        InheritedProblem::NotListening => ActivationError::NotListening { fd },
        InheritedProblem::Setup(what, source) => ActivationError::Setup { fd, what, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_activated_without_listen_pid() {
        assert_eq!(inherited_count(None, Some("2"), 42), Ok(None));
    }

    #[test]
    fn not_activated_for_another_pid() {
        assert_eq!(inherited_count(Some("41"), Some("2"), 42), Ok(None));
    }

    #[test]
    fn activated_for_our_pid() {
        assert_eq!(inherited_count(Some("42"), Some("2"), 42), Ok(Some(2)));
        assert_eq!(inherited_count(Some(" 42\n"), Some("1"), 42), Ok(Some(1)));
    }

    #[test]
    fn zero_fds_is_not_activated() {
        assert_eq!(inherited_count(Some("42"), Some("0"), 42), Ok(None));
        assert_eq!(inherited_count(Some("42"), None, 42), Ok(None));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(
            inherited_count(Some("me"), Some("1"), 42),
            Err(ActivationError::BadPid("me".into()))
        );
        assert_eq!(
            inherited_count(Some("42"), Some("-1"), 42),
            Err(ActivationError::BadCount("-1".into()))
        );
        assert_eq!(
            inherited_count(Some("42"), Some("4294967295"), 42),
            Err(ActivationError::BadCount("4294967295".into()))
        );
    }

    #[test]
    fn not_open_message_names_the_range() {
        let err = explain(4, 2, InheritedProblem::NotOpen(Errno::EBADF));
        assert_eq!(
            err.to_string(),
            "socket activation: LISTEN_FDS=2 but fd 4 is not open: Bad file number \
             (the parent must pass the sockets as fds 3 to 4)"
        );
    }
}

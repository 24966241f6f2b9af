//! systemd's readiness protocol, sd_notify(3), from the side of the service: with `Type=notify`
//! systemd puts a datagram socket's address in `NOTIFY_SOCKET` and waits for `READY=1` on it.
//!
//! lowport is the process systemd started, stays in the foreground and exits with the command's
//! status, so lowport is the service's main process and it is lowport that reports: `READY=1` once
//! the server accepts on every published port (see `ready`), with `MAINPID=` lowport's own pid (what
//! systemd already assumes; said so that `NotifyAccess=main` and a unit that guesses otherwise agree),
//! and `STOPPING=1` when lowport begins to stop the command. The command itself never sees
//! `NOTIFY_SOCKET` ([`VARS`] are removed from its environment): a server that reported ready itself
//! (nginx built with systemd support does) would say so before lowport's ports reach it, and from a
//! process systemd does not know as its main one.
//!
//! The address is a path or, with a leading `@`, an abstract name. Abstract names belong to the
//! network namespace, so the socket is connected in launch step 1, before `unshare`, and kept.
//! Written by hand: the protocol is one datagram of `KEY=value` lines, and libsystemd is not needed.

use std::io;
use std::os::unix::net::UnixDatagram;

use tracing::{debug, warn};

/// The environment variables of the protocol, removed from the command's environment.
pub const VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"];

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={addr}: cannot connect to systemd's notification socket: {source} (is the unit Type=notify, and may this user write to the socket?)")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// The connected notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    stopping_sent: std::sync::atomic::AtomicBool,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` when it is set; `Ok(None)` when it is not (or is empty, or names
    /// an address family lowport does not speak, such as `vsock:`, which is logged).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let addr = addr.to_string_lossy().into_owned();
        Notifier::connect(&addr)
    }

    /// Connects to `addr`, a path or an `@`-prefixed abstract name.
    pub fn connect(addr: &str) -> Result<Option<Notifier>, NotifyError> {
        let connect_err = |source| NotifyError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let socket = if let Some(name) = addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let sockaddr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(connect_err)?;
            let socket = UnixDatagram::unbound().map_err(connect_err)?;
            socket.connect_addr(&sockaddr).map_err(connect_err)?;
            socket
        } else if addr.starts_with('/') {
            let socket = UnixDatagram::unbound().map_err(connect_err)?;
            socket.connect(addr).map_err(connect_err)?;
            socket
        } else {
            if !addr.is_empty() {
                warn!(
                    addr,
                    "NOTIFY_SOCKET is neither a path nor an abstract name (@...); lowport does not notify systemd"
                );
            }
            return Ok(None);
        };
        // A full queue (systemd busy) must not stop lowport: a lost STATUS= is better than a wait.
        socket.set_nonblocking(true).map_err(connect_err)?;
        debug!(addr, "connected to systemd's notification socket");
        Ok(Some(Notifier {
            socket,
            stopping_sent: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The socket's descriptor, for the forked helpers to close.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }

    fn send(&self, text: &str) {
        if let Err(err) = self.socket.send(text.as_bytes()) {
            warn!(?err, text, "cannot notify systemd");
        }
    }

    /// `READY=1`, with lowport's pid as the main pid and `status` for `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&ready_message(std::process::id(), status));
    }

    /// `STATUS=` text only.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    /// `STOPPING=1`, once per run.
    pub fn stopping(&self) {
        if !self
            .stopping_sent
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.send("STOPPING=1\n");
        }
    }
}

/// The datagram of [`Notifier::ready`].
fn ready_message(pid: u32, status: &str) -> String {
    format!("READY=1\nMAINPID={pid}\nSTATUS={}\n", one_line(status))
}

/// A value ends at the line's end: a newline in it would start another assignment.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_names_the_main_pid_on_lines_of_their_own() {
        assert_eq!(
            ready_message(42, "serving\n8080"),
            "READY=1\nMAINPID=42\nSTATUS=serving 8080\n"
        );
    }

    #[test]
    fn paths_and_abstract_names_are_reached_and_others_ignored() {
        let dir = std::env::temp_dir().join(format!("lowport-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(path.to_str().unwrap()).unwrap().unwrap();
        notifier.stopping();
        notifier.stopping();
        notifier.status("x");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x\n");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("lowport-notify-test-{}", std::process::id());
        let abstract_addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        let notifier = Notifier::connect(&format!("@{name}")).unwrap().unwrap();
        notifier.status("y");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=y\n");

        assert!(Notifier::connect("vsock:2:1234").unwrap().is_none());
        assert!(Notifier::connect("/nonexistent/lowport/notify").is_err());
    }
}

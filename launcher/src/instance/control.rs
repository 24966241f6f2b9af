//! The running lowport's side of the control socket: one thread that answers [`Request`]s from
//! `lowport exec`, `stop` and `port` ([`super::client`]).
//!
//! Each request is one `SOCK_SEQPACKET` message of JSON, and each reply one message, with descriptors
//! attached where the request needs them: the namespaces for `exec`, the host sockets a `port add`
//! bound. The caller must be the user who started lowport, whatever the directory's mode says:
//! `SO_PEERCRED` gives its uid.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::PortState;
use crate::forward::{is_resource_shortage, SHORTAGE_FIRST_WAIT, SHORTAGE_LONGEST_WAIT};
use crate::publish::{Protocol, PublishSpec};
use crate::sys;

/// The largest message either side sends.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What a client asks.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The namespaces to join: user, network, pid and mount, in that order (the last two when the
    /// command has them).
    Exec,
    /// Stop the command, as SIGTERM to lowport would.
    Stop,
    /// Publish `spec` through the host sockets attached, which the client bound.
    PortAdd { spec: String },
    /// Stop publishing the host port `spec` names.
    PortRm { spec: String },
}

/// A request as a client sends it: the instance it is meant for, and what it asks.
///
/// The server inside runs as the user and may rewrite the `control` file of any instance to name
/// another one's socket (its own, say): the user's `lowport exec web` would then join the server's
/// namespaces, `port add web` hand it a host socket, and `stop web` stop the wrong instance. The
/// instance that answers checks the name, which only it and its client know for sure.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub instance: String,
    #[serde(flatten)]
    pub request: Request,
}

/// What the instance answers.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The namespaces are attached, in the order of `kinds`.
    Namespaces {
        kinds: Vec<String>,
    },
    /// SIGTERM is on its way to the command; the connection closes when lowport exits.
    Stopping {
        pid: u32,
    },
    /// The ports published now.
    Ports {
        ports: Vec<PortState>,
    },
    Error {
        message: String,
    },
}

/// Adds and removes published ports while the command runs; `launch` implements it, since it owns
/// the relays.
pub trait LivePorts: Send + Sync {
    fn add(&self, spec: PublishSpec, sockets: Vec<OwnedFd>) -> Result<Vec<PortState>, String>;
    fn remove(&self, which: &HostPort) -> Result<Vec<PortState>, String>;
}

/// A published host port as `lowport port rm` names it: `[HOST_IP:]HOST_PORT[/tcp|udp]`, or a whole
/// `-p` spec, whose inner port is then ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub protocol: Protocol,
}

impl HostPort {
    pub fn matches(&self, protocol: Protocol, addr: std::net::SocketAddr) -> bool {
        protocol == self.protocol
            && addr.port() == self.host_port
            && self.host_ip.is_none_or(|ip| ip == addr.ip())
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        if let Some(spec) = text
            .parse::<PublishSpec>()
            .ok()
            .filter(|s| s.fdname.is_none())
        {
            return Ok(HostPort {
                host_ip: spec.host_ip,
                host_port: spec.host_port,
                protocol: spec.protocol,
            });
        }
        let bad = || {
            format!("'{text}' names no host port; write HOST_PORT[/tcp|udp], HOST_IP:HOST_PORT, or the -p spec it was published with")
        };
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Protocol::Tcp),
            Some((rest, "udp")) => (rest, Protocol::Udp),
            Some(_) => return Err(bad()),
            None => (text, Protocol::Tcp),
        };
        let (ip, port) = match rest.rsplit_once(':') {
            Some((ip, port)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (Some(ip.parse::<IpAddr>().map_err(|_| bad())?), port)
            }
            None => (None, rest),
        };
        let host_port: u16 = port.parse().map_err(|_| bad())?;
        if host_port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host_ip: ip,
            host_port,
            protocol,
        })
    }
}

/// What the control thread needs from the launch.
pub struct Served {
    /// The pid-1 helper's pid and mount namespaces (see `init::Namespaces`).
    pub pid_ns: Option<OwnedFd>,
    pub mnt_ns: Option<OwnedFd>,
    pub ports: Arc<dyn LivePorts>,
}

/// Makes the listening control socket, close-on-exec, under a random abstract name in the caller's
/// network namespace (the host's: lowport calls this before it leaves), and writes that name to
/// `path` (mode 0600) for clients. A random name cannot be taken first by another user; a client
/// also checks that the socket's owner is itself.
pub fn listen(instance: &str, path: &Path) -> io::Result<OwnedFd> {
    let sock = seqpacket()?;
    let mut random = [0u8; 12];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!(
        "lowport/{}/{instance}/{hex}",
        nix::unistd::geteuid().as_raw()
    );
    socket::bind(sock.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
    socket::listen(&sock, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut file, name.as_bytes())?;
    Ok(sock)
}

/// A close-on-exec `SOCK_SEQPACKET` UNIX socket: one request or reply per message, descriptors
/// attached.
fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Connects to the control socket named in `path`, and checks that its owner is this user.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let name = super::read_own_file(path)?;
    let sock = seqpacket()?;
    socket::connect(
        sock.as_raw_fd(),
        &UnixAddr::new_abstract(name.trim().as_bytes())?,
    )?;
    let owner = socket::getsockopt(&sock, sockopt::PeerCredentials)?;
    if owner.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "its control socket belongs to uid {}, not to you",
            owner.uid()
        )));
    }
    Ok(sock)
}

/// Answers requests on `listener` on a thread of its own, one connection at a time, for as long as
/// lowport runs.
pub fn serve(listener: OwnedFd, served: Served) -> io::Result<()> {
    let instance = bound_instance(&listener)?;
    std::thread::Builder::new()
        .name("lowport-control".into())
        .spawn(move || {
            // Connections of `stop` stay open until lowport exits: their end-of-file tells the
            // client the instance has ended.
            let mut held = Vec::new();
            let mut backoff = SHORTAGE_FIRST_WAIT;
            loop {
                let conn = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    Ok(fd) => unsafe { sys::own_raw(fd) },
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                    // Out of descriptors or memory (the relay can take the number an answered
                    // connection gave back): wait for them as the relay does, and serve again once
                    // they are back.
                    Err(err) if is_resource_shortage(&err.into()) => {
                        warn!(
                            ?err,
                            delay_ms = backoff.as_millis() as u64,
                            "the control socket cannot accept; backing off"
                        );
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(SHORTAGE_LONGEST_WAIT);
                        continue;
                    }
                    Err(err) => {
                        warn!(?err, "the control socket failed; lowport exec, stop and port no longer reach this instance");
                        return;
                    }
                };
                backoff = SHORTAGE_FIRST_WAIT;
                if let Some(keep) = answer(&conn, &served, &instance) {
                    held.push(keep);
                }
            }
        })?;
    Ok(())
}

/// The instance's name, from the abstract name [`listen`] bound (`lowport/UID/NAME/RANDOM`).
fn bound_instance(listener: &OwnedFd) -> io::Result<String> {
    let addr: UnixAddr = socket::getsockname(listener.as_raw_fd())?;
    let name = addr
        .as_abstract()
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .and_then(|text| text.split('/').nth(2))
        .filter(|name| super::valid_name(name));
    name.map(str::to_owned)
        .ok_or_else(|| io::Error::other("the control socket has no instance name"))
}

/// Answers one connection; returns it when it must stay open.
fn answer(conn: &OwnedFd, served: &Served, instance: &str) -> Option<OwnedFd> {
    // Anyone may connect to an abstract name, and /proc/net/unix lists them for everyone. Another
    // user's connection is answered at once, without waiting for its request: one at a time, each
    // waited for, connections that never send would keep the user's own `stop` out.
    match socket::getsockopt(conn, sockopt::PeerCredentials) {
        // Both uids as this user namespace sees them: the user who started lowport is its uid 0,
        // another user is unmapped (65534) or one of the user's own subordinate ids.
        Ok(cred) if cred.uid() == nix::unistd::getuid().as_raw() => {}
        other => {
            debug!(?other, "control connection from another user refused");
            refuse(conn, "this instance belongs to another user");
            return None;
        }
    }
    // The user's own client sends at once; one that connects and says nothing (a process of the
    // user's, since the server inside cannot connect) must not keep the others waiting long.
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    let _ = socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeout);
    // The request is read before anything is answered, also one that is refused: closing a
    // connection with a message unread resets it, and the caller would not see why.
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = match sys::recv_with_fds(conn.as_fd(), &mut buf) {
        Ok(got) => got,
        Err(err) => {
            debug!(?err, "control request not read");
            return None;
        }
    };
    let request = match serde_json::from_slice::<Envelope>(&buf[..n]) {
        Ok(envelope) if envelope.instance == instance => envelope.request,
        Ok(envelope) => {
            let asked = envelope.instance;
            debug!(asked, "control request for another instance");
            answer_error(conn, format!(
                        "lowport reached instance '{instance}' instead: the file naming the control socket of '{asked}' was changed (the servers run as you and may write it); restart '{asked}' to reach it again"
                    ));
            return None;
        }
        Err(err) => {
            answer_error(conn, format!("not a request: {err}"));
            return None;
        }
    };
    debug!(?request, "control request");
    match request {
        Request::Exec => {
            let own = |kind: &str| {
                std::fs::File::open(format!("/proc/thread-self/ns/{kind}")).map(OwnedFd::from)
            };
            let (user, net) = match (own("user"), own("net")) {
                (Ok(u), Ok(n)) => (u, n),
                (Err(err), _) | (_, Err(err)) => {
                    answer_error(
                        conn,
                        format!("cannot open the instance's namespaces: {err}"),
                    );
                    return None;
                }
            };
            let mut kinds = vec!["user".to_owned(), "net".to_owned()];
            let mut fds = vec![user.as_fd(), net.as_fd()];
            if let Some(pid) = &served.pid_ns {
                kinds.push("pid".into());
                fds.push(pid.as_fd());
            }
            if let Some(mnt) = &served.mnt_ns {
                kinds.push("mnt".into());
                fds.push(mnt.as_fd());
            }
            reply(conn, &Reply::Namespaces { kinds }, &fds);
            None
        }
        Request::Stop => {
            let pid = std::process::id();
            reply(conn, &Reply::Stopping { pid }, &[]);
            // As if the user had sent SIGTERM: the supervisor forwards it to the command, and lowport
            // exits with the command's status.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
            conn.try_clone().ok()
        }
        Request::PortAdd { spec } => {
            let answer = spec
                .parse::<PublishSpec>()
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    if fds.is_empty() {
                        Err("no host socket came with the request".into())
                    } else {
                        served.ports.add(spec, fds)
                    }
                });
            reply(conn, &ports_reply(answer), &[]);
            None
        }
        Request::PortRm { spec } => {
            let answer = spec
                .parse::<HostPort>()
                .and_then(|which| served.ports.remove(&which));
            reply(conn, &ports_reply(answer), &[]);
            None
        }
    }
}

/// Answers `message` without reading the request, then closes without a reset: shut down first, so
/// that nothing more can arrive, then discard what came before (a message left unread would make the
/// caller read ECONNRESET instead of the reason). Never waits.
fn refuse(conn: &OwnedFd, message: &str) {
    reply(
        conn,
        &Reply::Error {
            message: message.into(),
        },
        &[],
    );
    let _ = socket::shutdown(conn.as_raw_fd(), socket::Shutdown::Both);
    let mut byte = [0u8; 1];
    while let Ok(1) = socket::recv(conn.as_raw_fd(), &mut byte, socket::MsgFlags::MSG_DONTWAIT) {}
}

/// Answers with an error the client prints.
fn answer_error(conn: &OwnedFd, message: impl Into<String>) {
    reply(
        conn,
        &Reply::Error {
            message: message.into(),
        },
        &[],
    );
}

fn ports_reply(answer: Result<Vec<PortState>, String>) -> Reply {
    match answer {
        Ok(ports) => Reply::Ports { ports },
        Err(message) => Reply::Error { message },
    }
}

fn reply(conn: &OwnedFd, reply: &Reply, fds: &[std::os::fd::BorrowedFd]) {
    let text = serde_json::to_vec(reply).unwrap_or_default();
    if let Err(err) = sys::send_with_fds(conn.as_raw_fd(), &text, fds) {
        debug!(?err, "control reply not sent");
    }
}

/// How long a client waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_are_parsed() {
        let p: HostPort = "8080".parse().unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.protocol),
            (None, 8080, Protocol::Tcp)
        );
        let p: HostPort = "5353/udp".parse().unwrap();
        assert_eq!((p.host_port, p.protocol), (5353, Protocol::Udp));
        let p: HostPort = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(p.host_ip, Some("127.0.0.1".parse().unwrap()));
        let p: HostPort = "[::1]:8080/tcp".parse().unwrap();
        assert_eq!(p.host_ip, Some("::1".parse().unwrap()));
        let p: HostPort = "127.0.0.1:8081:80/udp".parse().unwrap();
        assert_eq!((p.host_port, p.protocol), (8081, Protocol::Udp));
        for bad in ["", "0", "x", "80/sctp", "host:80", "70000"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_are_tagged_json() {
        let text = serde_json::to_string(&Request::PortAdd {
            spec: "8081:80".into(),
        })
        .unwrap();
        assert_eq!(text, r#"{"request":"port_add","spec":"8081:80"}"#);
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back,
            Request::PortAdd {
                spec: "8081:80".into()
            }
        );
        let sent = Envelope {
            instance: "web".into(),
            request: Request::Stop,
        };
        let text = serde_json::to_string(&sent).unwrap();
        assert_eq!(text, r#"{"instance":"web","request":"stop"}"#);
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), sent);
        assert!(serde_json::from_str::<Envelope>(r#"{"request":"stop"}"#).is_err());
    }

    #[test]
    fn the_serving_thread_knows_its_instance_from_the_bound_name() {
        let dir = std::env::temp_dir().join(format!("lowport-unit-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = listen("web-2.x", &dir.join("control")).unwrap();
        assert_eq!(bound_instance(&sock).unwrap(), "web-2.x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

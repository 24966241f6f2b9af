//! The host side of publishing: binding each `--publish` host address before any namespace exists.
//!
//! Binding happens first, in the host's network namespace and with the caller's own rights (plus
//! `cap_net_bind_service` when the binary carries that file capability), so every later step can fail
//! cleanly: the sockets just close when the launcher exits.

use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

use crate::activation::{Given, Inherited, Kind};
use crate::publish::{Protocol, PublishSpec};

/// One bound host socket and the mapping it serves.
#[derive(Debug)]
pub struct HostSocket {
    pub spec: PublishSpec,
    /// The address as bound, with the real port when 0 was asked for.
    pub addr: SocketAddr,
    pub socket: Bound,
    /// Its name in `LISTEN_FDNAMES` when systemd gave it to lowport (see [`crate::activation`]);
    /// `None` when lowport bound it.
    pub inherited: Option<String>,
}

/// A listening TCP socket or a bound UDP socket.
#[derive(Debug)]
pub enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl std::os::fd::AsRawFd for Bound {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Bound::Tcp(s) => s.as_raw_fd(),
            Bound::Udp(s) => s.as_raw_fd(),
        }
    }
}

impl std::os::fd::AsFd for Bound {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Bound::Tcp(s) => s.as_fd(),
            Bound::Udp(s) => s.as_fd(),
        }
    }
}

impl Bound {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Bound::Tcp(s) => s.local_addr(),
            Bound::Udp(s) => s.local_addr(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("host port {port}/{protocol} on {ip} is already in use (-p {spec}): stop the program that holds it (ss -lntu 'sport = :{port}' shows the socket; as root, ss -lntup also names the program), publish another host port, or use 0 to let lowport pick a free one")]
    InUse {
        spec: PublishSpec,
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
    },
    #[error("cannot bind host port {port} (-p {spec}): ports below {start} need privilege on this host (net.ipv4.ip_unprivileged_port_start is {start}). Publish a host port of {start} or above, as in -p {suggest}:{inner}; or, once, as root: give lowport the capability with setcap cap_net_bind_service=ep \"$(command -v lowport)\", or lower the host's threshold with sysctl -w net.ipv4.ip_unprivileged_port_start={port} (see docs/troubleshooting.md)")]
    Privileged {
        spec: PublishSpec,
        port: u16,
        start: u16,
        suggest: u32,
        inner: u16,
    },
    #[error("cannot bind {ip} (-p {spec}): it is not an address of this host")]
    NotLocal { spec: PublishSpec, ip: IpAddr },
    #[error("cannot serve -p {spec} from the socket systemd gave lowport ({addr}): {source}")]
    Inherited {
        spec: PublishSpec,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("-p {spec} does not serve the socket systemd gave lowport on port {port} ({given}), and lowport cannot bind one of its own beside it: {cause}; to serve the socket systemd gave, write {fixes}")]
    NotTheGiven {
        spec: PublishSpec,
        port: u16,
        given: String,
        cause: &'static str,
        fixes: String,
    },
    #[error("cannot bind {addr} (-p {spec}): {source}")]
    Other {
        spec: PublishSpec,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds and listens on every host address of every spec. `proc_sys` (normally /proc/sys) is read only
/// to explain a refusal.
pub fn bind_all(specs: &[PublishSpec], proc_sys: &Path) -> Result<Vec<HostSocket>, BindError> {
    bind_all_given(specs, proc_sys, &mut Given::default())
}

/// As [`bind_all`], but a spec that sockets systemd gave lowport serve (see
/// [`Given::take`]) takes them instead: lowport binds nothing more for it, not even the other
/// family, since the socket unit says which addresses are served.
pub fn bind_all_given(
    specs: &[PublishSpec],
    proc_sys: &Path,
    given: &mut Given,
) -> Result<Vec<HostSocket>, BindError> {
    let mut sockets = Vec::new();
    let offered = given.inet();
    for spec in specs {
        let taken = given.take(spec);
        if taken.is_empty() && spec.fdname.is_some() {
            // `Given::check` refused this at step 1 already.
            return Err(BindError::Inherited {
                spec: spec.clone(),
                addr: "none of that name".into(),
                source: io::ErrorKind::NotFound.into(),
            });
        }
        if taken.is_empty() {
            let bound = bind_spec(spec, proc_sys).map_err(|e| beside_given(e, &offered))?;
            sockets.extend(bound);
        }
        for socket in taken {
            sockets.push(adopt(spec, socket)?);
        }
    }
    Ok(sockets)
}

/// Explains a bind that failed on a port systemd gave lowport a socket on, at another address than
/// the spec's: lowport itself holds the port then (the usual mistake: `-p 127.0.0.1:80:80` when the
/// unit's `ListenStream=80` is `[::]:80`), so "stop the program that holds it" or "setcap" would
/// send the user the wrong way. Such a spec is still bound first, since a socket beside the given
/// one (127.0.0.2:80 beside 127.0.0.1:80) can be what the user meant.
fn beside_given(err: BindError, offered: &[(String, Protocol, SocketAddr)]) -> BindError {
    let (spec, cause) = match &err {
        BindError::InUse { spec, .. } => (spec, "the port is in use"),
        BindError::Privileged { spec, .. } => (spec, "the port needs privilege on this host"),
        _ => return err,
    };
    let here: Vec<&(String, Protocol, SocketAddr)> = offered
        .iter()
        .filter(|(_, protocol, addr)| *protocol == spec.protocol && addr.port() == spec.host_port)
        .collect();
    let Some((name, _, addr)) = here.first() else {
        return err;
    };
    let given = here
        .iter()
        .map(|(name, _, addr)| format!("{addr} named '{name}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let suffix = match spec.protocol {
        Protocol::Tcp => String::new(),
        Protocol::Udp => "/udp".to_owned(),
    };
    let by_address = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let mut fixes = vec![
        format!("-p {}:{}{suffix} (any address)", spec.host_port, spec.port),
        format!("-p {by_address}:{}:{}{suffix}", spec.host_port, spec.port),
    ];
    // "unknown" is what an unnamed socket is called: a name that says nothing.
    if !name.is_empty() && name != "unknown" {
        fixes.push(format!("-p {name}:{}{suffix}", spec.port));
    }
    BindError::NotTheGiven {
        spec: spec.clone(),
        port: spec.host_port,
        given,
        cause,
        fixes: match fixes.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        },
    }
}

/// Makes an inherited socket what lowport's own are: non-blocking, and listening when it is TCP
/// (systemd's are, unless a unit said `Accept=yes`, which hands out connections, not listeners).
/// The flag belongs to the open file description that systemd shares, which systemd does not
/// read from while the service runs.
fn adopt(spec: &PublishSpec, inherited: Inherited) -> Result<HostSocket, BindError> {
    let Kind::Inet { protocol, addr } = inherited.kind else {
        return Err(BindError::Inherited {
            spec: spec.clone(),
            addr: inherited.name,
            source: io::ErrorKind::InvalidInput.into(),
        });
    };
    let fail = |source: io::Error| BindError::Inherited {
        spec: spec.clone(),
        addr: addr.to_string(),
        source,
    };
    let fd = inherited.fd;
    crate::sys::set_nonblocking_flag(std::os::fd::AsFd::as_fd(&fd), true).map_err(fail)?;
    let socket = match protocol {
        Protocol::Tcp => {
            let listening = crate::sys::get_int_option(
                std::os::fd::AsFd::as_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
            )
            .map_err(fail)?;
            if listening == 0 {
                socket::listen(&fd, Backlog::MAXCONN).map_err(|e| fail(e.into()))?;
            }
            Bound::Tcp(std::net::TcpListener::from(fd))
        }
        Protocol::Udp => Bound::Udp(std::net::UdpSocket::from(fd)),
    };
    tracing::debug!(%addr, name = inherited.name, %spec, "serving a socket systemd gave lowport");
    Ok(HostSocket {
        spec: spec.clone(),
        addr,
        socket,
        inherited: Some(inherited.name),
    })
}

fn bind_spec(spec: &PublishSpec, proc_sys: &Path) -> Result<Vec<HostSocket>, BindError> {
    // With both families and port 0, the IPv6 socket must get the port the IPv4 one got; another
    // program may hold that port on IPv6 only, so try a few times before giving up.
    let attempts = if spec.host_ip.is_none() && spec.host_port == 0 {
        8
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        match bind_spec_once(spec, proc_sys) {
            Ok(sockets) => return Ok(sockets),
            Err(e @ BindError::InUse { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

fn bind_spec_once(spec: &PublishSpec, proc_sys: &Path) -> Result<Vec<HostSocket>, BindError> {
    let mut sockets: Vec<HostSocket> = Vec::new();
    let mut port = spec.host_port;
    for ip in spec.host_addrs() {
        let addr = SocketAddr::new(ip, port);
        match bind(addr, spec.protocol) {
            Ok(socket) => {
                let bound = socket.local_addr().map_err(|source| BindError::Other {
                    spec: spec.clone(),
                    addr,
                    source,
                })?;
                port = bound.port();
                sockets.push(HostSocket {
                    spec: spec.clone(),
                    addr: bound,
                    socket,
                    inherited: None,
                });
            }
            // "All addresses" includes IPv6 only where the host has it.
            Err(e) if spec.host_ip.is_none() && ip.is_ipv6() && is_family_unavailable(&e) => {
                tracing::debug!(?e, "no IPv6 on this host; publishing on IPv4 only");
            }
            Err(source) => return Err(explain(spec, addr, source, proc_sys)),
        }
    }
    Ok(sockets)
}

fn is_family_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

fn explain(spec: &PublishSpec, addr: SocketAddr, source: io::Error, proc_sys: &Path) -> BindError {
    let spec = spec.clone();
    match source.raw_os_error() {
        Some(libc::EADDRINUSE) => BindError::InUse {
            protocol: spec.protocol,
            spec,
            ip: addr.ip(),
            port: addr.port(),
        },
        Some(libc::EACCES) => {
            let start = unprivileged_port_start(proc_sys);
            BindError::Privileged {
                port: addr.port(),
                start,
                suggest: (8000 + u32::from(addr.port())).max(u32::from(start)),
                inner: spec.port,
                spec,
            }
        }
        Some(libc::EADDRNOTAVAIL) => BindError::NotLocal {
            spec,
            ip: addr.ip(),
        },
        _ => BindError::Other { spec, addr, source },
    }
}

/// `net.ipv4.ip_unprivileged_port_start` of the network namespace whose sysctls `proc_sys` shows
/// (normally /proc/sys: the reader's own): ports below it need privilege to bind. 1024, the
/// kernel's default, when it cannot be read.
pub fn unprivileged_port_start(proc_sys: &Path) -> u16 {
    fs::read_to_string(proc_sys.join("net/ipv4/ip_unprivileged_port_start"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// A listening TCP socket or a bound UDP socket; IPv6 sockets are IPv6-only so that 0.0.0.0 and [::]
/// can share a port.
fn bind(addr: SocketAddr, protocol: Protocol) -> io::Result<Bound> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let kind = match protocol {
        Protocol::Tcp => SockType::Stream,
        Protocol::Udp => SockType::Datagram,
    };
    let fd = socket::socket(
        family,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    match protocol {
        Protocol::Tcp => {
            // Lets a new launch rebind at once while connections of a previous one sit in TIME_WAIT.
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(addr),
            )?;
            socket::listen(&fd, Backlog::MAXCONN)?;
            Ok(Bound::Tcp(std::net::TcpListener::from(fd)))
        }
        Protocol::Udp => {
            socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(addr),
            )?;
            Ok(Bound::Udp(std::net::UdpSocket::from(fd)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PublishSpec {
        s.parse().unwrap()
    }

    #[test]
    fn a_bind_beside_a_given_socket_says_how_to_serve_it() {
        // Stands for the socket systemd gave lowport: lowport's own bind of the port fails beside it.
        let given = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = given.local_addr().unwrap();
        let port = addr.port();
        let offered = vec![("web".to_owned(), Protocol::Tcp, addr)];
        let err =
            bind_spec(&spec(&format!("0.0.0.0:{port}:80")), Path::new("/proc/sys")).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        let err = beside_given(err, &offered).to_string();
        assert_eq!(
            err,
            format!(
                "-p 0.0.0.0:{port}:80/tcp does not serve the socket systemd gave lowport on port \
                 {port} (127.0.0.1:{port} named 'web'), and lowport cannot bind one of its own \
                 beside it: the port is in use; to serve the socket systemd gave, write \
                 -p {port}:80 (any address), -p 127.0.0.1:{port}:80 or -p web:80"
            )
        );

        // An unnamed socket is not suggested by its name; an IPv6 one is bracketed; UDP says so.
        let v6: SocketAddr = "[::1]:5353".parse().unwrap();
        let in_use = |s: &str| BindError::InUse {
            spec: spec(s),
            protocol: spec(s).protocol,
            ip: "127.0.0.1".parse().unwrap(),
            port: 5353,
        };
        let err = beside_given(
            in_use("127.0.0.1:5353:53/udp"),
            &[("unknown".to_owned(), Protocol::Udp, v6)],
        )
        .to_string();
        assert!(
            err.ends_with("write -p 5353:53/udp (any address) or -p [::1]:5353:53/udp"),
            "{err}"
        );

        // Another port or protocol: the error stays what it was.
        let err = beside_given(
            in_use("127.0.0.1:5353:53"),
            &[("dns".to_owned(), Protocol::Udp, v6)],
        );
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
    }
}

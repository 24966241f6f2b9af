//! Reaching out: from inside the namespace to the host services the user chose (`--host-loopback`)
//! and to the host's resolvers (`--dns`), and nowhere else.
//!
//! Each is a mirror: lowport listens inside on the address and port the program inside will use
//! (127.0.0.1:3000 and [::1]:3000, or the resolver's address and port 53 from the host's
//! /etc/resolv.conf), and for each connection or UDP flow it gets a socket of the host's network
//! namespace from the host side (`hostside`), connects it to the same address and port on the
//! host, and relays with splice(2), as the inbound relay does. So a production configuration with
//! `proxy_pass http://127.0.0.1:3000;` works unchanged, and the host's `/etc/resolv.conf`, read
//! inside without a mount namespace, points at a resolver that answers.
//!
//! Only what was named is reachable: every other host port stays out of reach, because nothing
//! inside has a host socket but the ones lowport makes for these addresses.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::forward;
use crate::hostside::{self, AsyncChannel};
use crate::publish::Protocol;
use crate::sys;

/// The most host ports one `--host-loopback` range may name.
const MAX_RANGE: u32 = 1024;
/// The most UDP flows one inner UDP socket relays at once; at the limit the least recently used
/// flow is closed.
const MAX_UDP_FLOWS: usize = 256;

/// `--host-loopback PORT[-LAST][/tcp|udp]`: host loopback ports reachable inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPorts {
    pub first: u16,
    pub last: u16,
    pub protocol: Protocol,
}

impl fmt::Display for HostPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}/{}", self.first, self.protocol)
        } else {
            write!(f, "{}-{}/{}", self.first, self.last, self.protocol)
        }
    }
}

impl FromStr for HostPorts {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPorts, String> {
        let (ports, protocol) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => {
                return Err(format!(
                "'{text}': '{other}' is not a protocol; write tcp or udp, as in 3000/tcp or 53/udp"
            ))
            }
            None => (text, Protocol::Tcp),
        };
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) => Err(format!("'{text}': port 0 is not a port a service listens on; give the host service's port, as in 3000")),
                Ok(n) => Ok(n),
                Err(_) => Err(format!(
                    "'{text}' is not a port or range; write PORT or FIRST-LAST, with /tcp or /udp, as in 3000, 5432/tcp, 53/udp or 8000-8010"
                )),
            }
        };
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!(
                "'{text}': the range ends below its start; write the lower port first, as in {last}-{first}"
            ));
        }
        if u32::from(last - first) >= MAX_RANGE {
            return Err(format!(
                "'{text}' names {} ports; a range may name at most {MAX_RANGE} (each one is a socket lowport holds inside)",
                u32::from(last - first) + 1
            ));
        }
        Ok(HostPorts {
            first,
            last,
            protocol,
        })
    }
}

/// Why an address is reached: reported in the readiness line and in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    HostLoopback,
    Dns,
}

/// One address and port reached from inside: the same on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub purpose: Purpose,
}

/// Every address and port to mirror: both loopback addresses for each `--host-loopback` port, and
/// each resolver's port 53 over UDP and TCP. Duplicates are left out.
pub fn routes(host_loopback: &[HostPorts], resolvers: &[IpAddr]) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    let mut push = |route: Route| {
        if !out
            .iter()
            .any(|r| r.protocol == route.protocol && r.addr == route.addr)
        {
            out.push(route);
        }
    };
    for spec in host_loopback {
        for port in spec.first..=spec.last {
            for ip in [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                push(Route {
                    protocol: spec.protocol,
                    addr: SocketAddr::new(ip, port),
                    purpose: Purpose::HostLoopback,
                });
            }
        }
    }
    for ip in resolvers {
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            push(Route {
                protocol,
                addr: SocketAddr::new(*ip, 53),
                purpose: Purpose::Dns,
            });
        }
    }
    out
}

/// The resolvers a resolv.conf names (`nameserver ADDR` lines), and the entries lowport cannot
/// mirror (an IPv6 link-local address with its interface: that interface does not exist inside).
pub fn nameservers(resolv_conf: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        match addr.parse::<IpAddr>() {
            // A link-local resolver is reached through an interface that does not exist inside.
            Ok(IpAddr::V6(v6)) if v6.is_unicast_link_local() => skipped.push(addr.to_owned()),
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                if !found.contains(&ip) {
                    found.push(ip);
                }
            }
            _ => skipped.push(addr.to_owned()),
        }
    }
    (found, skipped)
}

#[derive(Debug, thiserror::Error)]
pub enum OutwardError {
    #[error("cannot listen inside on {addr}/{protocol} ({what}): {source}")]
    Listen {
        addr: SocketAddr,
        protocol: Protocol,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An inner socket lowport listens on, and where its traffic goes on the host.
#[derive(Debug)]
pub struct Inner {
    pub route: Route,
    pub socket: InnerSocket,
}

#[derive(Debug)]
pub enum InnerSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Binds the inner sockets, inside the namespace, before the command starts (so that the command
/// finds them taken, and a resolver's port 53 needs no capability later). The addresses that are not
/// on `lo` already must be made local first (`netns::make_local`). A `::1` route on a kernel without
/// IPv6 is left out.
pub fn bind_inside(routes: &[Route]) -> Result<Vec<Inner>, OutwardError> {
    let mut out = Vec::new();
    for route in routes {
        let addr = route.addr;
        let what = match route.purpose {
            Purpose::HostLoopback => "--host-loopback",
            Purpose::Dns => "--dns",
        };
        let err = |source: io::Error| OutwardError::Listen {
            addr,
            protocol: route.protocol,
            what,
            source,
        };
        let fd = match listen_local(addr, route.protocol) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && addr.is_ipv6() => {
                debug!(%addr, "no IPv6 in this kernel; not mirrored");
                continue;
            }
            // `lo` has no ::1 when IPv6 is disabled (sysctl disable_ipv6 or ipv6.disable=1).
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    && addr.ip() == IpAddr::V6(Ipv6Addr::LOCALHOST) =>
            {
                debug!(%addr, "no ::1 inside; not mirrored");
                continue;
            }
            other => other.map_err(err)?,
        };
        let socket = match route.protocol {
            Protocol::Tcp => InnerSocket::Tcp(std::net::TcpListener::from(fd)),
            Protocol::Udp => InnerSocket::Udp(std::net::UdpSocket::from(fd)),
        };
        out.push(Inner {
            route: *route,
            socket,
        });
    }
    Ok(out)
}

/// A socket of lowport's own on `addr` inside, non-blocking, listening for TCP: IPv6-only for an
/// IPv6 address, and free to take an address that is local by a route only (a resolver's).
fn listen_local(addr: SocketAddr, protocol: Protocol) -> io::Result<OwnedFd> {
    let kind = match protocol {
        Protocol::Tcp => libc::SOCK_STREAM,
        Protocol::Udp => libc::SOCK_DGRAM,
    };
    let fd = sys::socket(domain_of(&addr), kind, 0)?;
    if addr.is_ipv6() {
        sys::set_int_option(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    forward::allow_foreign_bind(&fd)?;
    sys::set_int_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &nix::sys::socket::SockaddrStorage::from(addr),
    )?;
    if protocol == Protocol::Tcp {
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(1024)?)?;
    }
    hostside::set_nonblocking(&fd)?;
    Ok(fd)
}

/// What the relays share: the host side's channel and the bounds.
#[derive(Clone, Debug)]
pub struct Shared {
    pub host: Arc<AsyncChannel>,
    pub connections: Arc<Semaphore>,
    pub half_closed_timeout: Duration,
    pub udp_timeout: Duration,
}

/// Starts the relay of each inner socket on the current runtime.
pub fn serve(inner: Vec<Inner>, shared: &Shared) -> io::Result<()> {
    for Inner { route, socket } in inner {
        match socket {
            InnerSocket::Tcp(listener) => {
                let listener = TcpListener::from_std(listener)?;
                tokio::spawn(serve_tcp(listener, route.addr, shared.clone(), false));
            }
            InnerSocket::Udp(socket) => {
                let socket = UdpSocket::from_std(socket)?;
                tokio::spawn(serve_udp(socket, route.addr, shared.clone()));
            }
        }
    }
    Ok(())
}

/// Makes a port handed over reachable inside on loopback: the server holds the host socket, so
/// nothing listens on its port in the namespace, and a client there (`lowport exec web -- curl
/// http://127.0.0.1/`, a port added with `lowport port add`, the server calling itself) would be
/// refused. lowport listens on 127.0.0.1:PORT (or [::1]:PORT for an IPv6 host address) inside and
/// relays each connection to the host address, from the host's side.
pub fn mirror_handed(port: u16, host: SocketAddr, shared: &Shared) -> io::Result<SocketAddr> {
    let inner_ip = match host.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    // A wildcard host address is reached on the host's loopback of the same family.
    let to_ip = if host.ip().is_unspecified() {
        inner_ip
    } else {
        host.ip()
    };
    let inner = SocketAddr::new(inner_ip, port);
    let fd = listen_local(inner, Protocol::Tcp)?;
    let listener = TcpListener::from_std(std::net::TcpListener::from(fd))?;
    forward::mark_mirrored(inner);
    tokio::spawn(serve_tcp(
        listener,
        SocketAddr::new(to_ip, host.port()),
        shared.clone(),
        true,
    ));
    Ok(inner)
}

fn domain_of(addr: &SocketAddr) -> i32 {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// Relays each connection to `listener` to `to` on the host. With `loopback_only` (a mirror of a
/// handed port), a client not on loopback is refused: the server would see it as the host's
/// loopback, and only clients that are on loopback may look like it (a relayed client keeps its
/// own address as source, see `forward::Target::source_for`).
async fn serve_tcp(listener: TcpListener, to: SocketAddr, shared: Shared, loopback_only: bool) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((client, peer)) if loopback_only && !peer.ip().is_loopback() => {
                debug!(%peer, %to, "a client not on loopback at a handed port's mirror; refused");
                reset(&client);
            }
            Ok((client, peer)) => {
                backoff = Duration::from_millis(5);
                let Ok(permit) = shared.connections.clone().acquire_owned().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(err) = connect_out(client, to, &shared).await {
                        debug!(%peer, %to, ?err, "connection to the host ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                warn!(?err, %to, delay_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(err) => debug!(?err, %to, "accept failed"),
        }
    }
}

/// Connects a host socket to `to` and relays `client` to it. When the host refuses, the client's
/// connection is reset, so the program inside sees a refusal too rather than an empty answer.
async fn connect_out(client: TcpStream, to: SocketAddr, shared: &Shared) -> io::Result<()> {
    let fd = shared
        .host
        .socket(domain_of(&to), libc::SOCK_STREAM, 0)
        .await?;
    hostside::set_nonblocking(&fd)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let upstream = match socket.connect(to).await {
        Ok(s) => s,
        Err(err) => {
            debug!(%to, ?err, "cannot connect to the host service");
            reset(&client);
            return Err(err);
        }
    };
    upstream.set_nodelay(true)?;
    client.set_nodelay(true)?;
    forward::relay(&client, &upstream, shared.half_closed_timeout).await
}

/// SO_LINGER 0: the client's connection is reset when it is dropped, and a reset never blocks.
fn reset(client: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        client,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// One UDP flow: a host socket connected to the service, for one inner client address.
struct Flow {
    host: Arc<UdpSocket>,
    /// Milliseconds since the relay started when a datagram last moved either way.
    last: std::sync::atomic::AtomicU64,
    stop: tokio::sync::Notify,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

async fn serve_udp(inner: UdpSocket, to: SocketAddr, shared: Shared) {
    let inner = Arc::new(inner);
    let flows: Flows = Arc::default();
    let start = tokio::time::Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = match inner.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(err) => {
                debug!(?err, %to, "cannot receive from inside");
                continue;
            }
        };
        let now = start.elapsed().as_millis() as u64;
        let existing = flows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&client)
            .cloned();
        let flow = match existing {
            Some(flow) => flow,
            None => match open_flow(&inner, to, client, &shared, &flows, start).await {
                Ok(flow) => flow,
                Err(err) => {
                    debug!(%client, %to, ?err, "cannot open a UDP flow to the host");
                    continue;
                }
            },
        };
        flow.last.store(now, std::sync::atomic::Ordering::Relaxed);
        if let Err(err) = send_now(&flow.host, &buf[..n], None) {
            // A full send buffer drops the datagram, as the network would.
            debug!(%client, %to, ?err, "datagram to the host dropped");
        }
    }
}

async fn open_flow(
    inner: &Arc<UdpSocket>,
    to: SocketAddr,
    client: SocketAddr,
    shared: &Shared,
    flows: &Flows,
    start: tokio::time::Instant,
) -> io::Result<Arc<Flow>> {
    let fd: OwnedFd = shared
        .host
        .socket(domain_of(&to), libc::SOCK_DGRAM, 0)
        .await?;
    hostside::set_nonblocking(&fd)?;
    let host = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
    host.connect(to).await?;
    let flow = Arc::new(Flow {
        host: Arc::new(host),
        last: std::sync::atomic::AtomicU64::new(start.elapsed().as_millis() as u64),
        stop: tokio::sync::Notify::new(),
    });
    {
        let mut map = flows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_UDP_FLOWS {
            let oldest = map
                .iter()
                .min_by_key(|(_, f)| f.last.load(std::sync::atomic::Ordering::Relaxed))
                .map(|(a, _)| *a);
            if let Some(evicted) = oldest.and_then(|a| map.remove(&a)) {
                evicted.stop.notify_one();
            }
        }
        map.insert(client, flow.clone());
    }
    tokio::spawn(replies(
        inner.clone(),
        flow.clone(),
        client,
        flows.clone(),
        shared.udp_timeout,
        start,
    ));
    Ok(flow)
}

/// Carries the host service's answers back to the client inside until the flow has been idle for
/// `idle`, the service refuses (ICMP port unreachable), or the flow is evicted.
async fn replies(
    inner: Arc<UdpSocket>,
    flow: Arc<Flow>,
    client: SocketAddr,
    flows: Flows,
    idle: Duration,
    start: tokio::time::Instant,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let last = Duration::from_millis(flow.last.load(std::sync::atomic::Ordering::Relaxed));
        let deadline = start + last + idle;
        tokio::select! {
            got = flow.host.recv(&mut buf) => match got {
                Ok(n) => {
                    flow.last.store(start.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
                    if let Err(err) = send_now(&inner, &buf[..n], Some(client)) {
                        debug!(%client, ?err, "answer to the client inside dropped");
                    }
                }
                Err(err) => {
                    debug!(%client, ?err, "UDP flow to the host closed");
                    break;
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                let last = Duration::from_millis(flow.last.load(std::sync::atomic::Ordering::Relaxed));
                if start + last + idle <= tokio::time::Instant::now() {
                    break;
                }
            }
            () = flow.stop.notified() => return,
        }
    }
    let mut map = flows
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
        map.remove(&client);
    }
}

/// Sends one datagram now, without waiting: tokio's `try_send` fails with WouldBlock on a socket it
/// has not yet seen writable, which a new flow's first datagram (a resolver's query) would hit.
fn send_now(socket: &UdpSocket, data: &[u8], to: Option<SocketAddr>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    match to {
        None => nix::sys::socket::send(socket.as_raw_fd(), data, flags),
        Some(to) => nix::sys::socket::sendto(
            socket.as_raw_fd(),
            data,
            &nix::sys::socket::SockaddrStorage::from(to),
            flags,
        ),
    }
    .map(drop)
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_parse_ports_ranges_and_protocols() {
        let p: HostPorts = "3000".parse().unwrap();
        assert_eq!((p.first, p.last, p.protocol), (3000, 3000, Protocol::Tcp));
        let p: HostPorts = "53/udp".parse().unwrap();
        assert_eq!((p.first, p.last, p.protocol), (53, 53, Protocol::Udp));
        let p: HostPorts = "8000-8010/tcp".parse().unwrap();
        assert_eq!((p.first, p.last), (8000, 8010));
        assert_eq!(p.to_string(), "8000-8010/tcp");
        for bad in [
            "",
            "x",
            "0",
            "3000/sctp",
            "9-3",
            "1-2000",
            "70000",
            "3000:80",
        ] {
            let err = bad.parse::<HostPorts>().unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn routes_mirror_both_loopbacks_and_each_resolver_once() {
        let ports = ["3000".parse().unwrap(), "3000/tcp".parse().unwrap()];
        let resolvers = ["127.0.0.53".parse().unwrap()];
        let r = routes(&ports, &resolvers);
        let shown: Vec<String> = r
            .iter()
            .map(|r| format!("{}/{}", r.addr, r.protocol))
            .collect();
        assert_eq!(
            shown,
            [
                "127.0.0.1:3000/tcp",
                "[::1]:3000/tcp",
                "127.0.0.53:53/udp",
                "127.0.0.53:53/tcp"
            ]
        );
    }

    #[test]
    fn nameservers_are_read_as_the_resolver_reads_them() {
        let conf = "# generated\nnameserver 127.0.0.53\noptions edns0\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver fe80::2\nsearch example\nnameserver 127.0.0.53\nnameserver\n";
        let (found, skipped) = nameservers(conf);
        assert_eq!(
            found,
            [
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(skipped, ["fe80::1%eth0", "fe80::2"]);
    }
}

//! The UDP forwarder: one inner socket per client flow.
//!
//! A datagram from a new client address opens a flow: a socket inside, connected to the target port
//! (and bound to the client's own address when it is preserved), so the server's replies come back on
//! that socket and go out of the host socket to the right client. A flow that sees no datagram in
//! either direction for the idle timeout is closed.
//!
//! Which family inside: the client's own, unless only the other family has a socket bound to the
//! port (read from /proc/net/udp and /proc/net/udp6 of this namespace), since a UDP send to a port
//! nobody listens on does not fail the way a TCP connect does.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::forward::{allow_foreign_bind, unmapped, Target};

/// The largest UDP payload over IPv4 is 65507 bytes and over IPv6 65527; one buffer holds either.
const MAX_DATAGRAM: usize = 65536;

struct Flow {
    inner: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram in either direction.
    last: Arc<AtomicU64>,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

/// Serves one host UDP socket until `shutdown` completes.
pub async fn serve(
    host: UdpSocket,
    target: Target,
    idle: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::select! {
        result = relay(Arc::new(host), target, idle) => {
            if let Err(err) = result {
                warn!(?err, "the UDP host socket failed; no more datagrams are forwarded on it");
            }
        }
        () = shutdown => {}
    }
}

async fn relay(host: Arc<UdpSocket>, target: Target, idle: Duration) -> io::Result<()> {
    let flows: Flows = Arc::default();
    let epoch = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = host.recv_from(&mut buf).await?;
        let existing = flows
            .lock()
            .expect("flow table")
            .get(&peer)
            .map(|f| (f.inner.clone(), f.last.clone()));
        let (inner, last) = match existing {
            Some(flow) => flow,
            None => match open_flow(&host, &target, peer, idle, &flows, epoch).await {
                Ok(flow) => flow,
                Err(err) => {
                    warn!(%peer, port = target.port, ?err, "cannot open a UDP flow inside; dropping the datagram");
                    continue;
                }
            },
        };
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Err(err) = inner.send(&buf[..len]).await {
            // ECONNREFUSED reports an earlier datagram that found no listener; the server may start later.
            debug!(%peer, ?err, "cannot send a datagram inside");
        }
    }
}

async fn open_flow(
    host: &Arc<UdpSocket>,
    target: &Target,
    peer: SocketAddr,
    idle: Duration,
    flows: &Flows,
    epoch: Instant,
) -> io::Result<(Arc<UdpSocket>, Arc<AtomicU64>)> {
    let to = pick_inner(target, peer);
    let inner = Arc::new(bind_inner(target.source_for(peer, to), to).await?);
    inner.connect(to).await?;
    let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
    flows.lock().expect("flow table").insert(
        peer,
        Flow {
            inner: inner.clone(),
            last: last.clone(),
        },
    );
    debug!(%peer, %to, "UDP flow opened");
    tokio::spawn(replies(
        host.clone(),
        inner.clone(),
        peer,
        last.clone(),
        idle,
        flows.clone(),
        epoch,
    ));
    Ok((inner, last))
}

fn pick_inner(target: &Target, peer: SocketAddr) -> SocketAddr {
    let [own, other] = target.candidates(&peer);
    let bound = |file: &str| port_is_bound(file, target.port);
    let (own_file, other_file) = if own.is_ipv4() {
        ("/proc/net/udp", "/proc/net/udp6")
    } else {
        ("/proc/net/udp6", "/proc/net/udp")
    };
    if !bound(own_file) && bound(other_file) {
        other
    } else {
        own
    }
}

/// Whether some socket in this network namespace has `port` as its local UDP port.
fn port_is_bound(file: &str, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(file) else {
        return false;
    };
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        line.split_whitespace()
            .nth(1)
            .is_some_and(|local| local.ends_with(&want))
    })
}

/// An inner socket bound to the client's own address when asked, falling back as TCP does.
async fn bind_inner(from: Option<SocketAddr>, to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let Some(from) = from else {
        return UdpSocket::bind(any).await;
    };
    for source in [from, SocketAddr::new(from.ip(), 0)] {
        let socket = socket_for(source)?;
        let bound = if from.is_ipv6() {
            allow_foreign_bind(&socket)
        } else {
            Ok(())
        }
        .and_then(|()| socket.bind(&source.into()));
        match bound {
            Ok(()) => return UdpSocket::from_std(socket.into()),
            Err(err) => debug!(%source, ?err, "cannot bind the client's address inside"),
        }
    }
    UdpSocket::bind(any).await
}

/// A non-blocking UDP socket of `addr`'s family, not yet bound.
fn socket_for(addr: SocketAddr) -> io::Result<SockStd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    Ok(SockStd(fd))
}

/// An unbound socket on its way to becoming a tokio `UdpSocket`.
struct SockStd(std::os::fd::OwnedFd);

impl std::os::fd::AsFd for SockStd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl SockStd {
    fn bind(&self, addr: &nix::sys::socket::SockaddrStorage) -> io::Result<()> {
        nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&self.0), addr)
            .map_err(io::Error::from)
    }
}

impl From<SockStd> for std::net::UdpSocket {
    fn from(s: SockStd) -> Self {
        std::net::UdpSocket::from(s.0)
    }
}

/// Sends the server's replies on a flow back to its client, and closes the flow when idle.
async fn replies(
    host: Arc<UdpSocket>,
    inner: Arc<UdpSocket>,
    peer: SocketAddr,
    last: Arc<AtomicU64>,
    idle: Duration,
    flows: Flows,
    epoch: Instant,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let reply_to = if host.local_addr().is_ok_and(|a| a.is_ipv4()) {
        unmapped(peer)
    } else {
        peer
    };
    loop {
        let since = Duration::from_millis(
            epoch.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed),
        );
        let wait = idle.saturating_sub(since);
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, inner.recv(&mut buf)).await {
            Err(_) => continue, // re-check: a datagram from the client may have renewed the flow
            Ok(Ok(len)) => {
                last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                if let Err(err) = host.send_to(&buf[..len], reply_to).await {
                    debug!(%peer, ?err, "cannot send a reply to the client");
                }
            }
            Ok(Err(err)) if err.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // Nothing listens where this flow points (the server may not have started when the
                // flow opened): close it, so the next datagram picks the family again.
                debug!(%peer, "nothing listens on the UDP port inside; closing the flow");
                break;
            }
            Ok(Err(err)) => {
                debug!(%peer, ?err, "UDP flow failed");
                break;
            }
        }
    }
    let mut table = flows.lock().expect("flow table");
    if table
        .get(&peer)
        .is_some_and(|f| Arc::ptr_eq(&f.inner, &inner))
    {
        table.remove(&peer);
    }
    debug!(%peer, "UDP flow closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_ports_are_found_in_proc_net_udp() {
        let dir = std::env::temp_dir().join(format!("lowport-udp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("udp");
        std::fs::write(
            &file,
            "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
             \x20 1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        assert!(port_is_bound(f, 53));
        assert!(!port_is_bound(f, 5353));
        assert!(!port_is_bound(f, 0x35 * 16));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

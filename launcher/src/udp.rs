//! The UDP forwarder: one inner socket per client flow.
//!
//! A datagram from a new client address opens a flow: a socket inside, connected to the target port
//! and bound to the address the server should see (see `Target::source_for`), so the server's replies
//! come back on that socket and go out of the host socket to the right client. A flow that sees no
//! datagram in either direction for the idle timeout is closed.
//!
//! Bounded: at most `FlowBudget` flows over all UDP host sockets (each holds one socket, a
//! descriptor); at the limit the least recently used flow of any of them makes room. A flow holds no buffer of its own:
//! replies are read into one buffer per runtime thread.
//!
//! Which family inside: the client's own, unless only the other family has a socket bound to the
//! port, since a UDP send to a port nobody listens on does not fail the way a TCP connect does. The
//! kernel answers that for each new flow with one exact socket lookup (`sockdiag`); where it cannot,
//! /proc/net/udp and /proc/net/udp6 are read, at most every [`FAMILY_RECHECK`] per port.
//!
//! A flood of new flows must not stall the TCP relay on the same thread: the loop yields after each
//! flow it opens.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::forward::{allow_foreign_bind, unmapped, Target};

/// The largest UDP payload over IPv4 is 65507 bytes and over IPv6 65527; one buffer holds either.
const MAX_DATAGRAM: usize = 65536;

/// How long the family choice for a port is trusted before /proc/net/udp is read again.
const FAMILY_RECHECK: Duration = Duration::from_millis(250);

/// How often, at most, the flow limit is reported.
const LIMIT_REPORT_EVERY: Duration = Duration::from_secs(10);

thread_local! {
    /// The buffer replies are read into: one per runtime thread, not one per flow.
    static REPLY_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// The flow limit shared by every published UDP port.
#[derive(Clone)]
pub struct FlowBudget(Arc<BudgetInner>);

struct BudgetInner {
    max: usize,
    open: AtomicUsize,
    /// The clock every flow's `last` counts from, so flows of different ports compare.
    epoch: Instant,
    /// Every port's relay, for eviction across ports.
    relays: Mutex<Vec<std::sync::Weak<Relay>>>,
    /// When the limit was last reported, and how many flows were closed for room since.
    report: Mutex<(Option<Instant>, u64)>,
}

impl FlowBudget {
    pub fn new(max: usize) -> FlowBudget {
        FlowBudget(Arc::new(BudgetInner {
            max,
            open: AtomicUsize::new(0),
            epoch: Instant::now(),
            relays: Mutex::new(Vec::new()),
            report: Mutex::new((None, 0)),
        }))
    }

    /// Takes a slot for a new flow, if one is free.
    fn try_take(&self) -> bool {
        self.0
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.0.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Logs that the limit was reached, at most every [`LIMIT_REPORT_EVERY`].
    fn reached(&self, port: u16, evicted: bool) {
        let mut report = self.0.report.lock().expect("flow report");
        report.1 += u64::from(evicted);
        let now = Instant::now();
        if report
            .0
            .is_some_and(|at| now.duration_since(at) < LIMIT_REPORT_EVERY)
        {
            return;
        }
        warn!(
            max = self.0.max,
            port,
            closed_for_room = report.1,
            "UDP flow limit reached: the least recently used flows are closed to make room (raise it with --max-udp-flows)"
        );
        *report = (Some(now), 0);
    }
}

struct Flow {
    inner: Arc<UdpSocket>,
    /// Milliseconds since the budget's epoch of the last datagram in either direction.
    last: Arc<AtomicU64>,
    replies: AbortHandle,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

/// Serves one host UDP socket until `shutdown` completes.
///
/// `done` is dropped once the relay and every one of its flows have let go of the host socket.
pub async fn serve(
    host: UdpSocket,
    target: Target,
    idle: Duration,
    budget: FlowBudget,
    shutdown: impl Future<Output = ()>,
    done: Option<std::sync::mpsc::Sender<()>>,
) {
    let relay = Arc::new(Relay {
        _done: done,
        host: Arc::new(host),
        target,
        idle,
        budget,
        flows: Arc::default(),
    });
    tokio::select! {
        result = self::relay(relay.clone()) => {
            if let Err(err) = result {
                warn!(?err, "the UDP host socket failed; no more datagrams are forwarded on it");
            }
        }
        () = shutdown => {
            // The socket is being handed to the server: end every flow, so that nothing of lowport's
            // holds it once the server has it.
            let flows: Vec<AbortHandle> = relay
                .flows
                .lock()
                .expect("flow table")
                .values()
                .map(|f| f.replies.clone())
                .collect();
            for flow in flows {
                flow.abort();
            }
        }
    }
}

/// What one host socket's relay shares with its flows' reply tasks.
struct Relay {
    /// Dropped with the last reference to the relay, when nothing of it holds the host socket any
    /// more (see `handoff::RelayStop`).
    _done: Option<std::sync::mpsc::Sender<()>>,
    host: Arc<UdpSocket>,
    target: Target,
    idle: Duration,
    budget: FlowBudget,
    flows: Flows,
}

impl Relay {
    fn now_ms(&self) -> u64 {
        self.budget.0.epoch.elapsed().as_millis() as u64
    }
}

async fn relay(relay: Arc<Relay>) -> io::Result<()> {
    {
        let mut relays = relay.budget.0.relays.lock().expect("relay list");
        relays.retain(|r| r.strong_count() > 0);
        relays.push(Arc::downgrade(&relay));
    }
    let mut family = FamilyChoice::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = relay.host.recv_from(&mut buf).await?;
        let existing = relay
            .flows
            .lock()
            .expect("flow table")
            .get(&peer)
            .map(|f| (f.inner.clone(), f.last.clone()));
        let (inner, last) = match existing {
            Some(flow) => flow,
            None => match open_flow(&relay, peer, &mut family) {
                Ok(Some(flow)) => {
                    // Opening a flow takes a handful of system calls; let other tasks (the TCP
                    // relay) run between two, so a flood of new source ports cannot stall them.
                    tokio::task::yield_now().await;
                    flow
                }
                Ok(None) => continue,
                Err(err) => {
                    warn!(%peer, port = relay.target.port, ?err, "cannot open a UDP flow inside; dropping the datagram");
                    continue;
                }
            },
        };
        last.store(relay.now_ms(), Ordering::Relaxed);
        if let Err(err) = send_now(&*inner, &buf[..len], None) {
            // ECONNREFUSED reports an earlier datagram that found no listener; the server may start
            // later. A full socket buffer drops the datagram, as the network would.
            debug!(%peer, ?err, "cannot send a datagram inside");
        }
    }
}

/// Opens a flow for `peer`, closing the least recently used flow of any host socket when the budget
/// is spent. `None` when no room could be made in three tries (every time, the oldest flow changed
/// while it was looked for, or another socket took the freed slot): the datagram is dropped, as a
/// full network would drop it.
fn open_flow(
    relay: &Arc<Relay>,
    peer: SocketAddr,
    family: &mut FamilyChoice,
) -> io::Result<Option<(Arc<UdpSocket>, Arc<AtomicU64>)>> {
    // At the limit, make room; a few tries, since the oldest flow may be renewed, or the freed slot
    // taken by another host socket, between the scan and the take.
    let mut tries = 0;
    while !relay.budget.try_take() {
        tries += 1;
        let evicted = evict_least_recent(relay);
        relay.budget.reached(relay.target.port, evicted);
        if tries == 3 {
            return Ok(None);
        }
    }
    let opened = (|| {
        let to = family.pick(&relay.target, peer);
        let inner = bind_inner(relay.target.source_for(peer, to), to)?;
        inner.connect(to)?;
        let inner = Arc::new(UdpSocket::from_std(inner)?);
        Ok::<_, io::Error>((inner, to))
    })();
    let (inner, to) = match opened {
        Ok(opened) => opened,
        Err(err) => {
            relay.budget.release();
            return Err(err);
        }
    };
    let last = Arc::new(AtomicU64::new(relay.now_ms()));
    // Spawned under the table's lock: the task's guard looks for its entry when it ends, which must
    // not happen before the entry is there.
    let mut table = relay.flows.lock().expect("flow table");
    let replies = tokio::spawn(replies(relay.clone(), inner.clone(), peer, last.clone()));
    table.insert(
        peer,
        Flow {
            inner: inner.clone(),
            last: last.clone(),
            replies: replies.abort_handle(),
        },
    );
    drop(table);
    debug!(%peer, %to, "UDP flow opened");
    Ok(Some((inner, last)))
}

/// Closes the least recently used flow of any port; false when there is none.
fn evict_least_recent(relay: &Relay) -> bool {
    let relays: Vec<Arc<Relay>> = relay
        .budget
        .0
        .relays
        .lock()
        .expect("relay list")
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    // One table locked at a time; the oldest found may have ended or been renewed meanwhile, so it
    // is removed only if it is still the same flow.
    let oldest = relays
        .iter()
        .filter_map(|r| {
            let table = r.flows.lock().expect("flow table");
            table
                .iter()
                .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
                .map(|(peer, f)| {
                    (
                        f.last.load(Ordering::Relaxed),
                        r.clone(),
                        *peer,
                        f.inner.clone(),
                    )
                })
        })
        .min_by_key(|(last, ..)| *last);
    let Some((_, owner, peer, inner)) = oldest else {
        return false;
    };
    let mut table = owner.flows.lock().expect("flow table");
    if !table
        .get(&peer)
        .is_some_and(|f| Arc::ptr_eq(&f.inner, &inner))
    {
        return false;
    }
    let flow = table.remove(&peer).expect("checked above");
    drop(table);
    // The reply task's guard finds its entry gone and leaves the slot to this function.
    flow.replies.abort();
    relay.budget.release();
    true
}

/// The family a port's flows go to inside: asked of the kernel for each new flow with an exact
/// sock_diag lookup, or, where the kernel cannot answer those, read from /proc/net/udp{,6} at most
/// every [`FAMILY_RECHECK`].
#[derive(Default)]
struct FamilyChoice {
    /// `Some(None)` once the kernel was found unable to answer.
    lookup: Option<Option<crate::sockdiag::UdpLookup>>,
    /// When the tables were read, and whether IPv4 and IPv6 sockets were bound to the port.
    seen: Option<(Instant, bool, bool)>,
}

impl FamilyChoice {
    fn pick(&mut self, target: &Target, peer: SocketAddr) -> SocketAddr {
        let [own, other] = target.candidates(&peer);
        let (own_bound, other_bound) = match self
            .lookup
            .get_or_insert_with(crate::sockdiag::UdpLookup::open)
        {
            Some(lookup) => {
                let own_bound = lookup.is_bound(target.port, own.is_ipv6());
                let other_bound = match own_bound {
                    Ok(true) => Ok(false),
                    _ => lookup.is_bound(target.port, other.is_ipv6()),
                };
                match (own_bound, other_bound) {
                    (Ok(own), Ok(other)) => (own, other),
                    (Err(err), _) | (_, Err(err)) => {
                        debug!(
                            ?err,
                            "sock_diag lookup failed; reading /proc/net/udp instead"
                        );
                        self.lookup = Some(None);
                        self.scan(own.is_ipv4(), target.port)
                    }
                }
            }
            None => self.scan(own.is_ipv4(), target.port),
        };
        if !own_bound && other_bound {
            other
        } else {
            own
        }
    }

    /// (own family bound, other family bound) from /proc/net/udp{,6}, cached.
    fn scan(&mut self, own_is_v4: bool, port: u16) -> (bool, bool) {
        let (v4, v6) = match self.seen {
            Some((at, v4, v6)) if at.elapsed() < FAMILY_RECHECK => (v4, v6),
            _ => {
                let v4 = port_is_bound("/proc/net/udp", port);
                let v6 = port_is_bound("/proc/net/udp6", port);
                self.seen = Some((Instant::now(), v4, v6));
                (v4, v6)
            }
        };
        if own_is_v4 {
            (v4, v6)
        } else {
            (v6, v4)
        }
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

/// An inner socket bound to `from` (the address the server is to see), or to the same address with
/// another port when that port is taken inside. Never to another address: that could show the
/// client as loopback.
fn bind_inner(from: SocketAddr, to: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let mut sources = vec![from];
    if from.port() != 0 {
        sources.push(SocketAddr::new(from.ip(), 0));
    }
    let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
    for source in sources {
        let socket = socket_for(to)?;
        let bound = if from.is_ipv6() {
            allow_foreign_bind(&socket)
        } else {
            Ok(())
        }
        .and_then(|()| {
            nix::sys::socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                &nix::sys::socket::SockaddrStorage::from(source),
            )
            .map_err(io::Error::from)
        });
        match bound {
            Ok(()) => return Ok(std::net::UdpSocket::from(socket)),
            Err(err) => {
                debug!(%source, ?err, "cannot bind the client's address inside");
                last = err;
            }
        }
    }
    Err(last)
}

/// A non-blocking UDP socket of `addr`'s family, not yet bound.
fn socket_for(addr: SocketAddr) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    Ok(socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// Sends one datagram now, to `to` or to the socket's connected peer. Straight to the kernel rather
/// than through tokio's readiness, which knows nothing of a socket that has not been polled yet: a UDP
/// send waits only when the socket's buffer is full, and then the datagram is dropped, as the network
/// would drop it.
fn send_now(
    socket: &impl std::os::fd::AsRawFd,
    data: &[u8],
    to: Option<SocketAddr>,
) -> io::Result<()> {
    use nix::sys::socket::{send, sendto, MsgFlags, SockaddrStorage};
    let fd = socket.as_raw_fd();
    let flags = MsgFlags::MSG_DONTWAIT;
    match to {
        Some(to) => sendto(fd, data, &SockaddrStorage::from(to), flags),
        None => send(fd, data, flags),
    }
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Gives a flow's budget slot back and removes it from the table when its reply task ends, however
/// it ends (idle, failed, or aborted to make room).
struct FlowGuard {
    relay: Arc<Relay>,
    inner: Arc<UdpSocket>,
    peer: SocketAddr,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let mut table = self.relay.flows.lock().expect("flow table");
        let ours = table
            .get(&self.peer)
            .is_some_and(|f| Arc::ptr_eq(&f.inner, &self.inner));
        // When it is not ours, `evict_least_recent` removed it and gave the slot back already.
        if ours {
            table.remove(&self.peer);
            let last = table.is_empty();
            if last {
                table.shrink_to_fit();
            }
            drop(table);
            self.relay.budget.release();
            if last {
                // The burst is over: give its memory back, so a flood leaves no lasting footprint.
                crate::sys::release_free_memory();
            }
        }
        debug!(peer = %self.peer, "UDP flow closed");
    }
}

/// Sends the server's replies on a flow back to its client, and closes the flow when idle.
async fn replies(relay: Arc<Relay>, inner: Arc<UdpSocket>, peer: SocketAddr, last: Arc<AtomicU64>) {
    let _guard = FlowGuard {
        relay: relay.clone(),
        inner: inner.clone(),
        peer,
    };
    let reply_to = if relay.host.local_addr().is_ok_and(|a| a.is_ipv4()) {
        unmapped(peer)
    } else {
        peer
    };
    loop {
        // Saturating: another relay thread may store a newer time than this thread's clock read.
        let since =
            Duration::from_millis(relay.now_ms().saturating_sub(last.load(Ordering::Relaxed)));
        let wait = relay.idle.saturating_sub(since);
        if wait.is_zero() {
            return;
        }
        // ERROR too: the kernel's "port unreachable" for a datagram sent inside sets a pending
        // error on the socket, and no datagram ever makes it readable.
        let ready = inner.ready(tokio::io::Interest::READABLE | tokio::io::Interest::ERROR);
        match tokio::time::timeout(wait, ready).await {
            Err(_) => continue, // re-check: a datagram from the client may have renewed the flow
            Ok(Err(err)) => {
                debug!(%peer, ?err, "UDP flow failed");
                return;
            }
            Ok(Ok(ready)) if ready.is_error() => match inner.take_error() {
                Ok(Some(err)) if err.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    debug!(%peer, "nothing listens on the UDP port inside; closing the flow");
                    return;
                }
                // The error was taken already (by a send on this flow), but tokio keeps the socket's
                // error readiness: waiting again would return at once, for ever. End the flow; the
                // next datagram opens a fresh one.
                other => {
                    debug!(%peer, ?other, "UDP flow failed");
                    return;
                }
            },
            Ok(Ok(_)) => {}
        }
        let outcome = REPLY_BUFFER.with(|buf| {
            let mut buf = buf.borrow_mut();
            let len = inner.try_recv(&mut buf)?;
            if let Err(err) = send_now(&*relay.host, &buf[..len], Some(reply_to)) {
                debug!(%peer, ?err, "cannot send a reply to the client");
            }
            Ok::<_, io::Error>(())
        });
        match outcome {
            Ok(()) => last.store(relay.now_ms(), Ordering::Relaxed),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // Nothing listens where this flow points (the server may not have started when the
                // flow opened): close it, so the next datagram picks the family again.
                debug!(%peer, "nothing listens on the UDP port inside; closing the flow");
                return;
            }
            Err(err) => {
                debug!(%peer, ?err, "UDP flow failed");
                return;
            }
        }
    }
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

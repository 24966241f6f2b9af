//! The TCP forwarder: accepts on the host sockets and relays each connection to the port inside.
//!
//! The launcher runs this after it has entered the network namespace, while the listening sockets were
//! bound before, in the host's namespace: a socket stays in the namespace it was created in. So an
//! accepted connection comes from the host, and the socket created for the inner side connects inside,
//! with no helper process and no round trip per connection.
//!
//! Bytes move with splice(2) through a pipe per direction, so they never enter user space; tokio's
//! readiness drives the splices. When one side finishes sending, the other side's write half is shut
//! down (half-close), and the connection ends when both directions have ended or either fails.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// How many bytes one splice asks for; a default pipe holds 16 pages.
const CHUNK: usize = 64 * 1024;

/// A direction that has moved this much is a bulk transfer, and its pipe grows to [`BULK_PIPE`].
const BULK_AFTER: u64 = 4 << 20;
const BULK_PIPE: usize = 1 << 20;

/// How relayed TCP connections are bounded in time.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A connection that one side has closed is released after this long without a byte moving: a
    /// client that never closes after the server did must not hold a slot for ever.
    pub half_closed_timeout: Duration,
}

/// Where and how accepted connections go.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The port inside the namespace.
    pub port: u16,
    /// Connect from the client's own address and port, so the server sees the real client.
    pub preserve_source: bool,
}

/// The inner loopback addresses where lowport itself listens, mirroring a port handed over (see
/// `outward::mirror_handed`), one bit per port and family. The relay never falls back to one: a
/// server that took only the IPv4 socket of a port gets no IPv6 clients, as on the host, rather
/// than getting them through the mirror as the host's loopback.
static MIRRORED: [std::sync::atomic::AtomicU64; 2048] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2048];

fn mirror_bit(addr: &SocketAddr) -> (usize, u64) {
    let index = usize::from(addr.port()) * 2 + usize::from(addr.is_ipv6());
    (index / 64, 1 << (index % 64))
}

/// Notes that lowport listens on `addr` inside as a mirror.
pub fn mark_mirrored(addr: SocketAddr) {
    let (word, bit) = mirror_bit(&addr);
    MIRRORED[word].fetch_or(bit, Ordering::Relaxed);
}

fn is_mirrored(addr: &SocketAddr) -> bool {
    let (word, bit) = mirror_bit(addr);
    MIRRORED[word].load(Ordering::Relaxed) & bit != 0
}

impl Target {
    /// The inner addresses to try for a client, its own family first: a server that listens on one
    /// family only still gets the other family's clients.
    pub fn candidates(&self, client: &SocketAddr) -> [SocketAddr; 2] {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.port);
        if unmapped(*client).is_ipv4() {
            [v4, v6]
        } else {
            [v6, v4]
        }
    }

    /// The source address for a connection to `inner` on behalf of `client`: what the server will
    /// see as its peer. The promise: a client is shown as a loopback address only when it is on the
    /// host's loopback.
    ///
    /// - The client's own address and port, when they are preserved and the families agree.
    /// - An IPv6 client of an IPv4 socket inside: RFC 7600's 192.0.0.8 (127.0.0.1 for ::1).
    /// - An IPv4 client of an IPv6 socket inside: its address in RFC 6052's 64:ff9b::/96 (::1 for
    ///   127.0.0.0/8).
    /// - With `preserve_source` off: 127.0.0.1 or ::1 for a loopback client, 192.0.0.8 or
    ///   64:ff9b::c000:8 for any other, with a port the kernel picks.
    pub fn source_for(&self, client: SocketAddr, inner: SocketAddr) -> SocketAddr {
        let client = unmapped(client);
        let loopback = client.ip().is_loopback();
        // A link-local client's address is only meaningful with its interface, which does not exist
        // inside: it is shown as a client whose address cannot be kept.
        let scoped = matches!(client, SocketAddr::V6(v6) if v6.scope_id() != 0);
        let ip = match (client.ip(), inner.is_ipv4()) {
            _ if loopback && inner.is_ipv4() => {
                if self.preserve_source && client.is_ipv4() {
                    client.ip()
                } else {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                }
            }
            _ if loopback => {
                if self.preserve_source && client.is_ipv6() {
                    client.ip()
                } else {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                }
            }
            _ if !self.preserve_source || scoped => {
                if inner.is_ipv4() {
                    IpAddr::V4(RELAY_V4)
                } else {
                    IpAddr::V6(nat64(RELAY_V4))
                }
            }
            (IpAddr::V4(_), true) | (IpAddr::V6(_), false) => client.ip(),
            (IpAddr::V6(_), true) => IpAddr::V4(RELAY_V4),
            (IpAddr::V4(v4), false) => IpAddr::V6(nat64(v4)),
        };
        let port = if self.preserve_source && !scoped {
            client.port()
        } else {
            0
        };
        SocketAddr::new(ip, port)
    }
}

/// RFC 7600's IPv4 "dummy" address, for a client that cannot be shown with an IPv4 address of its own:
/// an IPv6 client of an IPv4-only server, or any client that is not on the host's loopback when source
/// addresses are not preserved.
pub const RELAY_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);

/// `v4` inside RFC 6052's well-known prefix 64:ff9b::/96, the usual way to write an IPv4 address where
/// an IPv6 one is expected (NAT64).
pub fn nat64(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(
        0x64,
        0xff9b,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
}

/// An IPv4 client seen through an IPv4-mapped IPv6 address, as the IPv4 address it is.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Lets a socket bind an address this namespace does not have (IPv6 checks configured addresses only;
/// IPv4 already counts every address as local, see `netns::route_replies_to_clients`).
pub fn allow_foreign_bind(fd: &impl AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::IpFreebind, &true)
        .map_err(io::Error::from)
}

/// Serves one listener until `shutdown` completes. `limit` bounds the relayed connections of every
/// listener that shares it: when it is exhausted, new clients wait (see `accept_loop`).
pub async fn serve(
    listener: TcpListener,
    target: Target,
    options: Options,
    limit: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    // Small writes go out at once on both hops; accepted sockets inherit the option.
    if let Err(err) =
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)
    {
        debug!(?err, "cannot set TCP_NODELAY on a host socket");
    }
    tokio::select! {
        () = accept_loop(&listener, &target, options, &limit) => {}
        () = shutdown => {}
    }
}

/// Accepts, then waits for a free slot before relaying. Taking the slot after `accept` matters when
/// several listeners share the limit: a listener waiting for its next client must not hold a slot that
/// another listener's client could use. While the limit is reached, each listener holds at most the one
/// connection it has accepted, and later clients wait in the kernel's backlog.
///
/// The socket inside for the next client is opened before that client is accepted. When descriptors
/// or memory run out, lowport backs off without accepting, and the clients wait in the backlog until
/// connections end: none is accepted only to be closed for want of a socket inside.
async fn accept_loop(
    listener: &TcpListener,
    target: &Target,
    options: Options,
    limit: &Arc<Semaphore>,
) {
    let mut backoff = SHORTAGE_FIRST_WAIT;
    let local = listener.local_addr().ok();
    // A client comes in the listener's family (an IPv4 client of an IPv6 socket that is not
    // IPV6_V6ONLY, as an inherited one may be, gets a socket of its own in `connect_from`).
    let ipv4 = local.is_none_or(|local| local.is_ipv4());
    let mut spare: Option<TcpSocket> = None;
    loop {
        if spare.is_none() {
            match if ipv4 {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            } {
                Ok(socket) => spare = Some(socket),
                Err(err) if is_resource_shortage(&err) => {
                    back_off(&mut backoff, &err, local, "cannot open a socket inside").await;
                    continue;
                }
                // Not a shortage (an address family the namespace lacks): each connection then
                // opens its own and reports what fails.
                Err(err) => debug!(
                    ?err,
                    ?local,
                    "cannot open a socket inside ahead of a client"
                ),
            }
        }
        match listener.accept().await {
            Ok((client, peer)) => {
                backoff = SHORTAGE_FIRST_WAIT;
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let target = *target;
                let socket = if unmapped(peer).is_ipv4() == ipv4 {
                    spare.take()
                } else {
                    None
                };
                tokio::spawn(async move {
                    if let Err(err) = handle(client, peer, &target, options, socket).await {
                        debug!(%peer, ?err, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(err) if is_resource_shortage(&err) => {
                back_off(&mut backoff, &err, local, "accept failed").await;
            }
            Err(err) => debug!(?err, ?local, "accept failed"),
        }
    }
}

/// The first wait when descriptors or memory run out, doubled at each failure up to
/// [`SHORTAGE_LONGEST_WAIT`]: the relay's accept loops and the control socket wait so.
pub(crate) const SHORTAGE_FIRST_WAIT: Duration = Duration::from_millis(5);
pub(crate) const SHORTAGE_LONGEST_WAIT: Duration = Duration::from_secs(1);

/// Out of descriptors or memory: logs `what`, then waits `backoff` for connections to end instead of
/// spinning, and doubles it up to a second.
async fn back_off(backoff: &mut Duration, err: &io::Error, local: Option<SocketAddr>, what: &str) {
    warn!(
        ?err,
        ?local,
        delay_ms = backoff.as_millis() as u64,
        "{what}; backing off"
    );
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(SHORTAGE_LONGEST_WAIT);
}

/// Out of descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM): a shortage to wait out.
pub(crate) fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Relays one accepted client; `socket`, opened before the client was accepted, serves its first
/// connection attempt inside.
async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    target: &Target,
    options: Options,
    socket: Option<TcpSocket>,
) -> io::Result<()> {
    let upstream = connect(target, &peer, socket).await?;
    // The client's socket inherits TCP_NODELAY from the listener (see `serve`).
    upstream.set_nodelay(true)?;
    relay(&client, &upstream, options.half_closed_timeout).await
}

/// When the last "nothing listens" warning was logged, and how many were held back since.
static NOTHING_LISTENS: std::sync::Mutex<(Option<std::time::Instant>, u64)> =
    std::sync::Mutex::new((None, 0));
/// At most one "nothing listens" warning in this long: each client of a port where nothing listens
/// (before the server starts, or of a family the server does not bind) would otherwise write a
/// line, and a client could fill the log. The others go to the debug level.
const NOTHING_LISTENS_EVERY: Duration = Duration::from_secs(10);

fn warn_nothing_listens(peer: &SocketAddr, port: u16, err: &io::Error, second_err: &io::Error) {
    let mut last = NOTHING_LISTENS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = std::time::Instant::now();
    if last
        .0
        .is_some_and(|at| now.duration_since(at) < NOTHING_LISTENS_EVERY)
    {
        last.1 += 1;
        debug!(%peer, port, ?err, ?second_err, "nothing listens on the port inside; closing the client's connection");
        return;
    }
    let held_back = std::mem::take(&mut last.1);
    last.0 = Some(now);
    drop(last);
    warn!(%peer, port, ?err, ?second_err, held_back, "nothing listens on the port inside; closing the client's connection (at most one such warning every 10 s; held_back counts the others)");
}

async fn connect(
    target: &Target,
    peer: &SocketAddr,
    socket: Option<TcpSocket>,
) -> io::Result<TcpStream> {
    let [first, second] = target.candidates(peer);
    match connect_from(target.source_for(*peer, first), first, socket).await {
        Ok(stream) => Ok(stream),
        Err(err)
            if is_mirrored(&second)
                && (err.kind() == io::ErrorKind::ConnectionRefused
                    || err.raw_os_error() == Some(libc::EADDRNOTAVAIL)) =>
        {
            warn_nothing_listens(peer, target.port, &err, &err);
            Err(err)
        }
        Err(err)
            if err.kind() == io::ErrorKind::ConnectionRefused
                || err.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
        {
            connect_from(target.source_for(*peer, second), second, None)
                .await
                .inspect_err(|second_err| warn_nothing_listens(peer, target.port, &err, second_err))
        }
        Err(err) => {
            warn!(%peer, %first, ?err, "cannot connect inside");
            Err(err)
        }
    }
}

/// Connects to `to` from `from`. The client's exact port may be taken inside (a server listening on
/// that number, a TIME_WAIT left by an earlier connection of the same client port); then the address
/// is kept with a port the kernel picks. Never from an address other than `from`'s: falling back to
/// the kernel's choice would show the client as a loopback address. `opened`, a fresh socket of
/// `to`'s family, serves the first attempt.
async fn connect_from(
    from: SocketAddr,
    to: SocketAddr,
    mut opened: Option<TcpSocket>,
) -> io::Result<TcpStream> {
    let mut sources = vec![from];
    if from.port() != 0 {
        sources.push(SocketAddr::new(from.ip(), 0));
    }
    let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
    for source in sources {
        let socket = match opened.take() {
            Some(socket) => socket,
            None if to.is_ipv4() => TcpSocket::new_v4()?,
            None => TcpSocket::new_v6()?,
        };
        let bound = socket
            .set_reuseaddr(true)
            .and_then(|()| {
                if from.is_ipv6() {
                    allow_foreign_bind(&socket)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| socket.bind(source));
        if let Err(err) = bound {
            debug!(%source, ?err, "cannot bind the client's address inside");
            last = err;
            continue;
        }
        match socket.connect(to).await {
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)
                ) =>
            {
                debug!(%source, ?err, "the client's address is taken inside");
                last = err;
            }
            other => return other,
        }
    }
    Err(last)
}

/// Relays both directions until both are done, or either fails, or the connection is half-closed
/// and idle for `half_closed_timeout`; then both sockets close.
pub async fn relay(a: &TcpStream, b: &TcpStream, half_closed_timeout: Duration) -> io::Result<()> {
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` when a byte last moved, either way.
    let moved = AtomicU64::new(0);
    let up = pump(a, b, &moved, start);
    let down = pump(b, a, &moved, start);
    tokio::pin!(up, down);
    let (finished, result) = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = up.as_mut().poll(cx) {
            return Poll::Ready((true, r));
        }
        if let Poll::Ready(r) = down.as_mut().poll(cx) {
            return Poll::Ready((false, r));
        }
        Poll::Pending
    })
    .await;
    result?;
    // One direction has ended (its FIN passed on); the other may go on as long as it moves bytes.
    let mut rest = if finished { down } else { up };
    loop {
        let idle_until =
            start + Duration::from_millis(moved.load(Ordering::Relaxed)) + half_closed_timeout;
        tokio::select! {
            result = rest.as_mut() => return result.map(|_| ()),
            () = tokio::time::sleep_until(idle_until) => {
                let last = start + Duration::from_millis(moved.load(Ordering::Relaxed));
                if last.checked_add(half_closed_timeout).is_some_and(|t| t <= tokio::time::Instant::now()) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "half-closed and idle for --half-closed-timeout",
                    ));
                }
            }
        }
    }
}

/// A pipe used as the splice buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one splice asks for: the pipe's capacity.
    chunk: usize,
}

/// Empty pipes kept for reuse by each runtime thread, so a burst of bytes costs no pipe2 and no close.
/// A direction takes a pipe when bytes arrive and gives it back as soon as its socket has nothing
/// more to read, so idle connections hold none: only the pool does, at most this many per thread.
const POOLED_PIPES: usize = 16;
/// Grown (bulk) pipes kept per thread: each counts 256 pages against the user's pipe quota
/// (fs.pipe-user-pages-soft, 16384 pages by default, shared with every program of the user).
const POOLED_BULK_PIPES: usize = 8;

/// The descriptors one runtime thread's pipe pools may hold, for the open-file budget.
pub const POOLED_FDS_PER_THREAD: usize = 2 * (POOLED_PIPES + POOLED_BULK_PIPES);

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
    static BULK_PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one; a bulk direction gets a grown one.
    fn take(bulk: bool) -> io::Result<Pipe> {
        if bulk {
            if let Some(pipe) = BULK_PIPES.with(|pool| pool.borrow_mut().pop()) {
                return Ok(pipe);
            }
        }
        let mut pipe = match PIPES.with(|pool| pool.borrow_mut().pop()) {
            Some(pipe) => pipe,
            None => {
                let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
                Pipe {
                    read,
                    write,
                    chunk: CHUNK,
                }
            }
        };
        if bulk {
            pipe.enlarge();
        }
        Ok(pipe)
    }

    /// Grows an (empty) pipe for a bulk transfer: fewer, larger splices. The kernel refuses beyond
    /// fs.pipe-max-size or the user's pipe-user-pages-soft, and then the pipe just stays as it was.
    fn enlarge(&mut self) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.write);
        if let Ok(size) =
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(BULK_PIPE as i32))
        {
            self.chunk = size as usize;
        }
    }

    /// Returns an empty pipe to this thread's pool, or closes it when the pool is full.
    fn give_back(self) {
        let (pool, max) = if self.chunk == CHUNK {
            (&PIPES, POOLED_PIPES)
        } else {
            (&BULK_PIPES, POOLED_BULK_PIPES)
        };
        pool.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < max {
                pool.push(self);
            }
        });
    }
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// One read from `src` into memory, written whole to `dst`: the relay's way when no pipe can be had.
/// `None` when `src` had nothing to read after all, `Some(0)` at its end.
async fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    mark: &impl Fn(),
) -> io::Result<Option<usize>> {
    let mut buf = vec![0u8; 16 * 1024];
    let n = match src.try_read(&mut buf) {
        Ok(0) => return Ok(Some(0)),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    mark();
    let mut written = 0;
    while written < n {
        dst.writable().await?;
        match dst.try_write(&buf[written..n]) {
            Ok(w) => {
                written += w;
                mark();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(n))
}

/// Moves bytes from `src` to `dst` until `src` ends, then shuts down `dst`'s write half. Each time
/// bytes move, `moved` gets the milliseconds since `start`.
///
/// The pipe is filled only when empty and then drained completely, so an EAGAIN from the fill always
/// means the socket has no data (never that the pipe is full) and tokio's readiness stays exact; the
/// empty pipe then goes back to the pool until the next bytes arrive.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    start: tokio::time::Instant,
) -> io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    let mut total = 0u64;
    // Every splice that moves bytes counts as activity, so a slow reader of a large pipe is not
    // mistaken for an idle half-closed connection.
    let mark = || moved.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        src.readable().await?;
        let p = match &mut pipe {
            Some(p) => p,
            None => match Pipe::take(total >= BULK_AFTER) {
                Ok(p) => pipe.insert(p),
                // No pipe to be had (descriptors or memory ran out; readiness may also be a false
                // alarm): these bytes, if any, go through user space instead of failing the
                // connection.
                Err(err) if is_resource_shortage(&err) => match copy_once(src, dst, &mark).await? {
                    Some(0) => break,
                    Some(n) => {
                        total += n as u64;
                        continue;
                    }
                    None => continue,
                },
                Err(err) => return Err(err),
            },
        };
        let p = &*p;
        let filled = match src.try_io(Interest::READABLE, || splice(src, &p.write, p.chunk)) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        mark();
        let mut left = filled;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(&p.read, dst, left)) {
                Ok(n) => {
                    left -= n;
                    mark();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += filled as u64;
    }
    // The peer sent FIN: pass it on, and keep the other direction open (half-close).
    match nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(dst),
        nix::sys::socket::Shutdown::Write,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {
            if let Some(pipe) = pipe {
                pipe.give_back();
            }
            Ok(total)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The relay's way when no pipe can be had: nothing to read is `None` (readiness was a false
    /// alarm), bytes are written whole, and the end is `Some(0)`.
    #[test]
    fn copying_through_memory_moves_what_there_is_and_sees_the_end() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut writer = TcpStream::connect(addr).await.unwrap();
            let (src, _) = listener.accept().await.unwrap();
            let dst = TcpStream::connect(addr).await.unwrap();
            let (mut reader, _) = listener.accept().await.unwrap();
            let marks = std::cell::Cell::new(0);
            let mark = || marks.set(marks.get() + 1);
            assert_eq!(copy_once(&src, &dst, &mark).await.unwrap(), None);
            assert_eq!(marks.get(), 0);
            writer.write_all(b"hello").await.unwrap();
            src.readable().await.unwrap();
            assert_eq!(copy_once(&src, &dst, &mark).await.unwrap(), Some(5));
            assert!(marks.get() >= 2, "a read and a write count as activity");
            let mut got = [0u8; 5];
            reader.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
            drop(writer);
            src.readable().await.unwrap();
            let before = marks.get();
            assert_eq!(copy_once(&src, &dst, &mark).await.unwrap(), Some(0));
            assert_eq!(marks.get(), before, "the end moves no bytes");
        });
    }

    fn shown(preserve: bool, client: &str, inner_v4: bool) -> String {
        let target = Target {
            port: 80,
            preserve_source: preserve,
        };
        let inner: SocketAddr = if inner_v4 {
            "127.0.0.1:80".parse().unwrap()
        } else {
            "[::1]:80".parse().unwrap()
        };
        target
            .source_for(client.parse().unwrap(), inner)
            .to_string()
    }

    #[test]
    fn clients_keep_their_address_when_the_families_agree() {
        assert_eq!(shown(true, "192.0.2.5:4000", true), "192.0.2.5:4000");
        assert_eq!(shown(true, "127.0.0.9:4000", true), "127.0.0.9:4000");
        assert_eq!(
            shown(true, "[2001:db8::5]:4000", false),
            "[2001:db8::5]:4000"
        );
        assert_eq!(shown(true, "[::1]:4000", false), "[::1]:4000");
        // An IPv4 client seen by a dual-stack host socket is the IPv4 client it is.
        assert_eq!(
            shown(true, "[::ffff:192.0.2.5]:4000", true),
            "192.0.2.5:4000"
        );
    }

    #[test]
    fn across_families_no_outside_client_looks_like_loopback() {
        assert_eq!(shown(true, "[2001:db8::5]:4000", true), "192.0.0.8:4000");
        assert_eq!(shown(true, "[::1]:4000", true), "127.0.0.1:4000");
        assert_eq!(
            shown(true, "192.0.2.5:4000", false),
            "[64:ff9b::c000:205]:4000"
        );
        assert_eq!(
            shown(true, "[::ffff:192.0.2.5]:4000", false),
            "[64:ff9b::c000:205]:4000"
        );
        assert_eq!(shown(true, "127.0.0.9:4000", false), "[::1]:4000");
    }

    #[test]
    fn link_local_clients_are_shown_as_clients_whose_address_cannot_be_kept() {
        assert_eq!(
            shown(true, "[fe80::1%2]:4000", false),
            "[64:ff9b::c000:8]:0"
        );
        assert_eq!(shown(true, "[fe80::1%2]:4000", true), "192.0.0.8:0");
    }

    #[test]
    fn without_preserved_sources_only_loopback_clients_look_like_loopback() {
        assert_eq!(shown(false, "127.0.0.9:4000", true), "127.0.0.1:0");
        assert_eq!(shown(false, "[::1]:4000", true), "127.0.0.1:0");
        assert_eq!(shown(false, "192.0.2.5:4000", true), "192.0.0.8:0");
        assert_eq!(shown(false, "[2001:db8::5]:4000", true), "192.0.0.8:0");
        assert_eq!(shown(false, "[::1]:4000", false), "[::1]:0");
        assert_eq!(shown(false, "192.0.2.5:4000", false), "[64:ff9b::c000:8]:0");
        assert_eq!(
            shown(false, "[2001:db8::5]:4000", false),
            "[64:ff9b::c000:8]:0"
        );
    }

    #[test]
    fn every_source_is_outside_loopback_unless_the_client_is_inside_it() {
        let clients = [
            "192.0.2.5:1",
            "10.0.0.1:1",
            "[2001:db8::5]:1",
            "[fe80::1]:1",
            "[::ffff:10.0.0.1]:1",
            "[fd00::1]:1",
            "[fe80::1%2]:1",
        ];
        for preserve in [true, false] {
            for client in clients {
                for inner_v4 in [true, false] {
                    let source: SocketAddr = shown(preserve, client, inner_v4).parse().unwrap();
                    assert!(
                        !source.ip().is_loopback(),
                        "{client} shown as {source} (preserve {preserve}, IPv4 inside {inner_v4})"
                    );
                    assert_eq!(source.is_ipv4(), inner_v4, "{client} → {source}");
                }
            }
        }
    }
}

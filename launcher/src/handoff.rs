//! Socket handoff: the server accepts on the host socket itself.
//!
//! The command runs under a seccomp filter that stops its `bind()` calls on IPv4 and IPv6 addresses
//! and reports them to a listener that lowport holds (`sys::install_command_filter`). For each one,
//! a thread of lowport's reads the address the server asked for and the state of its socket. A bind
//! of a published port's wildcard address, from a process of lowport's own network namespace, is
//! answered by lowport: it puts a socket of the host's network namespace, bound to the published host
//! address and port, in place of the server's descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD` with
//! `SECCOMP_ADDFD_FLAG_SETFD`), and makes the bind return 0. Every other bind runs as if no filter
//! had stopped it. The server then listens and accepts on the host socket: no relay, and every
//! client with its own address.
//!
//! Which host socket: the one lowport bound at start, whose relay stops first, when it is what the
//! server asked for (same family; IPv6-only for an IPv6-only server; no SO_REUSEPORT). Connections
//! waiting in its queue are then the server's. Otherwise (a dual-stack `[::]` socket in place of the
//! `0.0.0.0` and `[::]` pair, an SO_REUSEPORT group, a server that binds again) a fresh host socket
//! with the server's options, made by the host side ([`crate::hostside`]), a process left in the host's network
//! namespace: lowport's own threads live in the server's namespace, where sockets belong to it.
//! Once a socket is handed over lowport keeps no copy, so when the server closes it, it is gone, and no
//! client waits on a socket nobody accepts on.
//!
//! Inspecting the server's process (its memory for the address, `pidfd_getfd` for its socket) needs
//! ptrace access, which the command's uid 0 would not grant to a process without capabilities: the
//! handoff thread alone keeps CAP_SYS_PTRACE, in the namespace lowport made and nowhere else.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use tracing::{debug, warn};

use crate::hostside::Channel;
use crate::publish::{Protocol, PublishSpec};
use crate::sys;

/// How published ports reach the server, `--forward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Hand off where the kernel and the port allow it, relay otherwise.
    Auto,
    /// Hand off every published port, or fail.
    Handoff,
    /// Relay every connection (the server never holds a host socket).
    Relay,
}

/// The first kernel whose seccomp listener can replace a descriptor (`SECCOMP_ADDFD_FLAG_SETFD`).
pub const KERNEL_NEEDED: (u32, u32) = (5, 9);

/// Why handoff cannot be used on this machine, or `None` when it can.
pub fn kernel_refusal() -> Option<String> {
    let release = nix::sys::utsname::uname()
        .ok()?
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next()?, parts.next()?);
    (version < KERNEL_NEEDED).then(|| {
        format!(
            "Linux {release} cannot replace a server's descriptor from a seccomp listener (that needs {}.{})",
            KERNEL_NEEDED.0, KERNEL_NEEDED.1
        )
    })
}

/// Stops a relay and waits until it has let go of its host socket.
#[derive(Debug)]
pub struct RelayStop {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl RelayStop {
    fn stop_and_wait(&mut self) {
        if let Some(stop) = self.stop.take() {
            if stop.send(()).is_ok() {
                // Disconnected once the relay has let go of its socket (for UDP, once the last of
                // its flows has, see `udp::serve`).
                let _ = self.done.recv();
            }
        }
    }
}

/// The relay's side of a [`RelayStop`].
#[derive(Debug)]
pub struct RelayControl {
    stop: tokio::sync::oneshot::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
}

impl RelayControl {
    /// Splits into the relay's shutdown future (which resolves only when stopped on purpose, never
    /// because the other side was dropped) and the token to drop once the socket is let go of.
    pub fn split(
        self,
    ) -> (
        impl std::future::Future<Output = ()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let stop = self.stop;
        let shutdown = async move {
            if stop.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        (shutdown, self.done)
    }
}

/// A pair to stop one relay with.
pub fn relay_control() -> (RelayStop, RelayControl) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    (
        RelayStop {
            stop: Some(stop_tx),
            done: done_rx,
        },
        RelayControl {
            stop: stop_rx,
            done: done_tx,
        },
    )
}

/// A published port whose host socket the server now holds: nothing listens on its port inside, so
/// `launch` mirrors it there (see `outward::mirror_handed`).
#[derive(Clone, Debug)]
pub struct Handed {
    pub spec: PublishSpec,
    /// The host address as published.
    pub host: SocketAddr,
}

/// One published host socket, as the handoff thread sees it.
#[derive(Debug)]
pub struct Port {
    pub spec: PublishSpec,
    /// The host address and port as bound.
    pub addr: SocketAddr,
    /// False for a host port that needed privilege (below the host's `ip_unprivileged_port_start`,
    /// see `launch::refuse_privileged_activation`) and for a UDP port under `--forward auto` (a
    /// handed UDP socket could send anywhere from the host's network namespace): such a socket is
    /// relayed, never handed over.
    pub eligible: bool,
    /// lowport's copy of the host socket, and its relay, until the socket is handed over or released.
    reserved: Option<OwnedFd>,
    relay: RelayStop,
    /// Set once a bind of the server's was answered with this host socket (or with a fresh one in
    /// its place): readiness then looks for the server's listener on the host (see `ready`).
    handed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// A socket systemd gave lowport (see `activation`): it cannot be bound again, so it is handed
    /// over as it is or not at all, never replaced by a fresh one.
    inherited: bool,
}

impl Port {
    pub fn new(
        spec: PublishSpec,
        addr: SocketAddr,
        eligible: bool,
        copy: OwnedFd,
        relay: RelayStop,
        handed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Port {
        Port {
            spec,
            addr,
            eligible,
            reserved: Some(copy),
            relay,
            handed,
            inherited: false,
        }
    }

    /// Marks the socket as one systemd gave lowport.
    pub fn inherited(mut self, inherited: bool) -> Port {
        self.inherited = inherited;
        self
    }

    /// Stops the relay and gives up lowport's copy: the port is free for a fresh socket.
    fn release(&mut self) -> Option<OwnedFd> {
        self.relay.stop_and_wait();
        self.reserved.take()
    }
}

/// What the server asked `bind` for, read from its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Asked {
    fd: RawFd,
    addr: SocketAddr,
}

/// What a `connect` asked for, as lowport read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Inet(SocketAddr),
    /// AF_UNSPEC: disconnect.
    Unspec,
    /// Another family, or an address lowport could not read.
    Unknown,
}

/// The answer to a `connect` on a host socket the command holds, never let through (the kernel would
/// read the address again, and the command may have changed it). lowport makes the call itself, on
/// its copy (the same socket), with the address it read: AF_UNSPEC, which disconnects, and a connect
/// to a `mirrored` address (a connect handed over, checked again or made again). Any other connect
/// gets what the kernel says to a socket connected or connecting, and EPERM where it would connect.
fn host_connect(tid: i32, server: &OwnedFd, peer: Peer, mirrored: bool) -> Answer {
    let errno = |result: io::Result<()>| match result {
        Ok(()) => 0,
        Err(err) => err.raw_os_error().unwrap_or(libc::EINVAL),
    };
    if peer == Peer::Unspec {
        return Answer::Return(errno(sys::disconnect(server.as_fd())));
    }
    let state = sys::tcp_state(server.as_fd());
    let blocking = nix::fcntl::fcntl(server.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .is_ok_and(|flags| flags & libc::O_NONBLOCK == 0);
    if let (Peer::Inet(addr), true) = (peer, mirrored) {
        // A blocking connect on a socket still connecting would wait here: what a non-blocking one
        // hears instead.
        if !(blocking && matches!(state, Ok(sys::TCP_SYN_SENT))) {
            let storage = nix::sys::socket::SockaddrStorage::from(addr);
            return Answer::Return(errno(
                nix::sys::socket::connect(server.as_raw_fd(), &storage).map_err(io::Error::from),
            ));
        }
    }
    match state {
        Ok(sys::TCP_SYN_SENT) => Answer::Return(libc::EALREADY),
        Ok(state) if state != sys::TCP_CLOSE => Answer::Return(libc::EISCONN),
        _ => {
            warn!(
                tid,
                ?peer,
                "the command tried to connect a host socket lowport handed over; refused (EPERM)"
            );
            Answer::Return(libc::EPERM)
        }
    }
}

/// Parses a `struct sockaddr_in` or `sockaddr_in6` of `len` bytes; `None` for anything else.
fn parse_sockaddr(bytes: &[u8], len: usize) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(bytes.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET if len >= 16 => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        // The kernel takes a sockaddr_in6 without its scope id (SIN6_LEN_RFC2133, 24 bytes).
        libc::AF_INET6 if len >= 24 => {
            let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// What the server's socket is, read from a copy of it.
#[derive(Clone, Copy, Debug)]
struct ServerSocket {
    domain: i32,
    kind: i32,
    protocol: i32,
    v6only: bool,
    reuseaddr: bool,
    reuseport: bool,
    nonblocking: bool,
    cloexec: bool,
}

/// How long a connect to a host service may take before it is handed over still connecting (or,
/// for a blocking caller, left to the relay): a connect on the host's loopback takes microseconds.
const CONNECT_WAIT_MS: u16 = 20;

/// Boolean options copied from the server's socket to the host socket, for each level.
const COPIED: [(i32, i32); 6] = [
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_IP, libc::IP_PKTINFO),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
];

/// The answer to one notification.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Let the bind run inside, as if no filter had stopped it.
    Continue,
    /// The bind returns 0 (the socket was handed over) or fails with this errno.
    Return(i32),
    /// The notification is gone (its thread was killed); answer nothing.
    Gone,
}

/// The handoff thread's state.
pub struct Handoff {
    listener: OwnedFd,
    ports: Vec<Port>,
    factory: Channel,
    /// The inode of lowport's network namespace: only binds made in it are answered.
    netns: u64,
    /// The inode of lowport's user namespace, whose CAP_NET_BIND_SERVICE low ports inside need.
    userns: u64,
    /// The last sockets handed over (their inodes), so that a bind restarted after an interrupted
    /// answer is answered 0 again rather than handed a second socket.
    handed: VecDeque<u64>,
    /// Told of each port handed over (see [`Handed`]).
    on_handed: Option<tokio::sync::mpsc::UnboundedSender<Handed>>,
    reader: Reader,
    warned: bool,
    warned_transient: bool,
    /// The addresses `--host-loopback` and `--dns` mirror over TCP: a connect to one of them gets a
    /// host socket connected to it (see [`Handoff::connect_out`]).
    routes: Vec<SocketAddr>,
    /// The cookie of the host's network namespace (SO_NETNS_COOKIE), which tells a host socket the
    /// server holds from one of its own; `None` on kernels before 5.14, which get no connect handoff.
    host_cookie: Option<u64>,
    /// The cookie of lowport's own network namespace.
    inner_cookie: Option<u64>,
    /// The epoll instances of each server process, for re-registering a replaced socket.
    epolls: EpollCache,
    /// Where a host socket is registered in a server's epoll instance (started by `run`).
    registrar: Option<Registrar>,
    /// The namespace's ephemeral port range, and the last port used in it (an offset), for the
    /// source ports of connects to host services.
    ephemeral: (u16, u16),
    next_port: u32,
}

impl Handoff {
    pub fn new(
        listener: OwnedFd,
        ports: Vec<Port>,
        factory: Channel,
        routes: Vec<SocketAddr>,
    ) -> io::Result<Handoff> {
        let host_cookie = factory
            .socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
            .and_then(|s| sys::netns_cookie(s.as_fd()));
        let host_cookie = match host_cookie {
            Ok(c) => Some(c),
            Err(err) => {
                debug!(
                    ?err,
                    "no SO_NETNS_COOKIE (Linux 5.14); host services are relayed, never handed"
                );
                None
            }
        };
        let routes = if host_cookie.is_some() {
            routes
        } else {
            Vec::new()
        };
        let netns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
        let userns = std::fs::metadata("/proc/thread-self/ns/user")?.ino();
        if let Err(err) = sys::notif_sync_wakeup(listener.as_fd()) {
            debug!(
                ?err,
                "no synchronous wake-up for the seccomp listener (Linux 6.6)"
            );
        }
        Ok(Handoff {
            listener,
            ports,
            factory,
            netns,
            userns,
            handed: VecDeque::new(),
            on_handed: None,
            reader: Reader::default(),
            warned: false,
            warned_transient: false,
            routes,
            host_cookie,
            inner_cookie: sys::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
                .and_then(|s| sys::netns_cookie(s.as_fd()))
                .ok(),
            epolls: EpollCache::default(),
            registrar: None,
            ephemeral: ephemeral_range(),
            next_port: std::process::id() % 1000,
        })
    }

    /// Reports each port handed over on `tx`.
    pub fn report_handed(&mut self, tx: tokio::sync::mpsc::UnboundedSender<Handed>) {
        self.on_handed = Some(tx);
    }

    /// Answers notifications until no process runs under the filter any more.
    pub fn run(mut self) {
        // A thread with a descriptor table of its own, where a host socket can be put at the number
        // the server knows it by (see `EpollCache`); without one, connects are relayed.
        if !self.routes.is_empty() {
            match Registrar::start() {
                Ok(registrar) => self.registrar = Some(registrar),
                Err(err) => {
                    debug!(
                        ?err,
                        "no thread with a descriptor table of its own; host services are relayed"
                    );
                    self.routes.clear();
                }
            }
        }
        loop {
            let mut fds = [nix::poll::PollFd::new(
                self.listener.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            // The listener is never dropped while the command runs: without it, the kernel fails
            // every bind the filter stops (ENOSYS), those inside included. Errors are waited out.
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => {
                    self.transient(&err.into());
                    continue;
                }
            }
            let revents = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
            if !revents.contains(nix::poll::PollFlags::POLLIN) {
                // POLLHUP: every process under the filter has exited.
                return;
            }
            let notif = match sys::notif_recv(self.listener.as_fd()) {
                Ok(n) => n,
                // Interrupted, or the caller died between poll and receive.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => continue,
                Err(err) => {
                    self.transient(&err);
                    continue;
                }
            };
            let answer = self.answer(&notif);
            debug!(tid = notif.tid, nr = notif.nr, ?answer, "answered");
            let sent = match answer {
                Answer::Gone => continue,
                Answer::Continue => sys::notif_answer(self.listener.as_fd(), notif.id, None),
                Answer::Return(errno) => {
                    sys::notif_answer(self.listener.as_fd(), notif.id, Some(errno))
                }
            };
            if let Err(err) = sent {
                // ENOENT: the caller was killed meanwhile.
                debug!(?err, "cannot answer a bind");
            }
        }
    }

    fn answer(&mut self, notif: &sys::Notification) -> Answer {
        if notif.arch != sys::NATIVE_BIND.0 {
            return Answer::Continue;
        }
        if notif.nr == sys::NATIVE_CONNECT.1 {
            return self.answer_connect(notif);
        }
        if let Some(&(_, flags)) = sys::NATIVE_SENDS.iter().find(|(nr, _)| *nr == notif.nr) {
            return self.answer_fast_open(notif, flags);
        }
        if notif.nr != sys::NATIVE_BIND.1 {
            return Answer::Continue;
        }
        // A bind lowport does not take over runs inside; never one on a host socket (whatever the
        // address, and whether or not lowport could read it: the kernel reads it again).
        match self.answer_bind(notif) {
            Answer::Continue => self.inner_only(notif.tid as i32, notif.args[0] as i32, "bind"),
            other => other,
        }
    }

    fn answer_bind(&mut self, notif: &sys::Notification) -> Answer {
        let tid = notif.tid as i32;
        let len = (notif.args[2] as u32) as usize;
        let mut bytes = [0u8; 28];
        let want = len.min(bytes.len());
        let asked = match self.reader.read(tid, notif.args[1], &mut bytes[..want]) {
            Ok(n) => parse_sockaddr(&bytes[..n], len).map(|addr| Asked {
                fd: notif.args[0] as i32,
                addr,
            }),
            Err(err) => {
                if err.kind() != io::ErrorKind::TimedOut {
                    self.cannot_inspect(&err);
                }
                None
            }
        };
        // What was read belongs to this call only if the call still waits.
        if !sys::notif_id_valid(self.listener.as_fd(), notif.id) {
            return Answer::Gone;
        }
        let Some(asked) = asked else {
            return Answer::Continue;
        };
        if !asked.addr.ip().is_unspecified()
            || !self.ports.iter().any(|p| p.spec.port == asked.addr.port())
        {
            return Answer::Continue;
        }
        // A process of a namespace of its own (a nested lowport, a container) binds there.
        match std::fs::metadata(format!("/proc/{tid}/ns/net")) {
            Ok(m) if m.ino() == self.netns => {}
            _ => return Answer::Continue,
        }
        let socket = match self.server_socket(tid, asked.fd) {
            Ok(Some(s)) => s,
            Ok(None) => return Answer::Continue,
            Err(Early(answer)) => return answer,
        };
        self.hand_over(notif, tid, asked, socket)
    }

    /// Reads the address a `connect` was called with.
    fn read_addr(
        &mut self,
        notif: &sys::Notification,
        ptr: u64,
        len: usize,
    ) -> Result<Peer, Answer> {
        let mut bytes = [0u8; 28];
        let want = len.min(bytes.len());
        let peer = match self.reader.read(notif.tid as i32, ptr, &mut bytes[..want]) {
            Ok(n) => match parse_sockaddr(&bytes[..n], len) {
                Some(addr) => Peer::Inet(addr),
                None if n >= 2 && bytes[..2] == (libc::AF_UNSPEC as u16).to_ne_bytes() => {
                    Peer::Unspec
                }
                None => Peer::Unknown,
            },
            Err(err) => {
                if err.kind() != io::ErrorKind::TimedOut {
                    self.cannot_inspect(&err);
                }
                Peer::Unknown
            }
        };
        if !sys::notif_id_valid(self.listener.as_fd(), notif.id) {
            return Err(Answer::Gone);
        }
        Ok(peer)
    }

    /// A copy of the server's descriptor `fd` when it is a socket; `None` otherwise.
    fn copy_socket(&mut self, tid: i32, fd: RawFd) -> Option<OwnedFd> {
        self.copy_socket_with_inode(tid, fd).map(|(copy, _)| copy)
    }

    /// As [`Handoff::copy_socket`], with the socket's inode, read from the same link.
    fn copy_socket_with_inode(&mut self, tid: i32, fd: RawFd) -> Option<(OwnedFd, u64)> {
        // Only a socket is copied: closing a copy of some other file (one on a FUSE file system the
        // server serves itself, say) could wait on the server for ever.
        let link = match std::fs::read_link(format!("/proc/{tid}/fd/{fd}")) {
            Ok(link) => link,
            Err(err) => {
                tracing::trace!(tid, fd, ?err, "cannot read the descriptor's link");
                return None;
            }
        };
        let ino = link
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        match sys::pidfd_open_thread(tid, || thread_group(tid))
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), fd))
        {
            Ok(copy) => Some((copy, ino)),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => None,
            Err(err) => {
                self.cannot_inspect(&err);
                None
            }
        }
    }

    /// Whether `socket` belongs to the host's network namespace: one lowport handed over.
    fn is_host(&self, socket: &OwnedFd) -> bool {
        self.host_cookie
            .is_some_and(|host| sys::netns_cookie(socket.as_fd()).is_ok_and(|c| c == host))
    }

    /// A bind, connect or fast-open send lowport does not take over runs inside, unless the socket
    /// is one of the host's: a handed socket may do in the host's network namespace only what it was
    /// handed for. (A listener can be turned back into a plain socket with connect(AF_UNSPEC); bound
    /// again or connected, it would open a port or reach a service of the host.)
    fn inner_only(&mut self, tid: i32, fd: RawFd, call: &'static str) -> Answer {
        if self.host_cookie.is_none() {
            return Answer::Continue;
        }
        match self.copy_socket(tid, fd) {
            Some(copy) if self.is_host(&copy) => {
                warn!(tid, call, "the command tried to use a host socket lowport handed over for something else; refused (EPERM)");
                Answer::Return(libc::EPERM)
            }
            _ => Answer::Continue,
        }
    }

    /// A send with MSG_FASTOPEN connects an unconnected TCP socket: only inside.
    fn answer_fast_open(&mut self, notif: &sys::Notification, _flags: usize) -> Answer {
        if !sys::notif_id_valid(self.listener.as_fd(), notif.id) {
            return Answer::Gone;
        }
        self.inner_only(
            notif.tid as i32,
            notif.args[0] as i32,
            "send with MSG_FASTOPEN",
        )
    }

    /// A connect to an address `--host-loopback` or `--dns` mirrors gets a host socket connected to
    /// that address on the host, so the server talks to the host service directly, with nothing of
    /// lowport's in between. Anything else runs inside (a host socket may not connect elsewhere).
    ///
    /// This runs for every connect the command makes to an IPv4 or IPv6 address while it waits, so
    /// it makes as few system calls as it can (about 40 for a handed connect).
    fn answer_connect(&mut self, notif: &sys::Notification) -> Answer {
        let tid = notif.tid as i32;
        let fd = notif.args[0] as i32;
        let len = (notif.args[2] as u32) as usize;
        let peer = match self.read_addr(notif, notif.args[1], len) {
            Ok(peer) => peer,
            Err(answer) => return answer,
        };
        let Some((server, ino)) = self.copy_socket_with_inode(tid, fd) else {
            return Answer::Continue;
        };
        let cookie = sys::netns_cookie(server.as_fd()).ok();
        if cookie.is_some() && cookie == self.host_cookie {
            let mirrored = matches!(peer, Peer::Inet(addr) if self.routes.contains(&crate::forward::unmapped(addr)));
            return host_connect(tid, &server, peer, mirrored);
        }
        // AF_UNSPEC (which disconnects), AF_UNIX and others on an inner socket: nothing to take over,
        // nothing out.
        let Peer::Inet(addr) = peer else {
            return Answer::Continue;
        };
        let mirrored = self.routes.contains(&crate::forward::unmapped(addr));
        // Only a socket of lowport's own namespace: one of a nested namespace (a nested lowport, a
        // container) connects there.
        if !mirrored || cookie.is_none() || cookie != self.inner_cookie {
            return Answer::Continue;
        }
        self.connect_out(notif, tid, fd, addr, server, ino)
    }

    /// Connects a fresh host socket to `addr` (the copy lowport read, so the server cannot change
    /// it afterwards) and puts it in place of the server's socket. A blocking connect to the host's
    /// loopback completes at once or is refused at once; one that does not within a moment (the
    /// service's backlog is full) is handed over still connecting to a non-blocking caller, which
    /// waits for it as it would have; a blocking caller's connect then runs inside instead, where
    /// lowport's relay of the same address takes it.
    fn connect_out(
        &mut self,
        notif: &sys::Notification,
        tid: i32,
        fd: RawFd,
        addr: SocketAddr,
        server: OwnedFd,
        ino: u64,
    ) -> Answer {
        let int = |level, name| sys::get_int_option(server.as_fd(), level, name);
        let (Ok(domain), Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP)) = (
            int(libc::SOL_SOCKET, libc::SO_DOMAIN),
            int(libc::SOL_SOCKET, libc::SO_TYPE),
            int(libc::SOL_SOCKET, libc::SO_PROTOCOL),
        ) else {
            return Answer::Continue;
        };
        let family_matches = match addr {
            SocketAddr::V4(_) => domain == libc::AF_INET,
            SocketAddr::V6(_) => domain == libc::AF_INET6,
        };
        // Bound (to a source address or port of its choice, or listening) or connected already,
        // or tied to an interface of the namespace: inside.
        let bound =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(server.as_raw_fd())
                .ok()
                .is_some_and(|local| {
                    local
                        .as_sockaddr_in()
                        .is_some_and(|a| a.port() != 0 || a.ip() != Ipv4Addr::UNSPECIFIED)
                        || local
                            .as_sockaddr_in6()
                            .is_some_and(|a| a.port() != 0 || !a.ip().is_unspecified())
                });
        if !family_matches || bound {
            return Answer::Continue;
        }
        let tied = nix::sys::socket::getsockopt(&server, nix::sys::socket::sockopt::BindToDevice)
            .is_ok_and(|dev| !dev.is_empty());
        if tied {
            return Answer::Continue;
        }
        let Some((nonblocking, cloexec)) = fd_flags(tid, fd) else {
            return Answer::Continue;
        };
        // An event loop may have registered the socket with epoll before connecting (nginx does):
        // the host socket must be registered in its place, or the server would wait for ever.
        let Some(watchers) = self.epolls.watchers(tid, fd, ino) else {
            return Answer::Continue;
        };
        // Made non-blocking by the host side.
        let host = match self.factory.tcp_socket(domain) {
            Ok(h) => h,
            Err(err) => {
                debug!(
                    ?err,
                    "no host socket for a connect; it runs inside, through the relay"
                );
                return Answer::Continue;
            }
        };
        // Options a client sets before connecting that change what the connection does.
        for (level, name) in [
            (libc::IPPROTO_TCP, libc::TCP_NODELAY),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        ] {
            if let Ok(v @ 1..) = int(level, name) {
                let _ = sys::set_int_option(host.as_fd(), level, name, v);
            }
        }
        // Bound to a port of lowport's choice first, so that the port stays the socket's (the kernel
        // locks a port given explicitly): turned back into a plain socket with connect(AF_UNSPEC), a
        // socket whose port the kernel picked at connect would lose it, and could be bound to any
        // host port.
        if let Err(err) = self.bind_source_port(&host, addr) {
            debug!(
                ?err,
                "no source port for a connect to a host service; it runs inside"
            );
            return Answer::Continue;
        }
        let storage = nix::sys::socket::SockaddrStorage::from(addr);
        let result = match nix::sys::socket::connect(host.as_raw_fd(), &storage) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EINPROGRESS) => {
                let mut fds = [nix::poll::PollFd::new(
                    host.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(CONNECT_WAIT_MS)) {
                    Ok(n) if n > 0 => match nix::sys::socket::getsockopt(
                        &host,
                        nix::sys::socket::sockopt::SocketError,
                    ) {
                        Ok(0) => Ok(true),
                        Ok(errno) => Err(errno),
                        Err(e) => Err(e as i32),
                    },
                    _ => Ok(false),
                }
            }
            Err(e) => Err(e as i32),
        };
        let connected = match result {
            // The source port's last connection to this address is in TIME_WAIT: inside, through
            // the relay, rather than a failure the caller would not have seen.
            Err(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => return Answer::Continue,
            // Refused or unreachable: the caller sees what it would have seen, its socket untouched.
            Err(errno) => return Answer::Return(errno),
            Ok(connected) => connected,
        };
        if !connected && !nonblocking {
            return Answer::Continue;
        }
        if !nonblocking && sys::set_nonblocking_flag(host.as_fd(), false).is_err() {
            return Answer::Continue;
        }
        let Some(registrar) = &self.registrar else {
            return Answer::Continue;
        };
        for w in &watchers {
            let registered = self.epolls.copy(tid, w.epoll).and_then(|epoll| {
                registrar.register(epoll.as_fd(), host.as_fd(), fd, w.events, w.data)
            });
            if let Err(err) = registered {
                // The registrations made so far go with `host`, which no one else holds.
                debug!(?err, epoll = w.epoll, "cannot register the host socket in the server's epoll; the connect runs inside");
                return Answer::Continue;
            }
        }
        // ENOENT: the caller was killed or interrupted meanwhile; `host` goes with this answer.
        match sys::notif_replace_fd(self.listener.as_fd(), notif.id, host.as_fd(), fd, cloexec) {
            Ok(()) => {
                debug!(tid, %addr, connected, "handed a host socket connected to a host service");
                Answer::Return(if connected { 0 } else { libc::EINPROGRESS })
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Answer::Gone,
            Err(err) => {
                debug!(
                    ?err,
                    "cannot hand the connected host socket over; the connect runs inside"
                );
                Answer::Continue
            }
        }
    }

    /// Binds `host` to the source address for `to` (see [`source_ip`]) and the next port of the
    /// namespace's ephemeral range that is free.
    fn bind_source_port(&mut self, host: &OwnedFd, to: SocketAddr) -> io::Result<()> {
        let (first, last) = self.ephemeral;
        let span = u32::from(last - first) + 1;
        sys::set_int_option(host.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let mut last_err = io::Error::from_raw_os_error(libc::EADDRINUSE);
        for _ in 0..16 {
            self.next_port = (self.next_port + 1) % span;
            let port = first + self.next_port as u16;
            let local = SocketAddr::new(source_ip(to.ip()), port);
            match nix::sys::socket::bind(
                host.as_raw_fd(),
                &nix::sys::socket::SockaddrStorage::from(local),
            ) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EADDRINUSE) => {
                    last_err = nix::errno::Errno::EADDRINUSE.into()
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err)
    }

    /// Copies the server's socket and reads its state; `Ok(None)` when it is not one to hand off.
    fn server_socket(
        &mut self,
        tid: i32,
        fd: RawFd,
    ) -> Result<Option<(OwnedFd, ServerSocket)>, Early> {
        // Not a socket, or not a descriptor (EBADF): bind itself will say so.
        let Some(copy) = self.copy_socket(tid, fd) else {
            return Ok(None);
        };
        let int = |level, name| sys::get_int_option(copy.as_fd(), level, name);
        let (Ok(domain), Ok(kind), Ok(protocol)) = (
            int(libc::SOL_SOCKET, libc::SO_DOMAIN),
            int(libc::SOL_SOCKET, libc::SO_TYPE),
            int(libc::SOL_SOCKET, libc::SO_PROTOCOL),
        ) else {
            // Not a socket (ENOTSOCK): bind fails inside as it should.
            return Ok(None);
        };
        // Already bound: either by an answer of ours that the caller did not see (a signal restarted
        // the call), or by the server itself (bind fails inside with EINVAL, as it should).
        if let Ok(local) =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(copy.as_raw_fd())
        {
            let port = local
                .as_sockaddr_in()
                .map(|a| a.port())
                .or_else(|| local.as_sockaddr_in6().map(|a| a.port()))
                .unwrap_or(0);
            if port != 0 {
                let ino = inode(&copy);
                return Err(Early(if ino.is_some_and(|i| self.handed.contains(&i)) {
                    Answer::Return(0)
                } else {
                    Answer::Continue
                }));
            }
        }
        // A socket tied to an interface of the namespace has no equivalent on the host.
        if nix::sys::socket::getsockopt(&copy, nix::sys::socket::sockopt::BindToDevice)
            .is_ok_and(|dev| !dev.is_empty())
        {
            return Ok(None);
        }
        let flag = |level, name| int(level, name).is_ok_and(|v| v != 0);
        let flags = nix::fcntl::fcntl(copy.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
        let state = ServerSocket {
            domain,
            kind,
            protocol,
            v6only: domain == libc::AF_INET6 && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR),
            reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT),
            nonblocking: flags & libc::O_NONBLOCK != 0,
            cloexec: fd_cloexec(tid, fd),
        };
        Ok(Some((copy, state)))
    }

    fn hand_over(
        &mut self,
        notif: &sys::Notification,
        tid: i32,
        asked: Asked,
        (server, state): (OwnedFd, ServerSocket),
    ) -> Answer {
        let protocol = match (state.kind, state.protocol) {
            (libc::SOCK_STREAM, libc::IPPROTO_TCP | libc::IPPROTO_MPTCP) => Protocol::Tcp,
            (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Protocol::Udp,
            _ => return Answer::Continue,
        };
        let family_matches = match asked.addr {
            SocketAddr::V4(_) => state.domain == libc::AF_INET,
            SocketAddr::V6(_) => state.domain == libc::AF_INET6,
        };
        if !family_matches {
            return Answer::Continue;
        }
        let Some(targets) = targets(&self.ports, protocol, asked.addr, state.v6only) else {
            return Answer::Continue;
        };
        // The namespace's own rule for low ports (`--port-start`): the kernel would check it at bind
        // time, after this answer; let the bind through, and the kernel refuses it as it should.
        if !self.may_bind(tid, asked.addr.port()) {
            debug!(
                tid,
                port = asked.addr.port(),
                "below the namespace's ip_unprivileged_port_start, without CAP_NET_BIND_SERVICE"
            );
            return Answer::Continue;
        }
        if let Some(&i) = targets.iter().find(|&&i| !self.ports[i].eligible) {
            debug!(port = %self.ports[i].addr, "host port needed privilege; it stays relayed");
            return Answer::Continue;
        }
        // The host address the socket is bound to: the IPv6 one of a dual-stack pair, or for an IPv6
        // socket and an IPv4 address alone, that address mapped (::ffff:a.b.c.d).
        let main = targets[0];
        let mapped = asked.addr.is_ipv6() && self.ports[main].addr.is_ipv4();
        let host_addr = match self.ports[main].addr {
            SocketAddr::V4(v4) if mapped => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            addr => addr,
        };
        let reuse_reserved = !mapped
            && targets.len() == 1
            && self.ports[main].reserved.is_some()
            && !state.reuseport
            && state.protocol != libc::IPPROTO_MPTCP;
        if !reuse_reserved && targets.iter().any(|&i| self.ports[i].inherited) {
            debug!(port = %self.ports[main].addr, "the bind does not fit the socket systemd gave lowport, which cannot be made again");
            return self.not_handed(&targets, &io::Error::from_raw_os_error(libc::EADDRINUSE));
        }
        let socket = if reuse_reserved {
            match self.ports[main].release() {
                Some(fd) => fd,
                None => return Answer::Continue,
            }
        } else {
            let fresh = match self
                .factory
                .socket(state.domain, state.kind, state.protocol)
            {
                Ok(fd) => fd,
                Err(err) => {
                    warn!(?err, "cannot make a host socket for the server's bind");
                    return self.not_handed(&targets, &err);
                }
            };
            // A dual-stack socket covers the IPv4 wildcard too: only when that was published.
            let covers_ipv4 = targets.iter().any(|&i| self.ports[i].addr.is_ipv4());
            let state = ServerSocket {
                v6only: state.v6only || !covers_ipv4,
                ..state
            };
            if let Err(err) = prepare(&fresh, &server, &state, true) {
                return self.not_handed(&targets, &err);
            }
            for &i in &targets {
                drop(self.ports[i].release());
            }
            if let Err(err) = nix::sys::socket::bind(
                fresh.as_raw_fd(),
                &nix::sys::socket::SockaddrStorage::from(host_addr),
            ) {
                debug!(%host_addr, ?err, "the fresh host socket cannot be bound");
                for &i in &targets {
                    self.reserve_again(i);
                }
                return Answer::Return(err as i32);
            }
            fresh
        };
        if reuse_reserved {
            if let Err(err) = prepare(&socket, &server, &state, false) {
                debug!(?err, "cannot copy the server's socket options");
            }
        }
        if !sys::notif_id_valid(self.listener.as_fd(), notif.id) {
            // Killed meanwhile: the port stays reserved for the next bind, not listening.
            self.give_back(&targets, socket);
            return Answer::Gone;
        }
        if let Some(ino) = inode(&socket) {
            self.handed.push_back(ino);
            if self.handed.len() > 64 {
                self.handed.pop_front();
            }
        }
        match sys::notif_replace_fd(
            self.listener.as_fd(),
            notif.id,
            socket.as_fd(),
            asked.fd,
            state.cloexec,
        ) {
            Ok(()) => {
                debug!(tid, server = %asked.addr, host = %host_addr, %protocol, "handed the host socket over");
                for &i in &targets {
                    self.ports[i]
                        .handed
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                if let Some(tx) = &self.on_handed {
                    for &i in &targets {
                        let _ = tx.send(Handed {
                            spec: self.ports[i].spec.clone(),
                            host: self.ports[i].addr,
                        });
                    }
                }
                Answer::Return(0)
            }
            Err(err) => {
                debug!(?err, "cannot hand the host socket over");
                self.give_back(&targets, socket);
                match err.raw_os_error() {
                    Some(libc::ENOENT) => Answer::Gone,
                    Some(errno) => Answer::Return(errno),
                    None => Answer::Return(libc::EINVAL),
                }
            }
        }
    }

    /// The answer when no socket could be prepared for a bind: while every target's relay still
    /// serves it, the bind runs inside and the relay goes on; once one was released (an earlier
    /// handoff), the bind fails with the error, since nothing would serve it inside.
    fn not_handed(&self, targets: &[usize], err: &io::Error) -> Answer {
        if targets.iter().all(|&i| self.ports[i].relay.stop.is_some()) {
            Answer::Continue
        } else {
            Answer::Return(err.raw_os_error().unwrap_or(libc::ENOMEM))
        }
    }

    /// Whether thread `tid` may bind `port` in lowport's network namespace: ports below its
    /// `ip_unprivileged_port_start` need CAP_NET_BIND_SERVICE in lowport's user namespace (a thread
    /// of a user namespace of its own has none there).
    fn may_bind(&self, tid: i32, port: u16) -> bool {
        // Read each time: root inside may change it.
        let start = crate::host::unprivileged_port_start(std::path::Path::new("/proc/sys"));
        if port >= start {
            return true;
        }
        let same_userns =
            std::fs::metadata(format!("/proc/{tid}/ns/user")).is_ok_and(|m| m.ino() == self.userns);
        let effective = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|status| {
                let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .unwrap_or(0);
        same_userns && effective & (1 << caps::Capability::CAP_NET_BIND_SERVICE.index()) != 0
    }

    /// Takes back a socket that was not handed over after all: a socket systemd gave lowport is kept
    /// as it is (listening: clients wait until the server's next bind takes it); others are closed
    /// and the port reserved again.
    fn give_back(&mut self, targets: &[usize], socket: OwnedFd) {
        if let [i] = *targets {
            if self.ports[i].inherited && self.ports[i].reserved.is_none() {
                self.ports[i].reserved = Some(socket);
                return;
            }
        }
        drop(socket);
        for &i in targets {
            self.reserve_again(i);
        }
    }

    /// Binds a fresh socket to a released port's address again, not listening, so that no other
    /// program takes the port: clients are refused until the server's next bind takes it. Used
    /// when a handoff failed after its relay had stopped.
    fn reserve_again(&mut self, i: usize) {
        if self.ports[i].reserved.is_some() || self.ports[i].inherited {
            return;
        }
        let (addr, protocol) = (self.ports[i].addr, self.ports[i].spec.protocol);
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let kind = match protocol {
            Protocol::Tcp => libc::SOCK_STREAM,
            Protocol::Udp => libc::SOCK_DGRAM,
        };
        let bound = self.factory.socket(domain, kind, 0).and_then(|fd| {
            if addr.is_ipv6() {
                sys::set_int_option(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
            }
            let storage = nix::sys::socket::SockaddrStorage::from(addr);
            match nix::sys::socket::bind(fd.as_raw_fd(), &storage) {
                // Connections of an earlier socket in TIME_WAIT hold the port against a plain bind.
                Err(nix::errno::Errno::EADDRINUSE) if protocol == Protocol::Tcp => {
                    sys::set_int_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                    nix::sys::socket::bind(fd.as_raw_fd(), &storage)?;
                }
                other => other?,
            }
            Ok(fd)
        });
        match bound {
            Ok(fd) => self.ports[i].reserved = Some(fd),
            Err(err) => debug!(%addr, ?err, "cannot reserve the host port again"),
        }
    }

    /// An error waiting for or reading a notification (ENOMEM, say): logged once, then waited out.
    fn transient(&mut self, err: &io::Error) {
        if !self.warned_transient {
            self.warned_transient = true;
            warn!(?err, "cannot read the server's binds for now; trying again");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    fn cannot_inspect(&mut self, err: &io::Error) {
        if !self.warned {
            self.warned = true;
            warn!(
                ?err,
                "cannot inspect the server's bind (ptrace access refused?); its ports are relayed"
            );
        }
    }
}

/// Reads the server's memory on a thread of its own, with a deadline. A read can block for as long
/// as the server wants (a page behind userfaultfd, or a FUSE file it serves), and must not stop the
/// handoff thread: after [`READ_DEADLINE`] the bind is let through, and a fresh reader takes over.
/// After [`MAX_STUCK_READERS`] stuck readers, no memory is read any more, and every bind is let
/// through (the relay serves the ports).
#[derive(Default)]
struct Reader {
    worker: Option<ReaderWorker>,
    stuck: usize,
}

struct ReaderWorker {
    requests: std::sync::mpsc::Sender<(i32, u64, usize)>,
    answers: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
}

const READ_DEADLINE: std::time::Duration = std::time::Duration::from_millis(200);
const MAX_STUCK_READERS: usize = 4;

impl Reader {
    fn read(&mut self, tid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        if self.stuck >= MAX_STUCK_READERS {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        if self.worker.is_none() {
            let (requests, inbox) = std::sync::mpsc::channel::<(i32, u64, usize)>();
            let (outbox, answers) = std::sync::mpsc::channel();
            // The thread inherits the handoff thread's CAP_SYS_PTRACE.
            std::thread::Builder::new()
                .name("lowport-reader".into())
                .spawn(move || {
                    for (tid, addr, len) in inbox {
                        let mut bytes = vec![0u8; len];
                        let read = sys::read_process_memory(tid, addr, &mut bytes).map(|n| {
                            bytes.truncate(n);
                            bytes
                        });
                        if outbox.send(read).is_err() {
                            return;
                        }
                    }
                })?;
            self.worker = Some(ReaderWorker { requests, answers });
        }
        let worker = self.worker.as_ref().expect("started above");
        worker
            .requests
            .send((tid, addr, buf.len()))
            .map_err(|_| io::Error::other("the memory reader stopped"))?;
        match worker.answers.recv_timeout(READ_DEADLINE) {
            Ok(read) => {
                let bytes = read?;
                buf[..bytes.len()].copy_from_slice(&bytes);
                Ok(bytes.len())
            }
            Err(_) => {
                // Left blocked; its answer, if it ever comes, goes nowhere.
                self.worker = None;
                self.stuck += 1;
                warn!(
                    tid,
                    "reading the server's bind took longer than {READ_DEADLINE:?}; the bind is left to the relay"
                );
                Err(io::Error::from(io::ErrorKind::TimedOut))
            }
        }
    }
}

/// An early answer found while inspecting the server's socket.
struct Early(Answer);

/// The published host sockets a server's bind of `asked` takes over: one socket of the asked family,
/// or for a dual-stack `[::]` bind the `[::]` and `0.0.0.0` pair of one `-p`. `None` when the bind is
/// not one to hand off: no port of that family, or several (one server socket cannot take two host
/// addresses; they stay relayed).
fn targets(
    ports: &[Port],
    protocol: Protocol,
    asked: SocketAddr,
    v6only: bool,
) -> Option<Vec<usize>> {
    let matching = |v6: bool| -> Vec<usize> {
        ports
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.spec.protocol == protocol && p.spec.port == asked.port() && p.addr.is_ipv6() == v6
            })
            .map(|(i, _)| i)
            .collect()
    };
    let own = matching(asked.is_ipv6());
    if own.is_empty() && asked.is_ipv6() && !v6only {
        // A dual-stack server and only an IPv4 host address (-p 127.0.0.1:8080:80): its IPv6 socket
        // takes that address as ::ffff:a.b.c.d, which serves IPv4 alone.
        let other = matching(false);
        return (other.len() == 1).then_some(other);
    }
    if own.len() != 1 {
        return None;
    }
    let mut targets = own;
    let main = &ports[targets[0]];
    if asked.is_ipv6() && !v6only && main.addr.ip().is_unspecified() {
        let other = matching(false);
        match other.as_slice() {
            [] => {}
            [i] if ports[*i].addr.ip().is_unspecified()
                && ports[*i].addr.port() == main.addr.port() =>
            {
                targets.push(*i)
            }
            // An IPv4 host socket a dual-stack server socket cannot cover.
            _ => return None,
        }
    }
    Some(targets)
}

/// Gives `host` the server's options. A fresh socket gets those that matter before bind too
/// (IPV6_V6ONLY, SO_REUSEADDR, SO_REUSEPORT).
fn prepare(host: &OwnedFd, server: &OwnedFd, state: &ServerSocket, fresh: bool) -> io::Result<()> {
    let fd = host.as_fd();
    if fresh {
        if state.domain == libc::AF_INET6 {
            sys::set_int_option(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                state.v6only.into(),
            )?;
        }
        sys::set_int_option(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            state.reuseport.into(),
        )?;
    }
    sys::set_int_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        state.reuseaddr.into(),
    )?;
    for (level, name) in COPIED {
        if (level == libc::IPPROTO_IPV6) != (state.domain == libc::AF_INET6)
            && level != libc::SOL_SOCKET
            && level != libc::IPPROTO_TCP
        {
            continue;
        }
        if let Ok(value) = sys::get_int_option(server.as_fd(), level, name) {
            // Options that do not apply to this kind of socket fail on both; ignore them.
            let _ = sys::set_int_option(fd, level, name, value);
        }
    }
    let flags = nix::fcntl::fcntl(host.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.set(nix::fcntl::OFlag::O_NONBLOCK, state.nonblocking);
    nix::fcntl::fcntl(host.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Whether descriptor `fd` of thread `tid` is non-blocking and close-on-exec, from one read of its
/// fdinfo (its `flags` line, in octal).
fn fd_flags(tid: i32, fd: RawFd) -> Option<(bool, bool)> {
    let info = read_proc(&format!("/proc/{tid}/fdinfo/{fd}"), 512)?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
    Some((
        flags & libc::O_NONBLOCK as u32 != 0,
        flags & libc::O_CLOEXEC as u32 != 0,
    ))
}

/// A /proc file of at most `max` bytes, in as few reads as it takes (std's `read_to_string` asks
/// for the size first and reads in small steps).
fn read_proc(path: &str, max: usize) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 4096.min(max)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if buf.len() >= max {
                return None;
            }
            buf.resize((buf.len() * 4).min(max), 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

/// Whether descriptor `fd` of thread `tid` is close-on-exec (see [`fd_flags`]).
fn fd_cloexec(tid: i32, fd: RawFd) -> bool {
    fd_flags(tid, fd).is_some_and(|(_, cloexec)| cloexec)
}

fn inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|s| s.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(spec: &str, addr: &str) -> Port {
        let (stop, _control) = relay_control();
        Port {
            spec: spec.parse().unwrap(),
            addr: addr.parse().unwrap(),
            eligible: true,
            reserved: None,
            relay: stop,
            handed: Default::default(),
            inherited: false,
        }
    }

    #[test]
    fn sockaddrs_are_parsed_by_family_and_length() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&80u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(
            parse_sockaddr(&v4, 16),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_sockaddr(&v4, 8), None);
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(parse_sockaddr(&v6, 28), Some("[::]:443".parse().unwrap()));
        assert_eq!(parse_sockaddr(&v6[..16], 16), None);
        // Without the scope id, as the kernel takes it too.
        assert_eq!(
            parse_sockaddr(&v6[..24], 24),
            Some("[::]:443".parse().unwrap())
        );
        let mut unix = [0u8; 28];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix, 28), None);
    }

    #[test]
    fn a_bind_takes_the_host_sockets_of_its_family() {
        let ports = [
            port("8080:80", "0.0.0.0:8080"),
            port("8080:80", "[::]:8080"),
            port("5353:53/udp", "0.0.0.0:5353"),
        ];
        let tcp = Protocol::Tcp;
        assert_eq!(
            targets(&ports, tcp, "0.0.0.0:80".parse().unwrap(), false),
            Some(vec![0])
        );
        assert_eq!(
            targets(&ports, tcp, "[::]:80".parse().unwrap(), true),
            Some(vec![1])
        );
        // Dual stack: the pair, replaced by one socket.
        assert_eq!(
            targets(&ports, tcp, "[::]:80".parse().unwrap(), false),
            Some(vec![1, 0])
        );
        assert_eq!(
            targets(&ports, tcp, "0.0.0.0:81".parse().unwrap(), false),
            None
        );
        assert_eq!(
            targets(&ports, Protocol::Udp, "0.0.0.0:53".parse().unwrap(), false),
            Some(vec![2])
        );
        // Dual stack, and only an IPv4 address for UDP 53: that address, mapped.
        assert_eq!(
            targets(&ports, Protocol::Udp, "[::]:53".parse().unwrap(), false),
            Some(vec![2])
        );
        assert_eq!(
            targets(&ports, Protocol::Udp, "[::]:53".parse().unwrap(), true),
            None
        );
    }

    #[test]
    fn connects_to_the_hosts_loopback_come_from_its_loopback() {
        for (to, from) in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.53", "127.0.0.1"),
            ("::1", "::1"),
            ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
            ("10.0.0.1", "0.0.0.0"),
            ("fd00::1", "::"),
        ] {
            assert_eq!(
                source_ip(to.parse().unwrap()),
                from.parse::<IpAddr>().unwrap(),
                "{to}"
            );
        }
    }

    #[test]
    fn one_server_socket_never_takes_two_host_addresses() {
        let ports = [
            port("8080:80", "0.0.0.0:8080"),
            port("127.0.0.1:9090:80", "127.0.0.1:9090"),
            port("[::1]:8080:80", "[::1]:8080"),
        ];
        let tcp = Protocol::Tcp;
        assert_eq!(
            targets(&ports, tcp, "0.0.0.0:80".parse().unwrap(), false),
            None
        );
        // [::1] alone: a dual-stack server socket gets it, and no IPv4 address.
        assert_eq!(
            targets(&ports, tcp, "[::]:80".parse().unwrap(), false),
            Some(vec![2])
        );
    }
}

/// A thread with a descriptor table of its own, which holds nothing of lowport's, and registers host
/// sockets in a server's epoll instances under the server's descriptor numbers
/// ([`sys::epoll_add_as`]).
///
/// The table cannot be the handoff thread's: a table of its own starts as a copy of lowport's, and
/// the handoff thread's copies of the published host sockets would keep them open after the relay
/// let go of them or the server closed them (still listening, with nobody accepting, and the port
/// taken); and tokio's runtime, which the handoff thread wakes when it stops a relay, is woken
/// through a descriptor number of lowport's table.
struct Registrar {
    sock: OwnedFd,
}

/// A request to the registrar: the descriptor number, events and data, with the epoll instance and
/// the socket as SCM_RIGHTS.
const REGISTRAR_REQUEST: usize = 16;

impl Registrar {
    fn start() -> io::Result<Registrar> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        let moved = theirs.as_raw_fd();
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lowport-epoll".into())
            .spawn(move || registrar_main(theirs, ready))?;
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the epoll registrar ended")))?;
        // SAFETY: `theirs` moved to the registrar, whose descriptor table is its own now (it has
        // just said so): this table's number for it is a copy nothing owns.
        unsafe { sys::close_moved(&[moved]) };
        Ok(Registrar { sock: ours })
    }

    /// [`sys::epoll_add_as`], in the registrar's table.
    fn register(
        &self,
        epoll: std::os::fd::BorrowedFd,
        target: std::os::fd::BorrowedFd,
        number: RawFd,
        events: u32,
        data: u64,
    ) -> io::Result<()> {
        let mut request = [0u8; REGISTRAR_REQUEST];
        request[..4].copy_from_slice(&number.to_ne_bytes());
        request[4..8].copy_from_slice(&events.to_ne_bytes());
        request[8..].copy_from_slice(&data.to_ne_bytes());
        sys::send_with_fds(self.sock.as_raw_fd(), &request, &[epoll, target])?;
        let mut answer = [0u8; 4];
        match sys::recv_with_fds(self.sock.as_fd(), &mut answer)? {
            (4, _) => match i32::from_ne_bytes(answer) {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            },
            _ => Err(io::Error::other("the epoll registrar ended")),
        }
    }
}

/// The registrar's thread: a descriptor table of its own with nothing in it but `sock` (and 0 to 2),
/// then one registration per request until the handoff closes its end.
fn registrar_main(sock: OwnedFd, ready: std::sync::mpsc::Sender<io::Result<()>>) {
    let set_up = sys::unshare_files().and_then(|()| {
        // SAFETY: the table is this thread's own since the unshare; this thread owns nothing in it
        // but `sock`.
        unsafe { sys::close_copies_except(&[sock.as_raw_fd()]) }
    });
    let failed = set_up.is_err();
    let _ = ready.send(set_up);
    if failed {
        return;
    }
    // Out of the way of the low numbers servers use, which must be free for `epoll_add_as`.
    let sock = sys::dup_at_least(sock.as_raw_fd(), 512).unwrap_or(sock);
    loop {
        let mut request = [0u8; REGISTRAR_REQUEST];
        let (n, fds) = match sys::recv_with_fds(sock.as_fd(), &mut request) {
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return,
        };
        if n != REGISTRAR_REQUEST {
            return;
        }
        let field = |at: usize, len: usize| &request[at..at + len];
        let number = RawFd::from_ne_bytes(field(0, 4).try_into().expect("4 bytes"));
        let events = u32::from_ne_bytes(field(4, 4).try_into().expect("4 bytes"));
        let data = u64::from_ne_bytes(field(8, 8).try_into().expect("8 bytes"));
        // Received descriptors take the lowest free numbers, maybe `number`: moved above it.
        let away = |fd: OwnedFd| -> io::Result<OwnedFd> {
            if fd.as_raw_fd() == number {
                sys::dup_at_least(number, number.saturating_add(1))
            } else {
                Ok(fd)
            }
        };
        let result = match <[OwnedFd; 2]>::try_from(fds) {
            Ok([epoll, target]) => away(epoll).and_then(|epoll| {
                let target = away(target)?;
                sys::epoll_add_as(epoll.as_fd(), target.as_fd(), number, events, data)
            }),
            Err(_) => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let errno = match result {
            Ok(()) => 0,
            Err(err) => err.raw_os_error().unwrap_or(libc::EINVAL),
        };
        if sys::send_with_fds(sock.as_raw_fd(), &errno.to_ne_bytes(), &[]).is_err() {
            return;
        }
    }
}

/// One epoll registration of a server's socket, as its epoll instance's fdinfo shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watcher {
    /// The server's descriptor number of the epoll instance.
    epoll: RawFd,
    events: u32,
    data: u64,
}

/// The epoll instances of each server thread's descriptor table, found by a scan of its descriptors
/// (kept by thread id: reading each thread's group would cost a /proc read per connect).
///
/// A socket replaced at connect time must be registered where the server registered the one it
/// replaces, with the same events, data and descriptor number; missing one would leave the server
/// waiting for ever. The epoll instances found are kept, so that an event loop (which registers
/// before it connects, in the instance it always uses) costs one fdinfo read per connect; when the
/// socket is in none of them, every descriptor is looked at again, as an instance may be new. A
/// process with more than [`EPOLL_SCAN_MAX`] descriptors is not scanned: its connects are relayed.
#[derive(Debug, Default)]
struct EpollCache {
    known: std::collections::HashMap<i32, Vec<RawFd>>,
}
const EPOLL_SCAN_MAX: usize = 4096;

impl EpollCache {
    /// The registrations of the server's socket `fd` (whose copy is `socket`); `None` when they
    /// cannot be known.
    fn watchers(&mut self, tid: i32, fd: RawFd, ino: u64) -> Option<Vec<Watcher>> {
        if let Some(epolls) = self.known.get(&tid) {
            let found = registrations(tid, epolls, fd, ino);
            if !found.is_empty() {
                return Some(found);
            }
        }
        let epolls = scan_epolls(tid)?;
        let found = registrations(tid, &epolls, fd, ino);
        if self.known.len() > 256 {
            self.known.clear();
        }
        self.known.insert(tid, epolls);
        Some(found)
    }

    /// A copy of the server's epoll instance `epoll`.
    fn copy(&self, tid: i32, epoll: RawFd) -> io::Result<OwnedFd> {
        sys::pidfd_open_thread(tid, || thread_group(tid))
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), epoll))
    }
}

fn thread_group(tid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// The descriptor numbers of thread `tid`'s epoll instances; `None` when they cannot be listed.
fn scan_epolls(tid: i32) -> Option<Vec<RawFd>> {
    let dir = std::fs::read_dir(format!("/proc/{tid}/fd")).ok()?;
    let mut epolls = Vec::new();
    for (n, entry) in dir.enumerate() {
        if n >= EPOLL_SCAN_MAX {
            return None;
        }
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]")
        {
            epolls.push(fd);
        }
    }
    Some(epolls)
}

/// The registrations of socket `fd` (inode `ino`) in the epoll instances `epolls` of thread `tid`.
fn registrations(tid: i32, epolls: &[RawFd], fd: RawFd, ino: u64) -> Vec<Watcher> {
    let mut out = Vec::new();
    for &epoll in epolls {
        let Some(info) = read_proc(&format!("/proc/{tid}/fdinfo/{epoll}"), 1 << 20) else {
            continue;
        };
        out.extend(
            parse_epoll_fdinfo(&info, fd, ino).map(|(events, data)| Watcher {
                epoll,
                events,
                data,
            }),
        );
    }
    out
}

/// The `events` and `data` of the line for descriptor `fd` with inode `ino` in an epoll instance's
/// fdinfo: `tfd:        4 events: 8000001d data:                4  pos:0 ino:27f80b0 sdev:9`.
fn parse_epoll_fdinfo(info: &str, fd: RawFd, ino: u64) -> Option<(u32, u64)> {
    info.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let mut field = |name: &str| {
            let key = words.next()?;
            if key != name {
                return None;
            }
            words.next()
        };
        let tfd: RawFd = field("tfd:")?.parse().ok()?;
        let events = u32::from_str_radix(field("events:")?, 16).ok()?;
        let data = u64::from_str_radix(field("data:")?, 16).ok()?;
        let rest: Vec<&str> = words.collect();
        let line_ino = rest
            .iter()
            .find_map(|w| w.strip_prefix("ino:"))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        (tfd == fd && line_ino.is_none_or(|i| i == ino)).then_some((events, data))
    })
}

/// The address a host socket connected to `to` is bound to: a loopback address for a service on the
/// host's loopback (127.0.0.1, ::1, or ::ffff:127.0.0.1 for a mapped one), the wildcard otherwise.
/// The command can turn the socket back into a plain one (connect(AF_UNSPEC)) and listen on it,
/// at this address and the port lowport chose: on the loopback, no client from another machine
/// reaches it.
fn source_ip(to: IpAddr) -> IpAddr {
    match to {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()) => {
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())
        }
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// `net.ipv4.ip_local_port_range`, or Linux's default.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
            let (first, last) = (it.next()??, it.next()??);
            (first <= last && first > 0).then_some((first, last))
        })
        .unwrap_or((32768, 60999))
}

//! The kernel edge: socket creation, binding, and adopting inherited file descriptors.
//!
//! Everything that needs a raw file descriptor number or an `unsafe` block lives here, behind a safe
//! API that hands out std sockets. The policy modules ([`crate::bind`], [`crate::activation`]) decide
//! which sockets to make and what an error means; this module only talks to the kernel.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    SockaddrLike, SockaddrStorage,
};

/// Creates a TCP socket bound to `addr` and listening, non-blocking and close-on-exec.
///
/// IPv6 sockets get `IPV6_V6ONLY` so that `0.0.0.0:P` and `[::]:P` can both be bound: with a
/// dual-stack `[::]` socket the second bind would fail with "Address in use", and IPv4 clients would
/// show up as `::ffff:a.b.c.d`.
pub fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, Errno> {
    let fd = new_socket(addr, SockType::Stream)?;
    // Lets a restarted server bind while connections from its previous run sit in TIME_WAIT.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind_fd(&fd, addr)?;
    // The largest backlog the C library admits (the kernel caps it at net.core.somaxconn): a
    // benchmark that opens hundreds of connections at once should not have SYNs dropped before the
    // accept loop gets to them. (nix's Backlog::new rejects SOMAXCONN itself, hence the constant.)
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Creates a UDP socket bound to `addr`, non-blocking and close-on-exec (`IPV6_V6ONLY` as for TCP).
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, Errno> {
    let fd = new_socket(addr, SockType::Datagram)?;
    bind_fd(&fd, addr)?;
    Ok(UdpSocket::from(fd))
}

fn new_socket(addr: SocketAddr, ty: SockType) -> Result<OwnedFd, Errno> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    Ok(fd)
}

fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> Result<(), Errno> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
}

/// Why an inherited descriptor cannot be adopted or served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InheritedProblem {
    /// The descriptor number is not open in this process.
    NotOpen(Errno),
    /// It is open but not a socket (`SO_TYPE` failed with ENOTSOCK).
    NotSocket,
    /// It is a socket of a family other than IPv4/IPv6 (`None`: one nix has no name for).
    Family(Option<AddressFamily>),
    /// It is an IP socket of a type other than stream or datagram.
    Type(Option<SockType>),
    /// It is a TCP socket on which `listen()` was never called.
    NotListening,
    /// A kernel call that should not fail on a valid socket did.
    Setup(&'static str, Errno),
}

/// An inherited socket, checked and converted to the std type that matches what it is.
#[derive(Debug)]
pub enum InheritedSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Takes ownership of descriptor `fd`, passed to us by a socket-activation parent, and checks that
/// it is a listening TCP socket or a UDP socket of family IPv4 or IPv6.
///
/// Must be called before this process opens any file of its own: that is what guarantees that the
/// descriptor number still refers to what the parent passed and that nothing else owns it.
pub fn adopt_inherited(fd: RawFd) -> Result<InheritedSocket, InheritedProblem> {
    // Probe first so that a number the parent did not actually pass is reported, not adopted.
    fcntl(fd, FcntlArg::F_GETFD).map_err(InheritedProblem::NotOpen)?;
    // SAFETY: `fd` is open (F_GETFD succeeded). Under the socket-activation protocol the parent
    // hands descriptors 3..3+LISTEN_FDS to us, and the caller adopts each number once, at start-up,
    // before anything in this process has opened a file, so no other owner of `fd` exists and the
    // OwnedFd we create is its sole owner (it is closed when dropped).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Inherited sockets arrive without close-on-exec (they had to survive the parent's exec);
    // do what sd_listen_fds does so they do not leak into anything we might start.
    fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| InheritedProblem::Setup("set close-on-exec", e))?;

    let ty = match socket::getsockopt(&owned, sockopt::SockType) {
        Ok(ty) => Some(ty),
        Err(Errno::ENOTSOCK) => return Err(InheritedProblem::NotSocket),
        // An SO_TYPE that nix does not know (e.g. SOCK_PACKET) comes back as EINVAL.
        Err(Errno::EINVAL) => None,
        Err(e) => return Err(InheritedProblem::Setup("read SO_TYPE", e)),
    };
    let local: SockaddrStorage = socket::getsockname(owned.as_raw_fd())
        .map_err(|e| InheritedProblem::Setup("read the local address", e))?;
    match local.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {}
        other => return Err(InheritedProblem::Family(other)),
    }

    match ty {
        Some(SockType::Stream) => {
            let listening = socket::getsockopt(&owned, sockopt::AcceptConn)
                .map_err(|e| InheritedProblem::Setup("read SO_ACCEPTCONN", e))?;
            if !listening {
                return Err(InheritedProblem::NotListening);
            }
            let listener = TcpListener::from(owned);
            listener
                .set_nonblocking(true)
                .map_err(|e| InheritedProblem::Setup("set non-blocking mode", io_errno(&e)))?;
            Ok(InheritedSocket::Tcp(listener))
        }
        Some(SockType::Datagram) => {
            let udp = UdpSocket::from(owned);
            udp.set_nonblocking(true)
                .map_err(|e| InheritedProblem::Setup("set non-blocking mode", io_errno(&e)))?;
            Ok(InheritedSocket::Udp(udp))
        }
        other => Err(InheritedProblem::Type(other)),
    }
}

/// The errno behind an io::Error from a socket call (EIO if std made the error up itself).
pub fn io_errno(err: &std::io::Error) -> Errno {
    err.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// Human text for an errno, without the "(os error N)" suffix that io::Error's Display adds.
pub fn describe(errno: Errno) -> &'static str {
    errno.desc()
}

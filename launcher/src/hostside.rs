//! The host side: a process lowport forks before it leaves the host's namespaces, which stays in
//! the host's network namespace and makes sockets there on request.
//!
//! A socket belongs to the network namespace it was made in, whoever uses it later; once lowport has
//! entered its own namespace, every socket it makes is an inner one. The host side makes the host
//! sockets that come later: the fresh sockets the handoff gives a server that binds a second time or
//! wants a dual-stack socket (`handoff`), and one socket per connection or flow to a host service
//! (`outward`). It makes only unbound TCP and UDP sockets of IPv4 and IPv6, and answers nothing else;
//! lowport binds or connects them. It also starts pasta for `--net pasta` (`pasta`), which has to
//! be started from the host's namespaces.
//!
//! Each user of the host side has a channel of its own (a SOCK_SEQPACKET pair), so that a request and
//! its answer are never interleaved with another user's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

use crate::sys;

/// The request for a socket: `[OP_SOCKET, domain, type, protocol]`, native-endian `i32`s.
const OP_SOCKET: i32 = 1;
/// The request for up to 16 sockets at once: `[OP_SOCKETS, domain, type, count]`.
const OP_SOCKETS: i32 = 3;
/// How many TCP sockets a channel keeps ready for connects to host services.
const POOL: i32 = 8;
/// The request to start pasta for lowport's namespaces: `[OP_PASTA, lowport's pid, 0, 0]`.
pub(crate) const OP_PASTA: i32 = 2;
/// The request to stop pasta and reap it: `[OP_PASTA_STOP, 0, 0, 0]`.
pub(crate) const OP_PASTA_STOP: i32 = 4;
const REQUEST: usize = 16;

/// The host-side process, and the channels lowport has not handed out yet.
#[derive(Debug)]
pub struct Factory {
    channels: Vec<OwnedFd>,
    pid: nix::unistd::Pid,
}

impl Factory {
    /// Forks the host side with `channels` channels. Call before leaving the host's network
    /// namespace, single-threaded; `close` lists lowport's descriptors that it must not keep.
    pub fn spawn(close: &[RawFd], channels: usize) -> io::Result<Factory> {
        let mut ours = Vec::with_capacity(channels);
        let mut theirs = Vec::with_capacity(channels);
        for _ in 0..channels {
            let (a, b) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )?;
            ours.push(a);
            theirs.push(b);
        }
        match sys::fork()? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                for fd in close {
                    // SAFETY: the host side never returns to the launcher's code that owns these; it
                    // ends with exit_now.
                    unsafe { sys::close_raw(*fd) };
                }
                sys::exit_now(factory_main(theirs))
            }
            nix::unistd::ForkResult::Parent { child } => Ok(Factory {
                channels: ours,
                pid: child,
            }),
        }
    }

    /// The host side's pid, for [`Reaper`].
    pub fn pid(&self) -> nix::unistd::Pid {
        self.pid
    }

    /// lowport's ends of the channels, which the other processes lowport forks must close.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.channels.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Hands out the next channel; `None` when all are taken.
    pub fn channel(&mut self) -> Option<Channel> {
        self.channels.pop().map(|sock| Channel {
            sock,
            pool: Vec::new(),
        })
    }
}

/// One user's channel to the host side, used from one thread, blocking.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
    /// Host TCP sockets made ahead, by domain, so that a connect costs no round trip most times.
    pool: Vec<(i32, Vec<OwnedFd>)>,
}

impl Channel {
    /// A new socket of the host's network namespace (close-on-exec, blocking, unbound).
    pub fn socket(&self, domain: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
        sys::send_with_fd(
            self.sock.as_raw_fd(),
            &request(OP_SOCKET, [domain, kind, protocol]),
            None,
        )?;
        let mut answer = [0u8; 4];
        let got = sys::recv_with_fd(
            self.sock.as_fd(),
            &mut answer,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        socket_answer(got, &answer)
    }

    /// A new non-blocking TCP socket of the host's network namespace for `domain`, from the pool,
    /// which is filled [`POOL`] sockets at a time.
    pub fn tcp_socket(&mut self, domain: i32) -> io::Result<OwnedFd> {
        let i = match self.pool.iter().position(|(d, _)| *d == domain) {
            Some(i) => i,
            None => {
                self.pool.push((domain, Vec::new()));
                self.pool.len() - 1
            }
        };
        if let Some(fd) = self.pool[i].1.pop() {
            return Ok(fd);
        }
        sys::send_with_fd(
            self.sock.as_raw_fd(),
            &request(OP_SOCKETS, [domain, libc::SOCK_STREAM, POOL]),
            None,
        )?;
        let mut answer = [0u8; 4];
        let (n, mut fds) = sys::recv_with_fds(self.sock.as_fd(), &mut answer)?;
        if n != 4 {
            return Err(io::Error::other("lowport's host side has stopped"));
        }
        match fds.pop() {
            Some(fd) => {
                self.pool[i].1 = fds;
                Ok(fd)
            }
            None => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(answer))),
        }
    }

    /// Sends one request and waits for its answer, which may carry a descriptor and some text.
    pub(crate) fn call(
        &self,
        op: i32,
        args: [i32; 3],
        text: &mut [u8],
    ) -> io::Result<(usize, Option<OwnedFd>)> {
        sys::send_with_fd(self.sock.as_raw_fd(), &request(op, args), None)?;
        sys::recv_with_fd(self.sock.as_fd(), text, nix::sys::socket::MsgFlags::empty())
    }

    /// The same channel, for tokio: requests from many tasks, one at a time.
    pub fn into_async(self) -> io::Result<AsyncChannel> {
        set_nonblocking(&self.sock)?;
        Ok(AsyncChannel {
            sock: sys::register_owned(self.sock)?,
            turn: tokio::sync::Mutex::new(()),
        })
    }
}

/// A channel used by tokio tasks; each request waits for its turn.
#[derive(Debug)]
pub struct AsyncChannel {
    sock: AsyncFd<OwnedFd>,
    turn: tokio::sync::Mutex<()>,
}

impl AsyncChannel {
    /// A new socket of the host's network namespace (close-on-exec, blocking, unbound).
    pub async fn socket(&self, domain: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
        let _turn = self.turn.lock().await;
        let req = request(OP_SOCKET, [domain, kind, protocol]);
        loop {
            let mut guard = self.sock.writable().await?;
            match guard.try_io(|s| sys::send_with_fd(s.get_ref().as_raw_fd(), &req, None)) {
                Ok(sent) => break sent?,
                Err(_would_block) => continue,
            }
        }
        let mut answer = [0u8; 4];
        loop {
            let mut guard = self.sock.readable().await?;
            match guard.try_io(|s| {
                sys::recv_with_fd(
                    s.get_ref().as_fd(),
                    &mut answer,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                )
            }) {
                Ok(got) => return socket_answer(got?, &answer),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Sets O_NONBLOCK on a descriptor lowport owns.
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_fd().as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn request(op: i32, args: [i32; 3]) -> [u8; REQUEST] {
    let mut buf = [0u8; REQUEST];
    for (i, v) in std::iter::once(op).chain(args).enumerate() {
        buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    buf
}

fn socket_answer(got: (usize, Option<OwnedFd>), answer: &[u8; 4]) -> io::Result<OwnedFd> {
    match got {
        (4, Some(fd)) => Ok(fd),
        (4, None) => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(*answer))),
        _ => Err(io::Error::other("lowport's host side has stopped")),
    }
}

/// Kills and reaps the host side when dropped, so that no zombie of it outlives lowport (an init
/// that does not reap would keep it, and it would count against the user's process limit).
#[derive(Debug)]
pub struct Reaper(pub nix::unistd::Pid);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

/// The host side's loop: an answer for each request, until lowport has closed every channel or died.
fn factory_main(mut channels: Vec<OwnedFd>) -> i32 {
    // Nothing of the user's may look into it (its descriptors, its sockets to lowport).
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
        || nix::sys::prctl::set_dumpable(false).is_err()
    {
        return 125;
    }
    let mut pasta = crate::pasta::HostSide::default();
    while !channels.is_empty() {
        let mut fds: Vec<nix::poll::PollFd> = channels
            .iter()
            .map(|c| nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        // pasta's standard error, last.
        let draining = pasta.stderr().is_some();
        if let Some(stderr) = pasta.stderr() {
            fds.push(nix::poll::PollFd::new(stderr, nix::poll::PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 0,
        }
        let pasta_said = draining
            && fds
                .pop()
                .and_then(|fd| fd.revents())
                .is_some_and(|r| !r.is_empty());
        let ready: Vec<(usize, bool)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, fd)| {
                let r = fd.revents().unwrap_or(nix::poll::PollFlags::empty());
                if r.contains(nix::poll::PollFlags::POLLIN) {
                    Some((i, true))
                } else if !r.is_empty() {
                    Some((i, false))
                } else {
                    None
                }
            })
            .collect();
        drop(fds);
        if pasta_said {
            pasta.drain();
        }
        let mut closed = Vec::new();
        for (i, readable) in ready {
            if !readable || !serve_one(&channels[i], &mut pasta) {
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            channels.remove(i);
        }
    }
    pasta.stop();
    0
}

/// Answers one request; false when the channel is closed.
fn serve_one(sock: &OwnedFd, pasta: &mut crate::pasta::HostSide) -> bool {
    let mut req = [0u8; REQUEST];
    match sys::recv_with_fd(sock.as_fd(), &mut req, nix::sys::socket::MsgFlags::empty()) {
        Ok((REQUEST, _)) => {}
        Ok(_) => return false,
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => return true,
        Err(_) => return false,
    }
    let field = |i: usize| i32::from_ne_bytes(req[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    match field(0) {
        OP_SOCKET => {
            let (domain, kind, protocol) = (field(1), field(2), field(3));
            // Only the families and types lowport uses.
            let made = if matches!(domain, libc::AF_INET | libc::AF_INET6)
                && matches!(kind, libc::SOCK_STREAM | libc::SOCK_DGRAM)
            {
                sys::socket(domain, kind, protocol)
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            };
            let sent = match &made {
                Ok(fd) => {
                    sys::send_with_fd(sock.as_raw_fd(), &0i32.to_ne_bytes(), Some(fd.as_fd()))
                }
                Err(e) => sys::send_with_fd(
                    sock.as_raw_fd(),
                    &e.raw_os_error().unwrap_or(libc::EINVAL).to_ne_bytes(),
                    None,
                ),
            };
            sent.is_ok()
        }
        OP_SOCKETS => {
            let (domain, kind, count) = (field(1), field(2), field(3).clamp(1, 16));
            let mut made = Vec::new();
            let mut error = 0;
            if matches!(domain, libc::AF_INET | libc::AF_INET6)
                && matches!(kind, libc::SOCK_STREAM | libc::SOCK_DGRAM)
            {
                // Non-blocking: lowport connects them without waiting.
                for _ in 0..count {
                    match sys::socket(domain, kind | libc::SOCK_NONBLOCK, 0) {
                        Ok(fd) => made.push(fd),
                        Err(e) => {
                            error = e.raw_os_error().unwrap_or(libc::EINVAL);
                            break;
                        }
                    }
                }
            } else {
                error = libc::EINVAL;
            }
            let fds: Vec<_> = made.iter().map(AsFd::as_fd).collect();
            sys::send_with_fds(sock.as_raw_fd(), &error.to_ne_bytes(), &fds).is_ok()
        }
        OP_PASTA => {
            // b"+" when pasta is ready, b"-" and what went wrong otherwise: an empty answer is what a
            // closed channel reads as.
            let answer = match pasta.start(field(1)) {
                Ok(()) => b"+".to_vec(),
                Err(text) => [b"-".as_slice(), text.as_bytes()].concat(),
            };
            sys::send_with_fd(sock.as_raw_fd(), &answer, None).is_ok()
        }
        OP_PASTA_STOP => {
            pasta.stop();
            sys::send_with_fd(sock.as_raw_fd(), b"+", None).is_ok()
        }
        _ => sys::send_with_fd(sock.as_raw_fd(), &libc::EINVAL.to_ne_bytes(), None).is_ok(),
    }
}

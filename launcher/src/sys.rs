//! The few system calls that nix does not wrap safely, behind a safe API.
//!
//! Every `unsafe` block of the launcher lives here, so a reviewer can audit the whole unsafe surface in
//! one file; the policy modules (`userns`, `netns`, `init`, `forward`) only call these functions.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// What [`clone_into_new_pid_namespace`] returns in each of the two processes.
pub enum CloneResult {
    /// In the parent: the child's pid as the parent sees it.
    Parent(nix::unistd::Pid),
    /// In the child, which is pid 1 of a new pid namespace.
    Child,
}

/// Creates a child process in a new pid namespace, like `fork()` but with `CLONE_NEWPID`.
///
/// `unshare(CLONE_NEWPID)` would be simpler, but afterwards the kernel refuses to create threads in the
/// calling process (their pid namespace would differ from the process's), and the launcher needs threads
/// for its runtime. A raw `clone` with `CLONE_NEWPID` puts only the child in the new namespace, as
/// bubblewrap does.
///
/// The caller must have only one thread, and the child must restrict itself to what is safe after fork:
/// the functions in this crate's `init` module do.
pub fn clone_into_new_pid_namespace() -> io::Result<CloneResult> {
    let flags = (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a raw clone without CLONE_VM and with a null stack duplicates the process like fork();
    // the caller guarantees a single thread, so no lock of another thread can be held in the child.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(CloneResult::Child),
        pid => Ok(CloneResult::Parent(nix::unistd::Pid::from_raw(pid as i32))),
    }
}

/// Forks a plain child process.
///
/// The caller must have only one thread (the launcher forks only before it starts its runtime).
pub fn fork() -> io::Result<nix::unistd::ForkResult> {
    // SAFETY: the caller guarantees that the process has one thread, so the child cannot inherit a lock
    // held by another thread; the children only run async-signal-safe code or exec.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Ends the calling process at once, without running exit handlers or flushing stdio buffers that it
/// shares with its parent after a fork.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Sets the interface flags IFF_UP on the interface called `name` in the current network namespace.
pub fn set_interface_up(name: &CStr) -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let bytes = name.to_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into `req`, which is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel has just filled the ifru_flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates `fd` to the lowest free descriptor at or above `min`, with close-on-exec set.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let new = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Makes `target` a copy of `fd` without close-on-exec, so an exec'd program inherits it at that number.
///
/// Only for a child between fork and exec: it may replace a descriptor that the process still refers
/// to elsewhere, which is why it takes raw numbers.
pub fn dup_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    nix::unistd::dup2(fd, target)?;
    Ok(())
}

/// Closes a raw descriptor number that the caller knows is open and owned by nothing else.
///
/// Used in the pid-1 helper right after fork, on the inherited copies of the launcher's own descriptors.
pub fn close_raw(fd: RawFd) {
    // SAFETY: closing a number is memory safe; the caller ensures no live OwnedFd refers to it in this
    // process (the helper forgets its copies after this).
    unsafe { libc::close(fd) };
}

/// Sets or clears close-on-exec on a descriptor the caller does not own (such as `--ready-fd`).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes an int and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells whether a descriptor number is open in this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD takes no argument and touches no memory.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Waits for one of the signals in `set`, which the caller keeps blocked, and returns its number.
pub fn wait_for_signal(set: &nix::sys::signal::SigSet) -> io::Result<i32> {
    loop {
        // SAFETY: `set` is a valid sigset_t; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(set.as_ref(), std::ptr::null_mut()) };
        if sig >= 0 {
            return Ok(sig);
        }
        let err = Errno::last();
        if err != Errno::EINTR {
            return Err(err.into());
        }
    }
}

/// Sets the disposition of `sig` back to the default, for a child about to exec (Rust's runtime ignores
/// SIGPIPE, and an ignored signal would stay ignored in the exec'd program).
pub fn reset_signal_to_default(sig: nix::sys::signal::Signal) {
    // SAFETY: installing SIG_DFL does not involve any handler code.
    unsafe {
        let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl);
    }
}

/// Raises the soft limit on open files to the hard limit: each relayed connection takes two sockets and
/// up to four pipe ends, and the default soft limit of 1024 would cap the relay far below what it can do.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Borrows a raw descriptor number that the caller knows stays open for as long as it is used.
///
/// Only for the command's side of the fork, which refers to the launcher's inherited sockets by number.
pub fn borrow_raw(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the caller guarantees the descriptor is open; in the forked child nothing closes it
    // before the exec that ends the borrow.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Takes ownership of a descriptor number the process inherited and that nothing else owns, such as
/// `--ready-fd`; dropping the result closes it.
pub fn own_raw(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller checked that the descriptor is open and hands over the only reference to it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers a signalfd with the tokio reactor, for reading signals as events.
pub fn register_signalfd(
    fd: nix::sys::signalfd::SignalFd,
) -> io::Result<tokio::io::unix::AsyncFd<nix::sys::signalfd::SignalFd>> {
    // SAFETY: SignalFd owns its descriptor (an OwnedFd inside), keeps it open for its whole life and
    // always returns the same number from as_raw_fd.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

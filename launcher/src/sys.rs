//! The few system calls that nix does not wrap safely, behind a safe API.
//!
//! Every `unsafe` block of the launcher lives here, so a reviewer can audit the whole unsafe surface in
//! one file; the policy modules (`userns`, `netns`, `init`, `forward`) only call these functions. The
//! exceptions are calls of the few `unsafe fn`s below whose soundness rests on the caller (`own_raw`,
//! `close_raw`, `dup_to`): each call site says why the contract holds.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
/// Fails unless the process has exactly one thread: that is what makes the call sound,
/// since a child of a multi-threaded process could inherit a lock (the allocator's, stdio's) held by a
/// thread that does not exist in the child. With one thread, the child may run any code.
pub fn clone_into_new_pid_namespace() -> io::Result<CloneResult> {
    ensure_single_threaded()?;
    let flags = (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a raw clone without CLONE_VM and with a null stack duplicates the process like fork();
    // the process has one thread (checked above, and no other thread can appear meanwhile since only
    // this one could create it), so the child inherits no lock held by a thread it lacks.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(CloneResult::Child),
        pid => Ok(CloneResult::Parent(nix::unistd::Pid::from_raw(pid as i32))),
    }
}

/// Forks a plain child process.
///
/// Fails unless the process has exactly one thread, which makes the call sound (see
/// [`clone_into_new_pid_namespace`]).
pub fn fork() -> io::Result<nix::unistd::ForkResult> {
    ensure_single_threaded()?;
    // SAFETY: the process has one thread (checked above), so the child cannot inherit a lock held by
    // another thread and may run any code, allocation included.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// The number of threads of this process, from /proc/self/stat (field 20).
pub fn thread_count() -> io::Result<usize> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17)?.parse().ok())
        .ok_or_else(|| io::Error::other("cannot parse /proc/self/stat"))
}

fn ensure_single_threaded() -> io::Result<()> {
    match thread_count()? {
        1 => Ok(()),
        n => Err(io::Error::other(format!(
            "internal error: fork with {n} threads (lowport forks only before its runtime starts)"
        ))),
    }
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

/// Duplicates descriptor number `fd` to the lowest free descriptor at or above `min`, with
/// close-on-exec set. A number that is not open gives `EBADF`; the copy is a new descriptor, so no
/// ownership is shared.
pub fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Makes `target` a copy of `fd` without close-on-exec, so an exec'd program inherits it at that number.
///
/// # Safety
///
/// `target` may be open and owned by an `OwnedFd` or another owner in this process; dup2 replaces it.
/// The caller must be a forked child about to exec (or exit), in which no owner of `target` is used
/// or dropped again.
pub unsafe fn dup_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    nix::unistd::dup2(fd, target)?;
    Ok(())
}

/// Closes a raw descriptor number that the caller knows is open.
///
/// # Safety
///
/// Nothing in this process may use or drop an owner of `fd` afterwards: the callers are forked
/// children that close their copies of the launcher's descriptors and end with [`exit_now`] or exec,
/// never returning to the code that owns them.
pub unsafe fn close_raw(fd: RawFd) {
    // SAFETY: closing a number is memory safe; the caller upholds that no owner of it is used again.
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

/// Waits for one of the signals in `set`, which the caller keeps blocked, and returns its number and
/// `si_code` (SI_KERNEL for a signal the terminal generated).
pub fn wait_for_signal(set: &nix::sys::signal::SigSet) -> io::Result<(i32, i32)> {
    loop {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t and `info` a valid siginfo_t that outlives the call.
        let sig = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if sig >= 0 {
            return Ok((sig, info.si_code));
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

/// Takes ownership of a descriptor number the process inherited, such as `--ready-fd`; dropping the
/// result closes it.
///
/// # Safety
///
/// `fd` must be open, and nothing else in the process may own it or use the number afterwards (the
/// launcher checks `--ready-fd` once at start and refers to it only through the result).
pub unsafe fn own_raw(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller upholds this function's contract: an open descriptor with no other owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Installs a seccomp filter on the calling thread (and what it execs) that fails the `ioctl`s
/// `TIOCSTI` and `TIOCLINUX` with EPERM: they push keystrokes into a terminal, which the command could
/// use on the terminal it shares with the user's shell (bubblewrap's CVE-2017-5226). Every other
/// system call passes untouched; the program is thirteen BPF instructions.
///
/// Both ABIs a process may call the kernel with are checked: x86_64 (and x32) with i386, or aarch64
/// with 32-bit arm.
///
/// The caller needs CAP_SYS_ADMIN in its user namespace (the command's side of the fork has it) or
/// `no_new_privs`.
pub fn deny_terminal_injection() -> io::Result<()> {
    use libc::{sock_filter, sock_fprog};
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const TIOCLINUX: u32 = 0x541C;
    // struct seccomp_data: nr at 0, arch at 4, args[] (u64 each) from 16; the low half of args[1].
    const ARG1_LOW: u32 = if cfg!(target_endian = "little") {
        24
    } else {
        28
    };
    // (AUDIT_ARCH of the native ABI, its ioctl numbers; AUDIT_ARCH of the compat ABI, its ioctl)
    #[cfg(target_arch = "x86_64")]
    const ABIS: (u32, [u32; 2], u32, u32) = (0xC000_003E, [16, 0x4000_0000 | 514], 0x4000_0003, 54);
    #[cfg(target_arch = "aarch64")]
    const ABIS: (u32, [u32; 2], u32, u32) = (0xC000_00B7, [29, 29], 0x4000_0028, 54);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    compile_error!("deny_terminal_injection knows the system call ABIs of x86_64 and aarch64 only; add this architecture's AUDIT_ARCH values and ioctl numbers");
    let (native, [ioctl_a, ioctl_b], compat, compat_ioctl) = ABIS;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    // Jump offsets count from the next instruction.
    let mut program = [
        stmt(LD_W_ABS, 4),                                         // 0: A = arch
        jeq(native, 1, 0),                                         // 1: native: 3
        jeq(compat, 3, 8),                                         // 2: compat: 6, other: allow
        stmt(LD_W_ABS, 0),                                         // 3: A = nr
        jeq(ioctl_a, 3, 0),                                        // 4: ioctl: 8
        jeq(ioctl_b, 2, 5),                   // 5: ioctl (x32): 8, other: allow
        stmt(LD_W_ABS, 0),                    // 6: A = nr
        jeq(compat_ioctl, 0, 3),              // 7: ioctl: 8, other: allow
        stmt(LD_W_ABS, ARG1_LOW),             // 8: A = request
        jeq(libc::TIOCSTI as u32, 2, 0),      // 9: deny
        jeq(TIOCLINUX, 1, 0),                 // 10: deny
        stmt(RET_K, libc::SECCOMP_RET_ALLOW), // 11
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32), // 12
    ];
    let fprog = sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at a valid BPF program that outlives the call; the kernel copies it.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for `pid`, a process of the caller's pid namespace (pidfd_open(2), Linux 5.3).
pub fn pidfd_open(pid: nix::unistd::Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Gives the allocator's free memory back to the system (glibc's malloc_trim(3)): after a burst of
/// short-lived allocations, such as thousands of UDP flows that expired, the heap would otherwise keep
/// its peak size.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only reorganises the allocator's own free memory; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Whether the process runs in glibc's secure mode (AT_SECURE): a binary with a file capability does,
/// and its loader then removed variables such as LD_LIBRARY_PATH and TMPDIR from `environ`.
pub fn secure_mode() -> bool {
    // SAFETY: getauxval reads the auxiliary vector the kernel gave the process; it has no preconditions.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
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

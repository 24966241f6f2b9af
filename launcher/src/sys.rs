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

/// Creates a child process in a new pid namespace, like `fork()` but with `CLONE_NEWPID`, and with
/// `mount_ns` in a new mount namespace too (for its private /proc).
///
/// `unshare(CLONE_NEWPID)` would be simpler, but afterwards the kernel refuses to create threads in the
/// calling process (their pid namespace would differ from the process's), and the launcher needs threads
/// for its runtime. A raw `clone` with `CLONE_NEWPID` puts only the child in the new namespace, as
/// bubblewrap does. The same holds for the mount namespace: the launcher keeps the host's /proc, whose
/// pids are the ones the seccomp notifications and pidfds speak of.
///
/// Fails unless the process has exactly one thread: that is what makes the call sound,
/// since a child of a multi-threaded process could inherit a lock (the allocator's, stdio's) held by a
/// thread that does not exist in the child. With one thread, the child may run any code.
pub fn clone_into_new_pid_namespace(mount_ns: bool) -> io::Result<CloneResult> {
    ensure_single_threaded()?;
    let mut flags = (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    if mount_ns {
        flags |= libc::CLONE_NEWNS as libc::c_ulong;
    }
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

/// In a mount namespace of its own: stops mounts from propagating back to the host's namespace, then
/// mounts a procfs of the caller's pid namespace over /proc. The kernel refuses the procfs where the
/// host's /proc has parts hidden under other mounts (as container runtimes mask /proc/kcore and
/// others): a new procfs would reveal them.
pub fn mount_private_proc() -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )?;
    Ok(())
}

/// Takes an exclusive `flock(2)` on `fd` without waiting: `Ok(false)` when another open file holds
/// it. The lock belongs to the open file description, and lasts until its last descriptor closes.
pub fn try_lock_exclusive(fd: std::os::fd::BorrowedFd) -> io::Result<bool> {
    // SAFETY: flock only reads the descriptor number, which the borrow keeps open.
    let ret = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Sends `signal` to the process `pidfd` refers to (pidfd_send_signal(2)): unlike kill(2), never to
/// a process that took over a reused pid.
pub fn pidfd_send_signal(pidfd: std::os::fd::BorrowedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a descriptor, a signal number, a null siginfo (the kernel fills it as for kill) and
    // no flags; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Joins the namespace `fd` refers to (setns(2)); the kind is the file's own.
pub fn setns(fd: std::os::fd::BorrowedFd) -> io::Result<()> {
    nix::sched::setns(fd, nix::sched::CloneFlags::empty())?;
    Ok(())
}

/// The target of the symbolic link `name` in the directory `dir`.
pub fn readlink_at(dir: std::os::fd::BorrowedFd, name: &str) -> io::Result<std::ffi::OsString> {
    Ok(nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name)?)
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

/// Marks every descriptor numbered `first` or above close-on-exec, so that an `exec` passes on only
/// those below it: the descriptors a caller left open without close-on-exec (a CI runner's pipes, a
/// shell's) would otherwise reach the command, where a hostile server could use them.
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    let first = u32::try_from(first).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it sets a flag on descriptors of
    // this process's table.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if done == 0 {
        return Ok(());
    }
    // ENOSYS before Linux 5.9, EINVAL for the flag before 5.11, EPERM from a seccomp profile that
    // does not know the call (as systemd's close_all_fds, fall back on each): each descriptor that
    // /proc lists (the directory's own is close-on-exec already). The caller's /proc must be of its
    // own pid namespace.
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd >= first as RawFd && fd_is_open(fd) {
            set_cloexec(fd, true)?;
        }
    }
    Ok(())
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

/// Ignores `sig` in this process (children get the default back at exec only for handled signals,
/// so call this after spawning them).
pub fn ignore_signal(sig: nix::sys::signal::Signal) {
    // SAFETY: installing SIG_IGN does not involve any handler code.
    unsafe {
        let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn);
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

/// Registers a socket lowport owns with tokio, for reading and writing.
pub fn register_owned(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open for its whole life and always returns the same
    // number from as_raw_fd.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// The seccomp filter every command runs under (see [`install_command_filter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    /// Deny TIOCSTI and TIOCLINUX only.
    Terminal,
    /// Also stop native `bind()` and `connect()` calls on an address of 16 to 128 bytes (every IPv4
    /// and IPv6 one, and some UNIX ones), and sends with MSG_FASTOPEN (which connect too), until the
    /// listener answers them.
    TerminalAndBind,
}

/// The system call ABIs the filter knows: (AUDIT_ARCH of the native ABI, its two ioctl numbers (the
/// second for x32), its bind number; AUDIT_ARCH of the compat ABI, its ioctl number).
#[cfg(target_arch = "x86_64")]
const ABIS: (u32, [u32; 2], u32, u32, u32) = (
    0xC000_003E,
    [16, 0x4000_0000 | 514],
    libc::SYS_bind as u32,
    0x4000_0003,
    54,
);
#[cfg(target_arch = "aarch64")]
const ABIS: (u32, [u32; 2], u32, u32, u32) = (
    0xC000_00B7,
    [29, 29],
    libc::SYS_bind as u32,
    0x4000_0028,
    54,
);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the command's seccomp filter knows the system call ABIs of x86_64 and aarch64 only; add this architecture's AUDIT_ARCH values and ioctl and bind numbers");

/// The AUDIT_ARCH value and `bind` number of the ABI whose binds the filter reports.
pub const NATIVE_BIND: (u32, i32) = (ABIS.0, ABIS.2 as i32);
/// The same for `connect`.
pub const NATIVE_CONNECT: (u32, i32) = (ABIS.0, libc::SYS_connect as i32);
/// The native sends that connect a TCP socket with MSG_FASTOPEN: (number, index of the flags).
pub const NATIVE_SENDS: [(i32, usize); 3] = [
    (libc::SYS_sendto as i32, 3),
    (libc::SYS_sendmsg as i32, 2),
    (libc::SYS_sendmmsg as i32, 3),
];

/// The BPF program of [`install_command_filter`].
fn command_filter(kind: FilterKind) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const TIOCLINUX: u32 = 0x541C;
    // struct seccomp_data: nr at 0, arch at 4, args[] (u64 each) from 16; the low half of an argument.
    const fn arg_low(n: u32) -> u32 {
        16 + 8 * n + if cfg!(target_endian = "little") { 0 } else { 4 }
    }
    let (native, [ioctl_a, ioctl_b], bind, compat, compat_ioctl) = ABIS;
    // Labels, resolved into jump offsets below.
    const NATIVE: usize = 100;
    const COMPAT: usize = 101;
    const IOCTL: usize = 102;
    const BIND: usize = 103;
    const ALLOW: usize = 104;
    const DENY: usize = 105;
    const NOTIFY: usize = 106;
    const FLAGS_2: usize = 107;
    const FLAGS_3: usize = 108;
    enum Op {
        Label(usize),
        Ld(u32),
        Jump(u16, u32, usize, usize),
        Ret(u32),
    }
    const NEXT: usize = usize::MAX;
    let bind_ops = kind == FilterKind::TerminalAndBind;
    let mut ops = vec![
        Op::Ld(4),
        Op::Jump(JEQ_K, native, NATIVE, NEXT),
        Op::Jump(JEQ_K, compat, COMPAT, ALLOW),
        Op::Label(NATIVE),
        Op::Ld(0),
        Op::Jump(JEQ_K, ioctl_a, IOCTL, NEXT),
        Op::Jump(JEQ_K, ioctl_b, IOCTL, if bind_ops { NEXT } else { ALLOW }),
    ];
    if bind_ops {
        let [(sendto, _), (sendmsg, _), (sendmmsg, _)] = NATIVE_SENDS;
        ops.extend([
            Op::Jump(JEQ_K, bind, BIND, NEXT),
            Op::Jump(JEQ_K, libc::SYS_connect as u32, BIND, NEXT),
            Op::Jump(JEQ_K, sendto as u32, FLAGS_3, NEXT),
            Op::Jump(JEQ_K, sendmmsg as u32, FLAGS_3, NEXT),
            Op::Jump(JEQ_K, sendmsg as u32, FLAGS_2, ALLOW),
        ]);
    }
    ops.extend([
        Op::Label(COMPAT),
        Op::Ld(0),
        Op::Jump(JEQ_K, compat_ioctl, IOCTL, ALLOW),
        Op::Label(IOCTL),
        Op::Ld(arg_low(1)),
        Op::Jump(JEQ_K, libc::TIOCSTI as u32, DENY, NEXT),
        Op::Jump(JEQ_K, TIOCLINUX, DENY, ALLOW),
    ]);
    if bind_ops {
        // addrlen: sockaddr_in is 16 bytes, sockaddr_in6 28, sockaddr_storage 128.
        ops.extend([
            Op::Label(BIND),
            Op::Ld(arg_low(2)),
            Op::Jump(JGE_K, 16, NEXT, ALLOW),
            Op::Jump(JGT_K, 128, ALLOW, NOTIFY),
            Op::Label(FLAGS_3),
            Op::Ld(arg_low(3)),
            Op::Jump(JSET_K, libc::MSG_FASTOPEN as u32, NOTIFY, ALLOW),
            Op::Label(FLAGS_2),
            Op::Ld(arg_low(2)),
            Op::Jump(JSET_K, libc::MSG_FASTOPEN as u32, NOTIFY, ALLOW),
            Op::Label(NOTIFY),
            Op::Ret(libc::SECCOMP_RET_USER_NOTIF),
        ]);
    }
    ops.extend([
        Op::Label(ALLOW),
        Op::Ret(libc::SECCOMP_RET_ALLOW),
        Op::Label(DENY),
        Op::Ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]);
    // Instruction index of each label.
    let mut at = std::collections::HashMap::new();
    let mut index = 0;
    for op in &ops {
        match op {
            Op::Label(l) => {
                at.insert(*l, index);
            }
            _ => index += 1,
        }
    }
    let mut program = Vec::with_capacity(index);
    for op in &ops {
        let here = program.len();
        // Jump offsets count from the next instruction.
        let offset = |label: usize| -> u8 {
            if label == NEXT {
                0
            } else {
                (at[&label] - here - 1) as u8
            }
        };
        program.push(match *op {
            Op::Label(_) => continue,
            Op::Ld(k) => libc::sock_filter {
                code: LD_W_ABS,
                jt: 0,
                jf: 0,
                k,
            },
            Op::Jump(code, k, jt, jf) => libc::sock_filter {
                code,
                jt: offset(jt),
                jf: offset(jf),
                k,
            },
            Op::Ret(k) => libc::sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k,
            },
        });
    }
    program
}

/// Installs the command's seccomp filter on the calling thread (and what it execs).
///
/// Every filter fails the `ioctl`s `TIOCSTI` and `TIOCLINUX` with EPERM: they push keystrokes into a
/// terminal, which the command could use on the terminal it shares with the user's shell (bubblewrap's
/// CVE-2017-5226). Both ABIs a process may call the kernel with are checked: x86_64 (and x32) with
/// i386, or aarch64 with 32-bit arm.
///
/// [`FilterKind::TerminalAndBind`] also makes every native `bind()` and `connect()` with an address
/// length from 16 to 128, and every native send with MSG_FASTOPEN, wait for an answer from a
/// user-notification listener, which this returns (Linux 5.0; with
/// `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` where the kernel has it, 5.19, so that once lowport has
/// read a notification only a fatal signal interrupts the call). It fails with EBUSY when a filter
/// the process already runs under has a listener (one per chain), and EINVAL on kernels without
/// listeners; the caller then installs [`FilterKind::Terminal`] alone. Compat-ABI binds (i386 or
/// 32-bit arm programs) and x32 binds are not reported.
///
/// The caller needs CAP_SYS_ADMIN in its user namespace (the command's side of the fork has it) or
/// `no_new_privs`.
pub fn install_command_filter(kind: FilterKind) -> io::Result<Option<OwnedFd>> {
    let mut program = command_filter(kind);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    let install = |flags: libc::c_ulong| -> io::Result<libc::c_long> {
        // SAFETY: `fprog` points at a valid BPF program that outlives the call; the kernel copies it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    match kind {
        FilterKind::Terminal => install(0).map(|_| None),
        FilterKind::TerminalAndBind => {
            let listener = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
            let fd = match install(listener | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => install(listener)?,
                other => other?,
            };
            // SAFETY: with NEW_LISTENER the kernel returned a new descriptor that nothing else owns.
            Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
        }
    }
}

/// One system call that a seccomp filter stopped, as `SECCOMP_IOCTL_NOTIF_RECV` reports it.
#[derive(Clone, Copy, Debug)]
pub struct Notification {
    pub id: u64,
    /// The calling thread's id, in the caller's pid namespace.
    pub tid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

/// Waits for the next notification on a seccomp listener.
pub fn notif_recv(listener: std::os::fd::BorrowedFd) -> io::Result<Notification> {
    // SAFETY: seccomp_notif is plain old data; the kernel wants it zeroed.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl fills `notif`, a valid seccomp_notif that outlives the call.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut notif,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notification {
        id: notif.id,
        tid: notif.pid,
        nr: notif.data.nr,
        arch: notif.data.arch,
        args: notif.data.args,
    })
}

/// Whether the notification `id` still waits for an answer (its thread has not been interrupted or
/// killed). Checked after reading the caller's memory, so that what was read belongs to that call.
pub fn notif_id_valid(listener: std::os::fd::BorrowedFd, id: u64) -> bool {
    // SAFETY: the ioctl reads `id`, a u64 that outlives the call.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &id,
        ) == 0
    }
}

/// Answers a notification: `None` lets the system call run as if no filter had stopped it; `Some(0)`
/// makes it return 0; `Some(errno)` makes it fail with that errno.
pub fn notif_answer(
    listener: std::os::fd::BorrowedFd,
    id: u64,
    answer: Option<i32>,
) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: answer.map_or(0, |errno| -errno),
        flags: if answer.is_none() {
            libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
        } else {
            0
        },
    };
    // SAFETY: the ioctl reads `resp`, a valid seccomp_notif_resp that outlives the call.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &resp,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts a copy of `src` at descriptor number `target` of the notifying process, replacing what was
/// there (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SETFD`, Linux 5.9).
pub fn notif_replace_fd(
    listener: std::os::fd::BorrowedFd,
    id: u64,
    src: std::os::fd::BorrowedFd,
    target: RawFd,
    cloexec: bool,
) -> io::Result<()> {
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: src.as_raw_fd() as u32,
        newfd: target as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: the ioctl reads `addfd`, a valid seccomp_notif_addfd that outlives the call.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ADDFD as _,
            &addfd,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for thread `tid` (`PIDFD_THREAD`, Linux 6.9) or, where that flag is unknown, for its
/// process `tgid`.
pub fn pidfd_open_thread(tid: i32, tgid: impl FnOnce() -> Option<i32>) -> io::Result<OwnedFd> {
    let open = |pid: i32, flags: libc::c_uint| -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;
    match open(tid, PIDFD_THREAD) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(tgid().ok_or(e)?, 0),
        other => other,
    }
}

/// A copy of descriptor `fd` of the process behind `pidfd` (pidfd_getfd(2), Linux 5.6). Needs ptrace
/// access to that process.
pub fn pidfd_getfd(pidfd: std::os::fd::BorrowedFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptor numbers and flags, and returns a new descriptor or -1.
    let new = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, with close-on-exec set, that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new as RawFd) })
}

/// Reads `buf.len()` bytes at address `addr` of process (or thread) `pid` (process_vm_readv(2)).
/// Needs ptrace access to it; returns how many bytes were read.
pub fn read_process_memory(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, valid for writes for the whole call; the remote address is
    // only a number to this process, checked by the kernel against the other process's memory.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// An integer socket option (getsockopt(2)).
pub fn get_int_option(
    fd: std::os::fd::BorrowedFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes for the whole call, and `len` says the size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets an integer socket option (setsockopt(2)).
pub fn set_int_option(
    fd: std::os::fd::BorrowedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is valid for reads for the whole call, and the length says its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `data` with a copy of `fd`, if any, over a UNIX socket (SCM_RIGHTS).
/// `sock` is a descriptor number: sending on a number that is not the socket meant fails, and is
/// not unsafe (a forked child uses the number it inherited).
pub fn send_with_fd(
    sock: RawFd,
    data: &[u8],
    fd: Option<std::os::fd::BorrowedFd>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(data)];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Sends `data` with copies of `fds` (at most 16) over a UNIX socket (SCM_RIGHTS).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[std::os::fd::BorrowedFd]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(data)];
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives what [`send_with_fds`] sent: up to `buf.len()` bytes and up to 16 descriptors
/// (close-on-exec).
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    // Room for as many descriptors as one message can carry (SCM_MAX_FD): with less, the kernel
    // would still install the first ones, and nix, seeing MSG_CTRUNC, would give none of them
    // back, so each such message would leak descriptors into this process.
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel installed each received descriptor as new, owned by no one else.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Receives what [`send_with_fd`] sent: up to `buf.len()` bytes and the descriptor, if one came
/// (close-on-exec). `flags` as for recvmsg(2), such as MSG_DONTWAIT.
pub fn recv_with_fd(
    sock: std::os::fd::BorrowedFd,
    buf: &mut [u8],
    flags: nix::sys::socket::MsgFlags,
) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel installed each received descriptor as new, owned by no one else;
                // wrapping every one makes sure none leaks.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, fd))
}

/// A new socket (socket(2)) of the caller's network namespace, close-on-exec.
pub fn socket(domain: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes three integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Asks the kernel to wake the listener's reader on the CPU of the process it stopped, and that
/// process's thread as soon as the answer is sent (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux
/// 6.6): a stopped bind waits a few microseconds less, and is less likely to be interrupted.
pub fn notif_sync_wakeup(listener: std::os::fd::BorrowedFd) -> io::Result<()> {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: the ioctl reads a u64 of flags by value; no memory is passed.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked child: stdin and stdout on /dev/null, stderr on `stderr`, `keep` left open across
/// exec, every signal unblocked and SIGPIPE back to its default (Rust ignores it, and an ignored
/// signal stays ignored across exec), then exec `argv` (argv[0] is the program's path). Never
/// returns: exits 127 when exec fails.
pub fn exec_with_stdio(
    argv: &[std::ffi::CString],
    stderr: std::os::fd::BorrowedFd,
    keep: RawFd,
) -> ! {
    reset_signal_to_default(nix::sys::signal::Signal::SIGPIPE);
    let _ = nix::sys::signal::SigSet::all().thread_unblock();
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    );
    if let Ok(null) = null {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    let _ = nix::unistd::dup2(stderr.as_raw_fd(), 2);
    let _ = set_cloexec(keep, false);
    let _ = nix::unistd::execv(&argv[0], argv);
    exit_now(127)
}

/// The cookie of the network namespace a socket belongs to (SO_NETNS_COOKIE, Linux 5.14).
pub fn netns_cookie(fd: std::os::fd::BorrowedFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a u64 that outlives the call.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Gives the calling thread a descriptor table of its own (a copy of the process's), so that it may
/// place descriptors at numbers of its choice without touching the rest of lowport's.
pub fn unshare_files() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES).map_err(io::Error::from)
}

/// In a thread whose descriptor table is its own ([`unshare_files`]), closes every descriptor of that
/// table but 0 to 2 and `keep`: the copies that unsharing made of the rest of the process's
/// descriptors, which would keep their files open.
///
/// # Safety
///
/// The calling thread's table must be its own, and nothing the thread runs may own or use a
/// descriptor of it other than 0 to 2 and `keep`.
pub unsafe fn close_copies_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for next in keep.into_iter().map(Some).chain([None]) {
        let last = next.map_or(Some(u32::MAX), |fd| fd.checked_sub(1));
        if let Some(last) = last.filter(|&last| last >= first) {
            // SAFETY: close_range closes numbers of the calling thread's table, which the caller
            // guarantees is its own and holds nothing owned in that range.
            if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(fd) = next {
            first = fd.saturating_add(1);
        }
    }
    Ok(())
}

/// Closes this table's numbers of descriptors whose owners moved to a thread that has since made its
/// descriptor table its own ([`unshare_files`]), where they own their copies.
///
/// # Safety
///
/// Nothing in the calling thread's table may own or use `fds` any more: their owners live in the
/// other thread, and refer to that thread's table.
pub unsafe fn close_moved(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: closing a number is memory safe; the caller guarantees nothing here owns it.
        unsafe { libc::close(fd) };
    }
}

/// Registers `target` in the epoll instance `epoll` (a copy of the server's) under descriptor number
/// `number`, with the server's `events` and `data`: the registration then is the one the server would
/// have made with `epoll_ctl(ADD, number)`, so its later MOD and DEL calls find it. The calling
/// thread's descriptor table must be its own ([`unshare_files`]) and used by no other thread
/// meanwhile: a descriptor of its own at `number` is moved aside for the call and put back.
pub fn epoll_add_as(
    epoll: std::os::fd::BorrowedFd,
    target: std::os::fd::BorrowedFd,
    number: RawFd,
    events: u32,
    data: u64,
) -> io::Result<()> {
    if number < 0 || number == epoll.as_raw_fd() || number == target.as_raw_fd() {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    // SAFETY: F_GETFD on a number only reads the descriptor table.
    let occupant_flags = unsafe { libc::fcntl(number, libc::F_GETFD) };
    let saved = if occupant_flags >= 0 {
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor for the file at `number`, which stays open.
        let saved = unsafe { libc::fcntl(number, libc::F_DUPFD_CLOEXEC, 64.max(number + 1)) };
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        Some(saved)
    } else {
        None
    };
    // SAFETY: dup3 onto `number`, free or held by `saved` meanwhile, in this thread's own table.
    let result = if unsafe { libc::dup3(target.as_raw_fd(), number, libc::O_CLOEXEC) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: epoll_ctl reads `event`, a valid epoll_event that outlives the call.
        let ret =
            unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, number, &mut event) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    match saved {
        Some(saved) => {
            let cloexec = if occupant_flags & libc::FD_CLOEXEC != 0 {
                libc::O_CLOEXEC
            } else {
                0
            };
            // SAFETY: the occupant goes back to its number (replacing the copy of `target`, which
            // keeps its registration: that belongs to the file), and its spare copy is closed.
            unsafe {
                libc::dup3(saved, number, cloexec);
                libc::close(saved);
            }
        }
        // SAFETY: `number` holds only the copy made above, owned by nothing else.
        None => unsafe {
            libc::close(number);
        },
    }
    result
}

/// `connect(AF_UNSPEC)`: disconnects a socket (a TCP listener or connection goes back to the closed
/// state, keeping the port it was bound to).
pub fn disconnect(fd: std::os::fd::BorrowedFd) -> io::Result<()> {
    // SAFETY: sockaddr is plain old data; all zeroes is AF_UNSPEC.
    let addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    // SAFETY: connect reads `addr`, a valid sockaddr of the length given, that outlives the call.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `tcpi_state` of TCP_INFO: where a TCP socket is in its state machine.
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_CLOSE: u8 = 7;

/// The TCP state of a socket (the first byte of its TCP_INFO, which the kernel cuts to the length
/// asked for).
pub fn tcp_state(fd: std::os::fd::BorrowedFd) -> io::Result<u8> {
    let info = get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.to_ne_bytes()[0])
}

/// Sets or clears O_NONBLOCK on a socket with one call (FIONBIO).
pub fn set_nonblocking_flag(fd: std::os::fd::BorrowedFd, on: bool) -> io::Result<()> {
    let mut value: libc::c_int = on.into();
    // SAFETY: FIONBIO reads an int that outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut value) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child that `command` starts the leader of a session of its own (setsid(2)) and, with
/// `terminal` (a pty slave and which of descriptors 0, 1 and 2 it replaces), gives it that slave as
/// its controlling terminal and standard descriptors (see `instance::session`). The child unblocks
/// every signal: the parent blocks those it passes on, and std's spawn keeps the mask.
pub fn new_session_on_spawn(
    command: &mut std::process::Command,
    terminal: Option<(RawFd, [bool; 3])>,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure calls only sigemptyset, sigprocmask, setsid, ioctl
    // and dup2, which are async-signal-safe, on its own stack and its copies of two plain values.
    unsafe {
        command.pre_exec(move || {
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((slave, on)) = terminal {
                if libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                for (fd, replace) in on.iter().enumerate() {
                    if *replace && libc::dup2(slave, fd as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
}

/// The window size of terminal `fd` (TIOCGWINSZ).
pub fn window_size(fd: std::os::fd::BorrowedFd) -> io::Result<libc::winsize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Sets the window size of terminal `fd` (TIOCSWINSZ), which sends SIGWINCH to its foreground group.
pub fn set_window_size(fd: std::os::fd::BorrowedFd, size: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads a winsize from the struct, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

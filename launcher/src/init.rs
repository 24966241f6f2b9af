//! The command's process tree: a tiny pid-1 helper in a new pid namespace, and the command under it.
//!
//! Why a pid namespace: when the launcher dies, even by SIGKILL, everything the command started must
//! die too, nginx's workers included. The helper is pid 1 of its own pid namespace and carries
//! `PR_SET_PDEATHSIG(SIGKILL)`, so the launcher's death kills it, and the death of a namespace's pid 1
//! makes the kernel kill every other process in it (pid_namespaces(7)).
//!
//! Why a helper rather than the command as pid 1: the kernel delivers to a namespace's pid 1 only the
//! signals it has a handler for, so `sleep` as pid 1 would ignore the SIGTERM a user sends. The helper
//! waits for the forwarded signals with `sigwaitinfo` and passes each on to the command, reaps orphans,
//! and exits with the command's status (128 + N when signal N killed it), as tini and bubblewrap do.
//!
//! Why a mount namespace: the helper mounts a procfs of the new pid namespace over /proc, so `ps`,
//! `top`, pid files and `/proc/<getpid()>` inside speak of the command's own processes. Nothing else
//! of the host's filesystem changes, and nothing mounted inside propagates back. Where the kernel
//! refuses the procfs, the command runs with the host's /proc as before, and lowport says so.
//!
//! Start-up is reported over a close-on-exec pipe: the command writes its pid (as the host sees it)
//! before `execvp`, and the errno after a failed one; end-of-file means the exec happened.

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::sys::{self, CloneResult};

/// What to run inside the namespaces.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub argv: Vec<OsString>,
    /// The command's environment: the caller's own (see [`caller_environment`]).
    pub env: Vec<(OsString, OsString)>,
    /// Sockets to hand over with systemd's socket-activation protocol, with their names.
    pub activation: Vec<(RawFd, String)>,
    /// The caller's soft and hard RLIMIT_NOFILE, restored before exec: lowport raises its own soft
    /// limit for the relay, and `select()`-based programs break above 1024.
    pub nofile: Option<(u64, u64)>,
    /// The command's end of the socket over which it sends lowport the listener of its bind filter
    /// (socket handoff, see `handoff`); `None` when no port is handed off.
    pub handoff: Option<RawFd>,
    /// Descriptors 3 to 3+N-1 are passed on as they are (`--preserve-fds`).
    pub preserve_fds: u32,
}

/// `--preserve-fds N` of `run` and `exec`: what is wrong when one of descriptors 3 to 3+N-1 is not
/// open, or `None`.
pub fn preserved_not_open(n: u32) -> Option<String> {
    let last = 3 + i64::from(n) - 1;
    let fd = (3..=last).find(|&fd| !sys::fd_is_open(fd as RawFd))?;
    Some(format!(
        "--preserve-fds {n}: descriptor {fd} is not open; --preserve-fds passes on 3 to {last}, so open each in the calling shell (as in 3<file) or give a smaller N"
    ))
}

/// The variables of systemd's socket-activation protocol. Inherited from lowport's own parent they
/// describe lowport's descriptors, not the command's, so the command never sees them unless
/// `--socket-activation` sets its own.
const ACTIVATION_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The environment the caller gave lowport, for the command.
///
/// A binary with a file capability runs in glibc's secure mode, whose loader removes LD_LIBRARY_PATH,
/// TMPDIR, TZDIR, LOCPATH, GCONV_PATH, RES_OPTIONS and others from `environ` before `main`. The
/// command runs with no capability on the host, so it gets them back: the kernel keeps the original
/// strings, which /proc/self/environ reads. `original` is that file's content, read by a process that
/// may open it (see `userns::create_and_join`), or `None` outside secure mode.
pub fn caller_environment(original: Option<&[u8]>) -> Vec<(OsString, OsString)> {
    let vars: Vec<(OsString, OsString)> = match original {
        Some(bytes) if !bytes.is_empty() => bytes
            .split(|b| *b == 0)
            .filter_map(|entry| {
                let split = entry.iter().position(|b| *b == b'=')?;
                Some((
                    OsStr::from_bytes(&entry[..split]).to_owned(),
                    OsStr::from_bytes(&entry[split + 1..]).to_owned(),
                ))
            })
            .collect(),
        Some(_) => {
            tracing::warn!("cannot read the original environment; the command gets what glibc's secure mode left");
            std::env::vars_os().collect()
        }
        None => std::env::vars_os().collect(),
    };
    vars.into_iter()
        .filter(|(name, _)| !ACTIVATION_VARS.iter().any(|v| name == *v))
        .collect()
}

/// The running command, as the launcher sees it.
#[derive(Debug)]
pub struct Started {
    /// The pid-1 helper, the launcher's direct child.
    pub init: Pid,
    /// The command's pid as the host sees it (0 if /proc could not tell).
    pub child_pid: u32,
    /// The helper's pid and mount namespaces, for `lowport exec` (lowport cannot open them through
    /// /proc: the helper is not dumpable).
    pub namespaces: Namespaces,
    /// Kept open for the helper's lifetime check; closing it tells a helper that started late that
    /// the launcher is gone.
    _lifeline: OwnedFd,
}

/// The namespaces the helper made, as it sent them.
#[derive(Debug, Default)]
pub struct Namespaces {
    pub pid: Option<OwnedFd>,
    pub mnt: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot start the command's process: {0}")]
    Spawn(#[source] io::Error),
    #[error("cannot start the command's process: {0} (the limit on this user's processes and threads, ulimit -u, is reached: raise it, or stop some of this user's processes)")]
    ProcessLimit(#[source] io::Error),
    #[error("{program}: command not found (check the name and PATH, or give a full path)")]
    NotFound { program: String },
    #[error(
        "cannot run {program}: {source} (is it an executable file, and may the caller run it?)"
    )]
    NotExecutable {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program}: the interpreter on its #! line, or the dynamic loader it needs, does not exist")]
    Interpreter { program: String },
    #[error("cannot run {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the seccomp filter that keeps the command from typing into the terminal: {0} (does this kernel have CONFIG_SECCOMP_FILTER?)")]
    Filter(#[source] io::Error),
    #[error("cannot keep the descriptors the caller left open from the command: {0} (neither close_range(2) nor /proc/self/fd could be used)")]
    Descriptors(#[source] io::Error),
    #[error("{0:?} contains a NUL byte")]
    Nul(OsString),
}

impl InitError {
    /// A failed fork or clone, with the process limit named when that is the cause.
    fn spawn(err: io::Error) -> InitError {
        if err.raw_os_error() == Some(libc::EAGAIN) {
            InitError::ProcessLimit(err)
        } else {
            InitError::Spawn(err)
        }
    }

    /// The shell's convention: 127 for a command that is not there, 126 for one that cannot run.
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::NotFound { .. } => 127,
            InitError::NotExecutable { .. } | InitError::Interpreter { .. } => 126,
            _ => 125,
        }
    }

    fn from_exec_errno(program: &OsStr, errno: i32) -> InitError {
        let program = if program.is_empty() {
            "''".to_owned()
        } else {
            program.to_string_lossy().into_owned()
        };
        let source = io::Error::from_raw_os_error(errno);
        match errno {
            libc::ENOENT => InitError::NotFound { program },
            libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM => {
                InitError::NotExecutable { program, source }
            }
            _ => InitError::Exec { program, source },
        }
    }
}

/// Looks the program up the way `execvp` will, so a missing command is reported before anything is
/// set up. Returns the errno `execvp` would most likely fail with.
pub fn precheck(program: &OsStr) -> Result<(), InitError> {
    let bytes = program.as_bytes();
    if bytes.is_empty() {
        return Err(InitError::from_exec_errno(program, libc::ENOENT));
    }
    // A path that cannot be looked at (missing, or under a directory the caller may not search) does
    // not hold the command; one that exists but cannot be run explains why.
    let check = |path: &std::path::Path| -> Result<(), i32> {
        match std::fs::metadata(path) {
            Err(_) => Err(libc::ENOENT),
            Ok(m) if m.is_dir() => Err(libc::EISDIR),
            Ok(_) => {
                let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::ENOENT)?;
                nix::unistd::access(c.as_c_str(), nix::unistd::AccessFlags::X_OK)
                    .map_err(|e| e as i32)
            }
        }
    };
    let result = if bytes.contains(&b'/') {
        check(std::path::Path::new(program))
    } else {
        // Without PATH, glibc's execvp searches /bin:/usr/bin (its confstr(_CS_PATH)); look where it will.
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
        let mut first_error = libc::ENOENT;
        let mut found = false;
        for dir in std::env::split_paths(&path) {
            match check(&dir.join(program)) {
                Ok(()) => {
                    found = true;
                    break;
                }
                Err(libc::ENOENT) => {}
                Err(e) if first_error == libc::ENOENT => first_error = e,
                Err(_) => {}
            }
        }
        if found {
            Ok(())
        } else {
            Err(first_error)
        }
    };
    result.map_err(|errno| InitError::from_exec_errno(program, errno))
}

const MSG_PID: u8 = b'P';
const MSG_EXEC_FAILED: u8 = b'E';
const MSG_FORK_FAILED: u8 = b'F';
const MSG_FILTER_FAILED: u8 = b'S';
const MSG_DESCRIPTORS_FAILED: u8 = b'D';

/// Starts the pid-1 helper and the command under it.
///
/// The caller must be single-threaded and must already block `forward` (the signals to pass on), so
/// the helper inherits them blocked. `close_in_helper` lists the launcher's own descriptors that the
/// helper must not keep open (host sockets, `--ready-fd`).
pub fn start(
    command: &CommandSpec,
    forward: &SigSet,
    close_in_helper: &[RawFd],
) -> Result<Started, InitError> {
    let argv = command
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| InitError::Nul(a.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let program = command.argv[0].clone();
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (status_r, status_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| InitError::Spawn(e.into()))?;
    let (lifeline_r, lifeline_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| InitError::Spawn(e.into()))?;

    // The helper sends its namespaces, and whether it could mount the private /proc, over this pair.
    let (ns_ours, ns_theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| InitError::Spawn(e.into()))?;

    // A mount namespace needs CAP_SYS_ADMIN in the user namespace lowport made, which it has here;
    // should a kernel still refuse, the command runs as before, without a private /proc.
    let mut has_mnt = true;
    let cloned = match sys::clone_into_new_pid_namespace(true) {
        Err(err) if matches!(err.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => {
            tracing::warn!(%err, "cannot make a mount namespace for the command; it sees the host's /proc (ps lists every host process)");
            has_mnt = false;
            sys::clone_into_new_pid_namespace(false)
        }
        other => other,
    };
    match cloned.map_err(InitError::spawn)? {
        CloneResult::Child => {
            drop(status_r);
            drop(lifeline_w);
            drop(ns_ours);
            let code = helper_main(
                &argv,
                command,
                forward,
                close_in_helper,
                lifeline_r,
                status_w,
                (ns_theirs, has_mnt),
            );
            sys::exit_now(code)
        }
        CloneResult::Parent(init) => {
            drop(status_w);
            drop(lifeline_r);
            drop(ns_theirs);
            let mut report = Vec::new();
            let read = std::fs::File::from(status_r).read_to_end(&mut report);
            let started = Started {
                init,
                child_pid: 0,
                namespaces: receive_namespaces(&ns_ours),
                _lifeline: lifeline_w,
            };
            read.map_err(InitError::Spawn)?;
            parse_report(&report, &program, started)
        }
    }
}

/// What [`send_namespaces`] sent; the helper sent it before forking the command, so it is there by
/// the time the command's start has been reported.
fn receive_namespaces(sock: &OwnedFd) -> Namespaces {
    let mut buf = [0u8; 8];
    match sys::recv_with_fds(sock.as_fd(), &mut buf) {
        Ok((8, fds)) => {
            let mounted = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let has_mnt = buf[4] == 1;
            // Without a mount namespace, `start` has said so already.
            if mounted != 0 && has_mnt {
                let err = io::Error::from_raw_os_error(mounted);
                tracing::warn!(
                    %err,
                    "the kernel refused a private /proc for the command (as it does where the host's /proc has parts hidden under other mounts, in some containers); it sees the host's /proc, so ps inside lists every host process and pid files hold pids the host does not know"
                );
            }
            let mut fds = fds.into_iter();
            let pid = fds.next();
            let mnt = if has_mnt { fds.next() } else { None };
            Namespaces { pid, mnt }
        }
        other => {
            tracing::debug!(?other, "no namespaces from the pid-1 helper");
            Namespaces::default()
        }
    }
}

/// The helper's side of [`receive_namespaces`]: the errno of the private /proc's mount (0 when it is
/// mounted), whether a mount namespace was made, and the pid and mount namespaces.
fn send_namespaces(sock: &OwnedFd, mounted: i32, has_mnt: bool) {
    let open = |path: &str| std::fs::File::open(path).ok().map(OwnedFd::from);
    let pid = open("/proc/self/ns/pid");
    let mnt = if has_mnt {
        open("/proc/self/ns/mnt")
    } else {
        None
    };
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&mounted.to_ne_bytes());
    msg[4] = u8::from(mnt.is_some());
    let fds: Vec<_> = pid.iter().chain(mnt.iter()).map(|f| f.as_fd()).collect();
    let _ = sys::send_with_fds(sock.as_raw_fd(), &msg, &fds);
}

fn parse_report(
    report: &[u8],
    program: &OsStr,
    mut started: Started,
) -> Result<Started, InitError> {
    let mut rest = report;
    while let [tag, a, b, c, d, tail @ ..] = rest {
        let value = i32::from_ne_bytes([*a, *b, *c, *d]);
        match *tag {
            MSG_PID => started.child_pid = value as u32,
            MSG_FILTER_FAILED => {
                let _ = waitpid(started.init, None);
                return Err(InitError::Filter(io::Error::from_raw_os_error(value)));
            }
            MSG_DESCRIPTORS_FAILED => {
                let _ = waitpid(started.init, None);
                return Err(InitError::Descriptors(io::Error::from_raw_os_error(value)));
            }
            MSG_EXEC_FAILED | MSG_FORK_FAILED => {
                // The helper exits right after the command does; reap it so nothing is left.
                let _ = waitpid(started.init, None);
                return Err(if *tag == MSG_EXEC_FAILED && value == libc::ENOENT {
                    // `precheck` found the file, so what is missing is what it needs to start.
                    InitError::Interpreter {
                        program: program.to_string_lossy().into_owned(),
                    }
                } else if *tag == MSG_EXEC_FAILED {
                    InitError::from_exec_errno(program, value)
                } else {
                    InitError::spawn(io::Error::from_raw_os_error(value))
                });
            }
            _ => break,
        }
        rest = tail;
    }
    Ok(started)
}

fn send(pipe: &OwnedFd, tag: u8, value: i32) {
    let mut msg = [0u8; 5];
    msg[0] = tag;
    msg[1..].copy_from_slice(&value.to_ne_bytes());
    let _ = nix::unistd::write(pipe.as_fd(), &msg);
}

/// pid 1 of the new pid namespace. Runs in a cloned copy of the single-threaded launcher.
fn helper_main(
    argv: &[CString],
    command: &CommandSpec,
    forward: &SigSet,
    close: &[RawFd],
    lifeline: OwnedFd,
    status: OwnedFd,
    (namespaces, has_mnt): (OwnedFd, bool),
) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        return 125;
    }
    // The launcher may have died between clone and prctl; its end of the lifeline is then closed.
    let mut fds = [nix::poll::PollFd::new(
        lifeline.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        return 125;
    }
    drop(lifeline);
    // The command needs these; the helper closes its copies once the command is forked. A number
    // in `close` may name a descriptor the launcher closed since, whose number the status pipe or
    // the namespace socket took: those stay open.
    let mut activation: Vec<RawFd> = command.activation.iter().map(|(fd, _)| *fd).collect();
    activation.extend(command.handoff);
    let own = [status.as_raw_fd(), namespaces.as_raw_fd()];
    for fd in close
        .iter()
        .filter(|fd| !activation.contains(fd) && !own.contains(fd))
    {
        // SAFETY: the helper never returns to the launcher's code that owns these descriptors; it
        // ends with exit_now.
        unsafe { sys::close_raw(*fd) };
    }
    // Opened only now, so that no number closed above can be its own.
    // The host's /proc, which the command's side reads its host pid from once the private one hides it.
    let host_proc = nix::fcntl::open(
        "/proc",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
    // SAFETY: open returned this descriptor, and nothing else owns it.
    .map(|fd| unsafe { sys::own_raw(fd) });
    let mounted = if has_mnt {
        match sys::mount_private_proc() {
            Ok(()) => 0,
            Err(err) => err.raw_os_error().unwrap_or(libc::EPERM),
        }
    } else {
        libc::EPERM
    };
    send_namespaces(&namespaces, mounted, has_mnt);
    drop(namespaces);

    let mut waited = *forward;
    waited.add(Signal::SIGCHLD);
    let _ = waited.thread_block();

    let child = match sys::fork() {
        Ok(ForkResult::Child) => exec_command(argv, command, &status, host_proc.as_ref()),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            send(
                &status,
                MSG_FORK_FAILED,
                e.raw_os_error().unwrap_or(libc::EAGAIN),
            );
            return 125;
        }
    };
    drop(status);
    for fd in &activation {
        // SAFETY: as above; the command has its own copies now.
        unsafe { sys::close_raw(*fd) };
    }
    // Reaping needs no capability. Passing signals on needs CAP_KILL, in this namespace only: a
    // command that switched to another uid (lighttpd's server.username, dnsmasq, haproxy) no longer
    // shares the helper's uid 0. The helper keeps nothing else, and it is not dumpable, so the command
    // cannot take it over to use the capability (ptrace and /proc/PID/mem need CAP_SYS_PTRACE in the
    // user namespace the launcher was exec'd in, the host's).
    let _ = crate::capabilities::drop_bounding().and_then(|()| {
        crate::capabilities::drop_all_except(&[crate::capabilities::Capability::CAP_KILL])
    });

    // A signal the terminal generated (SI_KERNEL: Ctrl-C, a resize) reached this helper because it is
    // in the launcher's process group; the launcher has decided for itself whether the command needs
    // a copy (it did not when the command shares the group and got the original) and sends it as
    // SI_USER. Passing this one on too would make, say, Python raise KeyboardInterrupt twice.
    loop {
        let Ok((sig, code)) = sys::wait_for_signal(&waited) else {
            return 125;
        };
        if sig == libc::SIGCHLD {
            if let Some(exit) = reap(child) {
                if let Exit::Exited(_) = exit {
                    warn_if_left_behind();
                }
                return exit.code();
            }
        } else if code == libc::SI_KERNEL {
            continue;
        } else if let Ok(sig) = Signal::try_from(sig) {
            match nix::sys::signal::kill(child, sig) {
                // The command is exiting; its SIGCHLD is on its way.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(err) => tracing::warn!(
                    ?sig,
                    ?err,
                    "cannot pass the signal to the command; it keeps running"
                ),
            }
        }
    }
}

/// How the command ended.
enum Exit {
    Exited(i32),
    Signaled(i32),
}

impl Exit {
    /// The status lowport exits with: the command's own, or 128 + N for signal N.
    fn code(&self) -> i32 {
        match *self {
            Exit::Exited(code) => code,
            Exit::Signaled(sig) => 128 + sig,
        }
    }
}

/// A command that daemonized (forked and exited) leaves its real server behind as an orphan of this
/// helper; the helper's exit stops it, and the user should know why their server is gone.
fn warn_if_left_behind() {
    let left = descendants_of_self();
    if left > 0 {
        tracing::warn!(
            "the command exited and left {left} {}, which {} stopped; run it in the foreground (for example nginx -g 'daemon off;', or your server's --foreground or --no-daemon option)",
            if left == 1 { "process" } else { "processes" },
            if left == 1 { "was" } else { "were" }
        );
    }
}

/// Counts this process's living descendants through /proc/PID/task/TID/children (the pids of whichever
/// procfs /proc is, the private one or the host's: a process always may read its own).
fn descendants_of_self() -> usize {
    let children = |pid: &str| -> Vec<String> {
        let mut found = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return found;
        };
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                found.extend(list.split_whitespace().map(str::to_owned));
            }
        }
        found
    };
    let mut queue = children("self");
    let mut count = 0;
    while let Some(pid) = queue.pop() {
        count += 1;
        queue.extend(children(&pid));
    }
    count
}

/// Reaps every exited child; returns how the command ended once it has.
fn reap(command: Pid) -> Option<Exit> {
    let mut ended = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => ended = Some(Exit::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                ended = Some(Exit::Signaled(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return ended,
            Ok(_) => {}
        }
    }
}

/// The command's side of the fork: a clean signal state, the caller's open-file limit and
/// environment, the activation sockets, then exec.
fn exec_command(
    argv: &[CString],
    command: &CommandSpec,
    status: &OwnedFd,
    host_proc: Option<&OwnedFd>,
) -> ! {
    let link = match host_proc {
        Some(dir) => sys::readlink_at(dir.as_fd(), "self").map(std::path::PathBuf::from),
        None => std::fs::read_link("/proc/self"),
    };
    let host_pid = link
        .ok()
        .and_then(|p| p.to_str()?.parse::<i32>().ok())
        .unwrap_or(0);
    send(status, MSG_PID, host_pid);

    sys::reset_signal_to_default(Signal::SIGPIPE);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let Some((soft, hard)) = command.nofile {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard);
    }
    // The command shares the terminal and, started from a script, the script's process group: keep it
    // from typing into the user's shell (TIOCSTI) and from signalling the group with kill(0, ...).
    // Without a terminal there is no job control to keep, so it gets a session of its own; with one,
    // it stays in lowport's foreground group, so Ctrl-C and job control work as without lowport.
    if !nix::unistd::isatty(0).unwrap_or(false) {
        let _ = nix::unistd::setsid();
    }
    if let Err(e) = install_filter(command.handoff) {
        send(
            status,
            MSG_FILTER_FAILED,
            e.raw_os_error().unwrap_or(libc::EINVAL),
        );
        sys::exit_now(125);
    }

    let mut env = command.env.clone();
    if !command.activation.is_empty() {
        match pass_listen_fds(&command.activation) {
            Ok(vars) => env.extend(vars),
            Err(e) => {
                send(
                    status,
                    MSG_EXEC_FAILED,
                    e.raw_os_error().unwrap_or(libc::EBADF),
                );
                sys::exit_now(125);
            }
        }
    }
    let envp: Vec<CString> = env
        .iter()
        .filter_map(|(name, value)| {
            let mut entry = name.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).ok()
        })
        .collect();

    // Nothing else from 3 up reaches the command: not a descriptor the caller left open without
    // close-on-exec, which a hostile server could otherwise use to reach the caller's world.
    let passed = command.activation.len().max(command.preserve_fds as usize);
    if let Err(e) = sys::cloexec_from(3 + passed as RawFd) {
        send(
            status,
            MSG_DESCRIPTORS_FAILED,
            e.raw_os_error().unwrap_or(libc::EBADF),
        );
        sys::exit_now(125);
    }
    let err = nix::unistd::execvpe(&argv[0], argv, &envp).unwrap_err();
    send(status, MSG_EXEC_FAILED, err as i32);
    sys::exit_now(if err == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    })
}

/// Installs the command's seccomp filter (see [`sys::install_command_filter`]). With `handoff`, the
/// filter also stops the command's binds, and its listener goes to lowport over that socket, with a
/// zero; where the kernel refuses a listener (EBUSY: the command already runs under one, as inside
/// another lowport; EINVAL: too old), the errno goes instead, and the terminal filter alone is installed.
/// The command's copies of the listener and of the socket are closed before exec.
fn install_filter(handoff: Option<RawFd>) -> io::Result<()> {
    // The command's end of the socket pair lowport made for this, close-on-exec.
    let Some(sock) = handoff else {
        return sys::install_command_filter(sys::FilterKind::Terminal).map(drop);
    };
    match sys::install_command_filter(sys::FilterKind::TerminalAndBind) {
        Ok(listener) => {
            let listener = listener.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            sys::send_with_fd(sock, &0i32.to_ne_bytes(), Some(listener.as_fd()))
        }
        Err(refused) => {
            let errno = refused.raw_os_error().unwrap_or(libc::EINVAL);
            sys::send_with_fd(sock, &errno.to_ne_bytes(), None)?;
            sys::install_command_filter(sys::FilterKind::Terminal).map(drop)
        }
    }
}

/// Receives what [`install_filter`] sent: `Ok(Ok(listener))`, or `Ok(Err(refusal))` with the error
/// the kernel refused a listener with (the command then runs without one). `Err` when the message
/// itself was lost: the command may then hold a filter whose listener is gone, and every bind it
/// stops would fail with ENOSYS, so the caller must not let it run.
pub fn receive_listener(sock: &OwnedFd) -> io::Result<Result<OwnedFd, io::Error>> {
    let mut buf = [0u8; 4];
    let (n, fd) = sys::recv_with_fd(
        sock.as_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )?;
    let code = i32::from_ne_bytes(buf);
    match (n, fd) {
        (4, Some(fd)) if code == 0 => Ok(Ok(fd)),
        (4, None) if code != 0 => Ok(Err(io::Error::from_raw_os_error(code))),
        _ => Err(io::Error::other(
            "the command's message about its listener was cut short",
        )),
    }
}

/// systemd's protocol (sd_listen_fds(3)): descriptors from 3, and the LISTEN_FDS, LISTEN_PID and
/// LISTEN_FDNAMES variables this returns.
fn pass_listen_fds(fds: &[(RawFd, String)]) -> io::Result<Vec<(OsString, OsString)>> {
    // Move every socket above the target range first, so dup2 never overwrites one not yet moved.
    let high = fds
        .iter()
        .map(|(fd, _)| sys::dup_at_least(*fd, 3 + fds.len() as RawFd))
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    for (i, fd) in high.iter().enumerate() {
        // systemd passes listening sockets in blocking mode (sd_listen_fds(3)), and servers written
        // for it accept without asking; lowport's are non-blocking. The flag belongs to the open file
        // description, shared with lowport's copies, which lowport never uses in this mode.
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the command's side of the fork, about to exec: whatever owned the numbers from 3
        // is never used again.
        unsafe { sys::dup_to(fd.as_raw_fd(), 3 + i as RawFd)? };
    }
    drop(high);
    let names: Vec<&str> = fds.iter().map(|(_, n)| n.as_str()).collect();
    let _ = io::stderr().flush();
    Ok(vec![
        ("LISTEN_FDS".into(), fds.len().to_string().into()),
        ("LISTEN_PID".into(), std::process::id().to_string().into()),
        ("LISTEN_FDNAMES".into(), names.join(":").into()),
    ])
}

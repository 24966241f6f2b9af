//! One launch, from validated arguments to the command's exit status, in the order the kernel demands.
//!
//! 1. Check what can be checked (the command exists, the id plan, `--ready-fd`) before touching anything.
//! 2. Bind the host sockets; then drop every capability the binary may carry.
//! 3. Block the signals that will be forwarded, fork the id-mapping helper when subordinate ids are used.
//! 4. `unshare(CLONE_NEWUSER | CLONE_NEWNET)` and write the id maps.
//! 5. Inside: `lo` up and `ip_unprivileged_port_start`.
//! 6. Start the pid-1 helper in a new pid namespace and the command under it (`init`).
//! 7. Drop the namespace's capabilities too, start the tokio runtime, forward, report readiness, wait.
//!
//! Steps 1 to 6 run with one thread: `unshare(CLONE_NEWUSER)` refuses multi-threaded callers, and the
//! forks must not copy a lock that another thread holds.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::capabilities::{self, CapsError};
use crate::forward::{self, Target};
use crate::host::{self, BindError, Bound, HostSocket};
use crate::init::{self, CommandSpec, InitError, Started};
use crate::netns::{self, NetnsError};
use crate::publish::PublishSpec;
use crate::sys;
use crate::udp;
use crate::userns::{self, MapHelper, Plan, UsernsError};

/// Everything `lowport run` was asked to do.
#[derive(Clone, Debug)]
pub struct Config {
    pub publish: Vec<PublishSpec>,
    pub userns: userns::Mode,
    pub port_start: u16,
    pub ready_fd: Option<RawFd>,
    /// The most relayed TCP connections at once; `None` sizes it to the open-file limit.
    pub max_connections: Option<usize>,
    /// Relay from each client's own address, so the server sees who connects.
    pub preserve_source: bool,
    /// Hand the host sockets to the command (systemd's LISTEN_FDS) instead of relaying.
    pub socket_activation: bool,
    /// How long a UDP flow lives without a datagram in either direction.
    pub udp_timeout: std::time::Duration,
    pub command: Vec<OsString>,
}

/// The signals a user may send to lowport that the command receives.
pub const FORWARDED_SIGNALS: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Userns(#[from] UsernsError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LaunchError {
    /// 2 for bad usage, 127/126 for a command that is missing or cannot run, 125 for any other failure
    /// of lowport itself (the child's own statuses are returned as `Ok` by [`run`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Usage(_) => 2,
            LaunchError::Init(e) => e.exit_code(),
            _ => 125,
        }
    }

    fn io(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
        move |source| LaunchError::Io { what, source }
    }
}

/// Runs the command as described by `config` and returns the status lowport should exit with: the
/// command's own, or 128 + N when signal N killed it.
pub fn run(config: Config) -> Result<i32, LaunchError> {
    let proc_sys = PathBuf::from("/proc/sys");

    // 1. Validate.
    let program = config.command.first().ok_or_else(|| {
        LaunchError::Usage(
            "no command given; usage: lowport run [OPTIONS] -- COMMAND [ARGS]...".into(),
        )
    })?;
    if let Some(fd) = config.ready_fd {
        if fd <= 2 {
            return Err(LaunchError::Usage(format!(
                "--ready-fd {fd}: descriptors 0, 1 and 2 are the command's stdin, stdout and stderr; use 3 or above (as in --ready-fd 3 3>ready.json)"
            )));
        }
        if !sys::fd_is_open(fd) {
            return Err(LaunchError::Usage(format!(
                "--ready-fd {fd}: descriptor {fd} is not open (open it in the calling shell, as in {fd}>ready.json, or pass a pipe)"
            )));
        }
        // The command must not hold the reader's pipe open: a reader waiting for end-of-file would
        // wait for the whole run.
        sys::set_cloexec(fd, true).map_err(LaunchError::io("mark --ready-fd close-on-exec"))?;
    }
    init::precheck(program)?;
    // The kernel lets a process map only its effective ids into the namespace it creates.
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let plan = userns::plan(config.userns, uid, gid, &userns::Environment::default())?;
    debug!(?plan, "id mapping");
    let nofile = sys::raise_nofile_limit().unwrap_or_else(|err| {
        debug!(?err, "cannot raise the open-file limit");
        1024
    });
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| default_max_connections(nofile));
    debug!(max_connections, nofile, "connection limit");

    // 2. Host sockets, then no capability on the host.
    let sockets = host::bind_all(&config.publish, &proc_sys)?;
    let creator_keeps = (uid == 0).then_some(capabilities::Capability::CAP_SETFCAP);
    capabilities::drop_all_except(creator_keeps)?;
    // A binary with a file capability starts non-dumpable, which makes /proc/self/uid_map unwritable
    // for its own user; with the capabilities gone there is nothing left to protect.
    if !nix::sys::prctl::get_dumpable().unwrap_or(true) {
        nix::sys::prctl::set_dumpable(true)
            .map_err(|e| LaunchError::io("make the process dumpable")(e.into()))?;
    }

    // 3. Signals stay pending until the runtime reads them from a signalfd.
    let mut forwarded = SigSet::empty();
    for sig in FORWARDED_SIGNALS {
        forwarded.add(sig);
    }
    forwarded
        .thread_block()
        .map_err(|e| LaunchError::io("block signals")(e.into()))?;
    let helper = match &plan {
        Plan::Subids(p) => Some(MapHelper::spawn(p)?),
        Plan::Single { .. } => None,
    };

    // 4. The namespaces.
    if let Err(errno) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET) {
        drop(helper);
        return Err(userns::diagnose_unshare(errno, &proc_sys).into());
    }
    match (&plan, helper) {
        (Plan::Single { uid, gid }, _) => {
            userns::write_single_maps("/proc/self".as_ref(), &proc_sys, *uid, *gid)?
        }
        (Plan::Subids(_), Some(helper)) => helper.map()?,
        (Plan::Subids(_), None) => unreachable!("the helper is forked for every subids plan"),
    }

    // 5. Inside the network namespace.
    netns::loopback_up()?;
    netns::set_unprivileged_port_start(&proc_sys, config.port_start)?;
    let relaying = !config.socket_activation && !sockets.is_empty();
    if relaying && config.preserve_source {
        netns::route_replies_to_clients()?;
    }

    // 6. The command.
    let mut close_in_helper: Vec<RawFd> = sockets.iter().map(|s| s.socket.as_raw_fd()).collect();
    close_in_helper.extend(config.ready_fd);
    let activation = if config.socket_activation {
        sockets
            .iter()
            .map(|s| {
                (
                    s.socket.as_raw_fd(),
                    format!("{}-{}", s.spec.protocol, s.spec.port),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let command = CommandSpec {
        argv: config.command.clone(),
        activation,
    };
    let started = init::start(&command, &forwarded, &close_in_helper)?;
    debug!(init = %started.init, child = started.child_pid, "command started");

    let signals = SignalFd::with_flags(&forwarded, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| LaunchError::io("read signals")(e.into()))?;
    forward_pending(&signals, started.init, started.child_pid);

    // 7. Nothing from here on needs a capability, in any namespace.
    capabilities::drop_bounding()?;
    capabilities::drop_all()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(relay_threads(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ))
        .thread_name("lowport")
        .enable_all()
        .build()
        .map_err(LaunchError::io("start the runtime"))?;
    let status = runtime.block_on(supervise(
        config,
        max_connections,
        sockets,
        started,
        signals,
    ))?;
    runtime.shutdown_background();
    Ok(status)
}

async fn supervise(
    config: Config,
    max_connections: usize,
    sockets: Vec<HostSocket>,
    started: Started,
    signals: SignalFd,
) -> Result<i32, LaunchError> {
    let limit = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut bound = Vec::new();
    for socket in sockets {
        bound.push((socket.spec.clone(), socket.addr));
        if config.socket_activation {
            // The command owns its copies now; lowport's copies only have to outlive the readiness
            // report, and closing them early would change nothing for the command.
            continue;
        }
        let target = Target {
            port: socket.spec.port,
            preserve_source: config.preserve_source,
        };
        match socket.socket {
            Bound::Tcp(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(LaunchError::io("register a host socket"))?;
                tokio::spawn(forward::serve(
                    listener,
                    target,
                    limit.clone(),
                    std::future::pending(),
                ));
            }
            Bound::Udp(socket) => {
                let socket = tokio::net::UdpSocket::from_std(socket)
                    .map_err(LaunchError::io("register a host socket"))?;
                tokio::spawn(udp::serve(
                    socket,
                    target,
                    config.udp_timeout,
                    std::future::pending(),
                ));
            }
        }
    }

    let signals = sys::register_signalfd(signals).map_err(LaunchError::io("read signals"))?;
    let init_pid = started.init;
    let child_pid = started.child_pid;
    tokio::spawn(forward_signals(signals, init_pid, child_pid));

    let waiter = tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(init_pid, None));

    if let Some(fd) = config.ready_fd {
        report_ready(fd, child_pid, &bound);
    }

    let status = waiter
        .await
        .map_err(|e| LaunchError::io("wait for the command")(io::Error::other(e)))?
        .map_err(|e| LaunchError::io("wait for the command")(e.into()))?;
    drop(started);
    Ok(match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        other => {
            warn!(?other, "unexpected wait status");
            125
        }
    })
}

/// The relay shares the machine with the server it serves and, in benchmarks and on laptops, with the
/// clients: half the CPUs, at most four. With two CPUs one relay thread did as well as two on
/// keep-alive requests and better on a single bulk stream, which two threads bounce between CPUs
/// (docs/benchmarks.md).
pub fn relay_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 4)
}

/// Each relayed connection holds two sockets and, while bytes flow, two pipes (four descriptors): the
/// default keeps six per connection within the open-file limit, with room for lowport's own, and stops
/// at 16384.
pub fn default_max_connections(nofile: u64) -> usize {
    (nofile.saturating_sub(64) / 6).clamp(16, 16384) as usize
}

/// Passes each forwarded signal to the pid-1 helper, for as long as lowport runs.
async fn forward_signals(signals: AsyncFd<SignalFd>, init: nix::unistd::Pid, child: u32) {
    loop {
        let Ok(mut guard) = signals.readable().await else {
            return;
        };
        // Read until the queue is empty: only a WouldBlock clears the readiness, which is what makes
        // the next `readable()` wait.
        loop {
            match guard.try_io(|fd| read_one(fd.get_ref())) {
                Ok(Ok(info)) => forward_signal(&info, init, child, true),
                Ok(Err(err)) => {
                    warn!(
                        ?err,
                        "cannot read a signal; signals are no longer forwarded"
                    );
                    return;
                }
                Err(_would_block) => break,
            }
        }
    }
}

fn read_one(fd: &SignalFd) -> io::Result<nix::sys::signalfd::siginfo> {
    match fd.read_signal() {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
        Err(err) => Err(err.into()),
    }
}

/// Forwards signals that arrived while the command was being set up. Until the command existed, a
/// terminal's Ctrl-C could not reach it, so these are forwarded whatever their source.
fn forward_pending(signals: &SignalFd, init: nix::unistd::Pid, child: u32) {
    while let Ok(info) = read_one(signals) {
        forward_signal(&info, init, child, false);
    }
}

/// Passes one signal to the pid-1 helper, which passes it to the command.
///
/// A signal that the terminal generated (Ctrl-C, a resize, a hang-up) went to the whole foreground
/// process group; when the command is in lowport's group it has already received it, and a second
/// copy would make, say, Python raise KeyboardInterrupt twice. `dedup` is false for signals that
/// arrived before the command existed.
fn forward_signal(
    info: &nix::sys::signalfd::siginfo,
    init: nix::unistd::Pid,
    child: u32,
    dedup: bool,
) {
    let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
        return;
    };
    if dedup && info.ssi_code == libc::SI_KERNEL && child != 0 {
        let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(child as i32)));
        if group.ok() == Some(nix::unistd::getpgrp()) {
            debug!(?sig, "terminal signal already reached the command");
            return;
        }
    }
    debug!(?sig, "forwarding");
    let _ = nix::sys::signal::kill(init, sig);
}

#[derive(serde::Serialize)]
struct Ready {
    pid: u32,
    ports: Vec<ReadyPort>,
}

#[derive(serde::Serialize)]
struct ReadyPort {
    protocol: String,
    host_ip: String,
    host_port: u16,
    port: u16,
}

/// Writes the one JSON line of `--ready-fd` and closes the descriptor, so a reader sees end-of-file.
fn report_ready(fd: RawFd, pid: u32, bound: &[(PublishSpec, SocketAddr)]) {
    let ports = bound
        .iter()
        .map(|(spec, addr)| ReadyPort {
            protocol: spec.protocol.to_string(),
            host_ip: addr.ip().to_string(),
            host_port: addr.port(),
            port: spec.port,
        })
        .collect();
    let mut line = serde_json::to_string(&Ready { pid, ports }).unwrap_or_default();
    line.push('\n');
    // lowport checked at start that the descriptor is open, and nothing else in it uses the number.
    let mut file = std::fs::File::from(sys::own_raw(fd));
    if let Err(err) = file.write_all(line.as_bytes()) {
        warn!(?err, fd, "cannot write the readiness report");
    }
}

#[cfg(test)]
mod tests {
    use super::default_max_connections;

    #[test]
    fn relay_threads_take_half_the_cpus() {
        assert_eq!(super::relay_threads(1), 1);
        assert_eq!(super::relay_threads(2), 1);
        assert_eq!(super::relay_threads(8), 4);
        assert_eq!(super::relay_threads(64), 4);
    }

    #[test]
    fn connection_limit_follows_the_open_file_limit() {
        assert_eq!(default_max_connections(1024), 160);
        assert_eq!(default_max_connections(1 << 20), 16384);
        assert_eq!(default_max_connections(40), 16);
    }
}

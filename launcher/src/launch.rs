//! One launch, from validated arguments to the command's exit status, in the order the kernel demands.
//!
//! 1. Check what can be checked (the command exists, the id plan, `--ready-fd`) before touching anything.
//! 2. Bind the host sockets; then drop every capability the binary may carry.
//! 3. Block the signals that will be forwarded, fork the id-mapping helper when subordinate ids are used.
//! 4. `unshare(CLONE_NEWUSER | CLONE_NEWNET)` and write the id maps.
//! 5. Inside: `lo` up and `ip_unprivileged_port_start`.
//! 6. Start the pid-1 helper in a new pid namespace and the command under it (`init`).
//! 7. Drop the namespace's capabilities too, start the tokio runtime, forward, wait until the server
//!    accepts on every published port (`ready`) and report it (`--ready-fd`, systemd's `notify`),
//!    wait.
//!
//! Steps 1 to 6 run with one thread: `unshare(CLONE_NEWUSER)` refuses multi-threaded callers, and the
//! forks must not copy a lock that another thread holds.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::activation::{self, ActivationError};
use crate::capabilities::{self, CapsError};
use crate::forward::{self, Target};
use crate::handoff::{self, RelayControl};
use crate::host::{self, BindError, Bound, HostSocket};
use crate::hostside::{self, Factory};
use crate::init::{self, CommandSpec, InitError, Started};
use crate::netns::{self, NetnsError};
use crate::notify::{self, Notifier, NotifyError};
use crate::outward::{self, HostPorts, OutwardError};
use crate::pasta::{self, Net, PastaError};
use crate::publish::PublishSpec;
use crate::ready::{self, ReadyError};
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
    /// Descriptors 3 to 3+N-1 go to the command as they are (`--preserve-fds`); every other one
    /// from 3 up is closed at its exec, but the sockets it is given.
    pub preserve_fds: u32,
    /// How long the server may take to accept on every published port before lowport stops it.
    pub ready_timeout: std::time::Duration,
    /// The most relayed TCP connections at once; `None` sizes it to the open-file limit.
    pub max_connections: Option<usize>,
    /// Relay from each client's own address, so the server sees who connects.
    pub preserve_source: bool,
    /// Hand the host sockets to the command (systemd's LISTEN_FDS) instead of relaying.
    pub socket_activation: bool,
    /// How long a UDP flow lives without a datagram in either direction.
    pub udp_timeout: std::time::Duration,
    /// The most UDP flows at once, over all published UDP ports; `None` sizes it to the open-file limit.
    pub max_udp_flows: Option<usize>,
    /// How long a TCP connection that one side has closed may stay without moving a byte.
    pub half_closed_timeout: std::time::Duration,
    /// How published ports reach the server: handed over, relayed, or handed over where possible.
    pub forward: handoff::Mode,
    /// Host loopback ports reachable inside at the same address and port.
    pub host_loopback: Vec<HostPorts>,
    /// The way out: none, or pasta.
    pub net: Net,
    /// Mirror the host's resolvers inside (implied by `Net::Pasta`).
    pub dns: bool,
    /// The instance's name (see `instance`); `None` derives one from the command.
    pub name: Option<String>,
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
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Userns(#[from] UsernsError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Outward(#[from] OutwardError),
    #[error(transparent)]
    Pasta(#[from] PastaError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
    #[error("{0}")]
    Resources(String),
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
            LaunchError::Usage(_)
            | LaunchError::Activation(_)
            | LaunchError::Bind(BindError::NotTheGiven { .. }) => 2,
            LaunchError::Instance(crate::instance::InstanceError::BadName(_))
            | LaunchError::Instance(crate::instance::InstanceError::Taken { .. }) => 2,
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
    // An ignored SIGCHLD, inherited across exec, would make the kernel reap lowport's children
    // itself: their pids could then be reused while lowport still signals and waits for them.
    sys::reset_signal_to_default(Signal::SIGCHLD);

    // 1. Validate.
    let program = config.command.first().ok_or_else(|| {
        LaunchError::Usage(
            "no command given; usage: lowport run [OPTIONS] -- COMMAND [ARGS]...".into(),
        )
    })?;
    // The sockets systemd gave lowport itself, taken before lowport opens any descriptor.
    let mut given = activation::Given::from_env()?;
    given.check(&config.publish)?;
    if let Some(fd) = config.ready_fd {
        if given.raw_fds().contains(&fd) {
            return Err(LaunchError::Usage(format!(
                "--ready-fd {fd}: descriptor {fd} is a socket systemd gave lowport (LISTEN_FDS); use a descriptor above them"
            )));
        }
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
    check_preserved(&config, &given)?;
    init::precheck(program)?;
    // Before `unshare`: an abstract socket name means something only in the host's network namespace.
    let notifier = Notifier::from_env()?.map(Arc::new);
    if config.socket_activation {
        if config.forward != handoff::Mode::Auto {
            return Err(LaunchError::Usage(
                "--socket-activation passes the host sockets to the command itself; it cannot be combined with --forward".into(),
            ));
        }
        // A socket systemd gave lowport is the user's already (see `privileged` below).
        let binding: Vec<PublishSpec> = config
            .publish
            .iter()
            .filter(|s| !given.covers(s))
            .cloned()
            .collect();
        refuse_privileged_activation(&binding, &proc_sys)?;
    }
    // Whether ports are handed to the server when it binds them (see `handoff`).
    let mut handing = config.forward != handoff::Mode::Relay
        && !config.socket_activation
        && !config.publish.is_empty();
    if handing {
        if let Some(why) = handoff::kernel_refusal() {
            if config.forward == handoff::Mode::Handoff {
                return Err(LaunchError::Usage(format!(
                    "--forward handoff: {why}; use --forward relay (or auto, which relays here)"
                )));
            }
            debug!(%why, "relaying every port");
            handing = false;
        }
    }
    // The resolvers to mirror inside, from the host's resolv.conf as the programs inside read it.
    // With pasta, a resolver elsewhere is reached through pasta like any address; only one on the
    // host's loopback (systemd-resolved's 127.0.0.53) needs the mirror. Each mirror takes port 53 of
    // its address inside, which a DNS server inside binding 0.0.0.0:53 would then find taken.
    let resolvers = if config.dns {
        read_resolvers(true)?
    } else if config.net == Net::Pasta {
        let mut all = read_resolvers(false)?;
        all.retain(|ip| ip.is_loopback());
        all
    } else {
        Vec::new()
    };
    let routes = outward::routes(&config.host_loopback, &resolvers);
    // A connect to a mirrored TCP address is answered with a host socket connected to it, under the
    // same filter as the binds (see `handoff::Handoff::connect_out`).
    let connect_routes: Vec<SocketAddr> =
        if config.forward != handoff::Mode::Relay && handoff::kernel_refusal().is_none() {
            routes
                .iter()
                .filter(|r| r.protocol == crate::publish::Protocol::Tcp)
                .map(|r| r.addr)
                .collect()
        } else {
            Vec::new()
        };
    let pasta_path = match config.net {
        Net::Pasta => Some(pasta::find()?),
        Net::None => None,
    };
    // The kernel lets a process map only its effective ids into the namespace it creates.
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let plan = userns::plan(config.userns, uid, gid, &userns::Environment::default())?;
    debug!(?plan, "id mapping");
    let caller_nofile =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok();
    let nofile = sys::raise_nofile_limit().unwrap_or_else(|err| {
        debug!(?err, "cannot raise the open-file limit");
        caller_nofile.map_or(1024, |(soft, _)| soft)
    });
    let relaying = !config.socket_activation && !config.publish.is_empty();
    // Descriptors lowport inherited (stdio, --ready-fd, whatever the caller left open) count too.
    let inherited = std::fs::read_dir("/proc/self/fd").map_or(3, |d| d.count().saturating_sub(1));
    let threads = relay_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Each published port has up to two host sockets (one per family), and a TCP host socket keeps a
    // socket inside open for its next client (`forward::accept_loop`).
    let host_sockets: usize = config
        .publish
        .iter()
        .map(|spec| match spec.protocol {
            crate::publish::Protocol::Tcp => 4,
            crate::publish::Protocol::Udp => 2,
        })
        .sum();
    let reserved = reserved_fds(host_sockets + inherited, threads);
    let mut limits = Limits::fit(
        nofile,
        reserved,
        (relaying || !routes.is_empty()).then_some(&config),
    )?;
    // Ports added later (`lowport port add`) are relayed, within what the open-file limit leaves.
    let spare = nofile.saturating_sub(reserved);
    if limits.connections == 0 {
        limits.connections =
            (spare / FDS_PER_CONNECTION).clamp(1, MAX_DEFAULT_CONNECTIONS) as usize;
    }
    if limits.udp_flows == 0 {
        limits.udp_flows = (spare / 8).clamp(1, MAX_DEFAULT_UDP_FLOWS) as usize;
    }
    debug!(?limits, nofile, "connection and flow limits");

    // The instance's name and state directory, claimed before anything is bound: a name in use is a
    // usage error. Without --name, a run that cannot keep state still runs.
    let claim = match crate::instance::root()
        .and_then(|root| crate::instance::Claim::take(&root, config.name.as_deref(), program))
    {
        Ok(claim) => Some(claim),
        Err(err) if config.name.is_some() => return Err(err.into()),
        Err(err) => {
            warn!(
                "{err}; this run has no name, so lowport ps, exec, stop and port cannot reach it"
            );
            None
        }
    };
    if let Some(claim) = &claim {
        debug!(name = claim.name, dir = %claim.dir().display(), "instance");
    }

    // 2. Host sockets, then no capability on the host.
    let sockets = host::bind_all_given(&config.publish, &proc_sys, &mut given)?;
    // What no -p took goes on to the command as its own activation.
    let passed_on = given.rest();
    let host_start = host::unprivileged_port_start(&proc_sys);
    // A host socket below the host's threshold was bound with privilege: never handed over. One that
    // systemd gave lowport was not: the user's process holds it already (docs/security.md).
    let privileged = |s: &HostSocket| s.inherited.is_none() && s.addr.port() < host_start;
    if config.forward == handoff::Mode::Handoff {
        if let Some(s) = sockets.iter().find(|s| privileged(s)) {
            return Err(LaunchError::Usage(format!(
                "--forward handoff cannot hand over host port {} (-p {}): ports below {host_start} need privilege on this host, and a server holding such a socket could send from it as if it were root; use --forward auto, which relays that port and hands over the others",
                s.addr.port(),
                s.spec
            )));
        }
    }
    // A handed UDP socket can send to any address from the host's network namespace (replies go to
    // whoever sent), the host's loopback services included; `auto` keeps UDP ports relayed, and only
    // `--forward handoff` hands them over. A handed TCP socket cannot connect anywhere else (see
    // `handoff::Handoff::inner_only`).
    let handable = |s: &HostSocket| {
        !privileged(s)
            && (s.spec.protocol == crate::publish::Protocol::Tcp
                || config.forward == handoff::Mode::Handoff)
    };
    if handing && !sockets.iter().any(handable) {
        debug!("no host port can be handed over (privileged, or UDP under --forward auto); relaying them");
        handing = false;
    }
    // Readiness looks for the server's listener on each handed host socket, in the host's network
    // namespace: the lookup socket must be made here.
    let host_lookup = if handing {
        crate::sockdiag::TcpLookup::open()
    } else {
        None
    };
    let creator_keeps = (uid == 0).then_some(capabilities::Capability::CAP_SETFCAP);
    capabilities::drop_all_except(creator_keeps.as_slice())?;

    // 3. Signals stay pending until the runtime reads them from a signalfd.
    let mut forwarded = SigSet::empty();
    for sig in FORWARDED_SIGNALS {
        forwarded.add(sig);
    }
    // SIGCHLD too: the runtime learns from the signalfd that the pid-1 helper exited, so waiting for
    // it needs no thread of its own.
    let mut read_by_runtime = forwarded;
    read_by_runtime.add(Signal::SIGCHLD);
    read_by_runtime
        .thread_block()
        .map_err(|e| LaunchError::io("block signals")(e.into()))?;
    let mut own_fds: Vec<RawFd> = sockets.iter().map(|s| s.socket.as_raw_fd()).collect();
    own_fds.extend(passed_on.iter().map(|s| s.fd.as_raw_fd()));
    own_fds.extend(config.ready_fd);
    if let Some(claim) = &claim {
        own_fds.extend(claim.raw_fds());
    }
    own_fds.extend(host_lookup.as_ref().map(AsRawFd::as_raw_fd));
    own_fds.extend(notifier.as_ref().map(|n| n.as_raw_fd()));
    // Forked while lowport is still in the host's network namespace, where it makes the sockets
    // handed to a server that binds a second time or wants a dual-stack socket, the sockets to host
    // services, and starts pasta. One channel each for the handoff thread, the relays and pasta.
    let mut factory = if handing || !routes.is_empty() || pasta_path.is_some() {
        let factory = Factory::spawn(&own_fds, 3).map_err(|e| {
            if e.raw_os_error() == Some(libc::EAGAIN) {
                LaunchError::Resources(format!(
                    "cannot start lowport's host side (for socket handoff, --host-loopback, --dns and --net pasta): {e} (the limit on this user's processes and threads, ulimit -u, is reached: raise it, or stop some of this user's processes)"
                ))
            } else {
                LaunchError::io("start lowport's host side")(e)
            }
        })?;
        own_fds.extend(factory.raw_fds());
        Some(factory)
    } else {
        None
    };
    let _factory_reaper = factory.as_ref().map(|f| hostside::Reaper(f.pid()));
    let handoff_channel = factory.as_mut().and_then(Factory::channel);
    let outward_channel = factory.as_mut().and_then(Factory::channel);
    let pasta_channel = factory.as_mut().and_then(Factory::channel);
    let helper = match &plan {
        Plan::Subids(p) => Some(MapHelper::spawn(p, &own_fds)?),
        Plan::Single { .. } => None,
    };

    // 4. The namespaces, made by a child and joined (see `userns::create_and_join` for why).
    let secure = sys::secure_mode();
    let environ = userns::create_and_join(&plan, helper, &own_fds, &proc_sys, secure)?;
    let mut env = init::caller_environment(secure.then_some(environ.as_slice()));
    // lowport reports readiness itself (see `notify`); the command must not.
    env.retain(|(name, _)| !notify::VARS.iter().any(|v| name == *v));

    // 5. Inside the network namespace.
    netns::loopback_up()?;
    netns::set_unprivileged_port_start(&proc_sys, config.port_start)?;
    // With a way out, the relay's routes for client addresses would swallow outbound traffic.
    let clients = match config.net {
        Net::None => netns::Clients::Own,
        Net::Pasta => netns::Clients::StandIns,
    };
    // A named instance may relay ports added later (`lowport port add`), when no capability is left
    // to add the routes.
    if relaying {
        netns::route_replies_to_clients(clients)?;
    } else if claim.is_some() {
        // Only the stand-in addresses: routes that made every address local would turn the
        // command's connects to other hosts from "unreachable" into "refused".
        netns::route_replies_to_clients(netns::Clients::StandIns)?;
    }
    netns::make_local(&resolvers)?;
    let inner = outward::bind_inside(&routes)?;
    own_fds.extend(inner.iter().map(|i| match &i.socket {
        outward::InnerSocket::Tcp(l) => l.as_raw_fd(),
        outward::InnerSocket::Udp(u) => u.as_raw_fd(),
    }));
    // pasta joins the namespaces through /proc/PID/ns while lowport may still be inspected by its
    // own user, and the command starts once the namespace has its way out.
    let pasta = match (&pasta_path, pasta_channel) {
        (Some(_), Some(channel)) => Some(pasta::start(channel)?),
        _ => None,
    };

    // 6. The command.
    let close_in_helper = own_fds;
    // --socket-activation's sockets first, in -p order, then those systemd gave lowport that no -p
    // took, in systemd's order; a socket systemd gave keeps its name.
    let mut activation: Vec<(RawFd, String)> = if config.socket_activation {
        sockets
            .iter()
            .map(|s| {
                (
                    s.socket.as_raw_fd(),
                    s.inherited
                        .clone()
                        .unwrap_or_else(|| format!("{}-{}", s.spec.protocol, s.spec.port)),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    activation.extend(passed_on.iter().map(|s| (s.fd.as_raw_fd(), s.name.clone())));
    // The command sends its bind filter's listener over this pair.
    let listener_pair = if handing || !connect_routes.is_empty() {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| LaunchError::io("make the handoff socket pair")(e.into()))?;
        Some((ours, theirs))
    } else {
        None
    };
    let mut close_in_helper = close_in_helper;
    close_in_helper.extend(listener_pair.as_ref().map(|(ours, _)| ours.as_raw_fd()));
    let command = CommandSpec {
        argv: config.command.clone(),
        env,
        activation,
        nofile: caller_nofile,
        handoff: listener_pair.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
        preserve_fds: config.preserve_fds,
    };
    // From here on the command runs, as root in the namespaces lowport created. A non-dumpable process
    // can be ptraced, and its /proc/PID/mem and descriptors opened, only with CAP_SYS_PTRACE in the user
    // namespace its program was exec'd in, which is the host's: the command never has that. The flag is
    // inherited by the pid-1 helper and by every thread of the runtime.
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| LaunchError::io("make the process non-dumpable")(e.into()))?;
    let started = init::start(&command, &forwarded, &close_in_helper)?;
    // The command has its copies.
    drop(passed_on);
    debug!(init = %started.init, child = started.child_pid, "command started");
    // Any failure from here on stops the command's processes and reaps them.
    let mut command_guard = CommandGuard {
        init: Some(started.init),
    };
    let listener = match listener_pair {
        Some((ours, theirs)) => {
            drop(theirs);
            let received = init::receive_listener(&ours).map_err(|err| {
                LaunchError::Resources(format!(
                    "cannot receive the command's seccomp listener: {err}; the command was stopped (without it every bind would fail; --forward relay does without)"
                ))
            })?;
            match received {
                Ok(listener) => Some(listener),
                Err(err) if config.forward == handoff::Mode::Handoff => {
                    return Err(LaunchError::Usage(format!(
                        "--forward handoff: the kernel refused a seccomp listener for the command ({err}{}); use --forward relay (or auto, which relays then)",
                        if err.raw_os_error() == Some(libc::EBUSY) {
                            ": lowport already runs under one, as inside another lowport or a container that uses one"
                        } else {
                            ""
                        }
                    )));
                }
                Err(err) => {
                    debug!(%err, "no seccomp listener for the command; relaying every port");
                    None
                }
            }
        }
        None => None,
    };
    // One stop switch per host socket: the handoff thread stops a socket's relay before handing it over.
    let mut controls = Vec::new();
    let mut ports = Vec::new();
    let mut handed = Vec::new();
    for socket in &sockets {
        let (stop, control) = handoff::relay_control();
        controls.push(control);
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        handed.push((handing && listener.is_some()).then(|| flag.clone()));
        if handing && listener.is_some() {
            let copy = socket
                .socket
                .as_fd()
                .try_clone_to_owned()
                .map_err(LaunchError::io("copy a host socket"))?;
            ports.push(
                handoff::Port::new(
                    socket.spec.clone(),
                    socket.addr,
                    handable(socket),
                    copy,
                    stop,
                    flag,
                )
                .inherited(socket.inherited.is_some()),
            );
        }
    }
    let modes: Vec<&'static str> = sockets
        .iter()
        .map(|s| {
            if config.socket_activation {
                "activation"
            } else if handing && listener.is_some() && handable(s) {
                "handoff"
            } else {
                "relay"
            }
        })
        .collect();
    for (s, mode) in sockets.iter().zip(&modes) {
        debug!(host = %s.addr, port = s.spec.port, protocol = %s.spec.protocol, mode, "forwarding");
    }

    let signals = SignalFd::with_flags(
        &read_by_runtime,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| LaunchError::io("read signals")(e.into()))?;
    forward_pending(&signals, started.init, started.child_pid);

    let mut handed_rx = None;
    // 7. Nothing from here on needs a capability, in any namespace, but the handoff thread's
    // CAP_SYS_PTRACE in the namespace lowport made: it reads the server's bind arguments and socket.
    capabilities::drop_bounding()?;
    if let (Some(listener), Some(factory)) = (listener, handoff_channel) {
        // CAP_DAC_READ_SEARCH too: a server process that switched to another uid inside and made
        // itself dumpable again (nginx's workers do) owns its /proc/PID/fd and fdinfo, mode 0500.
        capabilities::drop_all_except(&[
            capabilities::Capability::CAP_SYS_PTRACE,
            capabilities::Capability::CAP_DAC_READ_SEARCH,
        ])?;
        let mut handoff = handoff::Handoff::new(listener, ports, factory, connect_routes)
            .map_err(LaunchError::io("start the handoff"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        handoff.report_handed(tx);
        handed_rx = Some(rx);
        std::thread::Builder::new()
            .name("lowport-handoff".into())
            .spawn(move || handoff.run())
            .map_err(|err| {
                LaunchError::Resources(format!(
                    "cannot start lowport's handoff thread: {err}; the command was stopped (the limit on this user's processes and threads, ulimit -u, may be reached)"
                ))
            })?;
    }
    capabilities::drop_all()?;

    let runtime = build_runtime(threads)?;
    let outward = Outward {
        inner,
        channel: outward_channel,
        resolvers,
        handed: handed_rx,
    };
    let relays = controls.into_iter().zip(modes).collect();
    let readiness = Readiness {
        host_lookup,
        handed,
        notifier,
    };
    let status = runtime.block_on(supervise(
        config,
        limits,
        sockets,
        relays,
        outward,
        started,
        signals,
        claim.as_ref(),
        readiness,
    ));
    drop(claim);
    let status = status?;
    drop(pasta);
    // The helper has exited and was reaped: its pid may belong to another process now.
    command_guard.init = None;
    runtime.shutdown_background();
    Ok(status)
}

/// What `supervise` needs to tell when the server is ready, and whom to tell.
struct Readiness {
    /// A TCP lookup of the host's network namespace, for the handed sockets.
    host_lookup: Option<crate::sockdiag::TcpLookup>,
    /// Per host socket, the flag the handoff thread sets once it handed the socket over.
    handed: Vec<Option<Arc<std::sync::atomic::AtomicBool>>>,
    notifier: Option<Arc<Notifier>>,
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    config: Config,
    limits: Limits,
    sockets: Vec<HostSocket>,
    relays: Vec<(RelayControl, &'static str)>,
    outward: Outward,
    mut started: Started,
    signals: SignalFd,
    claim: Option<&crate::instance::Claim>,
    readiness: Readiness,
) -> Result<i32, LaunchError> {
    let tcp_limit = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    let udp_flows = udp::FlowBudget::new(limits.udp_flows.max(1));
    let half_closed_timeout = config.half_closed_timeout;
    // The instance's ports and state, which `lowport port` changes and `lowport ps` reads.
    let live = claim.map(|claim| {
        let state = crate::instance::State {
            name: claim.name.clone(),
            pid: std::process::id(),
            command_pid: started.child_pid,
            command: config
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ports: Vec::new(),
        };
        Arc::new(crate::instance::live::Live::new(
            claim.dir().to_owned(),
            state,
            crate::instance::live::RelaySetup {
                handle: tokio::runtime::Handle::current(),
                tcp_limit: tcp_limit.clone(),
                options: forward::Options {
                    half_closed_timeout,
                },
                // Clients keep their own address only where `run` made every address local, which
                // it does when it relays from the start (see `netns::Clients`).
                preserve_source: config.preserve_source
                    && config.net == Net::None
                    && !config.socket_activation
                    && !config.publish.is_empty(),
                udp_timeout: config.udp_timeout,
                udp_flows: udp_flows.clone(),
            },
        ))
    });
    let mut udp_sockets = Vec::new();
    let mut bound = Vec::new();
    // With handoff, the handoff thread holds a copy of every host socket until the server binds it,
    // and the server holds it after (see `handoff::Port`).
    let handoff_holds = relays.iter().any(|(_, mode)| *mode == "handoff");
    for (socket, (control, mode)) in sockets.into_iter().zip(relays) {
        bound.push((socket.spec.clone(), socket.addr, mode));
        let held = if config.socket_activation {
            Some("the command holds it (--socket-activation)")
        } else if handoff_holds {
            Some("it was published for handoff, and lowport's handoff keeps it for the server, or the server holds it")
        } else {
            None
        };
        let removal = live
            .as_ref()
            .map(|live| live.track(&socket.spec, socket.addr, mode, held));
        if config.socket_activation {
            // The command owns its copies now; lowport's copies only have to outlive the readiness
            // report, and closing them early would change nothing for the command.
            continue;
        }
        let target = Target {
            port: socket.spec.port,
            // With a way out, only the stand-in addresses are local (see `netns::Clients`).
            preserve_source: config.preserve_source && config.net == Net::None,
        };
        let waits = socket
            .inherited
            .is_some()
            .then(|| (socket.spec.clone(), socket.addr));
        match socket.socket {
            Bound::Tcp(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(LaunchError::io("register a host socket"))?;
                let options = forward::Options {
                    half_closed_timeout: config.half_closed_timeout,
                };
                let (shutdown, done) = control.split();
                let limit = tcp_limit.clone();
                tokio::spawn(async move {
                    let stop = stop_or_removed(shutdown, removal);
                    let mut stop = std::pin::pin!(stop);
                    if let Some((spec, addr)) = waits {
                        tokio::select! {
                            () = activation::server_listens(spec, addr) => {}
                            () = &mut stop => {
                                drop(done);
                                return;
                            }
                        }
                    }
                    forward::serve(listener, target, options, limit, stop).await;
                    drop(done);
                });
            }
            Bound::Udp(socket) => udp_sockets.push((socket, target, Some(control), removal)),
        }
    }
    if !udp_sockets.is_empty() {
        start_udp_relay(udp_sockets, config.udp_timeout, udp_flows.clone())?;
    }
    if let (Some(live), Some(claim)) = (&live, claim) {
        live.update(|_| {});
        let served = crate::instance::control::Served {
            pid_ns: started.namespaces.pid.take(),
            mnt_ns: started.namespaces.mnt.take(),
            ports: live.clone(),
        };
        let listener = claim
            .control()
            .map_err(LaunchError::io("copy the control socket"))?;
        crate::instance::control::serve(listener, served).map_err(|err| {
            LaunchError::Resources(format!(
                "cannot start lowport's control thread: {err}; the command was stopped (the limit on this user's processes and threads, ulimit -u, may be reached)"
            ))
        })?;
    }
    if let Some(channel) = outward.channel {
        let host = channel.into_async().map_err(LaunchError::io(
            "register the channel to lowport's host side",
        ))?;
        let shared = outward::Shared {
            host: Arc::new(host),
            // One bound for every relayed TCP connection, published ports' and host services'.
            connections: tcp_limit.clone(),
            half_closed_timeout: config.half_closed_timeout,
            udp_timeout: config.udp_timeout,
        };
        outward::serve(outward.inner, &shared).map_err(LaunchError::io(
            "register a socket lowport listens on inside",
        ))?;
        if let Some(mut handed) = outward.handed {
            let live = live.clone();
            tokio::spawn(async move {
                let mut mirrored = std::collections::HashSet::new();
                while let Some(h) = handed.recv().await {
                    if h.spec.protocol != crate::publish::Protocol::Tcp
                        || !mirrored.insert((h.spec.port, h.host.is_ipv4()))
                    {
                        continue;
                    }
                    if let Some(live) = &live {
                        live.note_handed(h.spec.port);
                    }
                    match outward::mirror_handed(h.spec.port, h.host, &shared) {
                        Ok(inner) => debug!(%inner, host = %h.host, "handed port mirrored inside"),
                        // The server (or something it started) listens there itself, or
                        // --port-start keeps lowport, which has no capability left, off the port.
                        Err(err) => {
                            debug!(?err, port = h.spec.port, "handed port not mirrored inside")
                        }
                    }
                }
            });
        }
    }

    let signals = sys::register_signalfd(signals).map_err(LaunchError::io("read signals"))?;
    // SAFETY: `run` checked at start that the descriptor is open; nothing else in lowport owns or uses
    // the number, and this is the only place that takes it, once.
    let ready_file = config
        .ready_fd
        .map(|fd| std::fs::File::from(unsafe { sys::own_raw(fd) }));
    let reaching = Reaching {
        net: config.net.to_string(),
        host_loopback: config
            .host_loopback
            .iter()
            .map(ToString::to_string)
            .collect(),
        dns: outward.resolvers.iter().map(ToString::to_string).collect(),
    };
    let published = bound
        .iter()
        .zip(readiness.handed)
        .map(|((spec, addr, mode), handed)| ready::Published {
            spec: spec.clone(),
            addr: *addr,
            mode,
            handed,
        })
        .collect();
    let mut watch = ready::Watch::new(published, readiness.host_lookup);
    let notifier = readiness.notifier;
    let told = notifier.clone();
    let child_pid = started.child_pid;
    // The timeout bounds a wait, and only someone waiting (a reader of --ready-fd, systemd) makes
    // one: `lowport run -p 8080:80 -- bash`, where the server is started by hand later, must not
    // be stopped after 90 seconds.
    let waited_on = ready_file.is_some() || notifier.is_some();
    let timeout = waited_on.then_some(config.ready_timeout);
    let announce = move || {
        debug!("ready");
        let status = ready_status(&bound);
        if let Some(file) = ready_file {
            report_ready(file, child_pid, &bound, reaching);
        }
        if let Some(notifier) = told {
            notifier.ready(&status);
        }
    };
    // Ready already (no port published, or --socket-activation): said before anything else
    // happens, so a command that exits at once, such as `true`, still has its report.
    let now = waited_on && watch.ready_now();
    let later = if now {
        announce();
        None
    } else {
        Some(announce)
    };
    // The ready descriptor goes with the task: when the command exits first, the task is dropped and
    // the reader sees end-of-file without a line.
    let mut watcher = tokio::spawn(async move {
        let Some(announce) = later.filter(|_| waited_on) else {
            // Nobody to tell, or told already: no polling for a server that may never come.
            return Ok(());
        };
        watch.until_ready(timeout).await?;
        announce();
        Ok::<(), ReadyError>(())
    });
    let notifier = notifier.as_deref();
    let status: Result<i32, LaunchError> = async {
        let waiting = wait_forwarding_signals(&signals, &started, notifier);
        tokio::pin!(waiting);
        Ok(tokio::select! {
            status = &mut waiting => {
                watcher.abort();
                status?
            }
            outcome = &mut watcher => match outcome {
                Ok(Err(err)) => {
                    eprintln!("lowport: {err}");
                    if let Some(notifier) = notifier {
                        notifier.status("not ready in time; stopping");
                        notifier.stopping();
                    }
                    // As a SIGTERM to lowport would; the wait goes on forwarding signals.
                    if let Err(err) = nix::sys::signal::kill(started.init, Signal::SIGTERM) {
                        debug!(?err, "cannot stop the command");
                    }
                    waiting.await?;
                    ready::TIMED_OUT_STATUS
                }
                Ok(Ok(())) => waiting.await?,
                Err(err) => {
                    warn!(?err, "the readiness watch ended; readiness is not reported");
                    waiting.await?
                }
            },
        })
    }
    .await;
    if let Some(live) = &live {
        live.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    drop(started);
    status
}

/// systemd's `STATUS=` once ready: what is published, as `systemctl status` shows it.
fn ready_status(bound: &[(PublishSpec, SocketAddr, &'static str)]) -> String {
    if bound.is_empty() {
        return "running, no port published".into();
    }
    let ports: Vec<String> = bound
        .iter()
        .map(|(spec, addr, mode)| format!("{addr}->{}/{} {mode}", spec.port, spec.protocol))
        .collect();
    format!("serving {}", ports.join(", "))
}

/// Runs the UDP relays on a thread of their own, with a runtime of its own: a flood of datagrams from
/// new source ports keeps that thread busy opening flows, and on the TCP relay's thread it would
/// delay every TCP connection (tokio looks for new I/O events only between task polls). Apart, the
/// kernel shares the CPUs between the two, and TCP stays as quick as without the flood.
fn start_udp_relay(
    sockets: Vec<UdpRelayed>,
    idle: std::time::Duration,
    budget: udp::FlowBudget,
) -> Result<(), LaunchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LaunchError::io("start the UDP relay's runtime"))?;
    // The runtime goes to the thread once it exists: dropped here, in the TCP relay's async context,
    // a runtime makes tokio panic, which a refused thread would otherwise cause.
    let (give, take) = std::sync::mpsc::sync_channel::<tokio::runtime::Runtime>(1);
    let spawned = std::thread::Builder::new()
        .name("lowport-udp".into())
        .spawn(move || {
            let Ok(runtime) = take.recv() else {
                return;
            };
            runtime.block_on(async move {
                for (socket, target, control, removal) in sockets {
                    match tokio::net::UdpSocket::from_std(socket) {
                        Ok(socket) => {
                            let (shutdown, done) = match control {
                                Some(control) => {
                                    let (shutdown, done) = control.split();
                                    (futures_either(Some(shutdown)), Some(done))
                                }
                                None => (futures_either(None), None),
                            };
                            let stop = stop_or_removed(shutdown, removal);
                            let budget = budget.clone();
                            tokio::spawn(udp::serve(socket, target, idle, budget, stop, done));
                        }
                        Err(err) => warn!(
                            ?err,
                            port = target.port,
                            "cannot register a UDP host socket; its datagrams are not forwarded"
                        ),
                    }
                }
                std::future::pending::<()>().await
            })
        });
    match spawned {
        Ok(_) => {
            let _ = give.send(runtime);
            Ok(())
        }
        Err(err) => {
            runtime.shutdown_background();
            let nproc = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
                .map_or("unknown".to_owned(), |(soft, _)| soft.to_string());
            Err(LaunchError::Resources(format!(
                "cannot start lowport's UDP relay thread: {err}; the command was stopped (the limit on this user's processes and threads, ulimit -u, is {nproc}; raise it, or stop some of this user's processes)"
            )))
        }
    }
}

/// A UDP host socket for [`start_udp_relay`]: where it goes, the handoff's stop switch (none for a
/// port added later) and `lowport port rm`'s.
type UdpRelayed = (
    std::net::UdpSocket,
    Target,
    Option<RelayControl>,
    Option<tokio::sync::oneshot::Receiver<()>>,
);

/// Resolves when the relay's `shutdown` does (the handoff took its socket) or, with `removal`, when
/// `lowport port rm` withdraws the port.
async fn stop_or_removed(
    shutdown: impl std::future::Future<Output = ()>,
    removal: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    match removal {
        Some(removal) => tokio::select! {
            () = shutdown => {}
            () = crate::instance::live::removed(removal) => {}
        },
        None => shutdown.await,
    }
}

/// `shutdown`, or a future that never resolves.
async fn futures_either(shutdown: Option<impl std::future::Future<Output = ()>>) {
    match shutdown {
        Some(shutdown) => shutdown.await,
        None => std::future::pending().await,
    }
}

/// Relays a UDP port added while the command runs (see `instance::live`).
pub(crate) fn start_udp_relay_removable(
    sockets: Vec<(
        std::net::UdpSocket,
        Target,
        tokio::sync::oneshot::Receiver<()>,
    )>,
    idle: std::time::Duration,
    budget: udp::FlowBudget,
) -> Result<(), LaunchError> {
    start_udp_relay(
        sockets
            .into_iter()
            .map(|(s, t, r)| (s, t, None, Some(r)))
            .collect(),
        idle,
        budget,
    )
}

/// Forwards signals to the pid-1 helper until it exits, and returns the status lowport exits with.
/// SIGCHLD arrives on the same signalfd, so no thread is set aside for `waitpid`.
async fn wait_forwarding_signals(
    signals: &AsyncFd<SignalFd>,
    started: &Started,
    notifier: Option<&Notifier>,
) -> Result<i32, LaunchError> {
    loop {
        if let Some(status) = helper_status(started.init)? {
            return Ok(status);
        }
        let mut guard = signals
            .readable()
            .await
            .map_err(LaunchError::io("read signals"))?;
        // Read until the queue is empty: only a WouldBlock clears the readiness, which is what makes
        // the next `readable()` wait.
        loop {
            match guard.try_io(|fd| read_one(fd.get_ref())) {
                Ok(Ok(info)) if info.ssi_signo == libc::SIGCHLD as u32 => {}
                Ok(Ok(info)) => {
                    // The signals that stop a service (systemctl stop sends SIGTERM).
                    if [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT]
                        .contains(&(info.ssi_signo as i32))
                    {
                        if let Some(notifier) = notifier {
                            notifier.stopping();
                        }
                    }
                    forward_signal(&info, started.init, started.child_pid, true)
                }
                Ok(Err(err)) => return Err(LaunchError::io("read signals")(err)),
                Err(_would_block) => break,
            }
        }
    }
}

/// The helper's exit status once it has exited (the command's own, or 128 + N for signal N).
fn helper_status(init: nix::unistd::Pid) -> Result<Option<i32>, LaunchError> {
    let status = nix::sys::wait::waitpid(init, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
        .map_err(|e| LaunchError::io("wait for the command")(e.into()))?;
    Ok(match status {
        WaitStatus::StillAlive => None,
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        other => {
            debug!(?other, "helper status");
            None
        }
    })
}

/// Builds the relay's runtime. tokio panics when the system refuses a worker thread (RLIMIT_NPROC,
/// `ulimit -u`, is the usual reason); that becomes an error with the limit named.
fn build_runtime(threads: usize) -> Result<tokio::runtime::Runtime, LaunchError> {
    let build = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("lowport")
            .enable_all()
            .build()
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let built = std::panic::catch_unwind(build);
    std::panic::set_hook(hook);
    let err = match built {
        Ok(Ok(runtime)) => return Ok(runtime),
        Ok(Err(err)) => err,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            io::Error::other(text)
        }
    };
    let nproc = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
        .map_or("unknown".to_owned(), |(soft, _)| soft.to_string());
    Err(LaunchError::Resources(format!(
        "cannot start lowport's relay threads ({threads}): {err}; the command was stopped (the system refused a thread: the limit on this user's processes and threads, ulimit -u, is {nproc}; raise it, or stop some of this user's processes)"
    )))
}

/// The relay shares the machine with the server it serves and, in benchmarks and on laptops, with the
/// clients: half the CPUs, at most four. With two CPUs one relay thread did as well as two on
/// keep-alive requests and better on a single bulk stream, which two threads bounce between CPUs
/// (docs/benchmarks.md).
pub fn relay_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 4)
}

/// Descriptors per relayed TCP connection at worst: two sockets and, while bytes flow both ways, two
/// pipes (four ends). Idle connections hold no pipe.
const FDS_PER_CONNECTION: u64 = 6;
/// Descriptors lowport keeps for itself, besides its host sockets and the pipe pools of its relay
/// threads: stdio, the runtime's epoll and eventfd, the signalfd, the lifeline, `--ready-fd`.
const FDS_OWN: u64 = 16;
/// The default ceilings, whatever the open-file limit allows.
const MAX_DEFAULT_CONNECTIONS: u64 = 16384;
const MAX_DEFAULT_UDP_FLOWS: u64 = 4096;

/// How many relayed TCP connections and UDP flows lowport allows at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    pub udp_flows: usize,
}

impl Limits {
    /// Fits the limits into `nofile` descriptors, after the `reserved` ones (see [`reserved_fds`]).
    /// Defaults take what is left (a UDP flow's socket is one descriptor; an eighth of the budget goes
    /// to flows when UDP is published); an explicit limit that cannot fit is refused, since honouring it would mean
    /// dropping clients at `accept` once the descriptors run out. `config` is `None` when nothing is
    /// relayed.
    pub fn fit(nofile: u64, reserved: u64, config: Option<&Config>) -> Result<Limits, LaunchError> {
        let Some(config) = config else {
            return Ok(Limits {
                connections: 0,
                udp_flows: 0,
            });
        };
        let has = |p: crate::publish::Protocol| config.publish.iter().any(|s| s.protocol == p);
        let has_udp = has(crate::publish::Protocol::Udp);
        // Connections to host services (--host-loopback, and --dns's TCP) are relayed too, in the
        // same budget.
        let has_tcp = has(crate::publish::Protocol::Tcp)
            || config
                .host_loopback
                .iter()
                .any(|h| h.protocol == crate::publish::Protocol::Tcp)
            || config.dns
            || config.net == Net::Pasta;
        let budget = nofile.saturating_sub(reserved);
        let udp_flows = match config.max_udp_flows {
            _ if !has_udp => 0,
            Some(n) => n as u64,
            None => (budget / 8).min(MAX_DEFAULT_UDP_FLOWS),
        };
        let connections = match config.max_connections {
            Some(n) => n as u64,
            None if has_tcp => {
                (budget.saturating_sub(udp_flows) / FDS_PER_CONNECTION).min(MAX_DEFAULT_CONNECTIONS)
            }
            None => 0,
        };
        let needed = reserved + connections * FDS_PER_CONNECTION + udp_flows;
        let starved = (has_tcp && connections == 0) || (has_udp && udp_flows == 0);
        if needed > nofile || starved {
            let asked = match (
                config.max_connections,
                config.max_udp_flows.filter(|_| has_udp),
            ) {
                (Some(_), Some(_)) => Some("--max-connections and --max-udp-flows"),
                (Some(_), None) => Some("--max-connections"),
                (None, Some(_)) => Some("--max-udp-flows"),
                (None, None) => None,
            };
            let want = needed.max(reserved + FDS_PER_CONNECTION + 1);
            return Err(match asked {
                Some(options) => LaunchError::Usage(format!(
                    "{options} cannot be honoured: {connections} connections and {udp_flows} UDP flows need about {needed} open files ({FDS_PER_CONNECTION} per connection, 1 per flow, {reserved} for lowport, its host sockets and the descriptors it inherited), and the open-file limit is {nofile}; give a lower limit, or raise the open-file limit (ulimit -n {needed}; above the hard limit that needs root or limits.conf)"
                )),
                None => LaunchError::Resources(format!(
                    "the open-file limit ({nofile}) leaves no room to relay: lowport needs {reserved} descriptors for itself, its host sockets and the descriptors it inherited, and {FDS_PER_CONNECTION} per connection; raise it (ulimit -n {want} or more) or publish fewer ports"
                )),
            });
        }
        Ok(Limits {
            connections: connections as usize,
            udp_flows: udp_flows as usize,
        })
    }
}

/// The descriptors lowport needs besides its connections and flows: its own, the pipe pools of its
/// `threads` relay threads, and `host_sockets` (with those it inherited).
fn reserved_fds(host_sockets: usize, threads: usize) -> u64 {
    FDS_OWN + (forward::POOLED_FDS_PER_THREAD * threads) as u64 + host_sockets as u64
}

/// A host port below the host's `ip_unprivileged_port_start` was bound with privilege (a file
/// capability, or root). Handed to the command, such a socket would let it send from that port, which
/// services that trust low source ports (NFS `secure`, rsh) take as proof of root, and even connect
/// out of the host's network namespace (`connect(AF_UNSPEC)` turns a listener back into a plain
/// socket). So it is relayed, never handed over.
fn refuse_privileged_activation(
    specs: &[PublishSpec],
    proc_sys: &std::path::Path,
) -> Result<(), LaunchError> {
    let start = host::unprivileged_port_start(proc_sys);
    match specs
        .iter()
        .find(|s| s.host_port != 0 && s.host_port < start)
    {
        Some(spec) => Err(LaunchError::Usage(format!(
            "--socket-activation cannot hand over host port {} (-p {spec}): ports below {start} need privilege on this host, and a server holding such a socket could send from it as if it were root; drop --socket-activation so lowport relays the port, or publish a host port of {start} or above",
            spec.host_port
        ))),
        None => Ok(()),
    }
}

/// Kills the command's process tree (through its pid-1 helper) and reaps it when dropped with a
/// pid, after a failure that came once the command had started: the kernel kills the rest of the pid
/// namespace with its pid 1. (The helper would die with lowport anyway, but only a reaped child
/// leaves no zombie behind an init that does not reap.)
struct CommandGuard {
    init: Option<nix::unistd::Pid>,
}

impl Drop for CommandGuard {
    fn drop(&mut self) {
        if let Some(init) = self.init {
            let _ = nix::sys::signal::kill(init, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(init, None);
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
        if info.ssi_signo != libc::SIGCHLD as u32 {
            forward_signal(&info, init, child, false);
        }
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
    match nix::sys::signal::kill(init, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(err) => warn!(
            ?sig,
            ?err,
            "cannot pass the signal to the command's pid-1 helper"
        ),
    }
}

#[derive(serde::Serialize)]
struct Ready {
    pid: u32,
    ports: Vec<ReadyPort>,
    #[serde(flatten)]
    reaching: Reaching,
}

/// What the command may reach outside its namespace.
#[derive(serde::Serialize)]
struct Reaching {
    /// `none` or `pasta`.
    net: String,
    /// `--host-loopback` ports, as `3000/tcp` or `8000-8010/tcp`.
    host_loopback: Vec<String>,
    /// The resolvers mirrored inside (`--dns`, or `--net pasta`).
    dns: Vec<String>,
}

/// What `supervise` starts for `--host-loopback` and `--dns`.
struct Outward {
    inner: Vec<outward::Inner>,
    channel: Option<hostside::Channel>,
    resolvers: Vec<std::net::IpAddr>,
    /// Ports the handoff handed over, to mirror inside (see `outward::mirror_handed`).
    handed: Option<tokio::sync::mpsc::UnboundedReceiver<handoff::Handed>>,
}

/// The resolvers of the host's /etc/resolv.conf. With `--dns` (`asked`), a file without one is an
/// error; `--net pasta` goes on without.
fn read_resolvers(asked: bool) -> Result<Vec<std::net::IpAddr>, LaunchError> {
    let path = "/etc/resolv.conf";
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if asked => {
            return Err(LaunchError::Usage(format!(
                "--dns: cannot read {path}: {err}; lowport mirrors the resolvers it names, so names resolve inside as on the host"
            )))
        }
        Err(err) => {
            debug!(?err, "no {path}; no resolver mirrored");
            return Ok(Vec::new());
        }
    };
    let (found, skipped) = outward::nameservers(&text);
    for entry in skipped {
        warn!(entry, "a nameserver of {path} that cannot be reached from inside (a link-local address needs its interface); programs inside skip to the next one");
    }
    if found.is_empty() && asked {
        return Err(LaunchError::Usage(format!(
            "--dns: {path} names no nameserver lowport can mirror; with none, programs inside (and on the host) ask 127.0.0.1:53, which --host-loopback 53/udp --host-loopback 53/tcp would reach"
        )));
    }
    Ok(found)
}

#[derive(serde::Serialize)]
struct ReadyPort {
    protocol: String,
    host_ip: String,
    host_port: u16,
    port: u16,
    /// `handoff` (the server gets the host socket when it binds the port), `relay`, or `activation`.
    mode: &'static str,
}

/// Writes the one JSON line of `--ready-fd` and closes the descriptor, so a reader sees end-of-file.
fn report_ready(
    mut file: std::fs::File,
    pid: u32,
    bound: &[(PublishSpec, SocketAddr, &'static str)],
    reaching: Reaching,
) {
    let ports = bound
        .iter()
        .map(|(spec, addr, mode)| ReadyPort {
            protocol: spec.protocol.to_string(),
            host_ip: addr.ip().to_string(),
            host_port: addr.port(),
            port: spec.port,
            mode,
        })
        .collect();
    let mut line = serde_json::to_string(&Ready {
        pid,
        ports,
        reaching,
    })
    .unwrap_or_default();
    line.push('\n');
    if let Err(err) = file.write_all(line.as_bytes()) {
        warn!(?err, "cannot write the readiness report");
    }
}

/// `--preserve-fds N`: descriptors 3 to 3+N-1 must be open and lowport's to pass on. Sockets of
/// `--socket-activation` or from systemd are numbered from 3 as well, and `--ready-fd` is closed
/// before the command starts, so neither may be among them.
fn check_preserved(config: &Config, given: &activation::Given) -> Result<(), LaunchError> {
    let n = config.preserve_fds;
    if n == 0 {
        return Ok(());
    }
    let last = 3 + n as i64 - 1;
    if config.socket_activation {
        return Err(LaunchError::Usage(format!(
            "--preserve-fds {n} cannot be combined with --socket-activation, which gives the command the host sockets as descriptors from 3 (LISTEN_FDS), where the preserved ones would be; let the server open what else it needs itself"
        )));
    }
    if !given.raw_fds().is_empty() {
        return Err(LaunchError::Usage(format!(
            "--preserve-fds {n}: descriptors from 3 are the sockets systemd gave lowport (LISTEN_FDS), not descriptors to pass on; let the server open what else it needs itself"
        )));
    }
    if let Some(fd) = config
        .ready_fd
        .filter(|&fd| (3..=last).contains(&i64::from(fd)))
    {
        return Err(LaunchError::Usage(format!(
            "--ready-fd {fd} is among the descriptors --preserve-fds {n} passes on (3 to {last}); it is lowport's own and never reaches the command, so give it a number above {last}"
        )));
    }
    init::preserved_not_open(n).map_or(Ok(()), |message| Err(LaunchError::Usage(message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_threads_take_half_the_cpus() {
        assert_eq!(relay_threads(1), 1);
        assert_eq!(relay_threads(2), 1);
        assert_eq!(relay_threads(8), 4);
        assert_eq!(relay_threads(64), 4);
    }

    fn config(publish: &[&str], tcp: Option<usize>, udp: Option<usize>) -> Config {
        Config {
            publish: publish.iter().map(|p| p.parse().unwrap()).collect(),
            userns: userns::Mode::Single,
            port_start: 0,
            ready_fd: None,
            preserve_fds: 0,
            ready_timeout: std::time::Duration::from_secs(90),
            max_connections: tcp,
            max_udp_flows: udp,
            half_closed_timeout: std::time::Duration::from_secs(10),
            preserve_source: true,
            socket_activation: false,
            forward: handoff::Mode::Auto,
            udp_timeout: std::time::Duration::from_secs(60),
            host_loopback: Vec::new(),
            net: Net::None,
            dns: false,
            name: None,
            command: vec!["true".into()],
        }
    }

    #[test]
    fn default_limits_follow_the_open_file_limit() {
        let tcp = config(&["8080:80"], None, None);
        let fit = |nofile| Limits::fit(nofile, reserved_fds(2, 1), Some(&tcp)).unwrap();
        assert_eq!(
            fit(1024).connections as u64,
            (1024 - reserved_fds(2, 1)) / 6
        );
        assert_eq!(fit(1024).udp_flows, 0);
        assert_eq!(fit(1 << 20).connections, 16384);
        let both = config(&["8080:80", "5353:53/udp"], None, None);
        let limits = Limits::fit(20000, reserved_fds(4, 1), Some(&both)).unwrap();
        assert_eq!(limits.udp_flows as u64, (20000 - reserved_fds(4, 1)) / 8);
        assert!(
            reserved_fds(4, 1) + limits.connections as u64 * 6 + limits.udp_flows as u64 <= 20000
        );
        let limits = Limits::fit(1 << 20, reserved_fds(4, 1), Some(&both)).unwrap();
        assert_eq!((limits.connections, limits.udp_flows), (16384, 4096));
    }

    #[test]
    fn explicit_limits_that_do_not_fit_are_refused() {
        let tcp = config(&["8080:80"], Some(5000), None);
        let err = Limits::fit(20000, reserved_fds(2, 1), Some(&tcp)).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(
            text.contains("--max-connections") && text.contains("ulimit -n"),
            "{text}"
        );
        assert!(Limits::fit(40000, reserved_fds(2, 1), Some(&tcp)).is_ok());
        let udp = config(&["5353:53/udp"], None, Some(100_000));
        assert!(Limits::fit(20000, reserved_fds(2, 1), Some(&udp))
            .unwrap_err()
            .to_string()
            .contains("--max-udp-flows"));
    }

    #[test]
    fn a_tiny_open_file_limit_is_named() {
        let tcp = config(&["8080:80"], None, None);
        let err = Limits::fit(40, reserved_fds(2, 1), Some(&tcp)).unwrap_err();
        assert_eq!(err.exit_code(), 125);
        assert!(err.to_string().contains("ulimit -n"), "{err}");
        assert_eq!(
            Limits::fit(40, reserved_fds(2, 1), None).unwrap(),
            Limits {
                connections: 0,
                udp_flows: 0
            }
        );
    }

    #[test]
    fn privileged_host_ports_are_never_handed_over() {
        let dir = std::env::temp_dir().join(format!("lowport-activation-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        std::fs::write(dir.join("net/ipv4/ip_unprivileged_port_start"), "1024\n").unwrap();
        let specs = |list: &[&str]| -> Vec<PublishSpec> {
            list.iter().map(|p| p.parse().unwrap()).collect()
        };
        let err = refuse_privileged_activation(&specs(&["8080:80", "127.0.0.1:700:53/udp"]), &dir)
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("host port 700"), "{err}");
        assert!(refuse_privileged_activation(&specs(&["8080:80", "0:443"]), &dir).is_ok());
        std::fs::write(dir.join("net/ipv4/ip_unprivileged_port_start"), "80\n").unwrap();
        assert!(refuse_privileged_activation(&specs(&["80:80"]), &dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

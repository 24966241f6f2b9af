//! The published ports of a running instance, as `lowport port add|rm` changes them, and the
//! `state.json` that `lowport ps` reads.
//!
//! A port added while the command runs is always relayed: the server bound its sockets long ago, so
//! there is no bind left to answer with the host socket.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use super::control::{HostPort, LivePorts};
use super::{PortState, State};
use crate::forward::{self, Target};
use crate::publish::{Protocol, PublishSpec};

/// How a relay for an added port is set up, as for the ports published at start.
pub struct RelaySetup {
    pub handle: tokio::runtime::Handle,
    pub tcp_limit: Arc<tokio::sync::Semaphore>,
    pub options: forward::Options,
    pub preserve_source: bool,
    pub udp_timeout: std::time::Duration,
    pub udp_flows: crate::udp::FlowBudget,
}

/// One published host socket.
struct Entry {
    spec: PublishSpec,
    addr: SocketAddr,
    mode: &'static str,
    /// Why `rm` cannot withdraw this port, when another holder keeps the socket: the handoff
    /// thread (which keeps its copy until the server binds, then the server has it) or the command
    /// (`--socket-activation`).
    held: Option<&'static str>,
    /// Stops the relay, which then closes its copy.
    remove: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The ports, and where their state is written.
pub struct Live {
    entries: Mutex<Vec<Entry>>,
    state: Mutex<State>,
    dir: PathBuf,
    /// Set when lowport ends: the directory is about to go, and must not be written again.
    pub closed: AtomicBool,
    /// Inner TCP ports whose host socket the server holds (see `outward::mirror_handed`).
    handed: Mutex<std::collections::HashSet<u16>>,
    relay: RelaySetup,
}

/// What a relay task waits on besides its own shutdown: `port rm`. A dropped sender (no instance)
/// never stops it.
pub async fn removed(rx: tokio::sync::oneshot::Receiver<()>) {
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Live {
    pub fn new(dir: PathBuf, state: State, relay: RelaySetup) -> Live {
        Live {
            entries: Mutex::new(Vec::new()),
            state: Mutex::new(state),
            dir,
            closed: AtomicBool::new(false),
            handed: Mutex::default(),
            relay,
        }
    }

    /// Records a port published at start; returns the receiver its relay must also stop on.
    pub fn track(
        &self,
        spec: &PublishSpec,
        addr: SocketAddr,
        mode: &'static str,
        held: Option<&'static str>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock_entries().push(Entry {
            spec: spec.clone(),
            addr,
            mode,
            held,
            remove: Some(tx),
        });
        rx
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that the server holds a host socket for inner TCP port `port`.
    pub fn note_handed(&self, port: u16) {
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
    }

    pub fn ports(&self) -> Vec<PortState> {
        self.lock_entries()
            .iter()
            .map(|e| PortState {
                protocol: e.spec.protocol.to_string(),
                host_ip: e.addr.ip().to_string(),
                host_port: e.addr.port(),
                port: e.spec.port,
                mode: e.mode.to_owned(),
            })
            .collect()
    }

    /// Sets the command's pid, or readiness, and writes `state.json` again.
    pub fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut state);
        self.write(&mut state);
    }

    fn write(&self, state: &mut State) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        state.ports = self.ports();
        if let Err(err) = super::write_state_in(&self.dir, state) {
            let path = self.dir.join("state.json");
            warn!(?err, path = %path.display(), "cannot write the instance's state; lowport ps shows it without");
        }
    }

    fn rewrite(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.write(&mut state);
    }
}

impl LivePorts for Live {
    fn add(&self, spec: PublishSpec, sockets: Vec<OwnedFd>) -> Result<Vec<PortState>, String> {
        let handed = spec.protocol == Protocol::Tcp
            && self
                .handed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&spec.port);
        if handed {
            // The only way to the server would be through its host socket, from the host's
            // loopback: every client of the new port would look like 127.0.0.1 to it.
            return Err(format!(
                "the server took port {} over through a host socket (handoff), so it does not listen on port {} inside; a relayed port would show every client as 127.0.0.1. Publish the port with -p when starting the instance, or run it with --forward relay",
                spec.port, spec.port
            ));
        }
        let mut added = Vec::new();
        for fd in sockets {
            let socket = match spec.protocol {
                Protocol::Tcp => {
                    let listener = std::net::TcpListener::from(fd);
                    crate::host::Bound::Tcp(listener)
                }
                Protocol::Udp => crate::host::Bound::Udp(std::net::UdpSocket::from(fd)),
            };
            let addr = match &socket {
                crate::host::Bound::Tcp(l) => l.local_addr(),
                crate::host::Bound::Udp(u) => u.local_addr(),
            }
            .map_err(|e| format!("the socket that came with the request: {e}"))?;
            let duplicate = self
                .lock_entries()
                .iter()
                .any(|e| e.spec.protocol == spec.protocol && e.addr == addr);
            if duplicate {
                return Err(format!("{addr}/{} is published already", spec.protocol));
            }
            // The relay uses it from its runtime, which wants non-blocking sockets.
            crate::sys::set_nonblocking_flag(socket_fd(&socket), true)
                .map_err(|e| format!("cannot use the socket: {e}"))?;
            added.push((socket, addr));
        }
        for (socket, addr) in added {
            let remove = self.track(&spec, addr, "relay", None);
            let target = Target {
                port: spec.port,
                preserve_source: self.relay.preserve_source,
            };
            match socket {
                crate::host::Bound::Tcp(listener) => {
                    let limit = self.relay.tcp_limit.clone();
                    let options = self.relay.options;
                    let handle = self.relay.handle.clone();
                    let _guard = handle.enter();
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("cannot register the socket: {e}"))?;
                    handle.spawn(async move {
                        forward::serve(listener, target, options, limit, removed(remove)).await;
                    });
                }
                crate::host::Bound::Udp(socket) => {
                    crate::launch::start_udp_relay_removable(
                        vec![(socket, target, remove)],
                        self.relay.udp_timeout,
                        self.relay.udp_flows.clone(),
                    )
                    .map_err(|e| e.to_string())?;
                }
            }
            debug!(%addr, port = spec.port, protocol = %spec.protocol, "port added");
        }
        self.rewrite();
        Ok(self.ports())
    }

    fn remove(&self, which: &HostPort) -> Result<Vec<PortState>, String> {
        let mut entries = self.lock_entries();
        if let Some(entry) = entries
            .iter()
            .find(|e| which.matches(e.spec.protocol, e.addr) && e.held.is_some())
        {
            return Err(format!(
                "host port {}/{} cannot be withdrawn while the command runs: {}; lowport port rm withdraws ports added with lowport port add and ports published with --forward relay",
                entry.addr,
                entry.spec.protocol,
                entry.held.unwrap_or_default()
            ));
        }
        let before = entries.len();
        let mut kept = Vec::new();
        for mut entry in entries.drain(..) {
            if !which.matches(entry.spec.protocol, entry.addr) {
                kept.push(entry);
                continue;
            }
            // The relay closes its socket, the only copy: the host port is free again at once.
            if let Some(remove) = entry.remove.take() {
                let _ = remove.send(());
            }
            debug!(addr = %entry.addr, "port removed");
        }
        let removed = before - kept.len();
        *entries = kept;
        drop(entries);
        if removed == 0 {
            let published: Vec<String> =
                self.ports().iter().map(super::client::port_text).collect();
            return Err(format!(
                "no published port matches {}{}/{}; published: {}",
                which.host_ip.map_or(String::new(), |ip| format!("{ip}:")),
                which.host_port,
                which.protocol,
                if published.is_empty() {
                    "none".to_owned()
                } else {
                    published.join(", ")
                }
            ));
        }
        self.rewrite();
        Ok(self.ports())
    }
}

fn socket_fd(socket: &crate::host::Bound) -> std::os::fd::BorrowedFd<'_> {
    socket.as_fd()
}

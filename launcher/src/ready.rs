//! When the run is ready: once the server accepts on every published port, not once lowport has
//! bound its host sockets (those exist before the command even starts). `--ready-fd` and systemd's
//! `READY=1` (see `notify`) wait for this.
//!
//! A published mapping (`-p 8080:80`, one or two host sockets) is ready when one of its host sockets
//! reaches the server:
//!
//! - handed over (`handoff`): a bind of the server's was answered with the host socket, and that
//!   socket listens (TCP) or is bound (UDP: the bind itself). Asked of the host's network namespace
//!   by a sock_diag socket made there before `unshare`. When lowport hands over the very socket its
//!   relay listened on, that socket listens from the moment of the bind, and connections arriving
//!   before the server's `listen()` wait in its queue for the server's `accept()`.
//! - relayed: something listens (TCP) or is bound (UDP) on the port at 127.0.0.1 or ::1 inside,
//!   where the relay connects; asked of lowport's own network namespace.
//! - `--socket-activation`: at once, since the kernel queues connections on the sockets the command
//!   was given.
//!
//! One host socket is enough for a mapping: a server that listens on IPv4 alone leaves the `[::]`
//! host socket of `-p 8080:80` without a server, and will not change its mind by waiting.
//!
//! Polled every [`POLL`]: an exact sock_diag lookup costs two system calls, and a server is not
//! waited on for ever (`--ready-timeout`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::publish::{Protocol, PublishSpec};
use crate::sockdiag::{TcpLookup, UdpLookup};

/// How often the ports are looked at until they are ready.
pub const POLL: Duration = Duration::from_millis(15);

/// The status lowport exits with when the command was stopped because it did not become ready in
/// time: timeout(1)'s.
pub const TIMED_OUT_STATUS: i32 = 124;

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the command did not become ready within {} (--ready-timeout); lowport stops it (raise --ready-timeout if the server needs longer to start):\n  {}", humantime(*timeout), .missing.join("\n  "))]
    Timeout {
        timeout: Duration,
        /// One sentence per mapping that is not served, naming it and the likely cause.
        missing: Vec<String>,
    },
}

/// One published host socket, as the watcher sees it.
#[derive(Debug)]
pub struct Published {
    pub spec: PublishSpec,
    /// The host address and port as bound.
    pub addr: SocketAddr,
    /// `handoff`, `relay` or `activation`, as in the readiness report.
    pub mode: &'static str,
    /// Set by the handoff thread once the socket is handed to the server; `None` when it never is.
    pub handed: Option<Arc<AtomicBool>>,
}

/// Watches the published ports until the server accepts on each.
pub struct Watch {
    ports: Vec<Published>,
    /// A TCP lookup of the host's network namespace; `None` when nothing is handed over, or when the
    /// kernel answers no such lookup (a handed TCP socket is then ready once handed).
    host: Option<TcpLookup>,
    inner_tcp: Option<Option<TcpLookup>>,
    inner_udp: Option<Option<UdpLookup>>,
}

impl Watch {
    pub fn new(ports: Vec<Published>, host: Option<TcpLookup>) -> Watch {
        Watch {
            ports,
            host,
            inner_tcp: None,
            inner_udp: None,
        }
    }

    /// Waits until every mapping is served; after `timeout`, an error naming those that are not.
    /// Whether every mapping is served already.
    pub fn ready_now(&mut self) -> bool {
        self.missing().is_empty()
    }

    /// Waits until every mapping is served; with `timeout`, not longer.
    pub async fn until_ready(mut self, timeout: Option<Duration>) -> Result<(), ReadyError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let missing = self.missing();
            if missing.is_empty() {
                return Ok(());
            }
            if let (Some(deadline), Some(timeout)) = (deadline, timeout) {
                if tokio::time::Instant::now() < deadline {
                    continue;
                }
                return Err(ReadyError::Timeout {
                    timeout,
                    missing: missing.iter().map(|&i| self.why_not(i)).collect(),
                });
            }
        }
    }

    /// The mappings (by the index of their first host socket) not served yet.
    fn missing(&mut self) -> Vec<usize> {
        let mut missing = Vec::new();
        let mut i = 0;
        while i < self.ports.len() {
            let end = i + self.ports[i..]
                .iter()
                .take_while(|p| p.spec == self.ports[i].spec)
                .count();
            if !(i..end).any(|j| self.served(j)) {
                missing.push(i);
            }
            i = end;
        }
        missing
    }

    /// Whether host socket `i` reaches the server.
    fn served(&mut self, i: usize) -> bool {
        let port = &self.ports[i];
        if port.mode == "activation" {
            return true;
        }
        let protocol = port.spec.protocol;
        if port
            .handed
            .as_ref()
            .is_some_and(|h| h.load(Ordering::Acquire))
        {
            let at = probe_addr(port.addr);
            return match (protocol, &mut self.host) {
                (Protocol::Udp, _) | (Protocol::Tcp, None) => true,
                (Protocol::Tcp, Some(host)) => host.listens(at).unwrap_or_else(|err| {
                    debug!(?err, %at, "cannot look for the server's listener on the host");
                    false
                }),
            };
        }
        let inner = port.spec.port;
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, inner));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, inner));
        match protocol {
            Protocol::Tcp => {
                let Some(lookup) = self.inner_tcp.get_or_insert_with(|| {
                    TcpLookup::open().or_else(|| {
                        warn!("this kernel answers no sock_diag TCP lookups (tcp_diag): lowport cannot tell when the server listens, and reports relayed TCP ports ready at once");
                        None
                    })
                }) else {
                    return true;
                };
                [v4, v6]
                    .into_iter()
                    .any(|at| lookup.listens(at).unwrap_or(false))
            }
            Protocol::Udp => {
                let Some(lookup) = self.inner_udp.get_or_insert_with(|| {
                    UdpLookup::open().or_else(|| {
                        warn!("this kernel answers no sock_diag UDP lookups (udp_diag): lowport cannot tell when the server binds, and reports relayed UDP ports ready at once");
                        None
                    })
                }) else {
                    return true;
                };
                [false, true]
                    .into_iter()
                    .any(|v6| lookup.is_bound(inner, v6).unwrap_or(false))
            }
        }
    }

    /// Why mapping `i` is not served, and what usually causes it.
    fn why_not(&self, i: usize) -> String {
        let port = &self.ports[i];
        let spec = &port.spec;
        let (inner, protocol) = (spec.port, spec.protocol);
        let handed = self
            .ports
            .iter()
            .filter(|p| p.spec == *spec)
            .any(|p| p.handed.as_ref().is_some_and(|h| h.load(Ordering::Acquire)));
        let verb = match protocol {
            Protocol::Tcp => "listens",
            Protocol::Udp => "is bound",
        };
        if handed {
            return format!(
                "-p {spec}: the server bound port {inner} and was handed the host socket, but does not listen on it"
            );
        }
        let handing = self
            .ports
            .iter()
            .any(|p| p.spec == *spec && p.mode == "handoff");
        if handing {
            format!(
                "-p {spec}: the server has not bound port {inner}/{protocol}: no bind of 0.0.0.0:{inner} or [::]:{inner} (which lowport answers with the host socket), and nothing {verb} on 127.0.0.1:{inner} or [::1]:{inner} inside (where the relay connects); does the server use another port, or bind only another address?"
            )
        } else {
            format!(
                "-p {spec}: nothing {verb} on port {inner}/{protocol} at 127.0.0.1 or ::1 inside, where the relay connects; does the server use another port, or bind only another address?"
            )
        }
    }
}

/// The address to look for a host socket's listener at: its own, or the loopback of its family for
/// a wildcard, which a lookup of the wildcard address would not match.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `90s`, `1.5s`, `500ms`.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(spec: &str, addr: &str, mode: &'static str) -> Published {
        Published {
            spec: spec.parse().unwrap(),
            addr: addr.parse().unwrap(),
            mode,
            handed: Some(Arc::new(AtomicBool::new(false))),
        }
    }

    #[test]
    fn wildcards_are_looked_for_on_the_loopback() {
        assert_eq!(
            probe_addr("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            probe_addr("[::]:8080".parse().unwrap()),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            probe_addr("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }

    #[test]
    fn a_mapping_is_ready_with_one_of_its_host_sockets_and_activation_at_once() {
        let mut watch = Watch::new(
            vec![
                published("8080:80/udp", "0.0.0.0:8080", "handoff"),
                published("8080:80/udp", "[::]:8080", "handoff"),
                published("9090:90", "0.0.0.0:9090", "activation"),
            ],
            None,
        );
        // Nothing inside is bound to port 80 in the test's namespace, as a rule; handed counts alone.
        watch.ports[1]
            .handed
            .as_ref()
            .unwrap()
            .store(true, Ordering::Release);
        assert!(watch.missing().is_empty());
    }

    #[test]
    fn the_timeout_names_the_mapping_and_a_likely_cause() {
        let watch = Watch::new(
            vec![
                published("8080:80", "0.0.0.0:8080", "handoff"),
                published("5353:53/udp", "0.0.0.0:5353", "relay"),
            ],
            None,
        );
        let text = ReadyError::Timeout {
            timeout: Duration::from_secs(90),
            missing: vec![watch.why_not(0), watch.why_not(1)],
        }
        .to_string();
        assert!(text.contains("within 90s"), "{text}");
        assert!(
            text.contains("-p 8080:80/tcp: the server has not bound port 80/tcp"),
            "{text}"
        );
        assert!(
            text.contains("-p 5353:53/udp: nothing is bound on port 53/udp"),
            "{text}"
        );
        assert!(text.contains("--ready-timeout"), "{text}");
        assert_eq!(humantime(Duration::from_millis(1500)), "1.5s");
        assert_eq!(humantime(Duration::from_millis(500)), "500ms");
    }
}

//! Binding our own sockets when we were not socket-activated, and explaining bind failures.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use nix::errno::Errno;

use crate::sys;
use crate::whoami;
use crate::Sockets;

/// What to bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindPlan {
    /// One address only; `None` means `0.0.0.0` and, if the host has IPv6, `[::]`.
    pub addr: Option<IpAddr>,
    /// TCP port for HTTP.
    pub port: u16,
    /// UDP echo port, if wanted; bound on the same addresses as TCP.
    pub udp_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A bind that failed; its message names the address, the cause and, where the cause is the
/// environment, what to change.
#[derive(Debug, PartialEq, Eq)]
pub struct BindError {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub errno: Errno,
    hint: Option<String>,
}

impl BindError {
    fn new(addr: SocketAddr, proto: Proto, errno: Errno, explicit_addr: bool) -> Self {
        let port_start = whoami::read_unprivileged_port_start(Path::new(whoami::PROC_ROOT)).ok();
        Self {
            addr,
            proto,
            errno,
            hint: hint(addr.port(), errno, port_start, explicit_addr),
        }
    }
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "",
            Proto::Udp => "udp ",
        };
        write!(f, "cannot bind {proto}{}: {}", self.addr, self.errno.desc())?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.errno)
    }
}

/// The advice that goes with a bind error, if there is any worth giving.
///
/// `port_start` is `net.ipv4.ip_unprivileged_port_start` as read from /proc (it applies to IPv6 too);
/// `explicit_addr` says whether the user chose the address with `--bind`.
pub fn hint(
    port: u16,
    errno: Errno,
    port_start: Option<u32>,
    explicit_addr: bool,
) -> Option<String> {
    match errno {
        Errno::EACCES => {
            let start = port_start.unwrap_or(1024);
            (u32::from(port) < start).then(|| {
                format!(
                    "ports below {start} need root or a lower net.ipv4.ip_unprivileged_port_start; \
                     run it under lowport"
                )
            })
        }
        Errno::EADDRINUSE => {
            Some("another socket already uses this port; stop it or choose another --port".into())
        }
        Errno::EADDRNOTAVAIL if explicit_addr => {
            Some("no network interface here has that address; check --bind".into())
        }
        _ => None,
    }
}

/// Errors that mean "this host has no IPv6", after which the default dual listen carries on with
/// IPv4 alone: the module is absent or disabled (EAFNOSUPPORT, EPROTONOSUPPORT), or no interface
/// has IPv6 (EADDRNOTAVAIL).
fn ipv6_unavailable(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT | Errno::EADDRNOTAVAIL
    )
}

/// Binds the sockets of `plan`. On success also returns the IPv6 failure that was skipped, if the
/// default `[::]` could not be bound because the host has no IPv6, so that the caller can say so.
pub fn bind(plan: &BindPlan) -> Result<(Sockets, Option<BindError>), BindError> {
    let mut sockets = Sockets::default();
    let (addrs, explicit): (&[IpAddr], bool) = match &plan.addr {
        Some(addr) => (std::slice::from_ref(addr), true),
        None => (
            &[
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            false,
        ),
    };
    let mut skipped = None;
    for &ip in addrs {
        // Only the implicit [::] may be skipped; an address the user asked for must work.
        let optional = !explicit && ip.is_ipv6();
        match bind_family(ip, plan, explicit) {
            Ok((tcp, udp)) => {
                sockets.tcp.push(tcp);
                sockets.udp.extend(udp);
            }
            Err(err) if optional && ipv6_unavailable(err.errno) => skipped = Some(err),
            Err(err) => return Err(err),
        }
    }
    Ok((sockets, skipped))
}

fn bind_family(
    ip: IpAddr,
    plan: &BindPlan,
    explicit: bool,
) -> Result<(std::net::TcpListener, Option<std::net::UdpSocket>), BindError> {
    let tcp_addr = SocketAddr::new(ip, plan.port);
    let tcp =
        sys::bind_tcp(tcp_addr).map_err(|e| BindError::new(tcp_addr, Proto::Tcp, e, explicit))?;
    let udp = match plan.udp_port {
        Some(port) => {
            let udp_addr = SocketAddr::new(ip, port);
            Some(
                sys::bind_udp(udp_addr)
                    .map_err(|e| BindError::new(udp_addr, Proto::Udp, e, explicit))?,
            )
        }
        None => None,
    };
    Ok((tcp, udp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_port_permission_hint_names_the_sysctl() {
        let h = hint(80, Errno::EACCES, Some(1024), false).unwrap();
        assert!(h.contains("ports below 1024"), "{h}");
        assert!(h.contains("lowport"), "{h}");
    }

    #[test]
    fn no_low_port_hint_above_the_start() {
        assert_eq!(hint(8080, Errno::EACCES, Some(1024), false), None);
        assert_eq!(hint(80, Errno::EACCES, Some(0), false), None);
    }

    #[test]
    fn addr_not_available_hint_only_for_explicit_bind() {
        assert!(hint(80, Errno::EADDRNOTAVAIL, None, true).is_some());
        assert_eq!(hint(80, Errno::EADDRNOTAVAIL, None, false), None);
    }

    #[test]
    fn message_reads_well() {
        let err = BindError {
            addr: "0.0.0.0:80".parse().unwrap(),
            proto: Proto::Tcp,
            errno: Errno::EACCES,
            hint: hint(80, Errno::EACCES, Some(1024), false),
        };
        assert_eq!(
            err.to_string(),
            "cannot bind 0.0.0.0:80: Permission denied (ports below 1024 need root or a lower \
             net.ipv4.ip_unprivileged_port_start; run it under lowport)"
        );
    }

    #[test]
    fn binds_both_families_on_port_zero() {
        let plan = BindPlan {
            addr: None,
            port: 0,
            udp_port: Some(0),
        };
        let (sockets, skipped) = bind(&plan).expect("bind port 0");
        let expected = if skipped.is_some() { 1 } else { 2 };
        assert_eq!(sockets.tcp.len(), expected);
        assert_eq!(sockets.udp.len(), expected);
    }
}

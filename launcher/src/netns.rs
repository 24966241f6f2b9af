//! The network namespace, seen from inside: loopback up and the namespace's own low-port threshold.
//!
//! A new network namespace has only `lo`, and it is down. `net.ipv4.ip_unprivileged_port_start` is a
//! per-namespace sysctl (ip-sysctl.rst) that the namespace's owner may set, so a server that drops to
//! another uid, or loses its capabilities, can still bind port 80 inside.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::rtnetlink::{Prefix, Rtnl, Selector, TABLE_LOCAL};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot bring up the loopback interface in the new network namespace: {0}")]
    LoopbackUp(#[source] io::Error),
    #[error("cannot set up the routes lowport needs inside ({step}): {source} (the relay binds each client's address, or 192.0.0.8, inside, and --dns listens on each resolver's address; see docs/how-it-works.md)")]
    Routing {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot set net.ipv4.ip_unprivileged_port_start to {value} inside ({path}): {source}{hint}"
    )]
    PortStart {
        value: u16,
        path: String,
        hint: String,
        #[source]
        source: io::Error,
    },
}

/// Brings `lo` up; its addresses 127.0.0.1/8 and ::1 come with it.
pub fn loopback_up() -> Result<(), NetnsError> {
    sys::set_interface_up(c"lo").map_err(NetnsError::LoopbackUp)
}

/// The routing table for IPv6 replies to clients' own addresses.
const TABLE_REPLIES_V6: u32 = 100;

/// Lets the relay connect from each client's own address, with no capability at run time.
///
/// IPv4: a `local 0.0.0.0/0 dev lo src 127.0.0.1` route in the local table makes every address count
/// as this namespace's own. The relay may then bind a client's address and send from it (the kernel
/// checks the local table for both, see `__ip_dev_find`), and whatever the server sends to a client's
/// address comes back over `lo` to the relay's socket; `src 127.0.0.1` makes a UDP server that answers
/// from a wildcard socket answer from 127.0.0.1, the address the relay's flow is connected to. The cost:
/// inside, every IPv4 destination is local, so a connection to an outside address is refused at once
/// instead of failing as unreachable; the namespace has no way out anyway.
///
/// IPv6 checks only configured addresses at bind time, so the relay's sockets use IP_FREEBIND; replies
/// from ::1 are looked up in a table whose default route is `local ::/0 dev lo`, which leaves every other
/// IPv6 lookup as it was.
///
/// With a way out (`--net pasta`) those routes would swallow outbound traffic, and a UDP server answering
/// from a wildcard socket would answer into the outside network. The relay then shows every client that
/// is not on the host's loopback as RFC 7600's 192.0.0.8 (64:ff9b::c000:8 over IPv6), and only these two
/// addresses are made local (`Clients::StandIns`), with 127.0.0.1 and ::1 as the source of what is
/// sent to them, as the relay's flows expect; handed-over sockets see every client as it is.
///
/// The design notes proposed IP_TRANSPARENT instead; it needs CAP_NET_ADMIN or CAP_NET_RAW at every
/// connection, which would keep a capability in the long-running relay. docs/how-it-works.md explains.
pub fn route_replies_to_clients(clients: Clients) -> Result<(), NetnsError> {
    let step = |step: &'static str| move |source: io::Error| NetnsError::Routing { step, source };
    let lo = nix::net::if_::if_nametoindex("lo").map_err(|e| step("find lo")(e.into()))?;
    let mut nl = Rtnl::open().map_err(step("open a netlink socket"))?;
    if clients == Clients::StandIns {
        nl.add_local_route(
            Prefix {
                addr: IpAddr::V4(crate::forward::RELAY_V4),
                len: 32,
            },
            lo,
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            TABLE_LOCAL,
        )
        .map_err(step(
            "ip route add local 192.0.0.8 dev lo src 127.0.0.1 table local",
        ))?;
        match nl.add_local_route(
            Prefix {
                addr: IpAddr::V6(crate::forward::nat64(crate::forward::RELAY_V4)),
                len: 128,
            },
            lo,
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            TABLE_LOCAL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(()),
            other => other.map_err(step(
                "ip -6 route add local 64:ff9b::c000:8 dev lo src ::1 table local",
            ))?,
        }
        return Ok(());
    }
    let any_v4 = Prefix {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    nl.add_local_route(
        any_v4,
        lo,
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        TABLE_LOCAL,
    )
    .map_err(step(
        "ip route add local 0.0.0.0/0 dev lo src 127.0.0.1 table local",
    ))?;

    let inet6 = libc::AF_INET6 as u8;
    let loopback_v6 = Prefix {
        addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
        len: 128,
    };
    let any_v6 = Prefix {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };
    match nl.add_local_route(any_v6, lo, None, TABLE_REPLIES_V6) {
        // A kernel without IPv6 has nothing to set up here.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(()),
        other => other.map_err(step("ip -6 route add local ::/0 dev lo table 100"))?,
    }
    nl.rule(
        true,
        inet6,
        Selector::From(loopback_v6),
        TABLE_REPLIES_V6,
        2,
    )
    .map_err(step("ip -6 rule add from ::1 lookup 100 pref 2"))?;
    Ok(())
}

/// Which client addresses the relay may connect from inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// Each client's own address: every address is local (no way out).
    Own,
    /// 192.0.0.8 and 64:ff9b::c000:8 only, so that outbound traffic leaves.
    StandIns,
}

/// Makes each address local to the namespace (`ip route add local ADDR dev lo table local`), so that
/// lowport can listen on a resolver's address inside and what is sent to it stays inside. Loopback
/// addresses are local already.
pub fn make_local(addrs: &[IpAddr]) -> Result<(), NetnsError> {
    let step = |step: &'static str| move |source: io::Error| NetnsError::Routing { step, source };
    let lo = nix::net::if_::if_nametoindex("lo").map_err(|e| step("find lo")(e.into()))?;
    let mut nl = Rtnl::open().map_err(step("open a netlink socket"))?;
    for addr in addrs.iter().filter(|a| !a.is_loopback()) {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        match nl.add_local_route(Prefix { addr: *addr, len }, lo, None, TABLE_LOCAL) {
            // Local already (the relay's route for every IPv4 address is more general).
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other.map_err(step("ip route add local RESOLVER dev lo table local"))?,
        }
    }
    Ok(())
}

/// Writes `ip_unprivileged_port_start` under `proc_sys` (normally /proc/sys, seen from inside).
pub fn set_unprivileged_port_start(proc_sys: &Path, value: u16) -> Result<(), NetnsError> {
    let path = proc_sys.join("net/ipv4/ip_unprivileged_port_start");
    let result = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()));
    result.map_err(|source| {
        // The kernel rejects a start above the first ephemeral port with EINVAL.
        let hint = if source.raw_os_error() == Some(libc::EINVAL) {
            let range = fs::read_to_string(proc_sys.join("net/ipv4/ip_local_port_range"))
                .unwrap_or_default();
            let first = range
                .split_whitespace()
                .next()
                .unwrap_or("the first port of ip_local_port_range");
            format!(" (the value may not be above {first}; choose a lower --port-start)")
        } else {
            String::new()
        };
        NetnsError::PortStart {
            value,
            path: path.display().to_string(),
            hint,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_start_goes_to_the_sysctl_file() {
        let dir = std::env::temp_dir().join(format!("lowport-netns-{}", std::process::id()));
        fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        fs::write(dir.join("net/ipv4/ip_unprivileged_port_start"), "1024\n").unwrap();
        // A write(2) to a regular file does not replace its content the way a sysctl file does.
        let _ = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(dir.join("net/ipv4/ip_unprivileged_port_start"));
        set_unprivileged_port_start(&dir, 0).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("net/ipv4/ip_unprivileged_port_start")).unwrap(),
            "0\n"
        );
        fs::remove_dir_all(&dir).unwrap();
        let err = set_unprivileged_port_start(&dir, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ip_unprivileged_port_start to 0"), "{err}");
    }
}

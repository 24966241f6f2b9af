//! Whether a UDP datagram to a loopback port inside would find a socket, and whether a TCP connection
//! to an address would find a listener, asked of the kernel with one exact lookup over sock_diag(7):
//! `SOCK_DIAG_BY_FAMILY` with a full socket id, which the kernel answers with the same hash lookup it
//! does for an arriving datagram (`udp_dump_one`) or SYN (`inet_diag_find_one_icsk`). It costs two
//! system calls and does not grow with the number of sockets, unlike formatting /proc/net/udp, which
//! took milliseconds with a few thousand flows open.
//!
//! A sock_diag socket answers for the network namespace it was made in: `launch` makes one before
//! `unshare` to see the host sockets it handed to the server listen (see `ready`).
//!
//! Hand-written like `rtnetlink`: one fixed request (`linux/inet_diag.h`) and its reply.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
/// `INET_DIAG_NOCOOKIE`: match whatever socket the lookup finds.
const NO_COOKIE: u32 = !0;

/// A sock_diag socket of the network namespace it was made in.
struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    fn open() -> Option<Diag> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .ok()?;
        // The kernel answers within the request; a reply that never comes must not hold a relay
        // thread, so a wait beyond this is an error (and lowport falls back to /proc/net/udp).
        socket::setsockopt(
            &fd,
            socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .ok()?;
        Some(Diag { fd, seq: 0 })
    }

    /// Sends the request `make(seq)` and returns the state of the socket found (`idiag_state`), or
    /// `None` when there is none.
    fn ask(&mut self, make: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Option<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = make(self.seq);
        socket::send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut buf = [0u8; 1024];
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if n < 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short sock_diag reply",
                ));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
            if seq != self.seq {
                continue; // a late answer to an earlier request
            }
            return match kind {
                SOCK_DIAG_BY_FAMILY if n >= 18 => Ok(Some(buf[17])),
                NLMSG_ERROR if n >= 20 => {
                    match -i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes")) {
                        libc::ENOENT => Ok(None),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    }
                }
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected sock_diag reply",
                )),
            };
        }
    }
}

/// A sock_diag socket for UDP lookups in the current network namespace.
pub struct UdpLookup(Diag);

impl UdpLookup {
    /// Opens the socket and checks that the kernel answers UDP lookups (udp_diag may be missing): it
    /// must find a socket bound for the purpose. `None` when it cannot.
    pub fn open() -> Option<UdpLookup> {
        let mut lookup = UdpLookup(Diag::open()?);
        let witness = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let port = witness.local_addr().ok()?.port();
        match lookup.is_bound(port, false) {
            Ok(true) => Some(lookup),
            _ => None,
        }
    }

    /// Whether a datagram from the loopback to `port` on 127.0.0.1 (or ::1 when `v6`) would be
    /// delivered to some socket: one bound to that address or to the wildcard, of either family where
    /// the socket accepts both.
    pub fn is_bound(&mut self, port: u16, v6: bool) -> io::Result<bool> {
        Ok(self.0.ask(|seq| request(port, v6, seq))?.is_some())
    }
}

/// `TCP_LISTEN` in `idiag_state`.
const TCP_LISTEN: u8 = 10;

/// A sock_diag socket for TCP listener lookups in the network namespace it was made in.
pub struct TcpLookup(Diag);

impl TcpLookup {
    /// Opens the socket and checks that the kernel answers TCP lookups (tcp_diag may be missing): it
    /// must find a listener made for the purpose, and not find it once closed. `None` when it cannot.
    pub fn open() -> Option<TcpLookup> {
        let mut lookup = TcpLookup(Diag::open()?);
        let witness = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let addr = witness.local_addr().ok()?;
        match lookup.listens(addr) {
            Ok(true) => Some(lookup),
            _ => None,
        }
    }

    /// Whether a connection to `addr` would reach a listening socket: one bound to that address or
    /// to its family's wildcard (or a dual-stack one, for an IPv4 address). A socket that is bound
    /// but does not listen yet is not found.
    pub fn listens(&mut self, addr: SocketAddr) -> io::Result<bool> {
        Ok(self.0.ask(|seq| tcp_request(addr, seq))? == Some(TCP_LISTEN))
    }
}

impl AsRawFd for TcpLookup {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.fd.as_raw_fd()
    }
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for the TCP socket a SYN from the loopback address of
/// `addr`'s family, port 1, to `addr` would reach. For TCP the kernel takes the id's "src" as the
/// socket's own address and "dst" as the peer's (`inet_diag_find_one_icsk`), the other way round from
/// UDP.
fn tcp_request(addr: SocketAddr, seq: u32) -> Vec<u8> {
    let (family, own, peer): (u8, [u8; 16], [u8; 16]) = match addr.ip() {
        IpAddr::V4(ip) => {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            a[..4].copy_from_slice(&ip.octets());
            b[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
            (libc::AF_INET as u8, a, b)
        }
        IpAddr::V6(ip) => (
            libc::AF_INET6 as u8,
            ip.octets(),
            Ipv6Addr::LOCALHOST.octets(),
        ),
    };
    let mut body = Vec::with_capacity(56);
    body.push(family);
    body.push(libc::IPPROTO_TCP as u8);
    body.push(0); // idiag_ext
    body.push(0); // pad
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any
    body.extend_from_slice(&addr.port().to_be_bytes()); // idiag_sport: the socket's port
    body.extend_from_slice(&1u16.to_be_bytes()); // idiag_dport: the peer's port
    body.extend_from_slice(&own); // idiag_src
    body.extend_from_slice(&peer); // idiag_dst
    body.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
    body.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    body.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    crate::rtnetlink::message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, &body)
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for the UDP socket a datagram from the loopback address,
/// port 1, to the loopback address, `port`, would reach. The kernel takes the id's "src" as the
/// datagram's source and "dst" as the socket's own address.
fn request(port: u16, v6: bool, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, [u8; 16]) = if v6 {
        (libc::AF_INET6 as u8, Ipv6Addr::LOCALHOST.octets())
    } else {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
        (libc::AF_INET as u8, a)
    };
    let mut body = Vec::with_capacity(56);
    body.push(family);
    body.push(libc::IPPROTO_UDP as u8);
    body.push(0); // idiag_ext
    body.push(0); // pad
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any
    body.extend_from_slice(&1u16.to_be_bytes()); // idiag_sport: the datagram's source port
    body.extend_from_slice(&port.to_be_bytes()); // idiag_dport: the socket's port
    body.extend_from_slice(&addr); // idiag_src
    body.extend_from_slice(&addr); // idiag_dst
    body.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
    body.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    body.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    crate::rtnetlink::message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_has_the_inet_diag_layout() {
        let msg = request(53, false, 7);
        // nlmsghdr (16) + inet_diag_req_v2 (8 + a 48-byte socket id)
        assert_eq!(msg.len(), 72);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 72);
        assert_eq!(msg[16], libc::AF_INET as u8);
        assert_eq!(msg[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&msg[26..28], &53u16.to_be_bytes());
        assert_eq!(&msg[28..32], &[127, 0, 0, 1]);
    }

    #[test]
    fn finds_a_bound_port_and_not_a_free_one() {
        let Some(mut lookup) = UdpLookup::open() else {
            // lowport falls back to /proc/net/udp there; CI's kernel must have it.
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "this kernel answers no sock_diag UDP lookups (udp_diag), and CI must provide them"
            );
            eprintln!("SKIPPED: this kernel answers no sock_diag UDP lookups (udp_diag)");
            return;
        };
        let bound = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = bound.local_addr().unwrap().port();
        assert!(lookup.is_bound(port, false).unwrap());
        assert!(!lookup.is_bound(port, true).unwrap());
        drop(bound);
        assert!(!lookup.is_bound(port, false).unwrap());
    }

    #[test]
    fn finds_a_listener_and_not_a_socket_only_bound() {
        let Some(mut lookup) = TcpLookup::open() else {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "this kernel answers no sock_diag TCP lookups (tcp_diag), and CI must provide them"
            );
            eprintln!("SKIPPED: this kernel answers no sock_diag TCP lookups (tcp_diag)");
            return;
        };
        let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(lookup
            .listens(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .unwrap());
        drop(listener);
        assert!(!lookup
            .listens(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .unwrap());
        // Bound, not listening: a client would be refused.
        let only_bound = nix::sys::socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 0);
        nix::sys::socket::bind(only_bound.as_raw_fd(), &addr).unwrap();
        let bound: nix::sys::socket::SockaddrIn =
            nix::sys::socket::getsockname(only_bound.as_raw_fd()).unwrap();
        let at = SocketAddr::from((Ipv4Addr::LOCALHOST, bound.port()));
        assert!(!lookup.listens(at).unwrap());
        nix::sys::socket::listen(&only_bound, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        assert!(lookup.listens(at).unwrap());
    }
}

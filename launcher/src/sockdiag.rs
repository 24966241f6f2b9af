//! Whether a UDP datagram to a loopback port inside would find a socket, asked of the kernel with one
//! exact lookup over sock_diag(7): `SOCK_DIAG_BY_FAMILY` for UDP with a full socket id, which the
//! kernel answers with the same hash lookup it does for an arriving datagram (`udp_dump_one`). It
//! costs two system calls and does not grow with the number of sockets, unlike formatting
//! /proc/net/udp, which took milliseconds with a few thousand flows open.
//!
//! Hand-written like `rtnetlink`: one fixed request (`linux/inet_diag.h`) and its reply.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
/// `INET_DIAG_NOCOOKIE`: match whatever socket the lookup finds.
const NO_COOKIE: u32 = !0;

/// A sock_diag socket for UDP lookups in the current network namespace.
pub struct UdpLookup {
    fd: OwnedFd,
    seq: u32,
}

impl UdpLookup {
    /// Opens the socket and checks that the kernel answers UDP lookups (udp_diag may be missing): it
    /// must find a socket bound for the purpose. `None` when it cannot.
    pub fn open() -> Option<UdpLookup> {
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
        let mut lookup = UdpLookup { fd, seq: 0 };
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
        self.seq = self.seq.wrapping_add(1);
        let msg = request(port, v6, self.seq);
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
                SOCK_DIAG_BY_FAMILY => Ok(true),
                NLMSG_ERROR if n >= 20 => {
                    match -i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes")) {
                        libc::ENOENT => Ok(false),
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
}

//! A minimal rtnetlink client: just the route and rule requests that source-address preservation needs
//! (rtnetlink(7)), sent once at set-up inside the new network namespace.
//!
//! Hand-written because the whole need is four fixed requests and their acknowledgements; each message
//! is built in a byte buffer, in the layout `linux/rtnetlink.h` and `linux/fib_rules.h` define.

use std::io;
use std::net::IpAddr;

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;

const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const FR_ACT_TO_TBL: u8 = 1;

/// The kernel's "local" routing table.
pub const TABLE_LOCAL: u32 = 255;

/// A route or rule selector: an address prefix.
#[derive(Clone, Copy, Debug)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    fn family(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => libc::AF_INET as u8,
            IpAddr::V6(_) => libc::AF_INET6 as u8,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
}

/// What a rule selects on.
#[derive(Clone, Copy, Debug)]
pub enum Selector {
    From(Prefix),
    To(Prefix),
    All,
}

/// An open NETLINK_ROUTE socket.
pub struct Rtnl {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )?;
        Ok(Rtnl { fd, seq: 0 })
    }

    /// `ip route add local PREFIX dev IFINDEX [src PREFSRC] table TABLE`
    pub fn add_local_route(
        &mut self,
        dst: Prefix,
        ifindex: u32,
        prefsrc: Option<IpAddr>,
        table: u32,
    ) -> io::Result<()> {
        let mut body = vec![
            dst.family(),
            dst.len,
            0,                                           // src_len
            0,                                           // tos
            if table < 256 { table as u8 } else { 252 }, // RT_TABLE_COMPAT when the attribute carries it
            RTPROT_STATIC,
            RT_SCOPE_HOST,
            RTN_LOCAL,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
        if dst.len > 0 {
            push_attr(&mut body, RTA_DST, &dst.bytes());
        }
        push_attr(&mut body, RTA_OIF, &ifindex.to_ne_bytes());
        if let Some(src) = prefsrc {
            push_attr(
                &mut body,
                RTA_PREFSRC,
                &Prefix { addr: src, len: 0 }.bytes(),
            );
        }
        push_attr(&mut body, RTA_TABLE, &table.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// `ip rule add|del SELECTOR lookup TABLE pref PRIORITY`, for one address family.
    pub fn rule(
        &mut self,
        add: bool,
        family: u8,
        selector: Selector,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        let (dst_len, src_len) = match selector {
            Selector::From(p) => (0, p.len),
            Selector::To(p) => (p.len, 0),
            Selector::All => (0, 0),
        };
        let mut body = vec![
            family,
            dst_len,
            src_len,
            0, // tos
            if table < 256 { table as u8 } else { 252 },
            0,
            0,
            FR_ACT_TO_TBL,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes()); // flags
        match selector {
            Selector::From(p) => push_attr(&mut body, FRA_SRC, &p.bytes()),
            Selector::To(p) => push_attr(&mut body, FRA_DST, &p.bytes()),
            Selector::All => {}
        }
        push_attr(&mut body, FRA_PRIORITY, &priority.to_ne_bytes());
        push_attr(&mut body, FRA_TABLE, &table.to_ne_bytes());
        if add {
            self.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &body)
        } else {
            self.request(RTM_DELRULE, 0, &body)
        }
    }

    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq += 1;
        let msg = message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, body);
        socket::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut buf = [0u8; 8192];
        loop {
            let n = socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                &mut buf,
                MsgFlags::empty(),
            )?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink reply",
                    ));
                }
                if ty == NLMSG_ERROR && seq == self.seq && len >= 20 {
                    let errno = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                rest = &rest[align(len).min(rest.len())..];
            }
        }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align(buf.len()), 0);
}

/// A netlink message: `nlmsghdr` (type `kind`, `flags`, `seq`, port 0) followed by `body`.
pub(crate) fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut buf = Vec::new();
        push_attr(&mut buf, FRA_SRC, &[127, 0, 0, 1]);
        let want = [
            &8u16.to_ne_bytes()[..],
            &FRA_SRC.to_ne_bytes(),
            &[127, 0, 0, 1],
        ]
        .concat();
        assert_eq!(buf, want);
        let mut odd = Vec::new();
        push_attr(&mut odd, RTA_DST, &[1, 2, 3, 4, 5]);
        assert_eq!(odd.len(), 12);
        assert_eq!(
            u16::from_ne_bytes([odd[0], odd[1]]),
            9,
            "the length excludes the padding"
        );
    }

    #[test]
    fn header_carries_the_total_length() {
        let msg = message(RTM_NEWRULE, NLM_F_REQUEST, 7, &[0; 12]);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 28);
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
            RTM_NEWRULE
        );
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
    }
}

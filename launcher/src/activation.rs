//! Sockets that systemd gave lowport itself: socket activation of lowport (`LISTEN_FDS`,
//! sd_listen_fds(3)).
//!
//! A system `.socket` unit binds port 80 as root and starts lowport's service as an ordinary `User=`.
//! `-p` then serves those sockets instead of binding (see [`crate::host::bind_all_given`]): a real
//! host port 80 with no `setcap` on lowport and no host sysctl. A `-p` takes a socket by its port
//! (`-p 80:80`, `-p 127.0.0.1:80:80`) or by its `FileDescriptorName=` (`-p http:80`). Sockets that
//! no `-p` takes (a UNIX socket, say) go on to the command as its own activation, as rootlesskit
//! does: descriptors from 3, with their names, and `LISTEN_PID` set to the command's pid (see
//! `init::pass_listen_fds`).
//!
//! The descriptors are read at launch step 1, before lowport opens anything, and are made
//! close-on-exec at once: every program lowport starts (newuidmap, pasta) would otherwise inherit
//! them, and the forked helpers close them as they close lowport's other descriptors.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::publish::{Protocol, PublishSpec};
use crate::sys;

/// The first descriptor of the protocol (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// More descriptors than this in `LISTEN_FDS` is taken for a mistake, not a list.
const MAX_FDS: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors (from 0 to 65536); whoever started lowport set it wrong (systemd sets it for socket units, systemd-socket-activate for its -l sockets)")]
    BadCount(String),
    #[error("LISTEN_FDNAMES names {names} descriptors where LISTEN_FDS says {fds}; whoever started lowport set them wrong (FileDescriptorName= in the .socket unit, or --fdname of systemd-socket-activate, gives one name per socket)")]
    NamesMismatch { names: usize, fds: usize },
    #[error("descriptor {0} of LISTEN_FDS is not open in lowport; whoever started lowport passed fewer descriptors than LISTEN_FDS says")]
    NotOpen(RawFd),
    #[error("-p {spec}: {given}; a host part that is not a number names sockets systemd passed to lowport (FileDescriptorName= in the .socket unit); to bind a host address, write IP:HOST_PORT:PORT")]
    UnknownName { spec: PublishSpec, given: String },
    #[error("-p {spec}: the socket named '{name}' that lowport was given is {what}, not a {protocol} socket; publish a name of a {protocol} socket (ListenStream= gives TCP, ListenDatagram= UDP), or pass it to the command by leaving it out of -p")]
    WrongKind {
        spec: PublishSpec,
        name: String,
        what: String,
        protocol: Protocol,
    },
}

/// What an inherited descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TCP or UDP socket bound to `addr`: `-p` can serve it.
    Inet {
        protocol: Protocol,
        addr: SocketAddr,
    },
    /// Anything else (a UNIX socket, a FIFO, another protocol), described: only passed on.
    Other(&'static str),
}

/// One descriptor systemd passed to lowport.
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    /// Its name in `LISTEN_FDNAMES` (`unknown` when unnamed, as sd_listen_fds_with_names(3) says).
    pub name: String,
    pub kind: Kind,
}

/// The descriptors lowport was given, in the order it was given them; those a `-p` took are gone.
#[derive(Debug, Default)]
pub struct Given {
    sockets: Vec<Option<Inherited>>,
}

impl Given {
    /// The descriptors that the environment says are lowport's: none unless `LISTEN_PID` is
    /// lowport's own pid (variables meant for another process are not lowport's to use; the command
    /// never sees them either, see `init::caller_environment`).
    pub fn from_env() -> Result<Given, ActivationError> {
        let var = |name| std::env::var(name).ok();
        let listed = parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )?;
        // As sd_listen_fds(3) with unset_environment: the variables describe lowport's descriptors,
        // so no program lowport starts (newuidmap, pasta) is to read them as its own. The command
        // never gets lowport's environment as it is (`init::caller_environment` drops these too).
        // Step 1 runs before lowport starts any thread, as setting the environment requires.
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
        let mut sockets = Vec::new();
        for (fd, name) in listed {
            if !sys::fd_is_open(fd) {
                return Err(ActivationError::NotOpen(fd));
            }
            // Close-on-exec, so no program lowport starts inherits it; `init::pass_listen_fds` gives
            // the command its own copies without the flag. Cannot fail on an open descriptor.
            let _ = sys::set_cloexec(fd, true);
            // SAFETY: `fd` is open (checked above), and lowport has opened nothing yet that could own
            // the number: the protocol's descriptors were open before lowport started. `--ready-fd`,
            // the only other inherited descriptor lowport takes, is refused when it is one of these
            // (`launch::run`).
            let fd = unsafe { sys::own_raw(fd) };
            let kind = identify(fd.as_fd());
            tracing::debug!(fd = fd.as_raw_fd(), name, ?kind, "inherited descriptor");
            sockets.push(Some(Inherited { fd, name, kind }));
        }
        Ok(Given { sockets })
    }

    /// Whether lowport was given nothing (or nothing is left).
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &Inherited> {
        self.sockets.iter().flatten()
    }

    /// The descriptor numbers of every socket still here.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.iter().map(|s| s.fd.as_raw_fd()).collect()
    }

    /// Checks every `-p NAME:PORT` against the names given: each must name at least one socket of
    /// its protocol.
    pub fn check(&self, specs: &[PublishSpec]) -> Result<(), ActivationError> {
        for spec in specs {
            let Some(name) = &spec.fdname else {
                continue;
            };
            let named: Vec<&Inherited> = self.iter().filter(|s| s.name == *name).collect();
            let Some(first) = named.first() else {
                return Err(ActivationError::UnknownName {
                    spec: spec.clone(),
                    given: self.describe_names(name),
                });
            };
            if !named.iter().any(|s| takes(spec, s)) {
                return Err(ActivationError::WrongKind {
                    spec: spec.clone(),
                    name: name.clone(),
                    what: match &first.kind {
                        Kind::Inet { protocol, .. } => format!("a {protocol} socket"),
                        Kind::Other(what) => (*what).to_owned(),
                    },
                    protocol: spec.protocol,
                });
            }
        }
        Ok(())
    }

    fn describe_names(&self, name: &str) -> String {
        let mut names: Vec<&str> = Vec::new();
        for s in self.iter() {
            if !names.contains(&s.name.as_str()) {
                names.push(&s.name);
            }
        }
        if names.is_empty() {
            format!(
                "lowport was given no sockets (no LISTEN_FDS for its pid), so none named '{name}'"
            )
        } else if let [only] = names[..] {
            format!(
                "lowport was given no socket named '{name}'; the only name it was given is {only}"
            )
        } else {
            format!(
                "lowport was given no socket named '{name}'; the names it was given are {}",
                names.join(", ")
            )
        }
    }

    /// The TCP and UDP sockets still here: name, protocol and address.
    pub fn inet(&self) -> Vec<(String, Protocol, SocketAddr)> {
        self.iter()
            .filter_map(|s| match s.kind {
                Kind::Inet { protocol, addr } => Some((s.name.clone(), protocol, addr)),
                Kind::Other(_) => None,
            })
            .collect()
    }

    /// Whether some socket here would serve `spec` (see [`Given::take`]).
    pub fn covers(&self, spec: &PublishSpec) -> bool {
        self.iter().any(|s| takes(spec, s))
    }

    /// Takes out every socket that serves `spec`: by name, those of that name and protocol; by
    /// port, the TCP or UDP sockets bound to the host port (and to the host address, when the spec
    /// gives one). Empty when lowport must bind the spec itself.
    pub fn take(&mut self, spec: &PublishSpec) -> Vec<Inherited> {
        self.sockets
            .iter_mut()
            .filter(|slot| slot.as_ref().is_some_and(|s| takes(spec, s)))
            .filter_map(Option::take)
            .collect()
    }

    /// What no `-p` took, in the order lowport was given it: the command's own activation.
    pub fn rest(self) -> Vec<Inherited> {
        self.sockets.into_iter().flatten().collect()
    }
}

/// Returns once something listens on `spec`'s port inside, where the relay connects. The relay of a
/// TCP socket systemd gave lowport waits for this before it accepts: that socket's first clients
/// connected before lowport even started (that is what started it), and socket activation promises
/// them the server, so they wait in the queue as they would for a server started by systemd, rather
/// than being accepted and refused while the server still starts. With handoff, the server takes
/// the socket with its queue, and the relay never accepts at all.
pub async fn server_listens(spec: PublishSpec, addr: SocketAddr) {
    let watch = crate::ready::Watch::new(
        vec![crate::ready::Published {
            spec,
            addr,
            mode: "relay",
            handed: None,
        }],
        None,
    );
    let _ = watch.until_ready(None).await;
}

/// Whether `spec` serves the inherited socket `s`. Port 0 ("any free port") names no socket.
fn takes(spec: &PublishSpec, s: &Inherited) -> bool {
    let Kind::Inet { protocol, addr } = &s.kind else {
        return false;
    };
    if *protocol != spec.protocol {
        return false;
    }
    match &spec.fdname {
        Some(name) => s.name == *name,
        None => {
            spec.host_port != 0
                && addr.port() == spec.host_port
                && spec.host_ip.is_none_or(|ip| ip == addr.ip())
        }
    }
}

/// The descriptors and names that `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` give the process
/// `own_pid`, as sd_listen_fds_with_names(3) reads them: nothing unless `LISTEN_PID` is that pid;
/// `unknown` for every name when `LISTEN_FDNAMES` is unset.
fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    if pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(own_pid) {
        return Ok(Vec::new());
    }
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let count = fds
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_FDS)
        .ok_or_else(|| ActivationError::BadCount(fds.to_owned()))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<String> = match names {
        Some(list) => list.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count],
    };
    if names.len() != count {
        return Err(ActivationError::NamesMismatch {
            names: names.len(),
            fds: count,
        });
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (FIRST_FD + i as RawFd, name))
        .collect())
}

/// What a descriptor is: for a TCP or UDP socket, its protocol and the address it is bound to.
fn identify(fd: BorrowedFd) -> Kind {
    let option = |name| sys::get_int_option(fd, libc::SOL_SOCKET, name);
    let Ok(domain) = option(libc::SO_DOMAIN) else {
        return Kind::Other("not a socket (a FIFO or a file)");
    };
    match domain {
        libc::AF_INET | libc::AF_INET6 => {}
        libc::AF_UNIX => return Kind::Other("a UNIX socket"),
        _ => return Kind::Other("a socket of another family"),
    }
    let protocol = match (option(libc::SO_TYPE), option(libc::SO_PROTOCOL)) {
        (Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP | libc::IPPROTO_MPTCP)) => Protocol::Tcp,
        (Ok(libc::SOCK_DGRAM), Ok(libc::IPPROTO_UDP)) => Protocol::Udp,
        _ => return Kind::Other("a socket of another protocol"),
    };
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                })
        });
    match addr {
        Some(addr) => Kind::Inet { protocol, addr },
        None => Kind::Other("a socket whose address lowport cannot read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_variables_for_this_pid_count() {
        assert_eq!(parse(None, Some("2"), None, 7).unwrap(), vec![]);
        assert_eq!(parse(Some("8"), Some("2"), None, 7).unwrap(), vec![]);
        assert_eq!(parse(Some("x"), Some("2"), None, 7).unwrap(), vec![]);
        assert_eq!(parse(Some("7"), None, None, 7).unwrap(), vec![]);
        assert_eq!(parse(Some("7"), Some("0"), Some(""), 7).unwrap(), vec![]);
    }

    #[test]
    fn descriptors_start_at_3_with_their_names() {
        assert_eq!(
            parse(Some("7"), Some("2"), Some("http:https"), 7).unwrap(),
            vec![(3, "http".to_owned()), (4, "https".to_owned())]
        );
        assert_eq!(
            parse(Some(" 7\n"), Some("1"), None, 7).unwrap(),
            vec![(3, "unknown".to_owned())]
        );
        // An empty name is a name (systemd writes one for a socket it could not name).
        assert_eq!(
            parse(Some("7"), Some("2"), Some(":b"), 7).unwrap(),
            vec![(3, String::new()), (4, "b".to_owned())]
        );
    }

    #[test]
    fn malformed_variables_are_named() {
        let err = parse(Some("7"), Some("two"), None, 7).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS=\"two\""), "{err}");
        assert!(parse(Some("7"), Some("-1"), None, 7).is_err());
        assert!(parse(Some("7"), Some("99999999"), None, 7).is_err());
        let err = parse(Some("7"), Some("2"), Some("web"), 7).unwrap_err();
        assert!(
            err.to_string()
                .contains("names 1 descriptors where LISTEN_FDS says 2"),
            "{err}"
        );
    }

    fn inherited(fd: OwnedFd, name: &str) -> Option<Inherited> {
        let kind = identify(fd.as_fd());
        Some(Inherited {
            fd,
            name: name.to_owned(),
            kind,
        })
    }

    fn spec(s: &str) -> PublishSpec {
        s.parse().unwrap()
    }

    #[test]
    fn sockets_are_told_apart() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        assert_eq!(
            identify(tcp.as_fd()),
            Kind::Inet {
                protocol: Protocol::Tcp,
                addr
            }
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            identify(udp.as_fd()),
            Kind::Inet {
                protocol: Protocol::Udp,
                ..
            }
        ));
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(identify(unix.as_fd()), Kind::Other("a UNIX socket"));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(identify(file.as_fd()), Kind::Other(w) if w.starts_with("not a socket")));
    }

    #[test]
    fn publish_takes_by_port_address_or_name() {
        let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = web.local_addr().unwrap().port();
        let dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns_port = dns.local_addr().unwrap().port();
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let given = || Given {
            sockets: vec![
                inherited(web.try_clone().unwrap().into(), "web"),
                inherited(dns.try_clone().unwrap().into(), "dns"),
                inherited(OwnedFd::from(unix.try_clone().unwrap()), "ctl"),
            ],
        };

        // By port: any address when the spec gives none; the protocol must match.
        let mut g = given();
        assert!(g.covers(&spec(&format!("{port}:80"))));
        assert!(!g.covers(&spec(&format!("{port}:80/udp"))));
        assert!(!g.covers(&spec(&format!("127.0.0.2:{port}:80"))));
        assert!(!g.covers(&spec("0:80")));
        let taken = g.take(&spec(&format!("127.0.0.1:{port}:80")));
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].name, "web");
        assert!(
            g.take(&spec(&format!("{port}:80"))).is_empty(),
            "taken once"
        );
        assert_eq!(g.take(&spec(&format!("{dns_port}:53/udp"))).len(), 1);
        let rest = g.rest();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].name, "ctl");

        // By name.
        let mut g = given();
        g.check(&[spec("web:80"), spec("dns:53/udp")]).unwrap();
        assert_eq!(g.take(&spec("web:80")).len(), 1);
        assert_eq!(
            g.rest().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["dns", "ctl"]
        );
    }

    #[test]
    fn a_bad_name_is_refused_with_the_names_given() {
        let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let g = Given {
            sockets: vec![
                inherited(web.into(), "web"),
                inherited(OwnedFd::from(unix), "ctl"),
            ],
        };
        let err = g.check(&[spec("www:80")]).unwrap_err().to_string();
        assert!(
            err.contains("no socket named 'www'") && err.contains("are web, ctl"),
            "{err}"
        );
        let one = Given {
            sockets: vec![inherited(
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().into(),
                "web",
            )],
        };
        let err = one.check(&[spec("www:80")]).unwrap_err().to_string();
        assert!(err.contains("the only name it was given is web"), "{err}");
        let err = g.check(&[spec("web:53/udp")]).unwrap_err().to_string();
        assert!(err.contains("is a tcp socket, not a udp socket"), "{err}");
        let err = g.check(&[spec("ctl:80")]).unwrap_err().to_string();
        assert!(err.contains("is a UNIX socket"), "{err}");
        let err = Given::default()
            .check(&[spec("web:80")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("given no sockets"), "{err}");
    }
}

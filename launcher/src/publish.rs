//! The `-p, --publish [HOST_IP:]HOST_PORT:PORT[/tcp|/udp]` specification.
//!
//! The syntax follows docker and podman, so existing muscle memory works: `8080:80`,
//! `127.0.0.1:8080:80`, `[::1]:8080:80`, `0:80` (the host picks a free port), and an optional `/tcp` or
//! `/udp`.
//!
//! When lowport itself was started by systemd's socket activation, the host part may instead name the
//! sockets it was given (`FileDescriptorName=` in the `.socket` unit, `LISTEN_FDNAMES`): `http:80`
//! serves the sockets named `http` on port 80 inside (see [`crate::activation`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A transport protocol that a mapping forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
        }
    }
}

/// One `--publish` mapping as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishSpec {
    /// The host address to listen on; `None` means every address of both families, as docker does.
    pub host_ip: Option<IpAddr>,
    /// The host port; 0 lets the kernel pick a free one.
    pub host_port: u16,
    /// The port inside the namespace that connections are relayed to.
    pub port: u16,
    pub protocol: Protocol,
    /// The name of inherited sockets to serve (`NAME:PORT`), in place of a host address and port;
    /// `host_ip` is then `None` and `host_port` 0.
    pub fdname: Option<String>,
}

impl PublishSpec {
    /// The host addresses to bind for this mapping, in order.
    pub fn host_addrs(&self) -> Vec<IpAddr> {
        match self.host_ip {
            Some(ip) => vec![ip],
            None => vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
        }
    }
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.fdname {
            return write!(f, "{name}:{}/{}", self.port, self.protocol);
        }
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}:{}/{}", self.host_port, self.port, self.protocol)
    }
}

/// Why a `--publish` value was rejected. Each message quotes the offending token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("'{0}' is empty; expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp], for example 8080:80")]
    Empty(String),
    #[error("'{spec}' has no host port; expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp], for example 8080:{spec}")]
    MissingHostPort { spec: String },
    #[error("'{token}' in '{spec}' is not a port; expected a number from {min} to 65535")]
    BadPort {
        spec: String,
        token: String,
        min: u16,
    },
    #[error("'{token}' in '{spec}' is not an IP address; write IPv6 addresses in brackets, as in [::1]:8080:80")]
    BadAddress { spec: String, token: String },
    #[error("'{token}' in '{spec}' is not a supported protocol; use tcp or udp")]
    BadProtocol { spec: String, token: String },
    #[error("'{spec}' has too many parts; expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp] (port ranges are not supported)")]
    TooManyParts { spec: String },
}

impl FromStr for PublishSpec {
    type Err = PublishError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        parse(spec)
    }
}

/// Parses one `--publish` value.
pub fn parse(spec: &str) -> Result<PublishSpec, PublishError> {
    if spec.trim().is_empty() {
        return Err(PublishError::Empty(spec.to_owned()));
    }
    let (addr_ports, protocol) = match spec.rsplit_once('/') {
        Some((rest, proto)) => (rest, parse_protocol(spec, proto)?),
        None => (spec, Protocol::Tcp),
    };

    // An IPv6 host address comes in brackets, the only place where a colon may not separate fields.
    let (host_ip, ports) = if let Some(rest) = addr_ports.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| PublishError::BadAddress {
                spec: spec.to_owned(),
                token: addr_ports.to_owned(),
            })?;
        let ip = Ipv6Addr::from_str(ip).map_err(|_| PublishError::BadAddress {
            spec: spec.to_owned(),
            token: format!("[{ip}]"),
        })?;
        let ports = after
            .strip_prefix(':')
            .ok_or_else(|| PublishError::MissingHostPort {
                spec: spec.to_owned(),
            })?;
        (Some(IpAddr::V6(ip)), ports)
    } else {
        let fields: Vec<&str> = addr_ports.split(':').collect();
        match fields.len() {
            1 => {
                return Err(PublishError::MissingHostPort {
                    spec: spec.to_owned(),
                })
            }
            2 => (None, addr_ports),
            3 => {
                let ip = Ipv4Addr::from_str(fields[0]).map_err(|_| PublishError::BadAddress {
                    spec: spec.to_owned(),
                    token: fields[0].to_owned(),
                })?;
                (Some(IpAddr::V4(ip)), &addr_ports[fields[0].len() + 1..])
            }
            _ if fields.len() > 3
                && fields[..fields.len() - 2].iter().any(|f| {
                    f.is_empty()
                        || f.chars()
                            .any(|c| c.is_ascii_hexdigit() && !c.is_ascii_digit())
                }) =>
            {
                let token = fields[..fields.len() - 2].join(":");
                return Err(PublishError::BadAddress {
                    spec: spec.to_owned(),
                    token,
                });
            }
            _ => {
                return Err(PublishError::TooManyParts {
                    spec: spec.to_owned(),
                })
            }
        }
    };

    let (host_port, port) = ports
        .split_once(':')
        .ok_or_else(|| PublishError::MissingHostPort {
            spec: spec.to_owned(),
        })?;
    if host_ip.is_none() && is_fdname(host_port) {
        return Ok(PublishSpec {
            host_ip: None,
            host_port: 0,
            port: parse_port(spec, port, 1)?,
            protocol,
            fdname: Some(host_port.to_owned()),
        });
    }
    if port.contains(':') {
        return Err(PublishError::TooManyParts {
            spec: spec.to_owned(),
        });
    }
    Ok(PublishSpec {
        host_ip,
        host_port: parse_port(spec, host_port, 0)?,
        port: parse_port(spec, port, 1)?,
        protocol,
        fdname: None,
    })
}

/// Whether a host part is the name of inherited sockets: it starts with a letter or `_` and, as
/// systemd's `FileDescriptorName=` allows, holds printable ASCII but for the characters that
/// separate this syntax's fields. A host part that is a number or an address, or begins with `+`,
/// stays what it was.
fn is_fdname(token: &str) -> bool {
    token.len() <= 255
        && token
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && token
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, ':' | '/' | '[' | ']'))
}

fn parse_port(spec: &str, token: &str, min: u16) -> Result<u16, PublishError> {
    let bad = || PublishError::BadPort {
        spec: spec.to_owned(),
        token: token.to_owned(),
        min,
    };
    // u16::from_str accepts a leading '+', which no one means in a port.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match token.parse::<u16>() {
        Ok(port) if port >= min => Ok(port),
        _ => Err(bad()),
    }
}

fn parse_protocol(spec: &str, token: &str) -> Result<Protocol, PublishError> {
    match token.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(PublishError::BadProtocol {
            spec: spec.to_owned(),
            token: token.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> PublishSpec {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn host_and_inner_port() {
        assert_eq!(
            ok("8080:80"),
            PublishSpec {
                host_ip: None,
                host_port: 8080,
                port: 80,
                protocol: Protocol::Tcp,
                fdname: None,
            }
        );
    }

    #[test]
    fn host_port_zero_means_any() {
        assert_eq!(ok("0:80").host_port, 0);
    }

    #[test]
    fn ipv4_host_address() {
        let p = ok("127.0.0.1:8080:80/tcp");
        assert_eq!(p.host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((p.host_port, p.port), (8080, 80));
    }

    #[test]
    fn ipv6_host_address_in_brackets() {
        let p = ok("[::1]:8443:443");
        assert_eq!(p.host_ip, Some("::1".parse().unwrap()));
        assert_eq!((p.host_port, p.port), (8443, 443));
        assert_eq!(p.to_string(), "[::1]:8443:443/tcp");
    }

    #[test]
    fn protocol_is_case_insensitive() {
        assert_eq!(ok("1:2/TCP").protocol, Protocol::Tcp);
        assert_eq!(ok("5353:53/udp").protocol, Protocol::Udp);
        assert_eq!(ok("[::]:5353:53/UDP").to_string(), "[::]:5353:53/udp");
    }

    #[test]
    fn both_families_when_no_address() {
        assert_eq!(ok("8080:80").host_addrs().len(), 2);
        assert_eq!(ok("127.0.0.1:8080:80").host_addrs().len(), 1);
    }

    #[test]
    fn a_name_stands_for_inherited_sockets() {
        let p = ok("http:80");
        assert_eq!(p.fdname.as_deref(), Some("http"));
        assert_eq!((p.host_ip, p.host_port, p.port), (None, 0, 80));
        assert_eq!(p.to_string(), "http:80/tcp");
        let p = ok("lowport-web.socket:443");
        assert_eq!(p.fdname.as_deref(), Some("lowport-web.socket"));
        let p = ok("dns:53/udp");
        assert_eq!(
            (p.fdname.as_deref(), p.protocol),
            (Some("dns"), Protocol::Udp)
        );
        assert_eq!(ok("_x@1:8").fdname.as_deref(), Some("_x@1"));
        // Numbers and addresses keep their meaning.
        assert_eq!(ok("8080:80").fdname, None);
        assert_eq!(ok("127.0.0.1:8080:80").fdname, None);
    }

    #[test]
    fn errors_quote_the_bad_token() {
        let cases = [
            ("", "is empty"),
            ("80", "no host port"),
            ("8080:http", "'http' in '8080:http' is not a port"),
            ("8080:0", "'0' in '8080:0' is not a port"),
            ("70000:80", "'70000'"),
            ("+80:80", "'+80'"),
            ("localhost:8080:80", "'localhost' in"),
            ("[::1:8080:80", "is not an IP address"),
            ("[fe80::zz]:1:2", "'[fe80::zz]'"),
            ("::1:8080:80", "brackets"),
            (
                "8080:80/sctp",
                "'sctp' in '8080:80/sctp' is not a supported protocol",
            ),
            ("1.2.3.4:1:2:3", "too many parts"),
            ("[::1]8080:80", "no host port"),
            ("http:80:81", "'http' in 'http:80:81' is not an IP address"),
            ("http:x", "'x' in 'http:x' is not a port"),
            ("http:0", "'0' in 'http:0' is not a port"),
        ];
        for (input, want) in cases {
            let err = parse(input).expect_err(input).to_string();
            assert!(
                err.contains(want),
                "{input:?}: {err:?} does not contain {want:?}"
            );
        }
    }
}

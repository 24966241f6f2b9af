//! The `/whoami` report: identity, capabilities and id maps as this process sees them, plus the
//! addresses of the connection that asked.
//!
//! This is what lets a user (or a test) check from the outside that lowport did its job: inside the
//! namespaces we should be uid 0 with a one-line uid_map, hold `cap_net_bind_service`, and see the
//! real client address, not the relay's.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Serialize;

/// Where procfs is mounted. A parameter everywhere below so that tests can point at a directory.
pub const PROC_ROOT: &str = "/proc";

/// Everything `/whoami` answers. Fields that come from files carry a `*_error` companion, present
/// only when the read failed, so that one unreadable file does not hide the rest of the report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    pub effective_caps: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_caps_error: Option<String>,
    pub uid_map: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid_map_error: Option<String>,
    pub gid_map: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid_map_error: Option<String>,
    pub ip_unprivileged_port_start: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_unprivileged_port_start_error: Option<String>,
    pub local_addr: String,
    pub peer_addr: String,
    pub peer_ip: String,
    pub peer_port: u16,
    pub pid: u32,
    pub activated: bool,
}

impl Report {
    /// Gathers the report for a connection from `peer` accepted on `local`.
    pub fn gather(proc_root: &Path, local: SocketAddr, peer: SocketAddr, activated: bool) -> Self {
        let (effective_caps, effective_caps_error) = effective_caps();
        let (uid_map, uid_map_error) = split(read_text(&proc_root.join("self/uid_map")));
        let (gid_map, gid_map_error) = split(read_text(&proc_root.join("self/gid_map")));
        let (port_start, port_start_error) = split(read_unprivileged_port_start(proc_root));
        let local = canonical(local);
        let peer = canonical(peer);
        Self {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
            effective_caps,
            effective_caps_error,
            uid_map,
            uid_map_error,
            gid_map,
            gid_map_error,
            ip_unprivileged_port_start: port_start,
            ip_unprivileged_port_start_error: port_start_error,
            local_addr: local.to_string(),
            peer_addr: peer.to_string(),
            peer_ip: peer.ip().to_string(),
            peer_port: peer.port(),
            pid: std::process::id(),
            activated,
        }
    }

    /// The response body: pretty JSON (people read it with curl) ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers to a Vec cannot fail; fall back to an empty
        // object rather than panic should that ever change.
        let mut body = serde_json::to_vec_pretty(self).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        body
    }
}

/// Reports `::ffff:a.b.c.d` as `a.b.c.d`: a dual-stack IPv6 socket (which an activating parent may
/// pass us) sees IPv4 clients that way, and the client's address is what the user wants to see.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Effective capabilities as sorted lowercase names (`cap_net_bind_service`), the spelling of
/// capabilities(7) and of `capsh`.
fn effective_caps() -> (Vec<String>, Option<String>) {
    match caps::read(None, caps::CapSet::Effective) {
        Ok(set) => {
            let mut names: Vec<String> = set
                .iter()
                .map(|c| c.to_string().to_ascii_lowercase())
                .collect();
            names.sort();
            (names, None)
        }
        Err(err) => (Vec::new(), Some(format!("cannot read capabilities: {err}"))),
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads `net.ipv4.ip_unprivileged_port_start` under `proc_root`.
pub fn read_unprivileged_port_start(proc_root: &Path) -> Result<u32, String> {
    let path = proc_root.join("sys/net/ipv4/ip_unprivileged_port_start");
    let text = read_text(&path)?;
    parse_port_start(&text).map_err(|e| {
        format!(
            "{} holds {:?}, not a number: {e}",
            path.display(),
            text.trim()
        )
    })
}

fn parse_port_start(text: &str) -> Result<u32, std::num::ParseIntError> {
    text.trim().parse()
}

fn split<T>(r: Result<T, String>) -> (Option<T>, Option<String>) {
    match r {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_peers_are_reported_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:41234".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1:41234".parse().unwrap());
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn port_start_from_a_fake_proc() {
        let dir = std::env::temp_dir().join(format!("demo-server-test-{}", std::process::id()));
        let sys = dir.join("sys/net/ipv4");
        fs::create_dir_all(&sys).unwrap();
        fs::write(sys.join("ip_unprivileged_port_start"), "0\n").unwrap();
        assert_eq!(read_unprivileged_port_start(&dir), Ok(0));
        fs::write(sys.join("ip_unprivileged_port_start"), "lots\n").unwrap();
        let err = read_unprivileged_port_start(&dir).unwrap_err();
        assert!(err.contains("\"lots\""), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn report_is_json_with_a_trailing_newline() {
        let local = "127.0.0.1:80".parse().unwrap();
        let peer = "[::ffff:10.0.0.2]:999".parse().unwrap();
        let report = Report::gather(Path::new(PROC_ROOT), local, peer, true);
        let body = report.to_json();
        assert_eq!(body.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["peer_ip"], "10.0.0.2");
        assert_eq!(v["peer_port"], 999);
        assert_eq!(v["activated"], true);
        assert!(v["effective_caps"].is_array());
    }
}

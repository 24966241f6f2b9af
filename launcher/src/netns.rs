//! The network namespace, seen from inside: loopback up and the namespace's own low-port threshold.
//!
//! A new network namespace has only `lo`, and it is down. `net.ipv4.ip_unprivileged_port_start` is a
//! per-namespace sysctl (ip-sysctl.rst) that the namespace's owner may set, so a server that drops to
//! another uid, or loses its capabilities, can still bind port 80 inside.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot bring up the loopback interface in the new network namespace: {0}")]
    LoopbackUp(#[source] io::Error),
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

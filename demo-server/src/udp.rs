//! UDP echo: every datagram is answered, to its sender, with a line of JSON saying who sent it and
//! how long it was. That shows whether a UDP relay preserves the client's address and whole
//! datagrams, which an echo of the payload itself would not.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::server::stopped;
use crate::sys;
use crate::whoami::canonical;

/// Big enough for any UDP payload (65507 bytes over IPv4, 65527 over IPv6), so that no datagram is
/// silently truncated and misreported.
const RECV_BUFFER: usize = 65536;

/// Pause after an unexpected receive error, so that a persistent one cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

#[derive(Debug, Serialize)]
struct Reply {
    peer_ip: String,
    peer_port: u16,
    len: usize,
}

/// The reply to a datagram of `len` bytes from `peer`: `{"peer_ip":"…","peer_port":N,"len":N}\n`.
pub fn reply(peer: SocketAddr, len: usize) -> Vec<u8> {
    let peer = canonical(peer);
    let reply = Reply {
        peer_ip: peer.ip().to_string(),
        peer_port: peer.port(),
        len,
    };
    // A struct of a string and two integers always serializes; never panic if that changes.
    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Answers datagrams on `socket` until `shutdown` turns true.
pub async fn serve(socket: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let received = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            r = socket.recv_from(&mut buf) => r,
        };
        match received {
            Ok((len, peer)) => {
                // A reply that cannot be sent (the sender's buffer or route is gone) is the
                // sender's problem; keep serving everyone else.
                let _ = socket.send_to(&reply(peer, len), peer).await;
            }
            Err(err) => {
                let local = socket
                    .local_addr()
                    .map_or_else(|_| "udp socket".to_owned(), |a| a.to_string());
                eprintln!(
                    "demo-server: receive on {local} (udp) failed: {}",
                    sys::describe(sys::io_errno(&err))
                );
                tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(ERROR_PAUSE) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_is_one_json_line() {
        let peer = "[::ffff:127.0.0.9]:5555".parse().unwrap();
        assert_eq!(
            reply(peer, 12),
            b"{\"peer_ip\":\"127.0.0.9\",\"peer_port\":5555,\"len\":12}\n".to_vec()
        );
    }
}

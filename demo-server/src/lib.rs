//! demo-server: a small HTTP server that reports what it sees from inside lowport's namespaces.
//!
//! # Layout
//!
//! - [`activation`]: systemd-style socket activation (`LISTEN_PID`/`LISTEN_FDS`); adopts the
//!   inherited sockets.
//! - [`bind`]: otherwise binds `0.0.0.0` and `[::]` (or `--bind`), and explains bind failures.
//! - `sys`: the kernel edge; the only place with raw descriptors and `unsafe`.
//! - [`server`]: accept loops, per-connection hyper tasks, the graceful stop.
//! - [`http`]: the routes (`/`, `/healthz`, `/whoami`, `/echo`).
//! - [`whoami`]: the identity/capability/id-map report behind `/whoami`.
//! - [`udp`]: the `--udp-echo` responder.
//!
//! A start goes: `main` parses the command line, takes inherited sockets from [`activation`] or
//! binds with [`bind`], registers for SIGTERM/SIGINT, then hands the sockets and the signal future
//! to [`server::run`], which serves until the signal and drains for up to five seconds.

pub mod activation;
pub mod bind;
pub mod http;
pub mod server;
mod sys;
pub mod udp;
pub mod whoami;

/// Sockets to serve, already bound (and, for TCP, listening), in non-blocking mode.
#[derive(Debug, Default)]
pub struct Sockets {
    pub tcp: Vec<std::net::TcpListener>,
    pub udp: Vec<std::net::UdpSocket>,
}

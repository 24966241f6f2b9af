//! lowport runs a server in its own user and network namespaces, where it is uid 0 and may bind port
//! 80, and forwards host ports to it, all without any privilege on the host.
//!
//! # Layout
//!
//! [`cli`] defines the command line, for `lowport` and for the man pages and completions that
//! `lowport-docs` writes.
//!
//! A launch ([`launch::run`]) flows through the modules in this order:
//!
//! - [`publish`]: parses `-p [HOST_IP:]HOST_PORT:PORT[/tcp]`.
//! - [`activation`]: the sockets systemd gave lowport itself (`LISTEN_FDS`), which `-p` serves or the
//!   command gets.
//! - [`host`]: binds the host sockets, in the host's network namespace, before anything else changes.
//! - [`capabilities`]: drops every capability once the host sockets exist, and again after set-up.
//! - [`userns`]: plans the uid/gid maps (single id, or /etc/subuid ranges through newuidmap), diagnoses
//!   a refused `unshare`, and writes the maps.
//! - [`netns`]: inside the new network namespace, brings `lo` up and sets `ip_unprivileged_port_start`.
//! - [`init`]: starts a pid-1 helper in a new pid namespace and the command under it; the helper
//!   forwards signals, reaps, and dies with the launcher, taking every process of the command along.
//! - [`hostside`]: a process left in the host's network namespace that makes host sockets later on
//!   and starts pasta.
//! - [`handoff`]: answers the server's bind of a published port with the host socket itself.
//! - [`outward`]: `--host-loopback` and `--dns`: chosen host services and resolvers, mirrored inside.
//! - [`pasta`]: `--net pasta`, full outbound traffic through pasta.
//! - [`forward`]: relays each host connection to the port inside with splice(2), on a tokio runtime
//!   that starts only after the namespaces exist.
//! - [`udp`]: the UDP relay, one inner socket per client flow, bounded; [`sockdiag`] tells it which
//!   family a port's server listens on.
//! - [`ready`]: when the server accepts on every published port; then `--ready-fd` and [`notify`]
//!   (systemd's `READY=1`) report it.
//! - [`rtnetlink`]: the routes that let the relay connect from a client's own address.
//! - [`sys`]: the few raw system calls, and every `unsafe` block.
//!
//! [`instance`] keeps a run's name and state (`$XDG_RUNTIME_DIR/lowport/NAME/`) and answers
//! `lowport ps`, `exec`, `stop` and `port` on a control socket; [`init`] gives the command a
//! private /proc in a mount namespace of its own.
//!
//! [`doctor`] (`lowport doctor`) runs the namespace, id-mapping and handoff steps of a launch in
//! forked children and reads what the other modules read, to say what this machine allows.

pub mod activation;
pub mod capabilities;
pub mod cli;
pub mod doctor;
pub mod forward;
pub mod handoff;
pub mod host;
pub mod hostside;
pub mod init;
pub mod instance;
pub mod launch;
pub mod netns;
pub mod notify;
pub mod outward;
pub mod pasta;
pub mod publish;
pub mod ready;
pub mod rtnetlink;
pub mod sockdiag;
pub mod sys;
pub mod udp;
pub mod userns;

pub use launch::{run, Config, LaunchError};

//! demo-server: command line, start-up messages and exit status. The work is in the library.

use std::net::IpAddr;
use std::process::ExitCode;

use clap::Parser;

use demo_server::bind::{self, BindPlan};
use demo_server::{activation, server, Sockets};

/// A small HTTP server that reports what it sees: run it under lowport to check that a server in
/// the user and network namespaces gets port 80, uid 0 and the real client address.
#[derive(Debug, Parser)]
#[command(
    name = "demo-server",
    version,
    after_help = "\
Endpoints:
  GET  /         a short fixed text (the benchmark target)
  GET  /healthz  \"ok\"
  GET  /whoami   JSON: uid, gid, euid, egid, effective capabilities, uid_map, gid_map,
                 net.ipv4.ip_unprivileged_port_start, the connection's local and peer address,
                 pid, and whether the sockets were inherited (socket activation)
  POST /echo     streams the request body back as it arrives (any size)

Socket activation: when LISTEN_PID is this process's pid and LISTEN_FDS=N, demo-server serves the
N inherited sockets on fds 3.. (listening TCP sockets as HTTP, UDP sockets as the UDP echo) and
ignores --bind, --port and --udp-echo.

SIGTERM or SIGINT stops accepting, lets requests in flight finish (at most 5 s) and exits 0."
)]
struct Cli {
    /// Listen only on this address (IPv4 or IPv6, e.g. 127.0.0.1 or ::1). Without it, listen on
    /// 0.0.0.0 and, if the host has IPv6, on [::] as well. IPv6 sockets are IPv6-only, so IPv4
    /// clients always arrive on the IPv4 socket.
    #[arg(long, value_name = "ADDR", value_parser = parse_ip)]
    bind: Option<IpAddr>,

    /// TCP port for HTTP. Ports below net.ipv4.ip_unprivileged_port_start (1024 by default) need
    /// root or CAP_NET_BIND_SERVICE, which is what lowport provides.
    #[arg(long, short, value_name = "N", default_value_t = 80)]
    port: u16,

    /// Also answer UDP datagrams on this port, on the same addresses as HTTP: each datagram gets a
    /// one-line JSON reply {"peer_ip":…,"peer_port":…,"len":…} giving its sender and length.
    #[arg(long, value_name = "PORT")]
    udp_echo: Option<u16>,
}

/// Accepts `::1` and `[::1]` alike, since the bracketed form is how people write IPv6 in URLs.
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    // Before the runtime exists: this edits the environment and adopts fds 3.., both of which need
    // a process with one thread that has not opened anything yet.
    let inherited = match activation::take_from_env() {
        Ok(inherited) => inherited,
        Err(err) => return fail(&err),
    };
    let activated = inherited.is_some();
    let sockets = match inherited {
        Some(sockets) => {
            let n = sockets.tcp.len() + sockets.udp.len();
            eprintln!(
                "demo-server: using {n} inherited socket{} (socket activation)",
                if n == 1 { "" } else { "s" }
            );
            if cli.bind.is_some() || cli.udp_echo.is_some() {
                eprintln!("demo-server: ignoring --bind and --udp-echo: the sockets are inherited");
            }
            sockets
        }
        None => {
            let plan = BindPlan {
                addr: cli.bind,
                port: cli.port,
                udp_port: cli.udp_echo,
            };
            match bind::bind(&plan) {
                Ok((sockets, skipped)) => {
                    if let Some(err) = skipped {
                        eprintln!("demo-server: {err}; IPv6 is unavailable, serving IPv4 only");
                    }
                    sockets
                }
                Err(err) => return fail(&err),
            }
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the tokio runtime: {err}")),
    };
    let result = runtime.block_on(async {
        let shutdown = server::on_sigterm_or_sigint()
            .map_err(|err| format!("cannot install the SIGTERM/SIGINT handlers: {err}"))?;
        announce(&sockets);
        server::run(sockets, activated, shutdown)
            .await
            .map_err(|err| format!("cannot serve: {err}"))
    });
    // Connections still open after the drain are dropped here rather than waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

/// One line per socket, so that a user (or a test waiting for readiness) sees where to connect.
fn announce(sockets: &Sockets) {
    let tcp = sockets.tcp.iter().map(|l| (l.local_addr(), "tcp"));
    let udp = sockets.udp.iter().map(|u| (u.local_addr(), "udp"));
    for (addr, proto) in tcp.chain(udp) {
        match addr {
            Ok(addr) => eprintln!("demo-server listening on {addr} ({proto})"),
            Err(err) => eprintln!("demo-server listening on an unknown address ({proto}): {err}"),
        }
    }
}

/// Prints the error once and gives exit status 1. Our errors already name their cause in their
/// message, so the source chain is not printed after it.
fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("demo-server: {err}");
    ExitCode::FAILURE
}

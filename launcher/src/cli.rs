//! The command line, as clap defines it: `lowport` parses it, and `lowport-docs` writes the man
//! pages and shell completions from the same definitions.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::publish::PublishSpec;
use crate::userns::Mode;

/// The most descriptors `--preserve-fds` passes on: Linux's own ceiling on a process's descriptors
/// (`fs.nr_open`'s default).
pub const MAX_PRESERVED_FDS: i64 = 1 << 20;

/// Run a server on port 80 (or any port) with no root: lowport starts COMMAND in new user and network
/// namespaces where it is uid 0, lets it bind low ports there, and forwards host ports to it.
#[derive(Parser)]
#[command(name = "lowport", version, propagate_version = true)]
pub struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter); LOWPORT_LOG also works
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run COMMAND in new user and network namespaces, with host ports published to it
    #[command(
        after_long_help = "EXAMPLES:\n  lowport run -p 8080:80 -- nginx -g 'daemon off;'\n  lowport run -p 127.0.0.1:8080:80 -p 8443:443 -- ./server\n  lowport run -p 0:80 --ready-fd 3 -- python3 -m http.server 80 3>ready.json\n  lowport run -p 8080:80 --host-loopback 3000 -- nginx -g 'daemon off;'
  lowport run --net pasta -- curl https://example.org/
  lowport run -- bash            # a shell in which `id` says uid 0\n\nEXIT STATUS:\n  The command's own status, or 128+N when signal N killed it; 2 for bad usage; 125 when lowport\n  itself fails before the command runs; 126 when the command cannot run; 127 when it is not found."
    )]
    Run(RunArgs),

    /// List the running instances of this user: name, lowport's pid, uptime, ports and command
    #[command(
        after_long_help = "Instances live under $XDG_RUNTIME_DIR/lowport/NAME/ (or /tmp/lowport-UID without\nXDG_RUNTIME_DIR); entries left by a lowport that was killed are removed on the way."
    )]
    Ps {
        /// Print a JSON array of the instances' state instead of a table
        #[arg(long)]
        json: bool,
    },

    /// Run COMMAND in the namespaces of a running instance, as uid 0 there (as the server runs)
    #[command(
        after_long_help = "EXAMPLES:\n  lowport exec web -- nginx -s reload\n  lowport exec web -- curl -s http://127.0.0.1/\n  lowport exec web -- ps -ef\n\nCOMMAND joins the instance's user, network, pid and mount namespaces (so it sees the\nserver's own /proc), in the caller's directory and environment. lowport exec exits with\nCOMMAND's status."
    )]
    Exec {
        /// The instance, as `lowport ps` lists it
        name: String,
        /// Pass descriptors 3 to 3+N-1 on to the command; without it the command gets only 0, 1 and
        /// 2 (its own terminal, when lowport exec runs on one), and any other descriptor the caller
        /// left open is closed at its exec. Each must be open. What it passes, the server can reach
        #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(..=MAX_PRESERVED_FDS))]
        preserve_fds: u32,
        /// The program to run and its arguments
        #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },

    /// Stop a running instance: SIGTERM to its command, and wait until lowport has exited
    Stop {
        /// The instance, as `lowport ps` lists it
        name: String,
        /// Seconds to wait after SIGTERM before killing the instance with SIGKILL
        #[arg(long, short = 't', default_value_t = 10, value_name = "SECONDS")]
        time: u64,
    },

    /// Publish another host port to a running instance, or stop publishing one
    #[command(subcommand)]
    Port(PortCommand),

    /// Check what this machine allows lowport to do, and print the fix for what it does not
    #[command(
        after_long_help = "Each check prints one line: ok; fix when lowport run cannot work until it is fixed (user\nand network namespaces, the port start inside); warn when an optional feature is missing\n(subordinate ids, handoff, pasta, host ports below 1024), with what that costs; skip when\nit needs what an earlier check found missing. The checks create namespaces, run newuidmap\nand make a seccomp listener in forked processes; lowport doctor changes nothing.\n\nEXIT STATUS:\n  0 when lowport run can work here, 1 when it cannot.\n\nEXAMPLES:\n  lowport doctor\n  lowport doctor --apparmor-profile | sudo tee /etc/apparmor.d/lowport >/dev/null && sudo apparmor_parser -r /etc/apparmor.d/lowport"
    )]
    Doctor(DoctorArgs),
}

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Print the checks as one JSON object: {"ok": true|false, "checks": [{"check", "status", "essential", "detail"}]}
    #[arg(long)]
    pub json: bool,

    /// Check nothing; print an AppArmor profile that lets this lowport binary create user
    /// namespaces where AppArmor restricts them (Ubuntu 23.10 and later), for /etc/apparmor.d/lowport
    #[arg(long, conflicts_with = "json")]
    pub apparmor_profile: bool,
}

#[derive(Subcommand)]
pub enum PortCommand {
    /// Publish a host port to the instance's PORT without restarting it; the port is relayed
    /// (the server bound its sockets already, so there is no bind to hand the host socket to)
    Add {
        /// The instance, as `lowport ps` lists it
        name: String,
        /// As for `lowport run -p`
        #[arg(value_name = "[HOST_IP:]HOST_PORT:PORT[/tcp|udp]")]
        spec: String,
    },
    /// Stop publishing a host port: new clients are refused, connections already relayed go on
    Rm {
        /// The instance, as `lowport ps` lists it
        name: String,
        /// The host port, or the -p spec it was published with
        #[arg(value_name = "[HOST_IP:]HOST_PORT[/tcp|udp]")]
        spec: String,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Publish a host port: listen on HOST_IP:HOST_PORT on the host (every IPv4 and IPv6 address when
    /// HOST_IP is left out) for the server's PORT inside: the server gets the host socket when it
    /// binds PORT, or lowport relays each connection to PORT (see --forward). HOST_PORT 0 picks a
    /// free port. IPv6 addresses go in brackets: [::1]:8080:80. When systemd started lowport with
    /// sockets (a .socket unit, LISTEN_FDS), a socket on HOST_PORT (and HOST_IP) is served instead
    /// of binding, and NAME:PORT[/tcp|udp] serves the sockets of that FileDescriptorName=; sockets
    /// no -p takes go to COMMAND as its own (LISTEN_FDS from 3). Repeatable.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:PORT[/tcp|udp]"
    )]
    pub publish: Vec<PublishSpec>,

    /// How ids are mapped: `single` maps you to 0 and nothing else; `subids` also maps your ranges from
    /// /etc/subuid and /etc/subgid from 1 upward (through newuidmap/newgidmap), so a server can switch
    /// its workers to another uid; `auto` uses subids when you have ranges and the helpers exist
    #[arg(long, value_enum, default_value_t = Mode::Auto, value_name = "MODE")]
    pub userns: Mode,

    /// The namespace's net.ipv4.ip_unprivileged_port_start: ports from N up may be bound by any uid
    /// inside, so a server still binds port 80 after dropping to another uid or losing capabilities
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub port_start: u16,

    /// Once the server accepts on every published port (handed over: it bound the port and listens
    /// on the host socket; relayed: something listens, or for UDP is bound, on the port at 127.0.0.1
    /// or ::1 inside; with --socket-activation or no -p: once the command started), write one JSON
    /// line to this open descriptor, then close it: {"pid":..., "ports":[{"protocol","host_ip",
    /// "host_port","port","mode"}], "net", "host_loopback", "dns"}, where mode is handoff, relay or
    /// activation, and the last three say what the command may reach outside. End-of-file without a
    /// line means not ready: the command exited first, or --ready-timeout expired. Under systemd
    /// (NOTIFY_SOCKET set, Type=notify) lowport sends READY=1 at the same moment
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<RawFd>,

    /// Pass descriptors 3 to 3+N-1 on to the command, as podman's --preserve-fds does. Without it
    /// the command gets only 0, 1 and 2 (and the sockets of --socket-activation or systemd): any
    /// other descriptor the caller left open is closed at its exec, so a server cannot use it
    /// (what it passes, the server can reach). Each must be open; not with --socket-activation or
    /// sockets from systemd, which are numbered from 3 too
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(..=MAX_PRESERVED_FDS))]
    pub preserve_fds: u32,

    /// How long the server may take to accept on every published port, when someone waits for it
    /// (--ready-fd, or systemd's NOTIFY_SOCKET; without either there is no limit, so a shell with
    /// -p where servers are started by hand is never stopped). After it, lowport names each port
    /// not served on stderr, closes --ready-fd without a line, sends systemd
    /// STOPPING=1, stops the command with SIGTERM, and exits with status 124 once it has exited
    #[arg(long, default_value = "90s", value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// Relayed ports only: the most relayed TCP connections at once, over all published ports; beyond it new clients wait
    /// in the host socket's backlog. Default: what the open-file limit allows (six descriptors per
    /// connection), at most 16384. A limit the open-file limit cannot hold is refused
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Relayed ports only: close a relayed TCP connection that one side has closed (half-closed) once no byte has moved
    /// either way for this long, so clients that never close cannot hold connection slots for ever
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub half_closed_timeout: Duration,

    /// Relayed ports only: the most UDP flows (client addresses) relayed at once, over all published UDP ports; at the
    /// limit the least recently used flow is closed to make room. Default: an eighth of what the
    /// open-file limit allows, at most 4096
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_udp_flows: Option<u32>,

    /// Relayed ports only: do not relay from each client's own address: the server then sees clients on the host's loopback
    /// as 127.0.0.1 or ::1 and every other client as 192.0.0.8 or 64:ff9b::c000:8 (by default it sees
    /// the real address and port, over TCP and UDP)
    #[arg(long)]
    pub no_preserve_source: bool,

    /// How published ports reach COMMAND. `handoff`: when COMMAND binds a published port (on 0.0.0.0 or
    /// [::]), lowport answers the bind with the host socket itself, so the server accepts host
    /// clients directly, at native speed and with their real addresses, and lowport relays nothing
    /// (the server's getsockname() then shows the host address and port); likewise a connect to a
    /// --host-loopback or --dns address gets a host socket connected to the service. `relay`: lowport
    /// accepts on the host and relays each connection to PORT inside, and relays the command's
    /// connections to host services. `auto` hands TCP ports off where this kernel (5.9 or later) and
    /// the port allow it, and relays UDP ports (a handed UDP socket could send anywhere from the
    /// host's network), host ports that needed privilege, and binds lowport cannot see (32-bit
    /// programs, io_uring, a COMMAND already under a seccomp listener)
    #[arg(long, value_enum, default_value_t = crate::handoff::Mode::Auto, value_name = "MODE")]
    pub forward: crate::handoff::Mode,

    /// Hand the host sockets to COMMAND with systemd's socket-activation protocol (fds from 3,
    /// LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES such as tcp-80) and relay nothing: the server accepts host
    /// connections itself, at native speed and with real client addresses. Sockets systemd gave
    /// lowport that no -p takes follow, with their own names
    #[arg(long)]
    pub socket_activation: bool,

    /// Relayed ports only: close a UDP flow after this long without a datagram either way (e.g. 60, 90s, 500ms, 5m)
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub udp_timeout: Duration,

    /// Make a service on the host's loopback reachable inside: 127.0.0.1:PORT and [::1]:PORT inside
    /// reach the same address and port on the host, so `proxy_pass http://127.0.0.1:3000` or
    /// DATABASE_URL=postgres://127.0.0.1:5432 work unchanged. Nothing else of the host is reachable.
    /// A range FIRST-LAST names up to 1024 ports. TCP unless /udp. Repeatable
    #[arg(long, value_name = "PORT[-LAST][/tcp|udp]")]
    pub host_loopback: Vec<crate::outward::HostPorts>,

    /// The command's way out. `none`: no network beyond lowport's own (published ports,
    /// --host-loopback, --dns). `pasta`: full outbound traffic through pasta (package passt), which
    /// lowport starts for the namespace with every automatic port forward and the host-loopback
    /// mapping off, and stops with the run. A resolver of /etc/resolv.conf on the host's loopback
    /// (127.0.0.53) is mirrored as with --dns; others are reached through pasta
    #[arg(long, value_enum, default_value_t = crate::pasta::Net::None, value_name = "MODE")]
    pub net: crate::pasta::Net,

    /// Names resolve inside as on the host: lowport listens inside on each resolver address of the
    /// host's /etc/resolv.conf (port 53, UDP and TCP) and relays to the same resolver from the host, a
    /// resolver on the host's loopback (systemd-resolved's 127.0.0.53) included
    #[arg(long)]
    pub dns: bool,

    /// Name this instance, so that `lowport ps`, `exec`, `stop` and `port` can reach it; by default
    /// the program's name (nginx, then nginx-2 when one runs already). An explicit name in use is
    /// an error
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The program to run and its arguments (put `--` before it when it takes options of its own)
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Seconds by default; `ms`, `s` and `m` suffixes are accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write 60, 90s, 500ms or 5m"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "'{unit}' in '{text}' is not a unit; use ms, s or m"
            ))
        }
    };
    if d.is_zero() {
        return Err("the timeout must be above zero".into());
    }
    if d > Duration::from_secs(366 * 24 * 3600) {
        return Err(format!(
            "'{text}' is more than a year; give a shorter timeout"
        ));
    }
    Ok(d)
}

/// The clap command, for the man pages and completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

//! The `lowport` command: parses the command line, sets up logging, runs one launch, and exits with
//! its status.

use std::process::ExitCode;

use clap::Parser;
use lowport::cli::{Cli, Command, PortCommand};
use lowport::instance::client::{self, ClientError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(message) = init_logging(cli.log_level.as_deref()) {
        eprintln!("lowport: {message}");
        return ExitCode::from(2);
    }
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Doctor(args) => return doctor(&args),
        other => return instance_command(other),
    };
    let config = lowport::Config {
        publish: args.publish,
        userns: args.userns,
        port_start: args.port_start,
        ready_fd: args.ready_fd,
        preserve_fds: args.preserve_fds,
        ready_timeout: args.ready_timeout,
        max_connections: args.max_connections.map(|n| n as usize),
        max_udp_flows: args.max_udp_flows.map(|n| n as usize),
        half_closed_timeout: args.half_closed_timeout,
        preserve_source: !args.no_preserve_source,
        socket_activation: args.socket_activation,
        forward: args.forward,
        udp_timeout: args.udp_timeout,
        host_loopback: args.host_loopback,
        net: args.net,
        dns: args.dns,
        name: args.name,
        command: args.command,
    };
    match lowport::run(config) {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("lowport: {err}");
            ExitCode::from(err.exit_code() as u8)
        }
    }
}

/// `ps`, `exec`, `stop` and `port`: the commands that reach a running instance.
fn instance_command(command: Command) -> ExitCode {
    let outcome = lowport::instance::root()
        .map_err(ClientError::from)
        .and_then(|root| {
            let mut out = std::io::stdout().lock();
            match command {
                Command::Ps { json } => client::ps(&root, json, &mut out).map(|()| 0),
                Command::Exec {
                    name,
                    preserve_fds,
                    command,
                } => client::exec(&root, &name, preserve_fds, &command),
                Command::Stop { name, time } => {
                    client::stop(&root, &name, std::time::Duration::from_secs(time)).map(|()| 0)
                }
                Command::Port(PortCommand::Add { name, spec }) => {
                    client::port_add(&root, &name, &spec, &mut out).map(|()| 0)
                }
                Command::Port(PortCommand::Rm { name, spec }) => {
                    client::port_rm(&root, &name, &spec, &mut out).map(|()| 0)
                }
                Command::Run(_) | Command::Doctor(_) => unreachable!("handled by main"),
            }
        });
    match outcome {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("lowport: {err}");
            ExitCode::from(err.exit_code() as u8)
        }
    }
}

/// `doctor`: the checks, before anything else starts a thread (they fork).
fn doctor(args: &lowport::cli::DoctorArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match lowport::doctor::run(args.json, args.apparmor_profile, &mut out) {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("lowport: cannot print the report: {err}");
            ExitCode::from(125)
        }
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn init_logging(level: Option<&str>) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let (wanted, source) = match level {
        Some(level) => (Some(level.to_owned()), "--log-level"),
        None => (std::env::var("LOWPORT_LOG").ok(), "LOWPORT_LOG"),
    };
    let bad = |w: &str, why: &str| {
        format!("{source} '{w}' is not a level or filter ({why}); use error, warn, info, debug or trace")
    };
    let filter = match wanted {
        // A bare word is a target name to tracing's parser; here it is almost surely a mistyped level.
        Some(w)
            if !w.contains(['=', ',']) && !LEVELS.contains(&w.to_ascii_lowercase().as_str()) =>
        {
            return Err(bad(&w, "unknown level"));
        }
        Some(w) => EnvFilter::try_new(&w).map_err(|e| bad(&w, &e.to_string()))?,
        None => EnvFilter::new("warn"),
    };
    // Colours only on a terminal, and not when the user opted out (https://no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .init();
    Ok(())
}

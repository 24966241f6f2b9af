//! `lowport ps`, `exec`, `stop` and `port`: the commands that reach a running instance by name.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket;

use super::control::{Envelope, Reply, Request, ANSWER_TIMEOUT, MAX_MESSAGE};
use super::{InstanceError, PortState};
use crate::publish::PublishSpec;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("cannot reach instance '{name}': {source} (it may have just ended; `lowport ps` lists the running ones)")]
    Connect {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("instance '{name}' did not answer: {source}")]
    NoAnswer {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("instance '{name}': {message}")]
    Refused { name: String, message: String },
    #[error("-p {spec}: {message}")]
    Spec { spec: String, message: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Bind(#[from] crate::host::BindError),
    #[error("cannot join the namespaces of instance '{name}': {source}")]
    Join {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{program}: command not found (check the name and PATH inside the instance, or give a full path)")]
    NotFound { program: String },
    #[error("cannot run {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("instance '{name}' (lowport pid {pid}) did not stop within {secs} s of SIGTERM and was killed")]
    Killed { name: String, pid: u32, secs: u64 },
    #[error("cannot list the instances in {path}: {source}")]
    List {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// 2 for what the user typed wrong, 125 when the command of `exec` never ran (as `lowport run`),
    /// 127 when it is not found, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Instance(InstanceError::BadName(_))
            | ClientError::Spec { .. }
            | ClientError::Usage(_) => 2,
            ClientError::Join { .. } => 125,
            ClientError::NotFound { .. } => 127,
            ClientError::Exec { .. } => 126,
            _ => 1,
        }
    }
}

/// `lowport ps`: one line per running instance, or a JSON array with `json`.
pub fn ps(root: &Path, json: bool, out: &mut impl Write) -> Result<(), ClientError> {
    let listed = super::list(root).map_err(|source| ClientError::List {
        path: root.to_owned(),
        source,
    })?;
    if json {
        let states: Vec<_> = listed.iter().filter_map(|l| l.state.clone()).collect();
        let text = serde_json::to_string_pretty(&states).unwrap_or_default();
        let _ = writeln!(out, "{}", json_printable(&text));
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![[
        "NAME".to_owned(),
        "PID".to_owned(),
        "UP".to_owned(),
        "PORTS".to_owned(),
        "COMMAND".to_owned(),
    ]];
    for l in &listed {
        let row = match &l.state {
            Some(s) => [
                l.name.clone(),
                s.pid.to_string(),
                uptime(now.saturating_sub(s.started)),
                if s.ports.is_empty() {
                    "-".into()
                } else {
                    s.ports.iter().map(port_text).collect::<Vec<_>>().join(", ")
                },
                s.command.join(" "),
            ],
            None => [
                l.name.clone(),
                "-".into(),
                "-".into(),
                "(starting)".into(),
                String::new(),
            ],
        };
        rows.push(row.map(|cell| printable(&cell)));
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            line.push_str(&format!("{:<width$}  ", row[i]));
        }
        line.push_str(&row[4]);
        let _ = writeln!(out, "{}", line.trim_end());
    }
    Ok(())
}

/// `text` with its control characters written as `\xNN`. What `ps` prints comes from `state.json`,
/// which the server inside may rewrite (it runs as the user): raw, its escape sequences would reach
/// the user's terminal, to retitle it, clear it, or on some terminals make it answer as if typed.
fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown
}

/// serde_json escapes the C0 controls but writes DEL and the C1 controls (U+0080 to U+009F, which
/// some terminals take as escape sequences) as they are; they can only be inside strings, where
/// `\u00NN` means the same.
fn json_printable(json: &str) -> String {
    let mut shown = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_control() && c != '\n' {
            shown.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown
}

/// `0.0.0.0:8080->80/tcp (handoff)`, as `ps` and `port` print a port.
pub fn port_text(p: &PortState) -> String {
    let ip = if p.host_ip.contains(':') {
        format!("[{}]", p.host_ip)
    } else {
        p.host_ip.clone()
    };
    format!(
        "{ip}:{}->{}/{} ({})",
        p.host_port, p.port, p.protocol, p.mode
    )
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Sends `request` to instance `name` with `fds`, and reads its reply and the descriptors that came
/// with it. Returns the connection too, for `stop`, which waits for it to close.
fn ask(
    root: &Path,
    name: &str,
    request: Request,
    fds: &[std::os::fd::BorrowedFd],
) -> Result<(Reply, Vec<OwnedFd>, OwnedFd), ClientError> {
    let path = super::control_path(root, name)?;
    let connect_error = |source: io::Error| ClientError::Connect {
        name: name.to_owned(),
        source,
    };
    let conn = super::control::connect(&path).map_err(connect_error)?;
    let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
    let _ = socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &timeout);
    let text = serde_json::to_vec(&Envelope {
        instance: name.to_owned(),
        request,
    })
    .unwrap_or_default();
    let no_answer = |source: io::Error| ClientError::NoAnswer {
        name: name.to_owned(),
        source,
    };
    sys::send_with_fds(conn.as_raw_fd(), &text, fds).map_err(no_answer)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, got) = sys::recv_with_fds(conn.as_fd(), &mut buf).map_err(no_answer)?;
    if n == 0 {
        return Err(no_answer(io::Error::other("it closed the connection")));
    }
    let reply: Reply = serde_json::from_slice(&buf[..n])
        .map_err(|e| no_answer(io::Error::other(format!("not a reply: {e}"))))?;
    if let Reply::Error { message } = reply {
        return Err(ClientError::Refused {
            name: name.to_owned(),
            message,
        });
    }
    Ok((reply, got, conn))
}

/// `lowport stop NAME`: SIGTERM to the command through lowport, then wait until lowport has exited;
/// after `grace`, SIGKILL to lowport (its pid-1 helper dies with it, and the whole pid namespace).
pub fn stop(root: &Path, name: &str, grace: Duration) -> Result<(), ClientError> {
    let (reply, _, conn) = ask(root, name, Request::Stop, &[])?;
    let Reply::Stopping { .. } = reply else {
        return Err(ClientError::Refused {
            name: name.to_owned(),
            message: format!("unexpected reply {reply:?}"),
        });
    };
    // The peer's pid as the kernel recorded it when lowport listened: no pid file to trust.
    let cred = socket::getsockopt(&conn, socket::sockopt::PeerCredentials).ok();
    let pidfd = cred.and_then(|c| sys::pidfd_open(nix::unistd::Pid::from_raw(c.pid())).ok());
    if wait_closed(&conn, grace) {
        return Ok(());
    }
    // Still open, so lowport still runs and the pidfd is its own.
    if let Some(pidfd) = &pidfd {
        let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    }
    wait_closed(&conn, Duration::from_secs(5));
    Err(ClientError::Killed {
        name: name.to_owned(),
        pid: cred.map_or(0, |c| c.pid() as u32),
        secs: grace.as_secs(),
    })
}

/// Waits up to `limit` for the other end to close `conn`; true when it did.
fn wait_closed(conn: &OwnedFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [nix::poll::PollFd::new(
            conn.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        ) {
            Ok(0) => return false,
            Ok(_) => {
                let mut buf = [0u8; 64];
                match nix::sys::socket::recv(
                    conn.as_raw_fd(),
                    &mut buf,
                    socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EAGAIN) => continue,
                    // ECONNRESET and the like: gone too.
                    Err(_) => return true,
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// `lowport port add NAME SPEC`: binds the host socket here, in the host's network namespace with
/// the caller's own rights, and gives it to the instance, which relays it to the port inside.
pub fn port_add(
    root: &Path,
    name: &str,
    spec: &str,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    let parsed: PublishSpec =
        spec.parse()
            .map_err(|e: crate::publish::PublishError| ClientError::Spec {
                spec: spec.to_owned(),
                message: e.to_string(),
            })?;
    if let Some(name) = &parsed.fdname {
        return Err(ClientError::Spec {
            spec: spec.to_owned(),
            message: format!("'{name}' is not a host port; NAME:PORT serves sockets systemd gave lowport run, which lowport port add cannot add; write [HOST_IP:]HOST_PORT:PORT"),
        });
    }
    // The instance must exist before a port is taken for it.
    super::control_path(root, name)?;
    let sockets = crate::host::bind_all(std::slice::from_ref(&parsed), Path::new("/proc/sys"))?;
    let fds: Vec<_> = sockets.iter().map(|s| s.socket.as_fd()).collect();
    let (reply, _, _) = ask(
        root,
        name,
        Request::PortAdd {
            spec: parsed.to_string(),
        },
        &fds,
    )?;
    print_ports(reply, out);
    Ok(())
}

/// `lowport port rm NAME SPEC`.
pub fn port_rm(
    root: &Path,
    name: &str,
    spec: &str,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    spec.parse::<super::control::HostPort>()
        .map_err(|message| ClientError::Spec {
            spec: spec.to_owned(),
            message,
        })?;
    let (reply, _, _) = ask(
        root,
        name,
        Request::PortRm {
            spec: spec.to_owned(),
        },
        &[],
    )?;
    print_ports(reply, out);
    Ok(())
}

fn print_ports(reply: Reply, out: &mut impl Write) {
    if let Reply::Ports { ports } = reply {
        for p in &ports {
            let _ = writeln!(out, "{}", port_text(p));
        }
    }
}

/// `lowport exec NAME -- COMMAND`: joins the instance's user, mount, network and pid namespaces and
/// runs COMMAND there as uid 0, in the caller's directory (when it exists inside) and environment,
/// in a session of its own and on a pty of its own ([`super::session`]). Returns its exit status,
/// 128 + N when signal N killed it.
///
/// Must be called while the process has one thread: the kernel refuses setns(2) into a user or mount
/// namespace otherwise.
pub fn exec(
    root: &Path,
    name: &str,
    preserve_fds: u32,
    argv: &[OsString],
) -> Result<i32, ClientError> {
    if let Some(message) = crate::init::preserved_not_open(preserve_fds) {
        return Err(ClientError::Usage(message));
    }
    // As `lowport run` does for its command: nothing the caller left open reaches the command, where
    // the server may trace it and take its descriptors, but what --preserve-fds asks for. Before
    // joining the instance's mount namespace, whose /proc (the fallback's) is of another pid
    // namespace; what this process opens later is close-on-exec.
    sys::cloexec_from(3 + preserve_fds as RawFd).map_err(|source| ClientError::Exec {
        program: argv[0].to_string_lossy().into_owned(),
        source: io::Error::new(
            source.kind(),
            format!("cannot keep the descriptors you left open from it: {source}"),
        ),
    })?;
    // Once this process joins the instance's user namespace, its credentials belong to it, where the
    // server is root: to the kernel's ptrace checks the server may then trace it, read its
    // environment and descriptors (the user's terminal) and write its memory, through the host's
    // /proc, which the server may uncover by unmounting its own. Yet this process stays in the host's
    // pid namespace, where it could signal any process of the user. Not dumpable, it needs
    // CAP_SYS_PTRACE in the host's user namespace, which the server lacks. The command it starts is
    // dumpable again after its exec, as the server's own processes are.
    nix::sys::prctl::set_dumpable(false).map_err(|e| ClientError::Join {
        name: name.to_owned(),
        source: e.into(),
    })?;
    let (reply, fds, _conn) = ask(root, name, Request::Exec, &[])?;
    let Reply::Namespaces { kinds } = reply else {
        return Err(ClientError::Refused {
            name: name.to_owned(),
            message: format!("unexpected reply {reply:?}"),
        });
    };
    let join_error = |source: io::Error| ClientError::Join {
        name: name.to_owned(),
        source,
    };
    if fds.len() != kinds.len() || kinds.first().map(String::as_str) != Some("user") {
        return Err(join_error(io::Error::other(
            "the instance sent the wrong descriptors",
        )));
    }
    // Before joining: the pty must come from the host's /dev/ptmx, not one the server mounted.
    let mut session = super::session::Session::prepare().map_err(|e| {
        join_error(io::Error::new(
            e.kind(),
            format!("cannot prepare the command's terminal: {e}"),
        ))
    })?;
    let cwd = std::env::current_dir().ok();
    // The user namespace first: it gives the capabilities that joining the others takes. The pid
    // namespace applies to children only, hence the spawn below.
    for (kind, fd) in kinds.iter().zip(&fds) {
        sys::setns(fd.as_fd())
            .map_err(|e| join_error(io::Error::new(e.kind(), format!("{kind} namespace: {e}"))))?;
    }
    drop(fds);
    // Joining a mount namespace moves to its root directory.
    if let Some(cwd) = cwd {
        if std::env::set_current_dir(&cwd).is_err() {
            let _ = std::env::set_current_dir("/");
        }
    }
    // As for the command of `lowport run`. The command never has the caller's terminal (see
    // `session`), so this is a second wall: were it to get it, it could type into the caller's shell.
    sys::install_command_filter(sys::FilterKind::Terminal).map_err(join_error)?;

    let program = argv[0].to_string_lossy().into_owned();
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]);
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        command.env_remove(var);
    }
    let child = session.spawn(&mut command).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            ClientError::NotFound {
                program: program.clone(),
            }
        } else {
            ClientError::Exec {
                program: program.clone(),
                source,
            }
        }
    })?;
    let status = session.wait(child).map_err(|source| ClientError::Exec {
        program: program.clone(),
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("nginx -g x"), "nginx -g x");
        assert_eq!(
            printable("a\u{1b}]2;t\u{7}\u{9b}1m\r"),
            "a\\x1b]2;t\\x07\\x9b1m\\x0d"
        );
        let json = serde_json::to_string_pretty(&["\u{1b}\u{9b}\u{7f}é"]).unwrap();
        let shown = json_printable(&json);
        assert!(
            !shown.contains(|c: char| c.is_control() && c != '\n'),
            "{shown}"
        );
        let back: Vec<String> = serde_json::from_str(&shown).unwrap();
        assert_eq!(back, ["\u{1b}\u{9b}\u{7f}é"]);
    }
}

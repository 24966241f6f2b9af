//! `lowport doctor`: what this machine allows, checked in the order a launch needs it, one line per
//! check.
//!
//! A line is `ok`; `fix` when `lowport run` cannot work until it is fixed (user and network
//! namespaces, and the port start inside), with the fix; `warn` when an optional feature is missing
//! (subordinate ids, handoff, pasta, host ports below 1024), with what that costs and the fix; or
//! `skip` when a check could not run because an earlier one failed.
//!
//! Reading sysctls cannot tell whether a launch will work: a container's seccomp profile, Ubuntu's
//! AppArmor restriction or a nosuid mount says no without any sysctl saying so. So the checks do what
//! a launch does (create the namespaces, write the maps and the port start, run newuidmap, make a
//! seccomp listener), each in a forked child: a process cannot leave a user namespace, drop a
//! seccomp filter or clear `no_new_privs`, and lowport's own process must keep none of them. The
//! sysctls are read only to name the cause of a refusal, through the modules a launch uses
//! ([`userns::diagnose_unshare`], [`handoff::kernel_refusal`], [`pasta::check_tun`],
//! [`host::unprivileged_port_start`]), under a base path that unit tests point at a temporary
//! directory.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::wait::WaitStatus;
use nix::unistd::ForkResult;

use crate::userns::{self, UsernsError};
use crate::{handoff, host, netns, pasta, sys};

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// An optional feature is missing.
    Warn,
    /// `lowport run` cannot work until this is fixed.
    Fix,
    /// Not checked: it needs what an earlier check found missing.
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fix => "fix",
            Status::Skip => "skip",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    /// Whether `lowport run` needs it.
    pub essential: bool,
    pub detail: String,
}

impl Finding {
    fn new(check: &'static str, status: Status, essential: bool, detail: String) -> Finding {
        Finding {
            check,
            status,
            essential,
            detail,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<6}{}: {}", self.status, self.check, self.detail)
    }
}

/// Every finding, in the order checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Whether `lowport run` can work here.
    pub ok: bool,
    pub checks: Vec<Finding>,
}

impl Report {
    pub fn new(checks: Vec<Finding>) -> Report {
        let ok = checks
            .iter()
            .all(|f| !f.essential || f.status == Status::Ok);
        Report { ok, checks }
    }

    /// 0 when `lowport run` can work here, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else {
            1
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.checks {
            writeln!(f, "{finding}")?;
        }
        let missing = self
            .checks
            .iter()
            .filter(|c| !c.essential && c.status != Status::Ok)
            .count();
        match (self.ok, missing) {
            (true, 0) => writeln!(f, "\nlowport run can work here, with every feature"),
            (true, 1) => writeln!(
                f,
                "\nlowport run can work here; one optional feature is missing (the line above not marked ok)"
            ),
            (true, n) => writeln!(
                f,
                "\nlowport run can work here; {n} optional features are missing (the lines above not marked ok)"
            ),
            (false, _) => writeln!(
                f,
                "\nlowport run cannot work here: do what the lines marked fix say, then run lowport doctor again"
            ),
        }
    }
}

/// The files and programs the checks read; tests point them at a temporary directory.
#[derive(Clone, Debug)]
pub struct Environment {
    /// /etc/subuid, /etc/subgid, PATH (newuidmap, pasta) and /proc/sys.
    pub ids: userns::Environment,
    /// The tun device pasta opens.
    pub tun: PathBuf,
    /// This lowport binary: what `setcap` and the AppArmor profile name.
    pub exe: PathBuf,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            ids: userns::Environment::default(),
            tun: pasta::TUN.into(),
            exe: std::env::current_exe()
                .and_then(fs::canonicalize)
                .unwrap_or_else(|_| "lowport".into()),
        }
    }
}

/// Runs every check, in the order a launch needs them. Call it single-threaded: the checks fork.
pub fn check(env: &Environment) -> Report {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let mut checks = Vec::new();
    if uid == 0 && in_initial_user_namespace() {
        checks.push(Finding::new(
            "user",
            Status::Warn,
            false,
            "lowport doctor runs as root, so these checks show what root may do; run it as the user who runs lowport run".into(),
        ));
    }
    let [user, net, port_start] = namespaces(env, uid, gid);
    let userns_ok = user.status == Status::Ok;
    checks.extend([user, net]);
    checks.push(subids(env, uid, gid, userns_ok));
    checks.push(port_start);
    checks.push(handoff_check());
    checks.extend(outbound(env));
    let start = host::unprivileged_port_start(&env.ids.proc_sys);
    checks.push(host_ports(start, may_bind_below(start), &env.exe));
    Report::new(checks)
}

/// Whether this process is in the machine's own user namespace, whose uid 0 is real root.
fn in_initial_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|map| map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// Whether this process may bind host ports below `start`, as lowport binds host sockets: with
/// `cap_net_bind_service` over the host's network namespace, which a binary given that file
/// capability gets at exec (unless its file system is mounted nosuid, or `no_new_privs` is set).
/// Tried with a UDP socket on 127.0.0.1, closed at once: the kernel checks the privilege before
/// whether the port is in use, so EADDRINUSE also means yes.
fn may_bind_below(start: u16) -> bool {
    let Some(port) = start.checked_sub(1).filter(|p| *p > 0) else {
        return true;
    };
    let bound = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, port));
    !matches!(bound, Err(e) if e.raw_os_error() == Some(libc::EACCES))
}

/// `lowport doctor`: prints the report (or, with `apparmor_profile`, the AppArmor profile) to `out`;
/// returns the exit status.
pub fn run(json: bool, apparmor_profile: bool, out: &mut dyn Write) -> io::Result<u8> {
    let env = Environment::default();
    if apparmor_profile {
        out.write_all(profile_for(&env.exe).as_bytes())?;
        return Ok(0);
    }
    let report = check(&env);
    if json {
        serde_json::to_writer(&mut *out, &report).map_err(io::Error::other)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    Ok(report.exit_code())
}

/// What the namespace check's child reports, one line per step: `STEP ok` or `STEP fail MESSAGE`.
const USER: &str = "user";
const NET: &str = "net";
const PORT_START: &str = "port-start";

/// Creates a user namespace with the single-id map, a network namespace in it, brings `lo` up and
/// sets `ip_unprivileged_port_start` to 0 there: the namespace steps of a launch, in a child.
fn namespaces(env: &Environment, uid: u32, gid: u32) -> [Finding; 3] {
    let outcome = in_child(|out| {
        let step = |out: &mut fs::File, name: &str, result: Result<(), String>| {
            let line = match &result {
                Ok(()) => format!("{name} ok\n"),
                Err(message) => format!("{name} fail {message}\n"),
            };
            let _ = out.write_all(line.as_bytes());
            result.is_ok()
        };
        let user = nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|errno| userns_fix(&userns::diagnose_unshare(errno, &env.ids.proc_sys), env))
            .and_then(|()| {
                userns::write_single_maps("/proc/self".as_ref(), &env.ids.proc_sys, uid, gid)
                    .map_err(|err| userns_fix(&err, env))
            });
        if !step(out, USER, user) {
            return;
        }
        let net = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|errno| netns_fix(errno, &env.ids.proc_sys))
            .and_then(|()| netns::loopback_up().map_err(|e| e.to_string()));
        if !step(out, NET, net) {
            return;
        }
        // /proc/sys/net shows the network namespace of the process that opens it: this child's.
        let start =
            netns::set_unprivileged_port_start("/proc/sys".as_ref(), 0).map_err(|e| e.to_string());
        step(out, PORT_START, start);
    });
    let text = match outcome {
        Ok(text) => text,
        Err(why) => String::from("user fail ") + &why,
    };
    let result = |name: &str| -> Option<Result<(), String>> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
            Some(match rest.strip_prefix("fail ") {
                Some(message) => Err(message.to_owned()),
                None => Ok(()),
            })
        })
    };
    let finding = |check, name, ok: String, needs: &str| match result(name) {
        Some(Ok(())) => Finding::new(check, Status::Ok, true, ok),
        Some(Err(message)) => Finding::new(check, Status::Fix, true, message),
        None => Finding::new(
            check,
            Status::Skip,
            true,
            format!("not checked: it needs {needs}"),
        ),
    };
    [
        finding(
            "user namespaces",
            USER,
            userns_ok_detail(&env.ids.proc_sys, uid),
            "a process that can fork",
        ),
        finding(
            "network namespace",
            NET,
            "created one in the user namespace, with lo up".into(),
            "a user namespace",
        ),
        finding(
            "port start inside",
            PORT_START,
            "set net.ipv4.ip_unprivileged_port_start to 0 in the new network namespace, so the command may bind port 80 there".into(),
            "a network namespace",
        ),
    ]
}

/// A sysctl's value under `proc_sys` (normally /proc/sys), such as `user/max_user_namespaces`.
pub fn sysctl(proc_sys: &Path, name: &str) -> Option<u64> {
    fs::read_to_string(proc_sys.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What the `ok` line of user namespaces says: the switches that could have said no.
pub fn userns_ok_detail(proc_sys: &Path, uid: u32) -> String {
    let mut detail = format!("created one as uid {uid}, with uid {uid} mapped to 0 in it");
    let mut switches = Vec::new();
    for (name, file) in [
        ("user.max_user_namespaces", "user/max_user_namespaces"),
        (
            "kernel.unprivileged_userns_clone",
            "kernel/unprivileged_userns_clone",
        ),
    ] {
        if let Some(value) = sysctl(proc_sys, file) {
            switches.push(format!("{name} is {value}"));
        }
    }
    if !switches.is_empty() {
        detail += &format!(" ({})", switches.join(", "));
    }
    if sysctl(proc_sys, "kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        detail += "; AppArmor restricts them (kernel.apparmor_restrict_unprivileged_userns is 1), and a profile lets lowport create them";
    }
    detail
}

/// The line for a refused user namespace: lowport run's own error, which names the switch and the
/// fix, and how to keep the fix after a reboot, or the one root command that installs lowport's
/// AppArmor profile.
pub fn userns_fix(err: &UsernsError, env: &Environment) -> String {
    let keep = match err {
        UsernsError::MaxUserNamespacesZero | UsernsError::MaxUserNamespacesReached(_) => {
            Some("user.max_user_namespaces=15000")
        }
        UsernsError::UnprivilegedClone => Some("kernel.unprivileged_userns_clone=1"),
        _ => None,
    };
    match (err, keep) {
        (_, Some(setting)) => format!(
            "{err}; to keep it after a reboot: echo {setting} | sudo tee /etc/sysctl.d/60-lowport.conf"
        ),
        (UsernsError::AppArmor | UsernsError::AppArmorMaps { .. }, _) => format!(
            "{err}; lowport's profile, in one root command: {}",
            apparmor_install_command(&env.exe)
        ),
        _ => err.to_string(),
    }
}

/// The one root command that installs lowport's AppArmor profile, as printed by
/// `lowport doctor --apparmor-profile` for the binary at `exe`, and loads it.
pub fn apparmor_install_command(exe: &Path) -> String {
    format!(
        "{} doctor --apparmor-profile | sudo tee /etc/apparmor.d/lowport >/dev/null && sudo apparmor_parser -r /etc/apparmor.d/lowport",
        shell_word(&exe.display().to_string())
    )
}

/// `word` as one shell word: as it is when it needs no quoting, in single quotes otherwise.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@%,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Why `unshare(CLONE_NEWNET)` failed inside a user namespace this user owns, which gives it every
/// capability there: the per-user limit is the one switch left.
fn netns_fix(errno: nix::errno::Errno, proc_sys: &Path) -> String {
    match sysctl(proc_sys, "user/max_net_namespaces") {
        Some(0) => "cannot create a network namespace: user.max_net_namespaces is 0 (allow them as root: sudo sysctl -w user.max_net_namespaces=15000, and echo user.max_net_namespaces=15000 | sudo tee /etc/sysctl.d/60-lowport-net.conf to keep it)".into(),
        _ => format!(
            "cannot create a network namespace in the user namespace: {} (a container or a seccomp filter may forbid them)",
            io::Error::from(errno)
        ),
    }
}

/// The AppArmor profile of contrib/apparmor/lowport, with `exe` added to the paths it covers when
/// none of them is it (AppArmor attaches a profile by the path of the program run).
pub fn profile_for(exe: &Path) -> String {
    const PROFILE: &str = include_str!("../../contrib/apparmor/lowport");
    const PATHS: &str =
        "@{lowport_bin} = /usr/bin/lowport /usr/local/bin/lowport @{HOME}/.local/bin/lowport";
    let path = exe.display().to_string();
    let home_bin = path
        .strip_prefix("/home/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(user, rest)| !user.is_empty() && rest == ".local/bin/lowport")
        || path == "/root/.local/bin/lowport";
    let covered = home_bin || path == "/usr/bin/lowport" || path == "/usr/local/bin/lowport";
    if covered {
        return PROFILE.to_owned();
    }
    // AppArmor's globbing characters and quotes are escaped; a path with spaces is quoted.
    let mut escaped = String::new();
    for c in path.chars() {
        if "*?[]{}^\"\\".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    if escaped.contains(char::is_whitespace) {
        escaped = format!("\"{escaped}\"");
    }
    PROFILE.replace(PATHS, &format!("{PATHS} {escaped}"))
}

/// Subordinate ids: planned as `--userns subids` plans them, then mapped for real by newuidmap and
/// newgidmap into a user namespace made for the purpose.
fn subids(env: &Environment, uid: u32, gid: u32, userns_ok: bool) -> Finding {
    const CHECK: &str = "subordinate ids";
    const COST: &str = "without subordinate ids only uid 0 exists inside, so a server that switches to another uid (nginx's workers, postgres) fails there";
    let plan = match userns::plan(userns::Mode::Subids, uid, gid, &env.ids) {
        Ok(userns::Plan::Subids(plan)) => plan,
        Ok(userns::Plan::Single { .. }) => {
            return Finding::new(CHECK, Status::Warn, false, COST.into())
        }
        Err(err) => {
            let said = err.to_string();
            let said = said.strip_prefix("--userns subids: ").unwrap_or(&said);
            return Finding::new(CHECK, Status::Warn, false, format!("{COST}: {said}"));
        }
    };
    let ranges = |ranges: &[userns::IdRange]| {
        ranges
            .iter()
            .map(|r| format!("{} from {}", r.count, r.start))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = format!(
        "uids {} and gids {}",
        ranges(&plan.subuids),
        ranges(&plan.subgids)
    );
    if !userns_ok {
        return Finding::new(
            CHECK,
            Status::Skip,
            false,
            format!("{found} in /etc/subuid and /etc/subgid; mapping them not checked: it needs a user namespace"),
        );
    }
    let outcome = check_in_child(|out| {
        let helper =
            userns::MapHelper::spawn(&plan, &[out.as_raw_fd()]).map_err(|e| e.to_string())?;
        if let Err(errno) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER) {
            helper.cancel();
            return Err(format!(
                "cannot create a user namespace: {}",
                io::Error::from(errno)
            ));
        }
        // The helper runs newuidmap on this process, by its pid as /proc shows it.
        helper.map(proc_pid()).map_err(|e| e.to_string())
    });
    match outcome {
        Ok(()) => Finding::new(
            CHECK,
            Status::Ok,
            false,
            format!(
                "{found}, mapped by {} and {}",
                plan.newuidmap.display(),
                plan.newgidmap.display()
            ),
        ),
        Err(why) => Finding::new(CHECK, Status::Warn, false, format!("{COST}: {why}")),
    }
}

/// This process's pid as /proc knows it, which differs from getpid() inside another pid namespace
/// that shares the host's /proc.
fn proc_pid() -> nix::unistd::Pid {
    fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .map_or_else(nix::unistd::getpid, nix::unistd::Pid::from_raw)
}

/// Handoff needs a seccomp user-notification listener (`SECCOMP_FILTER_FLAG_NEW_LISTENER`) that can
/// put a descriptor in place of the server's (`SECCOMP_IOCTL_NOTIF_ADDFD` with SETFD, Linux 5.9).
/// The child makes the very filter a command gets, then asks ADDFD about a notification that does
/// not exist: a kernel that has it says ENOENT, one without it EINVAL.
fn handoff_check() -> Finding {
    const CHECK: &str = "handoff";
    const COST: &str = "without handoff lowport relays every published port, at about half the requests per second of a direct connection (docs/benchmarks.md)";
    if let Some(why) = handoff::kernel_refusal() {
        return Finding::new(CHECK, Status::Warn, false, format!("{COST}: {why}"));
    }
    let outcome = check_in_child(|_| {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|errno| format!("cannot set no_new_privs: {}", io::Error::from(errno)))?;
        let listener = match sys::install_command_filter(sys::FilterKind::TerminalAndBind) {
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                return Err("this process already runs under a seccomp filter with a listener (inside another lowport, or a container that uses one), and the kernel allows one listener per process".into());
            }
            Err(err) => return Err(format!("the kernel refused a seccomp listener (SECCOMP_FILTER_FLAG_NEW_LISTENER, Linux 5.0): {err}")),
            Ok(None) => return Err("the kernel gave no seccomp listener".into()),
            Ok(Some(listener)) => listener,
        };
        match sys::notif_replace_fd(listener.as_fd(), u64::MAX, listener.as_fd(), 1000, false) {
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(err) => Err(format!("the kernel's seccomp listener cannot replace a descriptor (SECCOMP_IOCTL_NOTIF_ADDFD, Linux 5.9): {err}")),
            Ok(()) => Err("SECCOMP_IOCTL_NOTIF_ADDFD accepted a notification that does not exist".into()),
        }
    });
    match outcome {
        Ok(()) => Finding::new(
            CHECK,
            Status::Ok,
            false,
            "a seccomp listener can be made and answers SECCOMP_IOCTL_NOTIF_ADDFD, so servers accept on the host socket itself".into(),
        ),
        Err(why) => Finding::new(CHECK, Status::Warn, false, format!("{COST}: {why}")),
    }
}

/// `--net pasta`: the pasta program, and the tun device it opens as the caller.
fn outbound(env: &Environment) -> [Finding; 2] {
    const COST: &str = "without it --net pasta fails, and the command reaches only what --host-loopback and --dns give it";
    let program = match pasta::find_in(env.ids.path.clone()) {
        Ok(path) => Finding::new("pasta", Status::Ok, false, path.display().to_string()),
        Err(err) => {
            let said = err.to_string();
            let said = said.strip_prefix("--net pasta: ").unwrap_or(&said);
            Finding::new("pasta", Status::Warn, false, format!("{COST}: {said}"))
        }
    };
    let tun = match pasta::check_tun(&env.tun) {
        Ok(()) => Finding::new(
            "tun device",
            Status::Ok,
            false,
            format!("{} can be opened", env.tun.display()),
        ),
        Err(why) => Finding::new("tun device", Status::Warn, false, format!("{COST}: {why}")),
    };
    [program, tun]
}

/// Host ports below 1024: bound by anyone when the host's `ip_unprivileged_port_start` allows it, by
/// lowport when it runs with `cap_net_bind_service` (a setcap'd binary).
pub fn host_ports(start: u16, capable: bool, exe: &Path) -> Finding {
    const CHECK: &str = "host ports below 1024";
    if start <= 80 {
        return Finding::new(
            CHECK,
            Status::Ok,
            false,
            format!("any user may bind host ports from {start} up (net.ipv4.ip_unprivileged_port_start), so -p 80:80 works"),
        );
    }
    if capable {
        return Finding::new(
            CHECK,
            Status::Ok,
            false,
            format!(
                "lowport may bind them, with cap_net_bind_service ({} has it, or lowport runs as root), so -p 80:80 works (net.ipv4.ip_unprivileged_port_start is {start})",
                exe.display()
            ),
        );
    }
    let exe = shell_word(&exe.display().to_string());
    Finding::new(
        CHECK,
        Status::Warn,
        false,
        format!(
            "ports below {start} need privilege on this host (net.ipv4.ip_unprivileged_port_start is {start}), so -p 80:80 fails and -p 8080:80 works; for port 80 itself, once as root: sudo setcap cap_net_bind_service=ep {exe}, or sudo sysctl -w net.ipv4.ip_unprivileged_port_start=80, or a systemd socket unit (docs/usage.md)"
        ),
    )
}

/// Runs `body` in a forked child and returns what it wrote to the file it is given, so that what it
/// changes (namespaces, a seccomp filter, `no_new_privs`) never touches lowport's own process.
/// `Err` says why the child could not report.
fn in_child(body: impl FnOnce(&mut fs::File)) -> Result<String, String> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot make a pipe for the check: {e}"))?;
    let child = match sys::fork().map_err(|e| format!("cannot fork the check's process: {e}"))? {
        ForkResult::Child => {
            drop(read);
            let mut out = fs::File::from(write);
            // A panic must not unwind into the parent's code, which this process shares.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut out)));
            sys::exit_now(0)
        }
        ForkResult::Parent { child } => child,
    };
    drop(write);
    let mut text = String::new();
    let read = fs::File::from(read).read_to_string(&mut text);
    let status = nix::sys::wait::waitpid(child, None);
    read.map_err(|e| format!("cannot read what the check's process said: {e}"))?;
    match status {
        Ok(WaitStatus::Exited(_, 0)) => Ok(text),
        Ok(WaitStatus::Signaled(_, signal, _)) if text.is_empty() => {
            Err(format!("the check's process was killed by {signal}"))
        }
        Ok(other) if text.is_empty() => Err(format!("the check's process ended: {other:?}")),
        Ok(_) => Ok(text),
        Err(e) => Err(format!("cannot wait for the check's process: {e}")),
    }
}

/// Runs one check in a forked child (see [`in_child`]): `Ok` when `body` succeeded there, else why
/// not, including a child that ended without saying.
fn check_in_child(body: impl FnOnce(&mut fs::File) -> Result<(), String>) -> Result<(), String> {
    let said = in_child(|out| {
        let line = match body(out) {
            Ok(()) => "ok".to_owned(),
            Err(why) => format!("fail {why}"),
        };
        let _ = out.write_all(line.as_bytes());
    })?;
    match said.strip_prefix("fail ") {
        Some(why) => Err(why.to_owned()),
        None if said == "ok" => Ok(()),
        None => Err("the check's process ended without an answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lowport-doctor-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["sys/kernel", "sys/user", "sys/net/ipv4", "bin"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        dir
    }

    fn env_in(dir: &Path) -> Environment {
        Environment {
            ids: userns::Environment {
                subuid: dir.join("subuid"),
                subgid: dir.join("subgid"),
                path: Some(dir.join("bin").into_os_string()),
                proc_sys: dir.join("sys"),
            },
            tun: dir.join("tun"),
            exe: "/opt/low port/lowport".into(),
        }
    }

    #[test]
    fn a_refused_user_namespace_names_the_switch_and_the_lasting_fix() {
        let dir = tempdir("switches");
        let env = env_in(&dir);
        let sys = dir.join("sys");
        let eperm = nix::errno::Errno::EPERM;
        let fix = |errno| userns_fix(&userns::diagnose_unshare(errno, &sys), &env);

        fs::write(sys.join("user/max_user_namespaces"), "0\n").unwrap();
        let said = fix(nix::errno::Errno::ENOSPC);
        assert!(said.contains("user.max_user_namespaces is 0"), "{said}");
        assert!(
            said.contains("sysctl -w user.max_user_namespaces=15000"),
            "{said}"
        );
        assert!(
            said.contains("echo user.max_user_namespaces=15000 | sudo tee /etc/sysctl.d/"),
            "{said}"
        );

        fs::write(sys.join("user/max_user_namespaces"), "15000\n").unwrap();
        fs::write(sys.join("kernel/unprivileged_userns_clone"), "0\n").unwrap();
        let said = fix(eperm);
        assert!(
            said.contains("kernel.unprivileged_userns_clone is 0"),
            "{said}"
        );
        assert!(
            said.contains("echo kernel.unprivileged_userns_clone=1 | sudo tee /etc/sysctl.d/"),
            "{said}"
        );

        fs::write(sys.join("kernel/unprivileged_userns_clone"), "1\n").unwrap();
        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        let said = fix(eperm);
        assert!(
            said.contains("apparmor_restrict_unprivileged_userns is 1"),
            "{said}"
        );
        assert!(
            said.ends_with("in one root command: '/opt/low port/lowport' doctor --apparmor-profile | sudo tee /etc/apparmor.d/lowport >/dev/null && sudo apparmor_parser -r /etc/apparmor.d/lowport"),
            "{said}"
        );
        // Ubuntu's usual refusal: unshare works, the map is refused.
        let refused = UsernsError::AppArmorMaps {
            file: "/proc/self/uid_map".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(userns_fix(&refused, &env).contains("doctor --apparmor-profile | sudo tee"));

        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "0\n",
        )
        .unwrap();
        let said = fix(eperm);
        assert!(said.contains("are user namespaces allowed here?"), "{said}");
        assert!(
            !said.contains("sysctl.d") && !said.contains("apparmor_parser"),
            "{said}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ok_line_names_the_switches_it_read() {
        let dir = tempdir("okline");
        let sys = dir.join("sys");
        assert_eq!(
            userns_ok_detail(&sys, 65534),
            "created one as uid 65534, with uid 65534 mapped to 0 in it"
        );
        fs::write(sys.join("user/max_user_namespaces"), "96551\n").unwrap();
        fs::write(sys.join("kernel/unprivileged_userns_clone"), "1\n").unwrap();
        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        let said = userns_ok_detail(&sys, 1000);
        assert!(
            said.contains(
                "(user.max_user_namespaces is 96551, kernel.unprivileged_userns_clone is 1)"
            ),
            "{said}"
        );
        assert!(
            said.contains("a profile lets lowport create them"),
            "{said}"
        );
        assert_eq!(sysctl(&sys, "user/max_user_namespaces"), Some(96551));
        assert_eq!(sysctl(&sys, "user/max_net_namespaces"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refused_network_namespace_names_its_limit() {
        let dir = tempdir("netns");
        let sys = dir.join("sys");
        let said = netns_fix(nix::errno::Errno::EPERM, &sys);
        assert!(said.contains("Operation not permitted"), "{said}");
        fs::write(sys.join("user/max_net_namespaces"), "0\n").unwrap();
        let said = netns_fix(nix::errno::Errno::ENOSPC, &sys);
        assert!(said.contains("user.max_net_namespaces is 0"), "{said}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn subordinate_ids_missing_are_a_warning_with_their_cost() {
        let dir = tempdir("subids");
        let env = env_in(&dir);
        let found = subids(&env, 4242, 4242, true);
        assert_eq!(found.status, Status::Warn);
        assert!(!found.essential);
        assert!(found
            .detail
            .starts_with("without subordinate ids only uid 0 exists inside"));
        assert!(
            found.detail.contains("newuidmap was not found"),
            "{}",
            found.detail
        );

        fs::write(dir.join("bin/newuidmap"), "").unwrap();
        fs::write(dir.join("bin/newgidmap"), "").unwrap();
        let found = subids(&env, 4242, 4242, true);
        assert_eq!(found.status, Status::Warn);
        assert!(
            found
                .detail
                .contains(": 4242 has no subordinate uid range in")
                && found.detail.contains("usermod --add-subuids"),
            "{}",
            found.detail
        );

        // With ranges, mapping them needs a user namespace (and a fork, which the integration
        // tests do).
        fs::write(dir.join("subuid"), "4242:100000:65536\n").unwrap();
        fs::write(dir.join("subgid"), "4242:200000:10\n").unwrap();
        let found = subids(&env, 4242, 4242, false);
        assert_eq!(found.status, Status::Skip);
        assert!(
            found
                .detail
                .starts_with("uids 65536 from 100000 and gids 10 from 200000 in /etc/subuid"),
            "{}",
            found.detail
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pasta_and_the_tun_device() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir("pasta");
        let env = env_in(&dir);
        let [program, tun] = outbound(&env);
        assert_eq!(program.status, Status::Warn);
        assert!(
            program.detail.starts_with("without it --net pasta fails")
                && program.detail.contains("apt install passt"),
            "{}",
            program.detail
        );
        assert_eq!(tun.status, Status::Warn);
        assert!(tun.detail.contains("does not exist here"), "{}", tun.detail);

        fs::write(dir.join("bin/pasta"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(dir.join("bin/pasta"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("tun"), "").unwrap();
        let [program, tun] = outbound(&env);
        assert_eq!(program.status, Status::Ok);
        assert_eq!(program.detail, dir.join("bin/pasta").display().to_string());
        assert_eq!(tun.status, Status::Ok);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_ports_below_1024() {
        let exe = Path::new("/home/a b/.local/bin/lowport");
        let found = host_ports(1024, false, exe);
        assert_eq!(found.status, Status::Warn);
        assert!(
            found
                .detail
                .contains("sudo setcap cap_net_bind_service=ep '/home/a b/.local/bin/lowport'"),
            "{}",
            found.detail
        );
        assert_eq!(host_ports(1024, true, exe).status, Status::Ok);
        assert_eq!(host_ports(80, false, exe).status, Status::Ok);
        assert_eq!(host_ports(81, false, exe).status, Status::Warn);
    }

    #[test]
    fn only_essential_checks_decide_the_exit_status() {
        let warn = Finding::new("pasta", Status::Warn, false, "missing".into());
        let ok = Finding::new("user namespaces", Status::Ok, true, "fine".into());
        let report = Report::new(vec![ok.clone(), warn.clone()]);
        assert_eq!(report.exit_code(), 0);
        let text = report.to_string();
        assert!(
            text.starts_with("ok    user namespaces: fine\nwarn  pasta: missing\n"),
            "{text}"
        );
        assert!(text.ends_with("one optional feature is missing (the line above not marked ok)\n"));

        let fix = Finding::new("user namespaces", Status::Fix, true, "no".into());
        let skip = Finding::new("network namespace", Status::Skip, true, "later".into());
        let report = Report::new(vec![fix, skip.clone()]);
        assert_eq!(report.exit_code(), 1);
        assert!(report
            .to_string()
            .contains("fix   user namespaces: no\nskip  network"));
        assert!(report.to_string().contains("lowport run cannot work here"));
        assert_eq!(Report::new(vec![ok, skip]).exit_code(), 1);

        let json = serde_json::to_string(&Report::new(vec![warn])).unwrap();
        assert_eq!(
            json,
            r#"{"ok":true,"checks":[{"check":"pasta","status":"warn","essential":false,"detail":"missing"}]}"#
        );
    }

    #[test]
    fn the_profile_covers_the_binary_that_prints_it() {
        let shipped = include_str!("../../contrib/apparmor/lowport");
        for covered in [
            "/usr/bin/lowport",
            "/usr/local/bin/lowport",
            "/home/alice/.local/bin/lowport",
        ] {
            assert_eq!(profile_for(covered.as_ref()), shipped, "{covered}");
        }
        assert!(shipped.contains("profile lowport @{lowport_bin} flags=(unconfined) {\n  userns,"));
        let other = profile_for("/opt/low port/lowport*".as_ref());
        assert!(
            other.contains(
                "@{lowport_bin} = /usr/bin/lowport /usr/local/bin/lowport @{HOME}/.local/bin/lowport \"/opt/low port/lowport\\*\"\n"
            ),
            "{other}"
        );
        assert_eq!(other.lines().count(), shipped.lines().count());
    }
}

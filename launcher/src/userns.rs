//! The user namespace: which ids are mapped, and how the maps get written.
//!
//! `single` maps the caller to uid/gid 0 and nothing else; the launcher writes the maps itself, which the
//! kernel allows for exactly that one id once `setgroups` is denied (user_namespaces(7)). `subids` also
//! maps the caller's ranges from /etc/subuid and /etc/subgid from id 1 upward; only the setuid helpers
//! `newuidmap` and `newgidmap` may write such maps, and they must run outside the namespace, so a small
//! helper process is forked before `unshare` and runs them when asked.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::sys;

/// How ids are mapped into the new user namespace (`--userns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `subids` when the caller has ranges in /etc/subuid and /etc/subgid and newuidmap/newgidmap exist,
    /// `single` otherwise.
    Auto,
    /// The caller becomes 0; no other id exists inside.
    Single,
    /// The caller becomes 0 and its subordinate ranges follow from 1; needs newuidmap and newgidmap.
    Subids,
}

/// A contiguous range of subordinate ids from /etc/subuid or /etc/subgid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The mapping that the launch will install, decided before anything is changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Single { uid: u32, gid: u32 },
    Subids(SubidPlan),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubidPlan {
    pub uid: u32,
    pub gid: u32,
    pub subuids: Vec<IdRange>,
    pub subgids: Vec<IdRange>,
    pub newuidmap: PathBuf,
    pub newgidmap: PathBuf,
}

impl SubidPlan {
    /// The `ID-INSIDE ID-OUTSIDE COUNT` triples for newuidmap/newgidmap: the caller at 0, then each
    /// range, one after the other, from 1.
    fn triples(owner: u32, ranges: &[IdRange]) -> Vec<String> {
        let mut args = vec!["0".to_owned(), owner.to_string(), "1".to_owned()];
        let mut inside: u64 = 1;
        for r in ranges {
            // Ids inside stop at 2^32 - 2 (u32::MAX is the invalid id); clip what does not fit.
            let room = (u64::from(u32::MAX) - inside) as u32;
            let count = r.count.min(room);
            if count == 0 {
                break;
            }
            args.extend([inside.to_string(), r.start.to_string(), count.to_string()]);
            inside += u64::from(count);
        }
        args
    }
}

/// Files and commands the id mapping depends on; tests point them at a temporary directory.
#[derive(Clone, Debug)]
pub struct Environment {
    pub subuid: PathBuf,
    pub subgid: PathBuf,
    /// The `PATH` searched for newuidmap and newgidmap.
    pub path: Option<std::ffi::OsString>,
    /// Where `user.max_user_namespaces` and the distribution switches live (normally /proc/sys).
    pub proc_sys: PathBuf,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
            path: std::env::var_os("PATH"),
            proc_sys: "/proc/sys".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("--userns subids: {user} has no subordinate {kind} range in {file} (add one as root, for example: usermod --add-sub{kind}s 100000-165535 {user}; or use --userns single)")]
    NoSubids {
        user: String,
        kind: &'static str,
        file: String,
    },
    #[error("--userns subids: {tool} was not found in PATH (install it: apt install uidmap, or dnf install shadow-utils; or use --userns single)")]
    NoHelper { tool: &'static str },
    #[error("cannot read {file}: {source}")]
    ReadSubids {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a user namespace: user.max_user_namespaces is 0 (allow them as root: sysctl -w user.max_user_namespaces=15000)")]
    MaxUserNamespacesZero,
    #[error("cannot create a user namespace: this user already has user.max_user_namespaces ({0}) of them (raise it as root: sysctl -w user.max_user_namespaces=15000)")]
    MaxUserNamespacesReached(u64),
    #[error("cannot create a user namespace: kernel.unprivileged_userns_clone is 0, so this kernel lets only root create them (allow them as root: sysctl -w kernel.unprivileged_userns_clone=1)")]
    UnprivilegedClone,
    #[error("cannot create a user namespace: AppArmor restricts them for unprivileged users (kernel.apparmor_restrict_unprivileged_userns is 1; allow them as root with sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give lowport an AppArmor profile with the 'userns' permission)")]
    AppArmor,
    #[error("cannot write {file}: {source}; AppArmor's restriction of user namespaces is on (kernel.apparmor_restrict_unprivileged_userns), which refuses the id maps of unprivileged users (allow them as root with sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give lowport an AppArmor profile with the 'userns' permission)")]
    AppArmorMaps {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a user namespace: {0} (are user namespaces allowed here? a container or a seccomp filter may forbid them; see docs/troubleshooting.md)")]
    Unshare(#[source] io::Error),
    #[error("cannot write {file}: {source}")]
    WriteMap {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the id-mapping helper: {0}{hint}", hint = process_limit_hint(.0))]
    Helper(#[source] io::Error),
    #[error("cannot start the process that creates the namespaces: {0}{hint}", hint = process_limit_hint(.0))]
    Creator(#[source] io::Error),
    #[error("cannot join the namespaces created for the command ({what}): {source}")]
    Join {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    HelperFailed(String),
}

/// Decides the mapping for `mode`, checking everything that can be checked before a namespace exists.
pub fn plan(mode: Mode, uid: u32, gid: u32, env: &Environment) -> Result<Plan, UsernsError> {
    if mode == Mode::Single {
        return Ok(Plan::Single { uid, gid });
    }
    let user = nix::unistd::User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let group = nix::unistd::Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name);
    let helpers = (
        find_in_path("newuidmap", env),
        find_in_path("newgidmap", env),
    );
    let subuids = read_ranges(&env.subuid, user.as_deref(), uid)?;
    let subgids = read_ranges(&env.subgid, user.as_deref(), uid).map(|mut r| {
        // shadow's newgidmap also accepts entries under the group's own name or id.
        if r.is_empty() {
            r = read_ranges(&env.subgid, group.as_deref(), gid).unwrap_or_default();
        }
        r
    })?;

    let (newuidmap, newgidmap) = match (mode, helpers) {
        (_, (Some(u), Some(g))) => (u, g),
        (Mode::Auto, _) => return Ok(Plan::Single { uid, gid }),
        (_, (None, _)) => return Err(UsernsError::NoHelper { tool: "newuidmap" }),
        (_, (_, None)) => return Err(UsernsError::NoHelper { tool: "newgidmap" }),
    };
    let missing = [
        ("uid", &subuids, &env.subuid),
        ("gid", &subgids, &env.subgid),
    ]
    .into_iter()
    .find(|(_, ranges, _)| ranges.is_empty());
    match (mode, missing) {
        (_, None) => Ok(Plan::Subids(SubidPlan {
            uid,
            gid,
            subuids,
            subgids,
            newuidmap,
            newgidmap,
        })),
        (Mode::Auto, Some(_)) => Ok(Plan::Single { uid, gid }),
        (_, Some((kind, _, file))) => Err(UsernsError::NoSubids {
            user: user.unwrap_or_else(|| uid.to_string()),
            kind,
            file: file.display().to_string(),
        }),
    }
}

fn find_in_path(tool: &str, env: &Environment) -> Option<PathBuf> {
    let path = env.path.as_ref()?;
    std::env::split_paths(path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Reads the ranges of `name` (or of the numeric `id`) from a subuid/subgid file. A missing file means
/// no ranges, as shadow's tools treat it.
fn read_ranges(file: &Path, name: Option<&str>, id: u32) -> Result<Vec<IdRange>, UsernsError> {
    match fs::read_to_string(file) {
        Ok(text) => Ok(parse_ranges(&text, name, id)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(UsernsError::ReadSubids {
            file: file.display().to_string(),
            source,
        }),
    }
}

/// Parses `owner:start:count` lines; the owner is a name or a numeric id.
pub fn parse_ranges(text: &str, name: Option<&str>, id: u32) -> Vec<IdRange> {
    let id = id.to_string();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let start = fields.next()?.trim().parse().ok()?;
            let count = fields.next()?.trim().parse().ok()?;
            if fields.next().is_some() || count == 0 {
                return None;
            }
            (Some(owner) == name || owner == id).then_some(IdRange { start, count })
        })
        .collect()
}

/// The hint for a fork refused with EAGAIN: RLIMIT_NPROC counts every process and thread of the uid.
fn process_limit_hint(err: &io::Error) -> &'static str {
    if err.raw_os_error() == Some(libc::EAGAIN) {
        " (the limit on this user's processes and threads, ulimit -u, is reached: raise it, or stop some of this user's processes)"
    } else {
        ""
    }
}

/// Turns a failed `unshare(CLONE_NEWUSER)` into the error that names its cause and fix.
pub fn diagnose_unshare(err: nix::errno::Errno, proc_sys: &Path) -> UsernsError {
    let read = |name: &str| -> Option<u64> {
        fs::read_to_string(proc_sys.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if read("kernel/unprivileged_userns_clone") == Some(0) {
        return UsernsError::UnprivilegedClone;
    }
    if read("kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return UsernsError::AppArmor;
    }
    match (err, read("user/max_user_namespaces")) {
        (_, Some(0)) => UsernsError::MaxUserNamespacesZero,
        (nix::errno::Errno::ENOSPC, Some(max)) => UsernsError::MaxUserNamespacesReached(max),
        _ => UsernsError::Unshare(err.into()),
    }
}

/// Writes the single-id maps for the calling process, which has just entered a new user namespace.
/// `proc_self` is normally /proc/self, `proc_sys` /proc/sys (read only to explain a refusal).
pub fn write_single_maps(
    proc_self: &Path,
    proc_sys: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), UsernsError> {
    let writes = [
        ("setgroups", "deny".to_owned()),
        ("uid_map", format!("0 {uid} 1\n")),
        ("gid_map", format!("0 {gid} 1\n")),
    ];
    for (file, content) in writes {
        write_proc(&proc_self.join(file), &content)
            .map_err(|err| explain_map_refusal(err, proc_sys))?;
    }
    Ok(())
}

/// Creates the user and network namespaces in a forked child and makes the calling process join them;
/// returns the bytes of /proc/self/environ when `environ` asks for them (see
/// `init::caller_environment`).
///
/// Why not `unshare` in the launcher itself: the id maps of a process are writable by its own user
/// only while the process is dumpable, and a launcher started with a file capability is not, for a
/// reason: it holds host sockets bound with that capability. Made dumpable even for a moment, any
/// program of the same user could take those sockets with pidfd_getfd(2) and send from port 700.
/// The child holds none of them (it closes `inherited`, the launcher's own descriptors, first), so it
/// may be dumpable; it unshares and gets its maps written (by itself, or by `helper` running
/// newuidmap), and the launcher, whose user owns the new user namespace and so has every capability
/// in it, enters both with setns(2). The launcher is never dumpable when it started that way.
pub fn create_and_join(
    plan: &Plan,
    helper: Option<MapHelper>,
    inherited: &[std::os::fd::RawFd],
    proc_sys: &Path,
    environ: bool,
) -> Result<Vec<u8>, UsernsError> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (report_r, report_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| UsernsError::Creator(e.into()))?;
    let (go_r, go_w) = nix::unistd::pipe2(cloexec).map_err(|e| UsernsError::Creator(e.into()))?;
    let child = match sys::fork().map_err(UsernsError::Creator)? {
        ForkResult::Child => {
            drop(report_r);
            drop(go_w);
            sys::exit_now(creator_main(
                plan, inherited, proc_sys, environ, report_w, go_r,
            ))
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_w);
    drop(go_r);
    let joined = (|| {
        let mut report = fs::File::from(report_r);
        let mut len = [0u8; 8];
        report
            .read_exact(&mut len)
            .map_err(|_| UsernsError::Creator(io::Error::other("it exited without a report")))?;
        let len = u64::from_ne_bytes(len);
        if len > MAX_ENVIRON {
            return Err(UsernsError::Creator(io::Error::other(format!(
                "it reported an environment of {len} bytes"
            ))));
        }
        let mut env = vec![0u8; len as usize];
        report.read_exact(&mut env).map_err(UsernsError::Creator)?;
        let mut pid = [0u8; 4];
        report.read_exact(&mut pid).map_err(UsernsError::Creator)?;
        // The child's pid as /proc knows it, for newuidmap and the /proc/PID/ns fallback: inside
        // another lowport, /proc is the host's and `child` (this pid namespace's number) names
        // another process there.
        let proc_pid = Pid::from_raw(i32::from_ne_bytes(pid));
        let mut status = Vec::new();
        report
            .read_to_end(&mut status)
            .map_err(UsernsError::Creator)?;
        match status.split_first() {
            Some((b'U', _)) => {}
            Some((b'X', message)) => {
                return Err(UsernsError::HelperFailed(
                    String::from_utf8_lossy(message).into_owned(),
                ))
            }
            _ => {
                return Err(UsernsError::Creator(io::Error::other(
                    "it exited without creating the namespaces",
                )))
            }
        }
        if let (Plan::Subids(_), Some(helper)) = (plan, helper) {
            helper.map(proc_pid)?;
        }
        join(child, proc_pid)?;
        Ok(env)
    })();
    // The child waits for this end to close before it exits, keeping the namespaces alive until they
    // are joined.
    drop(go_w);
    let _ = nix::sys::wait::waitpid(child, None);
    joined
}

/// Enters the user and network namespaces of `child`: through a pidfd (Linux 5.8), which names the
/// child whatever /proc shows (inside another lowport, /proc is still the host's, where the child's
/// pid means another process), or through /proc/PID/ns on older kernels.
fn join(child: Pid, proc_pid: Pid) -> Result<(), UsernsError> {
    use nix::sched::CloneFlags;
    let both = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET;
    let what = "user and network namespaces";
    match sys::pidfd_open(child) {
        Ok(pidfd) => match nix::sched::setns(&pidfd, both) {
            Ok(()) => return Ok(()),
            // Before 5.8 setns takes only namespace descriptors.
            Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => {
                return Err(UsernsError::Join {
                    what,
                    source: e.into(),
                })
            }
        },
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
        Err(source) => return Err(UsernsError::Join { what, source }),
    }
    for (ns, flag, what) in [
        ("user", CloneFlags::CLONE_NEWUSER, "user namespace"),
        ("net", CloneFlags::CLONE_NEWNET, "network namespace"),
    ] {
        let fail = |source: io::Error| UsernsError::Join { what, source };
        let file = fs::File::open(format!("/proc/{proc_pid}/ns/{ns}")).map_err(fail)?;
        nix::sched::setns(file, flag).map_err(|e| fail(e.into()))?;
    }
    Ok(())
}

/// The most bytes of environment the launcher accepts from the child (the kernel's own limit on
/// exec arguments and environment together is a quarter of the stack limit, 2 MiB by default).
const MAX_ENVIRON: u64 = 8 << 20;

/// The child of [`create_and_join`]. The report: the length and bytes of /proc/self/environ, its pid
/// as /proc shows it, then `U`
/// once the namespaces and their maps exist, or `X` and the error message.
fn creator_main(
    plan: &Plan,
    inherited: &[std::os::fd::RawFd],
    proc_sys: &Path,
    environ: bool,
    report: OwnedFd,
    go: OwnedFd,
) -> i32 {
    for fd in inherited {
        // SAFETY: this child never returns to the launcher's code that owns them; it ends with
        // exit_now.
        unsafe { sys::close_raw(*fd) };
    }
    let mut report = fs::File::from(report);
    // Holding nothing of the launcher's, this process may be dumpable: its /proc files become its
    // user's, which /proc/self/environ and the id maps need.
    let _ = nix::sys::prctl::set_dumpable(true);
    let env = if environ {
        fs::read("/proc/self/environ").unwrap_or_default()
    } else {
        Vec::new()
    };
    let proc_pid = fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<i32>().ok())
        .unwrap_or_else(|| nix::unistd::getpid().as_raw());
    if report
        .write_all(&(env.len() as u64).to_ne_bytes())
        .and_then(|()| report.write_all(&env))
        .and_then(|()| report.write_all(&proc_pid.to_ne_bytes()))
        .is_err()
    {
        return 1;
    }
    let fail = |report: &mut fs::File, err: UsernsError| {
        let _ = report.write_all(format!("X{err}").as_bytes());
        1
    };
    if let Err(errno) = nix::sched::unshare(
        nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNET,
    ) {
        return fail(&mut report, diagnose_unshare(errno, proc_sys));
    }
    if let Plan::Single { uid, gid } = plan {
        if let Err(err) = write_single_maps("/proc/self".as_ref(), proc_sys, *uid, *gid) {
            return fail(&mut report, err);
        }
    }
    if report.write_all(b"U").is_err() {
        return 1;
    }
    drop(report);
    let mut byte = [0u8; 1];
    let _ = fs::File::from(go).read(&mut byte);
    0
}

/// Ubuntu's AppArmor restriction (23.10 and later) lets `unshare` succeed and refuses the maps
/// instead. Its switch may be unreadable for ordinary users, so its presence is what counts.
fn explain_map_refusal(err: UsernsError, proc_sys: &Path) -> UsernsError {
    let switch = proc_sys.join("kernel/apparmor_restrict_unprivileged_userns");
    let restricted = fs::read_to_string(&switch).map_or(switch.exists(), |v| v.trim() != "0");
    match err {
        UsernsError::WriteMap { file, source }
            if restricted && source.raw_os_error() == Some(libc::EPERM) =>
        {
            UsernsError::AppArmorMaps { file, source }
        }
        other => other,
    }
}

fn write_proc(path: &Path, content: &str) -> Result<(), UsernsError> {
    // These files take one write(2) each; OpenOptions without create/truncate is what they accept.
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .map_err(|source| UsernsError::WriteMap {
            file: path.display().to_string(),
            source,
        })
}

/// A process forked before the namespaces exist that runs newuidmap and newgidmap on the process
/// that created them, when told its pid.
pub struct MapHelper {
    pid: Pid,
    go: OwnedFd,
    result: OwnedFd,
}

/// What the launcher sends the helper: a tag and the pid whose maps to write. Of fixed size, so the
/// helper needs no end-of-file, which copies of the pipe in other children would delay.
const MAP_REQUEST: usize = 5;

impl MapHelper {
    /// Forks the helper, which closes `inherited` (the launcher's own descriptors) at once. Fails
    /// unless the caller is single-threaded.
    pub fn spawn(
        plan: &SubidPlan,
        inherited: &[std::os::fd::RawFd],
    ) -> Result<MapHelper, UsernsError> {
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| UsernsError::Helper(e.into()))?;
        let (res_r, res_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| UsernsError::Helper(e.into()))?;
        match sys::fork().map_err(UsernsError::Helper)? {
            ForkResult::Parent { child } => Ok(MapHelper {
                pid: child,
                go: go_w,
                result: res_r,
            }),
            ForkResult::Child => {
                drop(go_w);
                drop(res_r);
                for fd in inherited {
                    // SAFETY: the helper never returns to the launcher's code that owns them; it
                    // ends with exit_now.
                    unsafe { sys::close_raw(*fd) };
                }
                let code = helper_main(plan, go_r, res_w);
                sys::exit_now(code)
            }
        }
    }

    /// Asks the helper to write the maps of `target` (whose new user namespace exists now) and waits
    /// for the outcome.
    pub fn map(self, target: Pid) -> Result<(), UsernsError> {
        let MapHelper { pid, go, result } = self;
        let mut request = [b'G'; MAP_REQUEST];
        request[1..].copy_from_slice(&target.as_raw().to_ne_bytes());
        let mut go = fs::File::from(go);
        let sent = go.write_all(&request);
        drop(go);
        let mut report = String::new();
        let read = fs::File::from(result).read_to_string(&mut report);
        let _ = nix::sys::wait::waitpid(pid, None);
        sent.map_err(UsernsError::Helper)?;
        read.map_err(UsernsError::Helper)?;
        match report.strip_prefix("ok") {
            Some(_) => Ok(()),
            None if report.is_empty() => Err(UsernsError::HelperFailed(
                "the id-mapping helper exited without a report".to_owned(),
            )),
            None => Err(UsernsError::HelperFailed(report)),
        }
    }
}

impl MapHelper {
    /// Lets the helper go without a request (it exits at end-of-file) and reaps it.
    pub fn cancel(self) {
        let MapHelper { pid, go, result } = self;
        drop(go);
        drop(result);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

fn helper_main(plan: &SubidPlan, go: OwnedFd, result: OwnedFd) -> i32 {
    let mut request = [0u8; MAP_REQUEST];
    let mut go = fs::File::from(go);
    let mut result = fs::File::from(result);
    // End-of-file instead of a request means the launcher gave up before the namespaces existed.
    if go.read_exact(&mut request).is_err() || request[0] != b'G' {
        return 0;
    }
    let target = Pid::from_raw(i32::from_ne_bytes(
        request[1..].try_into().expect("four bytes"),
    ));
    // The two maps are independent: run both tools at once, which halves the wait at start-up.
    let uid_map = spawn_map_tool(
        &plan.newuidmap,
        target,
        &SubidPlan::triples(plan.uid, &plan.subuids),
    );
    let gid_map = spawn_map_tool(
        &plan.newgidmap,
        target,
        &SubidPlan::triples(plan.gid, &plan.subgids),
    );
    let report = finish_map_tool(uid_map)
        .and(finish_map_tool(gid_map))
        .map(|()| "ok".to_owned())
        .unwrap_or_else(|e| e);
    let _ = result.write_all(report.as_bytes());
    0
}

/// A started newuidmap/newgidmap, with what its failure message needs.
type MapTool = Result<(std::process::Child, String), String>;

fn spawn_map_tool(tool: &Path, target: Pid, triples: &[String]) -> MapTool {
    let command = format!("{} {} {}", tool.display(), target, triples.join(" "));
    Command::new(tool)
        .arg(target.to_string())
        .args(triples)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(|child| (child, command))
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))
}

fn finish_map_tool(started: MapTool) -> Result<(), String> {
    let (child, command) = started?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot wait for {command}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tool = command.split(' ').next().unwrap_or_default();
    Err(format!(
        "{command} failed ({}): {} (check /etc/subuid and /etc/subgid, and that {tool} is setuid root or has cap_setuid/cap_setgid; or use --userns single)",
        out.status,
        stderr.trim(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_by_name_or_id() {
        let text =
            "# comment\nalice:100000:65536\nbob:165536:65536\n1001:300000:10\nbroken\nalice:1:0\n";
        assert_eq!(
            parse_ranges(text, Some("alice"), 1000),
            vec![IdRange {
                start: 100000,
                count: 65536
            }]
        );
        assert_eq!(
            parse_ranges(text, Some("carol"), 1001),
            vec![IdRange {
                start: 300000,
                count: 10
            }]
        );
        assert!(parse_ranges(text, None, 5).is_empty());
    }

    #[test]
    fn triples_put_the_caller_at_zero_and_ranges_from_one() {
        let t = SubidPlan::triples(
            1000,
            &[
                IdRange {
                    start: 100000,
                    count: 65536,
                },
                IdRange {
                    start: 500000,
                    count: 10,
                },
            ],
        );
        assert_eq!(t.join(" "), "0 1000 1 1 100000 65536 65537 500000 10");
    }

    fn env_in(dir: &Path) -> Environment {
        Environment {
            subuid: dir.join("subuid"),
            subgid: dir.join("subgid"),
            path: Some(dir.as_os_str().to_owned()),
            proc_sys: dir.join("sys"),
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lowport-userns-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sys/kernel")).unwrap();
        fs::create_dir_all(dir.join("sys/user")).unwrap();
        dir
    }

    #[test]
    fn auto_falls_back_to_single_and_subids_explains() {
        let dir = tempdir("plan");
        let env = env_in(&dir);
        assert_eq!(
            plan(Mode::Auto, 4242, 4242, &env).unwrap(),
            Plan::Single {
                uid: 4242,
                gid: 4242
            }
        );
        let err = plan(Mode::Subids, 4242, 4242, &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("newuidmap was not found"), "{err}");

        fs::write(dir.join("newuidmap"), "").unwrap();
        fs::write(dir.join("newgidmap"), "").unwrap();
        let err = plan(Mode::Subids, 4242, 4242, &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no subordinate uid range") && err.contains("usermod --add-subuids"),
            "{err}"
        );

        fs::write(dir.join("subuid"), "4242:100000:65536\n").unwrap();
        fs::write(dir.join("subgid"), "4242:200000:65536\n").unwrap();
        match plan(Mode::Auto, 4242, 4242, &env).unwrap() {
            Plan::Subids(p) => {
                assert_eq!(
                    p.subuids,
                    vec![IdRange {
                        start: 100000,
                        count: 65536
                    }]
                );
                assert_eq!(
                    p.subgids,
                    vec![IdRange {
                        start: 200000,
                        count: 65536
                    }]
                );
            }
            other => panic!("expected subids, got {other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unshare_failures_name_the_switch() {
        let dir = tempdir("diag");
        let sys = dir.join("sys");
        let eperm = nix::errno::Errno::EPERM;
        assert!(matches!(
            diagnose_unshare(eperm, &sys),
            UsernsError::Unshare(_)
        ));
        fs::write(sys.join("user/max_user_namespaces"), "0\n").unwrap();
        assert!(diagnose_unshare(nix::errno::Errno::ENOSPC, &sys)
            .to_string()
            .contains("user.max_user_namespaces is 0"));
        fs::write(sys.join("user/max_user_namespaces"), "10\n").unwrap();
        assert!(matches!(
            diagnose_unshare(nix::errno::Errno::ENOSPC, &sys),
            UsernsError::MaxUserNamespacesReached(10)
        ));
        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        assert!(diagnose_unshare(eperm, &sys)
            .to_string()
            .contains("apparmor_restrict_unprivileged_userns=0"));
        fs::write(sys.join("kernel/unprivileged_userns_clone"), "0\n").unwrap();
        assert!(diagnose_unshare(eperm, &sys)
            .to_string()
            .contains("unprivileged_userns_clone=1"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refused_maps_under_apparmor_name_the_switch() {
        let dir = tempdir("apparmor");
        let refused = || UsernsError::WriteMap {
            file: "uid_map".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let sys = dir.join("sys");
        assert!(matches!(
            explain_map_refusal(refused(), &sys),
            UsernsError::WriteMap { .. }
        ));
        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "0\n",
        )
        .unwrap();
        assert!(matches!(
            explain_map_refusal(refused(), &sys),
            UsernsError::WriteMap { .. }
        ));
        fs::write(
            sys.join("kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        assert!(matches!(
            explain_map_refusal(refused(), &sys),
            UsernsError::AppArmorMaps { .. }
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_maps_are_written_in_order() {
        let dir = tempdir("maps");
        for f in ["setgroups", "uid_map", "gid_map"] {
            fs::write(dir.join(f), "").unwrap();
        }
        write_single_maps(&dir, &dir.join("sys"), 1000, 100).unwrap();
        assert_eq!(fs::read_to_string(dir.join("setgroups")).unwrap(), "deny");
        assert_eq!(
            fs::read_to_string(dir.join("uid_map")).unwrap(),
            "0 1000 1\n"
        );
        assert_eq!(
            fs::read_to_string(dir.join("gid_map")).unwrap(),
            "0 100 1\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

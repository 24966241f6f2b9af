//! Named instances: each `lowport run` keeps its state under `$XDG_RUNTIME_DIR/lowport/NAME/`, so
//! `lowport ps`, `exec`, `stop` and `port` can find it later, from another shell.
//!
//! The directory holds three files:
//!
//! - `lock`, which the running lowport holds an exclusive `flock(2)` on for its whole life. A lock
//!   that can be taken means the instance is gone (even after SIGKILL, since the kernel drops the
//!   lock with the last descriptor), so no pid is ever trusted and a reused pid cannot fool `ps`.
//!   Taking it is also how a run claims its name, without a race between two runs.
//! - `state.json`: name, lowport's pid, the command, its ports and their modes, as `ps` shows them.
//! - `control`, the name of the abstract `SOCK_SEQPACKET` socket that the running lowport answers on
//!   ([`control`]), with the requests of [`client`]. Abstract UNIX names belong to a network
//!   namespace, and lowport binds it in the host's before it leaves: a server inside, although it
//!   runs as your uid and can read this directory, cannot connect to it, nor to another instance's.
//!
//! Only the user who started an instance can reach it: the directory is theirs and mode 0700, and the
//! control socket also checks each caller's uid ([`control`]).

pub mod client;
pub mod control;
pub mod live;
pub mod session;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The longest name: the control socket's abstract name must fit in `sun_path` (108 bytes).
pub const MAX_NAME: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("--name '{0}' is not a valid name: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit")]
    BadName(String),
    #[error("an instance named '{name}' is already running (lowport pid {pid}); stop it with `lowport stop {name}`, or choose another --name")]
    Taken { name: String, pid: String },
    #[error("no instance named '{name}' is running{hint}")]
    NotRunning { name: String, hint: String },
    #[error("cannot use the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state directory {path} is not safe to use: {why}; remove it, or set XDG_RUNTIME_DIR to a directory of your own")]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot write the instance's state {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the instances of this user live: `$XDG_RUNTIME_DIR/lowport`, or `/run/user/UID/lowport`
/// when the variable is unset but that directory is the user's, or else `/tmp/lowport-UID`, which
/// is checked to be the user's own before anything is put in it.
pub fn root() -> Result<PathBuf, InstanceError> {
    let uid = nix::unistd::geteuid().as_raw();
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .or_else(|| {
            let run = PathBuf::from(format!("/run/user/{uid}"));
            fs::metadata(&run)
                .ok()
                .filter(|m| m.is_dir() && m.uid() == uid)
                .map(|_| run)
        });
    let dir = match runtime {
        Some(runtime) => runtime.join("lowport"),
        None => PathBuf::from(format!("/tmp/lowport-{uid}")),
    };
    ensure_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Makes `dir` (mode 0700) unless it exists, and checks that it is a real directory of `uid` that
/// nobody else may enter: in /tmp, another user could have made it first.
fn ensure_private_dir(dir: &Path, uid: u32) -> Result<(), InstanceError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(InstanceError::Dir {
                path: dir.to_owned(),
                source,
            })
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|source| InstanceError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let why = if !meta.is_dir() {
        Some("it is not a directory".to_owned())
    } else if meta.uid() != uid {
        Some(format!(
            "it belongs to uid {}, not to you ({uid})",
            meta.uid()
        ))
    } else if meta.permissions().mode() & 0o077 != 0 {
        Some(format!(
            "its mode is {:o}, open to others (it should be 700)",
            meta.permissions().mode() & 0o777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(InstanceError::Unsafe {
            path: dir.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Whether `name` may name an instance: it becomes a directory name and part of a socket path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The name a run gets without `--name`: the program's file name, with anything a name may not hold
/// turned into '-' (`/usr/sbin/nginx` gives `nginx`, `python3.11` stays `python3.11`).
pub fn derive_name(program: &OsStr) -> String {
    let base = Path::new(program)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '_', '-']);
    let mut name: String = cleaned.chars().take(MAX_NAME - 4).collect();
    if name.is_empty() {
        name = "lowport".into();
    }
    name
}

/// A port as `ps` and `state.json` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortState {
    pub protocol: String,
    pub host_ip: String,
    pub host_port: u16,
    pub port: u16,
    pub mode: String,
}

/// The content of `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    /// lowport's pid, as the host sees it.
    pub pid: u32,
    /// The command's pid, as the host sees it (0 until it runs).
    pub command_pid: u32,
    pub command: Vec<String>,
    /// Seconds since the epoch.
    pub started: u64,
    pub ports: Vec<PortState>,
}

/// A name this run holds: its directory, the locked `lock` file and the control socket. Dropped, it
/// removes the directory.
#[derive(Debug)]
pub struct Claim {
    pub name: String,
    dir: PathBuf,
    lock: File,
    control: OwnedFd,
}

impl Claim {
    /// Claims `name`, or a name derived from `program` when `name` is `None` (adding -2, -3... when
    /// another run holds it). A stale directory, left by a lowport that was killed, is taken over.
    pub fn take(root: &Path, name: Option<&str>, program: &OsStr) -> Result<Claim, InstanceError> {
        // Directories left by lowports that were killed go now, not only when `lowport ps` runs:
        // runs killed by scripts would otherwise pile up.
        let _ = list(root);
        if let Some(name) = name {
            if !valid_name(name) {
                return Err(InstanceError::BadName(name.to_owned()));
            }
            return Claim::take_exactly(root, name)?.ok_or_else(|| InstanceError::Taken {
                name: name.to_owned(),
                pid: read_state(&root.join(name)).map_or("unknown".into(), |s| s.pid.to_string()),
            });
        }
        let base = derive_name(program);
        for n in 1..1000 {
            let candidate = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if let Some(claim) = Claim::take_exactly(root, &candidate)? {
                return Ok(claim);
            }
        }
        Err(InstanceError::Taken {
            name: base,
            pid: "unknown".into(),
        })
    }

    /// `Ok(None)` when a running lowport holds the name.
    fn take_exactly(root: &Path, name: &str) -> Result<Option<Claim>, InstanceError> {
        let dir = root.join(name);
        let dir_error = |source| InstanceError::Dir {
            path: dir.clone(),
            source,
        };
        // Another run, or a `ps` cleaning up, may remove the directory between these steps; then
        // the lock taken is that of a removed file, and the claim starts again.
        for _ in 0..10 {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(dir_error(err)),
            }
            let Some(lock) = try_lock(&dir.join("lock")).map_err(dir_error)? else {
                return Ok(None);
            };
            if !still_linked(&lock, &dir.join("lock")) {
                continue;
            }
            // The lock is ours: whatever else is here was left by a run that is gone.
            let _ = fs::remove_file(dir.join("state.json"));
            let control_path = dir.join("control");
            let _ = fs::remove_file(&control_path);
            let control =
                control::listen(name, &control_path).map_err(|source| InstanceError::Control {
                    path: control_path.clone(),
                    source,
                })?;
            return Ok(Some(Claim {
                name: name.to_owned(),
                dir,
                lock,
                control,
            }));
        }
        Err(dir_error(io::Error::other(
            "the directory kept changing while lowport claimed it",
        )))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// lowport's own descriptors here, which no child may keep (the lock would outlive lowport).
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.lock.as_raw_fd(), self.control.as_raw_fd()]
    }

    /// The listening control socket, for [`control::serve`].
    pub fn control(&self) -> io::Result<OwnedFd> {
        self.control.as_fd().try_clone_to_owned()
    }

    /// Writes `state.json` (see [`write_state_in`]).
    pub fn write_state(&self, state: &State) -> Result<(), InstanceError> {
        write_state_in(&self.dir, state).map_err(|source| InstanceError::Write {
            path: self.dir.join("state.json"),
            source,
        })
    }
}

/// Writes `dir/state.json` whole, in one write to a temporary file then renamed, so a reader never
/// sees half.
pub(crate) fn write_state_in(dir: &Path, state: &State) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(state)?;
    text.push(b'\n');
    let tmp = dir.join(".state.json.tmp");
    File::create(&tmp)?.write_all(&text)?;
    fs::rename(&tmp, dir.join("state.json"))
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The directory may have been removed while lowport ran (the server runs as the user), and
        // the name claimed again since: then nothing here is ours to remove.
        if !still_linked(&self.lock, &self.dir.join("lock")) {
            return;
        }
        // Everything but the lock first: a `ps` that takes the lock after this sees nothing of ours.
        let _ = fs::remove_file(self.dir.join("control"));
        let _ = fs::remove_file(self.dir.join("state.json"));
        let _ = fs::remove_file(self.dir.join("lock"));
        let _ = fs::remove_dir(&self.dir);
        let _ = &self.lock;
    }
}

/// Opens `path` (creating it) and takes an exclusive lock without waiting; `Ok(None)` when another
/// process holds it.
fn try_lock(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    if crate::sys::try_lock_exclusive(file.as_fd())? {
        Ok(Some(file))
    } else {
        Ok(None)
    }
}

/// Whether `file` is still the file at `path` (a cleaner may have removed it after we opened it).
fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

fn read_state(dir: &Path) -> Option<State> {
    let text = read_own_file(&dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The largest `state.json` or `control` file a client reads.
const MAX_FILE: usize = 1 << 20;

/// Reads a file of an instance's directory. The server inside runs as the user and may replace it:
/// by a FIFO, which would keep `lowport ps` waiting for ever, or a link to /dev/zero, which it
/// would read without end. So no link is followed, the open does not wait, and only a regular file
/// of at most [`MAX_FILE`] bytes is read.
pub(crate) fn read_own_file(path: &Path) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut text = String::new();
    file.take(MAX_FILE as u64 + 1).read_to_string(&mut text)?;
    if text.len() > MAX_FILE {
        return Err(io::Error::other(format!(
            "{} is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    Ok(text)
}

/// One entry of [`list`].
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    /// `None` while the instance is still starting (no state written yet).
    pub state: Option<State>,
}

/// The running instances under `root`, by name. Directories whose lock nobody holds are left over
/// from a lowport that was killed; they are removed on the way.
pub fn list(root: &Path) -> io::Result<Vec<Listed>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !valid_name(&name) {
            continue;
        }
        let dir = entry.path();
        match try_lock(&dir.join("lock")) {
            Ok(Some(lock)) => {
                // Stale: remove while holding the lock, so no run can claim it halfway.
                if still_linked(&lock, &dir.join("lock")) {
                    tracing::debug!(name, "removing a stale instance directory");
                    let _ = fs::remove_file(dir.join("control"));
                    let _ = fs::remove_file(dir.join("state.json"));
                    let _ = fs::remove_file(dir.join(".state.json.tmp"));
                    let _ = fs::remove_file(dir.join("lock"));
                    let _ = fs::remove_dir(&dir);
                }
            }
            Ok(None) => found.push(Listed {
                state: read_state(&dir),
                name,
            }),
            Err(err) => tracing::debug!(?err, name, "cannot look at an instance"),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The file that names the control socket of the running instance `name`.
pub fn control_path(root: &Path, name: &str) -> Result<PathBuf, InstanceError> {
    if !valid_name(name) {
        return Err(InstanceError::BadName(name.to_owned()));
    }
    let dir = root.join(name);
    let running = matches!(try_lock(&dir.join("lock")), Ok(None));
    if !running {
        let names: Vec<String> = list(root)
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.name)
            .collect();
        let hint = if names.is_empty() {
            " (none is; `lowport run --name NAME ...` starts one)".to_owned()
        } else {
            format!(" (running: {}; `lowport ps` lists them)", names.join(", "))
        };
        return Err(InstanceError::NotRunning {
            name: name.to_owned(),
            hint,
        });
    }
    Ok(dir.join("control"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web"));
        assert!(valid_name("web-2.test_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("-web"));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn names_are_derived_from_the_program() {
        assert_eq!(derive_name(OsStr::new("/usr/sbin/nginx")), "nginx");
        assert_eq!(derive_name(OsStr::new("python3.11")), "python3.11");
        assert_eq!(derive_name(OsStr::new("./my server")), "my-server");
        assert_eq!(derive_name(OsStr::new("/")), "lowport");
        assert_eq!(derive_name(OsStr::new("...")), "lowport");
        assert!(valid_name(&derive_name(OsStr::new(&"y".repeat(200)))));
    }

    fn temp_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lowport-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn a_held_name_is_not_given_twice_and_a_dropped_one_is_removed() {
        let root = temp_root("claim");
        let first = Claim::take(&root, None, OsStr::new("/usr/bin/web")).unwrap();
        assert_eq!(first.name, "web");
        let second = Claim::take(&root, None, OsStr::new("web")).unwrap();
        assert_eq!(second.name, "web-2");
        assert!(matches!(
            Claim::take(&root, Some("web"), OsStr::new("x")),
            Err(InstanceError::Taken { .. })
        ));
        let names: Vec<_> = list(&root).unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["web", "web-2"]);
        drop(first);
        assert!(!root.join("web").exists());
        assert_eq!(list(&root).unwrap().len(), 1);
        drop(second);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_claim_whose_directory_was_taken_over_leaves_it_alone() {
        let root = temp_root("over");
        let first = Claim::take(&root, Some("web"), OsStr::new("x")).unwrap();
        fs::remove_dir_all(root.join("web")).unwrap();
        let second = Claim::take(&root, Some("web"), OsStr::new("x")).unwrap();
        drop(first);
        assert!(root.join("web").join("lock").exists());
        assert_eq!(list(&root).unwrap().len(), 1);
        drop(second);
        assert!(!root.join("web").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_stale_directory_is_cleaned_and_its_name_taken() {
        let root = temp_root("stale");
        let dir = root.join("old");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("lock"), "").unwrap();
        fs::write(dir.join("state.json"), "{}").unwrap();
        assert!(list(&root).unwrap().is_empty());
        assert!(!dir.exists());
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("state.json"), "{}").unwrap();
        let claim = Claim::take(&root, Some("old"), OsStr::new("x")).unwrap();
        assert!(!dir.join("state.json").exists());
        drop(claim);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let root = temp_root("read");
        fs::write(root.join("state.json"), "{}").unwrap();
        assert_eq!(read_own_file(&root.join("state.json")).unwrap(), "{}");
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_own_file(&root.join("fifo")).is_err());
        std::os::unix::fs::symlink(root.join("state.json"), root.join("link")).unwrap();
        assert!(read_own_file(&root.join("link")).is_err());
        std::os::unix::fs::symlink("/dev/zero", root.join("zero")).unwrap();
        assert!(read_own_file(&root.join("zero")).is_err());
        fs::write(root.join("big"), vec![b' '; MAX_FILE + 1]).unwrap();
        assert!(read_own_file(&root.join("big")).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_refused() {
        let root = temp_root("mode");
        let open = root.join("open");
        fs::DirBuilder::new().mode(0o755).create(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert!(matches!(
            ensure_private_dir(&open, uid),
            Err(InstanceError::Unsafe { .. })
        ));
        assert!(ensure_private_dir(&root.join("new"), uid).is_ok());
        fs::remove_dir_all(&root).unwrap();
    }
}

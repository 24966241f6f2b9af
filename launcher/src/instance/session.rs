//! The session of the command `lowport exec` starts: a process group of its own and, on a terminal,
//! a pseudo-terminal of its own that `lowport exec` relays to the user's.
//!
//! The command runs in the instance's namespaces, where the server is root: the server may trace it,
//! open its descriptors through /proc, and choose the program it runs (the mount namespace where
//! its path is looked up is the server's). So the command gets nothing the server must not have:
//!
//! - A session of its own (setsid(2)). In the caller's process group, a `kill(0, ...)` from the
//!   command would reach the caller's script and everything else the script started, outside every
//!   namespace.
//! - On a terminal, a pty, which `lowport exec` opens before it joins the namespaces (inside, the
//!   server could have mounted its own /dev/ptmx) and relays. With the user's terminal itself, the
//!   server could keep a copy after the exec, read what the user types next into their shell and
//!   write to it. When the command ends, `lowport exec` closes the pty's master, which hangs the pty
//!   up: a copy the server took reads end-of-file and cannot write. `docker exec -t` and sudo's
//!   `use_pty` do the same.
//!
//! With its input on the terminal, the relay puts the user's terminal in raw mode, so Ctrl-C reaches
//! the command as the byte that its pty turns into SIGINT. Signals that reach `lowport exec` itself
//! (SIGTERM, SIGHUP, or Ctrl-C when only the output is a terminal) go on to the command, and a change
//! of the window's size to its pty.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::{Child, Command, ExitStatus};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{self, SetArg, Termios};

use crate::sys;

/// The signals passed on to the command. SIGWINCH, handled as well, resizes its pty instead.
const PASSED_ON: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGHUP,
];

/// The pty, while the command has not started yet.
struct Pty {
    master: OwnedFd,
    slave: Option<OwnedFd>,
    /// Which of descriptors 0, 1 and 2 are a terminal, and are replaced by the slave.
    replaced: [bool; 3],
}

/// Everything `lowport exec` prepares before it joins the namespaces.
pub struct Session {
    pty: Option<Pty>,
    signals: SignalFd,
}

/// The user's terminal settings, put back when dropped.
struct RawMode(Termios);

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin(), SetArg::TCSADRAIN, &self.0);
    }
}

fn is_terminal(fd: RawFd) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// A copy of standard descriptor `fd` (0, 1 or 2), sharing its open file.
fn standard(fd: RawFd) -> io::Result<OwnedFd> {
    match fd {
        0 => io::stdin().as_fd().try_clone_to_owned(),
        1 => io::stdout().as_fd().try_clone_to_owned(),
        _ => io::stderr().as_fd().try_clone_to_owned(),
    }
}

/// The user's terminal the relay writes to: standard output or error, or input when only it is one.
fn user_terminal(replaced: [bool; 3]) -> Option<io::Result<OwnedFd>> {
    [1, 2, 0]
        .into_iter()
        .find(|fd| replaced[*fd as usize])
        .map(standard)
}

/// Writes all of `data` to `fd`, waiting while it is full.
fn write_all(fd: BorrowedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::NONE);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

impl Session {
    /// Opens the pty when a standard descriptor is a terminal, and blocks the signals the relay
    /// passes on (the command unblocks them before its exec). Call before joining the namespaces.
    pub fn prepare() -> io::Result<Session> {
        let replaced = [is_terminal(0), is_terminal(1), is_terminal(2)];
        let pty = match user_terminal(replaced) {
            None => None,
            Some(user) => {
                let user = user?;
                let mut settings = termios::tcgetattr(&user).ok();
                if !replaced[0] {
                    // The user's terminal is not put in raw mode when the input is not read from
                    // it, and does its own output processing ("\n" to "\r\n"): once is enough.
                    if let Some(settings) = &mut settings {
                        settings.output_flags.remove(termios::OutputFlags::OPOST);
                    }
                }
                let size = sys::window_size(user.as_fd()).ok();
                let pair = nix::pty::openpty(size.as_ref(), settings.as_ref())?;
                for fd in [&pair.master, &pair.slave] {
                    nix::fcntl::fcntl(
                        fd.as_raw_fd(),
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    )?;
                }
                Some(Pty {
                    master: pair.master,
                    slave: Some(pair.slave),
                    replaced,
                })
            }
        };
        let mut mask = SigSet::empty();
        for sig in PASSED_ON {
            mask.add(sig);
        }
        mask.add(Signal::SIGWINCH);
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Session { pty, signals })
    }

    /// Starts `command` in a session of its own, on the pty if there is one.
    pub fn spawn(&mut self, command: &mut Command) -> io::Result<Child> {
        let terminal = self.pty.as_ref().and_then(|pty| {
            let slave = pty.slave.as_ref()?;
            Some((slave.as_raw_fd(), pty.replaced))
        });
        sys::new_session_on_spawn(command, terminal);
        let child = command.spawn()?;
        // Only the command holds the slave now: its end, and the server's copies, hang up when the
        // master closes.
        if let Some(pty) = &mut self.pty {
            pty.slave = None;
        }
        Ok(child)
    }

    /// Relays between the user's terminal and the pty, and passes signals on, until `child` ends;
    /// then closes the pty and puts the user's terminal back as it was.
    pub fn wait(self, mut child: Child) -> io::Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let exited = sys::pidfd_open(pid)?;
        let raw_mode = match &self.pty {
            Some(pty) if pty.replaced[0] => {
                let saved = termios::tcgetattr(io::stdin())?;
                let mut raw = saved.clone();
                termios::cfmakeraw(&mut raw);
                termios::tcsetattr(io::stdin(), SetArg::TCSADRAIN, &raw)?;
                Some(RawMode(saved))
            }
            _ => None,
        };
        let mut relay = self.pty.as_ref().map(Relay::new).transpose()?;
        loop {
            let mut fds = vec![
                PollFd::new(exited.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(relay) = &relay {
                relay.poll_fds(&mut fds);
            }
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
            let ready = |i: usize| {
                fds.get(i)
                    .and_then(|fd| fd.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let (ended, signalled) = (ready(0), ready(1));
            let relay_ready: Vec<bool> = (2..fds.len()).map(ready).collect();
            drop(fds);
            if signalled {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    self.pass_on(info.ssi_signo as i32, pid);
                }
            }
            if let Some(relay) = &mut relay {
                relay.step(&relay_ready);
            }
            if ended {
                if let Some(relay) = &mut relay {
                    relay.drain();
                }
                break;
            }
        }
        drop(relay);
        drop(raw_mode);
        // Closing the master hangs the pty up.
        drop(self.pty);
        child.wait()
    }

    fn pass_on(&self, signo: i32, pid: nix::unistd::Pid) {
        let Ok(sig) = Signal::try_from(signo) else {
            return;
        };
        if sig == Signal::SIGWINCH {
            if let Some(pty) = &self.pty {
                if let Some(Ok(user)) = user_terminal(pty.replaced) {
                    if let Ok(size) = sys::window_size(user.as_fd()) {
                        let _ = sys::set_window_size(pty.master.as_fd(), &size);
                    }
                }
            }
            return;
        }
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

/// The copying between the user's terminal and the pty's master.
struct Relay<'a> {
    master: BorrowedFd<'a>,
    /// Where the command's output goes: the user's terminal.
    output: OwnedFd,
    /// The user's input, while it is read (standard input is the terminal, and not at its end).
    input: Option<OwnedFd>,
    /// Whether the master still gives output (not hung up).
    open: bool,
    /// Input read but not yet written to the master, which may be full.
    pending: Vec<u8>,
}

impl<'a> Relay<'a> {
    fn new(pty: &'a Pty) -> io::Result<Relay<'a>> {
        sys::set_nonblocking_flag(pty.master.as_fd(), true)?;
        let output =
            user_terminal(pty.replaced).unwrap_or_else(|| Err(io::Error::other("no terminal")))?;
        let input = if pty.replaced[0] {
            Some(standard(0)?)
        } else {
            None
        };
        Ok(Relay {
            master: pty.master.as_fd(),
            output,
            input,
            open: true,
            pending: Vec::new(),
        })
    }

    /// Adds, in this order, the master (when open) and the user's input (when read and nothing is
    /// pending).
    fn poll_fds<'b>(&'b self, fds: &mut Vec<PollFd<'b>>) {
        if self.open {
            let mut events = PollFlags::POLLIN;
            if !self.pending.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(self.master, events));
        }
        if let (Some(input), true) = (&self.input, self.pending.is_empty()) {
            fds.push(PollFd::new(input.as_fd(), PollFlags::POLLIN));
        }
    }

    /// One round after poll, with the readiness of what [`Relay::poll_fds`] added.
    fn step(&mut self, ready: &[bool]) {
        let mut ready = ready.iter().copied();
        let master_ready = self.open && ready.next().unwrap_or(false);
        let input_ready =
            self.input.is_some() && self.pending.is_empty() && ready.next().unwrap_or(false);
        if master_ready {
            self.copy_output();
            if !self.pending.is_empty() {
                match nix::unistd::write(self.master, &self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(_) => self.pending.clear(),
                }
            }
        }
        if let (Some(input), true) = (&self.input, input_ready) {
            let mut buf = [0u8; 4096];
            match nix::unistd::read(input.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => self.pending.extend_from_slice(&buf[..n]),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // The end of the input, or a terminal hung up.
                _ => self.input = None,
            }
        }
    }

    /// Copies what the master has now to the user's terminal.
    fn copy_output(&mut self) {
        let mut buf = [0u8; 16384];
        loop {
            match nix::unistd::read(self.master.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => {
                    if write_all(self.output.as_fd(), &buf[..n]).is_err() {
                        self.open = false;
                        return;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                // End-of-file, or EIO: nothing holds the slave any more.
                _ => {
                    self.open = false;
                    return;
                }
            }
        }
    }

    /// What the command wrote just before it ended.
    fn drain(&mut self) {
        if self.open {
            self.copy_output();
        }
    }
}

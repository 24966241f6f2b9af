//! lowport socket-activated itself: `systemd-socket-activate` (Debian's systemd package; it needs no
//! running systemd) binds the host sockets as uid 65534 and starts lowport on the first connection
//! with `LISTEN_FDS`. `-p` serves those sockets instead of binding (by port, or by the name
//! `--fdname` gives them), and the command gets the rest as its own activation.
//!
//! Each test connects first, as a client of a socket unit would: the connection waits in the
//! socket's queue while lowport and the server start, and must be served, not refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use lowport_tests::*;

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
const PYTHON: &str = "/usr/bin/python3";

fn prerequisites() -> bool {
    require(
        Path::new(SOCKET_ACTIVATE).exists(),
        "systemd-socket-activate (Debian package systemd)",
    ) && require(Path::new(PYTHON).exists(), "python3")
}

/// A free TCP port of 127.0.0.1, for systemd-socket-activate to bind.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `systemd-socket-activate ARGS -- lowport LOWPORT_ARGS` as uid 65534. Without --accept it execs
/// lowport in its own process on the first connection, so the child's pid is lowport's.
struct Activated {
    child: Child,
    out: Output,
}

impl Activated {
    /// Starts it and waits until it listens on `last`, the last of its `-l` addresses.
    fn start(args: &[&str], last: &str, lowport_args: &[&str]) -> Activated {
        let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(SOCKET_ACTIVATE));
        cmd.args(args)
            .arg("--")
            .arg(lowport_bin())
            .args(lowport_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn systemd-socket-activate");
        let out = Output::default();
        out.feed(child.stdout.take().unwrap());
        out.feed(child.stderr.take().unwrap());
        let activated = Activated { child, out };
        activated.out.wait_for(&format!("Listening on {last}"));
        activated
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for lowport to exit on its own; its exit code.
    fn wait(&mut self) -> i32 {
        let status = wait_with_deadline(&mut self.child, PATIENCE)
            .unwrap_or_else(|| panic!("lowport did not exit; output:\n{}", self.out.text()));
        exit_code(status)
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM reaches the command through lowport, which then exits and reaps it.
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_with_deadline(&mut self.child, PATIENCE).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The TCP listeners on `port` of the tests' (the host's) network namespace.
fn listeners(port: u16) -> Vec<TcpEntry> {
    tcp_sockets(std::process::id())
        .into_iter()
        .filter(|s| s.local_port == port && s.state == TCP_LISTEN)
        .collect()
}

/// The descendant of `pid` that runs `program` (lowport's own processes have it among their
/// arguments).
fn descendant_running(pid: u32, program: &str) -> u32 {
    eventually(&format!("a process running {program}"), || {
        descendants(pid).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(program.as_bytes()))
        })
    })
}

fn get(port: u16) -> (u16, String) {
    let (status, body) = http(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/", b"")
        .unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `-p PORT:80` takes the socket on PORT: the request that started lowport is served, and the only
/// listener on PORT is that socket, which the server holds (handoff) or lowport relays from.
fn serves_through_the_inherited_socket(forward: &str) {
    if !prerequisites() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let publish = format!("{port}:80");
    let mut activated = Activated::start(
        &["-l", &listen],
        &listen,
        &[
            "run",
            "--forward",
            forward,
            "-p",
            &publish,
            "--",
            PYTHON,
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
            "80",
        ],
    );
    let (status, body) = get(port);
    assert_eq!(status, 200, "{body}\n{}", activated.out.text());
    assert!(body.contains("Directory listing"), "{body}");

    // lowport bound no socket of its own: not 0.0.0.0:PORT, not [::]:PORT.
    let found = listeners(port);
    assert_eq!(found.len(), 1, "{found:?}\n{}", activated.out.text());
    let inode = found[0].inode;
    let server = descendant_running(activated.pid(), PYTHON);
    let server_holds = held_sockets(server).contains(&inode);
    let lowport_holds = held_sockets(activated.pid()).contains(&inode);
    match forward {
        "handoff" => assert!(
            server_holds && !lowport_holds,
            "the server should hold the inherited socket itself\n{}",
            activated.out.text()
        ),
        _ => assert!(
            lowport_holds && !server_holds,
            "lowport should relay from the inherited socket\n{}",
            activated.out.text()
        ),
    }
    // And again, now that everything runs.
    assert_eq!(get(port).0, 200);
    assert!(
        activated.child.try_wait().unwrap().is_none(),
        "{}",
        activated.out.text()
    );
}

#[test]
fn the_inherited_socket_is_handed_to_the_server() {
    serves_through_the_inherited_socket("handoff");
}

#[test]
fn the_inherited_socket_is_relayed() {
    serves_through_the_inherited_socket("relay");
}

/// `--fdname=web` and `-p web:80`: the socket is taken by its name.
#[test]
fn publish_takes_a_socket_by_its_name() {
    if !prerequisites() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let activated = Activated::start(
        &["-l", &listen, "--fdname=web"],
        &listen,
        &[
            "run",
            "-p",
            "web:80",
            "--",
            PYTHON,
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
            "80",
        ],
    );
    let (status, body) = get(port);
    assert_eq!(status, 200, "{body}\n{}", activated.out.text());
    assert_eq!(listeners(port).len(), 1, "{}", activated.out.text());
}

/// Serves HTTP on port 80 and on the socket it was given as fd 3, answering on each with what its
/// LISTEN_ variables say.
const PASSED_ON_SERVER: &str = r#"
import os, socket, threading
from http.server import HTTPServer, BaseHTTPRequestHandler
pid_ok = os.environ.get("LISTEN_PID") == str(os.getpid())
facts = "pid_ok=%s fds=%s names=%s" % (pid_ok, os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_FDNAMES"))
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s\n" % (self.server.label, facts)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
given = HTTPServer(("0.0.0.0", 0), Handler, bind_and_activate=False)
given.socket.close()
given.socket = socket.socket(fileno=3)
given.label = "fd3"
own = HTTPServer(("0.0.0.0", 80), Handler)
own.label = "port80"
threading.Thread(target=given.serve_forever, daemon=True).start()
own.serve_forever()
"#;

/// Two sockets: `-p` takes one; the other goes on to the command as fd 3 with its name, and
/// LISTEN_PID is the command's own pid.
#[test]
fn a_socket_no_publish_takes_is_passed_on_to_the_command() {
    if !prerequisites() {
        return;
    }
    let (taken, passed) = (free_port(), free_port());
    let first = format!("127.0.0.1:{taken}");
    let second = format!("127.0.0.1:{passed}");
    let publish = format!("{taken}:80");
    let activated = Activated::start(
        &["-l", &first, "-l", &second, "--fdname=web:extra"],
        &second,
        &["run", "-p", &publish, "--", PYTHON, "-c", PASSED_ON_SERVER],
    );
    let (status, body) = get(taken);
    assert_eq!(status, 200, "{body}\n{}", activated.out.text());
    assert_eq!(body.trim(), "port80 pid_ok=True fds=1 names=extra");
    let (status, body) = get(passed);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "fd3 pid_ok=True fds=1 names=extra");
    assert_eq!(listeners(taken).len(), 1);
    assert_eq!(listeners(passed).len(), 1);
}

/// Accepts one connection on fd 3 and says what it is.
const UNIX_SERVER: &str = r#"
import os, socket
s = socket.socket(fileno=3)
c, _ = s.accept()
pid_ok = os.environ.get("LISTEN_PID") == str(os.getpid())
c.sendall(("family=%s pid_ok=%s fds=%s names=%s\n" % (s.family.name, pid_ok, os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_FDNAMES"))).encode())
c.close()
"#;

/// A UNIX socket (a socket unit whose server runs inside, as with rootlesskit) goes on to the
/// command, which accepts on it.
#[test]
fn a_unix_socket_is_passed_on_to_a_server_inside() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("activation-unix", Some((NOBODY, NOBODY)));
    let path = dir.path().join("sock");
    let path_text = path.display().to_string();
    let mut activated = Activated::start(
        &["-l", &path_text],
        &path_text,
        &["run", "--", PYTHON, "-c", UNIX_SERVER],
    );
    let mut stream = UnixStream::connect(&path).expect("connect to the UNIX socket");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(
        answer.trim(),
        "family=AF_UNIX pid_ok=True fds=1 names=unknown",
        "{}",
        activated.out.text()
    );
    assert_eq!(activated.wait(), 0, "{}", activated.out.text());
}

/// Variables whose LISTEN_PID is another process's are not lowport's: it uses none of them, and the
/// command never sees them.
#[test]
fn activation_variables_for_another_process_are_dropped() {
    if !prerequisites() {
        return;
    }
    let foreign = [
        ("LISTEN_PID", "1"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_FDNAMES", "web"),
    ];
    let (code, out, err) = run_to_end(lowport().envs(foreign).args(["run", "--", "/usr/bin/env"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PATH="), "{out}");
    assert!(!out.contains("LISTEN_"), "{out}");

    let (code, _, err) =
        run_to_end(
            lowport()
                .envs(foreign)
                .args(["run", "-p", "web:80", "--", "/bin/true"]),
        );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lowport was given no sockets"), "{err}");
}

/// `-p NAME:PORT` with a name lowport was not given: exit 2, naming the names it was given.
#[test]
fn an_unknown_name_is_refused_with_the_names_given() {
    if !prerequisites() {
        return;
    }
    let (first, second) = (free_port(), free_port());
    let a = format!("127.0.0.1:{first}");
    let b = format!("127.0.0.1:{second}");
    let mut activated = Activated::start(
        &["-l", &a, "-l", &b, "--fdname=web:admin"],
        &b,
        &["run", "-p", "www:80", "--", "/bin/true"],
    );
    // The connection starts lowport, which refuses before it starts anything.
    let mut client = TcpStream::connect(&a).unwrap();
    let _ = client.write_all(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(activated.wait(), 2, "{}", activated.out.text());
    let text = activated.out.text();
    assert!(
        text.contains("lowport: -p www:80/tcp: lowport was given no socket named 'www'; the names it was given are web, admin"),
        "{text}"
    );
}

/// The example units of docs/usage.md parse: `systemd-analyze verify` (offline) on copies whose
/// ExecStart names programs that exist here.
#[test]
fn the_example_units_verify() {
    let Some(analyze) = tool(&["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]) else {
        require(false, "systemd-analyze (Debian package systemd)");
        return;
    };
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let dir = TempDir::new("activation-units", None);
    let mut names = Vec::new();
    for name in ["lowport-web.socket", "lowport-web.service"] {
        let text = std::fs::read_to_string(contrib.join(name)).unwrap();
        // The units name /usr/local/bin/lowport and /usr/sbin/nginx, which verify looks for.
        let text = text
            .replace(
                "/usr/local/bin/lowport",
                &lowport_bin().display().to_string(),
            )
            .replace("/usr/sbin/nginx", "/bin/true");
        dir.write(name, &text);
        names.push(dir.path().join(name).display().to_string());
    }
    let (code, out, err) = run_to_end(
        Command::new(analyze)
            .arg("verify")
            .arg("--man=no")
            .args(&names)
            .env("SYSTEMD_LOG_COLOR", "0"),
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    // verify warns without failing on some mistakes; the units have none.
    let complaints: Vec<&str> = err
        .lines()
        .chain(out.lines())
        .filter(|l| l.contains("lowport-web"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

/// `-p IP:PORT:80` at another address than the socket systemd gave on PORT: lowport cannot bind the
/// port beside it (it holds the port itself), and says how to serve the given socket instead of
/// sending the user to find "the program that holds it".
#[test]
fn a_publish_beside_the_given_socket_says_how_to_serve_it() {
    if !prerequisites() {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let publish = format!("0.0.0.0:{port}:80");
    let mut activated = Activated::start(
        &["-l", &listen, "--fdname=web"],
        &listen,
        &["run", "-p", &publish, "--", "/bin/true"],
    );
    let mut client = TcpStream::connect(&listen).unwrap();
    let _ = client.write_all(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(activated.wait(), 2, "{}", activated.out.text());
    let text = activated.out.text();
    assert!(
        text.contains(&format!(
            "lowport: -p 0.0.0.0:{port}:80/tcp does not serve the socket systemd gave lowport on port {port} (127.0.0.1:{port} named 'web')"
        )) && text.contains(&format!(
            "write -p {port}:80 (any address), -p 127.0.0.1:{port}:80 or -p web:80"
        )),
        "{text}"
    );
}

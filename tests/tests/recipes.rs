//! The recipes of docs/recipes.md, run as written: each test runs a script of scripts/recipes/ (the
//! text the doc shows) as uid 65534, with a PATH that holds the test's copy of lowport, Debian's nginx
//! and python3, and checks the effect the recipe promises.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use lowport_tests::*;

const SCRIPTS: [&str; 2] = ["ci.sh", "dev-env.sh"];

/// A file of the repository, as it is in the source tree.
fn source(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// What docs/recipes.md tells users to run is what these tests run: it shows each script whole.
#[test]
fn recipes_md_shows_each_script_as_it_is() {
    let doc = source("docs/recipes.md");
    for script in SCRIPTS {
        let text = source(&format!("scripts/recipes/{script}"));
        assert!(
            doc.contains(&format!("```sh\n{text}```\n")),
            "docs/recipes.md does not show scripts/recipes/{script} as it is"
        );
    }
    let unit = source("contrib/systemd/user/lowport-web.service");
    assert!(
        doc.contains(&format!("```ini\n{unit}```\n")),
        "docs/recipes.md does not show contrib/systemd/user/lowport-web.service as it is"
    );
}

/// A directory of the user's (uid 65534 when the tests are root): the recipe scripts, an
/// XDG_RUNTIME_DIR, logs, and what each recipe needs. Removed when the test ends.
struct Workspace(TempDir);

impl Workspace {
    fn new(tag: &str) -> Workspace {
        let ws = Workspace(TempDir::new(tag, Some((NOBODY, NOBODY))));
        let runtime = ws.mkdir("runtime");
        fs::set_permissions(runtime, fs::Permissions::from_mode(0o700)).unwrap();
        for script in SCRIPTS {
            ws.0.write(script, &source(&format!("scripts/recipes/{script}")));
        }
        ws
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// A directory of the user's in the workspace.
    fn mkdir(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        self.give(&dir);
        dir
    }

    /// Makes `path` the user's, as it would be in their home.
    fn give(&self, path: &Path) {
        if is_root() {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(NOBODY)),
                Some(nix::unistd::Gid::from_raw(NOBODY)),
            )
            .unwrap();
        }
    }

    /// A log file of the user's, for a process's stdout and stderr, opened for appending. A file and
    /// not a pipe: nginx's `access_log /dev/stdout` reopens its stdout, which uid 65534 cannot do
    /// with a pipe the test (root) made, and could with a terminal of its own.
    fn log(&self, name: &str) -> (Stdio, Stdio) {
        let path = self.path(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        self.give(&path);
        (file.try_clone().unwrap().into(), file.into())
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// `program ARGS` as the user, with the environment a user's shell would give it: PATH with the
    /// test's copy of lowport, Debian's nginx (/usr/sbin) and python3, XDG_RUNTIME_DIR, and `vars`.
    /// Output goes to the log `log`.
    fn command(
        &self,
        program: &Path,
        args: &[&str],
        vars: &[(&str, String)],
        log: &str,
    ) -> Command {
        let mut cmd = unprivileged_as(NOBODY, NOBODY, program);
        let (out, err) = self.log(log);
        cmd.args(args)
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir().display()),
            )
            .env("XDG_RUNTIME_DIR", self.path("runtime"))
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .current_dir(self.0.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        cmd
    }

    /// `sh scripts/recipes/SCRIPT ARGS` as the user.
    fn script(&self, script: &str, args: &[&str], vars: &[(&str, String)], log: &str) -> Command {
        let path = self.path(script);
        let args: Vec<&str> = [path.to_str().unwrap()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.command(Path::new("/bin/sh"), &args, vars, log)
    }

    /// Runs `cmd` to its end: its exit code.
    fn run(&self, mut cmd: Command) -> i32 {
        let mut child = cmd.spawn().expect("spawn");
        let status = wait_with_deadline(&mut child, PATIENCE).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("{cmd:?} did not end");
        });
        exit_code(status)
    }

    /// `lowport ps` as the user lists no instance, so `lowport stop` has ended it, and the host port
    /// is free again.
    fn assert_stopped(&self, port: u16) {
        let mut ps = lowport();
        ps.env("XDG_RUNTIME_DIR", self.path("runtime")).arg("ps");
        let (code, out, err) = run_to_end(&mut ps);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().count(), 1, "an instance is left:\n{out}");
        TcpListener::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| panic!("host port {port} is still taken: {e}"));
    }
}

/// A process that is killed when the test ends, however it ends.
struct Background(Child);

impl Background {
    fn start(mut cmd: Command) -> Background {
        Background(cmd.spawn().expect("spawn"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that is free on every address now, for a recipe's `PORT` (the scripts take fixed ports,
/// as their users do).
fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(local(port), "GET", path, b"")
        .ok()
        .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// CI without sudo: scripts/recipes/ci.sh
// ---------------------------------------------------------------------------------------------

const SITE_TEXT: &str = "hello from nginx\n";

/// The site of docs/usage.md's nginx section: its nginx.conf (`listen 80;`), html/index.html, tmp/.
fn nginx_site(ws: &Workspace) -> PathBuf {
    let site = ws.mkdir("site");
    ws.mkdir("site/tmp");
    ws.mkdir("site/html");
    fs::write(site.join("html/index.html"), SITE_TEXT).unwrap();
    fs::write(
        site.join("nginx.conf"),
        "user root;\ndaemon off;\npid tmp/nginx.pid;\nerror_log stderr notice;\nworker_processes 2;\n\
         events {}\nhttp {\n    access_log /dev/stdout;\n    client_body_temp_path tmp/body;\n\
         proxy_temp_path tmp/proxy;\n    fastcgi_temp_path tmp/fastcgi;\n    uwsgi_temp_path tmp/uwsgi;\n\
         scgi_temp_path tmp/scgi;\n    server {\n        listen 80;\n        listen [::]:80;\n\
         root html;\n    }\n}\n",
    )
    .unwrap();
    site
}

/// The recipe's promise: its "tests" run once nginx serves, so the first request, made at once and
/// never retried, gets 200 and the site; afterwards nothing is left running.
#[test]
fn ci_recipe_runs_the_tests_once_nginx_serves_then_stops_it() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let ws = Workspace::new("recipe-ci");
    let site = nginx_site(&ws);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let body = ws.path("body");
    let tests = [
        "curl",
        "-sS",
        "-o",
        body.to_str().unwrap(),
        "-w",
        "curl got %{http_code}\n",
        &url,
    ];
    let vars = [
        ("PORT", port.to_string()),
        ("SITE", site.display().to_string()),
    ];
    let code = ws.run(ws.script("ci.sh", &tests, &vars, "ci.log"));
    let log = ws.read("ci.log");
    assert_eq!(code, 0, "ci.sh failed:\n{log}");
    assert!(log.contains("curl got 200\n"), "{log}");
    assert_eq!(ws.read("body"), SITE_TEXT, "{log}");
    // nginx answered it: its access log (on the script's stdout) has the request.
    assert!(log.contains("\"GET / HTTP/1.1\" 200"), "{log}");
    ws.assert_stopped(port);
}

/// Failing tests fail the script with their status, and still stop nginx.
#[test]
fn ci_recipe_fails_with_the_tests_and_still_stops_nginx() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let ws = Workspace::new("recipe-ci-fail");
    let site = nginx_site(&ws);
    let port = free_port();
    let vars = [
        ("PORT", port.to_string()),
        ("SITE", site.display().to_string()),
    ];
    let code = ws.run(ws.script("ci.sh", &["sh", "-c", "exit 3"], &vars, "ci.log"));
    assert_eq!(code, 3, "{}", ws.read("ci.log"));
    ws.assert_stopped(port);
}

/// When nginx cannot start, `read` gets end-of-file: the tests do not run and the script fails.
#[test]
fn ci_recipe_runs_no_tests_when_nginx_cannot_start() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)") {
        return;
    }
    let ws = Workspace::new("recipe-ci-nostart");
    let empty = ws.mkdir("no-site");
    let ran = ws.path("tests-ran");
    let port = free_port();
    let vars = [
        ("PORT", port.to_string()),
        ("SITE", empty.display().to_string()),
    ];
    let code = ws.run(ws.script("ci.sh", &["touch", ran.to_str().unwrap()], &vars, "ci.log"));
    let log = ws.read("ci.log");
    assert_eq!(code, 1, "{log}");
    assert!(!ran.exists(), "the tests ran without a server:\n{log}");
    assert!(log.contains("nginx.conf\" failed"), "{log}");
    ws.assert_stopped(port);
}

// ---------------------------------------------------------------------------------------------
// A rootless dev environment: scripts/recipes/dev-env.sh
// ---------------------------------------------------------------------------------------------

const APP_TEXT: &str = "hello from the app on the host\n";

/// nginx under lowport, configured as in production (`listen 80`, `proxy_pass
/// http://127.0.0.1:APP_PORT`), serves the app that runs on the host's loopback; after an edit to
/// its configuration, `dev-env.sh reload` (`lowport exec web -- nginx -s reload`) makes it live;
/// `lowport stop web` ends it.
#[test]
fn dev_env_recipe_puts_nginx_in_front_of_the_app_on_the_hosts_loopback() {
    if !require(nginx_bin().is_some(), "nginx (package nginx-light)")
        || !require(Path::new("/usr/bin/python3").exists(), "python3")
    {
        return;
    }
    let ws = Workspace::new("recipe-dev");
    let app_dir = ws.mkdir("app");
    fs::write(app_dir.join("hello.txt"), APP_TEXT).unwrap();
    let app_port = free_port();
    // The app, as its developer runs it: on the host's 127.0.0.1 only, and not under lowport.
    let _app = Background::start(ws.command(
        Path::new("/usr/bin/python3"),
        &[
            "-m",
            "http.server",
            &app_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            app_dir.to_str().unwrap(),
        ],
        &[],
        "app.log",
    ));
    eventually("the app to answer on the host", || {
        get(app_port, "/hello.txt")
    });

    let port = free_port();
    // SITE does not exist yet: the script writes its first configuration.
    let site = ws.path("site");
    let vars = [
        ("APP_PORT", app_port.to_string()),
        ("PORT", port.to_string()),
        ("SITE", site.display().to_string()),
    ];
    let _nginx = Background::start(ws.script("dev-env.sh", &[], &vars, "dev.log"));
    let conf = eventually("dev-env.sh to write nginx.conf", || {
        fs::read_to_string(site.join("nginx.conf"))
            .ok()
            .filter(|c| c.ends_with("}\n"))
    });
    assert!(conf.contains("listen 80;"), "{conf}");
    assert!(
        conf.contains(&format!("proxy_pass http://127.0.0.1:{app_port};")),
        "{conf}"
    );

    // Through nginx to the app.
    let answer = eventually("nginx to answer", || get(port, "/hello.txt"));
    assert_eq!(answer, (200, APP_TEXT.to_owned()), "{}", ws.read("dev.log"));
    // The app served it to nginx (nginx proxies with HTTP/1.0), on the host's loopback.
    eventually("the app to log nginx's request", || {
        ws.read("app.log")
            .contains("\"GET /hello.txt HTTP/1.0\" 200")
            .then_some(())
    });

    // Edit the configuration: nginx serves it only after the reload.
    let edited = conf.replacen(
        "        location / {",
        "        location = /edited { return 200 \"edited\\n\"; }\n        location / {",
        1,
    );
    assert_ne!(edited, conf, "no `location / {{` in the configuration");
    fs::write(site.join("nginx.conf"), edited).unwrap();
    assert_eq!(
        get(port, "/edited").map(|(status, _)| status),
        Some(404),
        "the app (through the old configuration) should not know /edited"
    );
    let code = ws.run(ws.script("dev-env.sh", &["reload"], &vars, "reload.log"));
    assert_eq!(code, 0, "dev-env.sh reload:\n{}", ws.read("reload.log"));
    let answer = eventually("the reloaded configuration to serve /edited", || {
        get(port, "/edited").filter(|(status, _)| *status == 200)
    });
    assert_eq!(answer.1, "edited\n");
    assert!(
        ws.read("dev.log").contains("signal 1 (SIGHUP) received"),
        "{}",
        ws.read("dev.log")
    );

    let mut stop = lowport();
    stop.env("XDG_RUNTIME_DIR", ws.path("runtime"))
        .args(["stop", "web"]);
    let (code, _, err) = run_to_end(&mut stop);
    assert_eq!(code, 0, "lowport stop web: {err}");
    ws.assert_stopped(port);
}

// ---------------------------------------------------------------------------------------------
// Silverblue: the user unit contrib/systemd/user/lowport-web.service
// ---------------------------------------------------------------------------------------------

/// The unit's `KEY=` line, with `%h` as `home`.
fn unit_line(unit: &str, key: &str, home: &Path) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"));
    // The unit's lines have no quotes, so words are what systemd splits them into.
    line.replace("%h", home.to_str().unwrap())
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// No systemd runs here, so the unit is run the way systemd would run it: `systemd-analyze verify
/// --user` checks it (with lowport installed where `make install PREFIX=~/.local` puts it), then its
/// ExecStart runs with a NOTIFY_SOCKET that stands in for systemd's, which must hear READY=1 only
/// once nginx serves, its ExecReload reloads nginx, and SIGTERM (`systemctl --user stop`) gives
/// STOPPING=1. The one change to the unit's commands: a free host port for the 8080 it names.
#[test]
fn silverblue_user_unit_is_valid_and_notifies_systemd() {
    let analyze = tool(&["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]);
    if !require(analyze.is_some(), "systemd-analyze (package systemd)")
        || !require(nginx_bin().is_some(), "nginx (package nginx-light)")
    {
        return;
    }
    let ws = Workspace::new("recipe-unit");
    let home = ws.mkdir("home");
    for dir in [".local", ".local/bin"] {
        ws.mkdir(&format!("home/{dir}"));
    }
    let installed = home.join(".local/bin/lowport");
    fs::copy(lowport_bin(), &installed).unwrap();
    ws.give(&installed);
    // The site: nginx_site's configuration, in ~/site.
    let site = nginx_site(&ws);
    fs::rename(&site, home.join("site")).unwrap();
    let unit_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/user/lowport-web.service");
    let unit = source("contrib/systemd/user/lowport-web.service");

    let vars = [("HOME", home.display().to_string())];
    let mut verify = ws.command(
        Path::new(analyze.unwrap()),
        &["verify", "--user", "--man=no", unit_path.to_str().unwrap()],
        &vars,
        "verify.log",
    );
    verify.current_dir("/");
    assert_eq!(
        ws.run(verify),
        0,
        "systemd-analyze verify: {}",
        ws.read("verify.log")
    );

    let notify_path = ws.path("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).unwrap();
    systemd.set_read_timeout(Some(PATIENCE)).unwrap();
    let port = free_port();
    let start: Vec<String> = unit_line(&unit, "ExecStart", &home)
        .into_iter()
        .map(|w| {
            if w == "8080:80" {
                format!("{port}:80")
            } else {
                w
            }
        })
        .collect();
    assert!(start.contains(&format!("{port}:80")), "{start:?}");
    let args: Vec<&str> = start[1..].iter().map(String::as_str).collect();
    let mut vars = vars.to_vec();
    vars.push(("NOTIFY_SOCKET", notify_path.display().to_string()));
    let server = Background::start(ws.command(Path::new(&start[0]), &args, &vars, "unit.log"));

    let mut buf = [0u8; 4096];
    let n = systemd.recv(&mut buf).expect("READY=1 from lowport");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // setpriv execs lowport, so the child's pid is lowport's: the unit's main process.
    assert!(
        ready.contains(&format!("MAINPID={}\n", server.0.id())),
        "{ready}"
    );
    // Ready means serving: the first request, made at once, is answered.
    assert_eq!(
        get(port, "/"),
        Some((200, SITE_TEXT.to_owned())),
        "{}",
        ws.read("unit.log")
    );

    let reload: Vec<String> = unit_line(&unit, "ExecReload", &home);
    let args: Vec<&str> = reload[1..].iter().map(String::as_str).collect();
    let code = ws.run(ws.command(Path::new(&reload[0]), &args, &vars, "reload.log"));
    assert_eq!(code, 0, "ExecReload: {}", ws.read("reload.log"));
    eventually("nginx to log the reload", || {
        ws.read("unit.log").contains("reconfiguring").then_some(())
    });

    // systemctl stop: SIGTERM to the main process, lowport (setpriv execs it, so it is this pid).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = systemd.recv(&mut buf).expect("STOPPING=1 from lowport");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    drop(server);
}

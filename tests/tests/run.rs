//! `lowport run` end to end: what the server sees inside, what lowport is on the host, and the relay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

use lowport_tests::*;

fn demo(extra: &[&str]) -> Launch {
    start_demo("127.0.0.1:0:80", extra)
}

#[test]
fn whoami_inside_is_root_mapped_to_the_caller() {
    let launch = demo(&[]);
    let who = get_json(launch.addr(), "/whoami");
    assert_eq!(who["uid"], 0, "{who}");
    assert_eq!(who["gid"], 0, "{who}");
    let uid_map: Vec<u64> = who["uid_map"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        uid_map,
        vec![0, u64::from(caller_uid()), 1],
        "uid_map: {who}"
    );
    assert_eq!(who["ip_unprivileged_port_start"], 0, "{who}");
    assert!(
        who["effective_caps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "cap_net_bind_service"),
        "root inside holds the namespace's capabilities: {who}"
    );
    // With handoff (the default) demo-server accepts on the host socket itself, so its socket's
    // address is the host's; relayed, it is the port inside.
    assert_eq!(who["local_addr"], launch.addr().to_string(), "{who}");
    let relayed = demo(&["--forward", "relay"]);
    let who = get_json(relayed.addr(), "/whoami");
    assert_eq!(who["local_addr"], "127.0.0.1:80", "{who}");
}

#[test]
fn lowport_on_the_host_is_the_caller_without_capabilities() {
    let launch = demo(&[]);
    let pid = launch.child.id();
    // When root runs the tests, the process is setpriv, which execs lowport under the same pid.
    let uid = caller_uid().to_string();
    let uids = proc_status_field(pid, "Uid").unwrap();
    assert_eq!(
        uids.split_whitespace().collect::<Vec<_>>(),
        vec![uid.as_str(); 4],
        "real, effective, saved, fs uid"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            proc_status_field(pid, set).unwrap(),
            "0000000000000000",
            "{set} of lowport"
        );
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, lowport_bin(), "the process checked is lowport itself");
    // The pid-1 helper that forwards signals keeps only CAP_KILL (bit 5), valid in the namespace it
    // serves, so signals reach a command that switched uid; only the command is root inside.
    // lowport's children: the pid-1 helper (pid 1 of its own pid namespace) and the host socket
    // factory of the handoff, which holds no capability.
    let children: Vec<u32> = descendants(pid)
        .into_iter()
        .filter(|c| proc_status_field(*c, "PPid").is_some_and(|p| p.trim() == pid.to_string()))
        .collect();
    let helper = *children
        .iter()
        .find(|c| {
            proc_status_field(**c, "NSpid")
                .is_some_and(|n| n.split_whitespace().last() == Some("1"))
        })
        .expect("the pid-1 helper");
    for factory in children.iter().filter(|c| **c != helper) {
        for set in ["CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                proc_status_field(*factory, set).unwrap(),
                "0000000000000000",
                "{set} of the host socket factory"
            );
        }
    }
    // Of lowport's threads, only the handoff thread and its memory reader keep capabilities, in
    // lowport's own user namespace: CAP_SYS_PTRACE (bit 19), to read the server's binds and connects
    // and copy its sockets, and CAP_DAC_READ_SEARCH (bit 2), to read /proc/PID/fd of a server
    // process that runs as another uid inside.
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let want = if ["lowport-handoff", "lowport-reader"].contains(&field("Name:").as_str()) {
            "0000000000080004"
        } else {
            "0000000000000000"
        };
        assert_eq!(
            field("CapPrm:"),
            want,
            "CapPrm of thread {}",
            field("Name:")
        );
        assert_eq!(
            field("CapEff:"),
            want,
            "CapEff of thread {}",
            field("Name:")
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{helper}/exe")).unwrap(),
        lowport_bin()
    );
    for (set, want) in [
        ("CapPrm", "0000000000000020"),
        ("CapEff", "0000000000000020"),
        ("CapBnd", "0000000000000000"),
        ("CapInh", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        assert_eq!(
            proc_status_field(helper, set).unwrap(),
            want,
            "{set} of the helper"
        );
    }
}

#[test]
fn port_start_option_is_applied_inside() {
    let launch = demo(&["--port-start", "443"]);
    let who = get_json(launch.addr(), "/whoami");
    assert_eq!(who["ip_unprivileged_port_start"], 443, "{who}");
}

#[test]
fn ready_report_lists_pid_and_every_bound_socket() {
    let mut cmd = lowport();
    // A server on each published port (readiness waits for both); the one on 443 is the command.
    let demo = demo_server_bin().display().to_string();
    run_args(&mut cmd, &["-p", "0:80", "-p", "127.0.0.1:0:443"]).args([
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!("{demo} & exec {demo} -p 443"),
    ]);
    let launch = Launch::start(cmd);
    let ips: Vec<&str> = launch.ports.iter().map(|p| p.host_ip.as_str()).collect();
    assert!(
        ips.contains(&"0.0.0.0") && ips.contains(&"127.0.0.1"),
        "{}",
        launch.ready_line
    );
    assert!(
        launch
            .ports
            .iter()
            .all(|p| p.host_port != 0 && p.protocol == "tcp"),
        "{}",
        launch.ready_line
    );
    let both: Vec<_> = launch.ports.iter().filter(|p| p.port == 80).collect();
    assert!(
        both.iter().all(|p| p.host_port == both[0].host_port),
        "v4 and v6 share the port: {}",
        launch.ready_line
    );
    // The pid is the command's, as the host sees it.
    let exe = std::fs::read_link(format!("/proc/{}/exe", launch.pid)).unwrap();
    assert_eq!(exe, demo_server_bin(), "{}", launch.ready_line);
}

/// 64 MiB of pseudo-random bytes, so a dropped, duplicated or reordered chunk changes the result.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `body` to /echo, optionally shutting down the sending side afterwards, and returns the reply.
fn echo(launch: &Launch, body: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(launch.addr()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = s.try_clone().unwrap();
    let body_owned = body.to_vec();
    let sender = std::thread::spawn(move || {
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body_owned.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(&body_owned).unwrap();
        if half_close {
            writer.shutdown(Shutdown::Write).unwrap();
        }
    });
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    sender.join().unwrap();
    let (status, reply) = parse_response(&response).unwrap();
    assert_eq!(status, 200);
    reply
}

#[test]
fn a_64_mib_upload_is_echoed_back_intact() {
    let launch = demo(&[]);
    let body = payload(64 << 20);
    let reply = echo(&launch, &body, false);
    assert_eq!(reply.len(), body.len());
    assert!(reply == body, "the echoed bytes differ from those sent");
}

#[test]
fn half_closed_client_still_gets_the_whole_answer() {
    let launch = demo(&[]);
    let body = payload(4 << 20);
    let reply = echo(&launch, &body, true);
    assert!(
        reply == body,
        "after the client's FIN the reply was cut or changed ({} bytes)",
        reply.len()
    );
}

#[test]
fn two_hundred_concurrent_requests_all_succeed() {
    let launch = demo(&[]);
    let addr = launch.addr();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                barrier.wait();
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                write!(
                    s,
                    "GET /whoami?{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut response = Vec::new();
                s.read_to_end(&mut response).unwrap();
                parse_response(&response).unwrap()
            })
        })
        .collect();
    let mut ok = 0;
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let who: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(who["uid"], 0);
        ok += 1;
    }
    assert_eq!(ok, 200);
}

#[test]
fn ipv6_clients_reach_an_ipv4_only_server() {
    if !require(
        std::net::TcpListener::bind("[::1]:0").is_ok(),
        "IPv6 on loopback",
    ) {
        return;
    }
    let mut cmd = lowport();
    run_args(&mut cmd, &["-p", "0:80", "--forward", "relay"])
        .arg(demo_server_bin())
        .args(["--bind", "0.0.0.0"]);
    let launch = Launch::start(cmd);
    wait_healthy(launch.addr());
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, launch.host_port()));
    let who = get_json(v6, "/whoami");
    assert_eq!(who["local_addr"], "127.0.0.1:80", "{who}");
}

#[test]
fn stdio_passes_through() {
    // run_to_end gives the command an empty stdin: read finds end-of-file at once.
    let (code, out, err) = run_to_end(lowport().args([
        "run",
        "--",
        "sh",
        "-c",
        "read line; echo \"got $line\"; echo oops >&2",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "got \n");
    assert!(err.contains("oops"), "{err}");

    let mut child = lowport()
        .args(["run", "--", "sh", "-c", "read line; echo \"got $line\""])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got hello\n");
}

/// `lowport-docs` (what `make install` runs) writes the man pages and completions from the same
/// definitions as `--help`: `man -l` renders lowport-run(1) with the options, and the bash
/// completion loads and completes an option.
#[test]
fn man_pages_and_completions_come_from_the_command_line() {
    let docs = target_dir().join("lowport-docs");
    if !require(
        docs.is_file(),
        "lowport-docs (cargo build --workspace builds it)",
    ) {
        return;
    }
    let out = TempDir::new("docs-gen", None);
    let status = std::process::Command::new(&docs)
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let page = out.path().join("man1/lowport-run.1");
    let rendered = std::process::Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output();
    if let Some(rendered) = rendered.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&rendered.stdout);
        for option in [
            "--publish",
            "--host-loopback",
            "--forward",
            "--net",
            "--dns",
        ] {
            assert!(
                text.contains(option),
                "{option} missing from lowport-run(1):\n{text}"
            );
        }
    } else {
        require(false, "man (package man-db)");
    }
    assert!(out.path().join("man1/lowport.1").is_file());
    for sub in ["ps", "exec", "stop", "port-add", "port-rm"] {
        assert!(
            out.path().join(format!("man1/lowport-{sub}.1")).is_file(),
            "no page for lowport {sub}"
        );
    }
    assert!(out.path().join("completions/_lowport").is_file());
    assert!(out.path().join("completions/lowport.fish").is_file());
    let script = format!(
        "source {}; COMP_WORDS=(lowport run --host); COMP_CWORD=2; COMP_LINE='lowport run --host'; \
         COMP_POINT=${{#COMP_LINE}}; _lowport lowport --host run; echo \"${{COMPREPLY[@]}}\"",
        out.path().join("completions/lowport.bash").display()
    );
    let completed = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&completed.stdout).trim(),
        "--host-loopback",
        "{}",
        String::from_utf8_lossy(&completed.stderr)
    );
}

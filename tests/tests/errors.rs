//! Every error a user can run into: a short message that names the problem and its fix, a non-zero
//! exit status (2 for bad usage), no hang and nothing left running.

use lowport_tests::*;

fn fails(args: &[&str]) -> (i32, String) {
    let (code, _, err) = run_to_end(lowport().args(args));
    assert!(!err.contains("panicked"), "{err}");
    (code, err)
}

#[test]
fn malformed_publish_names_the_bad_token_and_exits_2() {
    for (spec, token) in [
        ("8080", "'8080'"),
        ("8080:http", "'http'"),
        ("99999:80", "'99999'"),
        ("localhost:8080:80", "'localhost'"),
        ("8080:80/sctp", "'sctp'"),
        ("::1:8080:80", "brackets"),
    ] {
        let (code, err) = fails(&["run", "-p", spec, "--", "true"]);
        assert_eq!(code, 2, "-p {spec}: {err}");
        assert!(err.contains(token), "-p {spec}: {err}");
    }
}

#[test]
fn a_missing_command_exits_127() {
    let (code, err) = fails(&["run", "--", "no-such-command-lowport"]);
    assert_eq!(code, 127, "{err}");
    assert!(
        err.contains("no-such-command-lowport: command not found"),
        "{err}"
    );
    let (code, err) = fails(&["run", "--", "/etc/passwd"]);
    assert_eq!(code, 126, "{err}");
}

#[test]
fn no_command_is_bad_usage() {
    let (code, err) = fails(&["run", "-p", "8080:80"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_host_port_in_use_is_named_with_the_fixes() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = fails(&["run", "-p", &format!("127.0.0.1:{port}:80"), "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains(&format!(
            "host port {port}/tcp on 127.0.0.1 is already in use"
        )),
        "{err}"
    );
    assert!(err.contains("use 0"), "{err}");
}

#[test]
fn a_privileged_host_port_is_named_with_the_fixes() {
    let start = sysctl("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    if !require(
        start > 80,
        "a host whose net.ipv4.ip_unprivileged_port_start is above 80",
    ) {
        return;
    }
    let (code, err) = fails(&["run", "-p", "127.0.0.1:80:80", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("cannot bind host port 80"), "{err}");
    assert!(err.contains("setcap cap_net_bind_service=ep"), "{err}");
    assert!(err.contains("ip_unprivileged_port_start"), "{err}");
    assert!(err.contains("-p 8080:80"), "{err}");
}

#[test]
fn a_closed_ready_fd_is_bad_usage() {
    let (code, err) = fails(&["run", "--ready-fd", "57", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("descriptor 57 is not open"), "{err}");
}

#[test]
fn user_namespaces_switched_off_are_named_with_the_fix() {
    if !require(which("unshare"), "unshare (util-linux)") {
        return;
    }
    // user.max_user_namespaces is per user namespace: set it to 0 in a namespace of our own and run
    // lowport there, still as an unprivileged user of the host.
    let mut cmd = unprivileged_as(NOBODY, NOBODY, "unshare".as_ref());
    if !is_root() {
        cmd = std::process::Command::new("unshare");
    }
    cmd.args([
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" run -- true",
    ])
    .arg(lowport_bin());
    let (code, _, err) = run_to_end(&mut cmd);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("user.max_user_namespaces is 0"), "{err}");
    assert!(err.contains("sysctl -w user.max_user_namespaces="), "{err}");
}

#[test]
fn subids_without_ranges_is_named_with_the_fix() {
    if !require(
        which("newuidmap") && which("newgidmap"),
        "newuidmap and newgidmap (package uidmap)",
    ) {
        return;
    }
    let (code, err) = fails(&["run", "--userns", "subids", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("no subordinate uid range"), "{err}");
    assert!(err.contains("usermod --add-subuids"), "{err}");
}

#[test]
fn subids_without_newuidmap_is_named_with_the_fix() {
    let Some((uid, gid)) = user_ids(SUBID_USER) else {
        require(
            false,
            &format!("the test user {SUBID_USER} (make test creates it as root)"),
        );
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    cmd.env("PATH", "/nonexistent")
        .args(["run", "--userns", "subids", "--", "/bin/true"]);
    let (code, _, err) = run_to_end(&mut cmd);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("newuidmap was not found"), "{err}");
    assert!(err.contains("apt install uidmap"), "{err}");
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[test]
fn stdio_as_ready_fd_is_bad_usage() {
    let (code, err) = fails(&["run", "--ready-fd", "1", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use 3 or above"), "{err}");
}

#[test]
fn a_bad_log_level_is_bad_usage() {
    let (code, err) = fails(&["--log-level", "debug[", "run", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a level or filter"), "{err}");
}

#[test]
fn a_script_with_a_missing_interpreter_exits_126() {
    let script = bin_dir().join("bad-interpreter.sh");
    std::fs::write(&script, "#!/nonexistent/sh\necho hi\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, err) = fails(&["run", "--", script.to_str().unwrap()]);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("interpreter on its #! line"), "{err}");
}

#[test]
fn a_mistyped_log_level_is_bad_usage() {
    // tracing's filter syntax would take a bare word as a target and silence every log line.
    let (code, err) = fails(&["--log-level", "verbose", "run", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'verbose' is not a level"), "{err}");
}

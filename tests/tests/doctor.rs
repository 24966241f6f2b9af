//! `lowport doctor`: one line per check, ok, warn, fix or skip, and exit status 0 exactly when
//! `lowport run` can work. The machine's own state is what most tests check against (user
//! namespaces allowed, /dev/net/tun as it is); a machine where user namespaces are switched off is
//! simulated inside a user namespace whose own `user.max_user_namespaces` is 0.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lowport_tests::*;

/// Runs `cmd doctor ARGS...` to its end: the exit status and stdout.
fn doctor(cmd: &mut std::process::Command, args: &[&str]) -> (i32, String) {
    let (code, out, err) = run_to_end(cmd.arg("doctor").args(args));
    assert!(err.is_empty(), "lowport doctor wrote to stderr: {err}");
    (code, out)
}

/// The line of `check`, which must be there once.
fn line<'a>(out: &'a str, check: &str) -> &'a str {
    let found: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.get(6..)
                .is_some_and(|rest| rest.starts_with(&format!("{check}: ")))
        })
        .collect();
    assert_eq!(found.len(), 1, "one line for {check}:\n{out}");
    found[0]
}

#[test]
fn user_namespaces_are_ok_here_and_doctor_exits_0() {
    let (code, out) = doctor(&mut lowport(), &[]);
    assert_eq!(code, 0, "{out}");
    for check in ["user namespaces", "network namespace", "port start inside"] {
        assert!(line(&out, check).starts_with("ok    "), "{out}");
    }
    assert!(
        line(&out, "user namespaces").contains(&format!("created one as uid {}", caller_uid())),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("lowport run can work here"),
        "{out}"
    );
    // The checks are in the order a launch needs them.
    let order: Vec<&str> = out
        .lines()
        .filter_map(|l| l.get(6..)?.split_once(": ").map(|(check, _)| check))
        .collect();
    assert_eq!(
        order,
        [
            "user namespaces",
            "network namespace",
            "subordinate ids",
            "port start inside",
            "handoff",
            "pasta",
            "tun device",
            "host ports below 1024"
        ],
        "{out}"
    );
}

#[test]
fn switched_off_user_namespaces_are_named_with_the_fix() {
    let Some(unshare) = tool(&["/usr/bin/unshare", "/bin/unshare"]) else {
        require(false, "unshare (package util-linux)");
        return;
    };
    // As uid 65534: a user namespace of its own, whose limit for the namespaces inside it is 0. The
    // host's limit stays as it is.
    let mut cmd = unprivileged_as(NOBODY, NOBODY, Path::new(unshare));
    cmd.args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" \"$@\"")
        .arg(lowport_bin());
    let (code, out) = doctor(&mut cmd, &[]);
    assert_eq!(code, 1, "{out}");
    let user = line(&out, "user namespaces");
    assert!(
        user.starts_with(
            "fix   user namespaces: cannot create a user namespace: user.max_user_namespaces is 0"
        ),
        "{out}"
    );
    assert!(
        user.contains("sysctl -w user.max_user_namespaces=15000")
            && user.contains("echo user.max_user_namespaces=15000 | sudo tee /etc/sysctl.d/"),
        "{out}"
    );
    assert!(
        line(&out, "network namespace").starts_with("skip  "),
        "{out}"
    );
    assert!(
        line(&out, "port start inside").starts_with("skip  "),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("lowport run cannot work here"),
        "{out}"
    );
}

#[test]
fn subordinate_ids_are_mapped_for_a_user_with_ranges_and_warned_without() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let (code, out) = doctor(&mut unprivileged_as(uid, gid, &lowport_bin()), &[]);
    assert_eq!(code, 0, "{out}");
    let subids = line(&out, "subordinate ids");
    assert!(subids.starts_with("ok    subordinate ids: uids "), "{out}");
    assert!(
        subids.contains("mapped by ") && subids.contains("newgidmap"),
        "{out}"
    );

    // uid 65534 has no ranges: a warning with its cost and fix, and doctor still exits 0.
    let (code, out) = doctor(&mut lowport(), &[]);
    assert_eq!(code, 0, "{out}");
    let subids = line(&out, "subordinate ids");
    assert!(
        subids.starts_with("warn  subordinate ids: without subordinate ids only uid 0 exists inside, so a server that switches to another uid (nginx's workers, postgres) fails there: "),
        "{out}"
    );
    assert!(
        subids.contains("has no subordinate uid range in /etc/subuid")
            && subids.contains("usermod --add-subuids"),
        "{out}"
    );
}

#[test]
fn pasta_missing_from_path_is_a_warning() {
    let empty = TempDir::new("doctor-path", None);
    let (code, out) = doctor(lowport().env("PATH", empty.path()), &[]);
    assert_eq!(code, 0, "{out}");
    let pasta = line(&out, "pasta");
    assert!(
        pasta.starts_with("warn  pasta: without it --net pasta fails")
            && pasta.contains("apt install passt"),
        "{out}"
    );
}

#[test]
fn the_tun_device_is_checked_as_the_user_opens_it() {
    // The machine's own device, unchanged: 0600 root here, which pasta cannot open as another user.
    let Ok(meta) = std::fs::metadata("/dev/net/tun") else {
        require(false, "/dev/net/tun");
        return;
    };
    let open_to_all = meta.permissions().mode() & 0o006 == 0o006;
    let (_, out) = doctor(&mut lowport(), &[]);
    let tun = line(&out, "tun device");
    if open_to_all {
        assert!(
            tun.starts_with("ok    tun device: /dev/net/tun can be opened"),
            "{out}"
        );
        return;
    }
    // As another user than root, the caller might own the device.
    if !require(is_root(), "root, to check the device as uid 65534") {
        return;
    }
    assert!(
        tun.starts_with("warn  tun device: without it --net pasta fails")
            && tun.contains("Permission denied")
            && tun.contains("sudo chmod 0666 /dev/net/tun"),
        "{out}"
    );
}

#[test]
fn handoff_is_ok_here_and_a_warning_inside_another_lowport() {
    let (_, out) = doctor(&mut lowport(), &[]);
    assert!(
        line(&out, "handoff").starts_with("ok    handoff: "),
        "{out}"
    );
    // With a published port, the command runs under lowport's seccomp listener, and a process may
    // have one: the doctor inside says so.
    let mut cmd = lowport();
    cmd.args(["run", "-p", "127.0.0.1:0:80", "--"])
        .arg(lowport_bin());
    let (code, out) = doctor(&mut cmd, &[]);
    assert_eq!(code, 0, "{out}");
    let handoff = line(&out, "handoff");
    assert!(
        handoff.starts_with("warn  handoff: without handoff lowport relays every published port")
            && handoff.contains("already runs under a seccomp filter with a listener"),
        "{out}"
    );
    // uid 0 there is not the machine's root.
    assert!(!out.contains("lowport doctor runs as root"), "{out}");
}

#[test]
fn host_ports_below_1024_need_setcap_or_the_sysctl() {
    let Some(start) = sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start") else {
        require(false, "net.ipv4.ip_unprivileged_port_start");
        return;
    };
    let (_, out) = doctor(&mut lowport(), &[]);
    let ports = line(&out, "host ports below 1024");
    if start <= 80 {
        assert!(ports.starts_with("ok    "), "{out}");
        return;
    }
    assert!(
        ports.starts_with("warn  host ports below 1024: ")
            && ports.contains(&format!(
                "sudo setcap cap_net_bind_service=ep {}",
                lowport_bin().display()
            )),
        "{out}"
    );
    let Some((_dir, capable)) = setcap_copy("doctor-setcap") else {
        return;
    };
    let (_, out) = doctor(&mut unprivileged_as(NOBODY, NOBODY, &capable), &[]);
    assert!(
        line(&out, "host ports below 1024").starts_with(&format!(
            "ok    host ports below 1024: lowport may bind them, with cap_net_bind_service ({} has it",
            capable.display()
        )),
        "{out}"
    );
}

#[test]
fn json_has_every_check_and_the_verdict() {
    let (code, out) = doctor(&mut lowport(), &["--json"]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["ok"], true, "{report}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks[0]["check"], "user namespaces", "{report}");
    assert_eq!(checks[0]["status"], "ok", "{report}");
    assert_eq!(checks[0]["essential"], true, "{report}");
    assert_eq!(checks.len(), 8, "{report}");
}

#[test]
fn the_apparmor_profile_grants_userns_to_this_binary() {
    let (code, out, err) = run_to_end(lowport().args(["doctor", "--apparmor-profile"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("# AppArmor profile for lowport"), "{out}");
    assert!(out.contains("abi <abi/4.0>,\n"), "{out}");
    assert!(
        out.contains("profile lowport @{lowport_bin} flags=(unconfined) {\n  userns,\n"),
        "{out}"
    );
    // The test's copy lives in a temporary directory, which the shipped paths do not cover.
    let paths = out
        .lines()
        .find(|l| l.starts_with("@{lowport_bin} = "))
        .unwrap();
    assert!(
        paths.ends_with(&format!(" {}", lowport_bin().display())),
        "{out}"
    );
}

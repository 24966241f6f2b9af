//! `--userns subids`: the caller's subordinate ranges are mapped from 1 upward, so a server may switch
//! to another uid inside, as nginx's master does for its workers. Runs as the test user that
//! `make test` creates with ranges (tests/setup-test-user.sh).

use lowport_tests::*;

fn subid_start(file: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{SUBID_USER}:")))
        .expect("a range for the test user");
    line.split(':').nth(1).unwrap().parse().unwrap()
}

#[test]
fn subids_maps_the_ranges_and_a_server_can_switch_uid() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    // The server drops to uid/gid 33 inside, and still binds port 80 thanks to the port start of 0.
    run_args(&mut cmd, &["--userns", "subids", "-p", "127.0.0.1:0:80"])
        .args(["setpriv", "--reuid=33", "--regid=33", "--clear-groups"])
        .arg(demo_server_bin());
    let launch = Launch::start(cmd);
    wait_healthy(launch.addr());
    let who = get_json(launch.addr(), "/whoami");
    assert_eq!(who["uid"], 33, "{who}");
    assert_eq!(who["gid"], 33, "{who}");
    assert!(
        who["effective_caps"].as_array().unwrap().is_empty(),
        "uid 33 holds no capability: {who}"
    );
    let rows = |map: &str| -> Vec<Vec<u64>> {
        who[map]
            .as_str()
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
            .collect()
    };
    let uid_map = rows("uid_map");
    assert_eq!(uid_map[0], vec![0, u64::from(uid), 1], "{who}");
    assert_eq!(uid_map[1][0..2], [1, subid_start("/etc/subuid")], "{who}");
    let gid_map = rows("gid_map");
    assert_eq!(gid_map[0], vec![0, u64::from(gid), 1], "{who}");
    assert_eq!(gid_map[1][0..2], [1, subid_start("/etc/subgid")], "{who}");
}

#[test]
fn auto_picks_subids_when_the_user_has_ranges() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    cmd.args(["run", "--", "cat", "/proc/self/uid_map"]);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn single_maps_one_id_even_with_ranges() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    cmd.args([
        "run",
        "--userns",
        "single",
        "--",
        "cat",
        "/proc/self/uid_map",
    ]);
    let (code, out, err) = run_to_end(&mut cmd);
    assert_eq!(code, 0, "{err}");
    let row: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
    assert_eq!(row, vec!["0".to_owned(), uid.to_string(), "1".to_owned()]);
}

/// nginx as users run it: its master is root inside and switches its workers to www-data, which exists
/// inside only because the subordinate range is mapped.
#[test]
fn nginx_master_switches_its_workers_to_another_uid() {
    let Some((uid, gid)) = subid_user() else {
        return;
    };
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let www = nix::unistd::User::from_name("www-data").ok().flatten();
    if !require(
        nginx.is_some() && www.is_some(),
        "nginx (package nginx-light) and the www-data user",
    ) {
        return;
    }
    let www_uid = u64::from(www.unwrap().uid.as_raw());
    let dir = std::env::temp_dir().join(format!("lowport-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(
        dir.join("www/index.html"),
        "served by nginx under lowport\n",
    )
    .unwrap();
    let server = format!("listen 80; root {}/www;", dir.display());
    let conf = NginxConf {
        workers: 2,
        user: "www-data www-data",
        log_level: "warn",
        http: "access_log off;",
        server: &server,
    };
    std::fs::write(dir.join("nginx.conf"), conf.text(&dir)).unwrap();
    // The master (the test user, root inside) writes its pid and temporary files here.
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cmd = unprivileged_as(uid, gid, &lowport_bin());
    run_args(&mut cmd, &["--userns", "subids", "-p", "127.0.0.1:0:80"])
        .arg(nginx.unwrap())
        .args(["-e", "stderr", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    let launch = Launch::start(cmd);
    let (status, body) = eventually("nginx to answer", || {
        match http(launch.addr(), "GET", "/", b"") {
            Ok((200, body)) => Some((200, body)),
            _ => None,
        }
    });
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "served by nginx under lowport\n"
    );

    // On the host, the workers run as the subordinate uid that www-data maps to.
    let expected = subid_start("/etc/subuid") + www_uid - 1;
    let workers: Vec<u64> = descendants(launch.child.id())
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains("worker process")
        })
        .filter_map(|p| {
            proc_status_field(p, "Uid")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(workers, vec![expected; 2], "worker uids on the host");
    drop(launch);
    std::fs::remove_dir_all(&dir).unwrap();
}

//! A bounded relay: a connection limit, back-off when descriptors run out, and no stall of the whole
//! relay when one peer stops reading.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lowport_tests::*;

fn get(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    s
}

fn read_all(mut s: TcpStream) -> (u16, Vec<u8>) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    parse_response(&response).unwrap()
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let launch = start_demo(
        "127.0.0.1:0:80",
        &["--max-connections", "1", "--forward", "relay"],
    );
    // One idle connection takes the only slot: lowport takes the slot before it connects inside, so
    // once it holds both sockets of this connection (the accepted one and the one to the server,
    // which has the client's port as its source) the slot is taken.
    let idle = TcpStream::connect(launch.addr()).unwrap();
    let idle_port = idle.local_addr().unwrap().port();
    let host_port = launch.host_port();
    eventually("lowport to relay the idle connection", || {
        let relayed = relayed_sockets(&launch);
        let accepted = relayed
            .iter()
            .any(|s| s.local_port == host_port && s.remote_port == idle_port);
        let inner = relayed
            .iter()
            .any(|s| s.local_port == idle_port && s.remote_port == 80);
        (accepted && inner).then_some(())
    });
    let mut waiting = get(launch.addr());
    let waiting_port = waiting.local_addr().unwrap().port();
    // The negative, that the second client is not served while the slot is held, has no event to
    // wait for: it is watched for a bounded time. A slow machine cannot fail it, since the slot is
    // known to be taken (above); a relay that ignored the limit would answer within milliseconds.
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    let err = waiting
        .read(&mut byte)
        .expect_err("a second connection must wait while the first holds the slot");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert!(
        !relayed_sockets(&launch)
            .iter()
            .any(|s| s.local_port == waiting_port && s.remote_port == 80),
        "the second connection must not reach the server while the first holds the slot"
    );
    drop(idle);
    let (status, _) = read_all(waiting);
    assert_eq!(status, 200, "served once the slot is free");
}

#[test]
fn one_stalled_peer_does_not_stall_the_others() {
    let mut cmd = lowport();
    run_args(&mut cmd, &["-p", "127.0.0.1:0:80", "--forward", "relay"]).arg(demo_server_bin());
    let launch = Launch::start(cmd);
    wait_healthy(launch.addr());
    // This client uploads to /echo but never reads the echo: every buffer on its path fills up.
    let mut stalled = TcpStream::connect(launch.addr()).unwrap();
    stalled
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    stalled
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
        .unwrap();
    let chunk = vec![7u8; 1 << 16];
    let mut sent = 0usize;
    while stalled.write_all(&chunk).is_ok() {
        sent += chunk.len();
        assert!(
            sent < 1 << 30,
            "the stalled upload never filled the buffers"
        );
    }
    for _ in 0..20 {
        let (status, body) = read_all(get(launch.addr()));
        assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    }
    drop(stalled);
}

/// lowport sizes its limits to the open-file limit it starts with; if descriptors still run out (the
/// limit lowered under it with prlimit, or the system's file table full), accept backs off, nothing
/// exits or spins, and service resumes once descriptors come back.
#[test]
fn running_out_of_descriptors_backs_off_and_recovers() {
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if !require(prlimit.is_some(), "prlimit (util-linux)") {
        return;
    }
    let mut launch = start_demo("127.0.0.1:0:80", &["--forward", "relay"]);
    let lowport = launch.child.id();
    let set_limit = |limit: &str| {
        // As lowport's own user: lowering a limit of a process of the same user needs no privilege.
        let status = unprivileged_as(NOBODY, NOBODY, prlimit.unwrap().as_ref())
            .args(["--pid", &lowport.to_string(), &format!("--nofile={limit}")])
            .status()
            .expect("run prlimit");
        assert!(status.success(), "prlimit --nofile={limit}");
    };
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{lowport}/fd"))
            .unwrap()
            .count()
    };
    // A few descriptors above what lowport holds now: the next connections exhaust them.
    let limit = open_fds() + 6;
    set_limit(&format!("{limit}:{limit}"));
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(launch.addr()).unwrap())
        .collect();
    eventually("lowport to reach its lowered limit", || {
        (open_fds() + 1 >= limit).then_some(())
    });
    assert!(
        launch.child.try_wait().unwrap().is_none(),
        "lowport must survive running out of descriptors"
    );
    drop(idle);
    eventually(
        "a request to succeed after the descriptors came back",
        || {
            let mut s = TcpStream::connect(launch.addr()).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut response = Vec::new();
            s.read_to_end(&mut response).ok()?;
            matches!(parse_response(&response), Ok((200, _))).then_some(())
        },
    );
    launch.signal(nix::sys::signal::Signal::SIGTERM);
    launch.wait();
    let stderr = launch.stderr();
    assert!(
        stderr.contains("accept failed; backing off") || stderr.contains("cannot connect inside"),
        "the shortage is reported: {stderr}"
    );
}

#[test]
fn a_limit_of_one_serves_both_families_in_turn() {
    // Two listeners (0.0.0.0 and [::]) share the one slot; a listener waiting for clients must not
    // keep it from the other.
    let launch = start_demo("0:80", &["--max-connections", "1", "--forward", "relay"]);
    for _ in 0..5 {
        let (status, _) = read_all(get(launch.addr()));
        assert_eq!(status, 200);
    }
}

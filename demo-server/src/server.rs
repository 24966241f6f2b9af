//! Serving: one accept loop per TCP listener, one task per connection, one task per UDP socket,
//! and a graceful stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::http::{self, ConnInfo};
use crate::sys;
use crate::udp;
use crate::Sockets;

/// Open connections at most. Past this the accept loops wait and new clients queue in the listen
/// backlog, instead of the process running out of descriptors or memory.
pub const MAX_CONNECTIONS: u32 = 16_384;

/// How long in-flight connections get to finish after SIGTERM/SIGINT.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `sockets` until `shutdown` completes, then stops accepting, asks every connection to
/// finish its current request, and waits up to [`DRAIN_TIMEOUT`] for them.
///
/// `activated` is reported by `/whoami`. Must be called within a tokio runtime with I/O and time
/// enabled. Fails only if a socket cannot be registered with the runtime.
pub async fn run(
    sockets: Sockets,
    activated: bool,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS as usize));
    let mut loops = JoinSet::new();
    for listener in sockets.tcp {
        let listener = TcpListener::from_std(listener)?;
        let local = listener.local_addr()?;
        loops.spawn(accept_loop(
            listener,
            local,
            activated,
            Arc::clone(&conns),
            stop_rx.clone(),
        ));
    }
    for socket in sockets.udp {
        loops.spawn(udp::serve(UdpSocket::from_std(socket)?, stop_rx.clone()));
    }

    shutdown.await;
    // Listeners close as their loops return, so new clients are refused from here on.
    let _ = stop_tx.send(true);
    while loops.join_next().await.is_some() {}

    // Every connection holds a permit until it is done; getting all of them back means all done.
    if tokio::time::timeout(DRAIN_TIMEOUT, conns.acquire_many(MAX_CONNECTIONS))
        .await
        .is_err()
    {
        let open = MAX_CONNECTIONS as usize - conns.available_permits();
        eprintln!(
            "demo-server: {open} connection(s) still open after {}s; exiting anyway",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    Ok(())
}

/// Registers for SIGTERM and SIGINT now and returns a future that completes on the first of them.
///
/// Registering up front, before the "listening" lines are printed, means a supervisor that sends
/// SIGTERM as soon as we report ready gets a graceful stop, not the default action (death).
pub fn on_sigterm_or_sigint() -> io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Completes once the stop flag is set (or its sender is gone, which also means stop).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    activated: bool,
    conns: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            permit = Arc::clone(&conns).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_BACKOFF;
                // Responses are small and written whole; do not let Nagle hold them back
                // waiting for an ACK. Failure only costs latency.
                let _ = stream.set_nodelay(true);
                // For a wildcard listener this is the address the client actually reached.
                let local = stream.local_addr().unwrap_or(local);
                let info = ConnInfo {
                    local,
                    peer,
                    activated,
                };
                tokio::spawn(serve_connection(stream, info, permit, stop.clone()));
            }
            // The client gave up between SYN and accept: nothing is wrong with us.
            Err(err) if sys::io_errno(&err) == Errno::ECONNABORTED => {}
            Err(err) => {
                // EMFILE/ENFILE/ENOBUFS/ENOMEM clear up only when something else lets go; retrying
                // at once would spin. Anything else gets the same treatment, being unexpected.
                eprintln!(
                    "demo-server: accept on {local} failed: {}; retrying in {} ms",
                    sys::describe(sys::io_errno(&err)),
                    backoff.as_millis()
                );
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    info: ConnInfo,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| http::handle(req, info));
    let conn = http1::Builder::new()
        // A client that shuts down its write side after the request still gets the answer.
        .half_close(true)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    // Connection errors (resets, malformed requests) are the client's business and end only
    // this connection, so they are not reported.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(&mut stop) => {}
    }
    // Finish the request in flight, if any, then close instead of waiting for another.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

//! `/metrics` (Prometheus text format), `/healthz` and `/processes` over
//! HTTP/1, for the kubelet's probes and the node's Prometheus. Anyone who
//! can reach the port can open connections: they are capped, each must send
//! its request head within seconds and is closed after a bounded time, and
//! a failing accept (no descriptors left) backs off instead of spinning.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::SharedMetrics;
use crate::listen::Gate;

/// The agent loop goes round at least this often; longer means it is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// Connections waiting to be accepted.
const BACKLOG: i32 = 4096;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
/// Connections from one address at once; more are closed at once.
const PER_PEER: usize = 16;
/// Time a client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection is kept, keep-alive included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds `addr` now (so a taken port is an error at start) and serves from a
/// task of its own.
pub async fn start(addr: SocketAddr, metrics: SharedMetrics) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    // A longer queue than std's 128: a burst of connections waits to be
    // accepted instead of having its handshakes dropped.
    // SAFETY: a listening socket this function owns.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    // A thread of its own: the kubelet's probes are answered even while the
    // agent loop is busy (a stalled loop shows in `/healthz` as such).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("detector-metrics".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, metrics).await,
                Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
            }
        })
    })?;
    info!(addr = %bound, "serving /metrics, /healthz and /processes");
    Ok(bound)
}

async fn serve(listener: TcpListener, metrics: SharedMetrics) {
    let mut gate = Gate::new("metrics", MAX_CONNECTIONS, PER_PEER);
    loop {
        let slot = gate.room().await;
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                gate.failed(e).await;
                continue;
            }
        };
        gate.accepted();
        let Some(peer_slot) = gate.peer(peer.ip()) else {
            debug!(%peer, "metrics connection refused: that address has its share open");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection"),
                Err(_) => debug!(%peer, "metrics connection closed after its time"),
                Ok(Ok(())) => {}
            }
            drop((slot, peer_slot));
        });
    }
}

fn respond<B>(req: &Request<B>, metrics: &SharedMetrics) -> Response<Full<Bytes>> {
    let reply = |status, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
        r
    };
    match req.uri().path() {
        "/metrics" => {
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
        }
        "/healthz" => {
            let since = metrics.since_beat();
            if since <= STALE_AFTER.as_secs() {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("agent loop stalled for {since}s\n"))
            }
        }
        "/processes" => reply(StatusCode::OK, "application/json", metrics.processes()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /processes\n".into()),
    }
}

//! `/metrics` (Prometheus text format), `/healthz` and `/processes` over
//! HTTP/1, for the kubelet's probes and the node's Prometheus.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::SharedMetrics;

/// The agent loop goes round at least this often; longer means it is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// Binds `addr` now (so a taken port is an error at start) and serves from a
/// task of its own.
pub async fn start(addr: SocketAddr, metrics: SharedMetrics) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "serving /metrics, /healthz and /processes");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    debug!(%peer, error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(bound)
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

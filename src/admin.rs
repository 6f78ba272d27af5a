//! Admin HTTP endpoint: liveness, readiness, Prometheus metrics, and the operator API.

use crate::proxy::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Serves the admin API until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "admin API listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String, ctype: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json_resp(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    text(status, format!("{v:#}\n"), "application/json")
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") => {
            let up = shared.pool.all().iter().filter(|b| b.state() == crate::backend::State::Up).count();
            if up > 0 && !shared.shutdown.is_cancelled() {
                text(StatusCode::OK, format!("ready: {up} backend(s) up\n"), "text/plain")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no backend up\n".into(), "text/plain")
            }
        }
        (&Method::GET, "/metrics") => {
            shared.refresh_gauges();
            text(
                StatusCode::OK,
                shared.metrics.render(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        (&Method::GET, "/api/backends") => {
            let list: Vec<_> = shared
                .pool
                .all()
                .iter()
                .map(|b| {
                    json!({
                        "name": b.name,
                        "address": b.address,
                        "state": b.state().as_str(),
                        "weight": b.weight,
                        "live_sessions": b.live_sessions.load(Ordering::Relaxed),
                        "links": b.links.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json_resp(StatusCode::OK, json!({ "backends": list }))
        }
        _ => json_resp(StatusCode::NOT_FOUND, json!({"error": format!("no route for {} {path}", req.method())})),
    }
}

//! Admin HTTP endpoint: liveness, readiness, Prometheus metrics, the operator API, and the
//! status page (`status.rs`).

mod status;

use crate::context::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Serves the admin API until shutdown.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    managed: Option<Arc<crate::managed::Supervisor>>,
) {
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "admin API listening");
    }
    let recent = status::Recent::new(&shared);
    tokio::spawn(status::sample(shared.clone(), recent.clone()));
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        let recent = recent.clone();
        let managed = managed.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let recent = recent.clone();
                let managed = managed.clone();
                async move {
                    if let Err(resp) = same_origin(&req) {
                        return Ok::<_, Infallible>(resp);
                    }
                    if let Err(resp) = authorize(&shared, &req) {
                        return Ok::<_, Infallible>(resp);
                    }
                    let restart = req.method() == Method::POST
                        && req.uri().path().trim_end_matches('/') == "/api/backends/restart";
                    let resp = match delete_target(&req) {
                        Some(Some(sid)) => delete(&shared, &sid).await,
                        Some(None) => bad_segment(),
                        None if restart => rolling_restart(managed.as_deref()).await,
                        None => handle(&shared, &recent, req),
                    };
                    Ok::<_, Infallible>(resp)
                }
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

/// One of the status page's embedded files, under its Content-Security-Policy.
fn page(a: status::Asset) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", a.content_type)
        .header("content-security-policy", status::CSP)
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(a.body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn backend_json(b: &crate::backend::Backend) -> serde_json::Value {
    let st = b.status();
    let history: Vec<_> = st
        .history
        .iter()
        .map(|c| {
            let at =
                c.at.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
            let latency_ms = c.latency.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0);
            json!({"at_ms": at, "ok": c.ok, "latency_ms": latency_ms, "detail": c.detail})
        })
        .collect();
    json!({
        "name": st.name,
        "address": st.address,
        "state": st.state.as_str(),
        "healthy": st.healthy,
        "draining": st.draining,
        "drained": st.draining && st.live_sessions == 0,
        "weight": st.weight,
        "max_sessions": st.max_sessions,
        "live_sessions": st.live_sessions,
        "fleet_sessions": st.fleet_sessions,
        "links": st.links,
        "connections": st.links,
        "version": st.version,
        "consecutive_failures": st.consecutive_failures,
        "consecutive_successes": st.consecutive_successes,
        "health_history": history,
        "managed": b.managed.then(|| {
            let p = b.process();
            json!({"pid": p.pid, "cli_pid": crate::managed::cli_pid_of(p.pid), "restarts": p.restarts})
        }),
    })
}

/// `POST /api/backends/restart`: the managed pool's rolling restart, answered when it ends.
async fn rolling_restart(managed: Option<&crate::managed::Supervisor>) -> Response<Full<Bytes>> {
    use crate::managed::RestartError;
    let Some(m) = managed else {
        return json_resp(
            StatusCode::CONFLICT,
            json!({"error": "no managed pool: copilot-lb restarts only the CLIs it runs itself (managed:); restart external backends by draining them"}),
        );
    };
    info!("admin: rolling restart of the managed pool requested");
    match m.rolling_restart().await {
        Ok(done) => json_resp(StatusCode::OK, json!({"restarted": done})),
        Err(e) => {
            let status = match e {
                RestartError::InProgress | RestartError::NoSpare { .. } => StatusCode::CONFLICT,
                RestartError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            warn!(error = %e, "rolling restart failed");
            json_resp(status, json!({"error": e.to_string()}))
        }
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<usize> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k == key {
            v.parse().ok()
        } else {
            None
        }
    })
}

/// A browser sends `Origin` with every cross-origin POST or DELETE, and a page on another site
/// must not drain a backend through the operator's browser (a plain POST needs no CORS
/// preflight): a mutating request that names an origin other than the one it was sent to is
/// refused. Tools such as curl send no `Origin` and are unaffected.
#[allow(clippy::result_large_err)]
fn same_origin(req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return Ok(());
    }
    let Some(origin) = req.headers().get(hyper::header::ORIGIN) else {
        return Ok(());
    };
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok();
    let own = match (origin, host) {
        (Some(o), Some(h)) => o.strip_prefix("http://") == Some(h),
        _ => false,
    };
    if own {
        Ok(())
    } else {
        warn!(path = %req.uri().path(), origin = ?origin, "admin request refused: cross-origin");
        Err(json_resp(
            StatusCode::FORBIDDEN,
            json!({"error": "cross-origin admin requests are refused"}),
        ))
    }
}

/// Mutating routes need `Authorization: Bearer <token>` when `admin.token_env` is set, and so
/// do the `/api/*` reads with `admin.protect_reads`; probes and metrics never do.
#[allow(clippy::result_large_err)]
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let cfg = shared.config();
    let Some(admin) = cfg.admin.as_ref() else {
        return Ok(());
    };
    if req.method() == Method::GET
        && !(admin.protect_reads && req.uri().path().starts_with("/api/"))
    {
        return Ok(());
    }
    let Some(var) = admin.token_env.clone() else {
        return Ok(());
    };
    let want = std::env::var(&var).unwrap_or_default();
    let got = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = !want.is_empty() && crate::auth::constant_eq(want.as_bytes(), got.as_bytes());
    if same {
        Ok(())
    } else {
        warn!(path = %req.uri().path(), "admin request refused: missing or wrong bearer token");
        Err(json_resp(
            StatusCode::UNAUTHORIZED,
            json!({"error": "this admin route needs Authorization: Bearer <admin token>"}),
        ))
    }
}

/// One path segment, percent-decoded (RFC 3986), so names and session ids with reserved
/// characters can be addressed; decoding after splitting keeps `%2F` inside the segment.
/// `None` when the decoded bytes are not UTF-8.
fn segment(raw: &str) -> Option<String> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn bad_segment() -> Response<Full<Bytes>> {
    json_resp(
        StatusCode::BAD_REQUEST,
        json!({"error": "path segment is not percent-encoded UTF-8"}),
    )
}

/// For `DELETE /api/sessions/{id}`: the decoded id (`None` inside when it does not decode).
fn delete_target(req: &Request<Incoming>) -> Option<Option<String>> {
    if req.method() != Method::DELETE {
        return None;
    }
    let rest = req.uri().path().strip_prefix("/api/sessions/")?;
    (!rest.is_empty() && !rest.contains('/')).then(|| segment(rest))
}

async fn delete(shared: &Shared, sid: &str) -> Response<Full<Bytes>> {
    match crate::hygiene::delete_session(shared, sid).await {
        Ok(true) => json_resp(StatusCode::OK, json!({"deleted": true, "session_id": sid})),
        Ok(false) => json_resp(
            StatusCode::NOT_FOUND,
            json!({"deleted": false, "error": format!("copilot-lb does not know session {sid}")}),
        ),
        Err(e) => json_resp(
            StatusCode::BAD_GATEWAY,
            json!({"deleted": false, "error": e.to_string()}),
        ),
    }
}

fn handle(
    shared: &Shared,
    recent: &status::Recent,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET {
        if let Some(a) = status::asset(&path) {
            return page(a);
        }
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["livez"]) => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, ["readyz"]) => {
            // Up and confirmed by a probe: backends start optimistic for routing, but a new
            // replica should not take traffic before any backend answered.
            let up = shared
                .pool
                .all()
                .iter()
                .filter(|b| b.state() == crate::backend::State::Up && b.confirmed())
                .count();
            let sidecar_only = shared
                .config()
                .listeners
                .iter()
                .all(|l| l.mode == crate::config::ListenerMode::Tcp);
            if shared.stop_accepting.is_cancelled() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n".into(),
                    "text/plain",
                )
            } else if sidecar_only {
                text(
                    StatusCode::OK,
                    "ready: sidecar listening\n".into(),
                    "text/plain",
                )
            } else if up > 0 {
                // A registry outage does not make a replica unready: the sessions it knows
                // keep working, and every replica shares the outage. It is said, not hidden.
                let r = shared.sessions.status();
                let registry = if r.up {
                    String::new()
                } else {
                    format!("; session registry ({}) unavailable: sessions this replica does not know are refused (retryable)", r.kind)
                };
                text(
                    StatusCode::OK,
                    format!("ready: {up} backend(s) up{registry}\n"),
                    "text/plain",
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no backend confirmed up by a health probe\n".into(),
                    "text/plain",
                )
            }
        }
        (&Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            shared.render_metrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        (&Method::GET, ["api", "status"]) => {
            let doc = status::document(shared, recent, std::time::SystemTime::now());
            let mut r = json_resp(StatusCode::OK, doc);
            r.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            r
        }
        (&Method::GET, ["api", "registry"]) => {
            json_resp(StatusCode::OK, json!(shared.sessions.status()))
        }
        (&Method::GET, ["api", "backends"]) => {
            let list: Vec<_> = shared.pool.all().iter().map(|b| backend_json(b)).collect();
            json_resp(StatusCode::OK, json!({ "backends": list }))
        }
        (&Method::POST, ["api", "backends", name, action @ ("drain" | "undrain")]) => {
            let Some(name) = segment(name) else {
                return bad_segment();
            };
            match shared.pool.get(&name) {
                Some(b) => {
                    b.set_draining(*action == "drain");
                    info!(backend = %b.name, action = *action, "admin: backend {action}ed");
                    json_resp(StatusCode::OK, backend_json(&b))
                }
                None => json_resp(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no backend named {name}")}),
                ),
            }
        }
        (&Method::GET, ["api", "sessions"]) => {
            let offset = query(&req, "offset").unwrap_or(0);
            let limit = query(&req, "limit").unwrap_or(100).min(10_000);
            let all = shared.sessions.snapshot();
            let total = all.len();
            let now = std::time::SystemTime::now();
            let page: Vec<_> = all
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(|(id, p)| {
                    json!({
                        "session_id": id,
                        "backend": p.backend,
                        "owner": p.owner,
                        "age_s": now.duration_since(p.created).map(|d| d.as_secs()).unwrap_or(0),
                        "idle_s": p.last_seen.elapsed().as_secs(),
                        "live_connections": p.live_conns,
                        "failovers": p.moves,
                        "epoch": p.epoch,
                    })
                })
                .collect();
            json_resp(
                StatusCode::OK,
                json!({"total": total, "offset": offset, "limit": limit, "sessions": page}),
            )
        }
        (&Method::POST, ["api", "reload"]) => match shared.reload() {
            Ok(r) => {
                info!(added = ?r.added, removed = ?r.removed, "configuration reloaded (admin API)");
                json_resp(
                    StatusCode::OK,
                    json!({"reloaded": true, "added": r.added, "removed": r.removed}),
                )
            }
            Err(e) => {
                warn!(error = %e, "configuration reload refused (admin API)");
                json_resp(
                    StatusCode::BAD_REQUEST,
                    json!({"reloaded": false, "error": e.to_string()}),
                )
            }
        },
        _ => json_resp(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no route for {} {path}", req.method()),
                   "routes": ["GET / (status page)", "GET /api/status", "GET /livez", "GET /readyz", "GET /metrics", "GET /api/registry", "GET /api/backends",
                              "POST /api/backends/{name}/drain", "POST /api/backends/{name}/undrain",
                              "GET /api/sessions?offset=&limit=", "DELETE /api/sessions/{id}", "POST /api/reload",
                              "POST /api/backends/restart"]}),
        ),
    }
}

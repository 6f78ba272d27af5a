//! Building the few JSON-RPC messages the proxy writes itself, and its error codes.

use serde_json::{json, Value};

/// `-32700`: body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// `-32600`: not a JSON-RPC 2.0 message.
pub const INVALID_REQUEST: i64 = -32600;
/// `-32601`: method not available (unknown, or refused by the proxy's policy).
pub const METHOD_NOT_FOUND: i64 = -32601;
/// `-32602`: invalid params.
pub const INVALID_PARAMS: i64 = -32602;
/// `-32603`: internal error, the CLI's code for any handler failure.
pub const INTERNAL_ERROR: i64 = -32603;
/// `-32001`: the CLI's AUTHENTICATION_REQUIRED.
pub const AUTHENTICATION_REQUIRED: i64 = -32001;
/// `-32002`: the CLI's AUTHENTICATION_FAILED.
pub const AUTHENTICATION_FAILED: i64 = -32002;
/// `-32003`: the CLI's AUTHENTICATION_NOT_CONFIGURED.
pub const AUTHENTICATION_NOT_CONFIGURED: i64 = -32003;
/// `-32010`: the session's backend is gone and the session must be recreated.
pub const SESSION_LOST: i64 = -32010;
/// `-32011`: no backend could serve the request now; retrying may succeed.
pub const BACKEND_UNAVAILABLE: i64 = -32011;
/// `-32012`: the session belongs to another tenant (or is not visible to this one).
pub const SESSION_FORBIDDEN: i64 = -32012;
/// `-32013`: the tenant holds its maximum number of live sessions.
pub const SESSION_LIMIT: i64 = -32013;
/// `-32014`: a frame exceeded the proxy's size limit.
pub const FRAME_TOO_LARGE: i64 = -32014;
/// `-32015`: the session id is not allowed for this tenant.
pub const SESSION_ID_NOT_ALLOWED: i64 = -32015;
/// `-32016`: a noisy-neighbour limit (tenant rate, tenant turns, backend turns); retryable.
pub const RATE_LIMITED: i64 = -32016;

/// The `connect` param with which a session-aware sidecar asks an edge to announce its
/// shutdown; only connections that sent it ever see [`GOAWAY`].
pub const GOAWAY_OPT_IN: &str = "copilotLbGoaway";
/// The notification an edge sends to such connections when it starts shutting down: move
/// your sessions elsewhere; what you already sent is still answered. Never reaches an SDK.
pub const GOAWAY: &str = "copilotLb.goaway";

/// The protocol version the proxy speaks to clients.
pub const PROTOCOL_VERSION: u64 = 3;

/// An error response body. `id` is raw JSON text (`"null"` when unknown).
pub fn error(id: &str, code: i64, message: &str, data: Option<Value>) -> Vec<u8> {
    let mut err = json!({ "code": code, "message": message });
    if let Some(d) = data {
        err["data"] = d;
    }
    let err = serde_json::to_string(&err).unwrap_or_else(|_| "{}".into());
    format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{err}}}"#).into_bytes()
}

/// A success response body with a result built by the proxy.
pub fn result(id: &str, result: &Value) -> Vec<u8> {
    let r = serde_json::to_string(result).unwrap_or_else(|_| "null".into());
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{r}}}"#).into_bytes()
}

/// A request body the proxy originates (ids it allocates are plain integers).
pub fn request(id: u64, method: &str, params: &Value) -> Vec<u8> {
    let p = serde_json::to_string(params).unwrap_or_else(|_| "{}".into());
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{p}}}"#).into_bytes()
}

/// A notification body the proxy originates.
pub fn notification(method: &str, params: &Value) -> Vec<u8> {
    let p = serde_json::to_string(params).unwrap_or_else(|_| "{}".into());
    format!(r#"{{"jsonrpc":"2.0","method":"{method}","params":{p}}}"#).into_bytes()
}

/// The `data` object of a proxy error: who answered, whether a retry may succeed, and context.
pub fn data(retryable: bool, extra: Value) -> Value {
    let mut d = json!({ "source": "copilot-lb", "retryable": retryable });
    if let (Some(obj), Value::Object(more)) = (d.as_object_mut(), extra) {
        obj.extend(more);
    }
    d
}

/// Current time in milliseconds since the epoch (for `ping` replies).
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Current UTC time as RFC 3339 with milliseconds (event timestamps).
pub fn now_rfc3339() -> String {
    let ms = now_millis();
    let (secs, milli) = (ms / 1000, ms % 1000);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    use super::*;

    #[test]
    fn error_keeps_id_verbatim() {
        let b = error("\"x-1\"", -32001, "AUTHENTICATION_REQUIRED", None);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["id"], "x-1");
        assert_eq!(v["error"]["code"], -32001);
        let b = result("7", &Value::Null);
        assert_eq!(b, br#"{"jsonrpc":"2.0","id":7,"result":null}"#.to_vec());
    }
}

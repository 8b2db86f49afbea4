//! Basic authentication (`--basic-auth user:pass`, several allowed) and read-only mode.
//!
//! As in Flower, `/healthcheck` and `/metrics` stay open; every other path needs credentials when any
//! are configured (401 with `WWW-Authenticate: Basic realm="flower"` otherwise). Read-only mode refuses
//! the control endpoints with 403 `Read only mode is enabled` — after authentication, as Flower does.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::shared::Shared;

/// Constant-time comparison (no early exit on the first differing byte).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries one of `allowed` (`user:pass` strings).
pub fn authorized(header_value: Option<&str>, allowed: &[String]) -> bool {
    let Some(value) = header_value else {
        return false;
    };
    let mut parts = value.split_whitespace();
    let (Some(scheme), Some(encoded), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if scheme != "Basic" {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let mut ok = false;
    for cred in allowed {
        ok |= same(cred.as_bytes(), &decoded);
    }
    ok
}

/// Middleware: 401 for requests without valid credentials when basic auth is on.
pub async fn require_auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let allowed = &shared.config.basic_auth;
    if allowed.is_empty() {
        return next.run(req).await;
    }
    let prefix = shared.config.prefix();
    let path = req.uri().path();
    let open = [format!("{prefix}/healthcheck"), format!("{prefix}/metrics")];
    if open.iter().any(|p| p == path) {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    if authorized(header, allowed) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"flower\"")],
        "Access denied",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let allowed = vec!["admin:s3cret".to_string(), "ops:x".to_string()];
        let enc = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(authorized(Some(&enc("admin:s3cret")), &allowed));
        assert!(authorized(Some(&enc("ops:x")), &allowed));
        assert!(!authorized(Some(&enc("admin:wrong")), &allowed));
        assert!(!authorized(Some("Bearer abc"), &allowed));
        assert!(!authorized(None, &allowed));
    }
}

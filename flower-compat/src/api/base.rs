//! What Flower's `BaseApiHandler` (and Tornado under it) gives every API handler: errors answered as
//! plain text, JSON bodies written byte for byte as Tornado writes them, query arguments parsed with
//! Flower's messages, and the read-only guard. One place, so every handler answers alike.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::shared::Shared;

pub(super) type Params = Query<HashMap<String, String>>;
pub(super) type AppState = State<Arc<Shared>>;

/// An error answered the way Tornado answers `HTTPError(status, message)` on API handlers: the message
/// as plain text.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
            self.1,
        )
            .into_response()
    }
}

pub(super) fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

/// A JSON body as Tornado's `write(dict)` sends it.
pub(super) fn json_response(v: Value) -> Response {
    // Byte for byte what Tornado writes: Python's `json.dumps` separators and escaping.
    let text = celeriac_wire::json::to_python_string(&v, false).replace("</", "<\\/");
    (
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        text,
    )
        .into_response()
}

pub(super) type ApiResult = Result<Response, ApiError>;

/// Tornado's `strtobool`.
pub(super) fn arg_bool(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(|s| s.trim().to_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "y" | "yes" | "t" | "true" | "on" | "1" => Ok(true),
            "n" | "no" | "f" | "false" | "off" | "0" => Ok(false),
            other => Err(err(
                StatusCode::BAD_REQUEST,
                format!("Invalid argument '{other}' of type 'bool'"),
            )),
        },
    }
}

pub(super) fn arg_int(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    arg_parsed(q, name, "int")
}

pub(super) fn arg_float(q: &HashMap<String, String>, name: &str) -> Result<Option<f64>, ApiError> {
    arg_parsed(q, name, "float")
}

/// A numeric query argument, refused with Flower's message when it does not parse.
fn arg_parsed<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
    type_name: &str,
) -> Result<Option<T>, ApiError> {
    match q.get(name).map(|s| s.trim()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                format!("Invalid argument '{v}' of type '{type_name}'"),
            )
        }),
    }
}

pub(super) fn required<'a>(
    q: &'a HashMap<String, String>,
    name: &str,
) -> Result<&'a str, ApiError> {
    match q.get(name).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(err(
            StatusCode::BAD_REQUEST,
            format!("Missing argument {name}"),
        )),
    }
}

pub(super) fn guard_read_only(shared: &Shared) -> Result<(), ApiError> {
    if shared.config.read_only {
        return Err(err(StatusCode::FORBIDDEN, "Read only mode is enabled"));
    }
    Ok(())
}

pub(super) fn to_json(v: &impl serde::Serialize) -> ApiResult {
    serde_json::to_value(v)
        .map(json_response)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

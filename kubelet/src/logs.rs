//! The kubelet's HTTPS endpoint: `GET /containerLogs/{namespace}/{pod}/{container}`, which the
//! apiserver proxies `pods/{name}/log` to. Supports `follow`, `tailLines` and `limitBytes`. The
//! certificate is self-signed: the apiserver does not verify kubelet certificates unless
//! `--kubelet-certificate-authority` is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::log_files::LogFile;
use crate::node::Node;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
    #[serde(default)]
    tail_lines: Option<usize>,
    #[serde(default)]
    limit_bytes: Option<usize>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true") | Some("1") | Some(""))
}

async fn container_logs(
    State(node): State<Arc<Node>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(file) = node.logs.get(&ns, &pod, &container) else {
        return (
            StatusCode::NOT_FOUND,
            format!("container {container} of pod {ns}/{pod} has no logs on this node"),
        )
            .into_response();
    };
    let text_plain = [(header::CONTENT_TYPE, "text/plain")];
    if truthy(&q.follow) {
        let stream = follow(file, q.limit_bytes);
        return (text_plain, Body::from_stream(stream)).into_response();
    }
    let mut bytes = match tokio::fs::read(&file.path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")).into_response();
        }
    };
    if let Some(n) = q.tail_lines {
        bytes = tail(&bytes, n).to_vec();
    }
    if let Some(limit) = q.limit_bytes {
        bytes.truncate(limit);
    }
    (text_plain, bytes).into_response()
}

/// The last `n` lines of `bytes`.
fn tail(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

fn follow(
    file: LogFile,
    limit: Option<usize>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::unfold(
        (file, 0u64, limit.unwrap_or(usize::MAX), false),
        |(mut file, pos, left, finished)| async move {
            if finished || left == 0 {
                return None;
            }
            loop {
                let exited = *file.exited.borrow();
                let chunk = read_from(&file.path, pos, left.min(64 * 1024)).await;
                match chunk {
                    Ok(c) if !c.is_empty() => {
                        let n = c.len();
                        return Some((Ok(c), (file, pos + n as u64, left - n, false)));
                    }
                    Ok(_) if exited => return None,
                    Ok(_) => {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), file.exited.changed())
                                .await;
                    }
                    Err(e) => return Some((Err(e), (file, pos, left, true))),
                }
            }
        },
    )
}

async fn read_from(path: &std::path::Path, pos: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(std::io::SeekFrom::Start(pos)).await?;
    let mut buf = vec![0; max];
    let n = f.read(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// Starts the HTTPS endpoint on 127.0.0.1:`node.port`.
pub async fn serve(node: Arc<Node>) -> anyhow::Result<SocketAddr> {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .context("generating the kubelet's serving certificate")?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert.cert.pem().into_bytes(),
        cert.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .context("loading the kubelet's serving certificate")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], node.port));
    let app = Router::new()
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(node);
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(addr, tls)
        .handle(handle.clone())
        .serve(app.into_make_service());
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("kubelet HTTPS endpoint failed: {e}");
        }
    });
    handle
        .listening()
        .await
        .with_context(|| format!("binding {addr}"))
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\n", 5), b"a\n");
        assert_eq!(tail(b"a\n", 0), b"");
    }
}

//! Readiness and liveness probes, as the kubelet runs them: `httpGet` (any status 200–399 passes) and
//! `tcpSocket` against the pod's address (here 127.0.0.1, every pod shares the host's network), with
//! `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`, `successThreshold` and
//! `failureThreshold`. `exec` probes are not run (a process kubelet has no container to exec in):
//! they count as passing, with a warning.
//!
//! Readiness changes are reported to the pod task, which updates the container's `ready` and the
//! pod's `Ready` condition (so a Deployment rollout waits for `/readyz`); a liveness failure kills the
//! container (this kubelet does not restart containers, so the pod fails and its controller
//! replaces it).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a probe task tells the pod task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvent {
    /// Container `i`'s readiness changed.
    Ready(usize, bool),
    /// Container `i` failed its liveness probe `failureThreshold` times in a row.
    Unhealthy(usize),
}

/// Starts the container's probes (if any) until `stop`; returns whether it has a readiness probe
/// (its container then starts not ready).
pub fn start(
    index: usize,
    c: &Container,
    events: mpsc::Sender<ProbeEvent>,
    stop: CancellationToken,
) -> bool {
    if let Some(p) = c.liveness_probe.clone() {
        let (c, events, stop) = (c.clone(), events.clone(), stop.clone());
        tokio::spawn(async move {
            run(
                &c,
                &p,
                stop,
                |ok, changed| (!ok && changed).then_some(ProbeEvent::Unhealthy(index)),
                &events,
            )
            .await
        });
    }
    let Some(p) = c.readiness_probe.clone() else {
        return false;
    };
    let c = c.clone();
    tokio::spawn(async move {
        run(
            &c,
            &p,
            stop,
            |ok, changed| changed.then_some(ProbeEvent::Ready(index, ok)),
            &events,
        )
        .await
    });
    true
}

/// Probes every period; the result flips after `successThreshold` passes or `failureThreshold`
/// failures in a row; `on_result(result, flipped)` decides what to tell the pod task.
async fn run(
    c: &Container,
    p: &Probe,
    stop: CancellationToken,
    on_result: impl Fn(bool, bool) -> Option<ProbeEvent>,
    events: &mpsc::Sender<ProbeEvent>,
) {
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let period = secs(p.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = secs(p.timeout_seconds, 1).max(Duration::from_secs(1));
    let successes_needed = p.success_threshold.unwrap_or(1).max(1);
    let failures_needed = p.failure_threshold.unwrap_or(3).max(1);
    tokio::select! {
        _ = tokio::time::sleep(secs(p.initial_delay_seconds, 0)) => {}
        _ = stop.cancelled() => return,
    }
    // The kubelet's starting assumption: not ready, alive.
    let mut state: Option<bool> = None;
    let (mut successes, mut failures) = (0, 0);
    loop {
        let ok = probe_once(c, p, timeout).await;
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let next = if successes >= successes_needed {
            Some(true)
        } else if failures >= failures_needed {
            Some(false)
        } else {
            state
        };
        if let Some(n) = next {
            let changed = state != Some(n);
            state = Some(n);
            if let Some(event) = on_result(n, changed) {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn probe_once(c: &Container, p: &Probe, timeout: Duration) -> bool {
    if let Some(h) = &p.http_get {
        let Some(port) = port(c, &h.port) else {
            tracing::warn!(container = %c.name, "probe port {:?} not found", h.port);
            return false;
        };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return tokio::time::timeout(timeout, http_get(port, &path))
            .await
            .unwrap_or(false);
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = port(c, &t.port) else {
            return false;
        };
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await,
            Ok(Ok(_))
        );
    }
    tracing::warn!(container = %c.name, "exec/grpc probes are not run by the process kubelet; counted as passing");
    true
}

/// A probe port: a number, or the name of one of the container's ports.
pub fn port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// `GET path` on 127.0.0.1:port; passes on 200–399, as the kubelet's HTTP prober.
async fn http_get(port: u16, path: &str) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.20\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).await.is_err() {
        return false;
    }
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|code| (200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::port;
    use k8s_openapi::api::core::v1::Container;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn probe_ports_by_number_or_name() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 9808}]
        }))
        .expect("container");
        assert_eq!(port(&c, &IntOrString::String("http".into())), Some(9808));
        assert_eq!(port(&c, &IntOrString::Int(80)), Some(80));
        assert_eq!(port(&c, &IntOrString::String("metrics".into())), None);
    }
}

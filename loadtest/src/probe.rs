//! celeriac's HTTP endpoint as the scenarios read it (readiness, Prometheus metrics): one plain
//! HTTP/1.0 request over a `TcpStream`, so that the load test needs no HTTP client and adds nothing
//! to the processes it measures.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A loopback port free now, for a process's `--http-addr`.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `GET /readyz` on `port` answers 200.
pub fn wait_ready(port: u16, timeout: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            bail!("port {port} not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The whole response to `GET /metrics` on `port` (empty if nothing answers).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

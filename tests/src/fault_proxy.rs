//! A TCP fault proxy for the tests: listens on loopback, forwards each connection to one upstream
//! (RabbitMQ, Redis, PostgreSQL, the API server) and injects network faults on command:
//!
//! * [`Fault::Latency`]: every chunk waits this long before it is forwarded (each direction);
//! * [`Fault::Bandwidth`]: at most this many bytes per second per direction;
//! * [`Fault::BlackHole`]: bytes are accepted and dropped, nothing is answered (a peer that went mute:
//!   the sockets stay open, no FIN, no RST);
//! * [`Fault::HalfOpen`]: nothing is read any more (a peer that vanished: the sender's window fills up);
//! * [`FaultProxy::reset_all`]: every open connection is reset (RST), as when a peer restarts;
//! * [`FaultProxy::refuse`]: new connections are reset at once (the peer is down).
//!
//! A fault applies to the connections open when it is set ([`FaultProxy::fault_existing`]) or to
//! every connection, later ones included ([`FaultProxy::fault_all`]). Buffers are bounded: one
//! 16 KiB chunk per direction and connection. Loopback only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const CHUNK: usize = 16 * 1024;

/// What happens to the bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forwarded as they come.
    None,
    Latency(Duration),
    /// Bytes per second, per direction.
    Bandwidth(u64),
    BlackHole,
    HalfOpen,
}

struct Conn {
    fault: watch::Sender<Fault>,
    reset: watch::Sender<bool>,
}

struct Shared {
    upstream: SocketAddr,
    /// Fault of connections accepted from now on.
    new_fault: Mutex<Fault>,
    refuse: AtomicBool,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    /// When each connection was accepted (for reconnect timings).
    accept_times: Mutex<Vec<Instant>>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on `127.0.0.1:<free port>` to `upstream` (a loopback address).
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        anyhow::ensure!(
            upstream.ip().is_loopback(),
            "the fault proxy forwards to loopback only"
        );
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the fault proxy")?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream,
            new_fault: Mutex::new(Fault::None),
            refuse: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            accept_times: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("fault proxy: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fault proxy: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, s) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(FaultProxy {
            port,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sets `fault` on the connections open now; later connections are not affected.
    pub fn fault_existing(&self, fault: Fault) {
        for c in lock(&self.shared.conns).values() {
            let _ = c.fault.send(fault);
        }
    }

    /// Sets `fault` on every connection, open now or accepted later.
    pub fn fault_all(&self, fault: Fault) {
        *lock(&self.shared.new_fault) = fault;
        self.fault_existing(fault);
    }

    /// Back to plain forwarding for every connection.
    pub fn heal(&self) {
        self.refuse(false);
        self.fault_all(Fault::None);
    }

    /// Resets (RST) every open connection.
    pub fn reset_all(&self) {
        for c in lock(&self.shared.conns).values() {
            let _ = c.reset.send(true);
        }
    }

    /// While on, new connections are reset as soon as they are accepted.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// When connections were accepted, in order.
    pub fn accept_times(&self) -> Vec<Instant> {
        lock(&self.shared.accept_times).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// SO_LINGER 0: closing sends RST instead of FIN. (tokio deprecates `set_linger` because a non-zero
/// linger blocks the closing thread; a zero linger never does.)
#[allow(deprecated)]
fn rst(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        lock(&shared.accept_times).push(Instant::now());
        if shared.refuse.load(Ordering::SeqCst) {
            rst(&client);
            drop(client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (fault_tx, fault_rx) = watch::channel(*lock(&shared.new_fault));
        let (reset_tx, reset_rx) = watch::channel(false);
        lock(&shared.conns).insert(
            id,
            Conn {
                fault: fault_tx,
                reset: reset_tx,
            },
        );
        let s = shared.clone();
        tokio::spawn(async move {
            serve(client, s.upstream, fault_rx, reset_rx).await;
            lock(&s.conns).remove(&id);
        });
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    fault: watch::Receiver<Fault>,
    mut reset: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            rst(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, fault.clone());
    let down = pump(sr, cw, fault);
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    loop {
        tokio::select! {
            r = &mut up, if !up_done => { up_done = true; if let Some((r, w)) = r { finish(r, w); } }
            r = &mut down, if !down_done => { down_done = true; if let Some((r, w)) = r { finish(r, w); } }
            changed = reset.changed() => {
                if changed.is_err() || *reset.borrow() {
                    // Dropping the pumps drops the sockets; linger 0 makes both ends see a reset.
                    return;
                }
            }
        }
        if up_done && down_done {
            return;
        }
    }
}

fn finish(r: tokio::net::tcp::OwnedReadHalf, w: tokio::net::tcp::OwnedWriteHalf) {
    drop(r);
    drop(w);
}

/// Copies `from` to `to` under the connection's fault. Returns the halves when the reader hit EOF
/// (the writer's side is shut down, as a proxy passes a FIN on).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) -> Option<(
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    // Reset semantics need linger 0 on both sockets whenever they are dropped mid-stream.
    rst(from.as_ref());
    rst(to.as_ref());
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Half-open: read nothing until the fault changes.
        while *fault.borrow() == Fault::HalfOpen {
            if fault.changed().await.is_err() {
                return None;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    // A mute peer passes nothing on, not even the other side's FIN: hold the
                    // connection open until the fault changes.
                    while matches!(*fault.borrow(), Fault::BlackHole | Fault::HalfOpen) {
                        if fault.changed().await.is_err() {
                            return None;
                        }
                    }
                    let _ = to.shutdown().await;
                    return Some((from, to));
                }
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() { return None; }
                continue;
            }
        };
        loop {
            let current = *fault.borrow();
            match current {
                Fault::None => break,
                Fault::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Bandwidth(bps) => {
                    let secs = n as f64 / bps.max(1) as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    break;
                }
                // Swallowed: accepted and never answered.
                Fault::BlackHole => break,
                // Became half-open while holding a chunk: hold it until the fault changes.
                Fault::HalfOpen => {
                    if fault.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
        if *fault.borrow() == Fault::BlackHole {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut b = [0u8; 4096];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn forwards_and_injects_each_fault() -> Result<()> {
        let proxy = FaultProxy::start(echo())?;
        let mut c = std::net::TcpStream::connect(proxy.addr())?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        assert_eq!(roundtrip(&mut c, b"hello")?, b"hello");

        proxy.fault_existing(Fault::Latency(Duration::from_millis(300)));
        let t = Instant::now();
        assert_eq!(roundtrip(&mut c, b"slow")?, b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );

        proxy.fault_existing(Fault::Bandwidth(20_000));
        let t = Instant::now();
        let big = vec![7u8; 20_000];
        assert_eq!(roundtrip(&mut c, &big)?, big);
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );

        proxy.fault_existing(Fault::BlackHole);
        c.write_all(b"lost")?;
        let mut b = [0u8; 4];
        let e = c.read(&mut b).expect_err("no answer in a black hole");
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );

        // New connections are not black-holed by fault_existing.
        let mut d = std::net::TcpStream::connect(proxy.addr())?;
        d.set_read_timeout(Some(Duration::from_secs(2)))?;
        assert_eq!(roundtrip(&mut d, b"fresh")?, b"fresh");

        proxy.reset_all();
        std::thread::sleep(Duration::from_millis(200));
        let mut b = [0u8; 1];
        match d.read(&mut b) {
            Ok(0) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes from a reset connection"),
        }

        proxy.refuse(true);
        let mut r = std::net::TcpStream::connect(proxy.addr())?;
        r.set_read_timeout(Some(Duration::from_secs(2)))?;
        assert!(matches!(r.read(&mut b), Ok(0) | Err(_)));
        proxy.heal();
        let mut h = std::net::TcpStream::connect(proxy.addr())?;
        h.set_read_timeout(Some(Duration::from_secs(2)))?;
        assert_eq!(roundtrip(&mut h, b"healed")?, b"healed");

        proxy.fault_all(Fault::HalfOpen);
        let mut x = std::net::TcpStream::connect(proxy.addr())?;
        x.set_read_timeout(Some(Duration::from_millis(500)))?;
        x.write_all(b"stuck")?;
        assert!(x.read(&mut b).is_err(), "half-open answers nothing");
        proxy.heal();
        assert_eq!(roundtrip(&mut x, b"")?, b"");
        let mut got = [0u8; 5];
        x.set_read_timeout(Some(Duration::from_secs(2)))?;
        x.read_exact(&mut got)?;
        assert_eq!(&got, b"stuck", "held bytes flow once healed");
        assert!(proxy.accepted() >= 5);
        Ok(())
    }
}

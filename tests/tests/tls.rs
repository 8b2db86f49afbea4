//! TLS to the broker and the result backend, with a CA made by the test (openssl): a private RabbitMQ
//! node with a TLS listener (`amqps://`) and a private `redis-server --tls-port` (`rediss://`).
//!
//! On each: a worker given the CA the way Celery names it (`?ssl_ca_certs=…&ssl_cert_reqs=required` in
//! the URL, as kombu/redis-py read it; `broker_use_ssl` in the config file) consumes a task published by
//! a real Python Celery client over TLS and returns its result over TLS (`rpc://` on RabbitMQ,
//! `rediss://` on Redis). Verification is on by default: without the CA, or with another CA, the
//! connection is refused with an error that says so, the worker keeps retrying and never consumes;
//! `ssl_cert_reqs=none` is refused outright.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use celeriac_tests::brokers::PrivateRabbit;
use celeriac_tests::{
    artifacts_dir, celeriac_bin, ensure_services, free_port, peer, run_python, tail, unique,
    wait_until, WorkerProcess,
};
use celeriac_wire::broker::redis::RedisTransportOptions;
use serde_json::Value;

/// A CA, a server certificate for `localhost`/`127.0.0.1` signed by it, and an unrelated CA.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Result<Certs> {
        // Under the system temp directory, readable by all: the private RabbitMQ node runs as the
        // rabbitmq user, which cannot reach a checkout inside a 0700 directory (CI's clean clone).
        let dir = std::env::temp_dir().join(unique("celeriac_tls"));
        std::fs::create_dir_all(&dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let sh = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        for ca in ["ca", "other_ca"] {
            sh(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=celeriac test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ])?;
        }
        sh(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        sh(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ])?;
        // The private RabbitMQ node runs as the rabbitmq user: let it read the files (test keys only).
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status();
        Ok(Certs { dir })
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

/// A private `redis-server` speaking only TLS.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(certs: &Certs) -> Result<TlsRedis> {
        let port = free_port()?;
        let log =
            std::fs::File::create(artifacts_dir().join(format!("{}.log", unique("redis_tls"))))?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", &certs.path("server.pem")])
            .args(["--tls-key-file", &certs.path("server.key")])
            .args(["--tls-ca-cert-file", &certs.path("ca.pem")])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting redis-server --tls-port")?;
        wait_until("redis-server's TLS port", Duration::from_secs(20), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(()))
        })?;
        Ok(TlsRedis { child, port })
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(broker: &str, backend: &str, envs: &[(&str, &str)], args: &[&str]) -> Result<String> {
    let script = peer("celery_client.py").display().to_string();
    let mut all = vec![script.as_str(), "--broker", broker, "--backend", backend];
    all.extend_from_slice(args);
    run_python(&all, envs, Duration::from_secs(120))
}

/// A Python client publishes `celery.ping`; the worker runs it; the same client reads `pong` back (one
/// process: `rpc://` replies go to the publisher's own reply queue).
fn ping_through(broker: &str, backend: &str, envs: &[(&str, &str)], queue: &str) -> Result<()> {
    let states: Vec<Value> = serde_json::from_str(
        client(
            broker,
            backend,
            envs,
            &[
                "publish",
                "--queue",
                queue,
                "--task",
                "celery.ping",
                "--count",
                "2",
                "--wait",
                "60",
            ],
        )?
        .trim(),
    )?;
    for s in &states {
        assert_eq!(s["state"], "SUCCESS", "{s}");
        assert!(s["result"].to_string().contains("pong"), "{s}");
    }
    assert_eq!(states.len(), 2);
    Ok(())
}

/// The connection is refused, and the error says it is about the certificate.
async fn refused(url: &str) -> Result<String> {
    match celeriac_wire::connect::broker(url, RedisTransportOptions::default()).await {
        Ok(_) => bail!("{url}: connected although the server certificate cannot be verified"),
        Err(e) => {
            let text = format!("{e:#}");
            assert!(
                text.contains("certificate") || text.contains("always verifies"),
                "{url}: the error names the certificate problem: {text}"
            );
            Ok(text)
        }
    }
}

/// A worker started with `broker` logs the certificate error and keeps retrying, never ready.
fn worker_refuses(broker: &str, queue: &str) -> Result<()> {
    let log = artifacts_dir().join(format!("{}.log", unique("tls_refused")));
    let file = std::fs::File::create(&log)?;
    let mut child = Command::new(celeriac_bin())
        .args([
            "worker",
            "-b",
            broker,
            "--result-backend",
            "rpc://",
            "-Q",
            queue,
        ])
        .args(["--launcher", "process", "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let seen = wait_until(
        "the certificate error in the worker log",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok((text.contains("certificate") && text.contains("retrying")).then_some(text))
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.with_context(|| tail(&log, 20))?;
    assert!(
        !text.contains("celeriac worker ready"),
        "no worker runs without a verified broker"
    );
    Ok(())
}

fn write_config(dir: &Path, ca: &str) -> Result<PathBuf> {
    let p = dir.join(format!("{}.yaml", unique("celeriac_tls")));
    std::fs::write(
        &p,
        format!("broker_use_ssl:\n  ca_certs: {ca}\n  cert_reqs: CERT_REQUIRED\n"),
    )?;
    Ok(p)
}

#[test]
fn amqps_with_a_private_ca() -> Result<()> {
    ensure_services();
    let certs = Certs::make()?;
    let tls_port = free_port()?;
    let rabbit = PrivateRabbit::start_with_conf(&format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
         ssl_options.fail_if_no_peer_cert = false\n",
        certs.path("ca.pem"),
        certs.path("server.pem"),
        certs.path("server.key"),
    ))?;
    wait_until("RabbitMQ's TLS listener", Duration::from_secs(60), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", tls_port))
            .is_ok()
            .then_some(()))
    })?;
    let base = format!("amqps://guest:guest@localhost:{tls_port}//");
    let ca = certs.path("ca.pem");
    let queue = unique("tls_amqp");

    // The CA in the URL (kombu's ssl_* names) and, for another worker, in the config file.
    let with_query = format!("{base}?ssl_cert_reqs=required&ssl_ca_certs={ca}");
    let mut worker = WorkerProcess::consuming(&with_query, "rpc://", &queue, &[])?;
    ping_through(&base, "rpc://", &[("CELERIAC_TEST_BROKER_CA", &ca)], &queue)?;
    worker.terminate(Duration::from_secs(30))?;
    let config = write_config(&certs.dir, &ca)?;
    let config_arg = config.display().to_string();
    let mut worker = WorkerProcess::consuming(&base, "rpc://", &queue, &["--config", &config_arg])?;
    ping_through(&base, "rpc://", &[("CELERIAC_TEST_BROKER_CA", &ca)], &queue)?;
    worker.terminate(Duration::from_secs(30))?;

    // Verification is on by default: no CA, another CA, or verification turned off: refused.
    let rt = tokio::runtime::Runtime::new()?;
    let other = certs.path("other_ca.pem");
    let e = rt.block_on(refused(&base))?;
    eprintln!("amqps without the CA: {e}");
    let e = rt.block_on(refused(&format!("{base}?ssl_ca_certs={other}")))?;
    eprintln!("amqps with another CA: {e}");
    rt.block_on(refused(&format!("{base}?ssl_cert_reqs=none")))?;
    worker_refuses(&format!("{base}?ssl_ca_certs={other}"), &queue)?;
    drop(rabbit);
    Ok(())
}

#[test]
fn rediss_with_a_private_ca() -> Result<()> {
    ensure_services();
    let certs = Certs::make()?;
    let redis = TlsRedis::start(&certs)?;
    let ca = certs.path("ca.pem");
    let base = format!("rediss://localhost:{}/0", redis.port);
    // redis-py / kombu read the same query parameters: the Python client uses the very same URL.
    let url = format!("{base}?ssl_cert_reqs=required&ssl_ca_certs={ca}");
    let queue = unique("tls_redis");
    let mut worker = WorkerProcess::consuming(&url, &url, &queue, &[])?;
    ping_through(&url, &url, &[], &queue)?;
    worker.terminate(Duration::from_secs(30))?;

    let rt = tokio::runtime::Runtime::new()?;
    let other = certs.path("other_ca.pem");
    let e = rt.block_on(refused(&base))?;
    eprintln!("rediss without the CA: {e}");
    let e = rt.block_on(refused(&format!(
        "{base}?ssl_cert_reqs=required&ssl_ca_certs={other}"
    )))?;
    eprintln!("rediss with another CA: {e}");
    rt.block_on(refused(&format!("{base}?ssl_cert_reqs=none")))?;
    worker_refuses(&format!("{base}?ssl_ca_certs={other}"), &queue)?;
    Ok(())
}

//! Private broker nodes for fault tests: a RabbitMQ node of the test's own (same Debian package as the
//! machine's, on its own ports and data directory) that can be stopped and restarted without touching
//! the shared broker other tests use at the same time.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, unique};

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A RabbitMQ node of this test (`rabbitmq-server -detached` with its own node name and ports).
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRabbit {
    pub fn start() -> Result<PrivateRabbit> {
        Self::start_with_conf("")
    }

    /// Like [`PrivateRabbit::start`], with more `rabbitmq.conf` lines (e.g. a TLS listener). Files the
    /// node reads must be readable by the `rabbitmq` user.
    pub fn start_with_conf(extra_conf: &str) -> Result<PrivateRabbit> {
        let name = unique("celeriac_rmq");
        let node = format!("{name}@localhost");
        let port = free_port()?;
        let dist = free_port()?;
        // Under the system's temporary directory, not the checkout: the server runs as the rabbitmq
        // user, which cannot reach a checkout inside a private (0700) directory.
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{port}\nloopback_users.guest = true\n{extra_conf}"
            ),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        // The server runs as the rabbitmq user (Debian's wrapper): it must own its directory.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .status()
            .context("starting a private rabbitmq-server")?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed ({status})");
        }
        let rabbit = PrivateRabbit { node, port, dir };
        rabbit.wait_up(Duration::from_secs(60))?;
        Ok(rabbit)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.port)
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn wait_up(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !port_open(self.port) {
            if start.elapsed() > timeout {
                bail!(
                    "private RabbitMQ {} did not open port {}",
                    self.node,
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Stops the broker application (every connection drops) for `down`, then starts it again.
    /// Durable queues and persistent messages survive, as in a real broker restart.
    pub fn restart(&self, down: Duration) -> Result<()> {
        self.ctl(&["stop_app"])?;
        std::thread::sleep(down);
        self.ctl(&["start_app"])?;
        self.wait_up(Duration::from_secs(60))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `rabbitmqctl <args>` against the machine's RabbitMQ node.
pub fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A vhost of one test on the machine's RabbitMQ (guest has every permission); deleted on drop.
/// Broadcasts of the test (remote control, events) reach only the workers in it.
pub struct Vhost(pub String);

impl Vhost {
    pub fn create(prefix: &str) -> Result<Vhost> {
        let name = unique(prefix);
        rabbitmqctl(&["add_vhost", &name])?;
        let v = Vhost(name);
        rabbitmqctl(&["set_permissions", "-p", &v.0, "guest", ".*", ".*", ".*"])?;
        Ok(v)
    }

    /// Turns RabbitMQ's firehose on (every publish and delivery copied to `amq.rabbitmq.trace`).
    pub fn trace_on(&self) -> Result<()> {
        rabbitmqctl(&["trace_on", "-p", &self.0])
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// A RabbitMQ user of one test with every permission on `vhost`; deleted on drop.
pub struct RabbitUser(pub String);

impl RabbitUser {
    pub fn create(prefix: &str, password: &str, vhost: &Vhost) -> Result<RabbitUser> {
        let name = unique(prefix);
        rabbitmqctl(&["add_user", &name, password])?;
        let u = RabbitUser(name);
        rabbitmqctl(&["set_permissions", "-p", &vhost.0, &u.0, ".*", ".*", ".*"])?;
        Ok(u)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.0]);
    }
}

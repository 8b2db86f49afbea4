//! `celeriac-kubelet`: a process kubelet for celeriac's test cluster.
//!
//! The test cluster is a REAL Kubernetes v1.20.2 control plane (etcd, kube-apiserver with RBAC and
//! the Node authorizer, kube-controller-manager, kube-scheduler). What it lacks is a node: there is no
//! container runtime here. This binary is that node. It registers a `Node`, keeps it Ready, and runs
//! every pod the real scheduler binds to it as local processes (argv = `command + args`, the
//! container's `env`/`envFrom` resolved from the API, `workingDir`), reports pod status through the
//! API, honours deletion, and serves `/containerLogs` over HTTPS so the apiserver's own `pods/log`
//! proxy works. It is test support, not part of the product.
//!
//! Where a container runtime would pull an image, the process kubelet maps it: `--image-path
//! PREFIX=DIR` puts `DIR` first on the container's `PATH` for images starting with `PREFIX`; images
//! on the reserved `.invalid` TLD cannot be pulled (`ErrImagePull` → `ImagePullBackOff`). A memory
//! limit is enforced on the container's process group (`OOMKilled`, exit 137).

mod env;
mod log_files;
mod logs;
mod node;
mod pods;
mod probes;
mod volumes;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Parser, Debug)]
#[command(
    name = "celeriac-kubelet",
    about = "Process kubelet for celeriac's test cluster"
)]
struct Args {
    /// kubeconfig with the node's identity (`system:node:<name>` in group `system:nodes`).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Node name to register.
    #[arg(long, default_value = "proc-node")]
    node_name: String,
    /// Port of the kubelet HTTPS endpoint (`/containerLogs`), on 127.0.0.1.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// Where pod logs and working files live.
    #[arg(long)]
    root_dir: PathBuf,
    /// `IMAGE_PREFIX=DIR`: containers of images starting with the prefix get DIR first on PATH (repeatable).
    #[arg(long = "image-path", value_parser = parse_image_path)]
    image_paths: Vec<(String, PathBuf)>,
    /// PATH every container starts from.
    #[arg(long, default_value = "/usr/local/bin:/usr/bin:/bin")]
    base_path: String,
}

fn parse_image_path(s: &str) -> Result<(String, PathBuf), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected IMAGE_PREFIX=DIR, got {s:?}"))?;
    Ok((k.to_string(), PathBuf::from(v)))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    let cluster_url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("building the API client")?;
    std::fs::create_dir_all(&args.root_dir)
        .with_context(|| format!("creating {}", args.root_dir.display()))?;
    let node = Arc::new(node::Node {
        client,
        name: args.node_name,
        port: args.port,
        root_dir: args.root_dir,
        image_paths: args.image_paths,
        base_path: args.base_path,
        cluster_url,
        logs: log_files::LogIndex::default(),
    });
    let server = logs::serve(node.clone()).await?;
    node::register(&node).await?;
    tokio::spawn(node::heartbeat(node.clone()));
    tracing::info!(node = %node.name, logs = %server, "process kubelet ready");
    pods::run(node).await
}

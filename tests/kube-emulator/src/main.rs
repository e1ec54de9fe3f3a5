//! `kube-emulator --addr 127.0.0.1:6443 [--load DIR] [--kubeconfig-out FILE] [--tokens FILE]`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use kube_emulator::{Emulator, Tokens};

/// A JSON-only Kubernetes API-server emulator (plain HTTP).
#[derive(Debug, Parser)]
#[command(name = "kube-emulator", version)]
struct Args {
    /// Address to serve on; port 0 picks a free one (see --kubeconfig-out).
    #[arg(long, env = "KUBE_EMULATOR_ADDR", default_value = "127.0.0.1:6443")]
    addr: SocketAddr,
    /// Apply every YAML manifest under this directory at start, CRDs first.
    #[arg(long, env = "KUBE_EMULATOR_LOAD")]
    load: Vec<PathBuf>,
    /// Write a kubeconfig pointing at the emulator to this file once it is listening.
    #[arg(long, env = "KUBE_EMULATOR_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Static token file (`token,user,uid,"group1,group2"` per line) for bearer tokens.
    #[arg(long, env = "KUBE_EMULATOR_TOKENS")]
    tokens: Option<PathBuf>,
    /// Bearer token to put into the --kubeconfig-out kubeconfig.
    #[arg(long, env = "KUBE_EMULATOR_KUBECONFIG_TOKEN")]
    kubeconfig_token: Option<String>,
    /// Watch events kept for resumes before older ones expire (410).
    #[arg(long, env = "KUBE_EMULATOR_HISTORY", default_value_t = 200_000)]
    history: usize,
    /// Seconds between BOOKMARK events on idle watches.
    #[arg(long, env = "KUBE_EMULATOR_BOOKMARK_SECONDS", default_value_t = 1)]
    bookmark_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Tolerate a provider installed by someone else in-process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mut builder = Emulator::builder()
        .history_limit(args.history)
        .bookmark_interval(std::time::Duration::from_secs(args.bookmark_seconds.max(1)));
    if let Some(path) = &args.tokens {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        builder = builder.tokens(Tokens::parse(&text).map_err(anyhow::Error::msg)?);
    }
    let emulator = builder.start(args.addr).await?;
    for dir in &args.load {
        emulator
            .apply_dir(dir)
            .await
            .with_context(|| format!("loading {}", dir.display()))?;
    }
    if let Some(path) = &args.kubeconfig_out {
        std::fs::write(
            path,
            emulator.kubeconfig_yaml(args.kubeconfig_token.as_deref()),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(url = %emulator.url(), "kube-emulator serving");
    println!("kube-emulator listening on {}", emulator.url());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    emulator.shutdown().await;
    Ok(())
}

//! `reverser-agent` binary: all logic lives in the library (see `reverser_agent::args::Args`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One crypto provider for kube's and tonic's rustls; mixing providers panics at runtime.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reverser_agent::args::Args::parse_and_run().await
}

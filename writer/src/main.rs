//! `reverser-writer` binary: all logic lives in the library (see `reverser_writer::Args`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reverser_writer::Args::parse_and_run().await
}

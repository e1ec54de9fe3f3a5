//! `reverser-writer` binary: all logic lives in the library (see `reverser_writer::Args`).

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(reverser_writer::Args::parse_and_run());
    // A git call stuck on a silent remote past the shutdown grace sits on a blocking thread; dropping the
    // runtime would wait for it. Its changes were not acked, so the agents re-send them: do not wait.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

//! The stop request of both binaries: SIGTERM (what Kubernetes sends) or ctrl-c (SIGINT).

use std::future::Future;

/// Completes when the process is asked to stop. The SIGTERM handler is installed now, not at the first poll, so a
/// SIGTERM that arrives before the future is awaited is not lost; when it cannot be installed, only ctrl-c counts.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_completes_the_signal() {
        let stop = super::signal();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        // A guard against hanging, not a timing assertion: the signal is already delivered.
        tokio::time::timeout(Duration::from_secs(60), stop)
            .await
            .expect("SIGTERM did not complete the shutdown signal");
    }
}

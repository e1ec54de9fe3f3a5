//! A deadline on every fetch and push that holds whatever the remote does.
//!
//! libgit2's socket timeout (`--git-io-timeout-sec`) ends a remote that goes silent, and the progress callbacks
//! end a transfer that runs past `--git-operation-timeout-sec` while progress is reported. Neither ends a remote
//! that keeps the connection alive without progress: a server whose pre-receive hook hangs while it sends
//! keep-alive packets every few seconds (git's `receive.keepAlive`), or one that trickles bytes libgit2 reports
//! nothing for. The network call cannot be interrupted from outside, so the worker stops waiting for it: the git
//! work runs on a blocking thread that marks when a network call starts; once one has run past the operation
//! deadline, the worker abandons that thread (it owns the clone handle it was given), reports the remote as
//! unreachable, and opens the clone afresh for the next attempt. The abandoned thread does nothing more after its
//! network call returns (see [`NetworkWatch::network`]); nothing was acked, so nothing is lost. At most
//! [`MAX_ABANDONED`] abandoned calls per worker may still be running; beyond that the worker waits for them
//! instead of opening more connections to a remote that does not answer.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::{Duration, Instant};

use crate::git::GitError;

/// Abandoned network calls of one worker that may still be running before it stops starting new ones.
pub(super) const MAX_ABANDONED: usize = 2;

/// Shared between one blocking git task and the worker waiting for it.
#[derive(Default)]
pub(super) struct NetworkWatch {
    /// When the network call in progress started; None between calls.
    since: Mutex<Option<Instant>>,
    /// Set by the worker when it stopped waiting: the task must not touch anything after its call returns.
    abandoned: AtomicBool,
    /// Set when the task has ended.
    finished: AtomicBool,
}

impl NetworkWatch {
    /// Runs one network call (fetch or push) under the watch. When the worker abandoned the task meanwhile,
    /// the result is discarded and an error is returned, so the task ends without writing anything more.
    pub(super) fn network<T>(
        &self,
        call: impl FnOnce() -> Result<T, GitError>,
    ) -> Result<T, GitError> {
        *self.since.lock().expect("watch lock") = Some(Instant::now());
        let result = call();
        *self.since.lock().expect("watch lock") = None;
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(GitError::Unreachable(
                "the operation was abandoned at its deadline".into(),
            ));
        }
        result
    }

    /// How long the network call in progress has been running, if one is.
    fn running_for(&self) -> Option<Duration> {
        self.since.lock().expect("watch lock").map(|t| t.elapsed())
    }
}

/// A worker's abandoned tasks, until they end.
#[derive(Clone, Default)]
pub(super) struct Abandoned(Arc<Mutex<Vec<Arc<NetworkWatch>>>>);

impl Abandoned {
    /// How many abandoned tasks have not ended yet.
    pub(super) fn running(&self) -> usize {
        let mut tasks = self.0.lock().expect("abandoned lock");
        tasks.retain(|watch| !watch.finished.load(Ordering::SeqCst));
        tasks.len()
    }

    fn add(&self, watch: Arc<NetworkWatch>) {
        self.0.lock().expect("abandoned lock").push(watch);
    }
}

/// Marks the task as ended when it is dropped with the task's closure (also on a panic).
struct EndGuard(Arc<NetworkWatch>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::SeqCst);
    }
}

/// Runs `task` on the blocking pool and waits for it, unless one of its network calls runs longer than
/// `deadline`: then the task is abandoned (counted in `abandoned` until it ends) and None is returned.
pub(super) async fn run<T: Send + 'static>(
    deadline: Duration,
    abandoned: &Abandoned,
    task: impl FnOnce(&NetworkWatch) -> T + Send + 'static,
) -> Option<T> {
    let watch = Arc::new(NetworkWatch::default());
    let guard = EndGuard(watch.clone());
    let mut handle = tokio::task::spawn_blocking(move || {
        let guard = guard;
        task(&guard.0)
    });
    loop {
        let check = match watch.running_for() {
            Some(elapsed) if elapsed >= deadline => {
                watch.abandoned.store(true, Ordering::SeqCst);
                abandoned.add(watch);
                return None;
            }
            Some(elapsed) => (deadline - elapsed).min(Duration::from_millis(500)),
            None => Duration::from_millis(500),
        };
        tokio::select! {
            joined = &mut handle => return Some(joined.expect("git thread panicked")),
            _ = tokio::time::sleep(check) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_network_call_past_its_deadline_is_abandoned_and_its_result_discarded() {
        let abandoned = Abandoned::default();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (ended, has_ended) = std::sync::mpsc::channel::<Result<(), GitError>>();
        let outcome = run(Duration::from_millis(200), &abandoned, move |watch| {
            let result = watch.network(|| {
                released.recv().ok();
                Ok(())
            });
            ended.send(result).ok();
        })
        .await;
        assert!(outcome.is_none());
        assert_eq!(abandoned.running(), 1);
        release.send(()).unwrap();
        let result = has_ended.recv().unwrap();
        assert!(
            matches!(result, Err(GitError::Unreachable(_))),
            "{result:?}"
        );
        // The task's guard is dropped right after it returns.
        for _ in 0..200 {
            if abandoned.running() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(abandoned.running(), 0);
    }

    #[tokio::test]
    async fn local_work_is_never_abandoned_and_calls_within_the_deadline_return() {
        let abandoned = Abandoned::default();
        let outcome = run(Duration::from_millis(100), &abandoned, |watch| {
            // Slow local work outside any network call does not count.
            std::thread::sleep(Duration::from_millis(300));
            watch.network(|| Ok(7))
        })
        .await;
        assert_eq!(outcome.unwrap().unwrap(), 7);
        assert_eq!(abandoned.running(), 0);
    }
}

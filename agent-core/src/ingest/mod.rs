//! The pure half of ingestion: which watches to run ([`discovery`]: the planner over the discovered types) and
//! what one watch's events mean ([`index`]: snapshot epochs and changes per destination). The I/O half (the
//! discovery requests, the kube watchers, their limits and retries) is `reverser_agent::ingest`, which converts
//! each kube watcher event into a [`WatchEvent`].

pub mod discovery;
pub mod index;

/// One event of a List+Watch, as the index reads it: the shape of kube-runtime's `watcher::Event`, without
/// the dependency (the watch task converts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent<K> {
    /// A (re)list starts; the objects listed follow as [`WatchEvent::InitApply`].
    Init,
    /// One object of the (re)list.
    InitApply(K),
    /// The (re)list is complete.
    InitDone,
    /// An object was added or modified.
    Apply(K),
    /// An object was deleted.
    Delete(K),
}

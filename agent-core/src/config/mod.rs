//! Configuration resolution: from the custom resources (`GitRepoConfig`, `GitDestination`, `WatchRule`,
//! `ClusterWatchRule`) and the namespaces' labels to the [`Selection`] ingestion mirrors, with a Ready condition
//! (or the reason it is not) for every rule and destination. Pure: the `reverser_agent::controller` reads the objects and
//! the Secrets they name, calls [`resolve`] and writes the conditions.
//!
//! - [`resolve`]: the access policy, credentials and encryption checks, and the rules that pass them.
//! - [`selection`]: the result, as discovery planning and the watches read it.

pub mod resolve;
pub mod selection;

pub use selection::Selection;

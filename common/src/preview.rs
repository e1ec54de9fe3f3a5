//! The suspend preview, as both processes know it: the writer plans it for a suspended destination
//! (`writer::reply`), the agent publishes it in the GitDestination's `status.suspendPreview` (`agent_core::events`).
//! The protobuf `SuspendPreview` carries it between them; each side converts at its gRPC edge.

/// What flushing a suspended destination would write now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SuspendPreview {
    pub destination: String,
    /// Files a flush would create, change and delete (totals).
    pub added: u64,
    pub changed: u64,
    pub deleted: u64,
    /// Repository paths of those files, sorted, at most `paths_cap` of each.
    pub added_paths: Vec<String>,
    pub changed_paths: Vec<String>,
    pub deleted_paths: Vec<String>,
    pub paths_cap: u64,
    /// The branch tip the preview was planned against (`""` for a branch that does not exist yet).
    pub base_commit: String,
    /// Messages held (latest per path, one sweep per snapshot scope).
    pub held_messages: u64,
}

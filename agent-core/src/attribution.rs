//! Who made a change: the question the watch index and the CommitRequest handler ask, and the attribution
//! webhook's fact store (`reverser_agent::webhook::FactStore`, admitted requests joined to watch events by content)
//! answers. Ingestion knows only this trait, never the webhook: without a webhook nobody answers and every change
//! is the bot's.

use serde_json::Value;

/// SHA-256 of an object's canonical YAML (see [`crate::canonical::content_hash`]).
pub type ContentHash = [u8; 32];

/// Which object a fact or watch event is about. `resource` is the plural as in the webhook's
/// `request.resource` and the watch's resource; `namespace` is empty for cluster-scoped objects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Self {
            group: group.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{group}/{}/", self.resource)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        f.write_str(&self.name)
    }
}

/// The user a watch event is attributed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributedUser {
    pub name: String,
    pub groups: Vec<String>,
}

/// Names the author of an observed change, or nobody (`None`: the bot authors it). An answer consumes what it
/// matched, so ask once per watch event, also when the event changes no file.
pub trait Attribution: Send + Sync + std::fmt::Debug {
    /// The user whose admitted request made `object` (its sanitized canonical YAML hashing to `hash`) the
    /// object's current state.
    fn author_of_upsert(
        &self,
        key: &ObjectKey,
        object: &Value,
        hash: &ContentHash,
    ) -> Option<AttributedUser>;

    /// The user whose admitted DELETE named the object with this `metadata.uid`.
    fn author_of_delete(&self, key: &ObjectKey, uid: &str) -> Option<String>;
}

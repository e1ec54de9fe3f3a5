//! The `configbutler.ai/v1alpha1` custom resources of the gitops-reverser agent: plain data types (serde +
//! JSON schema), the API the cluster's users write. Nothing here talks to a cluster or a network: this crate
//! must never import a kube client, tonic or hyper (the agent's I/O crate does that; `reverser-agent-core`
//! holds the logic that reads these types).
//!
//! - [`GitRepoConfig`] (namespaced): how to reach a repository, which branches
//!   destinations may write, and who may reference it.
//! - [`GitDestination`] (namespaced): a repository + branch + `baseFolder` that
//!   one destination owns.
//! - [`WatchRule`] (namespaced): selects objects in its own namespace for a
//!   destination.
//! - [`ClusterWatchRule`] (cluster): selects cluster-scoped objects and/or
//!   namespaced objects across namespaces for a destination.
//! - [`CommitRequest`] (namespaced): asks the writer to commit a GitDestination's
//!   pending changes now, with a message, authored by whoever created it.
//!
//! Rules reference a destination, the destination references a repository; a
//! rule must be allowed by both access policies, and cluster rules additionally
//! need `allowClusterRules` on the repository. [`crds`] lists the definitions; `reverser_agent_core::crd::generated_crds`
//! renders the manifests checked in under `crds/` (regenerate with
//! `cargo run -p reverser-agent --bin crdgen`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// API group of all agent resources.
pub const GROUP: &str = "configbutler.ai";
/// API version of all agent resources.
pub const VERSION: &str = "v1alpha1";
/// On a GitDestination: a new value (any string, e.g. `date -Is`) makes the agent relist every type feeding the
/// destination now, so its files are compared with the cluster (and orphans swept) without waiting; the value
/// handled last is in `status.lastHandledReconcileAt` (Flux's `reconcile.fluxcd.io/requestedAt` convention).
pub const RECONCILE_REQUESTED_AT_ANNOTATION: &str = "configbutler.ai/reconcile-requested-at";

/// `baseFolder` syntax: one or more `/`-separated non-empty segments, none of
/// them `.` or `..`, no leading or trailing `/`. RE2-compatible (no
/// look-around), because the API server evaluates CRD patterns with Go's regexp.
pub const BASE_FOLDER_PATTERN: &str =
    r"^(?:[^./][^/]*|\.[^./][^/]*|\.\.[^/]+)(?:/(?:[^./][^/]*|\.[^./][^/]*|\.\.[^/]+))*$";

/// Why a `baseFolder` is rejected; mirrors [`BASE_FOLDER_PATTERN`] for code
/// paths that receive objects without API-server validation (e.g. tests, the
/// emulator).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseFolderError {
    #[error("baseFolder must not be empty")]
    Empty,
    #[error("baseFolder must be relative (no leading '/')")]
    Absolute,
    #[error("baseFolder must not contain empty, '.' or '..' segments: {0:?}")]
    BadSegment(String),
}

/// Checks a `baseFolder` value with the same rules as [`BASE_FOLDER_PATTERN`].
pub fn validate_base_folder(base_folder: &str) -> Result<(), BaseFolderError> {
    if base_folder.is_empty() {
        return Err(BaseFolderError::Empty);
    }
    if base_folder.starts_with('/') {
        return Err(BaseFolderError::Absolute);
    }
    match base_folder
        .split('/')
        .find(|seg| seg.is_empty() || *seg == "." || *seg == "..")
    {
        Some(seg) => Err(BaseFolderError::BadSegment(seg.to_owned())),
        None => Ok(()),
    }
}

/// Reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Reference to an object in an explicit namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct NamespacedName {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub namespace: String,
}

/// Reference to a GitDestination; the namespace defaults to the rule's own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct DestinationRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// Defaults to the namespace of the referencing WatchRule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Which namespaces may hold rules that reference this object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NamespacedRulesMode {
    /// Only rules in the object's own namespace.
    #[default]
    SameNamespace,
    /// Rules in any namespace.
    AllNamespaces,
    /// Rules in namespaces matching `namespaceSelector`.
    FromSelector,
}

/// Access for namespaced rules (WatchRules).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "self.mode == 'FromSelector' ? has(self.namespaceSelector) : !has(self.namespaceSelector)"
).message("namespaceSelector is required when mode is FromSelector and must be unset otherwise"))]
pub struct NamespacedRulesPolicy {
    #[serde(default)]
    pub mode: NamespacedRulesMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Who may reference a repository or destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaced_rules: Option<NamespacedRulesPolicy>,
    /// Explicit opt-in for ClusterWatchRules.
    #[serde(default)]
    pub allow_cluster_rules: bool,
}

/// Status shared by all agent resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// `Ready`, `AccessDenied`, `OwnershipConflict`, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// GitDestination only: the last `configbutler.ai/reconcile-requested-at` value handed to ingestion (its
    /// watches relisted for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// GitDestination only, while `spec.suspend` is true: what the writer would write if it were resumed now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_preview: Option<SuspendPreview>,
}

/// What a suspended GitDestination's next flush would write (planned by the writer against the branch tip).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuspendPreview {
    /// Files the flush would create.
    pub added: u64,
    /// Files the flush would change.
    pub changed: u64,
    /// Files the flush would delete (deleted objects, and orphans of snapshot sweeps within the delete cap).
    pub deleted: u64,
    /// Repository paths of the files to create, sorted; at most `pathsCap` (`added` is the total).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added_paths: Vec<String>,
    /// Repository paths of the files to change, sorted; at most `pathsCap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_paths: Vec<String>,
    /// Repository paths of the files to delete, sorted; at most `pathsCap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_paths: Vec<String>,
    /// How many paths of each kind the lists hold at most.
    pub paths_cap: u64,
    /// The branch tip the preview was planned against (empty when the branch does not exist yet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_commit: String,
    /// When the agent received it (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub computed_at: String,
}

/// Repository connectivity, branch allowlist and access boundary.
// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "configbutler.ai",
    version = "v1alpha1",
    kind = "GitRepoConfig",
    namespaced,
    status = "ResourceStatus",
    shortname = "grc",
    category = "configbutler",
    doc = "Connection to a Git repository: URL, credentials, branches destinations may write, and who may reference it.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.repoUrl"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GitRepoConfigSpec {
    /// HTTPS or SSH URL of the repository.
    #[schemars(length(min = 1))]
    pub repo_url: String,
    /// Branches that GitDestinations may target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_branches: Vec<String>,
    /// Secret with HTTPS or SSH credentials, in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_policy: Option<AccessPolicy>,
}

/// A branch and base folder in a repository, owned by one destination.
// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "configbutler.ai",
    version = "v1alpha1",
    kind = "GitDestination",
    namespaced,
    status = "ResourceStatus",
    shortname = "gdest",
    category = "configbutler",
    doc = "Writable target: a GitRepoConfig branch and the base folder this destination owns in it.",
    printcolumn(name = "Repo", type_ = "string", json_path = ".spec.repoRef.name"),
    printcolumn(name = "Branch", type_ = "string", json_path = ".spec.branch"),
    printcolumn(name = "BaseFolder", type_ = "string", json_path = ".spec.baseFolder"),
    printcolumn(
        name = "Prune",
        type_ = "string",
        json_path = ".spec.prune",
        priority = "1"
    ),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GitDestinationSpec {
    /// The GitRepoConfig to write to.
    pub repo_ref: NamespacedName,
    /// Must be listed in the GitRepoConfig's allowedBranches.
    #[schemars(length(min = 1))]
    pub branch: String,
    /// Folder owned by this destination, relative to the repository root, e.g.
    /// `clusters/prod`. No leading `/`, no `.` or `..` segments.
    #[schemars(length(min = 1), pattern(BASE_FOLDER_PATTERN))]
    pub base_folder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_policy: Option<AccessPolicy>,
    /// Refuse to write when `{baseFolder}/.configbutler/owner.yaml` names another owner.
    #[serde(default)]
    pub exclusive_mode: bool,
    /// Encrypt sensitive objects (Secrets, and the agent's `--sensitive-resources`) with SOPS + age before
    /// they leave the cluster. Without it, rules selecting Secrets skip them: Secrets never reach Git in
    /// plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    /// Which files the writer deletes: `OnSnapshot` (default) deletes the file of a deleted object and, after
    /// every complete List, the files of objects that no longer exist (orphans, e.g. deleted while no agent
    /// watched); `OnDelete` only deletes the files of deletions the agent sees; `Never` deletes nothing.
    #[serde(default)]
    pub prune: PruneMode,
    /// How the writer words this destination's commits (default: its built-in messages). The writer appends its
    /// `X-ConfigButler-*` trailers in every case and refuses a template with an unknown field or a stray brace:
    /// nothing is written for the destination and its status shows the reason (condition `Rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_message: Option<CommitMessageSpec>,
    /// Observe and plan everything but push nothing: the writer holds this destination's changes and the
    /// agent publishes what a flush would write in `status.suspendPreview` (condition `Suspended`). Setting it
    /// back to false writes exactly that (plus whatever changed since) in one flush.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Keep kustomize's kustomization files in line with the mirrored files (default: off). See the README's
    /// "Kustomize".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kustomization: Option<KustomizationSpec>,
    /// Write objects without `metadata.namespace`, so that the folder installs into a namespace chosen at deploy
    /// time (kustomize `namespace:`, Flux `targetNamespace`, `kubectl apply -n`). Paths keep their namespace
    /// folder. An object whose kind and name another namespace of this destination already has is not written
    /// (the writer refuses it with `NamespaceClash`): in one namespace they would be one object.
    #[serde(default)]
    pub omit_namespace: bool,
}

/// How the writer keeps kustomizations (`kustomization.yaml`, `kustomization.yml` or `Kustomization`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KustomizationSpec {
    #[serde(default)]
    pub mode: KustomizationMode,
}

/// Whether the writer lists the files it adds in kustomizations.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KustomizationMode {
    /// Kustomizations are neither read nor written.
    #[default]
    Off,
    /// Every mirrored file is listed in the `resources:` of the nearest kustomization at or above its folder
    /// inside the base folder, and unlisted when the writer removes it; a nested kustomization's folder is
    /// listed in the one above it. Existing kustomizations are edited in place (comments, order and other
    /// entries stay); files with no kustomization above them stay unlisted.
    Maintain,
    /// `Maintain`, and `{baseFolder}/kustomization.yaml` is created when a file has no kustomization above it.
    Create,
}

/// Which files the writer deletes for a destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PruneMode {
    /// Watched deletions and complete snapshots (orphans) delete files.
    #[default]
    OnSnapshot,
    /// Only watched deletions (an object deleted, or no longer selected) delete files.
    OnDelete,
    /// The writer never deletes a file of this destination.
    Never,
}

/// A commit message template: `{field}` placeholders (`{{`, `}}` for literal braces) among operation, kind,
/// resource, group, version, namespace, name, author, count, folder, summary and objects (body only). In a commit
/// of several objects a field whose values differ reads `various` (`operation`: `sync`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitMessageSpec {
    /// One line, e.g. `{operation}({kind}): {namespace}/{name}`.
    #[schemars(length(min = 1, max = 256))]
    pub subject: String,
    /// Lines after a blank line, e.g. `{objects}`; none when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub body: String,
}

/// How a destination encrypts sensitive objects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// SOPS with age: the files are `{name}.sops.yaml`, readable by `sops --decrypt` and Flux's
    /// kustomize-controller (`decryption.provider: sops`) with any matching age identity.
    pub age: AgeEncryption,
}

/// age recipients (X25519 public keys, `age1…`), inline and/or from a Secret; all of them are used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgeEncryption {
    /// Public keys, e.g. `age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// A Secret in the GitDestination's namespace whose value(s) list public keys, one per line or
    /// comma-separated (`#` starts a comment). Re-read periodically: a changed list re-encrypts every file once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_secret_ref: Option<SecretKeyReference>,
}

/// A key of a Secret in the referencing object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key holding the recipients; every key of the Secret when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Kind of change a rule applies to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum OperationType {
    #[serde(rename = "CREATE")]
    Create,
    #[serde(rename = "UPDATE")]
    Update,
    #[serde(rename = "DELETE")]
    Delete,
    #[serde(rename = "*")]
    All,
}

/// Selection by operation and resource type, as in admission webhook rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRule {
    /// Empty means all operations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<OperationType>,
    /// `""` is the core group, `*` all groups; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    /// `*` means all versions; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_versions: Vec<String>,
    /// Plural resource names (`deployments`), `*`, or `resource.group`. Empty
    /// means the desired-state preset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

/// Selects objects in the rule's own namespace for a destination.
// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "configbutler.ai",
    version = "v1alpha1",
    kind = "WatchRule",
    namespaced,
    status = "ResourceStatus",
    shortname = "wr",
    category = "configbutler",
    doc = "Mirrors selected objects of this namespace into a GitDestination.",
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destinationRef.name"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WatchRuleSpec {
    pub destination_ref: DestinationRef,
    /// Only objects whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_selector: Option<LabelSelector>,
    #[schemars(length(min = 1))]
    pub rules: Vec<ResourceRule>,
    /// Objects whose `metadata.name` matches one of these patterns are not mirrored: `*` matches any
    /// run of characters, `?` one character, anything else itself (e.g. `*-lock`, `sh.helm.release.v1.*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub exclude_names: Vec<String>,
    /// Changes this rule does not mirror, by who made them (Flux's, Argo CD's or Helm's own writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<IgnoreSpec>,
}

/// Writers whose changes a rule does not mirror. A change is skipped when the field managers that
/// wrote it (from `metadata.managedFields`) are all listed here, or when the admission webhook saw it
/// made by a listed user, group or ServiceAccount. The file still follows the live object: the next
/// change made by anyone else writes the whole object as it is then. Deletes are always mirrored.
/// See the README's "Ignoring writers" for the exact rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreSpec {
    /// Named sets of field managers: `Flux` (`kustomize-controller`, `helm-controller`), `ArgoCD`
    /// (`argocd-controller`), `Helm` (`helm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub presets: Vec<String>,
    /// Field manager names as in `metadata.managedFields[].manager`, e.g. `kustomize-controller`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub field_managers: Vec<String>,
    /// Usernames as the API server authenticated them (needs the attribution webhook).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub users: Vec<String>,
    /// Groups of the user who made a change (needs the attribution webhook).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub groups: Vec<String>,
    /// ServiceAccounts (user `system:serviceaccount:{namespace}:{name}`; needs the attribution webhook).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<NamespacedName>,
}

/// Whether a cluster rule selects cluster-scoped or namespaced resources.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ResourceScope {
    Cluster,
    Namespaced,
}

/// A ResourceRule with a scope and, for namespaced resources, a namespace selector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "self.scope == 'Namespaced' || !has(self.namespaceSelector)"
).message("namespaceSelector is only valid when scope is Namespaced"))]
pub struct ClusterResourceRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<OperationType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_versions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    pub scope: ResourceScope,
    /// Namespaces (by their labels) whose objects are selected; all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Selects cluster-scoped objects and namespaced objects across namespaces.
// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "configbutler.ai",
    version = "v1alpha1",
    kind = "ClusterWatchRule",
    status = "ResourceStatus",
    shortname = "cwr",
    category = "configbutler",
    doc = "Mirrors selected cluster-scoped objects, and namespaced objects across namespaces, into a GitDestination.",
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destinationRef.name"
    ),
    printcolumn(
        name = "DestinationNamespace",
        type_ = "string",
        json_path = ".spec.destinationRef.namespace"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterWatchRuleSpec {
    /// Cluster rules have no namespace of their own, so it is explicit here.
    pub destination_ref: NamespacedName,
    /// Only objects whose labels match (cluster-scoped and namespaced alike; `namespaceSelector` of a rule
    /// filters by the namespace's labels on top).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_selector: Option<LabelSelector>,
    #[schemars(length(min = 1))]
    pub rules: Vec<ClusterResourceRule>,
    /// Objects whose `metadata.name` matches one of these patterns are not mirrored: `*` matches any
    /// run of characters, `?` one character, anything else itself (e.g. `*-lock`, `sh.helm.release.v1.*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub exclude_names: Vec<String>,
    /// Changes this rule does not mirror, by who made them (Flux's, Argo CD's or Helm's own writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<IgnoreSpec>,
}

/// Asks the writer to commit what is pending for a GitDestination of this namespace now (instead of after the
/// batch window), with an optional message. Handled once; the spec cannot change after creation.
// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "configbutler.ai",
    version = "v1alpha1",
    kind = "CommitRequest",
    namespaced,
    status = "CommitRequestStatus",
    shortname = "creq",
    category = "configbutler",
    doc = "Commit a GitDestination's pending changes now, with this message, authored by the requester.",
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destinationRef.name"
    ),
    printcolumn(
        name = "Completed",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Completed")].status"#
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Completed")].reason"#
    ),
    printcolumn(name = "Commit", type_ = "string", json_path = ".status.commitSHA"),
    printcolumn(
        name = "Author",
        type_ = "string",
        json_path = ".status.author",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("spec is immutable: create another CommitRequest"))]
#[serde(rename_all = "camelCase")]
pub struct CommitRequestSpec {
    /// The GitDestination (in this namespace) whose pending changes to commit.
    pub destination_ref: LocalObjectReference,
    /// Commit message: the first line is the subject (one line, at most 200 characters), then an empty line and
    /// the body. At most 8 KiB, no NUL or other control characters but line breaks and tabs, and no
    /// `X-ConfigButler-` trailer lines (the writer appends its own). Empty: the destination's usual message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub message: Option<String>,
}

/// What became of a CommitRequest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitRequestStatus {
    /// `Completed`: `Unknown` (reason `Pending`) while the writer works on it, `True` (`Committed`,
    /// `NothingPending`) once a pushed commit holds the changes, `False` when it failed (the reason says why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The pushed commit that holds every change the agent had sent for the destination up to the request: the
    /// request's own commit (`Committed`), or the branch tip that already held them (`NothingPending`).
    #[serde(default, rename = "commitSHA", skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// The branch that commit is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Who the commit is authored by: the Kubernetes user the admission webhook saw create this request. Unset:
    /// no attribution was available and the writer's bot identity authored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Every CustomResourceDefinition of the group, in declaration order (rendered to `crds/` by
/// `reverser_agent_core::crd::generated_crds`).
pub fn crds() -> [CustomResourceDefinition; 5] {
    [
        GitRepoConfig::crd(),
        GitDestination::crd(),
        WatchRule::crd(),
        ClusterWatchRule::crd(),
        CommitRequest::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn resources_use_configbutler_group_and_expected_scope() {
        assert_eq!(GitRepoConfig::group(&()), GROUP);
        assert_eq!(WatchRule::version(&()), VERSION);
        assert_eq!(GitRepoConfig::crd().spec.scope, "Namespaced");
        assert_eq!(GitDestination::crd().spec.scope, "Namespaced");
        assert_eq!(WatchRule::crd().spec.scope, "Namespaced");
        assert_eq!(ClusterWatchRule::crd().spec.scope, "Cluster");
    }

    #[test]
    fn every_crd_has_status_subresource_and_printer_columns() {
        for crd in [
            GitRepoConfig::crd(),
            GitDestination::crd(),
            WatchRule::crd(),
            ClusterWatchRule::crd(),
        ] {
            let version = &crd.spec.versions[0];
            assert!(
                version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{} lacks status subresource",
                crd.spec.names.kind
            );
            let columns = version
                .additional_printer_columns
                .as_ref()
                .expect("columns");
            assert!(columns.iter().any(|c| c.name == "Ready"));
            assert!(columns.iter().any(|c| c.name == "Age"));
            assert!(
                crd.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| !s.is_empty())
            );
        }
    }

    #[test]
    fn parses_the_seed_gitrepoconfig_example() {
        let obj: GitRepoConfig = serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "GitRepoConfig",
            "metadata": {"name": "repo", "namespace": "configbutler-system"},
            "spec": {
                "repoUrl": "https://git.example.com/infra/configs.git",
                "allowedBranches": ["main", "staging"],
                "secretRef": {"name": "repo-cred"},
                "accessPolicy": {"namespacedRules": {"mode": "SameNamespace"}, "allowClusterRules": true}
            }
        }))
        .unwrap();
        let policy = obj.spec.access_policy.unwrap();
        assert!(policy.allow_cluster_rules);
        assert_eq!(
            policy.namespaced_rules.unwrap().mode,
            NamespacedRulesMode::SameNamespace
        );
    }

    #[test]
    fn defaults_access_mode_to_same_namespace_and_flags_to_false() {
        let spec: GitDestinationSpec = serde_json::from_value(json!({
            "repoRef": {"name": "repo", "namespace": "configbutler-system"},
            "branch": "main", "baseFolder": "clusters/prod",
            "accessPolicy": {"namespacedRules": {}}
        }))
        .unwrap();
        assert!(!spec.exclusive_mode);
        let policy = spec.access_policy.unwrap();
        assert!(!policy.allow_cluster_rules);
        assert_eq!(
            policy.namespaced_rules.unwrap().mode,
            NamespacedRulesMode::SameNamespace
        );
    }

    #[test]
    fn parses_wildcard_operations() {
        let rule: ResourceRule = serde_json::from_value(json!({
            "operations": ["CREATE", "*"], "resources": ["pods/*"]
        }))
        .unwrap();
        assert_eq!(
            rule.operations,
            vec![OperationType::Create, OperationType::All]
        );
    }

    #[test]
    fn base_folder_schema_carries_pattern_and_min_length() {
        let crd = serde_json::to_value(GitDestination::crd()).unwrap();
        let base_folder = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["baseFolder"];
        assert_eq!(base_folder["pattern"], BASE_FOLDER_PATTERN);
        assert_eq!(base_folder["minLength"], 1);
        let required = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["required"];
        for field in ["repoRef", "branch", "baseFolder"] {
            assert!(
                required.as_array().unwrap().contains(&json!(field)),
                "{field}"
            );
        }
    }

    /// Shared by the Rust validator test and the pattern test.
    pub(crate) const BASE_FOLDER_CASES: &[(&str, bool)] = &[
        ("clusters/prod", true),
        ("prod", true),
        (".hidden/x", true),
        ("a/..b", true),
        ("a/b..", true),
        ("...", true),
        ("", false),
        ("/abs", false),
        ("a/", false),
        ("a//b", false),
        ("..", false),
        ("../x", false),
        ("a/../b", false),
        ("a/..", false),
        (".", false),
        ("./a", false),
        ("a/./b", false),
    ];

    #[test]
    fn validates_base_folder_as_relative_without_dot_segments() {
        for (input, ok) in BASE_FOLDER_CASES {
            assert_eq!(validate_base_folder(input).is_ok(), *ok, "{input:?}");
        }
    }

    /// Go's RE2 and Python's `re` agree on this look-around-free pattern, so
    /// PyYAML's python3 doubles as the regex engine here.
    #[test]
    fn base_folder_pattern_agrees_with_validator() {
        let cases: Vec<(&str, bool)> = BASE_FOLDER_CASES.to_vec();
        let script = "import json, re, sys\n\
            pat, cases = json.load(sys.stdin)\n\
            print(json.dumps([re.fullmatch(pat, c) is not None for c, _ in cases]))\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 is required for the pattern test");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&(BASE_FOLDER_PATTERN, &cases)).unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let matched: Vec<bool> = serde_json::from_slice(&out.stdout).unwrap();
        for ((input, ok), m) in cases.iter().zip(matched) {
            assert_eq!(m, *ok, "pattern on {input:?}");
        }
    }
}

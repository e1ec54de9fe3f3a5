//! From the custom resources to a [`Selection`], enforcing the access policy. Pure.
//!
//! ```text
//! GitRepoConfig ◀─repoRef── GitDestination ◀─destinationRef── WatchRule / ClusterWatchRule
//!  allowedBranches            accessPolicy                      (namespace, rules)
//!  accessPolicy               baseFolder
//!  allowClusterRules
//! ```
//!
//! A destination is usable when its repository exists, its branch is in the repository's
//! `allowedBranches`, its `baseFolder` is valid and the repository's access policy admits the
//! destination's namespace. A `WatchRule` is admitted when its destination is usable and both
//! the destination's and the repository's `namespacedRules` policy admit the rule's namespace;
//! a `ClusterWatchRule` needs a usable destination and `allowClusterRules` on the repository.
//! Every rule and destination gets a condition (Ready or the reason it is not); only admitted
//! rules and the destinations they use reach the [`Selection`].
//!
//! Everything fails closed: an unknown namespace, an invalid label selector or an empty
//! `allowedBranches` admits nothing.

// `reverser_agent::controller` runs `resolve` on every change of the custom resources and writes the
// conditions ([`crate::conditions`]) to each object's `/status`.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;

use super::Selection;
use crate::crd::IgnoreSpec;
use crate::crd::{
    AccessPolicy, ClusterWatchRule, GitDestination, GitRepoConfig, NamespacedRulesMode, WatchRule,
    validate_base_folder,
};
use crate::credentials::GitCredentials;
use crate::events::DestinationDecl;
use crate::ignore::Ignore;
use crate::rules::compiled::{CompiledRule, NamespaceLabels, RuleKind};
use crate::rules::{
    ResourceKey, cluster_resource_rule_selects, label_selector_matches, resource_rule_selects,
    validate_name_patterns,
};
use crate::sops::Encryption;
use reverser_common::reasons::AgentConditionReason as Reason;

/// The `Ready` condition to write to an object's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyCondition {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
}

impl ReadyCondition {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason: Reason::Ready,
            message: message.into(),
        }
    }

    fn not(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// The custom resources and namespaces as listed.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub repos: &'a [GitRepoConfig],
    pub destinations: &'a [GitDestination],
    pub watch_rules: &'a [WatchRule],
    pub cluster_watch_rules: &'a [ClusterWatchRule],
    pub namespaces: &'a NamespaceLabels,
}

/// The resolved selection plus a condition per object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    pub selection: Selection,
    /// Keyed `WatchRule/{ns}/{name}` and `ClusterWatchRule/{name}`.
    pub rule_conditions: BTreeMap<String, ReadyCondition>,
    /// Keyed `{ns}/{name}`.
    pub destination_conditions: BTreeMap<String, ReadyCondition>,
    /// Rules (keyed like `rule_conditions`) whose selection includes Secrets, explicitly or
    /// through the desired-state preset, admitted or not: Secrets are never mirrored until
    /// encrypted output exists, and these rules say so in a condition.
    pub rules_selecting_secrets: BTreeSet<String>,
    /// Rules selecting Secrets whose destination does not encrypt: (reason, message) of their
    /// `SecretsSkipped` condition. Such a destination is never sent a Secret.
    pub secrets_skipped: BTreeMap<String, (Reason, String)>,
}

/// The controller's lookup of a destination's `spec.encryption` (recipients from the spec and the
/// referenced Secret, plus the fingerprint key), keyed `{ns}/{name}`. Destinations without
/// `spec.encryption` have no entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncryptionLookup {
    Ready(Encryption),
    /// Configured but unusable: the condition reason (`InvalidRecipients`, `RecipientsSecretNotFound`, …)
    /// and a message that names the problem without echoing any value.
    Failed {
        reason: Reason,
        message: String,
    },
}

/// The controller's reading of a GitRepoConfig's `spec.secretRef`, keyed `{ns}/{name}` of the GitRepoConfig.
/// GitRepoConfigs without `secretRef` have no entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialsLookup {
    Ready(GitCredentials),
    /// Unusable: the reason and a message naming the Secret and keys, never a value.
    Failed {
        reason: Reason,
        message: String,
    },
}

/// The core `secrets` type, as rules match it.
/// A rule whose `ignore` is invalid is not admitted (it would mirror what its author meant to skip).
fn ignore_problem(ignore: Option<&IgnoreSpec>) -> Option<ReadyCondition> {
    let error = Ignore::compile(ignore?).err()?;
    Some(ReadyCondition::not(
        Reason::InvalidIgnore,
        error.to_string(),
    ))
}

/// A rule whose `excludeNames` is invalid is not admitted either.
fn exclude_names_problem(patterns: &[String]) -> Option<ReadyCondition> {
    let error = validate_name_patterns(patterns).err()?;
    Some(ReadyCondition::not(
        Reason::InvalidExcludeNames,
        error.to_string(),
    ))
}

fn secrets_type() -> ResourceKey {
    ResourceKey::new("", "v1", "secrets", true)
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Whether `policy` (of an object in `owner_ns`) admits a namespaced referrer in `from_ns`.
/// No policy means `SameNamespace`.
fn admits_namespace(
    policy: Option<&AccessPolicy>,
    owner_ns: &str,
    from_ns: &str,
    namespaces: &NamespaceLabels,
) -> bool {
    let rules = policy.and_then(|p| p.namespaced_rules.as_ref());
    match rules.map(|r| r.mode).unwrap_or_default() {
        NamespacedRulesMode::SameNamespace => owner_ns == from_ns,
        NamespacedRulesMode::AllNamespaces => true,
        NamespacedRulesMode::FromSelector => {
            let selector = rules.and_then(|r| r.namespace_selector.as_ref());
            match (selector, namespaces.get(from_ns)) {
                (Some(selector), Some(labels)) => {
                    label_selector_matches(selector, labels).unwrap_or(false)
                }
                _ => false,
            }
        }
    }
}

struct UsableDestination<'a> {
    decl: DestinationDecl,
    ns: String,
    dest: &'a GitDestination,
    repo: &'a GitRepoConfig,
}

/// Resolves the custom resources into a selection and conditions, with no destination encrypting.
pub fn resolve(inputs: Inputs<'_>) -> Resolution {
    resolve_with_encryption(inputs, &BTreeMap::new())
}

/// Resolves the custom resources into a selection and conditions; `encryption` says which destinations
/// encrypt sensitive objects (only those are ever sent Secrets).
pub fn resolve_with_encryption(
    inputs: Inputs<'_>,
    encryption: &BTreeMap<String, EncryptionLookup>,
) -> Resolution {
    resolve_with_lookups(inputs, encryption, &BTreeMap::new())
}

/// Resolves with the controller's lookups: `encryption` per destination and `credentials` per GitRepoConfig
/// with a `secretRef`. A destination whose repository's credentials are not usable is not ready and not
/// declared, so nothing is sent for it.
///
/// Phases: the destinations (each usable or the reason it is not), the rules (each admitted or the reason it
/// is not), the destinations declared (those an admitted rule writes to), and why rules selecting Secrets skip
/// them.
pub fn resolve_with_lookups(
    inputs: Inputs<'_>,
    encryption: &BTreeMap<String, EncryptionLookup>,
    credentials: &BTreeMap<String, CredentialsLookup>,
) -> Resolution {
    let (usable, destination_conditions) = resolve_destinations(inputs, encryption, credentials);
    let admitted = admit_rules(inputs, &usable, &destination_conditions);
    let (destinations, reconcile_requests) = declared_destinations(&usable, &admitted.rules);
    let secrets_skipped = secrets_skipped(inputs, encryption, &admitted.selecting_secrets);
    Resolution {
        selection: Selection {
            destinations,
            rules: admitted.rules,
            namespace_labels: inputs.namespaces.clone(),
            reconcile_requests,
        },
        rule_conditions: admitted.conditions,
        destination_conditions,
        rules_selecting_secrets: admitted.selecting_secrets,
        secrets_skipped,
    }
}

/// Every destination's condition, and the usable ones (keyed `{ns}/{name}`) with their declaration.
fn resolve_destinations<'a>(
    inputs: Inputs<'a>,
    encryption: &BTreeMap<String, EncryptionLookup>,
    credentials: &BTreeMap<String, CredentialsLookup>,
) -> (
    BTreeMap<String, UsableDestination<'a>>,
    BTreeMap<String, ReadyCondition>,
) {
    let mut usable = BTreeMap::new();
    let mut conditions = BTreeMap::new();
    for dest in inputs.destinations {
        let ns = dest.namespace().unwrap_or_default();
        let dest_key = key(&ns, &dest.name_any());
        let repo_ref = &dest.spec.repo_ref;
        let repo = inputs.repos.iter().find(|r| {
            r.namespace().as_deref() == Some(repo_ref.namespace.as_str())
                && r.name_any() == repo_ref.name
        });
        let condition = destination_condition(dest, &ns, repo, inputs.namespaces, credentials);
        if let (true, Some(repo)) = (condition.ready, repo) {
            usable.insert(
                dest_key.clone(),
                UsableDestination {
                    decl: destination_decl(dest, &dest_key, repo, encryption, credentials),
                    ns: ns.clone(),
                    dest,
                    repo,
                },
            );
        }
        conditions.insert(dest_key, condition);
    }
    (usable, conditions)
}

/// Whether a destination (in namespace `ns`) is usable: its repository exists, allows its branch and admits
/// its namespace, its base folder is valid and the repository's credentials are read and usable.
fn destination_condition(
    dest: &GitDestination,
    ns: &str,
    repo: Option<&GitRepoConfig>,
    namespaces: &NamespaceLabels,
    credentials: &BTreeMap<String, CredentialsLookup>,
) -> ReadyCondition {
    let repo_ref = &dest.spec.repo_ref;
    let repo_key = key(&repo_ref.namespace, &repo_ref.name);
    match repo {
        None => ReadyCondition::not(
            Reason::RepoNotFound,
            format!("GitRepoConfig {repo_key} not found"),
        ),
        Some(repo) if !repo.spec.allowed_branches.contains(&dest.spec.branch) => {
            ReadyCondition::not(
                Reason::BranchNotAllowed,
                format!(
                    "branch {:?} is not in allowedBranches of GitRepoConfig {repo_key}",
                    dest.spec.branch,
                ),
            )
        }
        Some(repo)
            if !admits_namespace(
                repo.spec.access_policy.as_ref(),
                &repo_ref.namespace,
                ns,
                namespaces,
            ) =>
        {
            ReadyCondition::not(
                Reason::AccessDenied,
                format!("GitRepoConfig {repo_key} does not admit destinations from namespace {ns}"),
            )
        }
        Some(repo) => match validate_base_folder(&dest.spec.base_folder) {
            Err(e) => ReadyCondition::not(Reason::InvalidBaseFolder, e.to_string()),
            Ok(()) => match (&repo.spec.secret_ref, credentials.get(&repo_key)) {
                (Some(_), Some(CredentialsLookup::Failed { reason, message })) => {
                    ReadyCondition::not(*reason, format!("GitRepoConfig {repo_key}: {message}"))
                }
                (Some(secret), None) => ReadyCondition::not(
                    Reason::CredentialsSecretNotFound,
                    format!(
                        "GitRepoConfig {repo_key}: Secret {} is not read yet",
                        secret.name
                    ),
                ),
                _ => ReadyCondition::ok("destination resolved"),
            },
        },
    }
}

/// What the writer is told about a usable destination: repository, branch, folder, the credentials read
/// from the repository's `secretRef` and the encryption of its `spec.encryption`, when they are ready.
fn destination_decl(
    dest: &GitDestination,
    dest_key: &str,
    repo: &GitRepoConfig,
    encryption: &BTreeMap<String, EncryptionLookup>,
    credentials: &BTreeMap<String, CredentialsLookup>,
) -> DestinationDecl {
    let repo_ref = &dest.spec.repo_ref;
    let repo_key = key(&repo_ref.namespace, &repo_ref.name);
    DestinationDecl {
        key: dest_key.to_owned(),
        repo_url: repo.spec.repo_url.clone(),
        branch: dest.spec.branch.clone(),
        base_folder: dest.spec.base_folder.clone(),
        exclusive_mode: dest.spec.exclusive_mode,
        prune: dest.spec.prune,
        // `secretRef` names a Kubernetes Secret, read by the controller (`credentials`).
        credentials_reference: None,
        credentials: match credentials.get(&repo_key) {
            Some(CredentialsLookup::Ready(c)) if repo.spec.secret_ref.is_some() => {
                Some(Box::new(c.clone()))
            }
            _ => None,
        },
        encryption: match encryption.get(dest_key) {
            Some(EncryptionLookup::Ready(e)) if dest.spec.encryption.is_some() => Some(e.clone()),
            _ => None,
        },
        commit_message: dest.spec.commit_message.clone(),
        suspend: dest.spec.suspend,
        placement: crate::events::Placement {
            kustomization: dest
                .spec
                .kustomization
                .as_ref()
                .map(|k| k.mode)
                .unwrap_or_default(),
            omit_namespace: dest.spec.omit_namespace,
        },
    }
}

/// The rules that passed the checks, and a condition for every rule.
struct AdmittedRules {
    /// `WatchRule`s first, then `ClusterWatchRule`s, each in input order.
    rules: Vec<CompiledRule>,
    conditions: BTreeMap<String, ReadyCondition>,
    /// Rules selecting Secrets, admitted or not.
    selecting_secrets: BTreeSet<String>,
}

/// Checks every rule: its own settings (`ignore`, `excludeNames`), its destination, and the access policies.
fn admit_rules(
    inputs: Inputs<'_>,
    usable: &BTreeMap<String, UsableDestination<'_>>,
    destination_conditions: &BTreeMap<String, ReadyCondition>,
) -> AdmittedRules {
    let mut admitted = AdmittedRules {
        rules: Vec::new(),
        conditions: BTreeMap::new(),
        selecting_secrets: BTreeSet::new(),
    };
    for rule in inputs.watch_rules {
        let ns = rule.namespace().unwrap_or_default();
        let id = format!("WatchRule/{ns}/{}", rule.name_any());
        let dest_key = watch_rule_destination(rule, &ns);
        if rule
            .spec
            .rules
            .iter()
            .any(|r| resource_rule_selects(r, &secrets_type()))
        {
            admitted.selecting_secrets.insert(id.clone());
        }
        let condition = ignore_problem(rule.spec.ignore.as_ref())
            .or_else(|| exclude_names_problem(&rule.spec.exclude_names))
            .or_else(|| unusable_destination(&dest_key, usable, destination_conditions))
            .unwrap_or_else(|| {
                namespaced_rule_access(&usable[&dest_key], &dest_key, &ns, inputs.namespaces)
            });
        if condition.ready {
            admitted.rules.push(CompiledRule {
                id: id.clone(),
                destination: dest_key,
                kind: RuleKind::Namespaced {
                    namespace: ns,
                    spec: rule.spec.clone(),
                },
            });
        }
        admitted.conditions.insert(id, condition);
    }
    for rule in inputs.cluster_watch_rules {
        let id = format!("ClusterWatchRule/{}", rule.name_any());
        let dest_ref = &rule.spec.destination_ref;
        let dest_key = key(&dest_ref.namespace, &dest_ref.name);
        if rule
            .spec
            .rules
            .iter()
            .any(|r| cluster_resource_rule_selects(r, &secrets_type()))
        {
            admitted.selecting_secrets.insert(id.clone());
        }
        let condition = ignore_problem(rule.spec.ignore.as_ref())
            .or_else(|| exclude_names_problem(&rule.spec.exclude_names))
            .or_else(|| unusable_destination(&dest_key, usable, destination_conditions))
            .unwrap_or_else(|| cluster_rule_access(&usable[&dest_key], &dest_key));
        if condition.ready {
            admitted.rules.push(CompiledRule {
                id: id.clone(),
                destination: dest_key,
                kind: RuleKind::Cluster {
                    spec: rule.spec.clone(),
                },
            });
        }
        admitted.conditions.insert(id, condition);
    }
    admitted
}

/// `{ns}/{name}` of a `WatchRule`'s destination (its own namespace unless the reference names one).
fn watch_rule_destination(rule: &WatchRule, rule_ns: &str) -> String {
    let dest_ref = &rule.spec.destination_ref;
    let dest_ns = dest_ref.namespace.as_deref().unwrap_or(rule_ns);
    key(dest_ns, &dest_ref.name)
}

/// The condition of a rule whose destination is missing or unusable.
fn unusable_destination(
    dest_key: &str,
    usable: &BTreeMap<String, UsableDestination<'_>>,
    destination_conditions: &BTreeMap<String, ReadyCondition>,
) -> Option<ReadyCondition> {
    if usable.contains_key(dest_key) {
        return None;
    }
    Some(match destination_conditions.get(dest_key) {
        None => ReadyCondition::not(
            Reason::DestinationNotFound,
            format!("GitDestination {dest_key} not found"),
        ),
        Some(c) => ReadyCondition::not(
            c.reason,
            format!("GitDestination {dest_key} is not ready: {}", c.message),
        ),
    })
}

/// A `WatchRule` in `rule_ns` needs both the destination's and its repository's access policy to admit it.
fn namespaced_rule_access(
    d: &UsableDestination<'_>,
    dest_key: &str,
    rule_ns: &str,
    namespaces: &NamespaceLabels,
) -> ReadyCondition {
    let repo_ns = &d.dest.spec.repo_ref.namespace;
    if !admits_namespace(
        d.dest.spec.access_policy.as_ref(),
        &d.ns,
        rule_ns,
        namespaces,
    ) {
        ReadyCondition::not(
            Reason::AccessDenied,
            format!("GitDestination {dest_key} does not admit rules from namespace {rule_ns}"),
        )
    } else if !admits_namespace(
        d.repo.spec.access_policy.as_ref(),
        repo_ns,
        rule_ns,
        namespaces,
    ) {
        ReadyCondition::not(
            Reason::AccessDenied,
            format!(
                "the GitRepoConfig of {dest_key} does not admit rules from namespace {rule_ns}"
            ),
        )
    } else {
        ReadyCondition::ok(format!("mirroring into {dest_key}"))
    }
}

/// A `ClusterWatchRule` needs `accessPolicy.allowClusterRules` on its destination's repository.
fn cluster_rule_access(d: &UsableDestination<'_>, dest_key: &str) -> ReadyCondition {
    let allowed = d
        .repo
        .spec
        .access_policy
        .as_ref()
        .is_some_and(|p| p.allow_cluster_rules);
    if allowed {
        ReadyCondition::ok(format!("mirroring into {dest_key}"))
    } else {
        ReadyCondition::not(
            Reason::AccessDenied,
            format!("the GitRepoConfig of {dest_key} does not set accessPolicy.allowClusterRules"),
        )
    }
}

/// Only destinations some admitted rule writes to are declared to the writer; with their reconcile
/// requests (the annotation's value, per destination key).
fn declared_destinations(
    usable: &BTreeMap<String, UsableDestination<'_>>,
    rules: &[CompiledRule],
) -> (Vec<DestinationDecl>, BTreeMap<String, String>) {
    let used: BTreeSet<&str> = rules.iter().map(|r| r.destination.as_str()).collect();
    let declared = || {
        usable
            .values()
            .filter(|d| used.contains(d.decl.key.as_str()))
    };
    let destinations = declared().map(|d| d.decl.clone()).collect();
    let reconcile_requests = declared()
        .filter_map(|d| {
            let requested = d
                .dest
                .annotations()
                .get(crate::crd::RECONCILE_REQUESTED_AT_ANNOTATION)?;
            Some((d.decl.key.clone(), requested.clone()))
        })
        .collect();
    (destinations, reconcile_requests)
}

/// Rules selecting Secrets for a destination that does not encrypt say why Secrets are skipped:
/// (reason, message) per rule id.
fn secrets_skipped(
    inputs: Inputs<'_>,
    encryption: &BTreeMap<String, EncryptionLookup>,
    selecting_secrets: &BTreeSet<String>,
) -> BTreeMap<String, (Reason, String)> {
    let rule_destinations = inputs
        .watch_rules
        .iter()
        .map(|r| {
            let ns = r.namespace().unwrap_or_default();
            (
                format!("WatchRule/{ns}/{}", r.name_any()),
                watch_rule_destination(r, &ns),
            )
        })
        .chain(inputs.cluster_watch_rules.iter().map(|r| {
            let d = &r.spec.destination_ref;
            (
                format!("ClusterWatchRule/{}", r.name_any()),
                key(&d.namespace, &d.name),
            )
        }));
    let mut skipped = BTreeMap::new();
    for (id, dest_key) in rule_destinations {
        if !selecting_secrets.contains(&id) {
            continue;
        }
        let configured = inputs
            .destinations
            .iter()
            .find(|d| key(&d.namespace().unwrap_or_default(), &d.name_any()) == dest_key)
            .is_some_and(|d| d.spec.encryption.is_some());
        if let Some(why) = why_secrets_are_skipped(&dest_key, configured, encryption.get(&dest_key))
        {
            skipped.insert(id, why);
        }
    }
    skipped
}

/// Why a destination gets no Secrets (reason, message), or `None` when its encryption is ready.
fn why_secrets_are_skipped(
    dest_key: &str,
    configured: bool,
    encryption: Option<&EncryptionLookup>,
) -> Option<(Reason, String)> {
    match (configured, encryption) {
        (true, Some(EncryptionLookup::Ready(_))) => None,
        (true, Some(EncryptionLookup::Failed { reason, message })) => Some((
            *reason,
            format!(
                "this rule selects Secrets, but the encryption of GitDestination {dest_key} is not usable: \
                 {message}; Secrets are not sent and no plaintext Secret ever reaches Git"
            ),
        )),
        (true, None) => Some((
            Reason::EncryptionNotConfigured,
            format!(
                "this rule selects Secrets; the encryption of GitDestination {dest_key} is not resolved \
                 yet, so Secrets are not sent and no plaintext Secret ever reaches Git"
            ),
        )),
        (false, _) => Some((
            Reason::EncryptionNotConfigured,
            format!(
                "this rule selects Secrets, but GitDestination {dest_key} has no spec.encryption \
                 (age recipients): Secrets are not sent and no plaintext Secret ever reaches Git"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::compiled::test_support::labels;
    use serde_json::json;

    fn repo(ns: &str, name: &str, branches: &[&str], policy: Value) -> GitRepoConfig {
        serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "GitRepoConfig",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"repoUrl": "https://git.example.com/infra.git", "allowedBranches": branches, "accessPolicy": policy}
        }))
        .unwrap()
    }

    use serde_json::Value;

    fn dest(
        ns: &str,
        name: &str,
        repo: (&str, &str),
        branch: &str,
        policy: Value,
    ) -> GitDestination {
        serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "GitDestination",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"repoRef": {"namespace": repo.0, "name": repo.1}, "branch": branch,
                     "baseFolder": format!("clusters/{name}"), "accessPolicy": policy}
        }))
        .unwrap()
    }

    fn wr(ns: &str, name: &str, dest_ref: Value) -> WatchRule {
        serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "WatchRule",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"destinationRef": dest_ref, "rules": [{"resources": ["configmaps"]}]}
        }))
        .unwrap()
    }

    fn cwr(name: &str, dest_ns: &str, dest_name: &str) -> ClusterWatchRule {
        serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "ClusterWatchRule",
            "metadata": {"name": name},
            "spec": {"destinationRef": {"namespace": dest_ns, "name": dest_name},
                     "rules": [{"scope": "Cluster", "resources": ["clusterroles"]}]}
        }))
        .unwrap()
    }

    fn namespaces() -> NamespaceLabels {
        NamespaceLabels::from([
            ("cfg".to_owned(), labels(&[])),
            ("shop".to_owned(), labels(&[("team", "shop")])),
            ("web".to_owned(), labels(&[("team", "web")])),
        ])
    }

    fn reason(res: &Resolution, id: &str) -> Reason {
        res.rule_conditions[id].reason
    }

    #[test]
    fn a_rule_in_the_destinations_namespace_is_admitted_by_default() {
        let repos = [repo("cfg", "repo", &["main"], json!({}))];
        let dests = [dest("cfg", "prod", ("cfg", "repo"), "main", json!({}))];
        let rules = [wr("cfg", "r", json!({"name": "prod"}))];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/cfg/r"), Reason::Ready);
        assert_eq!(res.selection.rules.len(), 1);
        let d = &res.selection.destinations[0];
        assert_eq!(
            (
                d.key.as_str(),
                d.repo_url.as_str(),
                d.branch.as_str(),
                d.base_folder.as_str()
            ),
            (
                "cfg/prod",
                "https://git.example.com/infra.git",
                "main",
                "clusters/prod"
            )
        );
    }

    #[test]
    fn the_commit_message_template_goes_with_the_destination() {
        let repos = [repo("cfg", "repo", &["main"], json!({}))];
        let mut templated = dest("cfg", "prod", ("cfg", "repo"), "main", json!({}));
        templated.spec.commit_message = serde_json::from_value(
            json!({"subject": "{operation} {kind} {name}", "body": "{objects}"}),
        )
        .unwrap();
        let rules = [wr("cfg", "r", json!({"name": "prod"}))];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: std::slice::from_ref(&templated),
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        let template = res.selection.destinations[0]
            .commit_message
            .clone()
            .unwrap();
        assert_eq!(
            (template.subject.as_str(), template.body.as_str()),
            ("{operation} {kind} {name}", "{objects}")
        );
    }

    #[test]
    fn namespaced_rules_policies_of_destination_and_repo_both_apply() {
        let from_shop = json!({"namespacedRules": {"mode": "FromSelector", "namespaceSelector": {"matchLabels": {"team": "shop"}}}});
        let all = json!({"namespacedRules": {"mode": "AllNamespaces"}});
        let repos = [
            repo("cfg", "open", &["main"], all.clone()),
            repo("cfg", "closed", &["main"], json!({})),
        ];
        let dests = [
            // Destinations live in cfg; repos admit them (same namespace).
            dest("cfg", "shop-only", ("cfg", "open"), "main", from_shop),
            dest("cfg", "everyone", ("cfg", "open"), "main", all.clone()),
            dest("cfg", "repo-closed", ("cfg", "closed"), "main", all),
            dest("cfg", "default", ("cfg", "open"), "main", json!({})),
        ];
        let rules = [
            wr(
                "shop",
                "a",
                json!({"name": "shop-only", "namespace": "cfg"}),
            ),
            wr("web", "b", json!({"name": "shop-only", "namespace": "cfg"})),
            wr("web", "c", json!({"name": "everyone", "namespace": "cfg"})),
            wr(
                "web",
                "d",
                json!({"name": "repo-closed", "namespace": "cfg"}),
            ),
            wr("web", "e", json!({"name": "default", "namespace": "cfg"})),
            wr(
                "nowhere",
                "f",
                json!({"name": "shop-only", "namespace": "cfg"}),
            ),
        ];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/shop/a"), Reason::Ready);
        assert_eq!(reason(&res, "WatchRule/web/b"), Reason::AccessDenied);
        assert_eq!(reason(&res, "WatchRule/web/c"), Reason::Ready);
        assert_eq!(
            reason(&res, "WatchRule/web/d"),
            Reason::AccessDenied,
            "the repo's policy applies too"
        );
        assert_eq!(
            reason(&res, "WatchRule/web/e"),
            Reason::AccessDenied,
            "default is SameNamespace"
        );
        assert_eq!(
            reason(&res, "WatchRule/nowhere/f"),
            Reason::AccessDenied,
            "unknown namespaces fail closed"
        );
        let ids: Vec<&str> = res.selection.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, vec!["WatchRule/shop/a", "WatchRule/web/c"]);
        let declared: Vec<&str> = res
            .selection
            .destinations
            .iter()
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(
            declared,
            vec!["cfg/everyone", "cfg/shop-only"],
            "only destinations in use"
        );
    }

    #[test]
    fn unknown_repo_destination_and_disallowed_branch_are_reported() {
        let repos = [repo("cfg", "repo", &["main"], json!({}))];
        let dests = [
            dest("cfg", "nobranch", ("cfg", "repo"), "feature", json!({})),
            dest("cfg", "norepo", ("cfg", "missing"), "main", json!({})),
        ];
        let rules = [
            wr("cfg", "a", json!({"name": "nobranch"})),
            wr("cfg", "b", json!({"name": "norepo"})),
            wr("cfg", "c", json!({"name": "ghost"})),
        ];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/cfg/a"), Reason::BranchNotAllowed);
        assert_eq!(reason(&res, "WatchRule/cfg/b"), Reason::RepoNotFound);
        assert_eq!(reason(&res, "WatchRule/cfg/c"), Reason::DestinationNotFound);
        assert_eq!(
            res.destination_conditions["cfg/nobranch"].reason,
            Reason::BranchNotAllowed
        );
        assert!(res.selection.rules.is_empty() && res.selection.destinations.is_empty());
    }

    #[test]
    fn a_repo_admits_destinations_only_from_namespaces_its_policy_allows() {
        let repos = [repo("cfg", "repo", &["main"], json!({}))];
        let dests = [dest("shop", "prod", ("cfg", "repo"), "main", json!({}))];
        let rules = [wr("shop", "a", json!({"name": "prod"}))];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        assert_eq!(
            res.destination_conditions["shop/prod"].reason,
            Reason::AccessDenied
        );
        assert_eq!(reason(&res, "WatchRule/shop/a"), Reason::AccessDenied);
    }

    #[test]
    fn an_invalid_ignore_is_a_condition_on_the_rule_and_admits_nothing() {
        let repos = [repo(
            "cfg",
            "repo",
            &["main"],
            json!({"allowClusterRules": true}),
        )];
        let dests = [dest("cfg", "prod", ("cfg", "repo"), "main", json!({}))];
        let with_ignore = |mut rule: WatchRule, ignore: Value| {
            rule.spec.ignore = Some(serde_json::from_value(ignore).unwrap());
            rule
        };
        let rules = [
            with_ignore(
                wr("cfg", "good", json!({"name": "prod"})),
                json!({"presets": ["Flux"], "users": ["bob"]}),
            ),
            with_ignore(
                wr("cfg", "typo", json!({"name": "prod"})),
                json!({"presets": ["flux"]}),
            ),
            with_ignore(
                wr("cfg", "blank", json!({"name": "prod"})),
                json!({"fieldManagers": [""]}),
            ),
            // The ignore problem is reported even when the destination is missing too.
            with_ignore(
                wr("cfg", "lost", json!({"name": "zz"})),
                json!({"groups": [""]}),
            ),
        ];
        let mut cluster = cwr("c", "cfg", "prod");
        cluster.spec.ignore = Some(
            serde_json::from_value(json!({"serviceAccounts": [{"namespace": "x", "name": ""}]}))
                .unwrap(),
        );
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[cluster],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/cfg/good"), Reason::Ready);
        for id in [
            "WatchRule/cfg/typo",
            "WatchRule/cfg/blank",
            "WatchRule/cfg/lost",
            "ClusterWatchRule/c",
        ] {
            assert_eq!(reason(&res, id), Reason::InvalidIgnore, "{id}");
        }
        let typo = &res.rule_conditions["WatchRule/cfg/typo"].message;
        assert!(typo.contains("unknown preset \"flux\""), "{typo}");
        assert_eq!(
            res.rule_conditions["WatchRule/cfg/blank"].message,
            "ignore.fieldManagers holds an empty name"
        );
        let ids: Vec<&str> = res.selection.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["WatchRule/cfg/good"]);
    }

    #[test]
    fn an_empty_exclude_names_pattern_is_a_condition_on_the_rule() {
        let repos = [repo(
            "cfg",
            "repo",
            &["main"],
            json!({"allowClusterRules": true}),
        )];
        let dests = [dest("cfg", "prod", ("cfg", "repo"), "main", json!({}))];
        let mut good = wr("cfg", "good", json!({"name": "prod"}));
        good.spec.exclude_names = vec!["*-lock".into()];
        let mut bad = wr("cfg", "bad", json!({"name": "prod"}));
        bad.spec.exclude_names = vec!["*-lock".into(), String::new()];
        let mut cluster = cwr("c", "cfg", "prod");
        cluster.spec.exclude_names = vec!["x".repeat(300)];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &[good, bad],
            cluster_watch_rules: &[cluster],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/cfg/good"), Reason::Ready);
        assert_eq!(
            reason(&res, "WatchRule/cfg/bad"),
            Reason::InvalidExcludeNames
        );
        assert_eq!(
            res.rule_conditions["WatchRule/cfg/bad"].message,
            "excludeNames holds an empty pattern"
        );
        assert_eq!(
            reason(&res, "ClusterWatchRule/c"),
            Reason::InvalidExcludeNames
        );
        assert_eq!(res.selection.rules.len(), 1);
    }

    #[test]
    fn cluster_rules_need_allow_cluster_rules_on_the_repo() {
        let repos = [
            repo("cfg", "yes", &["main"], json!({"allowClusterRules": true})),
            repo("cfg", "no", &["main"], json!({})),
        ];
        let dests = [
            dest("cfg", "a", ("cfg", "yes"), "main", json!({})),
            dest("cfg", "b", ("cfg", "no"), "main", json!({})),
        ];
        let cluster = [
            cwr("allowed", "cfg", "a"),
            cwr("denied", "cfg", "b"),
            cwr("lost", "cfg", "zz"),
        ];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &[],
            cluster_watch_rules: &cluster,
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "ClusterWatchRule/allowed"), Reason::Ready);
        assert_eq!(
            reason(&res, "ClusterWatchRule/denied"),
            Reason::AccessDenied
        );
        assert_eq!(
            reason(&res, "ClusterWatchRule/lost"),
            Reason::DestinationNotFound
        );
        assert_eq!(res.selection.rules.len(), 1);
        assert!(matches!(
            res.selection.rules[0].kind,
            RuleKind::Cluster { .. }
        ));
    }

    #[test]
    fn secret_ref_credentials_are_declared_only_when_usable() {
        let mut r = repo("cfg", "repo", &["main"], json!({}));
        r.spec.secret_ref = Some(crate::crd::LocalObjectReference {
            name: "repo-cred".into(),
        });
        let repos = [r];
        let dests = [dest("cfg", "prod", ("cfg", "repo"), "main", json!({}))];
        let rules = [wr("cfg", "a", json!({"name": "prod"}))];
        let ns = namespaces();
        let inputs = || Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        };
        let token = GitCredentials::Token("tok-hunter2".into());
        let ready = BTreeMap::from([(
            "cfg/repo".to_owned(),
            CredentialsLookup::Ready(token.clone()),
        )]);
        let res = resolve_with_lookups(inputs(), &BTreeMap::new(), &ready);
        assert_eq!(reason(&res, "WatchRule/cfg/a"), Reason::Ready);
        assert_eq!(
            res.selection.destinations[0].credentials,
            Some(Box::new(token))
        );
        assert!(!format!("{res:?}").contains("hunter2"));

        for (lookup, expected) in [
            (
                Some(CredentialsLookup::Failed {
                    reason: Reason::CredentialsNeedTls,
                    message: "no TLS".into(),
                }),
                Reason::CredentialsNeedTls,
            ),
            (
                Some(CredentialsLookup::Failed {
                    reason: Reason::InvalidCredentialsSecret,
                    message: "no keys".into(),
                }),
                Reason::InvalidCredentialsSecret,
            ),
            (None, Reason::CredentialsSecretNotFound),
        ] {
            let lookups: BTreeMap<_, _> = lookup
                .map(|l| ("cfg/repo".to_owned(), l))
                .into_iter()
                .collect();
            let res = resolve_with_lookups(inputs(), &BTreeMap::new(), &lookups);
            assert_eq!(res.destination_conditions["cfg/prod"].reason, expected);
            assert_eq!(reason(&res, "WatchRule/cfg/a"), expected);
            assert!(res.selection.destinations.is_empty(), "nothing is declared");
        }
    }

    #[test]
    fn an_invalid_base_folder_makes_the_destination_unusable() {
        let repos = [repo("cfg", "repo", &["main"], json!({}))];
        let mut d = dest("cfg", "prod", ("cfg", "repo"), "main", json!({}));
        d.spec.base_folder = "../escape".into();
        let rules = [wr("cfg", "a", json!({"name": "prod"}))];
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &[d],
            watch_rules: &rules,
            cluster_watch_rules: &[],
            namespaces: &ns,
        });
        assert_eq!(reason(&res, "WatchRule/cfg/a"), Reason::InvalidBaseFolder);
    }

    #[test]
    fn rules_selecting_secrets_explicitly_or_through_the_preset_are_listed() {
        let repos = [repo(
            "cfg",
            "repo",
            &["main"],
            json!({"allowClusterRules": true}),
        )];
        let dests = [dest("cfg", "prod", ("cfg", "repo"), "main", json!({}))];
        let mut preset = wr("cfg", "preset", json!({"name": "prod"}));
        preset.spec.rules = vec![Default::default()];
        let mut explicit = wr("cfg", "explicit", json!({"name": "prod"}));
        explicit.spec.rules[0].resources = vec!["secrets".into()];
        let mut denied = wr(
            "shop",
            "denied",
            json!({"name": "prod", "namespace": "cfg"}),
        );
        denied.spec.rules[0].resources = vec!["*".into()];
        let configmaps = wr("cfg", "configmaps", json!({"name": "prod"}));
        let cluster: ClusterWatchRule = serde_json::from_value(json!({
            "apiVersion": "configbutler.ai/v1alpha1", "kind": "ClusterWatchRule",
            "metadata": {"name": "everything"},
            "spec": {"destinationRef": {"namespace": "cfg", "name": "prod"},
                     "rules": [{"scope": "Namespaced", "resources": ["*"]}]}
        }))
        .unwrap();
        let roles = cwr("roles", "cfg", "prod");
        let ns = namespaces();
        let res = resolve(Inputs {
            repos: &repos,
            destinations: &dests,
            watch_rules: &[preset, explicit, denied, configmaps],
            cluster_watch_rules: &[cluster, roles],
            namespaces: &ns,
        });
        let listed: Vec<&str> = res
            .rules_selecting_secrets
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            listed,
            [
                "ClusterWatchRule/everything",
                "WatchRule/cfg/explicit",
                "WatchRule/cfg/preset",
                "WatchRule/shop/denied",
            ]
        );
        assert_eq!(reason(&res, "WatchRule/shop/denied"), Reason::AccessDenied);
    }
}

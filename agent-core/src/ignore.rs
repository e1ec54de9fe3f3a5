//! Which changes a rule does not mirror, by who made them (`spec.ignore` of a `WatchRule` or
//! `ClusterWatchRule`). Pure: the watch index ([`crate::ingest::index`]) keeps the state and asks here.
//!
//! Who made a change comes from two witnesses:
//!
//! - **Field managers**: every write stamps its manager's `metadata.managedFields` entry with the
//!   time of the write (the API server sets `time` on the entry of the manager whose request changed
//!   the object). The *writers* of a change are the managers whose entry is new, or whose `time`
//!   moved, since the object's previous version seen. Entries for the `status` subresource never
//!   count: status is never mirrored. A manager that only *lost* fields (another writer took them)
//!   keeps its `time`, so it is not a writer.
//! - **The admission webhook** (when enabled): the user and groups of the request whose content
//!   became this version (`reverser_agent::webhook::FactStore`).
//!
//! The rule ([`Ignore::ignores`]): a change is ignored when the webhook saw an ignored user, group
//! or ServiceAccount make it, or when it has writers and every one of them is an ignored field
//! manager. A change with a writer that is not ignored (a person's `kubectl edit`, a change a
//! relist collapsed from Flux's and a person's writes) is mirrored, whole. When neither witness names
//! anyone (the API server's `time` has one-second resolution, so a second write by the same manager
//! within the same second leaves its entry as it was), the change follows the previous decision for
//! that file: a file held back for ignored writes stays held back, any other change is mirrored.
//! Field manager names are chosen by the client (`--field-manager`): ignoring a manager trusts that
//! name, as Flux's own configuration does.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::crd::IgnoreSpec;

/// Named sets of field managers: (preset, managers).
pub const PRESETS: &[(&str, &[&str])] = &[
    ("Flux", &["kustomize-controller", "helm-controller"]),
    ("ArgoCD", &["argocd-controller"]),
    ("Helm", &["helm"]),
];

/// Why an `ignore` setting is invalid (the rule's `Ready` condition says so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    #[error("ignore.presets: unknown preset {0:?} (known: Flux, ArgoCD, Helm)")]
    UnknownPreset(String),
    #[error("ignore.{0} holds an empty name")]
    EmptyName(&'static str),
    #[error("ignore.serviceAccounts holds an entry without a namespace or name")]
    IncompleteServiceAccount,
}

/// A compiled `ignore` setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignore {
    managers: BTreeSet<String>,
    /// Usernames, ServiceAccounts included as `system:serviceaccount:{namespace}:{name}`.
    users: BTreeSet<String>,
    groups: BTreeSet<String>,
}

impl Ignore {
    /// Checks and compiles a spec: unknown presets and empty names are errors, never ignored silently.
    pub fn compile(spec: &IgnoreSpec) -> Result<Self, IgnoreError> {
        let mut out = Ignore::default();
        for preset in &spec.presets {
            let (_, managers) = PRESETS
                .iter()
                .find(|(name, _)| name == preset)
                .ok_or_else(|| IgnoreError::UnknownPreset(preset.clone()))?;
            out.managers
                .extend(managers.iter().map(|m| (*m).to_owned()));
        }
        fn names(field: &'static str, list: &[String]) -> Result<Vec<String>, IgnoreError> {
            if list.iter().any(|n| n.trim().is_empty()) {
                return Err(IgnoreError::EmptyName(field));
            }
            Ok(list.to_vec())
        }
        out.managers
            .extend(names("fieldManagers", &spec.field_managers)?);
        out.users.extend(names("users", &spec.users)?);
        out.groups.extend(names("groups", &spec.groups)?);
        for sa in &spec.service_accounts {
            if sa.namespace.trim().is_empty() || sa.name.trim().is_empty() {
                return Err(IgnoreError::IncompleteServiceAccount);
            }
            out.users.insert(format!(
                "system:serviceaccount:{}:{}",
                sa.namespace, sa.name
            ));
        }
        Ok(out)
    }

    /// Ignores nothing.
    pub fn is_empty(&self) -> bool {
        self.managers.is_empty() && self.users.is_empty() && self.groups.is_empty()
    }

    pub fn ignores_manager(&self, manager: &str) -> bool {
        self.managers.contains(manager)
    }

    /// Whether the user (with its groups) the webhook saw is ignored.
    pub fn ignores_user(&self, user: &User<'_>) -> bool {
        self.users.contains(user.name) || user.groups.iter().any(|g| self.groups.contains(g))
    }

    /// Whether a change is ignored. `writers`: the field managers that wrote it ([`writers`]);
    /// `user`: who the webhook saw make it; `held_back`: the file is already held back for
    /// ignored changes (the decision when no witness names anyone). See the module documentation.
    pub fn ignores(
        &self,
        writers: &BTreeSet<String>,
        user: Option<&User<'_>>,
        held_back: bool,
    ) -> bool {
        if user.is_some_and(|u| self.ignores_user(u)) {
            return true;
        }
        if !writers.is_empty() {
            return writers.iter().all(|m| self.ignores_manager(m));
        }
        // Nobody named by the managed fields: a user the webhook saw (not ignored) wins.
        user.is_none() && held_back
    }
}

/// Who the admission webhook saw make a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

/// One `metadata.managedFields` entry, as far as telling writers apart needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ManagerEntry {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub time: String,
}

/// The object's managed-field entries (sorted), without those of the `status` subresource and
/// entries naming no manager.
/// Objects without `managedFields` (an API server that does not track them) have none.
pub fn manager_entries(obj: &Value) -> Vec<ManagerEntry> {
    let text = |entry: &Value, field: &str| {
        entry
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut out: Vec<ManagerEntry> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|entry| ManagerEntry {
            manager: text(entry, "manager"),
            operation: text(entry, "operation"),
            subresource: text(entry, "subresource"),
            time: text(entry, "time"),
        })
        .filter(|e| e.subresource != "status" && !e.manager.is_empty())
        .collect();
    out.sort();
    out
}

/// The managers that wrote the object since `before` (its entries at the previous version seen):
/// those whose entry is new or carries another `time`. Without a previous version (the object is
/// new to this watch), every manager that ever wrote it.
pub fn writers(before: Option<&[ManagerEntry]>, now: &[ManagerEntry]) -> BTreeSet<String> {
    now.iter()
        .filter(|entry| {
            before.is_none_or(|before| {
                !before.iter().any(|b| {
                    b.manager == entry.manager
                        && b.operation == entry.operation
                        && b.subresource == entry.subresource
                        && b.time == entry.time
                })
            })
        })
        .map(|entry| entry.manager.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NamespacedName;
    use serde_json::json;

    fn spec(value: Value) -> IgnoreSpec {
        serde_json::from_value(value).unwrap()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn entry(manager: &str, operation: &str, time: &str) -> Value {
        json!({"manager": manager, "operation": operation, "apiVersion": "v1", "time": time,
               "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {}}})
    }

    fn object(entries: Vec<Value>) -> Value {
        json!({"metadata": {"name": "x", "managedFields": entries}})
    }

    #[test]
    fn presets_expand_to_their_field_managers() {
        let ignore =
            Ignore::compile(&spec(json!({"presets": ["Flux", "ArgoCD", "Helm"]}))).unwrap();
        for m in [
            "kustomize-controller",
            "helm-controller",
            "argocd-controller",
            "helm",
        ] {
            assert!(ignore.ignores_manager(m), "{m}");
        }
        assert!(!ignore.ignores_manager("kubectl-edit"));
        assert!(!ignore.ignores_manager("Kustomize-Controller"));
    }

    #[test]
    fn invalid_settings_are_errors_not_silently_ignored() {
        let cases = [
            (
                json!({"presets": ["flux"]}),
                IgnoreError::UnknownPreset("flux".into()),
            ),
            (
                json!({"presets": [""]}),
                IgnoreError::UnknownPreset(String::new()),
            ),
            (
                json!({"fieldManagers": ["helm", ""]}),
                IgnoreError::EmptyName("fieldManagers"),
            ),
            (json!({"users": [" "]}), IgnoreError::EmptyName("users")),
            (json!({"groups": [""]}), IgnoreError::EmptyName("groups")),
            (
                json!({"serviceAccounts": [{"namespace": "", "name": "x"}]}),
                IgnoreError::IncompleteServiceAccount,
            ),
        ];
        for (value, want) in cases {
            assert_eq!(Ignore::compile(&spec(value.clone())), Err(want), "{value}");
        }
        let msg = IgnoreError::UnknownPreset("flux".into()).to_string();
        assert!(
            msg.contains("\"flux\"") && msg.contains("Flux, ArgoCD, Helm"),
            "{msg}"
        );
        assert!(Ignore::compile(&IgnoreSpec::default()).unwrap().is_empty());
    }

    #[test]
    fn users_groups_and_service_accounts_match_the_webhooks_user() {
        let ignore = Ignore::compile(&IgnoreSpec {
            users: vec!["bob".into()],
            groups: vec!["robots".into()],
            service_accounts: vec![NamespacedName {
                namespace: "flux-system".into(),
                name: "kustomize-controller".into(),
            }],
            ..Default::default()
        })
        .unwrap();
        let none: &[String] = &[];
        let robots = ["robots".to_owned()];
        let user = |name, groups| User { name, groups };
        assert!(ignore.ignores_user(&user("bob", none)));
        assert!(ignore.ignores_user(&user("carol", &robots)));
        assert!(ignore.ignores_user(&user(
            "system:serviceaccount:flux-system:kustomize-controller",
            none
        )));
        assert!(!ignore.ignores_user(&user(
            "system:serviceaccount:other:kustomize-controller",
            none
        )));
        assert!(!ignore.ignores_user(&user("alice", none)));
    }

    #[test]
    fn the_decision_for_every_mix_of_witnesses() {
        let ignore =
            Ignore::compile(&spec(json!({"presets": ["Flux"], "users": ["bob"]}))).unwrap();
        let none: &[String] = &[];
        let alice = User {
            name: "alice",
            groups: none,
        };
        let bob = User {
            name: "bob",
            groups: none,
        };
        let flux = set(&["kustomize-controller"]);
        let person = set(&["kubectl-edit"]);
        let mixed = set(&["kustomize-controller", "kubectl-edit"]);
        let nobody = set(&[]);
        // (writers, user, held back) → ignored
        let cases: &[(&BTreeSet<String>, Option<&User<'_>>, bool, bool)] = &[
            (&flux, None, false, true),
            (&flux, Some(&alice), false, true), // the manager name decides
            (&person, None, false, false),
            (&person, None, true, false), // a person's change releases a held-back file
            (&mixed, None, false, false),
            (&mixed, None, true, false),
            (&person, Some(&bob), false, true), // an ignored user, whatever the manager
            (&nobody, Some(&bob), false, true),
            (&nobody, None, false, false), // unknown: mirrored, as without ignore
            (&nobody, None, true, true),   // unknown: follows the held-back file
            (&nobody, Some(&alice), true, false),
        ];
        for (writers, user, held_back, want) in cases {
            assert_eq!(
                ignore.ignores(writers, *user, *held_back),
                *want,
                "{writers:?} {user:?} {held_back}"
            );
        }
        // Nothing configured ignores nothing.
        assert!(!Ignore::default().ignores(&flux, None, false));
    }

    #[test]
    fn writers_are_the_managers_whose_entry_is_new_or_newer() {
        let before = manager_entries(&object(vec![
            entry("kustomize-controller", "Apply", "2026-01-01T00:00:00Z"),
            entry("kubectl-edit", "Update", "2026-01-01T00:00:05Z"),
        ]));
        // Flux applied again: only its time moved (kubectl-edit lost fields but kept its time).
        let now = manager_entries(&object(vec![
            entry("kustomize-controller", "Apply", "2026-01-01T00:01:00Z"),
            json!({"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-01T00:00:05Z", "fieldsV1": {}}),
        ]));
        assert_eq!(writers(Some(&before), &now), set(&["kustomize-controller"]));
        // A new manager is a writer; an unchanged set of entries names nobody.
        let with_hpa = manager_entries(&object(vec![
            entry("kustomize-controller", "Apply", "2026-01-01T00:01:00Z"),
            entry("kubectl-edit", "Update", "2026-01-01T00:00:05Z"),
            entry("kubectl-scale", "Update", "2026-01-01T00:01:00Z"),
        ]));
        assert_eq!(writers(Some(&now), &with_hpa), set(&["kubectl-scale"]));
        assert_eq!(writers(Some(&with_hpa), &with_hpa), set(&[]));
        // Unknown before: everyone who ever wrote it.
        assert_eq!(
            writers(None, &with_hpa),
            set(&["kubectl-edit", "kubectl-scale", "kustomize-controller"])
        );
    }

    #[test]
    fn status_entries_and_malformed_managed_fields_name_no_writer() {
        let obj = object(vec![
            json!({"manager": "kube-controller-manager", "operation": "Update", "subresource": "status", "time": "t"}),
        ]);
        assert!(manager_entries(&obj).is_empty());
        for malformed in [
            json!({"metadata": {"managedFields": "nope"}}),
            json!({"metadata": {}}),
            json!({"metadata": {"managedFields": [1, null, []]}}),
        ] {
            let entries = manager_entries(&malformed);
            assert!(entries.is_empty(), "{malformed}");
            let ignore = Ignore::compile(&spec(json!({"presets": ["Flux"]}))).unwrap();
            assert!(
                !ignore.ignores(&writers(None, &entries), None, false),
                "{malformed}"
            );
        }
    }
}

//! The pure core of one watch: [`WatchIndex`] maps watcher events onto snapshot epochs and changes, per
//! destination route. No I/O: the task around it (`reverser_agent::ingest::watch`) runs the kube watcher and sends what it
//! returns.
//!
//! ```text
//! WatchIndex                               per (destination, path): the content hash only
//!   Init        → a new epoch, opened lazily (SnapshotBegin for every scope of every route)
//!   InitApply   → Upsert for each destination that selects the object (always: a snapshot
//!                 must name every live object, or the writer would sweep it)
//!   InitDone    → SnapshotEnd for every scope, except scopes holding an object that could not be
//!                 sent (encryption refused or failed, not renderable): those stay open, so the
//!                 writer sweeps nothing there; hashes of objects not relisted are forgotten;
//!                 after each SnapshotEnd, an empty Begin+End of the same scope at every superseded
//!                 version of the type (the writer clears the old version's folder)
//!   Apply       → Upsert if the canonical YAML changed; Delete if it stopped matching (labels,
//!                 derived, or a name the rule's `excludeNames` leaves out). Nothing when every
//!                 rule selecting it ignores the change's writers ([`crate::ignore`]): the file is
//!                 held back until someone else changes the object, and a relist re-sends the
//!                 content last sent for it
//!   Delete      → Delete where it was mirrored
//!   (an object that cannot be sent is never sent at all: its destination keeps the file it has)
//! ```
//!
//! This mirrors kubert's index (`Init` resets, `InitDone` computes what was removed), except that
//! removals found at `InitDone` are *not* sent as explicit deletes: the writer sweeps them at
//! `SnapshotEnd`, under its per-snapshot delete cap, which protects against a relist that
//! wrongly comes back empty.
//!
//! The `SnapshotBegin` is deferred to the first listed object (or the end of an empty list):
//! with paged lists the watcher reports `Init` before it lists, so a list that keeps failing
//! (a 403) would otherwise open a new epoch on every retry.
//!
//! The index reads no clock and draws no randomness: it asks an injected [`Attribution`] who made a change
//! and an injected [`sops::Sealer`] to encrypt sensitive objects (by default SOPS + age, stamped with the
//! system clock). One object event runs in named phases: its view (path, labels, identity), its author, its
//! writers (for `ignore`), then per destination route: delete, drop (stopped matching) or upsert, the upsert
//! being the destination's hash, the snapshot's note, the ignore check, the no-op check and the file content.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::WatchEvent as Event;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::discovery::{DestinationRoute, WatchPlan};
use crate::attribution::{AttributedUser, Attribution, ObjectKey};
use crate::canonical;
use crate::events::{AgentEvent, ObjectRef};
use crate::ignore::{self, Ignore, ManagerEntry};
use crate::paths;
use crate::rules::{Operation, SelectionOptions, labels_of};
use crate::sops;

/// Content hash of the canonical YAML last sent for one path to one destination.
type Hash = [u8; 32];

#[derive(Debug)]
struct Epoch {
    /// Allocated when the epoch is opened (first object or end of an empty list).
    id: Option<u64>,
    /// (route index, path) sent in this epoch (or kept as it is, when it could not be sent).
    seen: HashSet<(usize, String)>,
    /// (route index, snapshot namespace) holding an object that could not be sent: not ended.
    withheld: HashSet<(usize, String)>,
    /// (namespace, name) of every object listed, for the writers' memory.
    objects: HashSet<(String, String)>,
}

impl Epoch {
    fn new() -> Self {
        Self {
            id: None,
            seen: HashSet::new(),
            withheld: HashSet::new(),
            objects: HashSet::new(),
        }
    }
}

/// What ignoring writers needs to remember (only kept when a rule of the watch has an `ignore`).
#[derive(Debug, Default)]
struct IgnoreState {
    /// Per route, per rule: the compiled `ignore` (`None`: the rule ignores nothing).
    rules: Vec<Vec<Option<Ignore>>>,
    /// (namespace, name) → (uid, managed-field entries) at the last version seen: the writers of
    /// the next change are the managers whose entry moved since.
    managers: HashMap<(String, String), (String, Vec<ManagerEntry>)>,
    /// (route index, path) whose file is held back: the live object has changed since what was
    /// sent, only by ignored writers (or was created by one and never sent).
    held_back: HashSet<(usize, String)>,
    /// (route index, path) → (YAML, fingerprint) last sent, on routes with an `ignore`: a relist
    /// re-sends it for a held-back file, so the snapshot names the file without changing it.
    sent: HashMap<(usize, String), (String, Option<String>)>,
}

impl IgnoreState {
    fn new(plan: &WatchPlan) -> Option<Self> {
        let rules: Vec<Vec<Option<Ignore>>> = plan
            .routes
            .iter()
            .map(|route| {
                route
                    .rules
                    .iter()
                    .map(|rule| {
                        // Invalid settings never get here (the rule is not admitted); be safe anyway.
                        let ignore = Ignore::compile(rule.ignore_spec()?).ok()?;
                        (!ignore.is_empty()).then_some(ignore)
                    })
                    .collect()
            })
            .collect();
        rules.iter().flatten().any(Option::is_some).then(|| Self {
            rules,
            ..Self::default()
        })
    }

    fn route_ignores(&self, route_index: usize) -> bool {
        self.rules[route_index].iter().any(Option::is_some)
    }

    fn forget(&mut self, slot: &(usize, String)) {
        self.held_back.remove(slot);
        self.sent.remove(slot);
    }
}

/// The pure core of one watch: turns watcher events into [`AgentEvent`]s.
#[derive(Debug)]
pub struct WatchIndex {
    plan: Arc<WatchPlan>,
    options: SelectionOptions,
    /// (route index, path) → hash of what that destination holds.
    hashes: HashMap<(usize, String), Hash>,
    epoch: Option<Epoch>,
    /// Admission facts naming the authors of changes.
    attribution: Option<Arc<dyn Attribution>>,
    /// Writers whose changes rules ignore, when any rule of this watch has an `ignore`.
    ignore: Option<IgnoreState>,
    /// Sensitive objects not encrypted (per destination), since this index was made.
    encryption_failures: u64,
    /// Snapshot ends withheld, since this index was made.
    snapshots_withheld: u64,
    /// See [`WatchStatus::last_unsent`].
    last_unsent: Option<String>,
    /// Encrypts sensitive objects (the randomness and the wall clock live there, not here).
    sealer: Arc<dyn sops::Sealer>,
    /// The namespaces any route may select (`None`: all): a cluster-wide watch standing in for many namespaced
    /// ones drops the objects of every other namespace before any work, and keeps nothing of them.
    covered: Option<HashSet<String>>,
}

/// An object as the index sees it.
struct View {
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    path: String,
    object: ObjectRef,
}

impl WatchIndex {
    pub fn new(plan: Arc<WatchPlan>, options: SelectionOptions) -> Self {
        Self {
            ignore: IgnoreState::new(&plan),
            covered: plan
                .covered_namespaces()
                .map(|set| set.into_iter().map(str::to_owned).collect()),
            plan,
            options,
            hashes: HashMap::new(),
            epoch: None,
            attribution: None,
            encryption_failures: 0,
            snapshots_withheld: 0,
            last_unsent: None,
            sealer: Arc::new(sops::AgeSealer),
        }
    }

    /// Sensitive objects that could not be encrypted (too large, or encryption failed), counted once per
    /// destination and event.
    pub fn encryption_failures(&self) -> u64 {
        self.encryption_failures
    }

    /// Snapshot ends withheld because an object of their scope could not be sent.
    pub fn snapshots_withheld(&self) -> u64 {
        self.snapshots_withheld
    }

    /// The last object that could not be sent (path, destination, size, reason; never content).
    pub fn last_unsent(&self) -> Option<&str> {
        self.last_unsent.as_deref()
    }

    /// Names the author of each change from `attribution` (else every change is the bot's).
    pub fn with_attribution(mut self, attribution: Arc<dyn Attribution>) -> Self {
        self.attribution = Some(attribution);
        self
    }

    /// Seals sensitive objects with `sealer` instead of SOPS + age stamped by the system clock.
    pub fn with_sealer(mut self, sealer: Arc<dyn sops::Sealer>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Number of (destination, path) entries held.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Maps one watcher event; `epochs` allocates epoch numbers (shared by all watches, so
    /// they only ever grow on a stream).
    pub fn apply(&mut self, event: Event<Value>, epochs: &AtomicU64) -> Vec<AgentEvent> {
        let mut out = Vec::new();
        match event {
            Event::Init => {
                // A relist supersedes an open epoch that never ended (it sent no end, so the
                // writer deleted nothing for it).
                self.epoch = Some(Epoch::new());
            }
            Event::InitApply(obj) => {
                self.open_epoch(epochs, &mut out);
                self.on_object(&obj, Change::Listed, &mut out);
            }
            Event::InitDone => {
                self.open_epoch(epochs, &mut out);
                if let Some(Epoch {
                    id: Some(id),
                    seen,
                    withheld,
                    objects,
                }) = self.epoch.take()
                {
                    for (route_index, route) in self.plan.routes.iter().enumerate() {
                        for ns in &route.snapshot_namespaces {
                            if withheld.contains(&(route_index, ns.clone())) {
                                // As after a failed list: the epoch stays open, the writer deletes
                                // nothing in this scope until a later list sends every object.
                                self.snapshots_withheld += 1;
                                warn!(watch = %self.plan.key, destination = %route.destination.key, namespace = %ns, epoch = id, "not ending the snapshot: an object of this scope could not be sent, so nothing of it is deleted");
                                continue;
                            }
                            out.push(AgentEvent::SnapshotEnd {
                                destination: route.destination.key.clone(),
                                scope: self.plan.key.scope(ns),
                                epoch: id,
                            });
                            // The type now lives at this version: an empty, complete snapshot of each
                            // superseded version's scope makes the writer remove the stale copies there.
                            for version in &self.plan.resource.superseded {
                                let scope = self.plan.key.scope_at(version, ns);
                                out.push(AgentEvent::SnapshotBegin {
                                    destination: route.destination.key.clone(),
                                    scope: scope.clone(),
                                    epoch: id,
                                });
                                out.push(AgentEvent::SnapshotEnd {
                                    destination: route.destination.key.clone(),
                                    scope,
                                    epoch: id,
                                });
                            }
                        }
                    }
                    // Objects not relisted are gone; the writer sweeps their files.
                    self.hashes.retain(|k, _| seen.contains(k));
                    if let Some(state) = &mut self.ignore {
                        state.held_back.retain(|k| seen.contains(k));
                        state.sent.retain(|k, _| seen.contains(k));
                        state.managers.retain(|k, _| objects.contains(k));
                    }
                }
            }
            Event::Apply(obj) => self.on_object(&obj, Change::Applied, &mut out),
            Event::Delete(obj) => self.on_object(&obj, Change::Deleted, &mut out),
        }
        out
    }

    fn open_epoch(&mut self, epochs: &AtomicU64, out: &mut Vec<AgentEvent>) {
        let epoch = self.epoch.get_or_insert_with(Epoch::new);
        if epoch.id.is_some() {
            return;
        }
        let id = epochs.fetch_add(1, Ordering::Relaxed) + 1;
        epoch.id = Some(id);
        for route in &self.plan.routes {
            for ns in &route.snapshot_namespaces {
                out.push(AgentEvent::SnapshotBegin {
                    destination: route.destination.key.clone(),
                    scope: self.plan.key.scope(ns),
                    epoch: id,
                });
            }
        }
    }

    fn view(&self, obj: &Value, sensitive: bool) -> Option<View> {
        let meta = obj.get("metadata")?;
        let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .map(str::to_owned);
        let key = &self.plan.resource.key;
        let path = match paths::object_path(
            &key.group,
            &key.version,
            &key.resource,
            namespace.as_deref(),
            name,
        ) {
            // Encrypted objects live in `{name}.sops.yaml`, which Flux and the sops CLI recognise.
            Ok(p) if sensitive => format!(
                "{}{}",
                p.strip_suffix(".yaml").unwrap_or(&p),
                sops::FILE_SUFFIX
            ),
            Ok(p) => p,
            Err(e) => {
                warn!(watch = %self.plan.key, error = %e, "skipping object without a usable path");
                return None;
            }
        };
        let text = |field: &str| {
            meta.get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Some(View {
            labels: labels_of(obj),
            object: ObjectRef {
                group: key.group.clone(),
                version: key.version.clone(),
                resource: key.resource.clone(),
                namespace: namespace.clone().unwrap_or_default(),
                name: name.to_owned(),
                uid: text("uid"),
                resource_version: text("resourceVersion"),
            },
            namespace,
            path,
        })
    }

    /// One object event: who it is and who made the change (once for all destinations), then what each
    /// destination's route does with it.
    fn on_object(&mut self, obj: &Value, change: Change, out: &mut Vec<AgentEvent>) {
        if let Some(covered) = &self.covered
            && let Some(ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
            && !covered.contains(ns)
        {
            // No rule of this watch covers the namespace: nothing was ever sent for it, nothing is now.
            return;
        }
        // Belt and braces: a Secret arriving through a type not planned as sensitive is still only ever sent
        // encrypted, and only to destinations that encrypt. Nothing about its content is logged.
        let sensitive = self.plan.sensitive || is_secret(obj);
        let Some(view) = self.view(obj, sensitive) else {
            return;
        };
        let skip = self.derived_skip_reason(obj, &view);
        let plan = Arc::clone(&self.plan);
        let mut renderings = Renderings::new(obj, &plan);
        let user = self.author_of(&view, change, sensitive, &mut renderings);
        let writers = self.writers(obj, &view, change);
        let event = ObjectEvent {
            object: obj,
            view: &view,
            change,
            sensitive,
            skip,
            author: user.as_ref().map(|u| u.name.clone()),
            user: user.as_ref(),
            writers: &writers,
        };
        for (route_index, route) in plan.routes.iter().enumerate() {
            self.route_object(route_index, route, &event, &mut renderings, out);
        }
    }

    /// Derived or generated objects (controller-owned, kube-root-ca.crt) count as not selected: if one was
    /// mirrored and then became derived, its file is removed.
    fn derived_skip_reason(&self, obj: &Value, view: &View) -> Option<&'static str> {
        let skip = self.options.skip_reason(obj);
        if let Some(reason) = skip {
            debug!(watch = %self.plan.key, path = %view.path, reason, "skipping derived object");
        }
        skip
    }

    /// The author of this change, joined once per event, before any skip: a matched fact is consumed even
    /// when the file does not change. Never waits: no fact now means the bot. Admission facts never cover
    /// Secrets (the webhook skips them), and hashing plaintext for a lookup is pointless: encrypted objects
    /// are the bot's.
    fn author_of(
        &self,
        view: &View,
        change: Change,
        sensitive: bool,
        renderings: &mut Renderings<'_>,
    ) -> Option<AttributedUser> {
        if sensitive {
            return None;
        }
        let attribution = self.attribution.as_ref()?;
        let key = &self.plan.resource.key;
        let object_key = ObjectKey::new(
            &key.group,
            &key.resource,
            &view.object.namespace,
            &view.object.name,
        );
        match change {
            Change::Deleted => attribution
                .author_of_delete(&object_key, &view.object.uid)
                .map(|name| AttributedUser {
                    name,
                    groups: Vec::new(),
                }),
            Change::Listed | Change::Applied => {
                let object = renderings.object;
                let (_, hash) = renderings.canonical(false, &view.path, &self.plan.key)?;
                attribution.author_of_upsert(&object_key, object, &hash)
            }
        }
    }

    /// What one destination's route does with the object: nothing (a sensitive object for a destination that
    /// does not encrypt), a delete, or an upsert.
    fn route_object(
        &mut self,
        route_index: usize,
        route: &DestinationRoute,
        event: &ObjectEvent<'_>,
        renderings: &mut Renderings<'_>,
        out: &mut Vec<AgentEvent>,
    ) {
        // Only sensitive objects are encrypted; everything else stays plain canonical YAML.
        let encryption = route
            .destination
            .encryption
            .as_ref()
            .filter(|_| event.sensitive);
        if event.sensitive && encryption.is_none() {
            // Never in plaintext: a destination without encryption gets nothing of this object.
            return;
        }
        let slot = (route_index, event.view.path.clone());
        let held = self.hashes.get(&slot).copied();
        match event.change {
            Change::Deleted => {
                // Deletes are never ignored: the object is gone, and the next snapshot would
                // sweep its file anyway.
                self.forget_slot(&slot);
                if held.is_some() {
                    self.hashes.remove(&slot);
                    if self.route_allows(route, event, Operation::Delete) || event.skip.is_some() {
                        out.push(delete(
                            &route.destination.key,
                            event.view,
                            event.author.clone(),
                        ));
                    }
                }
            }
            Change::Listed | Change::Applied if !self.route_selects(route, event) => {
                // Stopped matching (label removed, became derived): remove the file.
                self.forget_slot(&slot);
                if held.is_some() {
                    self.hashes.remove(&slot);
                    out.push(delete(
                        &route.destination.key,
                        event.view,
                        event.author.clone(),
                    ));
                }
            }
            Change::Listed | Change::Applied => {
                let target = Target {
                    route_index,
                    route,
                    slot,
                    held,
                    encryption,
                };
                self.upsert(&target, event, renderings, out);
            }
        }
    }

    /// Whether a rule of the route selects the object in its current state; a rule's `excludeNames` makes it
    /// not select the object at all.
    fn route_selects(&self, route: &DestinationRoute, event: &ObjectEvent<'_>) -> bool {
        let key = &self.plan.resource.key;
        let view = event.view;
        event.skip.is_none()
            && route.rules.iter().any(|r| {
                r.selects_object(
                    key,
                    view.namespace.as_deref(),
                    &view.labels,
                    &self.plan.namespace_labels,
                ) && !r.excludes_name(&view.object.name)
            })
    }

    /// Whether a rule of the route selects this operation on the object (rules filter live changes by
    /// operation).
    fn route_allows(
        &self,
        route: &DestinationRoute,
        event: &ObjectEvent<'_>,
        op: Operation,
    ) -> bool {
        let key = &self.plan.resource.key;
        let view = event.view;
        route.rules.iter().any(|r| {
            r.matches(
                key,
                op,
                view.namespace.as_deref(),
                &view.labels,
                &self.plan.namespace_labels,
            ) && !r.excludes_name(&view.object.name)
        })
    }

    fn forget_slot(&mut self, slot: &(usize, String)) {
        if let Some(state) = &mut self.ignore {
            state.forget(slot);
        }
    }

    /// A listed or changed object a route selects: hash what the destination would hold, note it in the
    /// snapshot, then send it unless an ignored writer made the change, nothing changed in the file, or the
    /// rules do not select this operation.
    fn upsert(
        &mut self,
        target: &Target<'_>,
        event: &ObjectEvent<'_>,
        renderings: &mut Renderings<'_>,
        out: &mut Vec<AgentEvent>,
    ) {
        let omit_namespace = target.route.destination.placement.omit_namespace;
        let Some((hash, prepared)) = self.destination_hash(target, event, renderings) else {
            return;
        };
        if event.change == Change::Listed
            && let Some(epoch) = &mut self.epoch
        {
            epoch.seen.insert(target.slot.clone());
        }
        let held = target.held;
        if held != Some(hash)
            && self.ignored(
                target.route_index,
                event.view,
                event.change,
                held.is_some(),
                event.writers,
                event.user,
            )
        {
            self.hold_back(
                target.route_index,
                event.view,
                event.change,
                held.is_some(),
                out,
            );
            return;
        }
        if event.change != Change::Listed && !self.is_news(target, event, hash) {
            return;
        }
        let Some((yaml, fingerprint)) =
            self.file_content(target, event, prepared.as_ref(), renderings, omit_namespace)
        else {
            return;
        };
        if let Some(state) = &mut self.ignore {
            state.held_back.remove(&target.slot);
            if state.route_ignores(target.route_index) {
                state
                    .sent
                    .insert(target.slot.clone(), (yaml.clone(), fingerprint.clone()));
            }
        }
        self.hashes.insert(target.slot.clone(), hash);
        out.push(AgentEvent::Upsert {
            destination: target.route.destination.key.clone(),
            path: event.view.path.clone(),
            yaml,
            object: event.view.object.clone(),
            created: held.is_none(),
            author: event.author.clone(),
            fingerprint,
        });
    }

    /// The hash of what the destination would hold: of the keyed fingerprint for an encrypted object (the
    /// ciphertext differs every time), else of the canonical YAML. `None`: the object cannot be sent there
    /// (too large to encrypt, not renderable), already reported.
    fn destination_hash(
        &mut self,
        target: &Target<'_>,
        event: &ObjectEvent<'_>,
        renderings: &mut Renderings<'_>,
    ) -> Option<(Hash, Option<sops::Prepared>)> {
        let omit_namespace = target.route.destination.placement.omit_namespace;
        match target.encryption {
            Some(encryption) => match sops::prepare(renderings.subject(omit_namespace), encryption)
            {
                Ok(prepared) => {
                    let hash: Hash = Sha256::digest(prepared.fingerprint.as_bytes()).into();
                    Some((hash, Some(prepared)))
                }
                Err(e) => {
                    self.not_sent(target, event, &e, true);
                    None
                }
            },
            None => match renderings.canonical(omit_namespace, &event.view.path, &self.plan.key) {
                Some((_, hash)) => Some((hash, None)),
                None => {
                    self.not_sent(target, event, &"not renderable", false);
                    None
                }
            },
        }
    }

    /// Whether a live change (not a relist) changes the destination's file and the route's rules select its
    /// operation (create or update).
    fn is_news(&mut self, target: &Target<'_>, event: &ObjectEvent<'_>, hash: Hash) -> bool {
        if target.held == Some(hash) {
            // Status-only or server-side-only change: same file, nothing to send.
            if let Some(state) = &mut self.ignore {
                state.held_back.remove(&target.slot);
            }
            return false;
        }
        let op = if target.held.is_some() {
            Operation::Update
        } else {
            Operation::Create
        };
        self.route_allows(target.route, event, op)
    }

    /// The file as sent: sealed by the index's sealer (SOPS + age) for an encrypted destination, else the
    /// canonical YAML; with the keyed fingerprint of an encrypted one. `None`: it could not be made, already
    /// reported.
    fn file_content(
        &mut self,
        target: &Target<'_>,
        event: &ObjectEvent<'_>,
        prepared: Option<&sops::Prepared>,
        renderings: &mut Renderings<'_>,
        omit_namespace: bool,
    ) -> Option<(String, Option<String>)> {
        match (prepared, target.encryption) {
            (Some(prepared), Some(encryption)) => match self.sealer.seal(prepared, encryption) {
                Ok(yaml) => Some((yaml, Some(prepared.fingerprint.clone()))),
                Err(e) => {
                    self.not_sent(target, event, &e, true);
                    None
                }
            },
            _ => match renderings.canonical(omit_namespace, &event.view.path, &self.plan.key) {
                Some((yaml, _)) => Some((yaml, None)),
                None => {
                    self.not_sent(target, event, &"not renderable", false);
                    None
                }
            },
        }
    }
}

/// One object event, as every route sees it.
struct ObjectEvent<'a> {
    object: &'a Value,
    view: &'a View,
    change: Change,
    /// Sent only encrypted, and only to destinations that encrypt.
    sensitive: bool,
    /// Why the object counts as derived (not selected), if it does.
    skip: Option<&'static str>,
    /// The attributed user (for `ignore`), and their name as the change's author.
    user: Option<&'a AttributedUser>,
    author: Option<String>,
    /// The field managers that wrote this version (empty when no rule ignores anything).
    writers: &'a BTreeSet<String>,
}

/// One destination's route for an object, and what that destination holds for its path.
struct Target<'a> {
    route_index: usize,
    route: &'a DestinationRoute,
    slot: (usize, String),
    held: Option<Hash>,
    /// The destination's encryption, when the object is sensitive.
    encryption: Option<&'a sops::Encryption>,
}

/// An object's canonical renderings, made lazily and at most once for all destinations: as it is, and without
/// `metadata.namespace` for destinations with `omitNamespace` (rendered and encrypted from that copy).
struct Renderings<'a> {
    object: &'a Value,
    namespace_free: Option<Value>,
    rendered: Option<(String, Hash)>,
    rendered_free: Option<(String, Hash)>,
}

impl<'a> Renderings<'a> {
    fn new(object: &'a Value, plan: &WatchPlan) -> Self {
        let namespace_free = plan
            .routes
            .iter()
            .any(|r| r.destination.placement.omit_namespace)
            .then(|| without_namespace(object));
        Self {
            object,
            namespace_free,
            rendered: None,
            rendered_free: None,
        }
    }

    /// The object a destination gets (without its namespace for `omitNamespace`).
    fn subject(&self, omit_namespace: bool) -> &Value {
        match &self.namespace_free {
            Some(free) if omit_namespace => free,
            _ => self.object,
        }
    }

    /// The canonical YAML and its hash of [`subject`](Self::subject); `None` (logged) when not renderable.
    fn canonical(
        &mut self,
        omit_namespace: bool,
        path: &str,
        watch: &super::discovery::WatchKey,
    ) -> Option<(String, Hash)> {
        let (subject, rendering) = match &self.namespace_free {
            Some(free) if omit_namespace => (free, &mut self.rendered_free),
            _ => (self.object, &mut self.rendered),
        };
        render(rendering, subject, path, watch)
    }
}

impl WatchIndex {
    /// The field managers that wrote this version since the last one seen (empty when no rule
    /// ignores anything); remembers this version's entries for the next change.
    fn writers(&mut self, obj: &Value, view: &View, change: Change) -> BTreeSet<String> {
        let Some(state) = &mut self.ignore else {
            return BTreeSet::new();
        };
        let object_key = (view.object.namespace.clone(), view.object.name.clone());
        if change == Change::Deleted {
            state.managers.remove(&object_key);
            return BTreeSet::new();
        }
        let now = ignore::manager_entries(obj);
        let before = state
            .managers
            .get(&object_key)
            .filter(|(uid, _)| *uid == view.object.uid)
            .map(|(_, entries)| entries.as_slice());
        let writers = ignore::writers(before, &now);
        if change == Change::Listed
            && let Some(epoch) = &mut self.epoch
        {
            epoch.objects.insert(object_key.clone());
        }
        state
            .managers
            .insert(object_key, (view.object.uid.clone(), now));
        writers
    }

    /// Whether every rule of the route that selects this object ignores this change. A relisted
    /// object whose file this watch never sent nor held back is never ignored: the agent cannot
    /// know what Git holds for it (after a restart), so the snapshot writes it as it is.
    fn ignored(
        &self,
        route_index: usize,
        view: &View,
        change: Change,
        held: bool,
        writers: &BTreeSet<String>,
        user: Option<&AttributedUser>,
    ) -> bool {
        let Some(state) = &self.ignore else {
            return false;
        };
        let slot = (route_index, view.path.clone());
        let held_back = state.held_back.contains(&slot);
        if change == Change::Listed && !held && !held_back {
            return false;
        }
        // A held file must be re-sendable as it is, or the snapshot would lose it.
        if held && !state.sent.contains_key(&slot) {
            return false;
        }
        let user = user.map(|u| ignore::User {
            name: &u.name,
            groups: &u.groups,
        });
        let key = &self.plan.resource.key;
        let ns = view.namespace.as_deref();
        let mut selecting = self.plan.routes[route_index]
            .rules
            .iter()
            .zip(&state.rules[route_index])
            .filter(|(rule, _)| {
                rule.selects_object(key, ns, &view.labels, &self.plan.namespace_labels)
                    && !rule.excludes_name(&view.object.name)
            })
            .peekable();
        selecting.peek().is_some()
            && selecting.all(|(_, ignore)| {
                ignore
                    .as_ref()
                    .is_some_and(|i| i.ignores(writers, user.as_ref(), held_back))
            })
    }

    /// Holds the file back for an ignored change: nothing is written; in a relist the content
    /// last sent is sent again, so the snapshot names the file and the writer changes nothing.
    fn hold_back(
        &mut self,
        route_index: usize,
        view: &View,
        change: Change,
        held: bool,
        out: &mut Vec<AgentEvent>,
    ) {
        let Some(state) = &mut self.ignore else {
            return;
        };
        let slot = (route_index, view.path.clone());
        state.held_back.insert(slot.clone());
        let destination = &self.plan.routes[route_index].destination.key;
        debug!(watch = %self.plan.key, path = %view.path, %destination, "change made by ignored writers; file held back");
        if change != Change::Listed || !held {
            return;
        }
        if let Some((yaml, fingerprint)) = state.sent.get(&slot) {
            out.push(AgentEvent::Upsert {
                destination: destination.clone(),
                path: view.path.clone(),
                yaml: yaml.clone(),
                object: view.object.clone(),
                created: false,
                author: None,
                fingerprint: fingerprint.clone(),
            });
        }
    }

    /// An object that could not be sent to one destination (encryption refused or failed, or not renderable).
    /// Nothing is sent, so the destination keeps the file it has. In a (re)list the object's snapshot scope is
    /// not ended for this epoch, or the writer would sweep that file; its hash is kept, so a later delete
    /// still reaches the destination. Logged with the path and size, never the content.
    fn not_sent(
        &mut self,
        target: &Target<'_>,
        event: &ObjectEvent<'_>,
        reason: &dyn std::fmt::Display,
        encryption: bool,
    ) {
        let (route_index, route, view, change, obj) = (
            target.route_index,
            target.route,
            event.view,
            event.change,
            event.object,
        );
        if encryption {
            self.encryption_failures += 1;
        }
        // The plaintext's canonical size (a number only), for the operator to see what is too large.
        let bytes = canonical::render(&canonical::sanitize(obj))
            .map(|yaml| yaml.len())
            .unwrap_or_default();
        let destination = &route.destination.key;
        let listed = change == Change::Listed;
        if encryption {
            warn!(watch = %self.plan.key, path = %view.path, %destination, bytes, error = %reason, listed,
                "cannot encrypt object; not sending it (its file in Git is kept as it is)");
        } else {
            warn!(watch = %self.plan.key, path = %view.path, %destination, bytes, error = %reason, listed,
                "cannot render object; not sending it (its file in Git is kept as it is)");
        }
        self.last_unsent = Some(format!(
            "{} for {destination} ({bytes} bytes): {reason}",
            view.path
        ));
        if !listed {
            return;
        }
        let Some(epoch) = &mut self.epoch else {
            return;
        };
        epoch.seen.insert((route_index, view.path.clone()));
        let scopes = &route.snapshot_namespaces;
        let held: Vec<String> = if scopes.contains("") {
            vec![String::new()]
        } else {
            match view.namespace.as_deref().filter(|ns| scopes.contains(*ns)) {
                Some(ns) => vec![ns.to_owned()],
                // Cannot tell which scope would sweep it: hold them all.
                None => scopes.iter().cloned().collect(),
            }
        };
        epoch
            .withheld
            .extend(held.into_iter().map(|ns| (route_index, ns)));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Part of a (re)list: always sent, so the snapshot names it.
    Listed,
    Applied,
    Deleted,
}

fn delete(dest: &str, view: &View, author: Option<String>) -> AgentEvent {
    AgentEvent::Delete {
        destination: dest.to_owned(),
        path: view.path.clone(),
        object: view.object.clone(),
        author,
    }
}

fn render(
    rendered: &mut Option<(String, Hash)>,
    obj: &Value,
    path: &str,
    watch: &super::discovery::WatchKey,
) -> Option<(String, Hash)> {
    if rendered.is_none() {
        match canonical::to_canonical_yaml(obj) {
            Ok(yaml) => {
                let hash = canonical::content_hash(&yaml);
                *rendered = Some((yaml, hash));
            }
            Err(e) => {
                warn!(watch = %watch, path, error = %e, "cannot render object; skipping it");
                return None;
            }
        }
    }
    rendered.clone()
}

/// The object without `metadata.namespace` (GitDestination `spec.omitNamespace`).
fn without_namespace(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(metadata) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("namespace");
    }
    copy
}

fn is_secret(obj: &Value) -> bool {
    obj.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && obj.get("kind").and_then(Value::as_str) == Some("Secret")
}

#[cfg(test)]
mod tests {
    use super::super::discovery::{DiscoveredResource, WatchKey};
    use super::*;
    use crate::crd::ResourceScope;
    use crate::events::DestinationDecl;
    use crate::rules::compiled::test_support::*;
    use crate::rules::compiled::{CompiledRule, NamespaceLabels, RuleKind};
    use serde_json::json;
    use std::collections::BTreeSet;

    fn plan(routes: Vec<(&str, Vec<CompiledRule>, &[&str])>) -> Arc<WatchPlan> {
        Arc::new(WatchPlan {
            key: WatchKey {
                group: "".into(),
                version: "v1".into(),
                resource: "configmaps".into(),
                namespace: "".into(),
            },
            resource: DiscoveredResource::new("", "v1", "configmaps", "ConfigMap", true),
            routes: routes
                .into_iter()
                .map(|(d, rules, scopes)| DestinationRoute {
                    destination: decl(d),
                    rules,
                    snapshot_namespaces: scopes
                        .iter()
                        .map(|s| (*s).to_owned())
                        .collect::<BTreeSet<_>>(),
                })
                .collect(),
            namespace_labels: NamespaceLabels::new(),
            sensitive: false,
        })
    }

    /// A Secrets watch routed to `encrypted` (with encryption to `identity`) and `plain` (without).
    fn secrets_plan(identity: &age::x25519::Identity) -> Arc<WatchPlan> {
        let rules = |d: &str| {
            vec![cluster_rule(
                d,
                ResourceScope::Namespaced,
                &["secrets"],
                None,
            )]
        };
        let mut encrypted = decl("x/encrypted");
        encrypted.encryption = Some(sops::Encryption {
            recipients: vec![identity.to_public().to_string()],
            fingerprint_key: sops::FingerprintKey::new([1; 32]),
        });
        Arc::new(WatchPlan {
            key: WatchKey {
                group: "".into(),
                version: "v1".into(),
                resource: "secrets".into(),
                namespace: "".into(),
            },
            resource: DiscoveredResource::new("", "v1", "secrets", "Secret", true),
            routes: vec![
                DestinationRoute {
                    destination: decl("x/plain"),
                    rules: rules("x/plain"),
                    snapshot_namespaces: BTreeSet::from([String::new()]),
                },
                DestinationRoute {
                    destination: encrypted,
                    rules: rules("x/encrypted"),
                    snapshot_namespaces: BTreeSet::from([String::new()]),
                },
            ],
            namespace_labels: NamespaceLabels::new(),
            sensitive: true,
        })
    }

    fn secret(value: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db", "namespace": "shop", "resourceVersion": rv, "uid": "uid-db"},
            "data": {"password": value}})
    }

    /// `metadata.namespace` of every upsert's YAML, per destination (`None`: no namespace written).
    fn written_namespaces(events: &[AgentEvent]) -> Vec<(String, String, Option<String>)> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Upsert {
                    destination,
                    path,
                    yaml,
                    ..
                } => {
                    let value = reverser_common::yaml::parse_document(yaml.as_bytes()).unwrap();
                    let namespace = value
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    Some((destination.clone(), path.clone(), namespace))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn destinations_that_omit_namespaces_get_objects_without_one_encrypted_ones_too() {
        let mut routes = plan(vec![
            ("x/free", all_configmaps("x/free")[0].1.clone(), &[""]),
            ("x/plain", all_configmaps("x/plain")[0].1.clone(), &[""]),
        ]);
        Arc::get_mut(&mut routes).unwrap().routes[0]
            .destination
            .placement
            .omit_namespace = true;
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(routes, SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        let out = idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "5")),
            &epochs,
        );
        assert_eq!(
            written_namespaces(&out),
            [
                (
                    "x/free".to_owned(),
                    "core/v1/configmaps/shop/a.yaml".to_owned(),
                    None
                ),
                (
                    "x/plain".to_owned(),
                    "core/v1/configmaps/shop/a.yaml".to_owned(),
                    Some("shop".to_owned())
                ),
            ]
        );
        // A later change is compared with what that destination got: unchanged content sends nothing.
        idx.apply(Event::InitDone, &epochs);
        assert!(
            idx.apply(Event::Apply(cm("shop", "a", json!({}), "1", "6")), &epochs)
                .is_empty()
        );

        // Encrypted objects lose it before encryption (the SOPS MAC covers metadata).
        let identity = age::x25519::Identity::generate();
        let mut secrets = secrets_plan(&identity);
        Arc::get_mut(&mut secrets).unwrap().routes[1]
            .destination
            .placement
            .omit_namespace = true;
        let mut idx = WatchIndex::new(secrets, SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        let out = idx.apply(Event::InitApply(secret("c2VjcmV0LTE=", "1")), &epochs);
        assert_eq!(
            written_namespaces(&out),
            [(
                "x/encrypted".to_owned(),
                "core/v1/secrets/shop/db.sops.yaml".to_owned(),
                None
            )]
        );
    }

    #[test]
    fn secrets_go_only_encrypted_and_only_to_destinations_that_encrypt() {
        let identity = age::x25519::Identity::generate();
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(secrets_plan(&identity), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        let listed = idx.apply(Event::InitApply(secret("c2VjcmV0LTE=", "1")), &epochs);
        let upserts: Vec<&AgentEvent> = listed
            .iter()
            .filter(|e| matches!(e, AgentEvent::Upsert { .. }))
            .collect();
        assert_eq!(upserts.len(), 1, "{}", kinds(&listed).join("\n"));
        let AgentEvent::Upsert {
            destination,
            path,
            yaml,
            fingerprint,
            author,
            ..
        } = upserts[0]
        else {
            unreachable!()
        };
        assert_eq!(destination, "x/encrypted");
        assert_eq!(path, "core/v1/secrets/shop/db.sops.yaml");
        assert!(!yaml.contains("c2VjcmV0LTE="), "plaintext leaked");
        assert!(yaml.contains("ENC[AES256_GCM,data:"));
        assert!(fingerprint.as_deref().is_some_and(|f| f.starts_with("v1:")));
        assert_eq!(
            reverser_common::sops::fingerprint_of(yaml.as_bytes()).as_ref(),
            fingerprint.as_ref()
        );
        assert!(author.is_none());
        idx.apply(Event::InitDone, &epochs);
        // A resync or a metadata-only change: same fingerprint, nothing sent.
        assert!(
            idx.apply(Event::Apply(secret("c2VjcmV0LTE=", "2")), &epochs)
                .is_empty()
        );
        // A changed value is re-encrypted for the encrypting destination only.
        let changed = idx.apply(Event::Apply(secret("c2VjcmV0LTI=", "3")), &epochs);
        assert_eq!(
            kinds(&changed),
            vec!["Upsert x/encrypted core/v1/secrets/shop/db.sops.yaml created=false"]
        );
        let deleted = idx.apply(Event::Delete(secret("c2VjcmV0LTI=", "4")), &epochs);
        assert_eq!(
            kinds(&deleted),
            vec!["Delete x/encrypted core/v1/secrets/shop/db.sops.yaml"]
        );
    }

    /// A Secrets watch (cluster-wide) routed to `shop/enc` (a WatchRule in `shop`), `web/enc` (in `web`),
    /// `x/enc-all` (a ClusterWatchRule), all encrypting to `identity`, and `x/plain` (no encryption).
    fn secrets_plan_with_scopes(identity: &age::x25519::Identity) -> Arc<WatchPlan> {
        let encrypted = |key: &str| {
            let mut d = decl(key);
            d.encryption = Some(sops::Encryption {
                recipients: vec![identity.to_public().to_string()],
                fingerprint_key: sops::FingerprintKey::new([2; 32]),
            });
            d
        };
        let route =
            |destination: DestinationDecl, rule: CompiledRule, scope: &str| DestinationRoute {
                destination,
                rules: vec![rule],
                snapshot_namespaces: BTreeSet::from([scope.to_owned()]),
            };
        let cluster = |d: &str| cluster_rule(d, ResourceScope::Namespaced, &["secrets"], None);
        Arc::new(WatchPlan {
            key: WatchKey {
                group: "".into(),
                version: "v1".into(),
                resource: "secrets".into(),
                namespace: "".into(),
            },
            resource: DiscoveredResource::new("", "v1", "secrets", "Secret", true),
            routes: vec![
                route(
                    encrypted("shop/enc"),
                    watch_rule("shop", "shop/enc", &["secrets"], None),
                    "shop",
                ),
                route(
                    encrypted("web/enc"),
                    watch_rule("web", "web/enc", &["secrets"], None),
                    "web",
                ),
                route(encrypted("x/enc-all"), cluster("x/enc-all"), ""),
                route(decl("x/plain"), cluster("x/plain"), ""),
            ],
            namespace_labels: NamespaceLabels::new(),
            sensitive: true,
        })
    }

    fn named_secret(ns: &str, name: &str, value: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "uid": format!("uid-{name}")},
            "data": {"password": value}})
    }

    /// Lists `objects` as one (re)list and returns what came out.
    fn list(idx: &mut WatchIndex, epochs: &AtomicU64, objects: &[Value]) -> Vec<AgentEvent> {
        let mut out = idx.apply(Event::Init, epochs);
        for obj in objects {
            out.extend(idx.apply(Event::InitApply(obj.clone()), epochs));
        }
        out.extend(idx.apply(Event::InitDone, epochs));
        out
    }

    fn ends(events: &[AgentEvent]) -> Vec<String> {
        kinds(events)
            .into_iter()
            .filter(|k| k.starts_with("End "))
            .collect()
    }

    #[test]
    fn a_secret_too_large_to_encrypt_in_a_list_holds_back_only_its_scopes_snapshot_end() {
        let identity = age::x25519::Identity::generate();
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(
            secrets_plan_with_scopes(&identity),
            SelectionOptions::default(),
        );
        let db = named_secret("shop", "db", "c2VjcmV0LTE=", "1");
        let api = named_secret("web", "api", "c2VjcmV0LTI=", "2");
        let out = list(&mut idx, &epochs, &[db.clone(), api.clone()]);
        assert_eq!(
            ends(&out),
            [
                "End shop/enc \"shop\" 1",
                "End web/enc \"web\" 1",
                "End x/enc-all \"\" 1",
                "End x/plain \"\" 1",
            ]
        );
        assert_eq!(idx.encryption_failures(), 0);

        // Relist: `db` grew past what the agent encrypts. It is not sent, and the scopes that hold its file
        // (shop/enc's `shop`, x/enc-all's cluster-wide scope) are not ended: the writer must not sweep it.
        let huge = "A".repeat(sops::MAX_PLAINTEXT_BYTES + 1);
        let too_large = named_secret("shop", "db", &huge, "3");
        let out = list(&mut idx, &epochs, &[too_large.clone(), api.clone()]);
        assert_eq!(
            kinds(&out),
            [
                "Begin shop/enc \"shop\" 2",
                "Begin web/enc \"web\" 2",
                "Begin x/enc-all \"\" 2",
                "Begin x/plain \"\" 2",
                "Upsert web/enc core/v1/secrets/web/api.sops.yaml created=false",
                "Upsert x/enc-all core/v1/secrets/web/api.sops.yaml created=false",
                "End web/enc \"web\" 2",
                "End x/plain \"\" 2",
            ]
        );
        // Counted once per encrypting destination; both withheld ends counted.
        assert_eq!(idx.encryption_failures(), 2);
        assert_eq!(idx.snapshots_withheld(), 2);
        let last = idx.last_unsent().unwrap();
        assert!(
            last.contains("core/v1/secrets/shop/db.sops.yaml") && last.contains("bytes"),
            "{last}"
        );
        assert!(!last.contains("AAAA"), "no content in the status: {last}");

        // Its file is still known to be there: a delete reaches both destinations that hold it.
        let deleted = idx.apply(Event::Delete(too_large), &epochs);
        assert_eq!(
            kinds(&deleted),
            [
                "Delete shop/enc core/v1/secrets/shop/db.sops.yaml",
                "Delete x/enc-all core/v1/secrets/shop/db.sops.yaml",
            ]
        );

        // A later list that sends everything ends every scope again.
        let out = list(&mut idx, &epochs, &[db, api]);
        assert_eq!(ends(&out).len(), 4, "{}", kinds(&out).join("\n"));
        assert_eq!(idx.encryption_failures(), 2);
    }

    /// A sealer that writes a fixed document naming the fingerprint, or refuses every object.
    #[derive(Debug)]
    struct FixedSealer {
        refuse: bool,
    }

    impl sops::Sealer for FixedSealer {
        fn seal(
            &self,
            prepared: &sops::Prepared,
            _: &sops::Encryption,
        ) -> Result<String, sops::SopsError> {
            if self.refuse {
                return Err(sops::SopsError::NoRecipients);
            }
            Ok(format!("sealed: {}\n", prepared.fingerprint))
        }
    }

    #[test]
    fn sensitive_objects_are_sealed_by_the_injected_sealer_and_a_refusal_withholds_their_scope() {
        let identity = age::x25519::Identity::generate();
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(
            secrets_plan_with_scopes(&identity),
            SelectionOptions::default(),
        )
        .with_sealer(Arc::new(FixedSealer { refuse: false }));
        let db = named_secret("shop", "db", "c2VjcmV0LTE=", "1");
        let out = list(&mut idx, &epochs, std::slice::from_ref(&db));
        let sealed: Vec<(&str, &str, Option<&String>)> = out
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Upsert {
                    destination,
                    yaml,
                    fingerprint,
                    ..
                } => Some((destination.as_str(), yaml.as_str(), fingerprint.as_ref())),
                _ => None,
            })
            .collect();
        assert_eq!(sealed.len(), 2, "{}", kinds(&out).join("\n"));
        for (destination, yaml, fingerprint) in sealed {
            let fingerprint = fingerprint.expect("an encrypted upsert carries its fingerprint");
            assert_eq!(yaml, format!("sealed: {fingerprint}\n"), "{destination}");
        }
        assert_eq!(ends(&out).len(), 4, "{}", kinds(&out).join("\n"));

        // The sealer refuses: nothing of the object is sent, and the scopes holding its file stay open.
        let mut idx = WatchIndex::new(
            secrets_plan_with_scopes(&identity),
            SelectionOptions::default(),
        )
        .with_sealer(Arc::new(FixedSealer { refuse: true }));
        let out = list(&mut idx, &epochs, &[db]);
        assert!(
            !kinds(&out).iter().any(|k| k.starts_with("Upsert")),
            "{}",
            kinds(&out).join("\n")
        );
        assert_eq!(ends(&out), ["End web/enc \"web\" 2", "End x/plain \"\" 2"]);
        assert_eq!(idx.encryption_failures(), 2);
        assert_eq!(idx.snapshots_withheld(), 2);
    }

    /// Snapshot boundaries with their scope's version: `Begin dest v1 "ns" epoch`.
    fn boundaries(events: &[AgentEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::SnapshotBegin {
                    destination,
                    scope,
                    epoch,
                } => Some(format!(
                    "Begin {destination} {} {:?} {epoch}",
                    scope.version, scope.namespace
                )),
                AgentEvent::SnapshotEnd {
                    destination,
                    scope,
                    epoch,
                } => Some(format!(
                    "End {destination} {} {:?} {epoch}",
                    scope.version, scope.namespace
                )),
                _ => None,
            })
            .collect()
    }

    /// `plan` with its type mirrored at `version` and `superseded` versions to clear.
    fn at_version(plan: &WatchPlan, version: &str, superseded: &[&str]) -> Arc<WatchPlan> {
        let mut plan = plan.clone();
        plan.key.version = version.to_owned();
        plan.resource.key.version = version.to_owned();
        plan.resource = plan.resource.with_superseded(superseded.iter().copied());
        Arc::new(plan)
    }

    #[test]
    fn a_complete_snapshot_clears_the_same_scope_at_every_superseded_version() {
        let epochs = AtomicU64::new(0);
        let rule = |d: &str, ns: &str| watch_rule(ns, d, &["configmaps"], None);
        let base = plan(vec![
            ("shop/p", vec![rule("shop/p", "shop")], &["shop"]),
            ("x/all", all_configmaps("x/all").remove(0).1, &[""]),
        ]);
        let mut idx = WatchIndex::new(
            at_version(&base, "v2", &["v1", "v1beta1", "v2"]),
            SelectionOptions::default(),
        );
        let out = list(&mut idx, &epochs, &[cm("shop", "a", json!({}), "1", "5")]);
        assert_eq!(
            boundaries(&out),
            [
                "Begin shop/p v2 \"shop\" 1",
                "Begin x/all v2 \"\" 1",
                "End shop/p v2 \"shop\" 1",
                "Begin shop/p v1 \"shop\" 1",
                "End shop/p v1 \"shop\" 1",
                "Begin shop/p v1beta1 \"shop\" 1",
                "End shop/p v1beta1 \"shop\" 1",
                "End x/all v2 \"\" 1",
                "Begin x/all v1 \"\" 1",
                "End x/all v1 \"\" 1",
                "Begin x/all v1beta1 \"\" 1",
                "End x/all v1beta1 \"\" 1",
            ]
        );
        // The objects themselves go to the mirrored version only.
        assert!(
            kinds(&out)
                .iter()
                .filter(|k| k.starts_with("Upsert"))
                .all(|k| k.contains("/v2/configmaps/shop/a.yaml")),
            "{out:?}"
        );
        // A list that fails (a 403, an error) never completes: nothing is cleared anywhere.
        let failed = idx.apply(Event::Init, &epochs);
        assert!(failed.is_empty(), "{failed:?}");
        let partial = idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "6")),
            &epochs,
        );
        assert!(
            boundaries(&partial)
                .iter()
                .all(|b| b.starts_with("Begin") && b.contains(" v2 ")),
            "{partial:?}"
        );
        // Without superseded versions a snapshot touches its own version only.
        let mut plain = WatchIndex::new(at_version(&base, "v2", &[]), SelectionOptions::default());
        let out = list(&mut plain, &epochs, &[]);
        assert!(
            boundaries(&out).iter().all(|b| b.contains(" v2 ")),
            "{out:?}"
        );
    }

    #[test]
    fn a_withheld_snapshot_end_clears_no_superseded_version_either() {
        let identity = age::x25519::Identity::generate();
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(
            at_version(&secrets_plan_with_scopes(&identity), "v2", &["v1"]),
            SelectionOptions::default(),
        );
        let huge = "A".repeat(sops::MAX_PLAINTEXT_BYTES + 1);
        let out = list(
            &mut idx,
            &epochs,
            &[
                named_secret("shop", "db", &huge, "1"),
                named_secret("web", "api", "c2VjcmV0LTI=", "2"),
            ],
        );
        let ends: Vec<String> = boundaries(&out)
            .into_iter()
            .filter(|b| b.starts_with("End"))
            .collect();
        // `shop/enc` and `x/enc-all` hold the unsendable `db` (maybe only at v1): neither its scope nor the v1
        // copy of it is cleared.
        assert_eq!(
            ends,
            [
                "End web/enc v2 \"web\" 1",
                "End web/enc v1 \"web\" 1",
                "End x/plain v2 \"\" 1",
                "End x/plain v1 \"\" 1",
            ]
        );
    }

    #[test]
    fn a_live_update_that_cannot_be_encrypted_keeps_the_old_file() {
        let identity = age::x25519::Identity::generate();
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(secrets_plan(&identity), SelectionOptions::default());
        list(&mut idx, &epochs, &[secret("c2VjcmV0LTE=", "1")]);
        let huge = "A".repeat(sops::MAX_PLAINTEXT_BYTES + 1);
        // Nothing is sent (no upsert, no delete): the destination keeps the last version it got.
        assert!(
            idx.apply(Event::Apply(secret(&huge, "2")), &epochs)
                .is_empty()
        );
        assert_eq!(idx.encryption_failures(), 1);
        assert_eq!(
            idx.snapshots_withheld(),
            0,
            "not a list: no snapshot involved"
        );
        // The held version is still the old one: going back to it sends nothing, a new value is sent.
        assert!(
            idx.apply(Event::Apply(secret("c2VjcmV0LTE=", "3")), &epochs)
                .is_empty()
        );
        assert_eq!(
            kinds(&idx.apply(Event::Apply(secret("c2VjcmV0LTI=", "4")), &epochs)),
            ["Upsert x/encrypted core/v1/secrets/shop/db.sops.yaml created=false"]
        );
    }

    #[test]
    fn a_secret_through_a_plain_watch_is_never_sent() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        let out = idx.apply(Event::InitApply(secret("c2VjcmV0", "1")), &epochs);
        assert!(!out.iter().any(|e| matches!(e, AgentEvent::Upsert { .. })));
    }

    #[test]
    fn a_cluster_wide_watch_for_namespaced_rules_drops_other_namespaces_entirely() {
        let epochs = AtomicU64::new(0);
        let rules = vec![
            watch_rule("a", "x/prod", &["configmaps"], None),
            watch_rule("b", "x/prod", &["configmaps"], None),
        ];
        let plan = plan(vec![("x/prod", rules, &["a", "b"])]);
        assert!(plan.merges_namespaces());
        let mut idx = WatchIndex::new(plan, SelectionOptions::default());
        let mut out = idx.apply(Event::Init, &epochs);
        for (ns, rv) in [("a", "1"), ("other", "2"), ("b", "3")] {
            out.extend(idx.apply(Event::InitApply(cm(ns, "app", json!({}), "v", rv)), &epochs));
        }
        out.extend(idx.apply(Event::InitDone, &epochs));
        // Snapshots of exactly the rules' namespaces; nothing of `other`.
        assert_eq!(
            kinds(&out),
            vec![
                "Begin x/prod \"a\" 1",
                "Begin x/prod \"b\" 1",
                "Upsert x/prod core/v1/configmaps/a/app.yaml created=true",
                "Upsert x/prod core/v1/configmaps/b/app.yaml created=true",
                "End x/prod \"a\" 1",
                "End x/prod \"b\" 1",
            ]
        );
        assert_eq!(idx.len(), 2);
        // Changes and deletes in `other` send nothing and count as nothing.
        let changed = idx.apply(
            Event::Apply(cm("other", "app", json!({}), "w", "4")),
            &epochs,
        );
        let deleted = idx.apply(
            Event::Delete(cm("other", "app", json!({}), "w", "5")),
            &epochs,
        );
        assert!(
            changed.is_empty() && deleted.is_empty(),
            "{changed:?} {deleted:?}"
        );
        assert_eq!(idx.len(), 2);
        // In a covered namespace they still do.
        let deleted = idx.apply(Event::Delete(cm("a", "app", json!({}), "v", "6")), &epochs);
        assert_eq!(
            kinds(&deleted),
            vec!["Delete x/prod core/v1/configmaps/a/app.yaml"]
        );
    }

    fn cm(ns: &str, name: &str, labels: Value, data: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "resourceVersion": rv, "uid": format!("uid-{name}")},
            "data": {"k": data}})
    }

    fn all_configmaps(dest: &str) -> Vec<(&str, Vec<CompiledRule>, &'static [&'static str])> {
        vec![(
            dest,
            vec![cluster_rule(
                dest,
                ResourceScope::Namespaced,
                &["configmaps"],
                None,
            )],
            &[""],
        )]
    }

    fn kinds(events: &[AgentEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                AgentEvent::Destination(d) => format!("Destination {}", d.key),
                AgentEvent::Upsert {
                    destination,
                    path,
                    created,
                    ..
                } => {
                    format!("Upsert {destination} {path} created={created}")
                }
                AgentEvent::Delete {
                    destination, path, ..
                } => format!("Delete {destination} {path}"),
                AgentEvent::SnapshotBegin {
                    destination,
                    scope,
                    epoch,
                } => {
                    format!("Begin {destination} {:?} {epoch}", scope.namespace)
                }
                AgentEvent::SnapshotEnd {
                    destination,
                    scope,
                    epoch,
                } => {
                    format!("End {destination} {:?} {epoch}", scope.namespace)
                }
                AgentEvent::Flush { destination, .. } => format!("Flush {destination}"),
            })
            .collect()
    }

    fn authors(events: &[AgentEvent]) -> Vec<(String, Option<String>)> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Upsert { path, author, .. } => {
                    Some((format!("upsert {path}"), author.clone()))
                }
                AgentEvent::Delete { path, author, .. } => {
                    Some((format!("delete {path}"), author.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn without_a_store_every_change_is_the_bots() {
        let mut index = WatchIndex::new(plan(all_configmaps("d")), SelectionOptions::default());
        let epochs = AtomicU64::new(0);
        let out = index.apply(Event::Apply(cm("shop", "a", json!({}), "1", "1")), &epochs);
        assert_eq!(
            authors(&out),
            [("upsert core/v1/configmaps/shop/a.yaml".to_owned(), None)]
        );
    }

    #[test]
    fn initial_list_opens_an_epoch_sends_every_object_and_ends_it() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        let mut out = idx.apply(Event::Init, &epochs);
        assert!(out.is_empty(), "the begin waits for the first object");
        out.extend(idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "5")),
            &epochs,
        ));
        out.extend(idx.apply(Event::InitDone, &epochs));
        assert_eq!(
            kinds(&out),
            vec![
                "Begin x/prod \"\" 1",
                "Upsert x/prod core/v1/configmaps/shop/a.yaml created=true",
                "End x/prod \"\" 1",
            ]
        );
        let AgentEvent::Upsert { yaml, object, .. } = &out[1] else {
            unreachable!()
        };
        assert_eq!(
            yaml,
            &canonical::to_canonical_yaml(&cm("shop", "a", json!({}), "1", "5")).unwrap()
        );
        assert_eq!(
            (object.uid.as_str(), object.resource_version.as_str()),
            ("uid-a", "5")
        );
    }

    #[test]
    fn an_empty_list_still_opens_and_ends_the_snapshot() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        assert_eq!(
            kinds(&idx.apply(Event::InitDone, &epochs)),
            vec!["Begin x/prod \"\" 1", "End x/prod \"\" 1"]
        );
    }

    #[test]
    fn a_list_that_fails_before_any_object_opens_no_epoch() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        // Paged lists report Init before listing; a 403 then retries with another Init.
        assert!(idx.apply(Event::Init, &epochs).is_empty());
        assert!(idx.apply(Event::Init, &epochs).is_empty());
        assert_eq!(epochs.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_relist_always_resends_and_forgets_objects_it_did_not_see() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "5")),
            &epochs,
        );
        idx.apply(
            Event::InitApply(cm("shop", "b", json!({}), "1", "6")),
            &epochs,
        );
        idx.apply(Event::InitDone, &epochs);
        assert_eq!(idx.len(), 2);
        // Relist after a 410: `a` is unchanged but is sent again; `b` is gone, which the
        // writer learns from the snapshot, not from an explicit delete.
        let mut out = idx.apply(Event::Init, &epochs);
        out.extend(idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "9")),
            &epochs,
        ));
        out.extend(idx.apply(Event::InitDone, &epochs));
        assert_eq!(
            kinds(&out),
            vec![
                "Begin x/prod \"\" 2",
                "Upsert x/prod core/v1/configmaps/shop/a.yaml created=false",
                "End x/prod \"\" 2",
            ]
        );
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn unchanged_canonical_yaml_is_not_resent_but_changes_and_deletes_are() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        idx.apply(
            Event::InitApply(cm("shop", "a", json!({}), "1", "5")),
            &epochs,
        );
        idx.apply(Event::InitDone, &epochs);
        let same = idx.apply(Event::Apply(cm("shop", "a", json!({}), "1", "7")), &epochs);
        assert!(same.is_empty(), "only the resourceVersion changed");
        let changed = idx.apply(Event::Apply(cm("shop", "a", json!({}), "2", "8")), &epochs);
        assert_eq!(
            kinds(&changed),
            vec!["Upsert x/prod core/v1/configmaps/shop/a.yaml created=false"]
        );
        let created = idx.apply(Event::Apply(cm("shop", "n", json!({}), "1", "9")), &epochs);
        assert_eq!(
            kinds(&created),
            vec!["Upsert x/prod core/v1/configmaps/shop/n.yaml created=true"]
        );
        let deleted = idx.apply(
            Event::Delete(cm("shop", "a", json!({}), "2", "10")),
            &epochs,
        );
        assert_eq!(
            kinds(&deleted),
            vec!["Delete x/prod core/v1/configmaps/shop/a.yaml"]
        );
        // A delete of something never mirrored sends nothing.
        assert!(
            idx.apply(
                Event::Delete(cm("shop", "zz", json!({}), "1", "11")),
                &epochs
            )
            .is_empty()
        );
    }

    #[test]
    fn an_object_that_stops_matching_is_deleted_only_for_that_destination() {
        let epochs = AtomicU64::new(0);
        let p = plan(vec![
            (
                "shop/mirror",
                vec![watch_rule(
                    "shop",
                    "shop/mirror",
                    &["configmaps"],
                    Some(match_labels(&[("mirror", "yes")])),
                )],
                &["shop"],
            ),
            ("x/all", all_configmaps("x/all").remove(0).1, &[""]),
        ]);
        let mut idx = WatchIndex::new(p, SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        idx.apply(Event::InitDone, &epochs);
        let both = idx.apply(
            Event::Apply(cm("shop", "a", json!({"mirror": "yes"}), "1", "5")),
            &epochs,
        );
        assert_eq!(
            kinds(&both),
            vec![
                "Upsert shop/mirror core/v1/configmaps/shop/a.yaml created=true",
                "Upsert x/all core/v1/configmaps/shop/a.yaml created=true",
            ]
        );
        let unlabeled = idx.apply(Event::Apply(cm("shop", "a", json!({}), "1", "6")), &epochs);
        assert_eq!(
            kinds(&unlabeled),
            vec![
                "Delete shop/mirror core/v1/configmaps/shop/a.yaml",
                "Upsert x/all core/v1/configmaps/shop/a.yaml created=false",
            ]
        );
        let relabeled = idx.apply(
            Event::Apply(cm("shop", "a", json!({"mirror": "yes"}), "1", "7")),
            &epochs,
        );
        assert_eq!(
            kinds(&relabeled),
            vec![
                "Upsert shop/mirror core/v1/configmaps/shop/a.yaml created=true",
                "Upsert x/all core/v1/configmaps/shop/a.yaml created=false",
            ]
        );
        // Another namespace never reaches the WatchRule's destination.
        let other = idx.apply(
            Event::Apply(cm("web", "b", json!({"mirror": "yes"}), "1", "8")),
            &epochs,
        );
        assert_eq!(
            kinds(&other),
            vec!["Upsert x/all core/v1/configmaps/web/b.yaml created=true"]
        );
    }

    #[test]
    fn derived_objects_and_secrets_are_never_sent() {
        let epochs = AtomicU64::new(0);
        let mut idx = WatchIndex::new(plan(all_configmaps("x/prod")), SelectionOptions::default());
        idx.apply(Event::Init, &epochs);
        let root_ca = cm("shop", "kube-root-ca.crt", json!({}), "1", "5");
        let mut owned = cm("shop", "owned", json!({}), "1", "6");
        owned["metadata"]["ownerReferences"] =
            json!([{"kind": "X", "name": "x", "controller": true}]);
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "shop"}, "data": {"p": "c2VjcmV0"}});
        let mut out = Vec::new();
        for obj in [root_ca, owned, secret] {
            out.extend(idx.apply(Event::InitApply(obj), &epochs));
        }
        out.extend(idx.apply(Event::InitDone, &epochs));
        assert_eq!(
            kinds(&out),
            vec!["Begin x/prod \"\" 1", "End x/prod \"\" 1"]
        );
    }

    #[test]
    fn operations_filter_live_changes_but_not_snapshots() {
        let epochs = AtomicU64::new(0);
        let mut rule = watch_rule("shop", "shop/p", &["configmaps"], None);
        if let RuleKind::Namespaced { spec, .. } = &mut rule.kind {
            spec.rules[0].operations = vec![crate::crd::OperationType::Create];
        }
        let mut idx = WatchIndex::new(
            plan(vec![("shop/p", vec![rule], &["shop"])]),
            SelectionOptions::default(),
        );
        idx.apply(Event::Init, &epochs);
        idx.apply(Event::InitDone, &epochs);
        let created = idx.apply(Event::Apply(cm("shop", "a", json!({}), "1", "5")), &epochs);
        assert_eq!(created.len(), 1);
        assert!(
            idx.apply(Event::Apply(cm("shop", "a", json!({}), "2", "6")), &epochs)
                .is_empty()
        );
        assert!(
            idx.apply(Event::Delete(cm("shop", "a", json!({}), "2", "7")), &epochs)
                .is_empty()
        );
    }

    /// A rule selecting every ConfigMap that ignores `ignore`.
    fn ignoring(mut rule: CompiledRule, ignore: Value) -> CompiledRule {
        let ignore = Some(serde_json::from_value(ignore).unwrap());
        match &mut rule.kind {
            RuleKind::Namespaced { spec, .. } => spec.ignore = ignore,
            RuleKind::Cluster { spec } => spec.ignore = ignore,
        }
        rule
    }

    fn flux_ignoring_plan(extra: Option<CompiledRule>) -> Arc<WatchPlan> {
        let mut rules = vec![ignoring(
            cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None),
            json!({"presets": ["Flux"], "users": ["bob"]}),
        )];
        rules.extend(extra);
        plan(vec![("d", rules, &[""])])
    }

    /// ConfigMap `name` holding `data`, written by `managers` as (manager, operation, time).
    fn managed(name: &str, data: &str, rv: &str, managers: &[(&str, &str, &str)]) -> Value {
        let mut obj = cm("shop", name, json!({}), data, rv);
        obj["metadata"]["managedFields"] = managers
            .iter()
            .map(|(m, op, time)| {
                json!({"manager": m, "operation": op, "apiVersion": "v1", "time": time,
                       "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:k": {}}}})
            })
            .collect();
        obj
    }

    /// (path, YAML) of the upserts.
    fn upserts(events: &[AgentEvent]) -> Vec<(String, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Upsert { path, yaml, .. } => Some((path.clone(), yaml.clone())),
                _ => None,
            })
            .collect()
    }

    const CREATE: (&str, &str, &str) = ("kubectl-create", "Update", "2026-01-01T00:00:00Z");
    const FLUX_1: (&str, &str, &str) = ("kustomize-controller", "Apply", "2026-01-01T00:00:10Z");
    const FLUX_2: (&str, &str, &str) = ("kustomize-controller", "Apply", "2026-01-01T00:00:20Z");
    const EDIT: (&str, &str, &str) = ("kubectl-edit", "Update", "2026-01-01T00:00:30Z");
    const PATH_A: &str = "core/v1/configmaps/shop/a.yaml";

    #[test]
    fn ignored_writers_hold_the_file_back_until_someone_else_writes_it_whole() {
        let mut idx = WatchIndex::new(flux_ignoring_plan(None), SelectionOptions::default());
        let epochs = AtomicU64::new(0);
        idx.apply(Event::Init, &epochs);
        let listed = idx.apply(
            Event::InitApply(managed("a", "person-0", "1", &[CREATE])),
            &epochs,
        );
        assert_eq!(upserts(&listed).len(), 1);
        idx.apply(Event::InitDone, &epochs);
        // Flux applies: no file change, twice (the second within the same second: its entry does
        // not move, and the file stays held back).
        for (data, rv) in [("flux-1", "2"), ("flux-1b", "3")] {
            let out = idx.apply(
                Event::Apply(managed("a", data, rv, &[CREATE, FLUX_1])),
                &epochs,
            );
            assert!(out.is_empty(), "{data}: {}", kinds(&out).join(", "));
        }
        // A person's edit writes the whole live object, Flux's value included.
        let mut edited = managed("a", "person-2", "4", &[CREATE, FLUX_1, EDIT]);
        edited["data"]["flux"] = json!("flux-1b");
        let out = idx.apply(Event::Apply(edited), &epochs);
        let sent = upserts(&out);
        assert_eq!(sent.len(), 1, "{}", kinds(&out).join(", "));
        assert!(
            sent[0].1.contains("person-2") && sent[0].1.contains("flux-1b"),
            "{}",
            sent[0].1
        );
        // Flux again: held back again.
        assert!(
            idx.apply(
                Event::Apply(managed("a", "flux-3", "5", &[CREATE, FLUX_2, EDIT])),
                &epochs
            )
            .is_empty()
        );
    }

    #[test]
    fn objects_created_by_ignored_writers_get_no_file_until_a_person_changes_them() {
        let mut idx = WatchIndex::new(flux_ignoring_plan(None), SelectionOptions::default());
        let epochs = AtomicU64::new(0);
        assert!(
            idx.apply(
                Event::Apply(managed("b", "flux-0", "1", &[FLUX_1])),
                &epochs
            )
            .is_empty()
        );
        let out = idx.apply(
            Event::Apply(managed("b", "person-1", "2", &[FLUX_1, EDIT])),
            &epochs,
        );
        assert_eq!(
            kinds(&out),
            ["Upsert d core/v1/configmaps/shop/b.yaml created=true"]
        );
        // A delete is mirrored, whoever makes it; one of an object never sent sends nothing.
        assert!(
            idx.apply(
                Event::Apply(managed("c", "flux-0", "3", &[FLUX_1])),
                &epochs
            )
            .is_empty()
        );
        assert!(
            idx.apply(
                Event::Delete(managed("c", "flux-0", "4", &[FLUX_1])),
                &epochs
            )
            .is_empty()
        );
        let out = idx.apply(
            Event::Apply(managed("b", "flux-2", "5", &[FLUX_2, EDIT])),
            &epochs,
        );
        assert!(out.is_empty());
        let out = idx.apply(
            Event::Delete(managed("b", "flux-2", "6", &[FLUX_2, EDIT])),
            &epochs,
        );
        assert_eq!(kinds(&out), ["Delete d core/v1/configmaps/shop/b.yaml"]);
    }

    #[test]
    fn a_relist_keeps_held_back_files_as_they_are_and_mirrors_a_persons_change() {
        let mut idx = WatchIndex::new(flux_ignoring_plan(None), SelectionOptions::default());
        let epochs = AtomicU64::new(0);
        let relist = |idx: &mut WatchIndex, objects: Vec<Value>| {
            let mut out = idx.apply(Event::Init, &epochs);
            for obj in objects {
                out.extend(idx.apply(Event::InitApply(obj), &epochs));
            }
            out.extend(idx.apply(Event::InitDone, &epochs));
            out
        };
        // The first list mirrors every object, also one only Flux ever wrote: the agent cannot
        // know what Git holds for it.
        let out = relist(
            &mut idx,
            vec![
                managed("a", "person-0", "1", &[CREATE]),
                managed("f", "flux-0", "1", &[FLUX_1]),
            ],
        );
        assert_eq!(upserts(&out).len(), 2, "{}", kinds(&out).join(", "));
        let first_a = upserts(&out)
            .into_iter()
            .find(|(p, _)| p == PATH_A)
            .unwrap()
            .1;
        // Flux changes `a` and creates `b`: held back.
        assert!(
            idx.apply(
                Event::Apply(managed("a", "flux-1", "2", &[CREATE, FLUX_1])),
                &epochs
            )
            .is_empty()
        );
        assert!(
            idx.apply(
                Event::Apply(managed("b", "flux-1", "3", &[FLUX_1])),
                &epochs
            )
            .is_empty()
        );
        // A relist names `a` with the content last sent (the writer changes nothing) and leaves
        // `b` out (it never had a file); both snapshot markers are sent, so nothing is withheld.
        let out = relist(
            &mut idx,
            vec![
                managed("a", "flux-1", "2", &[CREATE, FLUX_1]),
                managed("b", "flux-1", "3", &[FLUX_1]),
                managed("f", "flux-0", "1", &[FLUX_1]),
            ],
        );
        let sent = upserts(&out);
        assert_eq!(sent.len(), 2, "{}", kinds(&out).join(", "));
        assert_eq!(sent[0], (PATH_A.to_owned(), first_a.clone()));
        assert!(kinds(&out).iter().any(|k| k.starts_with("End d")));
        // The same again after more Flux writes during a watch gap.
        let out = relist(
            &mut idx,
            vec![
                managed("a", "flux-2", "4", &[CREATE, FLUX_2]),
                managed("b", "flux-2", "5", &[FLUX_2]),
            ],
        );
        assert_eq!(upserts(&out), [(PATH_A.to_owned(), first_a)]);
        // A person's edit during a gap reaches Git through the relist, whole, and so does `b`.
        let out = relist(
            &mut idx,
            vec![
                managed("a", "person-3", "6", &[CREATE, FLUX_2, EDIT]),
                managed("b", "person-3", "7", &[FLUX_2, EDIT]),
            ],
        );
        let sent = upserts(&out);
        assert_eq!(sent.len(), 2, "{}", kinds(&out).join(", "));
        assert!(
            sent.iter().all(|(_, yaml)| yaml.contains("person-3")),
            "{sent:?}"
        );
        // Once mirrored, a relist of the unchanged object sends it as it is.
        let out = relist(
            &mut idx,
            vec![managed("a", "person-3", "6", &[CREATE, FLUX_2, EDIT])],
        );
        assert!(upserts(&out)[0].1.contains("person-3"));
    }

    #[test]
    fn a_change_is_ignored_only_when_every_rule_selecting_the_object_ignores_it() {
        let plain = cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None);
        let mut idx = WatchIndex::new(flux_ignoring_plan(Some(plain)), SelectionOptions::default());
        let epochs = AtomicU64::new(0);
        idx.apply(
            Event::Apply(managed("a", "person-0", "1", &[CREATE])),
            &epochs,
        );
        let out = idx.apply(
            Event::Apply(managed("a", "flux-1", "2", &[CREATE, FLUX_1])),
            &epochs,
        );
        assert_eq!(upserts(&out).len(), 1);
        // Without managed fields (an API server that does not track them) nothing is ignored.
        let mut idx = WatchIndex::new(flux_ignoring_plan(None), SelectionOptions::default());
        idx.apply(Event::Apply(cm("shop", "a", json!({}), "1", "1")), &epochs);
        let out = idx.apply(Event::Apply(cm("shop", "a", json!({}), "2", "2")), &epochs);
        assert_eq!(upserts(&out).len(), 1);
    }

    #[test]
    fn names_a_rule_excludes_are_left_out_of_snapshots_and_live_changes() {
        let mut rule = cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None);
        if let RuleKind::Cluster { spec } = &mut rule.kind {
            spec.exclude_names = vec!["*-lock".into(), "cache-?".into()];
        }
        let mut idx = WatchIndex::new(
            plan(vec![("d", vec![rule], &[""])]),
            SelectionOptions::default(),
        );
        let epochs = AtomicU64::new(0);
        idx.apply(Event::Init, &epochs);
        let mut out = Vec::new();
        for name in ["app", "leader-lock", "cache-1", "cache-12"] {
            out.extend(idx.apply(
                Event::InitApply(cm("shop", name, json!({}), "1", "1")),
                &epochs,
            ));
        }
        out.extend(idx.apply(Event::InitDone, &epochs));
        let sent: Vec<String> = upserts(&out).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            sent,
            [
                "core/v1/configmaps/shop/app.yaml",
                "core/v1/configmaps/shop/cache-12.yaml"
            ]
        );
        // Live changes of excluded names send nothing, deletes neither.
        assert!(
            idx.apply(
                Event::Apply(cm("shop", "leader-lock", json!({}), "2", "2")),
                &epochs
            )
            .is_empty()
        );
        assert!(
            idx.apply(
                Event::Delete(cm("shop", "leader-lock", json!({}), "2", "3")),
                &epochs
            )
            .is_empty()
        );
        // Another rule of the destination without the exclusion still selects the object.
        let mut excluding = cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None);
        if let RuleKind::Cluster { spec } = &mut excluding.kind {
            spec.exclude_names = vec!["*".into()];
        }
        let plain = cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None);
        let mut idx = WatchIndex::new(
            plan(vec![("d", vec![excluding, plain], &[""])]),
            SelectionOptions::default(),
        );
        assert_eq!(
            upserts(&idx.apply(
                Event::Apply(cm("shop", "x-lock", json!({}), "1", "1")),
                &epochs
            ))
            .len(),
            1
        );
    }
}

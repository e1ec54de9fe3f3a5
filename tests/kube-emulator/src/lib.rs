//! A JSON-only Kubernetes API-server emulator for gitops-reverser's tests, benchmarks and demo.
//!
//! Data flow:
//!
//! ```text
//!  HTTP request ──► server (routing, Accept/Content-Type, identity, fault hooks)
//!                     │
//!                     ├─ discovery: registry (built-ins from k8s-openapi + served CRDs)
//!                     ├─ reads:  store snapshot ──► render (served version, list encoding)
//!                     ├─ writes: api plans against a snapshot ──► admission (validating
//!                     │          webhooks over HTTPS, no lock held) ──► commit (re-plan on race)
//!                     │          ──► store: new global resourceVersion + history event
//!                     └─ watch:  task replays history after the requested resourceVersion,
//!                                then follows new events (woken through a watch channel)
//! ```
//!
//! The store keeps every object as a `serde_json::Value` in a `BTreeMap` keyed by
//! (group, resource, namespace, name) and a bounded history of change events. That history
//! serves watch resumes (410 Expired once trimmed or compacted) and consistent paginated or
//! `resourceVersionMatch=Exact` lists (by rolling back the changes made since).
//!
//! Anything Kubernetes does that this emulator does not is answered with 400/405/406/415/501 and
//! a `Status` body instead of being silently ignored; see the crate README for the list.

#![forbid(unsafe_code)]

mod admission;
mod api;
mod auth;
mod discovery;
mod faults;
mod openapi;
mod patch;
mod render;
mod requests;
mod resources;
mod selector;
mod server;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use crate::auth::{Tokens, UserInfo};
pub use crate::faults::Faults;
pub use crate::requests::{RequestCounts, RequestKind};
pub use crate::status::ApiError;

use crate::api::WriteOpts;
use crate::store::Store;

/// Errors of the emulator's Rust API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("token file: {0}")]
    Tokens(String),
    #[error("no served resource for apiVersion {api_version:?} kind {kind:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("applying {kind} {name:?}: {source}")]
    Api {
        kind: String,
        name: String,
        source: Box<ApiError>,
    },
}

/// Tunables; the defaults suit tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many change events are kept for watch resumes and consistent lists.
    pub history_limit: usize,
    /// How often idle watches that allow bookmarks get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history_limit: 200_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    pub(crate) faults: Faults,
    tokens: RwLock<Tokens>,
    pub(crate) config: Config,
    pub(crate) shutdown: CancellationToken,
    pub(crate) open_watches: AtomicUsize,
    pub(crate) addr: SocketAddr,
    pub(crate) requests: requests::RequestCounter,
}

/// The state every request handler shares.
#[derive(Debug, Clone)]
pub(crate) struct Shared(Arc<Inner>);

impl std::ops::Deref for Shared {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Shared {
    pub(crate) fn tokens(&self) -> std::sync::RwLockReadGuard<'_, Tokens> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds an [`Emulator`] with non-default settings.
#[derive(Debug, Default)]
pub struct EmulatorBuilder {
    config: Config,
    tokens: Tokens,
}

impl EmulatorBuilder {
    pub fn history_limit(mut self, events: usize) -> Self {
        self.config.history_limit = events;
        self
    }

    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.config.bookmark_interval = every;
        self
    }

    /// Bearer tokens, as parsed from a static token file.
    pub fn tokens(mut self, tokens: Tokens) -> Self {
        self.tokens = tokens;
        self
    }

    pub async fn start(self, addr: SocketAddr) -> Result<Emulator, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let store = Arc::new(Store::new(self.config.history_limit));
        let shared = Shared(Arc::new(Inner {
            faults: Faults::new(store.clone()),
            store,
            tokens: RwLock::new(self.tokens),
            config: self.config,
            shutdown: CancellationToken::new(),
            open_watches: AtomicUsize::new(0),
            addr: local,
            requests: requests::RequestCounter::default(),
        }));
        let emulator = Emulator {
            shared: shared.clone(),
            task: Arc::new(Mutex::new(None)),
        };
        emulator
            .apply_yaml(DEFAULT_NAMESPACES)
            .await
            .expect("the default namespaces are valid");
        let task = tokio::spawn(server::serve(listener, shared));
        *emulator.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(emulator)
    }
}

const DEFAULT_NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-public}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-node-lease}
";

/// A running emulator; clones share it.
#[derive(Debug, Clone)]
pub struct Emulator {
    shared: Shared,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Emulator {
    /// Starts serving plain HTTP on `addr` (`127.0.0.1:0` picks a free port), with the
    /// `default`, `kube-system`, `kube-public` and `kube-node-lease` namespaces.
    pub async fn start(addr: SocketAddr) -> Result<Emulator, Error> {
        EmulatorBuilder::default().start(addr).await
    }

    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (context `kube-emulator`, namespace `default`) pointing at this emulator,
    /// authenticating with `user_token` when given.
    pub fn kubeconfig_yaml(&self, user_token: Option<&str>) -> String {
        let user = match user_token {
            Some(t) => format!("{{token: {}}}", serde_json::Value::String(t.to_string())),
            None => "{}".to_string(),
        };
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: kube-emulator
  cluster:
    server: {url}
contexts:
- name: kube-emulator
  context:
    cluster: kube-emulator
    user: kube-emulator
    namespace: default
current-context: kube-emulator
users:
- name: kube-emulator
  user: {user}
preferences: {{}}
",
            url = self.url()
        )
    }

    /// A kube-rs client for this emulator (as the cluster admin, default namespace `default`).
    pub async fn client(&self) -> kube::Client {
        let uri: http::Uri = self.url().parse().expect("emulator URL is a valid URI");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("a kube client for a plain-HTTP URL")
    }

    /// Maps `token` to a user for later requests (as a token file line would).
    pub fn add_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.shared
            .tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, username, groups);
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The API requests answered since the start (or the last [`Emulator::reset_requests`]).
    pub fn requests(&self) -> RequestCounts {
        self.shared.requests.counts()
    }

    /// Starts counting requests from zero.
    pub fn reset_requests(&self) {
        self.shared.requests.reset();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.read().rv()
    }

    /// How many objects are stored.
    pub fn object_count(&self) -> usize {
        self.shared.store.read().object_count()
    }

    /// Creates or replaces every object in a multi-document YAML stream (a `kind: List` is
    /// unpacked), CustomResourceDefinitions first, then Namespaces, then the rest in order.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<(), Error> {
        self.apply_documents(parse_documents(yaml)?).await
    }

    /// Applies every `*.yaml`, `*.yml` and `*.json` manifest under `dir`, recursively.
    pub async fn apply_dir(&self, dir: &Path) -> Result<(), Error> {
        let mut files = Vec::new();
        collect_manifests(dir, &mut files)?;
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| Error::Io {
                path: f.clone(),
                source,
            })?;
            docs.extend(
                parse_documents(&text).map_err(|e| Error::Yaml(format!("{}: {e}", f.display())))?,
            );
        }
        self.apply_documents(docs).await
    }

    async fn apply_documents(&self, mut docs: Vec<Value>) -> Result<(), Error> {
        let rank = |d: &Value| match (d["apiVersion"].as_str(), d["kind"].as_str()) {
            (Some(av), Some("CustomResourceDefinition"))
                if av.starts_with("apiextensions.k8s.io/") =>
            {
                0
            }
            (Some("v1"), Some("Namespace")) => 1,
            _ => 2,
        };
        docs.sort_by_key(rank);
        let opts = WriteOpts {
            user: UserInfo::admin(),
            ..Default::default()
        };
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let def = self
                .shared
                .store
                .read()
                .registry
                .by_kind(&api_version, &kind)
                .ok_or_else(|| Error::UnknownKind {
                    api_version: api_version.clone(),
                    kind: kind.clone(),
                })?;
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let ns = def.namespaced.then_some(ns.as_str());
            let exists = !name.is_empty() && self.shared.get(&def, ns, &name).is_ok();
            let result = if exists {
                let mut body = doc.clone();
                if let Some(m) = body["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                self.shared.update(&def, ns, &name, None, body, &opts).await
            } else {
                self.shared.create(&def, ns, doc, &opts).await
            };
            result.map_err(|source| Error::Api {
                kind,
                name,
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Stops accepting connections and ends every open watch and connection.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

fn parse_documents(yaml: &str) -> Result<Vec<Value>, Error> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| Error::Yaml(e.to_string()))?;
    let mut out = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            d if d["kind"] == "List" => {
                out.extend(d["items"].as_array().cloned().unwrap_or_default())
            }
            d => out.push(d),
        }
    }
    Ok(out)
}

fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        if path.is_dir() {
            collect_manifests(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_and_lists_unpacked() {
        let docs = parse_documents(
            "---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n---\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: b}\n",
        )
        .unwrap();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["ConfigMap", "Secret"]);
    }
}

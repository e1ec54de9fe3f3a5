//! Shared harness of the agent's end-to-end tests (`e2e_agent`, `webhook_e2e`, `sops_e2e`,
//! `multicluster_e2e`): free ports, the admin port's HTTP client and Prometheus text values (from
//! `testkit`), polling with a deadline, and configbutler conditions.
//!
//! Each test crate uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod world;

use std::future::Future;
use std::time::Duration;

use kube::api::{Api, DynamicObject};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;

/// Upper bound on any wait, only to turn a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub use testkit::{free_port, http_get, metric};

/// Polls a synchronous `check` every 100 ms until it gives `Some`; panics after [`PATIENCE`].
pub async fn wait<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls an asynchronous `check` every 200 ms until it gives `Some`; panics after [`PATIENCE`].
pub async fn wait_async<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A configbutler object (`kind` in `configbutler.ai/v1alpha1`), `None` when absent or unreadable.
pub async fn configbutler_object(
    client: &kube::Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Option<DynamicObject> {
    let gvk = GroupVersionKind::gvk("configbutler.ai", "v1alpha1", kind);
    let plural = format!("{}s", kind.to_lowercase());
    let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.get_opt(name).await.ok()?
}

/// `(status, reason, message)` of one condition of a configbutler object.
pub async fn condition(
    client: &kube::Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let obj = configbutler_object(client, kind, namespace, name).await?;
    let conditions = obj.data.pointer("/status/conditions")?.as_array()?.clone();
    let found = conditions.iter().find(|c| c["type"] == type_)?;
    Some((
        found["status"].as_str()?.to_owned(),
        found["reason"].as_str()?.to_owned(),
        found["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Waits until `kind/name` has condition `type_` with `status`, and returns `(reason, message)`.
pub async fn wait_for_condition(
    client: &kube::Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    type_: &str,
    status: &str,
) -> (String, String) {
    wait_async(&format!("{kind} {name} {type_}={status}"), || async {
        condition(client, kind, namespace, name, type_)
            .await
            .filter(|(s, _, _)| s == status)
            .map(|(_, reason, message)| (reason, message))
    })
    .await
}

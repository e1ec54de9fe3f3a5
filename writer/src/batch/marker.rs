//! The ownership marker `{baseFolder}/.configbutler/owner.yaml`: who mirrors into a folder.

use reverser_common::yaml;

use crate::model::ClusterIdentity;

/// The ownership marker written into `{baseFolder}/.configbutler/owner.yaml`.
pub fn render_marker(identity: &ClusterIdentity, now_rfc3339: &str) -> Vec<u8> {
    let value = serde_json::json!({
        "clusterUID": identity.cluster_uid,
        "clusterName": identity.cluster_name,
        "controllerNamespace": identity.controller_namespace,
        "controllerName": identity.controller_name,
        "instanceID": identity.instance_id,
        "timestamp": now_rfc3339,
    });
    let mut text = String::from(
        "# Written by gitops-reverser: this folder is mirrored from the cluster below.\n",
    );
    text.push_str(&serde_saphyr::to_string(&value).unwrap_or_default());
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.into_bytes()
}

/// `Some(description of the recorded owner)` when the marker names another installation. The instance id is
/// not compared: it changes with every agent restart.
pub fn marker_mismatch(marker: &[u8], identity: &ClusterIdentity) -> Option<String> {
    let value = match yaml::parse_document(marker) {
        Ok(value) => value,
        Err(_) => return Some("an unreadable marker".to_owned()),
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (uid, ns, name) = (
        field("clusterUID"),
        field("controllerNamespace"),
        field("controllerName"),
    );
    if uid == identity.cluster_uid
        && ns == identity.controller_namespace
        && name == identity.controller_name
    {
        None
    } else {
        Some(format!("cluster {uid} controller {ns}/{name}"))
    }
}

//! The real control plane works as the agent's tests need it: the version it claims, RBAC, token and
//! ServiceAccount identities, the controllers (ReplicaSets from Deployments, namespace deletion), and a clean stop.

use testkit::RealCluster;

fn deployment(namespace: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {namespace}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: 'nginx:1.27'}}]}}
"
    )
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn a_real_control_plane_serves_rbac_identities_and_runs_its_controllers() {
    let cluster = RealCluster::builder().start_blocking();

    let version = cluster.kubectl_ok(&["version", "-o", "json"]);
    assert!(
        version.contains("\"gitVersion\": \"v1.37.2\""),
        "server and client report v1.37.2: {version}"
    );

    // Controllers: a Deployment gets a ReplicaSet (deployment controller) and its Pods (replicaset controller).
    cluster.apply_yaml(&deployment("shop"));
    wait_for("the deployment controller to make a ReplicaSet", || {
        !cluster
            .kubectl_ok(&["-n", "shop", "get", "replicasets", "-o", "name"])
            .trim()
            .is_empty()
    });
    wait_for("the replicaset controller to make a Pod", || {
        !cluster
            .kubectl_ok(&["-n", "shop", "get", "pods", "-o", "name"])
            .trim()
            .is_empty()
    });
    wait_for("kube-root-ca.crt in the new namespace", || {
        cluster
            .kubectl(&["-n", "shop", "get", "configmap", "kube-root-ca.crt"])
            .status
            .success()
    });

    // RBAC: alice has no permissions until bound; then exactly those.
    let denied = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        cluster.write_kubeconfig(&path, Some("alice"));
        let run = |args: &[&str]| {
            std::process::Command::new(testkit::real_kube_binary("kubectl"))
                .arg("--kubeconfig")
                .arg(&path)
                .args(args)
                .output()
                .unwrap()
        };
        let before = run(&["-n", "shop", "get", "configmaps"]);
        cluster.apply_yaml(
            "
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm-reader, namespace: shop}
rules: [{apiGroups: [''], resources: [configmaps], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-cm-reader, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
",
        );
        let mut after = run(&["-n", "shop", "get", "configmaps"]);
        wait_for("alice's RoleBinding to take effect", || {
            after = run(&["-n", "shop", "get", "configmaps"]);
            after.status.success()
        });
        let secrets = run(&["-n", "shop", "get", "secrets"]);
        (before, after, secrets)
    };
    assert!(
        !denied.0.status.success(),
        "alice cannot list before the binding"
    );
    assert!(
        String::from_utf8_lossy(&denied.0.stderr).contains("forbidden"),
        "a real 403: {}",
        String::from_utf8_lossy(&denied.0.stderr)
    );
    assert!(
        denied.1.status.success(),
        "alice can list configmaps once bound"
    );
    assert!(
        !denied.2.status.success(),
        "alice still cannot list secrets"
    );

    // ServiceAccount identity from a TokenRequest token.
    cluster.kubectl_ok(&["-n", "shop", "create", "serviceaccount", "agent"]);
    let dir = tempfile::tempdir().unwrap();
    let sa_path = dir.path().join("sa");
    std::fs::write(
        &sa_path,
        cluster.service_account_kubeconfig("shop", "agent"),
    )
    .unwrap();
    let whoami = std::process::Command::new(testkit::real_kube_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(&sa_path)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:shop:agent",
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );

    // The namespace controller finalizes a deleted namespace (with a Deployment, ReplicaSet and Pod in it).
    cluster.kubectl_ok(&["delete", "namespace", "shop", "--wait=false"]);
    wait_for("namespace shop to disappear", || {
        !cluster
            .kubectl(&["get", "namespace", "shop"])
            .status
            .success()
    });

    let rss = cluster.rss_kib();
    eprintln!("component RSS (KiB): {rss:?}");
    assert_eq!(
        rss.len(),
        3,
        "etcd, kube-apiserver and kube-controller-manager run"
    );
}

#[test]
fn dropping_the_cluster_stops_every_component() {
    let cluster = RealCluster::builder()
        .without_controller_manager()
        .start_blocking();
    let dir = cluster.dir().to_owned();
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.contains(dir.to_str().unwrap()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(pids.len() >= 2, "etcd and kube-apiserver run: {pids:?}");
    drop(cluster);
    for pid in &pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"));
        assert!(!alive, "process {pid} of the cluster still runs after drop");
    }
    assert!(!dir.exists(), "the cluster's directory is removed");
}

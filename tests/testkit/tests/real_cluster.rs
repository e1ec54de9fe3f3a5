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

/// The short compaction interval really compacts etcd: a watch from a resource version that was still served right
/// after the write ends in 410 Gone once the API server's compactor has run twice. The watch cache is off, so the
/// watch is served by etcd itself (the cache would answer from memory).
#[test]
fn the_compaction_interval_expires_old_resource_versions_with_410_gone() {
    let cluster = RealCluster::builder()
        .without_controller_manager()
        .compaction_interval(std::time::Duration::from_secs(4))
        .apiserver_arg("--watch-cache=false")
        .start_blocking();
    cluster.kubectl_ok(&[
        "-n",
        "default",
        "create",
        "configmap",
        "c",
        "--from-literal=k=0",
    ]);
    let created = cluster.kubectl_ok(&[
        "-n",
        "default",
        "get",
        "configmap",
        "c",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    cluster.kubectl_ok(&[
        "-n",
        "default",
        "patch",
        "configmap",
        "c",
        "-p",
        r#"{"data":{"k":"1"}}"#,
    ]);
    let watch_from_creation = || {
        let out = cluster.kubectl(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={created}&timeoutSeconds=1"
            ),
        ]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // A revision outlives at least one interval after the next write, so this read comes before any compaction.
    let fresh = watch_from_creation();
    assert!(
        fresh.contains(r#""type":"MODIFIED""#) && !fresh.contains(r#""code":410"#),
        "the update is still in etcd's history right after it: {fresh}"
    );

    let mut last = String::new();
    wait_for(
        "the compactor to expire the creation's resource version",
        || {
            last = watch_from_creation();
            last.contains(r#""code":410"#)
        },
    );
    assert!(
        !last.contains(r#""type":"MODIFIED""#),
        "an expired watch delivers no events: {last}"
    );
}

/// Started by [`missing_binaries_fail_loudly_with_the_build_command`] with no binaries; on its own (`--ignored`)
/// it just starts a cluster.
#[test]
#[ignore = "started by missing_binaries_fail_loudly_with_the_build_command"]
fn start_with_the_binaries_of_reverser_real_kube_bin() {
    drop(RealCluster::builder().start_blocking());
}

#[test]
fn missing_binaries_fail_loudly_with_the_build_command() {
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "start_with_the_binaries_of_reverser_real_kube_bin",
            "--ignored",
            "--nocapture",
        ])
        .env("REVERSER_REAL_KUBE_BIN", empty.path())
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a start without binaries fails: {output}"
    );
    assert!(
        output.contains(&empty.path().join("etcd").display().to_string())
            && output.contains("./scripts/build-real-kube.sh"),
        "the failure names the missing path and the build command: {output}"
    );
    assert!(
        output.contains("0 passed; 1 failed"),
        "the helper test ran (not filtered out) and failed: {output}"
    );
}

/// The processes whose command line names `dir` (the cluster's components), excluding zombies.
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.contains(dir.to_str().unwrap()))
                && std::fs::read_to_string(e.path().join("status"))
                    .is_ok_and(|s| !s.contains("State:\tZ"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Started by [`a_test_process_that_dies_without_dropping_leaves_no_component_running`] with
/// `REVERSER_TEST_ABORT=1`: aborts right after the start, so no destructor runs. Otherwise it starts and stops a
/// cluster.
#[test]
#[ignore = "started by a_test_process_that_dies_without_dropping_leaves_no_component_running"]
fn start_a_cluster_then_abort() {
    let cluster = RealCluster::builder()
        .without_controller_manager()
        .start_blocking();
    if std::env::var_os("REVERSER_TEST_ABORT").is_some() {
        eprintln!("CLUSTER_DIR={}", cluster.dir().display());
        std::process::abort();
    }
}

#[test]
fn a_test_process_that_dies_without_dropping_leaves_no_component_running() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "start_a_cluster_then_abort",
            "--ignored",
            "--nocapture",
        ])
        .env("REVERSER_TEST_ABORT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("CLUSTER_DIR="))
        .unwrap_or_else(|| panic!("the helper started a cluster: {stderr}"));
    let dir = std::path::PathBuf::from(dir);
    assert!(!out.status.success(), "the helper aborted");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut left = processes_under(&dir);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(300));
        left = processes_under(&dir);
    }
    if !left.is_empty() {
        // End them here so the failure leaks nothing into the next tests.
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(&left)
            .status();
        panic!(
            "the watchdog left the cluster's processes {left:?} running after the test process died"
        );
    }
    // Nothing removed the directory (no destructor ran).
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With the watch cache on (the default), paginated lists still expire: a continue token that worked right after
/// it was issued gets 410 Gone once etcd has been compacted past its revision.
#[test]
fn a_continue_token_expires_with_410_gone_after_compaction() {
    let cluster = RealCluster::builder()
        .without_controller_manager()
        .compaction_interval(std::time::Duration::from_secs(4))
        .start_blocking();
    for name in ["a", "b", "c"] {
        cluster.kubectl_ok(&["-n", "default", "create", "configmap", name]);
    }
    let page = cluster.kubectl_ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?limit=1",
    ]);
    let token = page
        .split(r#""continue":""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a first page with a continue token: {page}"))
        .to_owned();
    // A later write moves the compactor past the token's revision.
    cluster.kubectl_ok(&["-n", "default", "create", "configmap", "d"]);
    let next_page = || {
        let out = cluster.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/configmaps?limit=1&continue={token}"),
        ]);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, fresh) = next_page();
    assert!(ok, "the token works right after it was issued: {fresh}");

    let mut last = String::new();
    wait_for("the continue token to expire", || {
        let (ok, text) = next_page();
        last = text;
        !ok
    });
    assert!(
        last.contains("Expired") && last.contains("too old"),
        "410 Gone (Expired), not another error: {last}"
    );
}

//! The real kubectl (/usr/bin/kubectl) against the `kube-emulator` binary, through the
//! kubeconfig the binary writes. kubectl must be installed: these tests fail, never skip,
//! without it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

struct Server {
    child: Child,
    kubeconfig: PathBuf,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kubectl_path() -> &'static str {
    let path = "/usr/bin/kubectl";
    assert!(
        Path::new(path).exists(),
        "kubectl is required for the kube-emulator fidelity tests but {path} is missing"
    );
    path
}

/// Starts the binary on a free port with `extra` arguments and waits until it listens.
fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-emulator"))
        .args(["--addr", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kube-emulator binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("kube-emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server {
        child,
        kubeconfig,
        url,
        dir,
    }
}

impl Server {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kubectl_path());
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .args(["--request-timeout=20s"])
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kubectl runs")
    }

    /// Runs kubectl and returns stdout, failing the test with stderr on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }
}

const APP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  labels: {app: web}
data: {mode: "one"}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: "nginx:1"}
      - {name: sidecar, image: "busybox:1"}
"#;

#[test]
fn kubectl_client_side_apply_creates_then_configures() {
    let s = start(&[]);
    let file = s.write("app.yaml", APP);
    let out = s.ok(&["apply", "-f", &file]);
    assert!(out.contains("configmap/settings created"), "{out}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let file = s.write(
        "app.yaml",
        &APP.replace("nginx:1", "nginx:2")
            .replace("\"one\"", "\"two\""),
    );
    let out = s.ok(&["apply", "-f", &file]);
    assert!(out.contains("configmap/settings configured"), "{out}");
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let images = s.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[*].image} {.metadata.generation}",
    ]);
    assert_eq!(images, "nginx:2 busybox:1 2");
    let out = s.ok(&["apply", "-f", &file]);
    assert!(out.contains("configmap/settings unchanged"), "{out}");
}

#[test]
fn kubectl_server_side_apply_creates_and_updates() {
    let s = start(&[]);
    let file = s.write("app.yaml", APP);
    let out = s.ok(&["apply", "--server-side", "-f", &file]);
    assert!(
        out.contains("configmap/settings serverside-applied"),
        "{out}"
    );
    let file = s.write("app.yaml", &APP.replace("\"one\"", "\"two\""));
    s.ok(&["apply", "--server-side", "-f", &file]);
    assert_eq!(
        s.ok(&["get", "cm", "settings", "-o", "jsonpath={.data.mode}"]),
        "two"
    );
}

#[test]
fn kubectl_get_label_and_delete() {
    let s = start(&[]);
    s.ok(&["apply", "-f", &s.write("app.yaml", APP)]);
    let out = s.ok(&["get", "configmaps"]);
    assert!(out.starts_with("NAME") && out.contains("settings"), "{out}");
    assert_eq!(
        s.ok(&["get", "cm", "-l", "app=web", "-o", "name"]),
        "configmap/settings\n"
    );
    assert_eq!(s.ok(&["get", "cm", "-l", "app!=web", "-o", "name"]), "");
    assert!(
        s.ok(&["label", "cm", "settings", "tier=front"])
            .contains("labeled")
    );
    assert_eq!(
        s.ok(&["get", "cm", "-l", "tier in (front,back)", "-o", "name"]),
        "configmap/settings\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "cm", "settings", "-o", "json"])).unwrap();
    assert_eq!(json["metadata"]["labels"]["tier"], "front");
    assert!(s.ok(&["delete", "cm", "settings"]).contains("deleted"));
    let gone = s.run(&["get", "cm", "settings"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("configmaps \"settings\" not found"));
}

#[test]
fn kubectl_get_watch_streams_changes() {
    let s = start(&[]);
    let mut watch = s
        .command(&["get", "configmaps", "-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The watch reports objects created after it started, whenever they come.
    s.ok(&[
        "apply",
        "-f",
        &s.write(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n",
        ),
    ]);
    s.ok(&[
        "apply",
        "-f",
        &s.write(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: second}\n",
        ),
    ]);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line == "configmap/second" {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen.contains(&"configmap/first".to_string()), "{seen:?}");
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

#[test]
fn kubectl_waits_for_an_established_crd_and_serves_its_resources() {
    let s = start(&[]);
    s.ok(&["apply", "-f", &s.write("crd.yaml", CRD)]);
    let out = s.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=30s",
    ]);
    assert!(out.contains("condition met"), "{out}");
    let widget =
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 1}\n";
    s.ok(&["apply", "-f", &s.write("w.yaml", widget)]);
    s.ok(&[
        "apply",
        "-f",
        &s.write("w.yaml", &widget.replace("size: 1", "size: 2")),
    ]);
    assert_eq!(
        s.ok(&["get", "wd", "w1", "-o", "jsonpath={.spec.size}"]),
        "2"
    );
    let resources = s.ok(&["api-resources", "--api-group=example.com"]);
    assert!(
        resources.contains("widgets") && resources.contains("wd"),
        "{resources}"
    );
    s.ok(&["delete", "crd", "widgets.example.com"]);
    assert!(!s.run(&["get", "widgets"]).status.success());
}

#[test]
fn kubectl_api_resources_lists_builtins_with_short_names() {
    let s = start(&[]);
    let out = s.ok(&["api-resources"]);
    for want in [
        "configmaps",
        "cm",
        "leases",
        "customresourcedefinitions",
        "deployments",
        "deploy",
    ] {
        assert!(out.contains(want), "{want} missing from\n{out}");
    }
    let versions = s.ok(&["api-versions"]);
    assert!(versions.contains("coordination.k8s.io/v1"), "{versions}");
}

// kubectl sends protobuf for some commands (`create configmap`); JSON-only means 415.
#[test]
fn kubectl_create_configmap_is_refused_as_protobuf() {
    let s = start(&[]);
    let out = s.run(&["create", "configmap", "proto", "--from-literal=a=b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kube-emulator is JSON-only"), "{err}");
}

#[test]
fn load_dir_applies_crds_first_and_impersonation_identifies_the_user() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    // CRD in a later file than its custom resource: CRDs are applied first anyway.
    std::fs::write(
        dir.path().join("a-widget.yaml"),
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, namespace: team}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("nested/b-crd.yaml"), CRD).unwrap();
    std::fs::write(
        dir.path().join("nested/c-ns.yml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n",
    )
    .unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "s3cret,alice,uid-1,\"devs,ops\"\n").unwrap();
    let s = start(&[
        "--load",
        dir.path().to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--kubeconfig-token",
        "s3cret",
    ]);
    assert!(s.url.starts_with("http://127.0.0.1:"));
    assert_eq!(
        s.ok(&["get", "widgets", "-n", "team", "-o", "name"]),
        "widget.example.com/w1\n"
    );
    // client-go does not send bearer tokens to a plain-HTTP server, so kubectl is the admin
    // here; kube-rs does send them (see kube_rs.rs). Impersonation works for both.
    let who = s.ok(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, "system:admin");
    let kubeconfig = std::fs::read_to_string(&s.kubeconfig).unwrap();
    assert!(kubeconfig.contains("token: \"s3cret\""), "{kubeconfig}");
    let as_bob = s.ok(&[
        "auth",
        "whoami",
        "--as",
        "bob",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(as_bob, "bob");
}

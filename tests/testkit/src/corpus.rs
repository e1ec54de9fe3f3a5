//! The benchmark corpus: Kubernetes-like objects as the agent would stream them.
//!
//! Half ConfigMaps (~300 B), half Deployments (~2 KiB), spread over [`namespaces()`] namespaces (`BENCH_NAMESPACES`), at
//! the paths the agent uses (relative to the destination's base folder):
//! `core/v1/configmaps/ns-XX/<name>.yaml` and `apps/v1/deployments/ns-XX/<name>.yaml`.
//! Shared by the writer's seed benchmark (`writer/benches/seed.rs`, `writer/tests/git_bench.rs`)
//! and the agent's end-to-end benchmark (`agent/benches/e2e.rs`), so both measure the same objects.

/// Namespaces the objects are spread over, unless `BENCH_NAMESPACES` says otherwise.
pub const NAMESPACES: usize = 100;

/// Namespaces the objects are spread over: `BENCH_NAMESPACES` (at least 1), else [`NAMESPACES`].
pub fn namespaces() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        std::env::var("BENCH_NAMESPACES")
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(NAMESPACES)
            .max(1)
    })
}

/// Object indexes in streaming order. `grouped` (the default, `BENCH_ORDER` unset): per type, then
/// namespace, then name, the order of a Kubernetes list. `BENCH_ORDER=interleaved`: by index,
/// so consecutive objects are in different folders, the worst case for tree rewriting (every
/// 200-file commit then rewrites every folder).
pub fn order(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if !interleaved() {
        let namespaces = namespaces();
        order.sort_by_key(|&i| (i % 2, (i / 2) % namespaces, i));
    }
    order
}

pub fn interleaved() -> bool {
    std::env::var("BENCH_ORDER").as_deref() == Ok("interleaved")
}

/// Path of object `i`, relative to the base folder.
pub fn path(i: usize) -> String {
    let ns = namespace(i);
    if i.is_multiple_of(2) {
        format!("core/v1/configmaps/{ns}/{}.yaml", name(i))
    } else {
        format!("apps/v1/deployments/{ns}/{}.yaml", name(i))
    }
}

/// Namespace of object `i`.
pub fn namespace(i: usize) -> String {
    format!("ns-{:02}", namespace_index(i))
}

/// Index of object `i`'s namespace (`ns-{index}`).
pub fn namespace_index(i: usize) -> usize {
    (i / 2) % namespaces()
}

/// Name of object `i`.
pub fn name(i: usize) -> String {
    let app = [
        "api", "web", "worker", "cache", "gateway", "billing", "search", "auth",
    ][i % 8];
    if i.is_multiple_of(2) {
        format!("{app}-{i:06}-config")
    } else {
        format!("{app}-{i:06}")
    }
}

/// Canonical YAML of object `i`; `revision` varies one value (for "one changed file").
pub fn yaml(i: usize, revision: &str) -> String {
    if i.is_multiple_of(2) {
        configmap(i, revision)
    } else {
        deployment(i, revision)
    }
}

/// A ConfigMap (~300 B) whose `data.revision` is `revision`.
pub fn configmap(i: usize, revision: &str) -> String {
    let (ns, name) = (namespace(i), name(i));
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels:\n    app.kubernetes.io/name: {name}\n    \
         app.kubernetes.io/part-of: shop\n  name: {name}\n  namespace: {ns}\ndata:\n  ENDPOINT: \
         http://{name}.{ns}.svc.cluster.local:8080\n  FEATURE_FLAGS: alpha,beta\n  LOG_LEVEL: info\n  \
         revision: \"{revision}\"\n"
    )
}

/// A Deployment (~2 KiB) annotated with `revision`.
pub fn deployment(i: usize, revision: &str) -> String {
    let (ns, name) = (namespace(i), name(i));
    let replicas = 1 + i % 5;
    let port = 8000 + i % 1000;
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  annotations:
    reverser.example.com/revision: "{revision}"
  labels:
    app.kubernetes.io/component: backend
    app.kubernetes.io/name: {name}
    app.kubernetes.io/part-of: shop
    app.kubernetes.io/version: 1.{i}.0
  name: {name}
  namespace: {ns}
spec:
  progressDeadlineSeconds: 600
  replicas: {replicas}
  revisionHistoryLimit: 10
  selector:
    matchLabels:
      app.kubernetes.io/name: {name}
  strategy:
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 25%
    type: RollingUpdate
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {name}
        app.kubernetes.io/part-of: shop
    spec:
      containers:
      - env:
        - name: LOG_LEVEL
          value: info
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              apiVersion: v1
              fieldPath: metadata.namespace
        envFrom:
        - configMapRef:
            name: {name}-config
        image: registry.example.com/shop/{name}:1.{i}.0
        imagePullPolicy: IfNotPresent
        livenessProbe:
          failureThreshold: 3
          httpGet:
            path: /healthz
            port: http
            scheme: HTTP
          periodSeconds: 10
          successThreshold: 1
          timeoutSeconds: 1
        name: {name}
        ports:
        - containerPort: {port}
          name: http
          protocol: TCP
        resources:
          limits:
            cpu: 500m
            memory: 256Mi
          requests:
            cpu: 100m
            memory: 128Mi
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
        terminationMessagePath: /dev/termination-log
        terminationMessagePolicy: File
        volumeMounts:
        - mountPath: /tmp
          name: tmp
      dnsPolicy: ClusterFirst
      restartPolicy: Always
      schedulerName: default-scheduler
      securityContext:
        fsGroup: 2000
      serviceAccountName: {name}
      terminationGracePeriodSeconds: 30
      volumes:
      - emptyDir: {{}}
        name: tmp
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_realistic() {
        let cm = super::yaml(0, "0").len();
        let deploy = super::yaml(1, "0").len();
        assert!((250..400).contains(&cm), "{cm}");
        assert!((1800..2400).contains(&deploy), "{deploy}");
    }
}

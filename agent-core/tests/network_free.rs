//! The core stays free of network clients: its normal dependency tree (as `cargo build -p reverser-agent-core`
//! resolves it, features included) holds no HTTP, gRPC, TLS or kube client crate. A dependency that pulls one in
//! (or a kube feature such as `client` or `runtime`) belongs in the agent's I/O crate instead.

use std::process::Command;

/// Crates that speak to a network (or carry protobuf, which belongs at the gRPC edge only).
const FORBIDDEN: &[&str] = &[
    "tonic",
    "prost",
    "reverser-proto",
    "hyper",
    "h2",
    "kube-client",
    "kube-runtime",
    "rustls",
    "tokio-rustls",
];

#[test]
fn the_core_depends_on_no_network_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "reverser-agent-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).expect("cargo tree prints UTF-8");
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"reverser-agent-core") && names.contains(&"serde"),
        "cargo tree printed no dependency tree:\n{tree}"
    );
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| names.contains(f)).collect();
    assert!(
        found.is_empty(),
        "reverser-agent-core depends on {found:?}; see `cargo tree -p reverser-agent-core -e normal -i {}`",
        found.first().map_or("", |f| f)
    );
}

//! The agent's flags.
use super::*;

#[test]
fn every_flag_has_an_agent_env_var() {
    use clap::CommandFactory;
    for arg in Args::command().get_arguments() {
        if matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        assert!(
            env.as_deref().is_some_and(|e| e.starts_with("AGENT_")),
            "--{} has no AGENT_* env var",
            arg.get_id()
        );
    }
}

#[test]
fn leader_election_defaults_on_and_can_be_turned_off() {
    let on = Args::try_parse_from(["reverser-agent", "--writer-url", "http://w:1"]).unwrap();
    assert!(on.leader_election);
    let off = Args::try_parse_from([
        "reverser-agent",
        "--writer-url",
        "http://w:1",
        "--leader-election=false",
        "--discovery-exclude",
        "widgets.example.com",
        "--discovery-exclude",
        "leases",
    ])
    .unwrap();
    assert!(!off.leader_election);
    assert_eq!(off.discovery_exclude, vec!["widgets.example.com", "leases"]);
}

#[test]
fn the_shared_groups_keep_the_agent_defaults() {
    let args = Args::try_parse_from(["reverser-agent", "--writer-url", "http://w:1"]).unwrap();
    assert_eq!(args.admin.admin_addr, "0.0.0.0:8082".parse().unwrap());
    assert_eq!(args.log.log_level, "info");
    let args = Args::try_parse_from([
        "reverser-agent",
        "--writer-url",
        "http://w:1",
        "--kubeconfig",
        "/k",
        "--admin-addr",
        "127.0.0.1:9",
    ])
    .unwrap();
    assert_eq!(args.kube.kubeconfig, Some(PathBuf::from("/k")));
    assert_eq!(args.admin.admin_addr, "127.0.0.1:9".parse().unwrap());
}

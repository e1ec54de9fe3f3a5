//! The writer's per-worker Kubernetes Lease against the kube-emulator over real HTTP: the claim step
//! (`reverser_common::lease::try_acquire`: create, renew, respect, take over, lose a race on a stale
//! resourceVersion), the claim loop ([`lease::spawn`]: one holder, release when its user stops), and two whole
//! writers serving one branch with `--leases on`.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use kube_emulator::Emulator;
use reverser_common::lease::{Attempt, LeaseConfig};
use reverser_writer::lease::{self, LeaseSettings, LeaseState};
use support::*;
use testkit::BareRepo;

const NAME: &str = "worker-lease";

async fn emulator() -> (Emulator, Api<Lease>) {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("the emulator starts");
    let api = Api::namespaced(emulator.client().await, "default");
    (emulator, api)
}

fn spec(lease: &Lease) -> &k8s_openapi::api::coordination::v1::LeaseSpec {
    lease.spec.as_ref().expect("lease spec")
}

fn holder(lease: &Lease) -> String {
    spec(lease).holder_identity.clone().unwrap_or_default()
}

fn resource_version(lease: &Lease) -> String {
    lease
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion")
}

/// One claim step's outcome, without the term details.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    Held,
    HeldBy(String),
    LostRace,
}

async fn claim(api: &Api<Lease>, identity: &str, seconds: u64) -> Claim {
    let config = LeaseConfig {
        namespace: "default".into(),
        name: NAME.into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(seconds),
        renew_every: Duration::from_secs(5),
        owner_role: None,
    };
    match reverser_common::lease::try_acquire(&api.clone().into_client(), &config)
        .await
        .expect("the claim reaches the API server")
    {
        Attempt::Held { .. } => Claim::Held,
        Attempt::HeldBy(holder) => Claim::HeldBy(holder),
        Attempt::LostRace => Claim::LostRace,
    }
}

/// Waits until the wall clock is past the Lease's expiry (renewTime + leaseDurationSeconds).
async fn wait_until_expired(api: &Api<Lease>) {
    let lease = api.get(NAME).await.unwrap();
    let duration = u64::try_from(spec(&lease).lease_duration_seconds.unwrap()).unwrap();
    tokio::time::sleep(Duration::from_secs(duration) + Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_missing_lease_is_created_held_and_renewed_by_its_holder() {
    let (_emulator, api) = emulator().await;
    assert_eq!(claim(&api, "writer-a", 24).await, Claim::Held);
    let created = api.get(NAME).await.unwrap();
    assert_eq!(holder(&created), "writer-a");
    assert_eq!(spec(&created).lease_duration_seconds, Some(24));
    assert_eq!(spec(&created).lease_transitions, Some(0));
    assert!(spec(&created).acquire_time.is_some());

    assert_eq!(claim(&api, "writer-a", 24).await, Claim::Held);
    let renewed = api.get(NAME).await.unwrap();
    assert_eq!(holder(&renewed), "writer-a");
    assert_ne!(
        resource_version(&renewed),
        resource_version(&created),
        "a renewal writes the Lease"
    );
    assert!(
        spec(&renewed).renew_time.as_ref().unwrap().0
            >= spec(&created).renew_time.as_ref().unwrap().0
    );
    assert_eq!(
        spec(&renewed).acquire_time,
        spec(&created).acquire_time,
        "renewing is not re-acquiring"
    );
    assert_eq!(spec(&renewed).lease_transitions, Some(0));
}

#[tokio::test]
async fn another_identity_sees_an_unexpired_lease_as_held_by_its_holder_and_leaves_it_alone() {
    let (_emulator, api) = emulator().await;
    assert_eq!(claim(&api, "writer-a", 24).await, Claim::Held);
    let before = api.get(NAME).await.unwrap();
    assert_eq!(
        claim(&api, "writer-b", 24).await,
        Claim::HeldBy("writer-a".into())
    );
    let after = api.get(NAME).await.unwrap();
    assert_eq!(
        resource_version(&after),
        resource_version(&before),
        "no write"
    );
    assert_eq!(holder(&after), "writer-a");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_counts_a_transition() {
    let (_emulator, api) = emulator().await;
    assert_eq!(claim(&api, "writer-a", 1).await, Claim::Held);
    let first = api.get(NAME).await.unwrap();
    wait_until_expired(&api).await;

    assert_eq!(claim(&api, "writer-b", 1).await, Claim::Held);
    let taken = api.get(NAME).await.unwrap();
    assert_eq!(holder(&taken), "writer-b");
    assert_eq!(spec(&taken).lease_transitions, Some(1));
    assert_ne!(spec(&taken).acquire_time, spec(&first).acquire_time);
    // The old holder, back before the new one's Lease expired, respects it.
    assert_eq!(
        claim(&api, "writer-a", 1).await,
        Claim::HeldBy("writer-b".into())
    );
}

/// Two claims whose GETs both complete before either write: the emulator delays every response, so both read
/// the same resourceVersion; the second write is refused with 409.
async fn race(emulator: &Emulator, api: &Api<Lease>) -> (Claim, Claim) {
    emulator.faults().set_delay(Duration::from_millis(400));
    let results = tokio::join!(claim(api, "writer-b", 24), claim(api, "writer-c", 24));
    emulator.faults().set_delay(Duration::ZERO);
    results
}

fn exactly_one_winner(results: (Claim, Claim), lease: &Lease) {
    let winner = match results {
        (Claim::Held, Claim::LostRace) => "writer-b",
        (Claim::LostRace, Claim::Held) => "writer-c",
        other => panic!("expected one Held and one LostRace, got {other:?}"),
    };
    assert_eq!(holder(lease), winner, "the Lease names the winner");
}

#[tokio::test]
async fn two_writers_taking_over_an_expired_lease_at_once_end_with_one_holder_and_one_lost_race() {
    let (emulator, api) = emulator().await;
    assert_eq!(claim(&api, "writer-a", 1).await, Claim::Held);
    let before = api.get(NAME).await.unwrap();
    wait_until_expired(&api).await;

    let results = race(&emulator, &api).await;
    let after = api.get(NAME).await.unwrap();
    exactly_one_winner(results, &after);
    // Exactly one replace was accepted: one transition.
    assert_eq!(spec(&after).lease_transitions, Some(1));
    assert_eq!(
        resource_version(&after).parse::<u64>().unwrap(),
        resource_version(&before).parse::<u64>().unwrap() + 1,
        "a single write happened"
    );
}

#[tokio::test]
async fn two_writers_creating_a_missing_lease_at_once_end_with_one_holder_and_one_lost_race() {
    let (emulator, api) = emulator().await;
    let results = race(&emulator, &api).await;
    let lease = api.get(NAME).await.unwrap();
    exactly_one_winner(results, &lease);
    assert_eq!(spec(&lease).lease_transitions, Some(0));
}

#[tokio::test]
async fn a_replace_with_a_stale_resource_version_is_refused_by_the_api_server() {
    // The guarantee try_claim relies on: the write carries the resourceVersion it read.
    let (_emulator, api) = emulator().await;
    assert_eq!(claim(&api, "writer-a", 24).await, Claim::Held);
    let stale = api.get(NAME).await.unwrap();
    assert_eq!(claim(&api, "writer-a", 24).await, Claim::Held);
    let mut hijack = stale.clone();
    hijack.spec.as_mut().unwrap().holder_identity = Some("writer-b".into());
    match api.replace(NAME, &PostParams::default(), &hijack).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("a stale replace must be a 409 Conflict, got {other:?}"),
    }
    assert_eq!(holder(&api.get(NAME).await.unwrap()), "writer-a");
}

fn settings(client: kube::Client, identity: &str) -> LeaseSettings {
    LeaseSettings {
        client,
        namespace: "default".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(500),
        owner_role: None,
    }
}

async fn wait_state(
    receiver: &mut tokio::sync::watch::Receiver<LeaseState>,
    what: &str,
    predicate: impl FnMut(&LeaseState) -> bool,
) {
    tokio::time::timeout(WAIT, receiver.wait_for(predicate))
        .await
        .unwrap_or_else(|_| panic!("lease state never became: {what}"))
        .expect("the claim loop runs");
}

#[tokio::test]
async fn claim_loops_keep_one_holder_and_hand_over_once_the_holder_stops_renewing() {
    let (emulator, api) = emulator().await;
    let (mut a, a_loop) = lease::spawn(settings(emulator.client().await, "writer-a"), NAME.into());
    wait_state(&mut a, "held by writer-a", LeaseState::held).await;

    let (mut b, _b_loop) = lease::spawn(settings(emulator.client().await, "writer-b"), NAME.into());
    wait_state(&mut b, "writer-b sees writer-a", |s| s.holder == "writer-a").await;
    assert!(!b.borrow().held());
    // writer-a keeps renewing: its Lease outlives its duration several times over.
    let first = resource_version(&api.get(NAME).await.unwrap());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lease = api.get(NAME).await.unwrap();
    assert_eq!(holder(&lease), "writer-a");
    assert_ne!(resource_version(&lease), first, "renewed meanwhile");
    assert!(a.borrow().held());
    assert!(!b.borrow().held(), "never two holders");

    // Dropping the receiver ends writer-a's loop, which vacates the Lease: writer-b takes it at its next attempt.
    drop(a);
    tokio::time::timeout(WAIT, a_loop)
        .await
        .expect("writer-a's loop ends once nobody needs its Lease")
        .unwrap();
    assert_ne!(
        holder(&api.get(NAME).await.unwrap()),
        "writer-a",
        "writer-a vacated the Lease on its way out"
    );
    wait_state(&mut b, "held by writer-b", LeaseState::held).await;
    let lease = api.get(NAME).await.unwrap();
    assert_eq!(holder(&lease), "writer-b");
    assert_eq!(spec(&lease).lease_transitions, Some(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Two writers end to end
// ---------------------------------------------------------------------------------------------------------------

const LEASE_NS: &str = "reverser-leases";

async fn lease_writer(kubeconfig: &str, identity: &str) -> Writer {
    Writer::start(&[
        "--leases",
        "on",
        "--kubeconfig",
        kubeconfig,
        "--lease-namespace",
        LEASE_NS,
        "--leases-renew-sec",
        "1",
        "--leases-lease-sec",
        "3",
        "--lease-identity",
        identity,
    ])
    .await
}

async fn wait_for_holder(api: &Api<Lease>, name: &str, prefix: &str) -> Lease {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(lease) = api.get_opt(name).await.unwrap()
            && holder(&lease).starts_with(prefix)
        {
            return lease;
        }
        assert!(
            Instant::now() < deadline,
            "the Lease {name} is never held by {prefix}*: {:?}",
            api.get_opt(name).await.unwrap().and_then(|l| l.spec)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_branch_only_the_lease_holder_pushes_and_the_other_pushes_after_it_stops()
 {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("the emulator starts");
    let client = emulator.client().await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(LEASE_NS.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .expect("create the lease namespace");
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NS);
    let scratch = tempfile::tempdir().unwrap();
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emulator.kubeconfig_yaml(None)).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();

    let repo = BareRepo::new();
    let lease_name = reverser_writer::git::worker_id(&repo.file_url(), "main");
    let writer_a = lease_writer(&kubeconfig, "writer-a").await;
    let writer_b = lease_writer(&kubeconfig, "writer-b").await;

    // Writer A's worker starts first and takes the Lease.
    let mut agent_a = writer_a.agent("uid-a").await;
    agent_a
        .declare("gitops/a", &repo.file_url(), "main", "clusters/a")
        .await;
    wait_for_holder(&leases, &lease_name, "writer-a-").await;
    let a_path = "core/v1/configmaps/shop/a.yaml";
    agent_a
        .send(upsert("gitops/a", 1, a_path, &configmap("shop", "a", "1")))
        .await;
    agent_a.ack("gitops/a", 1).await;

    // Writer B serves the same branch: its change waits, and its agent learns why.
    let mut agent_b = writer_b.agent("uid-b").await;
    agent_b
        .declare("gitops/b", &repo.file_url(), "main", "clusters/b")
        .await;
    let b_path = "core/v1/configmaps/shop/b.yaml";
    agent_b
        .send(upsert("gitops/b", 1, b_path, &configmap("shop", "b", "1")))
        .await;
    let conflict = agent_b.status("gitops/b", "LeaseConflict").await;
    assert_eq!(conflict.status, "True");
    assert!(
        conflict.message.contains("writer-a-") || conflict.message.contains("\"\""),
        "names the holder: {conflict:?}"
    );

    // Writer A keeps pushing; B's change is still not on the branch while A holds the Lease.
    agent_a
        .send(upsert("gitops/a", 2, a_path, &configmap("shop", "a", "2")))
        .await;
    agent_a.ack("gitops/a", 2).await;
    let lease = leases.get(&lease_name).await.unwrap();
    assert!(holder(&lease).starts_with("writer-a-"), "{:?}", lease.spec);
    assert_eq!(repo.read("main", &format!("clusters/b/{b_path}")), None);
    assert_eq!(
        repo.read("main", &format!("clusters/a/{a_path}")),
        Some(configmap("shop", "a", "2"))
    );
    wait_for_reported_holder(&writer_b, "writer-a-").await;

    // Writer A stops and vacates the Lease; writer B takes it and pushes what waited.
    agent_a.finish();
    writer_a.stop().await;
    let ack = agent_b.ack("gitops/b", 1).await;
    assert_eq!(repo.rev_parse("main").as_deref(), Some(ack.as_str()));
    assert_eq!(
        repo.read("main", &format!("clusters/b/{b_path}")),
        Some(configmap("shop", "b", "1")),
        "no change lost"
    );
    assert_eq!(
        repo.read("main", &format!("clusters/a/{a_path}")),
        Some(configmap("shop", "a", "2")),
        "writer A's pushes survive"
    );
    let lease = leases.get(&lease_name).await.unwrap();
    assert!(holder(&lease).starts_with("writer-b-"), "{:?}", lease.spec);
    assert_eq!(spec(&lease).lease_transitions, Some(1));
    agent_b.finish();
    writer_b.stop().await;
}

/// Waits until the writer's only worker reports a Lease holder starting with `prefix` (WriterAdmin.ListWorkers).
async fn wait_for_reported_holder(writer: &Writer, prefix: &str) {
    use reverser_proto::v1::{ListWorkersRequest, writer_admin_client::WriterAdminClient};
    let mut admin = WriterAdminClient::connect(writer.grpc_url()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let workers = admin
            .list_workers(ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        assert_eq!(workers.len(), 1, "{workers:?}");
        if workers[0].lease_holder.starts_with(prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never reports {prefix}* as the Lease holder: {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Signed commits, checked with the real git CLI: `git verify-commit` with an `gpg.ssh.allowedSignersFile`
//! accepts every commit the writer makes (first write with its ownership marker, later writes, replays after a
//! concurrent human push); without a signing entry commits stay unsigned; a key that cannot sign stops the
//! configuration, and the writer never pushes an unsigned commit in place of a signed one.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use reverser_proto::v1::{ListWorkersRequest, writer_admin_client::WriterAdminClient};
use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";

fn ssh_keygen(args: &[&str]) {
    let output = Command::new("ssh-keygen")
        .args(args)
        .output()
        .expect("ssh-keygen (OpenSSH) is needed to make and check signing keys");
    assert!(
        output.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A new key pair `dir/name` (+ `.pub`) of `kind` (`ed25519`, `rsa`, `ecdsa`), encrypted with `passphrase`.
fn new_key(dir: &Path, name: &str, kind: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    ssh_keygen(&[
        "-q",
        "-t",
        kind,
        "-N",
        passphrase,
        "-C",
        "writer",
        "-f",
        path.to_str().unwrap(),
    ]);
    path
}

/// A `--git-credentials` file that only lists a signing key for `url_prefix`.
fn signing_config(dir: &Path, url_prefix: &str, key: &Path, passphrase: Option<&Path>) -> PathBuf {
    let path = dir.join("credentials.yaml");
    let mut text = format!(
        "credentials: []\ncommitSigning:\n  - urlPrefix: {url_prefix}\n    format: ssh\n    keyFile: {}\n",
        key.display()
    );
    if let Some(passphrase) = passphrase {
        text.push_str(&format!("    passphraseFile: {}\n", passphrase.display()));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn git(repo: &BareRepo, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(args)
        .output()
        .expect("git CLI")
}

fn lines(output: std::process::Output) -> Vec<String> {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `git verify-commit` against an allowed-signers file that trusts `public_key` for everyone.
fn verify(repo: &BareRepo, allowed_signers: &Path, commit: &str) -> std::process::Output {
    git(
        repo,
        &[
            "-c",
            &format!("gpg.ssh.allowedSignersFile={}", allowed_signers.display()),
            "verify-commit",
            "--raw",
            commit,
        ],
    )
}

fn allowed_signers(dir: &Path, public_key_file: &Path) -> PathBuf {
    let key = std::fs::read_to_string(public_key_file).unwrap();
    let path = dir.join("allowed_signers");
    std::fs::write(&path, format!("* namespaces=\"git\" {key}")).unwrap();
    path
}

/// (sha, author e-mail) of every commit on `main`, newest first.
fn commits(repo: &BareRepo) -> Vec<(String, String)> {
    lines(git(repo, &["log", "--format=%H %ae", "main"]))
        .into_iter()
        .map(|l| {
            let (sha, email) = l.split_once(' ').unwrap();
            (sha.to_owned(), email.to_owned())
        })
        .collect()
}

async fn upsert_and_ack(agent: &mut Agent, sequence: u64, name: &str, value: &str) {
    agent
        .send(upsert(
            DEST,
            sequence,
            &format!("core/v1/configmaps/ns/{name}.yaml"),
            &configmap("ns", name, value),
        ))
        .await;
    agent.ack(DEST, sequence).await;
}

#[tokio::test]
async fn every_commit_verifies_including_replays_after_a_human_push() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key(dir.path(), "signing", "ed25519", "");
    let signers = allowed_signers(dir.path(), &key.with_extension("pub"));
    let repo = BareRepo::new();
    let credentials = signing_config(dir.path(), &repo.file_url(), &key, None);
    let writer = Writer::start(&["--git-credentials", credentials.to_str().unwrap()]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    // The first write also creates the ownership marker.
    upsert_and_ack(&mut agent, 1, "a", "1").await;
    // A human pushes behind the writer's back: the next push is rejected, fetched, replayed and signed again.
    repo.commit_as_human("main", "docs/README.md", "hello\n", "docs: add readme");
    upsert_and_ack(&mut agent, 2, "b", "1").await;
    upsert_and_ack(&mut agent, 3, "a", "2").await;

    let all = commits(&repo);
    let (human, ours): (Vec<_>, Vec<_>) = all
        .iter()
        .partition(|(_, email)| email == "human@example.com");
    assert_eq!((human.len(), ours.len()), (1, 3), "{all:?}");
    assert!(
        repo.read("main", "c/.configbutler/owner.yaml").is_some(),
        "the marker was committed"
    );
    for (sha, _) in &ours {
        let output = verify(&repo, &signers, sha);
        assert!(
            output.status.success(),
            "{sha}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let raw = lines(git(&repo, &["cat-file", "commit", sha]));
        assert!(
            raw.iter()
                .any(|l| l == "gpgsig -----BEGIN SSH SIGNATURE-----"),
            "{raw:?}"
        );
    }
    // The check is not a formality: the human's unsigned commit fails it, and so does a key nobody trusts.
    assert!(!verify(&repo, &signers, &human[0].0).status.success());
    let stranger = new_key(dir.path(), "stranger", "ed25519", "");
    let untrusted = dir.path().join("untrusted");
    std::fs::create_dir(&untrusted).unwrap();
    let other_signers = allowed_signers(&untrusted, &stranger.with_extension("pub"));
    assert!(!verify(&repo, &other_signers, &ours[0].0).status.success());

    // The admin RPC shows which key signs, never the private half.
    let mut admin = WriterAdminClient::connect(writer.grpc_url()).await.unwrap();
    let workers = admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let fingerprint = Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8(fingerprint.stdout).unwrap();
    assert_eq!(workers.len(), 1);
    assert!(
        fingerprint.contains(&workers[0].signing_key_fingerprint)
            && workers[0].signing_key_fingerprint.starts_with("SHA256:"),
        "{fingerprint} vs {workers:?}"
    );
    assert!(
        public.starts_with(&workers[0].signing_public_key),
        "{public} vs {workers:?}"
    );
    // The same through grpcurl and server reflection, as an operator sees it.
    let target = writer.grpc_url().trim_start_matches("http://").to_owned();
    let grpcurl = tokio::task::spawn_blocking(move || {
        Command::new(tool("grpcurl"))
            .args(["-plaintext", &target, "reverser.v1.WriterAdmin/ListWorkers"])
            .output()
            .expect("grpcurl")
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&grpcurl.stdout);
    assert!(grpcurl.status.success(), "{grpcurl:?}");
    assert!(
        shown.contains(&format!(
            "\"signingKeyFingerprint\": \"{}\"",
            workers[0].signing_key_fingerprint
        )),
        "{shown}"
    );
    let private = std::fs::read_to_string(&key).unwrap();
    let body = private.lines().nth(1).unwrap();
    assert!(!format!("{workers:?}").contains(body));
    assert!(!shown.contains(body));
    assert!(!writer.metrics().await.contains(body));
    writer.stop().await;
}

#[tokio::test]
async fn without_a_signing_entry_for_the_repository_commits_stay_unsigned() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key(dir.path(), "signing", "ed25519", "");
    let repo = BareRepo::new();
    let other = BareRepo::named("other");
    // A key for another repository only.
    let credentials = signing_config(dir.path(), &other.file_url(), &key, None);
    let writer = Writer::start(&["--git-credentials", credentials.to_str().unwrap()]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    upsert_and_ack(&mut agent, 1, "a", "1").await;
    let all = commits(&repo);
    assert_eq!(all.len(), 1);
    let raw = lines(git(&repo, &["cat-file", "commit", &all[0].0]));
    assert!(!raw.iter().any(|l| l.starts_with("gpgsig")), "{raw:?}");
    let mut admin = WriterAdminClient::connect(writer.grpc_url()).await.unwrap();
    let workers = admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers[0].signing_key_fingerprint, "");
    assert_eq!(workers[0].signing_public_key, "");
    writer.stop().await;
}

#[tokio::test]
async fn a_key_that_cannot_sign_stops_the_writer_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let repo = BareRepo::new();
    let rsa = new_key(dir.path(), "rsa", "rsa", "");
    let ecdsa = new_key(dir.path(), "ecdsa", "ecdsa", "");
    let encrypted = new_key(dir.path(), "encrypted", "ed25519", "correct horse");
    let wrong = dir.path().join("wrong-passphrase");
    std::fs::write(&wrong, "battery staple\n").unwrap();
    let right = dir.path().join("right-passphrase");
    std::fs::write(&right, "correct horse\n").unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(
        &garbage,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LW1hdGVyaWFs\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let pem = dir.path().join("pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBf2\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let cases: [(&Path, Option<&Path>, &str); 6] = [
        (&rsa, None, "only ed25519 keys"),
        (&ecdsa, None, "only ed25519 keys"),
        (&encrypted, None, "encrypted: set its passphrase"),
        (&encrypted, Some(&wrong), "wrong passphrase"),
        (&garbage, None, "not an OpenSSH private key"),
        (&pem, None, "not an OpenSSH private key"),
    ];
    for (key, passphrase, expected) in cases {
        let credentials = signing_config(dir.path(), &repo.file_url(), key, passphrase);
        let error = start_error(&credentials, key).await;
        assert!(
            error.contains(expected) && error.contains("commitSigning entry 0"),
            "{}: {error}",
            key.display()
        );
        let secret = std::fs::read_to_string(key).unwrap();
        let body = secret.lines().nth(1).unwrap();
        assert!(!error.contains(body), "{error}");
        assert!(!error.contains("correct horse") && !error.contains("battery staple"));
    }
    // With its passphrase the encrypted key signs.
    let credentials = signing_config(dir.path(), &repo.file_url(), &encrypted, Some(&right));
    let writer = Writer::start(&["--git-credentials", credentials.to_str().unwrap()]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    upsert_and_ack(&mut agent, 1, "a", "1").await;
    let signers = allowed_signers(dir.path(), &encrypted.with_extension("pub"));
    assert!(verify(&repo, &signers, "main").status.success());
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_key_on_reload_keeps_the_previous_key_and_never_pushes_unsigned() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key(dir.path(), "signing", "ed25519", "");
    let signers = allowed_signers(dir.path(), &key.with_extension("pub"));
    let repo = BareRepo::new();
    let credentials = signing_config(dir.path(), &repo.file_url(), &key, None);
    let writer = Writer::start(&[
        "--git-credentials",
        credentials.to_str().unwrap(),
        "--reload-interval-sec",
        "0.2",
    ])
    .await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    upsert_and_ack(&mut agent, 1, "a", "1").await;
    // The key file is replaced by something that is not a key: the reload is refused, the loaded key signs on.
    std::fs::write(&key, "oops\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    upsert_and_ack(&mut agent, 2, "b", "1").await;
    let all = commits(&repo);
    assert_eq!(all.len(), 2);
    for (sha, _) in &all {
        assert!(verify(&repo, &signers, sha).status.success(), "{sha}");
    }
    writer.stop().await;
}

/// `gpg` with its home in `home`, no agent prompts.
fn gpg(home: &Path, args: &[&str]) -> std::process::Output {
    let output = gpg_output(home, args);
    assert!(
        output.status.success(),
        "gpg {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `gpg` with its home in `home`, no agent prompts, whatever its exit status.
fn gpg_output(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--pinentry-mode", "loopback"])
        .args(args)
        .output()
        .expect("gpg (GnuPG) is needed to make and check OpenPGP keys")
}

/// A new OpenPGP key in a keyring at `home`, exported (armored, protected by `passphrase`) to `dir/name.asc`.
fn new_openpgp_key(
    home: &Path,
    dir: &Path,
    name: &str,
    algorithm: &str,
    passphrase: &str,
) -> PathBuf {
    let uid = format!("{name} <{name}@example.com>");
    // GnuPG 2.2 now and then fails to self-sign a key it has just made and protected with a passphrase
    // ("signing failed: Corrupted protection"; GnuPG's own test suite shows the same intermittently). Nothing is
    // written to the keyring then, and the next attempt makes another random key.
    for attempt in 1.. {
        let generated = gpg_output(
            home,
            &[
                "--passphrase",
                passphrase,
                "--quick-gen-key",
                &uid,
                algorithm,
                "sign",
                "never",
            ],
        );
        let stderr = String::from_utf8_lossy(&generated.stderr);
        if generated.status.success() {
            break;
        }
        assert!(
            attempt < 5 && stderr.contains("Corrupted protection"),
            "gpg --quick-gen-key (attempt {attempt}): {stderr}"
        );
    }
    let secret = gpg(
        home,
        &[
            "--passphrase",
            passphrase,
            "--armor",
            "--export-secret-keys",
            &uid,
        ],
    );
    let path = dir.join(format!("{name}.asc"));
    std::fs::write(&path, secret.stdout).unwrap();
    path
}

fn verify_openpgp(repo: &BareRepo, home: &Path, commit: &str) -> std::process::Output {
    Command::new("git")
        .env("GNUPGHOME", home)
        .arg("--git-dir")
        .arg(repo.path())
        .args(["-c", "gpg.format=openpgp", "verify-commit", "--raw", commit])
        .output()
        .expect("git CLI")
}

fn openpgp_config(dir: &Path, url_prefix: &str, key: &Path, passphrase: Option<&Path>) -> PathBuf {
    let path = signing_config(dir, url_prefix, key, passphrase);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("format: ssh", "format: openpgp");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn openpgp_signed_commits_verify_with_gpg_including_replays() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = new_openpgp_key(&home, dir.path(), "writer", "ed25519", "open sesame");
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "open sesame\n").unwrap();
    let repo = BareRepo::new();
    let credentials = openpgp_config(dir.path(), &repo.file_url(), &key, Some(&passphrase));
    let writer = Writer::start(&["--git-credentials", credentials.to_str().unwrap()]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    upsert_and_ack(&mut agent, 1, "a", "1").await;
    repo.commit_as_human("main", "docs/README.md", "hello\n", "docs: add readme");
    upsert_and_ack(&mut agent, 2, "b", "1").await;

    let all = commits(&repo);
    let ours: Vec<_> = all
        .iter()
        .filter(|(_, e)| e != "human@example.com")
        .collect();
    assert_eq!(ours.len(), 2, "{all:?}");
    for (sha, _) in &ours {
        let output = verify_openpgp(&repo, &home, sha);
        assert!(
            output.status.success(),
            "{sha}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let raw = lines(git(&repo, &["cat-file", "commit", sha]));
        assert!(
            raw.iter()
                .any(|l| l == "gpgsig -----BEGIN PGP SIGNATURE-----"),
            "{raw:?}"
        );
    }
    // An empty keyring does not know the key: the check can fail.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    assert!(!verify_openpgp(&repo, &empty, &ours[0].0).status.success());

    let mut admin = WriterAdminClient::connect(writer.grpc_url()).await.unwrap();
    let workers = admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let listed = String::from_utf8(
        gpg(
            &home,
            &["--with-colons", "--fingerprint", "writer@example.com"],
        )
        .stdout,
    )
    .unwrap();
    assert!(
        listed.contains(&format!(":{}:", workers[0].signing_key_fingerprint)),
        "{listed} vs {workers:?}"
    );
    assert!(
        workers[0]
            .signing_public_key
            .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    );
    assert!(!format!("{workers:?}").contains("PRIVATE"));
    writer.stop().await;
}

#[tokio::test]
async fn an_openpgp_key_that_cannot_sign_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = new_openpgp_key(&home, dir.path(), "locked", "ed25519", "right one");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong one\n").unwrap();
    let ssh_key = new_key(dir.path(), "ssh", "ed25519", "");
    let repo = BareRepo::new();
    for (key, passphrase, expected) in [
        (&key, None, "encrypted: set its passphrase"),
        (&key, Some(wrong.as_path()), "wrong passphrase"),
        (&ssh_key, None, "not an armored OpenPGP secret key"),
    ] {
        let credentials = openpgp_config(dir.path(), &repo.file_url(), key, passphrase);
        let error = start_error(&credentials, key).await;
        assert!(error.contains(expected), "{}: {error}", key.display());
        assert!(
            !error.contains("right one") && !error.contains("wrong one"),
            "{error}"
        );
    }
}

/// Starts a writer with `credentials` and returns why it refused to start (panics if it started): `key` names
/// the key under test in that panic.
async fn start_error(credentials: &std::path::Path, key: &std::path::Path) -> String {
    let work = tempfile::tempdir().unwrap();
    let args = <reverser_writer::Args as clap::Parser>::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--leases",
        "off",
        "--work-dir",
        work.path().to_str().unwrap(),
        "--git-credentials",
        credentials.to_str().unwrap(),
    ])
    .unwrap();
    match args.start().await {
        Ok(_) => panic!("{} was accepted", key.display()),
        Err(error) => format!("{error:#}"),
    }
}

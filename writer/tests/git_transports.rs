//! The git layer over real servers: git daemon, git http-backend behind HTTPS + basic auth,
//! OpenSSH sshd. Every server runs on 127.0.0.1 for the duration of one test.

use std::time::{Duration, Instant};

use reverser_writer::git::{
    Clone, CommitMeta, FileChange, GitCredentials, GitError, PushOutcome, RepoSpec,
};
use testkit::{BareRepo, GitDaemon, HttpGitServer, SshGitServer, free_port};

fn meta(message: &str) -> CommitMeta {
    CommitMeta {
        author_name: "a".into(),
        author_email: "a@example.com".into(),
        committer_name: "c".into(),
        committer_email: "c@example.com".into(),
        message: message.into(),
    }
}

/// Fetches, commits one file on the base and pushes it; returns the commit and the outcome.
fn commit_and_push(spec: RepoSpec, path: &str) -> Result<(git2::Oid, PushOutcome), GitError> {
    let dir = tempfile::tempdir().unwrap();
    let mut clone = Clone::open_or_init(&dir.path().join("w"), spec)?;
    clone.fetch()?;
    let commit = clone.commit(
        clone.base(),
        &[FileChange::write(path, format!("{path}\n").into_bytes())],
        &meta(path),
    )?;
    let outcome = clone.push(commit)?;
    // A fetch right after our push sees our own commit as the tip.
    assert_eq!(clone.fetch()?, Some(commit));
    Ok((commit, outcome))
}

fn assert_pushed(remote: &BareRepo, result: Result<(git2::Oid, PushOutcome), GitError>) {
    let (commit, outcome) = result.unwrap();
    assert_eq!(outcome, PushOutcome::Pushed);
    assert_eq!(remote.rev_parse("main"), Some(commit.to_string()));
}

#[test]
fn pushes_over_git_daemon() {
    let remote = BareRepo::new();
    let daemon = GitDaemon::start(&remote);
    assert_pushed(
        &remote,
        commit_and_push(RepoSpec::new(daemon.url(), "main"), "one.yaml"),
    );
    assert_pushed(
        &remote,
        commit_and_push(RepoSpec::new(daemon.url(), "main"), "two.yaml"),
    );
    assert_eq!(remote.ls_tree("main"), ["one.yaml", "two.yaml"]);
}

#[test]
fn pushes_over_https_with_basic_auth_and_the_extra_ca() {
    let remote = BareRepo::new();
    let server = HttpGitServer::start(&remote, "robot", "s3cret-pw");
    let spec = RepoSpec::new(server.url(), "main")
        .with_credentials(GitCredentials::Basic {
            username: "robot".into(),
            password: "s3cret-pw".into(),
        })
        .with_ca_cert_file(server.ca_file());
    assert_pushed(&remote, commit_and_push(spec.clone(), "a.yaml"));
    assert_pushed(&remote, commit_and_push(spec, "b.yaml"));
    assert_eq!(remote.ls_tree("main"), ["a.yaml", "b.yaml"]);
}

#[test]
fn a_token_is_sent_as_the_password_of_x_access_token() {
    let remote = BareRepo::new();
    let server = HttpGitServer::start(&remote, "x-access-token", "ghp_token123");
    let spec = RepoSpec::new(server.url(), "main")
        .with_credentials(GitCredentials::Token("ghp_token123".into()))
        .with_ca_cert_file(server.ca_file());
    assert_pushed(&remote, commit_and_push(spec, "a.yaml"));
}

#[test]
fn a_wrong_https_password_is_an_auth_error_that_does_not_leak_it() {
    let remote = BareRepo::new();
    let server = HttpGitServer::start(&remote, "robot", "right-pw");
    let spec = RepoSpec::new(
        server.url().replace("https://", "https://robot:url-pw@"),
        "main",
    )
    .with_credentials(GitCredentials::Basic {
        username: "robot".into(),
        password: "wrong-pw".into(),
    })
    .with_ca_cert_file(server.ca_file());
    let err = commit_and_push(spec, "a.yaml").unwrap_err();
    assert!(matches!(err, GitError::Auth(_)), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("wrong-pw") && !text.contains("url-pw"),
        "{text}"
    );
    assert!(
        server.unauthorized_count() <= 3,
        "credentials retried {} times",
        server.unauthorized_count()
    );
    assert_eq!(remote.rev_parse("main"), None);
}

#[test]
fn https_without_credentials_is_an_auth_error() {
    let remote = BareRepo::new();
    let server = HttpGitServer::start(&remote, "robot", "pw");
    let spec = RepoSpec::new(server.url(), "main").with_ca_cert_file(server.ca_file());
    let err = commit_and_push(spec, "a.yaml").unwrap_err();
    assert!(matches!(err, GitError::Auth(_)), "{err:?}");
}

#[test]
fn an_https_certificate_from_an_unknown_ca_is_refused() {
    let remote = BareRepo::new();
    let server = HttpGitServer::start(&remote, "robot", "pw");
    let other = HttpGitServer::start(&remote, "robot", "pw");
    let creds = GitCredentials::Basic {
        username: "robot".into(),
        password: "pw".into(),
    };
    let no_ca = RepoSpec::new(server.url(), "main").with_credentials(creds.clone());
    let err = commit_and_push(no_ca, "a.yaml").unwrap_err();
    assert!(matches!(err, GitError::HostKey(_)), "{err:?}");
    let wrong_ca = RepoSpec::new(server.url(), "main")
        .with_credentials(creds)
        .with_ca_cert_file(other.ca_file());
    let err = commit_and_push(wrong_ca, "a.yaml").unwrap_err();
    assert!(matches!(err, GitError::HostKey(_)), "{err:?}");
    assert_eq!(
        server.request_count(),
        0,
        "nothing may be sent to an unverified server"
    );
}

fn ssh_spec(server: &SshGitServer, private_key: String, known_hosts: String) -> RepoSpec {
    RepoSpec::new(server.url(), "main").with_credentials(GitCredentials::Ssh {
        username: server.user().into(),
        private_key,
        passphrase: None,
        known_hosts,
    })
}

#[test]
fn pushes_over_ssh_with_a_key_and_known_hosts() {
    let remote = BareRepo::new();
    let server = SshGitServer::start(&remote);
    let spec = ssh_spec(&server, server.client_private_key(), server.known_hosts());
    let result = commit_and_push(spec.clone(), "a.yaml");
    assert!(result.is_ok(), "{result:?}\nsshd log:\n{}", server.log());
    assert_pushed(&remote, result);
    assert_pushed(&remote, commit_and_push(spec, "b.yaml"));
}

#[test]
fn an_ssh_key_configured_without_a_username_logs_in_as_the_user_the_url_names() {
    let remote = BareRepo::new();
    let server = SshGitServer::start(&remote);
    assert_ne!(
        server.user(),
        "git",
        "the URL must name a user other than the default"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), server.client_private_key()).unwrap();
    std::fs::write(dir.path().join("kh"), server.known_hosts()).unwrap();
    std::fs::write(
        dir.path().join("credentials.yaml"),
        format!(
            "credentials:\n  - urlPrefix: ssh://\n    sshPrivateKeyFile: {0}/key\n    knownHostsFile: {0}/kh\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let store =
        reverser_writer::credentials::CredentialStore::load(&dir.path().join("credentials.yaml"))
            .unwrap();
    let credentials = store
        .for_url(&server.url())
        .expect("the entry matches")
        .clone();
    let spec = RepoSpec::new(server.url(), "main").with_credentials(credentials);
    let result = commit_and_push(spec, "a.yaml");
    assert!(result.is_ok(), "{result:?}\nsshd log:\n{}", server.log());
    assert_pushed(&remote, result);
}

#[test]
fn an_ssh_username_that_contradicts_the_url_is_an_auth_error_naming_both() {
    let remote = BareRepo::new();
    let server = SshGitServer::start(&remote);
    let spec = RepoSpec::new(server.url(), "main").with_credentials(GitCredentials::Ssh {
        username: "someone-else".into(),
        private_key: server.client_private_key(),
        passphrase: None,
        known_hosts: server.known_hosts(),
    });
    let err = commit_and_push(spec, "a.yaml").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, GitError::Auth(_)), "{err:?}");
    assert!(
        text.contains("someone-else") && text.contains(server.user()),
        "{text}"
    );
    assert_eq!(remote.rev_parse("main"), None);
}

#[test]
fn an_ssh_host_key_not_in_known_hosts_is_refused() {
    let remote = BareRepo::new();
    let server = SshGitServer::start(&remote);
    for known_hosts in [
        server.foreign_known_hosts(),
        String::new(),
        // the right key, but filed under another port
        server
            .known_hosts()
            .replace(&format!(":{}", server.port()), ":1"),
    ] {
        let spec = ssh_spec(&server, server.client_private_key(), known_hosts.clone());
        let err = commit_and_push(spec, "a.yaml").unwrap_err();
        assert!(
            matches!(err, GitError::HostKey(_)),
            "{known_hosts:?}: {err:?}"
        );
    }
    assert_eq!(remote.rev_parse("main"), None);
}

#[test]
fn an_unauthorised_ssh_key_is_an_auth_error() {
    let remote = BareRepo::new();
    let server = SshGitServer::start(&remote);
    let key = server.foreign_private_key();
    let spec = ssh_spec(&server, key.clone(), server.known_hosts());
    let started = Instant::now();
    let err = commit_and_push(spec, "a.yaml").unwrap_err();
    assert!(matches!(err, GitError::Auth(_)), "{err:?}");
    assert!(!format!("{err:?}").contains(key.lines().nth(1).unwrap()));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no credential loop"
    );
}

#[test]
fn a_closed_port_is_unreachable_quickly() {
    let port = free_port();
    for url in [
        format!("git://127.0.0.1:{port}/repo.git"),
        format!("https://127.0.0.1:{port}/repo.git"),
        format!("ssh://git@127.0.0.1:{port}/repo.git"),
    ] {
        let started = Instant::now();
        let err = commit_and_push(RepoSpec::new(url.clone(), "main"), "a.yaml").unwrap_err();
        assert!(matches!(err, GitError::Unreachable(_)), "{url}: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{url}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_concurrent_human_push_over_the_network_is_a_rejection_not_an_error() {
    let remote = BareRepo::new();
    let daemon = GitDaemon::start(&remote);
    let dir = tempfile::tempdir().unwrap();
    let mut clone =
        Clone::open_or_init(&dir.path().join("w"), RepoSpec::new(daemon.url(), "main")).unwrap();
    let seed = clone
        .commit(
            None,
            &[FileChange::write("a", b"a".to_vec())],
            &meta("seed"),
        )
        .unwrap();
    assert_eq!(clone.push(seed).unwrap(), PushOutcome::Pushed);
    remote.commit_as_human("main", "h.md", "h", "human");
    let ours = clone
        .commit(
            clone.base(),
            &[FileChange::write("b", b"b".to_vec())],
            &meta("ours"),
        )
        .unwrap();
    assert_eq!(clone.push(ours).unwrap(), PushOutcome::Rejected);
    clone.fetch().unwrap();
    let replay = clone
        .commit(
            clone.base(),
            &[FileChange::write("b", b"b".to_vec())],
            &meta("ours"),
        )
        .unwrap();
    assert_eq!(clone.push(replay).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.ls_tree("main"), ["a", "b", "h.md"]);
}

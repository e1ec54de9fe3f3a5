//! Attribution: *who* changed an object, from a validating admission webhook that only
//! observes.
//!
//! ```text
//!  kube-apiserver ──HTTPS AdmissionReview──▶ server (TLS only, cert reloaded on change,
//!  (ValidatingWebhookConfiguration            │      body/time limits)
//!   from `registration`)                      ▼
//!                                       handler::review ──▶ allowed: true, always
//!                                             │ Fact{key, operation, user, groups, uid,
//!                                             │      hash of the sanitized canonical object}
//!                                             ▼ (not for dry runs)
//!                                        facts::FactStore (bounded, TTL, injectable clock)
//!                                             ▲
//!  ingestion (watch events) ──Attribution: author_of_upsert(key, object, hash) / author_of_delete(key, uid)──┘
//!        └──▶ AgentEvent::Upsert/Delete { author: Some(user) or None (the bot) }
//! ```
//!
//! Admission sees attempts, not persisted changes, so a fact names an author only when a watch
//! event proves the attempt became state: same object and byte-identical canonical content for
//! ADDED/MODIFIED, the same uid for DELETED. Anything else — no fact, an expired fact, facts of
//! different users — leaves the bot as the author; the join never guesses, and capturing state
//! never waits for a fact.
//!
//! - [`facts`]: the pure store and join; it implements [`crate::attribution::Attribution`], all ingestion knows of it.
//! - [`handler`]: AdmissionReview parsing → fact, and the response; the one path served ([`PATH`]).
//! - [`server`]: the HTTPS server and its settings ([`WebhookConfig`]); [`spawn`] starts it.
//!
//! The certificate and the client CA (`--webhook-client-ca`) are `reverser_common::tls`'s, following their files.
//! - [`registration`]: the `ValidatingWebhookConfiguration` for the watched types.
//! - [`sync`]: while leading, keeps that configuration listing exactly the watched types.
//! - [`metrics`]: the Prometheus collectors.
//!
//! This module holds the flags ([`WebhookArgs`]) and re-exports what the rest of the agent uses; the children
//! never import it back.

pub mod facts;
pub mod handler;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use facts::{Clock, Fact, FactStore, FactsConfig, ManualClock, Operation, SystemClock};
pub use handler::PATH;
pub use metrics::AttributionMetrics;
pub use server::{DEFAULT_MAX_BODY_BYTES, WebhookConfig, WebhookError, WebhookHandle, spawn};

/// The webhook's flags, for `#[command(flatten)]` into the agent's `Args`.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Serve the attribution admission webhook (HTTPS) on this address; off when unset.
    #[arg(long, env = "AGENT_WEBHOOK_ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_addr: Option<SocketAddr>,
    /// PEM certificate chain of the webhook (re-read when the file changes).
    #[arg(long, env = "AGENT_WEBHOOK_CERT")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook (re-read when the file changes).
    #[arg(long, env = "AGENT_WEBHOOK_KEY")]
    pub webhook_key: Option<PathBuf>,
    /// PEM CA bundle that signs the API server's client certificate (its AdmissionConfiguration kubeconfig): callers without a certificate from it are refused during the TLS handshake (re-read when the file changes). Off when unset: anyone who reaches the port may post reviews.
    #[arg(long, env = "AGENT_WEBHOOK_CLIENT_CA")]
    pub webhook_client_ca: Option<PathBuf>,
    /// With --webhook-client-ca: names (comma-separated) of which the client certificate must carry one, as subject CN or DNS/URI SAN; any name when unset.
    #[arg(
        long,
        env = "AGENT_WEBHOOK_CLIENT_NAMES",
        value_delimiter = ',',
        requires = "webhook_client_ca"
    )]
    pub webhook_client_names: Vec<String>,
    /// Largest AdmissionReview accepted; larger ones get 413.
    #[arg(long, env = "AGENT_WEBHOOK_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub webhook_max_body_bytes: usize,
    /// How long an admission fact waits for its watch event (`600`, `90s`, `10m`).
    #[arg(long, env = "AGENT_ATTRIBUTION_TTL", default_value = "10m", value_parser = reverser_common::args::parse_duration)]
    pub attribution_ttl: Duration,
    /// Most admission facts held; the oldest is evicted beyond it.
    #[arg(long, env = "AGENT_ATTRIBUTION_MAX_FACTS", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub attribution_max_facts: u64,
    /// While leading, keep the ValidatingWebhookConfiguration named --controller-name listing exactly the watched types (server-side apply); off when the chart owns it.
    #[arg(long, env = "AGENT_WEBHOOK_MANAGE_CONFIGURATION")]
    pub webhook_manage_configuration: bool,
    /// PEM CA bundle the API server must trust the webhook's certificate with (for the managed configuration).
    #[arg(long, env = "AGENT_WEBHOOK_CA_BUNDLE")]
    pub webhook_ca_bundle: Option<PathBuf>,
    /// Service the API server calls, `namespace/name` or `namespace/name:port` (port 443 by default), for the managed configuration.
    #[arg(long, env = "AGENT_WEBHOOK_SERVICE", conflicts_with = "webhook_url")]
    pub webhook_service: Option<String>,
    /// Base URL the API server calls (`https://host:port`), instead of --webhook-service.
    #[arg(long, env = "AGENT_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Label (`key=value`, repeatable; comma-separated in the env) of the managed configuration, e.g. Helm's `app.kubernetes.io/managed-by=Helm` so a later chart-owned configuration adopts it.
    #[arg(long, env = "AGENT_WEBHOOK_CONFIGURATION_LABELS", value_delimiter = ',', value_parser = parse_key_value)]
    pub webhook_configuration_label: Vec<(String, String)>,
    /// Annotation (`key=value`, repeatable; comma-separated in the env) of the managed configuration, e.g. Helm's `meta.helm.sh/release-name=NAME`.
    #[arg(long, env = "AGENT_WEBHOOK_CONFIGURATION_ANNOTATIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub webhook_configuration_annotation: Vec<(String, String)>,
    /// ClusterRole that owns the managed configuration: deleting it (helm uninstall) lets the garbage collector delete the configuration; nothing is applied while it is missing.
    #[arg(long, env = "AGENT_WEBHOOK_CONFIGURATION_OWNER")]
    pub webhook_configuration_owner: Option<String>,
}

/// `key=value` with a non-empty key.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

impl WebhookArgs {
    /// The server settings (`None` when `--webhook-addr` is unset) and the store limits. `sensitive_resources`
    /// is `--sensitive-resources`: those types are never attributed (nor hashed).
    pub fn configs(
        &self,
        sensitive_resources: &[String],
    ) -> Result<(Option<WebhookConfig>, FactsConfig), WebhookError> {
        let facts = FactsConfig {
            ttl: self.attribution_ttl,
            max_facts: usize::try_from(self.attribution_max_facts).unwrap_or(usize::MAX),
        };
        let Some(addr) = self.webhook_addr else {
            return Ok((None, facts));
        };
        let (Some(cert), Some(key)) = (&self.webhook_cert, &self.webhook_key) else {
            return Err(WebhookError::Config(
                "--webhook-addr needs --webhook-cert and --webhook-key".into(),
            ));
        };
        if self.webhook_max_body_bytes == 0 {
            return Err(WebhookError::Config(
                "--webhook-max-body-bytes must be positive".into(),
            ));
        }
        let mut config = WebhookConfig::new(addr, cert.clone(), key.clone());
        if let Some(ca) = &self.webhook_client_ca {
            // Checked now, so a bad bundle fails the start rather than a later leader term.
            reverser_common::tls::client_verifier(
                ca,
                &std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            )?;
            config.client_ca_file = Some(ca.clone());
            config.client_names = self
                .webhook_client_names
                .iter()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect();
        }
        config.max_body_bytes = self.webhook_max_body_bytes;
        config.sensitive_resources = sensitive_resources.to_vec();
        Ok((Some(config), facts))
    }

    /// What the leader registers when `--webhook-manage-configuration` is on (`None` when it
    /// is off): the configuration `name`, the target, the CA bundle (read now), the agent's
    /// own namespace excluded and the `--sensitive-resources` never listed.
    pub fn registration(
        &self,
        name: &str,
        own_namespace: &str,
        sensitive_resources: &[String],
    ) -> Result<Option<registration::Registration>, WebhookError> {
        if !self.webhook_manage_configuration {
            return Ok(None);
        }
        let config = |m: &str| Err(WebhookError::Config(m.to_owned()));
        if self.webhook_addr.is_none() {
            return config("--webhook-manage-configuration needs --webhook-addr");
        }
        let Some(ca) = &self.webhook_ca_bundle else {
            return config("--webhook-manage-configuration needs --webhook-ca-bundle");
        };
        let target = match (&self.webhook_service, &self.webhook_url) {
            (Some(service), None) => parse_service(service)?,
            (None, Some(url)) if url.starts_with("https://") => {
                registration::Target::Url(url.clone())
            }
            (None, Some(url)) => {
                return Err(WebhookError::Config(format!(
                    "--webhook-url must start with https:// (got {url:?})"
                )));
            }
            _ => {
                return config(
                    "--webhook-manage-configuration needs --webhook-service or --webhook-url",
                );
            }
        };
        let ca_pem = std::fs::read(ca).map_err(|source| WebhookError::ReadFile {
            path: ca.clone(),
            source,
        })?;
        if rustls_pemfile_certs(&ca_pem) == 0 {
            return Err(WebhookError::Pem {
                path: ca.clone(),
                message: "no certificate".into(),
            });
        }
        let mut reg = registration::Registration::new(name, target, ca_pem);
        reg.labels = self.webhook_configuration_label.iter().cloned().collect();
        reg.annotations = self
            .webhook_configuration_annotation
            .iter()
            .cloned()
            .collect();
        reg.owner_cluster_role = self
            .webhook_configuration_owner
            .clone()
            .filter(|n| !n.is_empty());
        reg.exclude_namespaces = vec![own_namespace.to_owned()];
        reg.sensitive_resources = sensitive_resources.to_vec();
        Ok(Some(reg))
    }
}

/// Certificates in a PEM bundle.
fn rustls_pemfile_certs(pem: &[u8]) -> usize {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter(Result::is_ok)
        .count()
}

/// `namespace/name` or `namespace/name:port`.
fn parse_service(text: &str) -> Result<registration::Target, WebhookError> {
    let bad = || {
        WebhookError::Config(format!(
            "--webhook-service must be namespace/name or namespace/name:port (got {text:?})"
        ))
    };
    let (namespace, rest) = text.split_once('/').ok_or_else(bad)?;
    let (name, port) = match rest.split_once(':') {
        Some((name, port)) => (name, port.parse::<u16>().map_err(|_| bad())?),
        None => (rest, 443),
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') || port == 0 {
        return Err(bad());
    }
    Ok(registration::Target::Service {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    #[test]
    fn webhook_is_off_without_an_address_and_defaults_to_ten_minutes() {
        let cli = Cli::try_parse_from(["agent"]).unwrap();
        let (server, facts) = cli.webhook.configs(&[]).unwrap();
        assert!(server.is_none());
        assert_eq!(facts.ttl, Duration::from_secs(600));
        assert_eq!(facts.max_facts, 50_000);
    }

    #[test]
    fn webhook_address_requires_certificate_and_key() {
        assert!(Cli::try_parse_from(["agent", "--webhook-addr", "0.0.0.0:9443"]).is_err());
        let cli = Cli::try_parse_from([
            "agent",
            "--webhook-addr",
            "0.0.0.0:9443",
            "--webhook-cert",
            "tls.crt",
            "--webhook-key",
            "tls.key",
            "--webhook-max-body-bytes",
            "1024",
            "--attribution-ttl",
            "90s",
        ])
        .unwrap();
        let (server, facts) = cli.webhook.configs(&["configmaps".to_owned()]).unwrap();
        let server = server.unwrap();
        assert_eq!(server.max_body_bytes, 1024);
        assert_eq!(server.sensitive_resources, ["configmaps"]);
        assert_eq!(server.cert_file, PathBuf::from("tls.crt"));
        assert_eq!(facts.ttl, Duration::from_secs(90));
    }

    #[test]
    fn a_client_ca_is_loaded_at_start_and_names_need_it() {
        let base = [
            "agent",
            "--webhook-addr",
            "0.0.0.0:9443",
            "--webhook-cert",
            "c",
            "--webhook-key",
            "k",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        assert!(
            parse(&["--webhook-client-names", "kube-apiserver"]).is_err(),
            "names without a CA"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("client-ca.crt");
        std::fs::write(&ca, "not PEM").unwrap();
        let ca = ca.to_str().unwrap();
        let cli = parse(&["--webhook-client-ca", ca]).unwrap();
        assert!(
            cli.webhook.configs(&[]).is_err(),
            "an unloadable CA fails the start"
        );
        let cert = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
        std::fs::write(ca, cert.cert.pem()).unwrap();
        let cli = parse(&[
            "--webhook-client-ca",
            ca,
            "--webhook-client-names",
            "kube-apiserver, front-proxy",
        ])
        .unwrap();
        let server = cli.webhook.configs(&[]).unwrap().0.unwrap();
        assert_eq!(
            server.client_ca_file.as_deref(),
            Some(std::path::Path::new(ca))
        );
        assert_eq!(server.client_names, ["kube-apiserver", "front-proxy"]);
        let open = parse(&[]).unwrap().webhook.configs(&[]).unwrap().0.unwrap();
        assert_eq!(open.client_ca_file, None);
    }

    #[test]
    fn managed_configuration_is_off_by_default_and_needs_a_target_and_a_ca() {
        let cli = Cli::try_parse_from(["agent"]).unwrap();
        assert!(cli.webhook.registration("gr", "ns", &[]).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let cert = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let ca = ca.to_str().unwrap();
        let base = [
            "agent",
            "--webhook-addr",
            "0.0.0.0:9443",
            "--webhook-cert",
            "c",
            "--webhook-key",
            "k",
            "--webhook-manage-configuration",
        ];
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(base.iter().chain(extra)).map(|c| {
                c.webhook
                    .registration("gr", "gitops", &["sealedsecrets.bitnami.com".to_owned()])
            })
        };
        assert!(parse(&[]).unwrap().is_err(), "no CA, no target");
        assert!(
            parse(&["--webhook-ca-bundle", ca]).unwrap().is_err(),
            "no target"
        );
        assert!(
            parse(&["--webhook-ca-bundle", ca, "--webhook-url", "http://x"])
                .unwrap()
                .is_err()
        );
        assert!(
            parse(&["--webhook-ca-bundle", ca, "--webhook-service", "gitops"])
                .unwrap()
                .is_err()
        );
        assert!(parse(&["--webhook-service", "a/b", "--webhook-url", "https://x"]).is_err());
        let reg = parse(&[
            "--webhook-ca-bundle",
            ca,
            "--webhook-service",
            "gitops/gr-webhook",
        ])
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(reg.name, "gr");
        assert_eq!(reg.owner_cluster_role, None);
        assert!(reg.labels.is_empty() && reg.annotations.is_empty());
        assert_eq!(reg.exclude_namespaces, ["gitops"]);
        assert_eq!(reg.sensitive_resources, ["sealedsecrets.bitnami.com"]);
        assert_eq!(
            reg.target,
            registration::Target::Service {
                namespace: "gitops".into(),
                name: "gr-webhook".into(),
                port: 443
            }
        );
        let reg = parse(&[
            "--webhook-ca-bundle",
            ca,
            "--webhook-url",
            "https://127.0.0.1:8443",
        ])
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(
            reg.target,
            registration::Target::Url("https://127.0.0.1:8443".into())
        );
        let reg = parse(&[
            "--webhook-ca-bundle",
            ca,
            "--webhook-service",
            "gitops/gr-webhook",
            "--webhook-configuration-label",
            "app.kubernetes.io/managed-by=Helm",
            "--webhook-configuration-annotation",
            "meta.helm.sh/release-name=gr",
            "--webhook-configuration-annotation",
            "meta.helm.sh/release-namespace=gitops",
            "--webhook-configuration-owner",
            "gr-agent",
        ])
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(reg.owner_cluster_role.as_deref(), Some("gr-agent"));
        assert_eq!(reg.labels["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(reg.annotations["meta.helm.sh/release-name"], "gr");
        assert_eq!(reg.annotations["meta.helm.sh/release-namespace"], "gitops");
        assert!(parse(&["--webhook-configuration-label", "=x"]).is_err());
        let no_addr = Cli::try_parse_from([
            "agent",
            "--webhook-manage-configuration",
            "--webhook-ca-bundle",
            ca,
            "--webhook-url",
            "https://x",
        ])
        .unwrap();
        assert!(no_addr.webhook.registration("gr", "ns", &[]).is_err());
    }
}

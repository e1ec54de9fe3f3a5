//! Flag groups both binaries flatten into their `Args`: logging, the admin endpoint, the Kubernetes client.
//!
//! The flags are the same in both; each binary names their environment variables (`AGENT_*`, `WRITER_*`) and,
//! where they differ, their defaults and help, with `#[command(mut_arg(..))]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::kube_client::{self, KubeClientError, WithoutKubeconfig};
use crate::telemetry::{self, LogFormat};

/// `--log-level`, `--log-format`.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global log subscriber.
    pub fn init(&self) -> anyhow::Result<()> {
        telemetry::init(&self.log_level, self.log_format)
    }
}

/// `--admin-addr` (each binary sets its default port).
#[derive(Clone, Debug, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
}

/// `--kubeconfig`.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig to use (default: in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

impl KubeArgs {
    /// The client configuration: `--kubeconfig`, else per `without`.
    pub async fn config(
        &self,
        without: WithoutKubeconfig,
    ) -> Result<kube::Config, KubeClientError> {
        kube_client::config(self.kubeconfig.as_deref(), without).await
    }

    /// The client: `--kubeconfig`, else per `without`.
    pub async fn client(
        &self,
        without: WithoutKubeconfig,
    ) -> Result<kube::Client, KubeClientError> {
        kube_client::client(self.config(without).await?)
    }
}

/// `300` (seconds), `500ms`, `90s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 5m, 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration unit {unit:?} in {text:?}")),
    };
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
    }
}

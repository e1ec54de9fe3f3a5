//! Git credentials from the Secret a `GitRepoConfig.spec.secretRef` names, in the GitRepoConfig's namespace.
//!
//! The keys follow Flux's `GitRepository` Secret convention, so one Secret serves both:
//!
//! | keys                                           | credentials                                      |
//! |------------------------------------------------|--------------------------------------------------|
//! | `username` + `password`                        | HTTPS basic authentication                       |
//! | `token` (optionally `username`)                | HTTPS token, sent as the basic-auth password     |
//! | `identity` (or `ssh-privatekey`) + `known_hosts` | SSH key; optional `password`/`passphrase` for the key, `username` (default: the URL's user, else `git`) |
//!
//! Values never reach a log, a status or Debug output: [`GitCredentials`]' Debug prints only the kind, and every
//! error names keys, never values.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

/// Credentials an agent sends in `Destination.credentials` (inline).
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    Basic {
        username: String,
        password: String,
    },
    Token(String),
    Ssh {
        username: String,
        private_key: String,
        passphrase: Option<String>,
        known_hosts: String,
    },
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GitCredentials::Basic { .. } => "GitCredentials::Basic(<redacted>)",
            GitCredentials::Token(_) => "GitCredentials::Token(<redacted>)",
            GitCredentials::Ssh { .. } => "GitCredentials::Ssh(<redacted>)",
        })
    }
}

/// Why a Secret's data are not usable credentials (names keys only, never values).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretCredentialsError {
    #[error("key {0:?} is not UTF-8 text")]
    NotText(&'static str),
    #[error("key {0:?} is empty")]
    Empty(&'static str),
    #[error("key {0:?} needs key {1:?}")]
    Missing(&'static str, &'static str),
    #[error("set one of password, token or identity/ssh-privatekey, not several ({0})")]
    Ambiguous(String),
    #[error(
        "no credentials: the Secret needs username+password, token, or identity (ssh-privatekey) with known_hosts"
    )]
    None,
}

/// Parses a Secret's `data` into credentials (see the module documentation for the keys).
pub fn from_secret_data(
    data: &BTreeMap<String, ByteString>,
) -> Result<GitCredentials, SecretCredentialsError> {
    let text = |key: &'static str| -> Result<Option<String>, SecretCredentialsError> {
        match data.get(key) {
            None => Ok(None),
            Some(value) => {
                let value = String::from_utf8(value.0.clone())
                    .map_err(|_| SecretCredentialsError::NotText(key))?;
                if value.trim().is_empty() {
                    return Err(SecretCredentialsError::Empty(key));
                }
                Ok(Some(value))
            }
        }
    };
    // Single-line values lose a trailing newline (`echo token > file`); keys keep theirs.
    let line = |key: &'static str| -> Result<Option<String>, SecretCredentialsError> {
        Ok(text(key)?.map(|v| v.trim_end_matches(['\n', '\r']).to_owned()))
    };
    let identity = match (text("identity")?, text("ssh-privatekey")?) {
        (Some(_), Some(_)) => {
            return Err(SecretCredentialsError::Ambiguous(
                "identity and ssh-privatekey".into(),
            ));
        }
        (a, b) => a.or(b),
    };
    let username = line("username")?;
    let password = line("password")?;
    let token = line("token")?;
    match (identity, token) {
        (Some(private_key), None) => {
            let known_hosts = text("known_hosts")?
                .ok_or(SecretCredentialsError::Missing("identity", "known_hosts"))?;
            let passphrase = match (password, line("passphrase")?) {
                (Some(_), Some(_)) => {
                    return Err(SecretCredentialsError::Ambiguous(
                        "password and passphrase for the SSH key".into(),
                    ));
                }
                (a, b) => a.or(b),
            };
            Ok(GitCredentials::Ssh {
                // Empty: the writer logs in as the user the repository URL names, else `git`.
                username: username.unwrap_or_default(),
                private_key,
                passphrase,
                known_hosts,
            })
        }
        (Some(_), Some(_)) => Err(SecretCredentialsError::Ambiguous(
            "identity and token".into(),
        )),
        (None, Some(token)) => match (password, username) {
            (Some(_), _) => Err(SecretCredentialsError::Ambiguous(
                "password and token".into(),
            )),
            (None, Some(username)) => Ok(GitCredentials::Basic {
                username,
                password: token,
            }),
            (None, None) => Ok(GitCredentials::Token(token)),
        },
        (None, None) => match (username, password) {
            (Some(username), Some(password)) => Ok(GitCredentials::Basic { username, password }),
            (None, Some(_)) => Err(SecretCredentialsError::Missing("password", "username")),
            (Some(_), None) => Err(SecretCredentialsError::Missing("username", "password")),
            (None, None) => Err(SecretCredentialsError::None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn basic_auth_from_username_and_password() {
        assert_eq!(
            from_secret_data(&data(&[("username", "bot"), ("password", "s3cr3t\n")])),
            Ok(GitCredentials::Basic {
                username: "bot".into(),
                password: "s3cr3t".into()
            })
        );
    }

    #[test]
    fn token_alone_or_with_a_username() {
        assert_eq!(
            from_secret_data(&data(&[("token", "tok")])),
            Ok(GitCredentials::Token("tok".into()))
        );
        assert_eq!(
            from_secret_data(&data(&[("token", "tok"), ("username", "x-access-token")])),
            Ok(GitCredentials::Basic {
                username: "x-access-token".into(),
                password: "tok".into()
            })
        );
    }

    #[test]
    fn ssh_key_flux_and_kubernetes_ssh_auth_keys() {
        let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n";
        for name in ["identity", "ssh-privatekey"] {
            assert_eq!(
                from_secret_data(&data(&[
                    (name, key),
                    ("known_hosts", "git.example.com ssh-ed25519 AAAA\n"),
                    ("password", "pp"),
                ])),
                Ok(GitCredentials::Ssh {
                    username: String::new(),
                    private_key: key.into(),
                    passphrase: Some("pp".into()),
                    known_hosts: "git.example.com ssh-ed25519 AAAA\n".into(),
                })
            );
        }
    }

    #[test]
    fn missing_and_conflicting_keys_are_named_without_values() {
        let cases = [
            (data(&[]), SecretCredentialsError::None),
            (data(&[("ca.crt", "x")]), SecretCredentialsError::None),
            (
                data(&[("password", "hunter2")]),
                SecretCredentialsError::Missing("password", "username"),
            ),
            (
                data(&[("username", "bot")]),
                SecretCredentialsError::Missing("username", "password"),
            ),
            (
                data(&[("identity", "hunter2")]),
                SecretCredentialsError::Missing("identity", "known_hosts"),
            ),
            (
                data(&[("token", "  ")]),
                SecretCredentialsError::Empty("token"),
            ),
            (
                data(&[("token", "hunter2"), ("password", "hunter2")]),
                SecretCredentialsError::Ambiguous("password and token".into()),
            ),
        ];
        for (input, expected) in cases {
            let err = from_secret_data(&input).unwrap_err();
            assert_eq!(err, expected);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let mut binary = BTreeMap::new();
        binary.insert("token".to_string(), ByteString(vec![0xff, 0xfe]));
        assert_eq!(
            from_secret_data(&binary),
            Err(SecretCredentialsError::NotText("token"))
        );
    }

    #[test]
    fn debug_output_never_shows_a_value() {
        let all = [
            GitCredentials::Basic {
                username: "hunter2-user".into(),
                password: "hunter2".into(),
            },
            GitCredentials::Token("hunter2".into()),
            GitCredentials::Ssh {
                username: "git".into(),
                private_key: "hunter2".into(),
                passphrase: Some("hunter2".into()),
                known_hosts: "hunter2".into(),
            },
        ];
        for credentials in all {
            let printed = format!("{credentials:?} {:?}", Some(&credentials));
            assert!(!printed.contains("hunter2"), "{printed}");
        }
    }
}

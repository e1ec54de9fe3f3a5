//! Request identity: a bearer token mapped through a static token file, then
//! `Impersonate-*` headers (<https://kubernetes.io/docs/reference/access-authn-authz/authentication/>).
//! Nothing is authorized against it: identity only feeds admission reviews and `whoami`.

use std::collections::{BTreeMap, HashMap};

use http::HeaderMap;
use serde_json::{Value, json};

use crate::status::ApiError;

/// `authentication.k8s.io/v1` UserInfo.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// Who an unauthenticated request is: the cluster admin, like the corpus' `system:admin`.
    pub fn admin() -> Self {
        UserInfo {
            username: "system:admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({ "username": self.username, "groups": self.groups });
        if !self.uid.is_empty() {
            v["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            v["extra"] = json!(self.extra);
        }
        v
    }
}

/// Bearer token → user, as in kube-apiserver's `--token-auth-file`.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, UserInfo>);

impl Tokens {
    /// Parses the static token file format: `token,user,uid[,"group1,group2"]` per line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line);
            if fields.len() < 3 {
                return Err(format!("line {}: expected token,user,uid[,groups]", n + 1));
            }
            let mut groups: Vec<String> = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            groups.push("system:authenticated".into());
            map.insert(
                fields[0].clone(),
                UserInfo {
                    username: fields[1].clone(),
                    uid: fields[2].clone(),
                    groups,
                    extra: BTreeMap::new(),
                },
            );
        }
        Ok(Tokens(map))
    }

    pub fn insert(&mut self, token: &str, username: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        self.0.insert(
            token.to_string(),
            UserInfo {
                username: username.to_string(),
                uid: String::new(),
                groups,
                extra: BTreeMap::new(),
            },
        );
    }

    /// The request's user: token first (401 if unknown), then impersonation on top.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
        let mut user = match headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            Some(token) => self
                .0
                .get(token.trim())
                .cloned()
                .ok_or_else(ApiError::unauthorized)?,
            None => UserInfo::admin(),
        };
        let header_str = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string)
                .collect()
        };
        if let Some(name) = header_str("impersonate-user").into_iter().next() {
            let mut groups = header_str("impersonate-group");
            if !groups.iter().any(|g| g == "system:authenticated") {
                groups.push("system:authenticated".into());
            }
            let mut extra = BTreeMap::new();
            for (h, v) in headers {
                if let Some(key) = h.as_str().strip_prefix("impersonate-extra-")
                    && let Ok(v) = v.to_str()
                {
                    extra
                        .entry(key.to_string())
                        .or_insert_with(Vec::new)
                        .push(v.to_string());
                }
            }
            user = UserInfo {
                username: name,
                uid: header_str("impersonate-uid")
                    .into_iter()
                    .next()
                    .unwrap_or_default(),
                groups,
                extra,
            };
        } else if headers.contains_key("impersonate-group") {
            return Err(ApiError::new(
                500,
                "InternalError",
                "Internal error occurred: requested impersonation of groups without a user",
            ));
        }
        Ok(user)
    }
}

fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|f| f.trim().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn token_file_maps_tokens_to_users_and_groups() {
        let t =
            Tokens::parse("# comment\nsecret,alice,uid-1,\"devs,ops\"\nother,bob,uid-2\n").unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer secret"));
        let u = t.authenticate(&h).unwrap();
        assert_eq!(u.username, "alice");
        assert_eq!(u.groups, ["devs", "ops", "system:authenticated"]);
    }

    #[test]
    fn unknown_token_is_unauthorized() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer nope"));
        assert_eq!(Tokens::default().authenticate(&h).unwrap_err().code, 401);
    }

    #[test]
    fn impersonation_headers_replace_the_user() {
        let mut h = HeaderMap::new();
        h.insert("impersonate-user", HeaderValue::from_static("jane"));
        h.append("impersonate-group", HeaderValue::from_static("g1"));
        h.append("impersonate-group", HeaderValue::from_static("g2"));
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("view"));
        let u = Tokens::default().authenticate(&h).unwrap();
        assert_eq!(u.username, "jane");
        assert_eq!(u.groups, ["g1", "g2", "system:authenticated"]);
        assert_eq!(u.extra["scopes"], ["view"]);
    }
}

//! `metav1.Status` failure bodies, shaped like the real kube-apiserver's
//! (compare with `tests/fixtures/apiserver-corpus/`).

use serde_json::{Value, json};

/// A failed API request, rendered as a `kind: Status` body with `code` as the HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
    /// Sent as a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

/// What an error message names: a resource (`configmaps`, `deployments.apps`) and an object.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub group: &'a str,
    pub plural: &'a str,
    pub name: &'a str,
}

impl Target<'_> {
    /// `configmaps` for the core group, `deployments.apps` otherwise, as in real messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn details(&self) -> Value {
        let mut d = json!({ "name": self.name, "kind": self.plural });
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn not_found(t: Target<'_>) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", t.qualified(), t.name),
        )
        .with_details(t.details())
    }

    pub fn already_exists(t: Target<'_>) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", t.qualified(), t.name),
        )
        .with_details(t.details())
    }

    /// Optimistic-concurrency failure: a stale `metadata.resourceVersion`.
    pub fn conflict(t: Target<'_>) -> Self {
        Self::conflict_msg(
            t,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_msg(t: Target<'_>, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {why}",
                t.qualified(),
                t.name
            ),
        )
        .with_details(t.details())
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_old(requested: u64, oldest: u64) -> Self {
        Self::expired(format!("too old resource version: {requested} ({oldest})"))
    }

    /// 422 with one field cause, e.g. `metadata.name: Required value: ...`.
    pub fn invalid(
        kind: &str,
        group: &str,
        name: &str,
        field: &str,
        cause: &str,
        detail: &str,
    ) -> Self {
        let message = format!("{kind} \"{name}\" is invalid: {field}: {cause}: {detail}");
        let reason = match cause {
            "Required value" => "FieldValueRequired",
            "Forbidden" => "FieldValueForbidden",
            "Duplicate value" => "FieldValueDuplicate",
            "Unsupported value" => "FieldValueNotSupported",
            _ => "FieldValueInvalid",
        };
        let mut details = json!({
            "name": name,
            "kind": kind,
            "causes": [{ "reason": reason, "message": format!("{cause}: {detail}"), "field": field }],
        });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        Self::new(422, "Invalid", message).with_details(details)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json, application/yaml, application/json-patch+json, \
                 application/merge-patch+json, application/strategic-merge-patch+json, \
                 application/apply-patch+yaml (got {content_type:?}; kube-emulator is JSON-only)"
            ),
        )
    }

    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/yaml \
                 (got {accept:?}; kube-emulator is JSON-only)"
            ),
        )
    }

    /// Something Kubernetes does but this emulator deliberately does not.
    pub fn not_implemented(what: impl std::fmt::Display) -> Self {
        Self::new(
            501,
            "NotImplemented",
            format!("kube-emulator does not support {what}"),
        )
    }

    pub fn forbidden(
        user: &str,
        verb: &str,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
    ) -> Self {
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        let mut details = json!({ "kind": plural });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        let qualified = if group.is_empty() {
            plural.to_string()
        } else {
            format!("{plural}.{group}")
        };
        Self::new(
            403,
            "Forbidden",
            format!(
                "{qualified} is forbidden: User \"{user}\" cannot {verb} resource \"{plural}\" in API group \"{group}\"{scope}"
            ),
        )
        .with_details(details)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }

    pub fn too_many_requests(retry_after: u64) -> Self {
        let mut e = Self::new(
            429,
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later",
        )
        .with_details(json!({ "retryAfterSeconds": retry_after }));
        e.retry_after = Some(retry_after);
        e
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    /// The `kind: Status` body.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        if !self.reason.is_empty() {
            s["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// The body a successful immediate DELETE returns for most built-in resources.
pub fn success_status(t: Target<'_>, uid: &str) -> Value {
    let mut details = t.details();
    details["uid"] = json!(uid);
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CM: Target<'static> = Target {
        group: "",
        plural: "configmaps",
        name: "cm-conflict",
    };

    #[test]
    fn conflict_body_matches_the_corpus_shape() {
        let s = ApiError::conflict(CM).to_status();
        assert_eq!(
            s,
            json!({
                "apiVersion": "v1",
                "code": 409,
                "details": { "kind": "configmaps", "name": "cm-conflict" },
                "kind": "Status",
                "message": "Operation cannot be fulfilled on configmaps \"cm-conflict\": the object has been modified; please apply your changes to the latest version and try again",
                "metadata": {},
                "reason": "Conflict",
                "status": "Failure",
            })
        );
    }

    #[test]
    fn expired_body_matches_the_corpus_shape() {
        let s = ApiError::too_old(5, 9).to_status();
        assert_eq!(s["message"], "too old resource version: 5 (9)");
        assert_eq!(s["reason"], "Expired");
        assert_eq!(s["code"], 410);
    }

    #[test]
    fn grouped_resources_are_qualified_in_messages() {
        let t = Target {
            group: "apps",
            plural: "deployments",
            name: "web",
        };
        let s = ApiError::not_found(t).to_status();
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["details"]["group"], "apps");
    }
}

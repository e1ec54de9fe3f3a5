//! Commit message templates of a destination: a subject line and a body with `{field}` placeholders, checked when
//! the destination is declared (an unknown field or a stray brace is refused with the reason) and rendered per
//! commit. The writer's trailers (`X-ConfigButler-…`) are appended after the rendered text in every case: they are
//! not part of the template and cannot be removed by one.
//!
//! A commit can hold several objects. A field names their common value; when they differ it renders as
//! `various` (`operation` as `sync`), so a subject like `{operation} {kind} {namespace}/{name}` stays readable.

use std::fmt;

/// Longest template accepted (subject, body), in bytes.
const MAX_SUBJECT: usize = 256;
const MAX_BODY: usize = 4096;
/// A rendered subject is cut here (git has no limit, people's tools have).
const MAX_RENDERED_SUBJECT: usize = 1000;

/// What a placeholder stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Operation,
    Kind,
    Resource,
    Group,
    Version,
    Namespace,
    Name,
    Author,
    Count,
    Folder,
    Summary,
    Objects,
}

const FIELDS: [(&str, Field); 12] = [
    ("operation", Field::Operation),
    ("kind", Field::Kind),
    ("resource", Field::Resource),
    ("group", Field::Group),
    ("version", Field::Version),
    ("namespace", Field::Namespace),
    ("name", Field::Name),
    ("author", Field::Author),
    ("count", Field::Count),
    ("folder", Field::Folder),
    ("summary", Field::Summary),
    ("objects", Field::Objects),
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Field),
}

/// Why a template is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("commit message template: {0}")]
pub struct TemplateError(String);

/// A checked template.
#[derive(Clone, PartialEq, Eq)]
pub struct CommitTemplate {
    subject: Vec<Piece>,
    body: Vec<Piece>,
    uses_kind: bool,
}

impl fmt::Debug for CommitTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitTemplate")
            .field("subject", &self.subject)
            .field("body_pieces", &self.body.len())
            .finish()
    }
}

/// The values of one commit (see the module comment for several objects).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitFields {
    /// `create`, `update`, `delete`, or `sync` when the objects differ.
    pub operation: String,
    /// The objects' `kind` (e.g. `ConfigMap`).
    pub kind: String,
    /// Plural resource name (e.g. `configmaps`).
    pub resource: String,
    /// API group, `core` for the core group.
    pub group: String,
    pub version: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    /// The Kubernetes user who made the change, or the writer's bot name when unknown.
    pub author: String,
    /// Number of objects in the commit.
    pub count: usize,
    /// Base folder(s) of the destinations, comma-separated.
    pub folder: String,
    /// E.g. `2 created, 1 deleted`.
    pub summary: String,
    /// One line per object (`[CREATE] core/v1/configmaps/ns/a`), body only.
    pub objects: String,
}

fn parse(text: &str, part: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(TemplateError(format!(
                                "{part}: a '{{' is not closed (write '{{{{' for a literal brace)"
                            )));
                        }
                        Some(c) => name.push(c),
                    }
                }
                let name = name.trim();
                let field = FIELDS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, f)| *f)
                    .ok_or_else(|| {
                        let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
                        TemplateError(format!(
                            "{part}: unknown field {:?}; known fields: {}",
                            crate::model::one_line(name),
                            known.join(", ")
                        ))
                    })?;
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Field(field));
            }
            '}' => {
                return Err(TemplateError(format!(
                    "{part}: a '}}' without its '{{' (write '}}}}' for a literal brace)"
                )));
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

impl CommitTemplate {
    /// Checks a template. `subject` is one line and required; `body` may be empty (no body) or several lines.
    pub fn parse(subject: &str, body: &str) -> Result<Self, TemplateError> {
        if subject.trim().is_empty() {
            return Err(TemplateError("subject is required".into()));
        }
        if subject.contains(['\n', '\r']) {
            return Err(TemplateError(
                "subject must be one line (the body takes the rest)".into(),
            ));
        }
        if subject.len() > MAX_SUBJECT || body.len() > MAX_BODY {
            return Err(TemplateError(format!(
                "too long (at most {MAX_SUBJECT} bytes of subject and {MAX_BODY} of body)"
            )));
        }
        if subject
            .chars()
            .chain(body.chars())
            .any(|c| c.is_control() && c != '\n')
        {
            return Err(TemplateError(
                "control characters other than line breaks in the body are not allowed".into(),
            ));
        }
        let subject = parse(subject, "subject")?;
        if subject.contains(&Piece::Field(Field::Objects)) {
            return Err(TemplateError(
                "subject: {objects} has one line per object; use it in the body".into(),
            ));
        }
        let body = parse(body, "body")?;
        let uses_kind = subject
            .iter()
            .chain(&body)
            .any(|p| *p == Piece::Field(Field::Kind));
        Ok(Self {
            subject,
            body,
            uses_kind,
        })
    }

    /// Whether rendering needs the objects' `kind` (read from their YAML only then).
    pub fn uses_kind(&self) -> bool {
        self.uses_kind
    }

    /// The message without trailers: the subject line and, when the body renders to something, a blank line and
    /// the body; ends without a newline.
    pub fn render(&self, fields: &CommitFields) -> String {
        let subject = crate::model::one_line(render(&self.subject, fields).trim());
        let subject: String = subject.chars().take(MAX_RENDERED_SUBJECT).collect();
        let body = render(&self.body, fields);
        let body = body.trim_matches('\n');
        if body.trim().is_empty() {
            subject
        } else {
            format!("{subject}\n\n{body}")
        }
    }
}

fn render(pieces: &[Piece], fields: &CommitFields) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Field(field) => match field {
                Field::Operation => out.push_str(&fields.operation),
                Field::Kind => out.push_str(&fields.kind),
                Field::Resource => out.push_str(&fields.resource),
                Field::Group => out.push_str(&fields.group),
                Field::Version => out.push_str(&fields.version),
                Field::Namespace => out.push_str(&fields.namespace),
                Field::Name => out.push_str(&fields.name),
                Field::Author => out.push_str(&fields.author),
                Field::Count => out.push_str(&fields.count.to_string()),
                Field::Folder => out.push_str(&fields.folder),
                Field::Summary => out.push_str(&fields.summary),
                Field::Objects => out.push_str(&fields.objects),
            },
        }
    }
    out
}

/// The common value of `values`, `various` when they differ, empty when there are none.
pub fn common<'a>(mut values: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = values.next() else {
        return String::new();
    };
    if values.all(|v| v == first) {
        first.to_owned()
    } else {
        "various".to_owned()
    }
}

/// The top-level `kind:` of a manifest, without parsing it (SOPS leaves `kind` in clear text).
pub fn kind_of(manifest: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(manifest).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix("kind:")?.trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| crate::model::one_line(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> CommitFields {
        CommitFields {
            operation: "update".into(),
            kind: "ConfigMap".into(),
            resource: "configmaps".into(),
            group: "core".into(),
            version: "v1".into(),
            namespace: "shop".into(),
            name: "settings".into(),
            author: "alice@example.com".into(),
            count: 1,
            folder: "clusters/prod".into(),
            summary: "1 updated".into(),
            objects: "[UPDATE] core/v1/configmaps/shop/settings".into(),
        }
    }

    #[test]
    fn renders_fields_braces_and_an_optional_body() {
        let template = CommitTemplate::parse(
            "{operation}({kind}): {namespace}/{name} by {author} {{literal}}",
            "{count} object(s) in {folder}: {summary}\n\n{objects}\n",
        )
        .unwrap();
        assert_eq!(
            template.render(&fields()),
            "update(ConfigMap): shop/settings by alice@example.com {literal}\n\n1 object(s) in clusters/prod: 1 updated\n\n[UPDATE] core/v1/configmaps/shop/settings"
        );
        let subject_only = CommitTemplate::parse("chore: sync {resource}", "").unwrap();
        assert_eq!(subject_only.render(&fields()), "chore: sync configmaps");
        assert!(!subject_only.uses_kind() && template.uses_kind());
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let error = |s: &str, b: &str| CommitTemplate::parse(s, b).unwrap_err().to_string();
        assert!(error("", "").contains("subject is required"));
        assert!(error("a\nb", "").contains("one line"));
        assert!(error("{nmae}", "").contains("unknown field \"nmae\""));
        assert!(error("{nmae}", "").contains("known fields: operation"));
        assert!(error("x {name", "").contains("not closed"));
        assert!(error("x", "a {kind").contains("body: a '{' is not closed"));
        assert!(error("x }", "").contains("without its '{'"));
        assert!(error("{objects}", "").contains("use it in the body"));
        assert!(error(&"x".repeat(300), "").contains("too long"));
        assert!(error("x\u{7}", "").contains("control characters"));
    }

    #[test]
    fn values_cannot_break_the_subject_line() {
        let template = CommitTemplate::parse("{name}", "").unwrap();
        let mut values = fields();
        values.name = "a\nb\rc".into();
        assert_eq!(template.render(&values), "abc");
        values.name = "n".repeat(5000);
        assert_eq!(template.render(&values).len(), MAX_RENDERED_SUBJECT);
    }

    #[test]
    fn common_values_and_kinds() {
        assert_eq!(common(["a", "a"].into_iter()), "a");
        assert_eq!(common(["a", "b"].into_iter()), "various");
        assert_eq!(common(std::iter::empty()), "");
        assert_eq!(
            kind_of(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").as_deref(),
            Some("ConfigMap")
        );
        assert_eq!(kind_of(b"metadata:\n  kind: Nested\n"), None);
        assert_eq!(kind_of(b"\xff\xfe"), None);
    }
}

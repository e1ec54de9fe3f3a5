//! Comment- and order-preserving edits of a YAML document: [`edit_in_place`] brings a file a person edited
//! (comments, key order, indentation, quoting) to the value of a desired document by changing only what differs,
//! so that a person's comments and layout survive a mirrored object's change.
//!
//! Why a small editor of our own rather than a crate: the lossless YAML editors of crates.io (`yaml-edit`, a
//! rowan tree; `yamlpatch`, over tree-sitter's C grammar) round-trip text byte for byte, but each brings a second
//! YAML parser whose reading of a scalar can differ from serde-saphyr's (the one every other check of this
//! project uses), and neither renders new nested values in the desired document's own quoting. Here the existing
//! text is read with the project's parser (its events carry byte spans), and everything inserted is cut from the
//! desired document itself, re-indented: new text is always the canonical rendering, never a second serializer's.
//!
//! The edit is a list of byte-range replacements of the existing text:
//! - a changed scalar on its key's line: only the scalar is replaced (the line's comment stays);
//! - a changed block mapping: recursion, key by key; a removed key goes with the comment lines right above it;
//!   a new key goes after its nearest preceding key in the desired order (else first);
//! - a block list whose items are all mappings with a unique `name` (containers, env, ports, volumes…) or unique
//!   strings (args, a kustomization's `resources`): items are matched by name or value, and mappings edited like
//!   mappings; other changed lists, flow collections and type changes replace the whole entry.
//!
//! The result is checked: it must parse to the desired value, else [`Fallback::Unverified`]. Whatever cannot be
//! edited safely (not parseable, several documents, anchors, aliases, tags, a flow-style root, SOPS files, mixed
//! line endings) is a [`Fallback`]: the caller writes the desired document as it is.

use std::collections::{HashMap, HashSet};

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, StructureStyle};

use crate::yaml;

/// Why a document was not edited in place; the caller writes the desired rendering instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The existing or the desired document is not readable YAML (or not UTF-8).
    Unparseable,
    /// More than one document in the file.
    MultiDocument,
    /// Anchors, aliases or tags: an edit could change what they share or mean.
    AnchorOrTag,
    /// The top is not a block mapping (a list, a scalar, a flow `{…}`).
    NotBlockMapping,
    /// A mapping key that is not a plain string, or repeats within its mapping.
    UnusualKey,
    /// A SOPS-encrypted file: its MAC covers the values, so it is never edited.
    Sops,
    /// Line endings mixed between `\n` and `\r\n`, or a byte-order mark.
    LineEndings,
    /// The edit would have to touch the document at a place it cannot change safely.
    Unsupported,
    /// The edited text does not read back as the desired value (a bug or an exotic input; never written).
    Unverified,
}

impl Fallback {
    /// A short label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Fallback::Unparseable => "unparseable",
            Fallback::MultiDocument => "multi_document",
            Fallback::AnchorOrTag => "anchor_or_tag",
            Fallback::NotBlockMapping => "not_block_mapping",
            Fallback::UnusualKey => "unusual_key",
            Fallback::Sops => "sops",
            Fallback::LineEndings => "line_endings",
            Fallback::Unsupported => "unsupported",
            Fallback::Unverified => "unverified",
        }
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Whether the editor can add nothing over writing `desired` as it is: `existing` has no comment and the two
/// texts have the same lines but for values on lines whose key and indentation are the same. This is the layout
/// of a file the writer wrote itself (the common case), decided by one pass over the bytes without parsing.
pub fn same_layout(existing: &[u8], desired: &[u8]) -> bool {
    if existing.contains(&b'#') || existing.contains(&b'\r') {
        return false;
    }
    let mut old = existing.split(|&b| b == b'\n');
    let mut new = desired.split(|&b| b == b'\n');
    loop {
        match (old.next(), new.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) => {
                if a != b {
                    match (line_prefix(a), line_prefix(b)) {
                        (Some(x), Some(y)) if x == y => {}
                        _ => return false,
                    }
                }
            }
            _ => return false,
        }
    }
}

/// A line up to its key's `: ` (or its `- `), indentation included: what stays when only the value changes.
fn line_prefix(line: &[u8]) -> Option<&[u8]> {
    let indent = line.iter().take_while(|&&b| b == b' ').count();
    let mut at = indent;
    while line[at..].starts_with(b"- ") {
        at += 2;
    }
    let rest = &line[at..];
    // A quoted key may hold `: `; canonical keys are rarely quoted, and then the line just does not match.
    if matches!(rest.first(), Some(b'"' | b'\'')) {
        return None;
    }
    let colon = rest.windows(2).position(|w| w == b": ")?;
    Some(&line[..at + colon + 2])
}

/// Edits `existing` so that it reads as the same value as `desired` (a rendering such as the agent's canonical
/// YAML), keeping the comments, key order and formatting of everything that did not change. New entries are cut
/// from `desired`. The result is verified to parse to `desired`'s value. A document `desired` without change
/// returns `existing` unchanged.
pub fn edit_in_place(existing: &str, desired: &str) -> Result<String, Fallback> {
    let crlf = line_endings(existing)?;
    // One line ending everywhere, and a final one: inserted lines then always start on a line of their own.
    let mut owned = if crlf {
        existing.replace("\r\n", "\n")
    } else {
        existing.to_owned()
    };
    if !owned.is_empty() && !owned.ends_with('\n') {
        owned.push('\n');
    }
    let old_text = owned.as_str();
    let old = Document::parse(old_text)?;
    let new = Document::parse(desired)?;
    if old.sops {
        return Err(Fallback::Sops);
    }
    let mut edits = Edits::default();
    let header_end = match &old.root {
        Node::Mapping { entries, .. } => entries
            .first()
            .map_or(0, |e| line_start(old_text, e.key_start)),
        _ => 0,
    };
    let cx = Context {
        old: old_text,
        new: desired,
        header_end,
    };
    if cx.edit_mapping(&old.root, &new.root, &mut edits).is_err() {
        return Err(Fallback::Unsupported);
    }
    // What the result must read as, by the parser every other check uses (the span parser above can accept a
    // document that one refuses).
    let Ok(want) = yaml::parse_document(desired.as_bytes()) else {
        return Err(Fallback::Unparseable);
    };
    if edits.list.is_empty() {
        if existing != desired && yaml::parse_document(existing.as_bytes()).ok() != Some(want) {
            return Err(Fallback::Unverified);
        }
        return Ok(existing.to_owned());
    }
    let edited = edits.apply(old_text)?;
    // The check reads the text as it will be written: back to CRLF a desired line that carried its own `\r`
    // would end in `\r\r\n` and read as another value.
    let edited = if crlf {
        edited.replace('\n', "\r\n")
    } else {
        edited
    };
    if edited != desired && yaml::parse_document(edited.as_bytes()).ok() != Some(want) {
        return Err(Fallback::Unverified);
    }
    Ok(edited)
}

/// [`edit_in_place`] towards a value: `desired` is rendered with serde-saphyr (which quotes the strings YAML 1.1
/// readers would take for booleans) and the edit goes towards that rendering.
pub fn edit_in_place_value<T: serde::Serialize>(
    existing: &str,
    desired: &T,
) -> Result<String, Fallback> {
    let rendered = serde_saphyr::to_string(desired).map_err(|_| Fallback::Unparseable)?;
    edit_in_place(existing, &rendered)
}

/// Whether the text uses `\r\n` throughout; mixed endings and a byte-order mark are refused.
fn line_endings(text: &str) -> Result<bool, Fallback> {
    if text.starts_with('\u{feff}') {
        return Err(Fallback::LineEndings);
    }
    let crlf = text.matches("\r\n").count();
    if crlf == 0 {
        return if text.contains('\r') {
            Err(Fallback::LineEndings)
        } else {
            Ok(false)
        };
    }
    if crlf == text.matches('\n').count() && crlf == text.matches('\r').count() {
        Ok(true)
    } else {
        Err(Fallback::LineEndings)
    }
}

/// A node of the parsed document, with byte offsets into its text.
#[derive(Debug)]
enum Node {
    Scalar {
        start: usize,
        end: usize,
        value: String,
        plain: bool,
        /// Literal or folded (`|`, `>`): spans lines.
        block: bool,
    },
    Mapping {
        flow: bool,
        start: usize,
        end: usize,
        entries: Vec<MapEntry>,
    },
    Sequence {
        flow: bool,
        start: usize,
        end: usize,
        items: Vec<Node>,
    },
}

#[derive(Debug)]
struct MapEntry {
    key: String,
    key_start: usize,
    key_end: usize,
    /// A plain key that YAML 1.1 readers take for something else than a string (`on`, `yes`, `1`).
    key_misread: bool,
    value: Node,
}

impl Node {
    fn start(&self) -> usize {
        match self {
            Node::Scalar { start, .. }
            | Node::Mapping { start, .. }
            | Node::Sequence { start, .. } => *start,
        }
    }

    fn end(&self) -> usize {
        match self {
            Node::Scalar { end, .. } | Node::Mapping { end, .. } | Node::Sequence { end, .. } => {
                *end
            }
        }
    }

    /// The value of a `name` key when this is a mapping that has one as a string.
    fn name(&self) -> Option<&str> {
        let Node::Mapping { entries, .. } = self else {
            return None;
        };
        entries
            .iter()
            .find(|e| e.key == "name")
            .and_then(|e| match &e.value {
                Node::Scalar { value, plain, .. }
                    if !value.is_empty() && (!plain || yaml::plain_scalar_is_string(value)) =>
                {
                    Some(value.as_str())
                }
                _ => None,
            })
    }

    /// What identifies this node as a list item: a mapping by its `name`, a string by itself.
    fn list_key(&self) -> Option<String> {
        match self {
            Node::Mapping { .. } => self.name().map(|n| format!("name {n}")),
            Node::Scalar {
                value,
                plain,
                block: false,
                ..
            } if !plain || (!value.is_empty() && yaml::plain_scalar_is_string(value)) => {
                Some(format!("string {value}"))
            }
            _ => None,
        }
    }

    /// Whether two nodes carry the same value (a plain scalar equals a quoted one when it reads as a string).
    fn same_value(&self, other: &Node) -> bool {
        match (self, other) {
            (
                Node::Scalar {
                    value: a,
                    plain: pa,
                    ..
                },
                Node::Scalar {
                    value: b,
                    plain: pb,
                    ..
                },
            ) => {
                a == b
                    && (pa == pb
                        || (*pa && yaml::plain_scalar_is_string(a))
                        || (*pb && yaml::plain_scalar_is_string(b)))
            }
            (Node::Mapping { entries: a, .. }, Node::Mapping { entries: b, .. }) => {
                if a.len() != b.len() {
                    return false;
                }
                // Most mappings are small and in the same order; a large one gets an index.
                if a.iter().zip(b).all(|(x, y)| x.key == y.key) {
                    return a.iter().zip(b).all(|(x, y)| x.value.same_value(&y.value));
                }
                let index: HashMap<&str, &Node> =
                    b.iter().map(|e| (e.key.as_str(), &e.value)).collect();
                a.iter().all(|ea| {
                    index
                        .get(ea.key.as_str())
                        .is_some_and(|vb| ea.value.same_value(vb))
                })
            }
            (Node::Sequence { items: a, .. }, Node::Sequence { items: b, .. }) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_value(y))
            }
            _ => false,
        }
    }
}

struct Document {
    root: Node,
    /// A top-level `sops` mapping: a SOPS-encrypted file.
    sops: bool,
}

/// A collection being built while the events are read.
enum Open {
    Mapping {
        flow: bool,
        start: usize,
        entries: Vec<MapEntry>,
        key: Option<(String, usize, usize, bool)>,
        keys: HashSet<String>,
    },
    Sequence {
        flow: bool,
        start: usize,
        items: Vec<Node>,
    },
}

impl Document {
    fn parse(text: &str) -> Result<Document, Fallback> {
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Open> = Vec::new();
        let mut root: Option<Node> = None;
        let mut documents = 0usize;
        while let Some(next) = parser.next_event() {
            let (event, span) = next.map_err(|_| Fallback::Unparseable)?;
            let start = span.start.byte_offset().ok_or(Fallback::Unparseable)?;
            let end = span.end.byte_offset().ok_or(Fallback::Unparseable)?;
            let node = match event {
                Event::DocumentStart(..) => {
                    documents += 1;
                    if documents > 1 {
                        return Err(Fallback::MultiDocument);
                    }
                    continue;
                }
                Event::Alias(_) => return Err(Fallback::AnchorOrTag),
                Event::Scalar(value, style, anchor, tag) => {
                    if anchor != 0 || tag.is_some() {
                        return Err(Fallback::AnchorOrTag);
                    }
                    Node::Scalar {
                        start,
                        end,
                        value: value.into_owned(),
                        plain: style == ScalarStyle::Plain,
                        block: matches!(style, ScalarStyle::Literal | ScalarStyle::Folded),
                    }
                }
                Event::MappingStart(style, anchor, tag) => {
                    if anchor != 0 || tag.is_some() {
                        return Err(Fallback::AnchorOrTag);
                    }
                    stack.push(Open::Mapping {
                        flow: style == StructureStyle::Flow,
                        start,
                        entries: Vec::new(),
                        key: None,
                        keys: HashSet::new(),
                    });
                    continue;
                }
                Event::SequenceStart(style, anchor, tag) => {
                    if anchor != 0 || tag.is_some() {
                        return Err(Fallback::AnchorOrTag);
                    }
                    stack.push(Open::Sequence {
                        flow: style == StructureStyle::Flow,
                        start,
                        items: Vec::new(),
                    });
                    continue;
                }
                Event::MappingEnd => match stack.pop() {
                    Some(Open::Mapping {
                        flow,
                        start,
                        entries,
                        key: None,
                        ..
                    }) => {
                        let last = entries.last().map_or(start, |e| e.value.end());
                        Node::Mapping {
                            flow,
                            start: entries.first().map_or(start, |e| e.key_start.min(start)),
                            end: if flow { end } else { last },
                            entries,
                        }
                    }
                    _ => return Err(Fallback::Unparseable),
                },
                Event::SequenceEnd => match stack.pop() {
                    Some(Open::Sequence { flow, start, items }) => {
                        let last = items.last().map_or(start, Node::end);
                        Node::Sequence {
                            flow,
                            start,
                            end: if flow { end } else { last },
                            items,
                        }
                    }
                    _ => return Err(Fallback::Unparseable),
                },
                _ => continue,
            };
            match stack.last_mut() {
                None => {
                    if root.is_some() {
                        return Err(Fallback::MultiDocument);
                    }
                    root = Some(node);
                }
                Some(Open::Sequence { items, .. }) => items.push(node),
                Some(Open::Mapping {
                    entries, key, keys, ..
                }) => match key.take() {
                    None => {
                        let Node::Scalar {
                            value,
                            start,
                            end,
                            plain,
                            ..
                        } = node
                        else {
                            return Err(Fallback::UnusualKey);
                        };
                        if !keys.insert(value.clone()) {
                            return Err(Fallback::UnusualKey);
                        }
                        let misread = plain && !yaml::plain_scalar_is_string(&value);
                        *key = Some((value, start, end, misread));
                    }
                    Some((key, key_start, key_end, key_misread)) => entries.push(MapEntry {
                        key,
                        key_start,
                        key_end,
                        key_misread,
                        value: node,
                    }),
                },
            }
        }
        match root {
            Some(root @ Node::Mapping { flow: false, .. }) => {
                let sops = matches!(&root, Node::Mapping { entries, .. }
                    if entries.iter().any(|e| e.key == "sops" && matches!(e.value, Node::Mapping { .. })));
                Ok(Document { root, sops })
            }
            Some(_) => Err(Fallback::NotBlockMapping),
            None => Err(Fallback::Unparseable),
        }
    }
}

/// Byte-range replacements of the existing text, applied at once.
#[derive(Default)]
struct Edits {
    /// (start, end, replacement, order of insertion: keeps insertions at one place in sequence).
    list: Vec<(usize, usize, String, usize)>,
}

impl Edits {
    fn replace(&mut self, start: usize, end: usize, text: String) {
        let n = self.list.len();
        self.list.push((start, end, text, n));
    }

    fn apply(mut self, text: &str) -> Result<String, Fallback> {
        // Insertions (empty ranges) at a place go before a replacement starting there.
        self.list
            .sort_by_key(|(start, end, _, n)| (*start, *end != *start, *n));
        let mut out = String::with_capacity(text.len() + 256);
        let mut at = 0usize;
        for (start, end, replacement, _) in &self.list {
            if *start < at || *end < *start || *end > text.len() {
                return Err(Fallback::Unsupported);
            }
            out.push_str(&text[at..*start]);
            out.push_str(replacement);
            at = *end;
        }
        out.push_str(&text[at..]);
        Ok(out)
    }
}

/// This part of the document cannot be edited here; the caller replaces the enclosing entry.
struct Escalate;

struct Context<'a> {
    old: &'a str,
    new: &'a str,
    /// The comments before the first key of the document are the file's header, not that key's.
    header_end: usize,
}

/// The start of the line holding `at`.
fn line_start(text: &str, at: usize) -> usize {
    text[..at].rfind('\n').map_or(0, |i| i + 1)
}

/// The column of `at` (bytes since the line start; indentation is ASCII spaces).
fn column(text: &str, at: usize) -> usize {
    at - line_start(text, at)
}

/// Whether only spaces precede `at` on its line.
fn first_on_line(text: &str, at: usize) -> bool {
    text[line_start(text, at)..at].bytes().all(|b| b == b' ')
}

/// The end of a node's content: whitespace and line breaks after it (a block scalar's span takes them) are not
/// part of it; then the rest of its last line (a comment) and the line break are.
fn entry_end(text: &str, floor: usize, end: usize) -> usize {
    let content_end = floor.max(text[..end].trim_end_matches([' ', '\t', '\n']).len());
    match text[content_end..].find('\n') {
        Some(i) => content_end + i + 1,
        None => text.len(),
    }
}

/// Where the entry whose first token is at `at` starts, with the comment lines right above it at its column (not
/// above `floor`).
fn start_with_comments(text: &str, at: usize, floor: usize) -> usize {
    let col = column(text, at);
    let mut start = line_start(text, at);
    while start > floor {
        let previous = line_start(text, start - 1);
        let line = &text[previous..start - 1];
        let indent = line.bytes().take_while(|&b| b == b' ').count();
        if indent == col && line[indent..].starts_with('#') {
            start = previous;
        } else {
            break;
        }
    }
    start
}

/// `text[start..end]` moved from column `from` to column `to`: the first line as it is (it follows whatever
/// precedes it), every further non-empty line with its first `from` spaces replaced by `to` spaces.
fn reindent(
    text: &str,
    start: usize,
    end: usize,
    from: usize,
    to: usize,
) -> Result<String, Escalate> {
    let slice = &text[start..end];
    let mut out = String::with_capacity(slice.len() + 16);
    for (i, line) in slice.split_inclusive('\n').enumerate() {
        if i == 0 || line == "\n" || line.is_empty() {
            out.push_str(line);
            continue;
        }
        if line.len() < from || !line.as_bytes()[..from].iter().all(|&b| b == b' ') {
            // A line indented less than its entry (a block scalar's empty lines are "\n" above).
            if line.trim_start_matches(' ') == "\n" {
                out.push('\n');
                continue;
            }
            return Err(Escalate);
        }
        out.extend(std::iter::repeat_n(' ', to));
        out.push_str(&line[from..]);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// The position of the `- ` that starts a block sequence item whose content starts at `at`.
fn dash_of(text: &str, at: usize) -> Option<usize> {
    let before = text[..at].trim_end_matches([' ', '\n']);
    (before.ends_with('-') && first_on_line(text, before.len() - 1)).then(|| before.len() - 1)
}

impl Context<'_> {
    /// Edits the block mapping `old` towards `new`, entry by entry.
    fn edit_mapping(&self, old: &Node, new: &Node, edits: &mut Edits) -> Result<(), Escalate> {
        let (
            Node::Mapping {
                flow: false,
                entries: old_entries,
                ..
            },
            Node::Mapping {
                entries: new_entries,
                ..
            },
        ) = (old, new)
        else {
            return Err(Escalate);
        };
        let Some(first) = old_entries.first() else {
            return Err(Escalate);
        };
        let key_column = column(self.old, first.key_start);
        let new_by_key: HashMap<&str, &MapEntry> =
            new_entries.iter().map(|e| (e.key.as_str(), e)).collect();
        let old_by_key: HashMap<&str, &MapEntry> =
            old_entries.iter().map(|e| (e.key.as_str(), e)).collect();
        for entry in old_entries {
            // A key every reader takes for a string stays as written; `on:` becomes the rendering's `"on":`, which
            // YAML 1.1 readers (kubectl, Flux, Argo CD) do not take for a boolean.
            let key_kept = match new_by_key.get(entry.key.as_str()) {
                None => {
                    if !first_on_line(self.old, entry.key_start) {
                        return Err(Escalate);
                    }
                    let start = start_with_comments(self.old, entry.key_start, self.header_end);
                    let end = entry_end(self.old, entry.key_end, entry.value.end());
                    edits.replace(start, end, String::new());
                    None
                }
                Some(wanted) if entry.value.same_value(&wanted.value) => Some(wanted),
                Some(wanted) => (!self.change_value(entry, wanted, edits)?).then_some(wanted),
            };
            if let Some(wanted) = key_kept
                && entry.key_misread
                && !wanted.key_misread
            {
                edits.replace(
                    entry.key_start,
                    entry.key_end,
                    self.new[wanted.key_start..wanted.key_end].to_owned(),
                );
            }
        }
        // New keys: after the nearest preceding key (desired order) that the file has, else first.
        let mut previous: Option<&MapEntry> = None;
        for wanted in new_entries {
            if let Some(existing) = old_by_key.get(wanted.key.as_str()) {
                previous = Some(existing);
                continue;
            }
            let text = self.cut_entry(wanted, key_column)?;
            let at = match previous {
                Some(p) => entry_end(self.old, p.key_end, p.value.end()),
                None if first_on_line(self.old, first.key_start) => {
                    start_with_comments(self.old, first.key_start, self.header_end)
                }
                None => entry_end(self.old, first.key_end, first.value.end()),
            };
            self.insert(edits, at, key_column, text);
        }
        Ok(())
    }

    /// Inserts a fragment (its first line not indented) at `at`, a line start (the text ends with a line break).
    fn insert(&self, edits: &mut Edits, at: usize, column: usize, text: String) {
        let mut fragment = String::with_capacity(text.len() + column);
        fragment.extend(std::iter::repeat_n(' ', column));
        fragment.push_str(&text);
        edits.replace(at, at, fragment);
    }

    /// The text of the desired entry, re-indented to `column`, first line unindented.
    fn cut_entry(&self, entry: &MapEntry, column: usize) -> Result<String, Escalate> {
        let from = self::column(self.new, entry.key_start);
        let end = entry_end(self.new, entry.key_end, entry.value.end());
        reindent(self.new, entry.key_start, end, from, column)
    }

    /// Changes the value of an existing entry to the desired one, keeping as much of it as it can; true when the
    /// whole entry (its key too) was replaced.
    fn change_value(
        &self,
        old: &MapEntry,
        new: &MapEntry,
        edits: &mut Edits,
    ) -> Result<bool, Escalate> {
        let attempt = match (&old.value, &new.value) {
            (
                Node::Scalar {
                    start,
                    end,
                    block: false,
                    ..
                },
                Node::Scalar {
                    start: new_start,
                    end: new_end,
                    block: false,
                    ..
                },
            ) if !self.old[old.key_end..*end].contains('\n')
                && !self.new[*new_start..*new_end].contains('\n')
                && *new_end > *new_start =>
            {
                if *end > *start {
                    edits.replace(*start, *end, self.new[*new_start..*new_end].to_owned());
                    Ok(())
                } else {
                    Err(Escalate)
                }
            }
            (Node::Mapping { flow: false, .. }, Node::Mapping { flow: false, .. }) => {
                let mut inner = Edits::default();
                self.edit_mapping(&old.value, &new.value, &mut inner)
                    .map(|()| edits.list.extend(inner.list))
            }
            (Node::Sequence { flow: false, .. }, Node::Sequence { flow: false, .. }) => {
                let mut inner = Edits::default();
                self.edit_named_list(&old.value, &new.value, &mut inner)
                    .map(|()| edits.list.extend(inner.list))
            }
            _ => Err(Escalate),
        };
        if attempt.is_ok() {
            return Ok(false);
        }
        // Replace the entry from its key to its end; the comments above it stay.
        let column = column(self.old, old.key_start);
        let text = self.cut_entry(new, column)?;
        let end = entry_end(self.old, old.key_end, old.value.end());
        edits.replace(old.key_start, end, text);
        Ok(true)
    }

    /// Edits a block list whose items are mappings with a unique `name` or unique strings, matched item by item
    /// (kept, removed with their comments, added after their predecessor); anything else escalates (the caller
    /// replaces the list).
    fn edit_named_list(&self, old: &Node, new: &Node, edits: &mut Edits) -> Result<(), Escalate> {
        let (
            Node::Sequence {
                items: old_items, ..
            },
            Node::Sequence {
                items: new_items, ..
            },
        ) = (old, new)
        else {
            return Err(Escalate);
        };
        let names = |items: &[Node]| -> Option<Vec<String>> {
            let names: Vec<String> = items.iter().map(Node::list_key).collect::<Option<_>>()?;
            let unique: HashSet<&String> = names.iter().collect();
            (unique.len() == names.len()).then_some(names)
        };
        let (Some(old_names), Some(new_names)) = (names(old_items), names(new_items)) else {
            return Err(Escalate);
        };
        if old_items.is_empty() {
            return Err(Escalate);
        }
        let old_index: HashMap<&str, usize> = old_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let new_index: HashMap<&str, usize> = new_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        // The names both lists have must be in the same order, or the list is rewritten.
        let kept_old = old_names
            .iter()
            .filter(|n| new_index.contains_key(n.as_str()));
        let kept_new = new_names
            .iter()
            .filter(|n| old_index.contains_key(n.as_str()));
        if !kept_old.eq(kept_new) {
            return Err(Escalate);
        }
        let dash = |text: &str, item: &Node| dash_of(text, item.start()).ok_or(Escalate);
        let first_dash = dash(self.old, &old_items[0])?;
        let dash_column = column(self.old, first_dash);
        for (item, name) in old_items.iter().zip(&old_names) {
            let at = dash(self.old, item)?;
            let end = entry_end(self.old, at, item.end());
            match new_index.get(name.as_str()).copied() {
                None => edits.replace(
                    start_with_comments(self.old, at, self.header_end),
                    end,
                    String::new(),
                ),
                Some(i) if item.same_value(&new_items[i]) => {}
                Some(i) => {
                    let mut inner = Edits::default();
                    match self.edit_mapping(item, &new_items[i], &mut inner) {
                        Ok(()) => edits.list.extend(inner.list),
                        Err(Escalate) => {
                            let text = self.cut_item(&new_items[i], dash_column)?;
                            edits.replace(at, end, text);
                        }
                    }
                }
            }
        }
        let mut previous: Option<usize> = None;
        for (item, name) in new_items.iter().zip(&new_names) {
            if let Some(&i) = old_index.get(name.as_str()) {
                previous = Some(i);
                continue;
            }
            let text = self.cut_item(item, dash_column)?;
            let at = match previous {
                Some(i) => {
                    let item = &old_items[i];
                    entry_end(self.old, dash(self.old, item)?, item.end())
                }
                None => start_with_comments(self.old, first_dash, self.header_end),
            };
            self.insert(edits, at, dash_column, text);
        }
        Ok(())
    }

    /// The text of a desired list item from its `- `, re-indented to `column`, first line unindented.
    fn cut_item(&self, item: &Node, column: usize) -> Result<String, Escalate> {
        let at = dash_of(self.new, item.start()).ok_or(Escalate)?;
        let end = entry_end(self.new, at, item.end());
        reindent(self.new, at, end, self::column(self.new, at), column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(old: &str, new: &str) -> String {
        let out = edit_in_place(old, new).unwrap_or_else(|f| panic!("fallback {f}"));
        assert_eq!(
            yaml::parse_document(out.as_bytes()).unwrap(),
            yaml::parse_document(new.as_bytes()).unwrap()
        );
        out
    }

    #[test]
    fn a_changed_scalar_keeps_its_comment_and_its_neighbours() {
        let old = "# header\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a # the name\ndata:\n  # first\n  x: \"1\" # keep\n  y: two\n";
        let new =
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  x: \"2\"\n  y: two\n";
        assert_eq!(
            edit(old, new),
            "# header\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a # the name\ndata:\n  # first\n  x: \"2\" # keep\n  y: two\n"
        );
    }

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n";
    const CM2: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: w\n";

    #[test]
    fn what_cannot_be_edited_safely_falls_back_with_its_reason() {
        let cases: &[(&str, Fallback)] = &[
            ("apiVersion: v1\nkind: [\n", Fallback::Unparseable),
            (
                "apiVersion: v1\n---\napiVersion: v1\n",
                Fallback::MultiDocument,
            ),
            ("a: &x 1\nb: *x\n", Fallback::AnchorOrTag),
            ("a: !!str 1\n", Fallback::AnchorOrTag),
            (
                "{apiVersion: v1, kind: ConfigMap}\n",
                Fallback::NotBlockMapping,
            ),
            ("- a\n", Fallback::NotBlockMapping),
            ("a: 1\na: 2\n", Fallback::UnusualKey),
            ("? [a]\n: 1\n", Fallback::UnusualKey),
            ("a: 1\r\nb: 2\n", Fallback::LineEndings),
            ("\u{feff}a: 1\n", Fallback::LineEndings),
            (
                "apiVersion: v1\nkind: Secret\ndata:\n  k: ENC[x]\nsops:\n  mac: ENC[y]\n",
                Fallback::Sops,
            ),
        ];
        for (existing, reason) in cases {
            assert_eq!(edit_in_place(existing, CM2), Err(*reason), "{existing:?}");
        }
        assert_eq!(edit_in_place(CM, "a: [\n"), Err(Fallback::Unparseable));
    }

    #[test]
    fn an_unchanged_value_returns_the_file_as_it_is() {
        let commented =
            "# c\nkind: ConfigMap\napiVersion: v1\nmetadata: {name: a}\ndata:\n  k: 'v' # x\n";
        assert_eq!(edit(commented, CM), commented);
    }

    #[test]
    fn the_fast_path_takes_only_files_in_the_desired_layout() {
        assert!(same_layout(CM.as_bytes(), CM2.as_bytes()));
        assert!(same_layout(CM.as_bytes(), CM.as_bytes()));
        // A comment, other line endings, a key more, a moved key, another indentation: the editor's case.
        for existing in [
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v # c\n",
            "apiVersion: v1\r\nkind: ConfigMap\r\nmetadata:\r\n  name: a\r\ndata:\r\n  k: v\r\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  j: u\n  k: v\n",
            "kind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  k: v\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n    name: a\ndata:\n    k: v\n",
        ] {
            assert!(
                !same_layout(existing.as_bytes(), CM2.as_bytes()),
                "{existing:?}"
            );
        }
        // Scalar list items are whole lines: a changed one is not a value on a kept key.
        assert!(!same_layout(b"a:\n- x\n", b"a:\n- y\n"));
        assert!(same_layout(b"a:\n- k: x\n", b"a:\n- k: y\n"));
    }

    #[test]
    fn a_text_without_a_final_line_break_gets_new_keys_on_their_own_line() {
        let old = "# c\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v";
        let new = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n  l: w\nzzz: 1\n";
        assert_eq!(edit(old, new), format!("{old}\n  l: w\nzzz: 1\n"));
        assert_eq!(
            edit(old, &new.replace("k: v", "k: w")).lines().nth(6),
            Some("  k: w")
        );
    }

    #[test]
    fn a_type_change_replaces_the_entry_and_keeps_the_comments_above() {
        let old = "a: 1\n# about b\nb: x # inline\nc:\n  d: 1\n";
        let new = "a: 1\nb:\n  nested: true\nc: 2\n";
        assert_eq!(
            edit(old, new),
            "a: 1\n# about b\nb:\n  nested: true\nc: 2\n"
        );
    }

    #[test]
    fn a_plain_key_yaml_1_1_misreads_takes_the_renderings_quotes() {
        let old = "on: push # trigger\nyes: [a]\nb: 1\n";
        let new = "\"on\": push\nb: 2\n\"yes\":\n- b\n";
        assert_eq!(
            edit(old, new),
            "\"on\": push # trigger\n\"yes\":\n- b\nb: 2\n"
        );
    }

    #[test]
    fn document_markers_multi_line_scalars_and_comment_only_files() {
        let old = "--- # the object\napiVersion: v1\nkind: ConfigMap\ndata:\n  long: a folded\n    plain scalar\n  k: v\n...\n";
        let new = "apiVersion: v1\nkind: ConfigMap\ndata:\n  k: w\n  long: changed\n";
        assert_eq!(
            edit(old, new),
            "--- # the object\napiVersion: v1\nkind: ConfigMap\ndata:\n  long: changed\n  k: w\n...\n"
        );
        assert_eq!(
            edit_in_place("# nothing\n", new),
            Err(Fallback::Unparseable)
        );
        assert_eq!(edit_in_place("", new), Err(Fallback::Unparseable));
    }

    #[test]
    fn a_value_is_rendered_then_edited_in() {
        let old = "# kustomize\nresources:\n  - a.yaml # first\nnamespace: shop\n";
        let desired = serde_json::json!({"resources": ["a.yaml", "b.yaml"], "namespace": "shop"});
        let out = edit_in_place_value(old, &desired).unwrap();
        assert_eq!(
            out,
            "# kustomize\nresources:\n  - a.yaml # first\n  - b.yaml\nnamespace: shop\n"
        );
        assert_eq!(yaml::parse_document(out.as_bytes()).unwrap(), desired);
    }

    #[test]
    fn a_null_value_becomes_a_scalar() {
        assert_eq!(edit("a: # empty\nb: 1\n", "a: 2\nb: 1\n"), "a: 2\nb: 1\n");
    }

    #[test]
    fn lists_of_strings_are_matched_by_value_others_and_reordered_ones_replaced() {
        let old = "args: # flags\n  - 1\n  - --b\nitems:\n- name: x\n  v: 1\n- name: y\n  v: 2\n";
        let new = "args:\n- 1\n- --c\nitems:\n- name: y\n  v: 2\n- name: x\n  v: 1\n";
        assert_eq!(edit(old, new), new);
        // Unique strings are matched one by one.
        let old = "args: # flags\n  - --a # first\n  # gone\n  - --b\n  - '--d'\n";
        let new = "args:\n- --a\n- --c\n- --d\n- --e\n";
        assert_eq!(
            edit(old, new),
            "args: # flags\n  - --a # first\n  - --c\n  - '--d'\n  - --e\n"
        );
    }

    #[test]
    fn a_removed_first_key_of_a_list_item_rewrites_that_item() {
        let old = "items:\n  # first\n  - a: 1\n    name: one\n  - name: two # why\n";
        let new = "items:\n- name: one\n- name: two\n";
        assert_eq!(
            edit(old, new),
            "items:\n  # first\n  - name: one\n  - name: two # why\n"
        );
        // `y` reads as a boolean to YAML 1.1 readers: not a name to match by, the list is replaced.
        let old = "items:\n  # first\n  - a: 1\n    name: x\n  - name: y # why\n";
        let new = "items:\n- name: x\n- name: y\n";
        assert_eq!(edit(old, new), new);
    }

    #[test]
    fn new_keys_without_a_preceding_sibling_go_first() {
        let old = "z: 1 # last\n";
        let new = "a: 0\nb: 0\nz: 1\n";
        assert_eq!(edit(old, new), "a: 0\nb: 0\nz: 1 # last\n");
    }

    #[test]
    fn four_space_indentation_is_kept_for_new_keys() {
        let old = "spec:\n    # replicas\n    replicas: 1\n    template:\n        x: 1\n";
        let new =
            "spec:\n  paused: true\n  replicas: 1\n  template:\n    x: 1\n    y:\n      z: 2\n";
        assert_eq!(
            edit(old, new),
            "spec:\n    paused: true\n    # replicas\n    replicas: 1\n    template:\n        x: 1\n        y:\n          z: 2\n"
        );
    }

    #[test]
    fn a_large_file_changes_only_the_changed_lines() {
        let mut old =
            String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n");
        let mut new = old.clone();
        for k in 0..5000 {
            old.push_str(&format!("  # note {k}\n  key-{k:05}: value-{k}\n"));
            if k != 10 {
                let value = if k == 2500 {
                    "changed".to_owned()
                } else {
                    format!("value-{k}")
                };
                new.push_str(&format!("  key-{k:05}: {value}\n"));
            }
        }
        new.push_str("  zz-added: yes-really\n");
        let out = edit(&old, &new);
        let (old_lines, out_lines): (Vec<&str>, Vec<&str>) =
            (old.lines().collect(), out.lines().collect());
        assert_eq!(out_lines.len(), old_lines.len() - 2 + 1);
        assert!(!out.contains("note 10\n") && !out.contains("key-00010"));
        assert!(out.contains("  # note 2500\n  key-02500: changed\n"));
        assert!(out.ends_with("  key-04999: value-4999\n  zz-added: yes-really\n"));
        let out_set: HashSet<&str> = out_lines.iter().copied().collect();
        let kept = old_lines.iter().filter(|l| out_set.contains(*l)).count();
        assert_eq!(
            kept,
            old_lines.len() - 3,
            "all but the removed pair and the changed line"
        );
    }
}

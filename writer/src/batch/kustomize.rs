//! Keeping kustomizations in line with the files the writer adds and removes (GitDestination
//! `spec.kustomization`).
//!
//! [`edit`] changes only the `resources:` list of an existing `kustomization.yaml` and leaves every other byte as it
//! was: comments, key order, indentation, quoting, patches, generators and entries the writer did not add. New
//! entries go after the last entry (block lists keep their indentation, flow lists stay flow lists); a removed
//! entry's line goes away; a missing `resources:` key is appended at the end. Every edit is checked by parsing the
//! result: all keys but `resources` must be unchanged and `resources` must be exactly the old list without the
//! removed entries plus the added ones. A file that is not a kustomization the writer can read, or whose layout
//! this line-level edit cannot change safely (a multi-document file, comments inside a flow list, a list entry
//! that is not a plain string), is refused with a reason and left alone.
//!
//! Pure: bytes in, bytes out. Only appending to a kustomization skips the parse, for bytes whose line-level
//! reading was checked against the parser before (a memo keyed by the SHA-256 of the bytes, see `CHECKED`): a
//! seed appends to one growing file in every batch, and parsing it twice per batch made seeds quadratic.

use std::collections::HashSet;

use reverser_common::yaml;
use thiserror::Error;

/// The file names kustomize recognizes, in the order it looks for them.
pub const FILE_NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Whether a path's file name is one kustomize reads as a kustomization.
pub fn is_kustomization_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    FILE_NAMES.contains(&name)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KustomizeError {
    /// Not a kustomization the writer can read (invalid YAML, not a mapping, `resources` not a list of strings).
    #[error("not a readable kustomization: {0}")]
    Unreadable(String),
    /// Readable, but its layout cannot be edited line by line without touching other content.
    #[error("cannot edit its resources list in place: {0}")]
    Uneditable(String),
}

/// A parsed kustomization: its top-level mapping and its `resources` entries.
#[derive(Debug)]
pub struct Kustomization {
    value: serde_json::Map<String, serde_json::Value>,
    resources: Vec<String>,
}

/// `./a/b.yaml` and `a/b.yaml` name the same file.
pub fn normalize(entry: &str) -> &str {
    let mut entry = entry.trim();
    while let Some(rest) = entry.strip_prefix("./") {
        entry = rest;
    }
    entry.trim_end_matches('/')
}

impl Kustomization {
    pub fn parse(bytes: &[u8]) -> Result<Self, KustomizeError> {
        let value = yaml::parse_document(bytes)
            .map_err(|e| KustomizeError::Unreadable(yaml::error_without_values(&e)))?;
        let serde_json::Value::Object(value) = value else {
            return Err(KustomizeError::Unreadable(
                "the document is not a mapping".into(),
            ));
        };
        let resources = match value.get("resources") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str().map(str::to_owned).ok_or_else(|| {
                        KustomizeError::Unreadable("a resources entry is not a string".into())
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(KustomizeError::Unreadable("resources is not a list".into()));
            }
        };
        Ok(Self { value, resources })
    }

    pub fn resources(&self) -> &[String] {
        &self.resources
    }

    /// Whether `entry` (relative to the kustomization's folder) is listed.
    pub fn lists(&self, entry: &str) -> bool {
        let entry = normalize(entry);
        self.resources.iter().any(|r| normalize(r) == entry)
    }

    /// Whether the folder `folder` (relative) is already built through this kustomization: listed itself, or a
    /// listed entry is an ancestor folder of it or lies inside it (the person includes its files directly).
    pub fn covers_folder(&self, folder: &str) -> bool {
        let folder = normalize(folder);
        self.resources.iter().any(|r| {
            let r = normalize(r);
            r == folder
                || folder
                    .strip_prefix(r)
                    .is_some_and(|rest| rest.starts_with('/'))
                || r.strip_prefix(folder)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// The `resources` entries of the usual layout (a block list of one-line scalars under a top-level `resources:`)
/// read line by line, without parsing the whole file: a flush that only re-sends listed files then costs no YAML
/// parse of a kustomization listing thousands of files. `None` for any other layout (the caller parses). Only used
/// to tell which entries are there, and to append to a file whose line-level reading was checked (see [`edit`]).
pub fn quick_resources(bytes: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(bytes).ok()?;
    quick_list(text).map(|list| list.entries)
}

/// A `resources` block list read line by line ([`quick_resources`]).
struct QuickList {
    entries: Vec<String>,
    /// The indentation of its items (when it has any).
    item_indent: Option<usize>,
    /// The byte offset just past the line of its last item (after the key line when it has none).
    end: usize,
    /// One way of ending lines, one `resources` key, no explicit (`? key`) keys, no quoted, flow or block
    /// scalars, anchors or tags outside the list: nothing that lets the parser read the list's lines otherwise
    /// than the line reading does. Only such a list is appended to without parsing.
    appendable: bool,
}

fn quick_list(text: &str) -> Option<QuickList> {
    if text.contains('\t') || text.contains("\n---") || text.contains("\n...") {
        return None;
    }
    let lines = split_lines(text);
    let (key_line, value_start) = find_key(&lines)?;
    if !without_comment(&lines[key_line].body[value_start..])
        .trim()
        .is_empty()
    {
        return None;
    }
    let line_end =
        |line: &Line<'_>| offset_in(text, line.body) + line.body.len() + line.ending.len();
    let mut entries = Vec::new();
    let mut item_indent = None;
    let mut end = line_end(&lines[key_line]);
    for line in &lines[key_line + 1..] {
        let body = line.body;
        if is_blank_or_comment(body) {
            continue;
        }
        let indent = indent_of(body);
        let is_item = body[indent..].starts_with("- ");
        match item_indent {
            None if is_item => item_indent = Some(indent),
            Some(item) if is_item && indent == item => {}
            // A continuation line or another structure: not the simple layout.
            Some(item) if indent > item => return None,
            _ if indent > 0 => return None,
            _ => break,
        }
        let value = item_value(body)?;
        // Values YAML might read otherwise than as their text (quotes, escapes) go to the parser.
        if value.contains(['"', '\'', '\\', '#', ':']) || body.contains(['"', '\'']) {
            return None;
        }
        entries.push(value);
        end = line_end(line);
    }
    // Outside the list: no second `resources` key, no explicit key, and nothing that could carry the list's
    // lines into another value (a quoted or flow scalar spanning lines, a block scalar, an anchor or a tag).
    let unsafe_outside = |line: &&Line<'_>| {
        !is_blank_or_comment(line.body)
            && (line.body.starts_with('?')
                || find_key(std::slice::from_ref(*line)).is_some()
                || line
                    .body
                    .contains(['"', '\'', '{', '[', '|', '>', '&', '*', '!', '%', '@', '`']))
    };
    let appendable = !text.contains('\r')
        && !lines[..key_line].iter().any(|line| unsafe_outside(&line))
        && !lines
            .iter()
            .skip(key_line + 1)
            .skip_while(|line| offset_in(text, line.body) < end)
            .any(|line| unsafe_outside(&line));
    Some(QuickList {
        entries,
        item_indent,
        end,
        appendable,
    })
}

/// Where `part` (a slice of `text`) starts in `text`.
fn offset_in(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

/// A kustomization the writer creates: the entries sorted, nothing else but its type.
pub fn create(entries: &[String]) -> Vec<u8> {
    let mut entries: Vec<&str> = entries.iter().map(|e| normalize(e)).collect();
    entries.sort_unstable();
    entries.dedup();
    let mut text = String::from(
        "# Created by gitops-reverser: it lists the files mirrored into this folder. Edit it freely: the writer\n\
         # adds and removes only its own entries and keeps everything else.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\n\
         kind: Kustomization\n",
    );
    if entries.is_empty() {
        text.push_str("resources: []\n");
    } else {
        text.push_str("resources:\n");
        for entry in entries {
            text.push_str("- ");
            text.push_str(&scalar(entry));
            text.push('\n');
        }
    }
    text.into_bytes()
}

/// A YAML scalar for an entry: plain when that is unambiguous, else double-quoted.
fn scalar(entry: &str) -> String {
    let plain = entry
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && entry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/%~-".contains(&b));
    if plain {
        entry.to_owned()
    } else {
        serde_json::to_string(entry).unwrap_or_else(|_| format!("{entry:?}"))
    }
}

/// Adds the entries of `add` that are not listed yet (in the given order) and removes every entry naming a path
/// of `remove`. `Ok(None)`: nothing to change.
///
/// Only additions to a file whose line-level reading was checked before (the usual case: every batch of a seed
/// appends to the kustomization the writer created) are appended without parsing the file: that costs the size
/// of the batch, not of the file. Everything else is parsed before and after the edit.
pub fn edit(
    bytes: &[u8],
    add: &[String],
    remove: &[String],
) -> Result<Option<Vec<u8>>, KustomizeError> {
    if remove.is_empty()
        && let Some(appended) = append_to_checked(bytes, add)
    {
        return Ok(appended);
    }
    edit_parsed(bytes, add, remove)
}

/// [`edit`] with the file parsed before and after.
fn edit_parsed(
    bytes: &[u8],
    add: &[String],
    remove: &[String],
) -> Result<Option<Vec<u8>>, KustomizeError> {
    let before = Kustomization::parse(bytes)?;
    remember_if_checked(bytes, &before);
    let listed: HashSet<&str> = before.resources.iter().map(|r| normalize(r)).collect();
    let remove: HashSet<&str> = remove.iter().map(|r| normalize(r)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let additions: Vec<&str> = add
        .iter()
        .map(|a| normalize(a))
        .filter(|a| !remove.contains(a) && !listed.contains(a) && seen.insert(a))
        .collect();
    let mut additions = additions;
    if before.resources.is_empty() {
        // The writer makes the list: sorted.
        additions.sort_unstable();
    }
    let removing = before
        .resources
        .iter()
        .any(|r| remove.contains(normalize(r)));
    if additions.is_empty() && !removing {
        return Ok(None);
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| KustomizeError::Unreadable("not UTF-8".into()))?;
    let edited = edit_lines(text, &additions, &remove)?;
    // The check that makes a line-level edit safe: everything but `resources` is as it was, and `resources` is
    // exactly what was asked for.
    let after = Kustomization::parse(edited.as_bytes())
        .map_err(|e| KustomizeError::Uneditable(format!("the edited file does not parse ({e})")))?;
    let mut expected: Vec<String> = before
        .resources
        .iter()
        .filter(|r| !remove.contains(normalize(r)))
        .cloned()
        .collect();
    expected.extend(additions.iter().map(|a| (*a).to_owned()));
    let others = |k: &Kustomization| {
        let mut map = k.value.clone();
        map.remove("resources");
        map
    };
    if after.resources != expected || others(&after) != others(&before) {
        return Err(KustomizeError::Uneditable(
            "its layout is not one the writer edits line by line".into(),
        ));
    }
    remember_if_checked(edited.as_bytes(), &after);
    Ok(Some(edited.into_bytes()))
}

/// Appends `add` to a block list read line by line, when that reading was checked against the parser for these
/// very bytes (see [`CHECKED`]); `None` when that does not apply and the file must be parsed.
///
/// Why appending keeps the check true without parsing the result: the list is a real block sequence of one-line
/// plain scalars (the parser read the same entries), the new lines go right after its last item at the items'
/// indentation, and each new line is a plain scalar that reads as exactly its text (checked by parsing the new
/// lines alone). So the result reads as the old mapping with the new entries at the end of `resources`, which is
/// what [`edit_parsed`] would write (byte for byte) and accept.
fn append_to_checked(bytes: &[u8], add: &[String]) -> Option<Option<Vec<u8>>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let list = quick_list(text)?;
    let item_indent = list.item_indent?;
    if !list.appendable || !is_checked(bytes) {
        return None;
    }
    let listed: HashSet<&str> = list.entries.iter().map(|e| normalize(e)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let additions: Vec<&str> = add
        .iter()
        .map(|a| normalize(a))
        .filter(|a| !listed.contains(a) && seen.insert(a))
        .collect();
    if additions.is_empty() {
        return Some(None);
    }
    if additions.iter().any(|a| scalar(a) != *a) {
        return None;
    }
    let items: String = additions.iter().map(|a| format!("- {a}\n")).collect();
    let reads_as_written = match yaml::parse_document(items.as_bytes()) {
        Ok(serde_json::Value::Array(values)) => {
            values.len() == additions.len()
                && values
                    .iter()
                    .zip(&additions)
                    .all(|(value, addition)| value.as_str() == Some(addition))
        }
        _ => false,
    };
    if !reads_as_written {
        return None;
    }
    let indent = " ".repeat(item_indent);
    let mut out =
        String::with_capacity(text.len() + items.len() + additions.len() * indent.len() + 1);
    out.push_str(&text[..list.end]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    for addition in &additions {
        out.push_str(&indent);
        out.push_str("- ");
        out.push_str(addition);
        out.push('\n');
    }
    out.push_str(&text[list.end..]);
    remember_checked(out.as_bytes());
    Some(Some(out.into_bytes()))
}

/// SHA-256 digests of kustomizations whose line-level reading ([`quick_resources`]) gave exactly the entries the parser
/// read, with a readable mapping around them. A memo of a pure check, keyed by content: shared by every worker of
/// the process, bounded, and keyed by a collision-resistant digest so that no other bytes can pass for them.
static CHECKED: std::sync::Mutex<CheckedBlobs> = std::sync::Mutex::new(CheckedBlobs {
    order: std::collections::VecDeque::new(),
    digests: None,
});

/// The most digests [`CHECKED`] keeps (the oldest go first): a few per kustomization a writer keeps.
const CHECKED_CAPACITY: usize = 1024;

struct CheckedBlobs {
    order: std::collections::VecDeque<Digest>,
    digests: Option<HashSet<Digest>>,
}

type Digest = [u8; 32];

fn digest(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn is_checked(bytes: &[u8]) -> bool {
    let digest = digest(bytes);
    let checked = CHECKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    checked
        .digests
        .as_ref()
        .is_some_and(|digests| digests.contains(&digest))
}

fn remember_checked(bytes: &[u8]) {
    let digest = digest(bytes);
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let CheckedBlobs { order, digests } = &mut *checked;
    if !digests.get_or_insert_with(HashSet::new).insert(digest) {
        return;
    }
    order.push_back(digest);
    if order.len() > CHECKED_CAPACITY
        && let (Some(oldest), Some(digests)) = (order.pop_front(), digests.as_mut())
    {
        digests.remove(&oldest);
    }
}

/// Remembers `bytes` as checked when the line reading of its `resources` gives what the parser gave.
fn remember_if_checked(bytes: &[u8], parsed: &Kustomization) {
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Some(list) = quick_list(text)
        && list.entries == parsed.resources
    {
        remember_checked(bytes);
    }
}

/// One line of the file with its ending (`\n`, `\r\n`, or none at the end).
struct Line<'a> {
    body: &'a str,
    ending: &'a str,
}

fn split_lines(text: &str) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (line, tail) = match rest.find('\n') {
            Some(i) => (&rest[..=i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (body, ending) = if let Some(body) = line.strip_suffix("\r\n") {
            (body, "\r\n")
        } else if let Some(body) = line.strip_suffix('\n') {
            (body, "\n")
        } else {
            (line, "")
        };
        lines.push(Line { body, ending });
        rest = tail;
    }
    lines
}

/// The text of a line without its comment (a `#` at the start or after white space, outside quotes).
fn without_comment(body: &str) -> &str {
    let bytes = body.as_bytes();
    let (mut single, mut double) = (false, false);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'\\' if double => i += 1,
            b'#' if !single && !double && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                return &body[..i];
            }
            _ => {}
        }
        i += 1;
    }
    body
}

fn indent_of(body: &str) -> usize {
    body.len() - body.trim_start_matches(' ').len()
}

fn is_blank_or_comment(body: &str) -> bool {
    let t = body.trim();
    t.is_empty() || t.starts_with('#')
}

/// The top-level `resources` key line, and the text after its colon.
fn find_key(lines: &[Line<'_>]) -> Option<(usize, usize)> {
    for (index, line) in lines.iter().enumerate() {
        for key in ["resources", "\"resources\"", "'resources'"] {
            if let Some(rest) = line.body.strip_prefix(key) {
                let rest_trimmed = rest.trim_start_matches(' ');
                if let Some(after) = rest_trimmed.strip_prefix(':')
                    && (after.is_empty() || after.starts_with([' ', '\t']))
                {
                    return Some((index, line.body.len() - after.len()));
                }
            }
        }
    }
    None
}

/// The value of a block list item line (`- value  # comment`), unquoted; `None` for anything but a plain or
/// quoted one-line scalar.
fn item_value(body: &str) -> Option<String> {
    let t = without_comment(body).trim();
    let value = t.strip_prefix('-')?.trim();
    if value.is_empty() {
        return None;
    }
    let first = value.as_bytes()[0];
    if b"[{|>&*!%@`".contains(&first) {
        return None;
    }
    if value.starts_with('"') || value.starts_with('\'') {
        let parsed = yaml::parse_document(value.as_bytes()).ok()?;
        return parsed.as_str().map(str::to_owned);
    }
    Some(value.to_owned())
}

fn edit_lines(
    text: &str,
    additions: &[&str],
    remove: &HashSet<&str>,
) -> Result<String, KustomizeError> {
    let lines = split_lines(text);
    let newline = lines
        .first()
        .map(|l| if l.ending == "\r\n" { "\r\n" } else { "\n" })
        .unwrap_or("\n");
    let block_items = |indent: &str| -> String {
        additions
            .iter()
            .map(|a| format!("{indent}- {}{newline}", scalar(a)))
            .collect()
    };
    let Some((key_line, value_start)) = find_key(&lines) else {
        // No `resources:` yet: append one at the end.
        if lines.iter().any(|l| l.body.trim_end() == "...") {
            return Err(KustomizeError::Uneditable(
                "it ends its document with '...'".into(),
            ));
        }
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(newline);
        }
        out.push_str("resources:");
        out.push_str(newline);
        out.push_str(&block_items(""));
        return Ok(out);
    };
    let key_body = lines[key_line].body;
    let value_text = without_comment(&key_body[value_start..]).trim();
    let mut out = String::with_capacity(text.len() + additions.len() * 64);
    for line in &lines[..key_line] {
        out.push_str(line.body);
        out.push_str(line.ending);
    }
    if value_text.starts_with('[') {
        return edit_flow(&lines, key_line, value_start, additions, remove, out);
    }
    if !(value_text.is_empty() || value_text == "~" || value_text == "null") {
        return Err(KustomizeError::Uneditable(
            "resources is not a block or flow list".into(),
        ));
    }
    // A block list (or a null value): its items follow, at one indentation, until the next top-level key.
    let mut item_indent: Option<usize> = None;
    let mut last_item = None;
    let mut index = key_line + 1;
    while index < lines.len() {
        let body = lines[index].body;
        if is_blank_or_comment(body) {
            index += 1;
            continue;
        }
        let indent = indent_of(body);
        let is_item = body[indent..].starts_with("- ") || body[indent..].trim_end() == "-";
        match item_indent {
            None if is_item => item_indent = Some(indent),
            Some(item) if is_item && indent == item => {}
            Some(item) if indent > item => {
                // The continuation of a multi-line item.
            }
            _ => break,
        }
        last_item = Some(index);
        index += 1;
    }
    let end = last_item.map_or(key_line + 1, |l| l + 1);
    let indent = " ".repeat(item_indent.unwrap_or(0));
    let mut kept_items = 0usize;
    let mut body_out = String::new();
    for (offset, line) in lines[key_line + 1..end].iter().enumerate() {
        let index = key_line + 1 + offset;
        let is_item_line = item_indent.is_some_and(|item| {
            !is_blank_or_comment(line.body)
                && indent_of(line.body) == item
                && line.body[item..].starts_with('-')
        });
        if is_item_line {
            let next_is_continuation = lines.get(index + 1).is_some_and(|next| {
                index + 1 < end
                    && !is_blank_or_comment(next.body)
                    && item_indent.is_some_and(|item| indent_of(next.body) > item)
            });
            match item_value(line.body) {
                Some(value) if remove.contains(normalize(&value)) => {
                    if next_is_continuation {
                        return Err(KustomizeError::Uneditable(
                            "an entry to remove spans several lines".into(),
                        ));
                    }
                    continue;
                }
                Some(_) if !next_is_continuation => kept_items += 1,
                _ => {
                    // An entry this edit does not understand (multi-line, not a scalar): kept as it is.
                    kept_items += 1;
                }
            }
        }
        body_out.push_str(line.body);
        body_out.push_str(line.ending);
    }
    if kept_items == 0 && additions.is_empty() {
        // The list is empty now: say so, keeping the key line's comment.
        out.push_str(&key_body[..value_start]);
        out.push_str(" []");
        out.push_str(comment_part(&key_body[value_start..]));
    } else if value_text.is_empty() {
        out.push_str(key_body);
    } else {
        // `resources: null` (or `~`) becomes a block list.
        out.push_str(&key_body[..value_start]);
        out.push_str(comment_part(&key_body[value_start..]));
    }
    out.push_str(if lines[key_line].ending.is_empty() {
        newline
    } else {
        lines[key_line].ending
    });
    out.push_str(&body_out);
    if !additions.is_empty() {
        if !out.ends_with('\n') {
            out.push_str(newline);
        }
        out.push_str(&block_items(&indent));
    }
    for line in &lines[end..] {
        out.push_str(line.body);
        out.push_str(line.ending);
    }
    Ok(out)
}

/// The ` # comment` tail of a value text, with its leading white space.
fn comment_part(value: &str) -> &str {
    let code = without_comment(value);
    let comment = &value[code.len()..];
    if comment.is_empty() {
        ""
    } else {
        // Keep one space before the comment.
        let start = code.trim_end().len();
        &value[start..]
    }
}

/// Edits `resources: [a, b]` (possibly spread over lines) in place.
fn edit_flow(
    lines: &[Line<'_>],
    key_line: usize,
    value_start: usize,
    additions: &[&str],
    remove: &HashSet<&str>,
    mut out: String,
) -> Result<String, KustomizeError> {
    // The text from the `[` to the end of the file, and the matching `]`.
    let key_body = lines[key_line].body;
    let open = value_start + key_body[value_start..].find('[').unwrap_or(0);
    let mut tail = String::new();
    tail.push_str(&key_body[open..]);
    tail.push_str(lines[key_line].ending);
    for line in &lines[key_line + 1..] {
        tail.push_str(line.body);
        tail.push_str(line.ending);
    }
    let bytes = tail.as_bytes();
    let (mut single, mut double, mut close) = (false, false, None);
    let mut commas = Vec::new();
    let mut comment = false;
    let mut i = 1;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'\\' if double => i += 1,
            b'#' if !single && !double && bytes[i - 1].is_ascii_whitespace() => comment = true,
            b'[' | b'{' if !single && !double => {
                return Err(KustomizeError::Uneditable(
                    "a resources entry is not a plain string".into(),
                ));
            }
            b',' if !single && !double => commas.push(i),
            b']' if !single && !double => {
                close = Some(i);
                break;
            }
            _ => {}
        }
        i += 1;
    }
    let close = close.ok_or_else(|| KustomizeError::Unreadable("unclosed flow list".into()))?;
    let inner = &tail[1..close];
    let after = &tail[close + 1..];
    let mut items: Vec<&str> = Vec::new();
    let mut start = 1;
    for &comma in &commas {
        items.push(tail[start..comma].trim());
        start = comma + 1;
    }
    items.push(tail[start..close].trim());
    items.retain(|i| !i.is_empty());
    let removing = items.iter().any(|item| {
        yaml::parse_document(item.as_bytes())
            .ok()
            .and_then(|v| v.as_str().map(|s| remove.contains(normalize(s))))
            .unwrap_or(false)
    });
    out.push_str(&key_body[..open]);
    if !removing {
        // Only additions: insert them before the `]`, keeping everything inside as it is.
        if comment && additions.is_empty() {
            out.push_str(&tail);
            return Ok(out);
        }
        let content_end = inner.trim_end().len();
        let (head, space) = inner.split_at(content_end);
        out.push('[');
        out.push_str(head);
        let added: Vec<String> = additions.iter().map(|a| scalar(a)).collect();
        if head.trim().is_empty() {
            out.push_str(&added.join(", "));
        } else if head.trim_end().ends_with(',') {
            out.push(' ');
            out.push_str(&added.join(", "));
        } else {
            out.push_str(", ");
            out.push_str(&added.join(", "));
        }
        out.push_str(space);
        out.push(']');
        out.push_str(after);
        return Ok(out);
    }
    if comment {
        return Err(KustomizeError::Uneditable(
            "the flow list holds comments".into(),
        ));
    }
    let mut kept: Vec<String> = items
        .iter()
        .filter(|item| {
            !yaml::parse_document(item.as_bytes())
                .ok()
                .and_then(|v| v.as_str().map(|s| remove.contains(normalize(s))))
                .unwrap_or(false)
        })
        .map(|item| (*item).to_owned())
        .collect();
    kept.extend(additions.iter().map(|a| scalar(a)));
    out.push('[');
    out.push_str(&kept.join(", "));
    out.push(']');
    out.push_str(after);
    Ok(out)
}

#[cfg(test)]
mod tests;

/// `.sourceignore` in every base folder: Flux's source-controller leaves the files it names out of the artifact,
/// so a kustomization Flux generates for a folder without one (it lists every YAML file) holds only objects.
pub const SOURCEIGNORE_FILE: &str = ".sourceignore";
const SOURCEIGNORE_HEADER: &str = "# Written by gitops-reverser:";

/// The generated `.sourceignore`: the writer's files that are not Kubernetes objects.
pub fn render_sourceignore() -> &'static str {
    "# Written by gitops-reverser: files of this folder that are not Kubernetes objects. Flux leaves them out,\n\
     # so a kustomization it generates here holds only the mirrored objects. Replace this file to manage it yourself.\n\
     /.sops.yaml\n\
     /.configbutler/\n"
}

/// Whether a `.sourceignore` is the writer's own (a person's is never touched).
pub fn is_generated_sourceignore(content: &[u8]) -> bool {
    content.starts_with(SOURCEIGNORE_HEADER.as_bytes())
}

/// The kustomization edits of one destination's plan.
#[derive(Debug, Default)]
pub struct Edits {
    /// New or edited kustomization files (full paths).
    pub changes: Vec<crate::git::FileChange>,
    /// Kustomizations left alone, with why (full path: reason).
    pub problems: Vec<String>,
}

/// A kustomization met while planning.
struct Doc {
    /// The file as it is in the tree (`None`: the writer creates it).
    original: Option<Vec<u8>>,
    /// Normalized entries it lists (before this plan's edits), `None` when it cannot be read.
    listed: Option<HashSet<String>>,
    resources: Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
}

/// Works out which kustomizations of one destination list which files (pure over a [`super::TreeView`]).
pub struct Planner<'t> {
    tree: &'t dyn super::TreeView,
    base: &'t str,
    create: bool,
    /// Folder → the kustomization file in it, if any (memo of tree reads).
    in_folder: std::collections::HashMap<String, Option<String>>,
    docs: std::collections::BTreeMap<String, Doc>,
    problems: Vec<String>,
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// `path` relative to `folder` (which contains it).
fn relative<'p>(folder: &str, path: &'p str) -> &'p str {
    path.strip_prefix(folder)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(path)
}

impl<'t> Planner<'t> {
    pub fn new(tree: &'t dyn super::TreeView, base: &'t str, create: bool) -> Self {
        Self {
            tree,
            base,
            create,
            in_folder: Default::default(),
            docs: Default::default(),
            problems: Vec::new(),
        }
    }

    fn kustomization_in(&mut self, folder: &str) -> Result<Option<String>, crate::git::GitError> {
        if let Some(found) = self.in_folder.get(folder) {
            return Ok(found.clone());
        }
        let mut found = None;
        for name in FILE_NAMES {
            let path = format!("{folder}/{name}");
            if let Some(bytes) = self.tree.read(&path)? {
                let parsed = match quick_resources(&bytes) {
                    Some(resources) => Ok(resources),
                    None => Kustomization::parse(&bytes).map(|k| k.resources),
                };
                let (listed, resources) = match parsed {
                    Ok(resources) => (
                        Some(resources.iter().map(|r| normalize(r).to_owned()).collect()),
                        resources,
                    ),
                    Err(e) => {
                        self.problems.push(format!("{path}: {e}"));
                        (None, Vec::new())
                    }
                };
                self.docs.insert(
                    path.clone(),
                    Doc {
                        original: Some(bytes),
                        listed,
                        resources,
                        add: Vec::new(),
                        remove: Vec::new(),
                    },
                );
                found = Some(path);
                break;
            }
        }
        self.in_folder.insert(folder.to_owned(), found.clone());
        Ok(found)
    }

    /// The nearest kustomization at or above `folder`, up to the base folder.
    fn nearest(&mut self, mut folder: &str) -> Result<Option<String>, crate::git::GitError> {
        loop {
            if let Some(found) = self.kustomization_in(folder)? {
                return Ok(Some(found));
            }
            if folder == self.base || !folder.starts_with(self.base) {
                return Ok(None);
            }
            folder = parent(folder);
        }
    }

    /// Lists `path` (a file, or with `is_folder` a folder holding a kustomization) in the nearest kustomization
    /// above it; creates the base folder's in create mode.
    pub fn list(&mut self, path: &str, is_folder: bool) -> Result<(), crate::git::GitError> {
        let Some(kpath) = (match self.nearest(parent(path))? {
            Some(found) => Some(found),
            None if self.create => {
                let kpath = format!("{}/{}", self.base, FILE_NAMES[0]);
                self.docs.entry(kpath.clone()).or_insert(Doc {
                    original: None,
                    listed: Some(HashSet::new()),
                    resources: Vec::new(),
                    add: Vec::new(),
                    remove: Vec::new(),
                });
                self.in_folder
                    .insert(self.base.to_owned(), Some(kpath.clone()));
                Some(kpath)
            }
            None => None,
        }) else {
            return Ok(());
        };
        let kfolder = parent(&kpath).to_owned();
        let entry = relative(&kfolder, path).to_owned();
        let doc = self.docs.get_mut(&kpath).expect("loaded");
        let Some(listed) = &mut doc.listed else {
            return Ok(());
        };
        let covered = if is_folder {
            let k = Kustomization {
                value: Default::default(),
                resources: doc.resources.clone(),
            };
            k.covers_folder(&entry) || listed.contains(&entry)
        } else {
            listed.contains(&entry)
        };
        if covered {
            return Ok(());
        }
        let first_addition = doc.add.is_empty();
        listed.insert(entry.clone());
        doc.add.push(entry);
        // A nested kustomization is built only through its parent: the parent lists its folder.
        if first_addition && kfolder != self.base && kfolder.starts_with(self.base) {
            self.list(&kfolder, true)?;
        }
        Ok(())
    }

    /// Unlists `path` from the nearest kustomization above it (if it lists it).
    pub fn unlist(&mut self, path: &str) -> Result<(), crate::git::GitError> {
        let Some(kpath) = self.nearest(parent(path))? else {
            return Ok(());
        };
        let entry = relative(parent(&kpath), path).to_owned();
        let doc = self.docs.get_mut(&kpath).expect("loaded");
        if let Some(listed) = &mut doc.listed
            && listed.remove(&entry)
        {
            doc.add.retain(|a| *a != entry);
            doc.remove.push(entry);
        }
        Ok(())
    }

    /// The file changes, and the kustomizations that could not be edited.
    pub fn finish(mut self) -> Edits {
        let mut edits = Edits {
            problems: std::mem::take(&mut self.problems),
            ..Default::default()
        };
        for (path, mut doc) in self.docs {
            if doc.add.is_empty() && doc.remove.is_empty() {
                continue;
            }
            doc.add.sort();
            match &doc.original {
                None => edits.changes.push(crate::git::FileChange {
                    path,
                    content: Some(create(&doc.add)),
                }),
                Some(original) => match edit(original, &doc.add, &doc.remove) {
                    Ok(Some(content)) => edits.changes.push(crate::git::FileChange {
                        path,
                        content: Some(content),
                    }),
                    Ok(None) => {}
                    Err(e) => edits.problems.push(format!("{path}: {e}")),
                },
            }
        }
        edits
    }
}

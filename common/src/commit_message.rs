//! Commit messages people write (a CommitRequest's `spec.message`): the rules both the agent (status) and the
//! writer (its own guard) apply before a message reaches `git commit`.

/// Largest message, in bytes (before the writer's trailers).
pub const MAX_BYTES: usize = 8 * 1024;
/// Longest subject (first line), in characters.
pub const MAX_SUBJECT_CHARS: usize = 200;

/// Why a message is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the message is {0} bytes; at most {MAX_BYTES} are allowed")]
    TooLong(usize),
    #[error("the message contains a NUL byte")]
    Nul,
    #[error("the message contains a control character (only line breaks and tabs are allowed)")]
    Control,
    #[error("the subject (first line) is empty")]
    EmptySubject,
    #[error("the subject (first line) is {0} characters; at most {MAX_SUBJECT_CHARS} are allowed")]
    SubjectTooLong(usize),
    #[error(
        "the subject must be a single line: leave the second line empty and put the body after it"
    )]
    SubjectNotSingleLine,
    #[error(
        "line {0:?} looks like one of the writer's X-ConfigButler trailers, which only the writer writes"
    )]
    ForgedTrailer(String),
}

/// Checks `message` and returns it normalized: `\r\n` as `\n`, trailing whitespace of each line and trailing
/// blank lines removed. An empty (or blank) message is `Ok(None)`: the usual generated message is used.
pub fn validate(message: &str) -> Result<Option<String>, MessageError> {
    if message.len() > MAX_BYTES {
        return Err(MessageError::TooLong(message.len()));
    }
    if message.contains('\0') {
        return Err(MessageError::Nul);
    }
    let unified = message.replace("\r\n", "\n");
    if unified
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(MessageError::Control);
    }
    let lines: Vec<&str> = unified.lines().map(str::trim_end).collect();
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    let lines = &lines[..end];
    let Some(subject) = lines.first() else {
        return Ok(None);
    };
    if subject.trim().is_empty() {
        return Err(MessageError::EmptySubject);
    }
    let chars = subject.chars().count();
    if chars > MAX_SUBJECT_CHARS {
        return Err(MessageError::SubjectTooLong(chars));
    }
    if lines.get(1).is_some_and(|l| !l.is_empty()) {
        return Err(MessageError::SubjectNotSingleLine);
    }
    if let Some(forged) = lines.iter().find(|l| {
        l.trim_start()
            .to_ascii_lowercase()
            .starts_with("x-configbutler-")
    }) {
        return Err(MessageError::ForgedTrailer((*forged).to_owned()));
    }
    Ok(Some(lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_and_body_are_kept_and_normalized() {
        assert_eq!(
            validate("Release 4.2  \r\n\r\nBumps the web tier.\n\n\n").unwrap(),
            Some("Release 4.2\n\nBumps the web tier.".to_owned())
        );
        assert_eq!(validate("").unwrap(), None);
        assert_eq!(validate(" \n\n ").unwrap(), None);
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        assert_eq!(validate("a\0b"), Err(MessageError::Nul));
        assert_eq!(validate("a\u{1b}[31m"), Err(MessageError::Control));
        assert_eq!(validate("\nbody"), Err(MessageError::EmptySubject));
        assert_eq!(
            validate("line one\nline two"),
            Err(MessageError::SubjectNotSingleLine)
        );
        assert_eq!(
            validate(&"x".repeat(MAX_SUBJECT_CHARS + 1)),
            Err(MessageError::SubjectTooLong(MAX_SUBJECT_CHARS + 1))
        );
        let long = format!("s\n\n{}", "b".repeat(MAX_BYTES));
        assert_eq!(validate(&long), Err(MessageError::TooLong(long.len())));
        assert!(matches!(
            validate("s\n\nX-ConfigButler-ClusterUID: someone-else"),
            Err(MessageError::ForgedTrailer(_))
        ));
    }
}

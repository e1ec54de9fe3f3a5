//! Checks and redactions of repository names that the session, the admin service and the git layer all need:
//! a branch name's validity and a repository URL without its credentials. Pure, and outside the git layer so that
//! the layers above it do not import it for two string functions.

/// A branch name git would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid branch name {0:?}")]
pub struct InvalidBranch(pub String);

/// Checks a branch name with git's `check-ref-format` rules (as `refs/heads/<branch>`).
pub fn validate_branch_name(branch: &str) -> Result<(), InvalidBranch> {
    // is_valid_name accepts "HEAD"-like one-level names only outside refs/; "refs/heads/" + name
    // covers every rule (no "..", no "@{", no control chars, no trailing ".lock", ...).
    let full = format!("refs/heads/{branch}");
    if branch.is_empty() || branch.starts_with('-') || !git2::Reference::is_valid_name(&full) {
        return Err(InvalidBranch(branch.to_owned()));
    }
    Ok(())
}

/// The URL without userinfo (`https://user:pw@host/r.git` → `https://host/r.git`). scp-like URLs
/// (`git@host:path`) keep their user name, which is not a secret and is needed to read them.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_drops_userinfo() {
        assert_eq!(redact_url("https://u:pw@h/r.git"), "https://h/r.git");
        assert_eq!(redact_url("https://tok@h:1/r@x.git"), "https://h:1/r@x.git");
        assert_eq!(redact_url("https://h/r.git"), "https://h/r.git");
        assert_eq!(redact_url("git@h:r.git"), "git@h:r.git");
    }
}

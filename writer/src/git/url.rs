//! Just enough URL handling for remotes: where to connect (for the reachability probe and for
//! matching known_hosts entries) and how to print a URL without its userinfo.

/// The network endpoint of a remote URL; `None` for local remotes (`file://`, plain paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// Parses `scheme://[userinfo@]host[:port]/path` and scp-like `[user@]host:path`.
pub(crate) fn endpoint(url: &str) -> Option<Endpoint> {
    if let Some((scheme, rest)) = url.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "ssh" | "git+ssh" | "ssh+git" => 22,
            "git" => 9418,
            "https" => 443,
            "http" => 80,
            _ => return None, // file:// and anything libgit2 handles without a socket
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = split_host_port(hostport)?;
        return Some(Endpoint {
            scheme: if default_port == 22 {
                "ssh".into()
            } else {
                scheme
            },
            host,
            port: port.unwrap_or(default_port),
        });
    }
    // scp-like: a ':' before any '/', and not a Windows drive letter.
    let colon = url.find(':')?;
    if url[..colon].contains('/') || colon < 2 {
        return None;
    }
    let userhost = &url[..colon];
    let host = userhost.rsplit_once('@').map_or(userhost, |(_, h)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Endpoint {
        scheme: "ssh".into(),
        host: host.to_owned(),
        port: 22,
    })
}

fn split_host_port(hostport: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        return Some((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() => Some((host.to_owned(), Some(port.parse().ok()?))),
        Some((host, _)) => Some((host.to_owned(), None)),
        None if hostport.is_empty() => None,
        None => Some((hostport.to_owned(), None)),
    }
}

/// One spelling per remote, for keying workers: scheme and host in lower case, no default port, no trailing `/`.
/// `https://Git.example.com:443/acme/x.git/` and `https://git.example.com/acme/x.git` are one repository, so they
/// get one worker (and the overlap check between base folders sees both). The path keeps its case.
pub fn canonical_remote(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let url = if trimmed.is_empty() { url } else { trimmed };
    if let Some((scheme, rest)) = url.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        let mut host_port = host_port.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => Some(":443"),
            "http" => Some(":80"),
            "ssh" => Some(":22"),
            "git" => Some(":9418"),
            _ => None,
        };
        if let Some(port) = default_port
            && host_port.ends_with(port)
        {
            host_port.truncate(host_port.len() - port.len());
        }
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        return format!("{scheme}://{userinfo}{host_port}{path}");
    }
    // scp-like `user@host:path`
    match url.split_once(':') {
        Some((user_host, path)) => {
            let (user, host) = match user_host.rsplit_once('@') {
                Some((user, host)) => (format!("{user}@"), host),
                None => (String::new(), user_host),
            };
            format!("{user}{}:{path}", host.to_ascii_lowercase())
        }
        None => url.to_owned(),
    }
}

pub use crate::names::redact_url;

/// Makes free text (a libgit2 message) safe to show: any `scheme://userinfo@` is scrubbed and the
/// given secrets are masked.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        out.push_str(
            authority
                .rfind('@')
                .map_or(authority, |at| &authority[at + 1..]),
        );
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    for secret in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(secret, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_repository_has_one_canonical_spelling() {
        for (a, b) in [
            (
                "https://Git.Example.com:443/acme/state.git/",
                "https://git.example.com/acme/state.git",
            ),
            (
                "HTTPS://git.example.com/acme/state.git",
                "https://git.example.com/acme/state.git",
            ),
            (
                "ssh://git@Host:22/acme/state.git",
                "ssh://git@host/acme/state.git",
            ),
            (
                "git@GitHub.com:acme/state.git",
                "git@github.com:acme/state.git",
            ),
            (
                "file:///srv/repos/state.git/",
                "file:///srv/repos/state.git",
            ),
        ] {
            assert_eq!(canonical_remote(a), canonical_remote(b), "{a} vs {b}");
        }
        assert_eq!(
            canonical_remote("https://git.example.com/acme/state.git"),
            "https://git.example.com/acme/state.git"
        );
        // Paths keep their case, other ports stay.
        assert_ne!(
            canonical_remote("https://git.example.com/Acme/state.git"),
            canonical_remote("https://git.example.com/acme/state.git")
        );
        assert_ne!(
            canonical_remote("https://git.example.com:8443/acme/state.git"),
            canonical_remote("https://git.example.com/acme/state.git")
        );
    }

    fn ep(scheme: &str, host: &str, port: u16) -> Option<Endpoint> {
        Some(Endpoint {
            scheme: scheme.into(),
            host: host.into(),
            port,
        })
    }

    #[test]
    fn endpoints_of_network_urls() {
        assert_eq!(
            endpoint("https://u:p@h.example/r.git"),
            ep("https", "h.example", 443)
        );
        assert_eq!(
            endpoint("https://127.0.0.1:8443/r.git"),
            ep("https", "127.0.0.1", 8443)
        );
        assert_eq!(
            endpoint("git://127.0.0.1:9/r.git"),
            ep("git", "127.0.0.1", 9)
        );
        assert_eq!(
            endpoint("ssh://git@[::1]:2222/r.git"),
            ep("ssh", "::1", 2222)
        );
        assert_eq!(endpoint("ssh://git@host/r.git"), ep("ssh", "host", 22));
        assert_eq!(
            endpoint("git@github.com:org/r.git"),
            ep("ssh", "github.com", 22)
        );
    }

    #[test]
    fn local_urls_have_no_endpoint() {
        assert_eq!(endpoint("file:///tmp/r.git"), None);
        assert_eq!(endpoint("/tmp/r.git"), None);
        assert_eq!(endpoint("./a:b/r.git"), None);
        assert_eq!(endpoint("C:/r.git"), None);
    }

    #[test]
    fn scrub_removes_userinfo_and_secrets_from_messages() {
        let msg = "failed to fetch 'https://bob:hunter2@h/r.git': hunter2 rejected";
        assert_eq!(
            scrub(msg, &["hunter2"]),
            "failed to fetch 'https://h/r.git': *** rejected"
        );
    }
}

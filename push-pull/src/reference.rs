//! OCI references (`host[:port]/repository[:tag][@sha256:…]`), parsed once into a typed value.

use std::fmt;
use std::str::FromStr;

use thaw_schema::names::{is_valid_repository_name, is_valid_tag};
use thaw_schema::Sha256Digest;

use crate::error::Error;

/// Tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed reference to a manifest in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Sha256Digest>,
}

impl Reference {
    /// Parses a reference that names its registry host.
    pub fn parse(input: &str) -> Result<Self, Error> {
        Self::parse_with_default(input, None)
    }

    /// Parses a reference; one without a host is resolved against `default_registry`.
    pub fn parse_with_default(input: &str, default_registry: Option<&str>) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidReference { input: input.to_owned(), why: why.to_owned() };
        let (name_part, digest) = match input.rsplit_once('@') {
            Some((name, d)) => {
                (name, Some(d.parse::<Sha256Digest>().map_err(|e| bad(&format!("bad digest: {e}")))?))
            }
            None => (input, None),
        };
        let (registry, rest) = match name_part.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => (first.to_owned(), rest),
            _ => match default_registry {
                Some(d) => (d.trim_end_matches('/').to_owned(), name_part),
                None => {
                    return Err(bad(
                        "no registry host (write it as host[:port]/repository:tag, or set --registry / THAW_REGISTRY)",
                    ))
                }
            },
        };
        if !is_valid_host(&registry) {
            return Err(bad(&format!("{registry:?} is not a valid registry host[:port]")));
        }
        // The tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_owned())),
            None => (rest, None),
        };
        if !is_valid_repository_name(repository) {
            return Err(bad(&format!(
                "{repository:?} is not a valid repository name (lowercase letters, digits, separators . _ - and /)"
            )));
        }
        if let Some(t) = &tag {
            if !is_valid_tag(t) {
                return Err(bad(&format!("{t:?} is not a valid tag")));
            }
        }
        Ok(Self { registry, repository: repository.to_owned(), tag, digest })
    }

    /// `host[:port]` of the registry.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository name.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, when one was given.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, when one was given.
    pub fn digest(&self) -> Option<Sha256Digest> {
        self.digest
    }

    /// What goes after `/manifests/`: the digest when there is one, else the tag (or `latest`).
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The same repository at `digest`, keeping the tag for display.
    pub fn with_digest(&self, digest: Sha256Digest) -> Self {
        Self { digest: Some(digest), ..self.clone() }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Docker's rule: the first path component is a host when it has a `.` or a `:`, or is `localhost`.
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

/// A registry given on a daemon's command line: `http://host:port` (plain HTTP),
/// `https://host` or a bare `host[:port]` (plain HTTP only if `plain_http`). Answers the
/// `host[:port]` and whether to speak plain HTTP.
pub fn parse_registry_url(input: &str, plain_http: bool) -> Result<(String, bool), Error> {
    let (host, plain) = match input.split_once("://") {
        Some(("http", rest)) => (rest.trim_end_matches('/'), true),
        Some(("https", rest)) => (rest.trim_end_matches('/'), false),
        Some((scheme, _)) => {
            return Err(Error::Usage(format!(
                "registry {input:?}: unknown scheme {scheme:?} (use http:// or https://)"
            )))
        }
        None => (input, plain_http),
    };
    if !is_valid_host(host) {
        return Err(Error::Usage(format!("registry {input:?}: {host:?} is not a host[:port]")));
    }
    Ok((host.to_owned(), plain))
}

/// `host[:port]` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub(crate) fn is_valid_host(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return false };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return false,
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_on_command_lines() {
        assert_eq!(
            parse_registry_url("http://127.0.0.1:5000/", false).unwrap(),
            ("127.0.0.1:5000".into(), true)
        );
        assert_eq!(
            parse_registry_url("https://registry.example", true).unwrap(),
            ("registry.example".into(), false)
        );
        assert_eq!(parse_registry_url("localhost:5000", true).unwrap(), ("localhost:5000".into(), true));
        assert!(parse_registry_url("ftp://x", false).is_err());
        assert!(parse_registry_url("http://", false).is_err());
        assert!(parse_registry_url("http://a/b", false).is_err());
    }

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn full_references_parse() {
        let r = Reference::parse("localhost:5000/functions/hello:rev-2").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "functions/hello");
        assert_eq!(r.tag(), Some("rev-2"));
        assert_eq!(r.manifest_reference(), "rev-2");
        assert_eq!(r.to_string(), "localhost:5000/functions/hello:rev-2");

        let r = Reference::parse(&format!("registry.example.com/a@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_reference(), D);

        let r = Reference::parse(&format!("127.0.0.1:5000/a:t@{D}")).unwrap();
        assert_eq!((r.tag(), r.digest().map(|d| d.to_string())), (Some("t"), Some(D.to_owned())));
        assert_eq!(r.manifest_reference(), D);

        let r = Reference::parse("[::1]:5000/x").unwrap();
        assert_eq!((r.registry(), r.manifest_reference().as_str()), ("[::1]:5000", DEFAULT_TAG));
        assert_eq!(Reference::parse("localhost/x").unwrap().registry(), "localhost");
    }

    #[test]
    fn default_registry_applies_only_without_a_host() {
        let r = Reference::parse_with_default("fn/hello:v1", Some("reg:5000")).unwrap();
        assert_eq!(r.to_string(), "reg:5000/fn/hello:v1");
        let r = Reference::parse_with_default("other:80/fn:v1", Some("reg:5000")).unwrap();
        assert_eq!(r.registry(), "other:80");
        assert!(Reference::parse("fn/hello:v1").is_err());
    }

    #[test]
    fn bad_references_are_usage_errors() {
        for bad in [
            "",
            "localhost:5000/",
            "localhost:5000/UPPER:v1",
            "localhost:5000/a:bad/tag",
            "localhost:5000/a:-x",
            "localhost:5000/a@sha256:short",
            "localhost:99999/a",
            "bad_host.com/a",
            "localhost:5000/a/../b",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.is_usage(), "{bad}: {e}");
        }
    }
}

//! Credentials and authentication challenges: Docker's `config.json` (found the way docker,
//! oras and skopeo find it) and the `WWW-Authenticate` header of the OCI token flow.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// Credentials from `THAW_REGISTRY_USER` with `THAW_REGISTRY_PASSWORD` or
/// `THAW_REGISTRY_PASSWORD_FILE` (a file holding the password; a trailing newline is
/// dropped): how daemons (node cache, extender) log in with their own account.
pub fn credentials_from_env() -> Result<Option<Credentials>> {
    let Some(username) = std::env::var("THAW_REGISTRY_USER").ok().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let password = match (std::env::var("THAW_REGISTRY_PASSWORD"), std::env::var_os("THAW_REGISTRY_PASSWORD_FILE")) {
        (Ok(p), _) => p,
        (Err(_), Some(path)) => {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
            text.trim_end_matches(['\n', '\r']).to_owned()
        }
        (Err(_), None) => {
            return Err(Error::Config(format!(
                "THAW_REGISTRY_USER={username} is set but neither THAW_REGISTRY_PASSWORD nor THAW_REGISTRY_PASSWORD_FILE is"
            )))
        }
    };
    Ok(Some(Credentials { username, password }))
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// The registry key a `config.json` entry applies to: scheme and path stripped, Docker Hub's
/// many names folded into one.
fn normalize_host(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => k,
    }
}

fn decode_auth_field(host: &str, path: &Path, auth: &str) -> Result<Credentials> {
    let bad = |why: &str| {
        Error::Config(format!("{}: the auth entry for {host} is unusable: {why}", path.display()))
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad("`auth` is not base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?;
    let (user, pass) = text.split_once(':').ok_or_else(|| bad("`auth` is not user:password"))?;
    Ok(Credentials { username: user.to_owned(), password: pass.to_owned() })
}

/// The credentials stored for `host` in the Docker config file at `path`, if any. A missing
/// file means no credentials. Credential helpers (`credsStore`, `credHelpers`) are not run.
pub fn credentials_from_config(path: &Path, host: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
    let wanted = normalize_host(host);
    let Some(auths) = config.get("auths").and_then(Value::as_object) else { return Ok(None) };
    for (key, entry) in auths {
        if normalize_host(key) != wanted {
            continue;
        }
        if let Some(auth) = entry.get("auth").and_then(Value::as_str).filter(|a| !a.is_empty()) {
            return decode_auth_field(host, path, auth).map(Some);
        }
        if let (Some(u), Some(p)) =
            (entry.get("username").and_then(Value::as_str), entry.get("password").and_then(Value::as_str))
        {
            return Ok(Some(Credentials { username: u.to_owned(), password: p.to_owned() }));
        }
    }
    if config.get("credsStore").is_some() || config.get("credHelpers").is_some() {
        tracing::warn!(
            config = %path.display(),
            "credential helpers are not supported; store credentials inline with `thaw login`"
        );
    }
    Ok(None)
}

/// Stores `creds` for `host` in the Docker config file at `path` (created with mode 0600),
/// keeping every other setting in it. The file is replaced atomically.
pub fn save_credentials(path: &Path, host: &str, creds: &Credentials) -> Result<()> {
    let mut config: Value = match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::Config(format!("{} does not hold a JSON object", path.display())))?;
    let auths = obj.entry("auths").or_insert_with(|| json!({}));
    let auths = auths
        .as_object_mut()
        .ok_or_else(|| Error::Config(format!("{}: `auths` is not an object", path.display())))?;
    let raw = format!("{}:{}", creds.username, creds.password);
    let wanted = normalize_host(host);
    auths.retain(|k, _| normalize_host(k) != wanted);
    auths.insert(host.to_owned(), json!({ "auth": base64::engine::general_purpose::STANDARD.encode(raw) }));
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let tmp = dir.join(format!(".config.json.thaw-{}", std::process::id()));
    let body = serde_json::to_vec_pretty(&config).expect("a JSON value serializes");
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

/// An authentication challenge from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Basic realm="…"`.
    Basic,
    /// `Bearer realm="…",service="…",scope="…"`.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter, if given.
        service: Option<String>,
        /// `scope` parameter, if given.
        scope: Option<String>,
    },
}

/// Parses the first Basic or Bearer challenge of a `WWW-Authenticate` value.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `key=value, key="quoted, value"` pairs; keys lowercased.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge("bearer realm=http://x/t"),
            Some(Challenge::Bearer { realm: "http://x/t".into(), service: None, scope: None })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn config_round_trip_keeps_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}},"psFormat":"table"}"#,
        )
        .unwrap();
        assert_eq!(
            credentials_from_config(&path, "registry-1.docker.io").unwrap(),
            Some(Credentials { username: "u".into(), password: "p".into() })
        );
        assert_eq!(credentials_from_config(&path, "localhost:5000").unwrap(), None);
        let creds = Credentials { username: "alice".into(), password: "s3:cret".into() };
        save_credentials(&path, "localhost:5000", &creds).unwrap();
        assert_eq!(credentials_from_config(&path, "localhost:5000").unwrap(), Some(creds));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("psFormat") && text.contains("index.docker.io"));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(credentials_from_config(&dir.path().join("none.json"), "x").unwrap(), None);
        assert!(format!("{:?}", Credentials { username: "a".into(), password: "secret".into() })
            .contains("redacted"));
    }
}

//! Authentication and authorization: an htpasswd user file (bcrypt), per-repository grants,
//! the Docker/OCI bearer-token flow with a built-in token issuer, and plain Basic auth.
//!
//! With no [`Auth`] configured the registry is open, as before. With one, every request is
//! mapped to what it needs ([`required_access`]) and checked by the middleware in `layer`
//! before any handler runs. The config format is in docs/OPERATIONS.md; the token endpoint,
//! scopes and the route → action table are in docs/API.md.

mod layer;
mod token;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::http::Method;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::routes::{Query, Route};

pub(crate) use layer::authorize;
pub use layer::{parse_authorization, Credentials};
pub use token::{Claims, ScopeGrant, TokenError};

/// Default lifetime of issued tokens.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Default `service` named in challenges and tokens.
pub const DEFAULT_SERVICE: &str = "thaw-registry";

/// A repository action, as in a token scope (`repository:NAME:pull,push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Read manifests, blobs, tags, referrers, recipes, chunks.
    Pull,
    /// Upload blobs, chunks and manifests; probe which chunks are missing.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
}

impl Action {
    /// The scope word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Delete => "delete",
        }
    }
    fn parse(word: &str) -> Option<Self> {
        match word {
            "pull" => Some(Self::Pull),
            "push" => Some(Self::Push),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// What one request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the extension discovery document).
    Public,
    /// Any authenticated caller (`GET /v2/`, how clients discover that auth is on).
    Authenticated,
    /// An action on a repository.
    Repository(String, Action),
    /// The node directory: `read` (GET) or `write` (PUT/DELETE), scope `registry:nodes:…`.
    Nodes(&'static str),
    /// `_catalog`: admins only (scope `registry:catalog:*`).
    Catalog,
}

impl Access {
    /// The token scope that grants it, if any.
    pub fn scope(&self) -> Option<String> {
        match self {
            Self::Public | Self::Authenticated => None,
            Self::Repository(name, Action::Push) => Some(format!("repository:{name}:pull,push")),
            Self::Repository(name, action) => Some(format!("repository:{name}:{}", action.as_str())),
            Self::Nodes(action) => Some(format!("registry:nodes:{action}")),
            Self::Catalog => Some("registry:catalog:*".into()),
        }
    }
}

/// Maps a route and method to what it needs. Unknown method/route pairs need nothing here:
/// the dispatcher answers them (405/404) without touching storage.
pub fn required_access(route: &Route, method: &Method) -> Access {
    use Action::*;
    let read = matches!(*method, Method::GET | Method::HEAD);
    let repo = |name: &String, action| Access::Repository(name.clone(), action);
    match route {
        Route::Base => Access::Authenticated,
        Route::Discover => Access::Public,
        Route::Catalog => Access::Catalog,
        Route::NodeDirectory | Route::Node { .. } => Access::Nodes(if read { "read" } else { "write" }),
        Route::Manifest { name, .. } | Route::Blob { name, .. } => match *method {
            Method::DELETE => repo(name, Delete),
            Method::PUT => repo(name, Push),
            _ => repo(name, Pull),
        },
        Route::Tags { name } | Route::Referrers { name, .. } | Route::ThawRecipe { name, .. } => {
            repo(name, Pull)
        }
        // Fetching chunks is a read, even though it is a POST.
        Route::ThawFetch { name } => repo(name, Pull),
        // Dedup probes need push: a pull-only caller must not learn which chunks exist.
        Route::UploadStart { name }
        | Route::Upload { name, .. }
        | Route::ThawMissing { name }
        | Route::ThawChunks { name }
        | Route::ThawCommit { name, .. } => repo(name, Push),
    }
}

/// The repository a request would read through its query: `from` of a cross-repository
/// mount (`POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>`). The caller needs
/// pull on it, besides what [`required_access`] says; without it the auth layer drops the
/// mount. `query` must be the value the handler reads (`routes::Query`, parsed once).
pub fn mount_source(route: &Route, method: &Method, query: &Query) -> Option<Access> {
    match route {
        Route::UploadStart { .. } if *method == Method::POST => {
            query.get("from").map(|from| Access::Repository(from.to_owned(), Action::Pull))
        }
        _ => None,
    }
}

/// One grant from the config: `actions` on every repository matching `repository`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grant {
    /// User name, or `*` for every authenticated user.
    pub user: String,
    /// Repository name or glob (`*` matches any characters, `/` included): `team-a/*`.
    pub repository: String,
    /// Allowed actions.
    pub actions: Vec<Action>,
}

/// The auth config file (JSON, `--auth-config`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthFile {
    /// htpasswd file with bcrypt hashes (`htpasswd -B`), relative to the config file.
    pub htpasswd: Option<PathBuf>,
    /// Service name in challenges and tokens (default `thaw-registry`).
    pub service: Option<String>,
    /// Token realm URL; default `http[s]://<Host header>/v2/_thaw/token`.
    pub realm: Option<String>,
    /// File whose bytes are the HMAC key for tokens (at least 32 bytes). Replicas serving one
    /// bucket need the same key; without it each process draws a random key at start.
    pub token_key_file: Option<PathBuf>,
    /// Token lifetime in seconds (default 300).
    pub token_ttl_secs: Option<u64>,
    /// Per-repository grants.
    pub grants: Vec<Grant>,
    /// Repository globs anyone, even unauthenticated, may pull.
    pub anonymous_pull: Vec<String>,
    /// Users who may read the node directory (`registry:nodes:read`).
    pub nodes_read: Vec<String>,
    /// Users who may publish to the node directory (`registry:nodes:write`).
    pub nodes_write: Vec<String>,
    /// Users with every right, `_catalog` included.
    pub admins: Vec<String>,
}

/// The registry's loaded auth: users, grants and the token key.
pub struct Auth {
    users: HashMap<String, String>,
    file: AuthFile,
    service: String,
    token_key: Vec<u8>,
    token_ttl: Duration,
    tls: bool,
    /// sha256(user, password, hash) of Basic credentials already checked, so bcrypt (tens of
    /// milliseconds by design) runs once per credential, not once per request.
    verified: Mutex<BTreeSet<[u8; 32]>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .field("service", &self.service)
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

const MAX_VERIFIED_CACHE: usize = 4096;

impl Auth {
    /// Loads `path` (JSON, see docs/OPERATIONS.md) and the files it names.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading auth config {}", path.display()))?;
        let file: AuthFile =
            serde_json::from_str(&text).with_context(|| format!("parsing auth config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let users = match &file.htpasswd {
            Some(p) => {
                let p = base.join(p);
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading htpasswd {}", p.display()))?;
                parse_htpasswd(&text).with_context(|| format!("in htpasswd {}", p.display()))?
            }
            None => HashMap::new(),
        };
        let key = match &file.token_key_file {
            Some(p) => {
                let p = base.join(p);
                let key = std::fs::read(&p).with_context(|| format!("reading token key {}", p.display()))?;
                if key.len() < 32 {
                    bail!("token key {} has {} bytes; it needs at least 32", p.display(), key.len());
                }
                Some(key)
            }
            None => None,
        };
        Self::new(file, users, key)
    }

    /// Builds from a parsed config, users (name → bcrypt hash) and an optional key (random
    /// when `None`).
    pub fn new(file: AuthFile, users: HashMap<String, String>, key: Option<Vec<u8>>) -> anyhow::Result<Self> {
        for pattern in file.grants.iter().map(|g| &g.repository).chain(&file.anonymous_pull) {
            if pattern.is_empty() {
                bail!("a grant has an empty repository pattern");
            }
        }
        let token_key = key.unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        Ok(Self {
            users,
            service: file.service.clone().unwrap_or_else(|| DEFAULT_SERVICE.into()),
            token_ttl: file.token_ttl_secs.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_TTL),
            file,
            token_key,
            tls: false,
            verified: Mutex::new(BTreeSet::new()),
        })
    }

    /// Marks the registry as served over TLS (the default realm then says `https`).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Checks a user's password (bcrypt), caching successes.
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else { return false };
        let mut h = Sha256::new();
        for part in [user, password, hash] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let fingerprint: [u8; 32] = h.finalize().into();
        if self.verified.lock().expect("verified cache poisoned").contains(&fingerprint) {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok {
            let mut cache = self.verified.lock().expect("verified cache poisoned");
            if cache.len() >= MAX_VERIFIED_CACHE {
                cache.clear();
            }
            cache.insert(fingerprint);
        }
        ok
    }

    fn is_admin(&self, user: Option<&str>) -> bool {
        user.is_some_and(|u| self.file.admins.iter().any(|a| a == u))
    }

    /// Whether `user` (`None`: anonymous) may do `access` by the config.
    pub fn allows(&self, user: Option<&str>, access: &Access) -> bool {
        if self.is_admin(user) {
            return true;
        }
        match access {
            Access::Public => true,
            Access::Authenticated => user.is_some(),
            Access::Catalog => false,
            Access::Nodes(action) => {
                let list = if *action == "read" { &self.file.nodes_read } else { &self.file.nodes_write };
                user.is_some_and(|u| list.iter().any(|x| x == u))
            }
            Access::Repository(name, action) => {
                if *action == Action::Pull && self.file.anonymous_pull.iter().any(|p| glob_match(p, name)) {
                    return true;
                }
                let Some(user) = user else { return false };
                self.file.grants.iter().any(|g| {
                    (g.user == "*" || g.user == user)
                        && g.actions.contains(action)
                        && glob_match(&g.repository, name)
                })
            }
        }
    }
}

/// A bcrypt hash of `password` at `cost` (10 is `htpasswd -B`'s default), for writing a
/// user file without `htpasswd`.
pub fn hash_password(password: &str, cost: u32) -> anyhow::Result<String> {
    Ok(bcrypt::hash(password, cost)?)
}

/// Parses `user:hash` lines; only bcrypt hashes (`$2y$`, `$2a$`, `$2b$`) are accepted.
pub fn parse_htpasswd(text: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            bail!("line {}: expected user:hash", i + 1);
        };
        if !["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p)) {
            bail!("line {}: user {user:?} has no bcrypt hash (create it with htpasswd -B)", i + 1);
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// `*` matches any run of characters, `/` included; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Parses one requested scope (`repository:NAME:pull,push`, `registry:nodes:read`) into the
/// accesses it asks for; unknown types and actions are dropped, as distribution does.
pub fn parse_scope(scope: &str) -> Vec<Access> {
    let mut parts = scope.splitn(3, ':');
    let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
        return Vec::new();
    };
    let words = actions.split(',');
    match (kind, name) {
        ("repository", name) => {
            words.filter_map(Action::parse).map(|a| Access::Repository(name.to_owned(), a)).collect()
        }
        ("registry", "nodes") => words
            .filter_map(|w| match w {
                "read" => Some(Access::Nodes("read")),
                "write" => Some(Access::Nodes("write")),
                _ => None,
            })
            .collect(),
        ("registry", "catalog") => words.filter(|w| *w == "*").map(|_| Access::Catalog).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("team-a/*", "team-a/x"));
        assert!(glob_match("team-a/*", "team-a/x/y"));
        assert!(!glob_match("team-a/*", "team-ab/x"));
        assert!(!glob_match("team-a/*", "team-a"));
        assert!(glob_match("*", "anything/at/all"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
        assert!(glob_match("a*c", "abbbc"));
    }

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope("repository:a/b:pull,push,bogus"),
            vec![
                Access::Repository("a/b".into(), Action::Pull),
                Access::Repository("a/b".into(), Action::Push)
            ]
        );
        assert_eq!(parse_scope("registry:nodes:write"), vec![Access::Nodes("write")]);
        assert_eq!(parse_scope("registry:catalog:*"), vec![Access::Catalog]);
        assert!(parse_scope("garbage").is_empty());
        assert!(parse_scope("repository:x").is_empty());
    }

    #[test]
    fn htpasswd_needs_bcrypt() {
        assert!(parse_htpasswd("alice:{SHA}abc\n").is_err());
        let users = parse_htpasswd("# c\nalice:$2y$05$abcdefghijklmnopqrstuu5Oc1N6sQp2i7iFt2i4iF6wYVjQdHq\n")
            .unwrap();
        assert!(users.contains_key("alice"));
    }
}

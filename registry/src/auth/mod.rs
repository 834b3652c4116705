//! Authentication and authorization: an htpasswd user file (bcrypt), per-repository grants,
//! the Docker/OCI bearer-token flow with a built-in token issuer, and plain Basic auth.
//!
//! With no [`Auth`] configured the registry is open, as before. With one, every request is
//! mapped to what it needs ([`required_access`]) and checked by the middleware in `layer`
//! before any handler runs. The config format is in docs/OPERATIONS.md; the token endpoint,
//! scopes and the route → action table are in docs/API.md.

mod layer;
mod token;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::http::Method;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::Semaphore;

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
    /// HMAC(process key; user, password, hash) of Basic credentials checked within
    /// [`VERIFIED_TTL`], so bcrypt (tens of milliseconds by design) runs once per credential
    /// and period, not once per request. Keyed, so the cache holds nothing an attacker could
    /// test passwords against offline.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    verified_key: [u8; 32],
    /// A bcrypt hash of a random password at the users' highest cost: unknown users are
    /// checked against it, so they take as long as known ones (no user-name oracle).
    dummy_hash: String,
    /// Bounds bcrypt runs at once; they run on threads of their own, never on the blocking
    /// pool that ingest uses.
    checks: Arc<Semaphore>,
    /// How long a check waits for a thread (`--credential-wait`).
    check_wait: Duration,
}

/// Why a credential check did not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// Every credential-check thread stayed busy for [`CREDENTIAL_WAIT`].
    #[error("the registry is busy checking other credentials; retry later")]
    Busy,
}

/// Default bcrypt checks run at once (`--credential-threads`).
pub const DEFAULT_CREDENTIAL_THREADS: usize = 2;
/// How long a credential check waits for a free thread before it gives up (default of
/// `--credential-wait`).
pub const CREDENTIAL_WAIT: Duration = Duration::from_secs(10);
/// How long a verified credential is remembered.
pub const VERIFIED_TTL: Duration = Duration::from_secs(300);

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
        let cost = users.values().filter_map(|h| bcrypt_cost(h)).max().unwrap_or(4);
        let dummy_hash = bcrypt::hash(hex::encode(rand::random::<[u8; 16]>()), cost)
            .context("hashing the stand-in password for unknown users")?;
        Ok(Self {
            users,
            service: file.service.clone().unwrap_or_else(|| DEFAULT_SERVICE.into()),
            token_ttl: file.token_ttl_secs.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_TTL),
            file,
            token_key,
            tls: false,
            verified: Mutex::new(HashMap::new()),
            verified_key: rand::random(),
            dummy_hash,
            checks: Arc::new(Semaphore::new(DEFAULT_CREDENTIAL_THREADS)),
            check_wait: CREDENTIAL_WAIT,
        })
    }

    /// The same auth running at most `threads` bcrypt checks at once (at least 1).
    pub fn with_credential_threads(mut self, threads: usize) -> Self {
        self.checks = Arc::new(Semaphore::new(threads.max(1)));
        self
    }

    /// The same auth giving up on a credential check (503, retryable) after waiting `wait`
    /// for a thread.
    pub fn with_credential_wait(mut self, wait: Duration) -> Self {
        self.check_wait = wait;
        self
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

    /// Checks a user's password (bcrypt), caching successes. Blocks for the bcrypt run:
    /// call [`Auth::check_password_bounded`] from async code.
    ///
    /// An unknown user costs one bcrypt run against a stand-in hash, as a known one does.
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        let known = self.users.get(user);
        let hash = known.unwrap_or(&self.dummy_hash);
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.verified_key).expect("HMAC takes any key");
        for part in [user, password, hash] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        let fingerprint: [u8; 32] = mac.finalize().into_bytes().into();
        let now = Instant::now();
        let cached = self.verified.lock().expect("verified cache poisoned").get(&fingerprint).copied();
        if cached.is_some_and(|at| now.duration_since(at) < VERIFIED_TTL) {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && known.is_some();
        if ok {
            let mut cache = self.verified.lock().expect("verified cache poisoned");
            if cache.len() >= MAX_VERIFIED_CACHE {
                cache.retain(|_, at| now.duration_since(*at) < VERIFIED_TTL);
                if cache.len() >= MAX_VERIFIED_CACHE {
                    cache.clear();
                }
            }
            cache.insert(fingerprint, now);
        }
        ok
    }

    /// [`Auth::check_password`] on a thread of its own, at most `--credential-threads` at
    /// once; waits up to `--credential-wait` ([`CREDENTIAL_WAIT`]) for a turn. A flood of bad passwords thus costs
    /// a bounded share of the CPU and never occupies the blocking pool ingest needs.
    pub async fn check_password_bounded(
        self: &Arc<Self>,
        user: String,
        password: String,
    ) -> Result<bool, CheckError> {
        let permit = tokio::time::timeout(self.check_wait, self.checks.clone().acquire_owned())
            .await
            .map_err(|_| CheckError::Busy)?
            .map_err(|_| CheckError::Busy)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let auth = self.clone();
        let spawned = std::thread::Builder::new().name("thaw-credentials".into()).spawn(move || {
            let _turn = permit;
            let _ = tx.send(auth.check_password(&user, &password));
        });
        if spawned.is_err() {
            return Err(CheckError::Busy);
        }
        rx.await.map_err(|_| CheckError::Busy)
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

/// The cost field of a bcrypt hash (`$2y$10$…` → 10).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.get(4..6)?.parse().ok()
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
    fn unknown_users_pay_for_a_check_and_successes_are_remembered() {
        let hash = hash_password("right", 4).unwrap();
        let users = HashMap::from([("alice".to_owned(), hash)]);
        let auth = Auth::new(AuthFile::default(), users, None).unwrap();
        assert_eq!(bcrypt_cost(&auth.dummy_hash), Some(4), "the stand-in hash costs what users' do");
        assert!(!auth.check_password("bob", "right"));
        assert!(!auth.check_password("alice", "wrong"));
        assert!(auth.check_password("alice", "right"));
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
        assert!(auth.check_password("alice", "right"));
        assert!(!auth.check_password("bob", &auth.dummy_hash.clone()), "no password opens the stand-in");
    }

    #[test]
    fn htpasswd_needs_bcrypt() {
        assert!(parse_htpasswd("alice:{SHA}abc\n").is_err());
        let users = parse_htpasswd("# c\nalice:$2y$05$abcdefghijklmnopqrstuu5Oc1N6sQp2i7iFt2i4iF6wYVjQdHq\n")
            .unwrap();
        assert!(users.contains_key("alice"));
    }
}

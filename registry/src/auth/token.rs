//! Bearer tokens: `base64url(claims JSON) "." base64url(HMAC-SHA256(key, first part))`.
//! They carry the user, the granted scopes and the expiry, and are checked on every request.
//! Any replica holding the same key accepts them (docs/OPERATIONS.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{parse_scope, Access, Auth};

/// What a token grants on one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeGrant {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name, or `nodes` / `catalog`.
    pub name: String,
    /// Granted actions.
    pub actions: Vec<String>,
}

/// A token's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User name; empty for an anonymous token.
    pub sub: String,
    /// Service it was issued for.
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Granted scopes.
    pub access: Vec<ScopeGrant>,
}

impl Claims {
    /// Whether the token grants `access`.
    pub fn grants(&self, access: &Access) -> bool {
        match access {
            Access::Public | Access::Authenticated => true,
            Access::Repository(name, action) => self.has("repository", name, action.as_str()),
            Access::Nodes(action) => self.has("registry", "nodes", action),
            Access::Catalog => self.has("registry", "catalog", "*"),
        }
    }
    fn has(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access.iter().any(|g| g.kind == kind && g.name == name && g.actions.iter().any(|a| a == action))
    }
    /// The user, `None` for anonymous.
    pub fn user(&self) -> Option<&str> {
        (!self.sub.is_empty()).then_some(self.sub.as_str())
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not `payload.signature` in base64url, or the payload is not claims JSON.
    Malformed,
    /// The HMAC does not verify under this registry's key.
    BadSignature,
    /// Past its `exp`.
    Expired,
    /// Issued for another `service` (`aud`).
    WrongService,
}

impl std::error::Error for TokenError {}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed bearer token",
            Self::BadSignature => "bearer token signature does not verify",
            Self::Expired => "bearer token has expired",
            Self::WrongService => "bearer token was issued for another service",
        })
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

impl Auth {
    /// Issues a token for `user` (`None`: anonymous) granting the intersection of the
    /// requested `scopes` and what the config allows that user.
    pub fn issue(&self, user: Option<&str>, scopes: &[String]) -> (String, Claims) {
        let mut access: Vec<ScopeGrant> = Vec::new();
        for requested in scopes.iter().flat_map(|s| s.split(' ')).flat_map(parse_scope) {
            if !self.allows(user, &requested) {
                continue;
            }
            let (kind, name, action) = match &requested {
                Access::Repository(name, action) => ("repository", name.clone(), action.as_str().to_owned()),
                Access::Nodes(action) => ("registry", "nodes".to_owned(), (*action).to_owned()),
                Access::Catalog => ("registry", "catalog".to_owned(), "*".to_owned()),
                Access::Public | Access::Authenticated => continue,
            };
            match access.iter_mut().find(|g| g.kind == kind && g.name == name) {
                Some(g) if !g.actions.contains(&action) => g.actions.push(action),
                Some(_) => {}
                None => access.push(ScopeGrant { kind: kind.into(), name, actions: vec![action] }),
            }
        }
        let iat = now_secs();
        let claims = Claims {
            sub: user.unwrap_or_default().to_owned(),
            aud: self.service.clone(),
            iat,
            exp: iat + self.token_ttl.as_secs(),
            access,
        };
        (self.sign(&claims), claims)
    }

    /// Signs `claims` into a token (also used by tests to mint expired tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let mut m = mac(&self.token_key);
        m.update(payload.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// Checks a token's signature (in constant time), service and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let (payload, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TokenError::Malformed)?;
        let mut m = mac(&self.token_key);
        m.update(payload.as_bytes());
        m.verify_slice(&signature).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.aud != self.service {
            return Err(TokenError::WrongService);
        }
        if claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The token lifetime.
    pub fn token_ttl(&self) -> Duration {
        self.token_ttl
    }
}

/// `2026-12-01T23:37:11Z` for Unix seconds (distribution's `issued_at` is RFC 3339).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_168_231), "2026-12-01T23:37:11Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}

//! The auth middleware: serves the token endpoint, identifies the caller (Bearer token,
//! Basic credentials or nobody) and lets a request through only with the access its route
//! needs. Unauthenticated refusals are 401 `UNAUTHORIZED` with a Bearer challenge naming the
//! scope to ask for; authenticated callers without the right get 403 `DENIED`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use thaw_schema::ErrorCode;

use super::token::{now_secs, rfc3339};
use super::{mount_source, required_access, Access, Auth, Claims};
use crate::error::ApiError;
use crate::routes::{self, Query};

/// Path of the built-in token endpoint.
pub(super) const TOKEN_PATH: &str = "/v2/_thaw/token";

/// Who is calling.
enum Caller {
    Anonymous,
    /// Credentials were sent but do not verify.
    Invalid(String),
    /// Basic credentials were sent but no credential-check thread was free in time: nothing
    /// is known about them, so the answer is a retryable 503, not a 401 (an honest client
    /// must not fail because an attacker keeps the bcrypt threads busy).
    Busy(String),
    Basic(String),
    Bearer(Claims),
}

impl Caller {
    fn user(&self) -> Option<&str> {
        match self {
            Self::Basic(user) => Some(user),
            Self::Bearer(claims) => claims.user(),
            Self::Anonymous | Self::Invalid(_) | Self::Busy(_) => None,
        }
    }
}

/// The middleware (installed with `axum::middleware::from_fn_with_state`).
pub(crate) async fn authorize(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path == TOKEN_PATH {
        let (parts, _body) = request.into_parts();
        return token_endpoint(&auth, &parts.method, &parts.uri, &parts.headers).await;
    }
    // Paths that do not parse need nothing: the dispatcher refuses them with 404/400
    // without touching storage.
    let Ok(route) = routes::parse(&path) else { return next.run(request).await };
    // The query is parsed here, once; the handler gets this very value (an extension), so
    // what is authorized below is exactly what it reads.
    let mut query = match Query::parse(request.uri().query().unwrap_or(""), &[]) {
        Ok(query) => query,
        Err(e) => return e.into_response(),
    };
    let access = required_access(&route, request.method());
    let caller = identify(&auth, request.headers()).await;
    if let Caller::Busy(why) = &caller {
        return credentials_busy(why);
    }
    if let Some(refusal) = decide(&auth, &caller, &access, request.headers()) {
        return refusal;
    }
    if let Some(source) = mount_source(&route, request.method(), &query) {
        if !may(&auth, &caller, &source) {
            // A mount from a repository the caller may not pull becomes a plain upload
            // session (the spec's fallback), so a mount cannot read another tenant's blob.
            query.remove("mount");
            query.remove("from");
        }
    }
    request.extensions_mut().insert(query);
    next.run(request).await
}

/// Whether an already identified caller may do `access` (by its token or by the config).
fn may(auth: &Auth, caller: &Caller, access: &Access) -> bool {
    match caller {
        Caller::Bearer(claims) => claims.grants(access) || auth.allows(None, access),
        Caller::Invalid(_) | Caller::Busy(_) => false,
        other => auth.allows(other.user(), access),
    }
}

/// `None` lets the caller through; otherwise the refusal: 401 (with a challenge) or 403.
fn decide(auth: &Auth, caller: &Caller, access: &Access, headers: &HeaderMap) -> Option<Response> {
    let challenge_with = |code: ErrorCode, error: Option<&str>, message: String| {
        let mut value = format!(r#"Bearer realm="{}",service="{}""#, realm(auth, headers), auth.service());
        if let Some(scope) = access.scope() {
            value.push_str(&format!(r#",scope="{scope}""#));
        }
        if let Some(error) = error {
            value.push_str(&format!(r#",error="{error}""#));
        }
        ApiError::new(code, message).with_header("www-authenticate", value).into_response()
    };
    let challenge = |error, message| challenge_with(ErrorCode::Unauthorized, error, message);
    let denied = |user: &str| {
        ApiError::new(ErrorCode::Denied, format!("user {user:?} may not {}", describe(access)))
            .into_response()
    };
    match caller {
        Caller::Invalid(why) => Some(challenge(Some("invalid_token"), why.clone())),
        Caller::Busy(why) => Some(credentials_busy(why)),
        Caller::Anonymous if auth.allows(None, access) => None,
        Caller::Anonymous => {
            Some(challenge(None, format!("authentication required to {}", describe(access))))
        }
        Caller::Basic(user) if auth.allows(Some(user), access) => None,
        Caller::Basic(user) => Some(denied(user)),
        Caller::Bearer(claims) if claims.grants(access) || auth.allows(None, access) => None,
        // The user may do it but the token does not say so: 403 with an
        // `insufficient_scope` challenge (RFC 6750 §3.1) naming the scope to ask for. Clients
        // that reuse one token for every request (oras-py) fetch a new one on 403, not 401.
        Caller::Bearer(claims) if auth.allows(claims.user(), access) => Some(challenge_with(
            ErrorCode::Denied,
            Some("insufficient_scope"),
            format!("the token does not grant {}", access.scope().unwrap_or_default()),
        )),
        Caller::Bearer(claims) => match claims.user() {
            Some(user) => Some(denied(user)),
            None => Some(challenge(None, format!("authentication required to {}", describe(access)))),
        },
    }
}

/// 503 with `Retry-After`: the credentials could not be checked yet (every bcrypt thread
/// stayed busy for `--credential-wait`); clients retry 503s.
fn credentials_busy(why: &str) -> Response {
    ApiError::new(ErrorCode::Unavailable, why)
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .with_header("retry-after", "1".to_owned())
        .into_response()
}

fn describe(access: &Access) -> String {
    match access {
        Access::Public | Access::Authenticated => "use this registry".into(),
        Access::Repository(name, action) => format!("{} repository {name:?}", action.as_str()),
        Access::Nodes(action) => format!("{action} the node directory"),
        Access::Catalog => "list the catalog".into(),
    }
}

/// The token realm: configured, or this registry's own endpoint as the client addressed it.
fn realm(auth: &Auth, headers: &HeaderMap) -> String {
    if let Some(realm) = &auth.file.realm {
        return realm.clone();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let scheme = if auth.tls { "https" } else { "http" };
    format!("{scheme}://{host}{TOKEN_PATH}")
}

/// What an `Authorization` header carries, parsed without checking anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Bearer <token>` (scheme case-insensitive, token trimmed).
    Bearer(String),
    /// `Basic base64(user ":" password)`; the user has no `:` (RFC 7617 §2).
    Basic {
        /// User name.
        user: String,
        /// Password (may hold `:`).
        password: String,
    },
    /// Not usable: why.
    Invalid(String),
}

/// Parses an `Authorization` header value (the one place it is parsed).
pub fn parse_authorization(value: &[u8]) -> Credentials {
    let Ok(value) = std::str::from_utf8(value) else {
        return Credentials::Invalid("unreadable Authorization header".into());
    };
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Bearer(credentials.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(credentials.trim()).ok().and_then(|b| String::from_utf8(b).ok());
        return match decoded.as_deref().and_then(|d| d.split_once(':')) {
            Some((user, password)) => {
                Credentials::Basic { user: user.to_owned(), password: password.to_owned() }
            }
            None => Credentials::Invalid("malformed Basic credentials".into()),
        };
    }
    Credentials::Invalid(format!("unsupported authorization scheme {scheme:?}"))
}

async fn identify(auth: &Arc<Auth>, headers: &HeaderMap) -> Caller {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Caller::Anonymous };
    match parse_authorization(value.as_bytes()) {
        Credentials::Bearer(token) => match auth.verify(&token) {
            Ok(claims) => Caller::Bearer(claims),
            Err(e) => Caller::Invalid(e.to_string()),
        },
        Credentials::Basic { user, password } => match check_basic(auth, user, password).await {
            Ok(Some(user)) => Caller::Basic(user),
            Ok(None) => Caller::Invalid("user name or password is wrong".into()),
            Err(busy) => Caller::Busy(busy.to_string()),
        },
        Credentials::Invalid(why) => Caller::Invalid(why),
    }
}

/// Checks Basic credentials; bcrypt runs on the bounded credential threads.
async fn check_basic(
    auth: &Arc<Auth>,
    user: String,
    password: String,
) -> Result<Option<String>, super::CheckError> {
    Ok(auth.check_password_bounded(user.clone(), password).await?.then_some(user))
}

/// `GET /v2/_thaw/token?service=…&scope=…[&scope=…]`, optionally with Basic credentials.
async fn token_endpoint(
    auth: &Arc<Auth>,
    method: &axum::http::Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    if method != axum::http::Method::GET {
        return ApiError::new(ErrorCode::Unsupported, "the token endpoint answers GET")
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
            .into_response();
    }
    let user = match identify(auth, headers).await {
        Caller::Anonymous => None,
        Caller::Basic(user) => Some(user),
        Caller::Busy(why) => return credentials_busy(&why),
        Caller::Bearer(_) | Caller::Invalid(_) => {
            return ApiError::new(ErrorCode::Unauthorized, "user name or password is wrong")
                .with_header("www-authenticate", format!(r#"Basic realm="{}""#, auth.service()))
                .into_response();
        }
    };
    let query = match Query::parse(uri.query().unwrap_or(""), &["scope"]) {
        Ok(query) => query,
        Err(e) => return e.into_response(),
    };
    let scopes: Vec<String> = query.all("scope").map(str::to_owned).collect();
    let (token, claims) = auth.issue(user.as_deref(), &scopes);
    tracing::debug!(user = claims.sub, granted = ?claims.access, "issued token");
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": claims.exp - claims.iat,
        "issued_at": rfc3339(claims.iat.min(now_secs())),
    });
    axum::Json(body).into_response()
}

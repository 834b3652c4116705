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
use super::{required_access, Access, Action, Auth, Claims};
use crate::error::ApiError;
use crate::routes::{self, Route};

/// Path of the built-in token endpoint.
pub(super) const TOKEN_PATH: &str = "/v2/_thaw/token";

/// Who is calling.
enum Caller {
    Anonymous,
    /// Credentials were sent but do not verify.
    Invalid(String),
    Basic(String),
    Bearer(Claims),
}

impl Caller {
    fn user(&self) -> Option<&str> {
        match self {
            Self::Basic(user) => Some(user),
            Self::Bearer(claims) => claims.user(),
            Self::Anonymous | Self::Invalid(_) => None,
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
    let access = required_access(&route, request.method());
    let caller = identify(&auth, request.headers()).await;
    if let Some(refusal) = decide(&auth, &caller, &access, request.headers()) {
        return refusal;
    }
    if let Route::UploadStart { .. } = route {
        drop_unreadable_mount(&auth, &caller, &mut request);
    }
    next.run(request).await
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

async fn identify(auth: &Arc<Auth>, headers: &HeaderMap) -> Caller {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Caller::Anonymous };
    let Ok(value) = value.to_str() else { return Caller::Invalid("unreadable Authorization header".into()) };
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return match auth.verify(credentials.trim()) {
            Ok(claims) => Caller::Bearer(claims),
            Err(e) => Caller::Invalid(e.to_string()),
        };
    }
    if scheme.eq_ignore_ascii_case("basic") {
        return match check_basic(auth, credentials.trim()).await {
            Ok(Some(user)) => Caller::Basic(user),
            Ok(None) => Caller::Invalid("user name or password is wrong".into()),
            Err(busy) => Caller::Invalid(busy.to_string()),
        };
    }
    Caller::Invalid(format!("unsupported authorization scheme {scheme:?}"))
}

/// Decodes and checks Basic credentials; bcrypt runs on the bounded credential threads.
async fn check_basic(auth: &Arc<Auth>, encoded: &str) -> Result<Option<String>, super::CheckError> {
    let Some((user, password)) = STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
    else {
        return Ok(None);
    };
    Ok(auth.check_password_bounded(user.clone(), password).await?.then_some(user))
}

/// A cross-repository mount from a repository the caller may not pull becomes a plain
/// upload session (the spec's fallback), so a mount cannot read another tenant's blob.
fn drop_unreadable_mount(auth: &Auth, caller: &Caller, request: &mut Request) {
    let query = request.uri().query().unwrap_or("").to_owned();
    let pairs = crate::handlers::query_pairs(&query);
    let Some(from) = pairs.iter().find(|(k, _)| k == "from").map(|(_, v)| v.clone()) else { return };
    let readable = Access::Repository(from, Action::Pull);
    let allowed = match caller {
        Caller::Bearer(claims) => claims.grants(&readable) || auth.allows(None, &readable),
        other => auth.allows(other.user(), &readable),
    };
    if allowed {
        return;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.starts_with("mount=") && !kv.starts_with("from=") && !kv.is_empty())
        .collect();
    let path_and_query = if kept.is_empty() {
        request.uri().path().to_owned()
    } else {
        format!("{}?{}", request.uri().path(), kept.join("&"))
    };
    if let Ok(uri) = path_and_query.parse::<Uri>() {
        *request.uri_mut() = uri;
    }
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
        Caller::Bearer(_) | Caller::Invalid(_) => {
            return ApiError::new(ErrorCode::Unauthorized, "user name or password is wrong")
                .with_header("www-authenticate", format!(r#"Basic realm="{}""#, auth.service()))
                .into_response();
        }
    };
    let pairs = crate::handlers::query_pairs(uri.query().unwrap_or(""));
    let scopes: Vec<String> = pairs.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
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

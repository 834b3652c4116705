//! The one table of OCI error codes and their HTTP statuses (distribution-spec "Error Codes").

use serde::{Deserialize, Serialize};

/// An OCI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Blob unknown to the registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to the registry.
    BlobUploadUnknown,
    /// Provided digest did not match the content.
    DigestInvalid,
    /// A blob a manifest references is unknown.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known.
    NameUnknown,
    /// Content length or size does not match or is over a limit.
    SizeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Access denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// An unexpected server-side failure (distribution's `UNKNOWN`).
    Unknown,
    /// The storage backend is unreachable or failing; retry later (distribution's `UNAVAILABLE`).
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears in error bodies.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::Unknown => "UNKNOWN",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    /// The HTTP status the code is sent with unless a handler has a more specific one
    /// (413 for an oversized body, 416 for a bad range).
    pub const fn status(self) -> u16 {
        match self {
            Self::BlobUnknown | Self::BlobUploadUnknown | Self::ManifestUnknown | Self::NameUnknown => 404,
            Self::BlobUploadInvalid
            | Self::DigestInvalid
            | Self::ManifestBlobUnknown
            | Self::ManifestInvalid
            | Self::NameInvalid
            | Self::SizeInvalid => 400,
            Self::Unauthorized => 401,
            Self::Denied => 403,
            Self::Unsupported => 405,
            Self::TooManyRequests => 429,
            Self::Unknown => 500,
            Self::Unavailable => 503,
        }
    }

    /// The spec's short message for the code.
    pub const fn message(self) -> &'static str {
        match self {
            Self::BlobUnknown => "blob unknown to registry",
            Self::BlobUploadInvalid => "blob upload invalid",
            Self::BlobUploadUnknown => "blob upload unknown to registry",
            Self::DigestInvalid => "provided digest did not match uploaded content",
            Self::ManifestBlobUnknown => "manifest references a blob unknown to registry",
            Self::ManifestInvalid => "manifest invalid",
            Self::ManifestUnknown => "manifest unknown",
            Self::NameInvalid => "invalid repository name",
            Self::NameUnknown => "repository name not known to registry",
            Self::SizeInvalid => "provided length did not match content length",
            Self::Unauthorized => "authentication required",
            Self::Denied => "requested access to the resource is denied",
            Self::Unsupported => "the operation is unsupported",
            Self::TooManyRequests => "too many requests",
            Self::Unknown => "unknown error",
            Self::Unavailable => "service unavailable",
        }
    }

    /// Parses a code from an error body.
    pub fn parse(s: &str) -> Option<Self> {
        ALL_CODES.into_iter().find(|c| c.as_str() == s)
    }
}

const ALL_CODES: [ErrorCode; 16] = [
    ErrorCode::BlobUnknown,
    ErrorCode::BlobUploadInvalid,
    ErrorCode::BlobUploadUnknown,
    ErrorCode::DigestInvalid,
    ErrorCode::ManifestBlobUnknown,
    ErrorCode::ManifestInvalid,
    ErrorCode::ManifestUnknown,
    ErrorCode::NameInvalid,
    ErrorCode::NameUnknown,
    ErrorCode::SizeInvalid,
    ErrorCode::Unauthorized,
    ErrorCode::Denied,
    ErrorCode::Unsupported,
    ErrorCode::TooManyRequests,
    ErrorCode::Unknown,
    ErrorCode::Unavailable,
];

/// One entry of an error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The code, e.g. `BLOB_UNKNOWN`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Unstructured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The spec's error body: `{"errors": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The errors.
    pub errors: Vec<ErrorInfo>,
}

impl ErrorResponse {
    /// A body with one error.
    pub fn single(code: ErrorCode, message: impl Into<String>, detail: Option<serde_json::Value>) -> Self {
        Self { errors: vec![ErrorInfo { code: code.as_str().to_owned(), message: message.into(), detail }] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for c in ALL_CODES {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!((400..600).contains(&c.status()));
        }
        let body =
            serde_json::to_string(&ErrorResponse::single(ErrorCode::DigestInvalid, "x", None)).unwrap();
        assert_eq!(body, r#"{"errors":[{"code":"DIGEST_INVALID","message":"x"}]}"#);
    }
}

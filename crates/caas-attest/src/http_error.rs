//! The one error answer of caas's internal HTTP APIs (the registrar and verifier, the TTP and
//! scheduler, the host agent): a status from the one [`ErrorKind`] → status mapping and the
//! JSON body [`ErrorBody`] `{"code", "message"}`. Each service only classifies its own error
//! ([`HttpError::new`]: kind, stable code, public message); none builds a body or picks a
//! status itself. Internal failures answer [`HttpError::internal`], whose message never
//! carries the detail (paths, storage or crypto errors stay in the service's log).
//!
//! (The key service's AWS KMS protocol keeps its own wire format: `caas_kms::KmsError`.)

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What kind of failure: decides the HTTP status, in [`ErrorKind::status`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or invalid (400).
    BadRequest,
    /// No or invalid credentials (401).
    Unauthenticated,
    /// Authenticated, or checked, and refused (403).
    Forbidden,
    /// The named object does not exist (404).
    NotFound,
    /// A peer this service depends on failed or refused (502).
    Upstream,
    /// A local resource is unavailable (TPM, isolation) (503).
    Unavailable,
    /// Anything else (500); the message is never the detail.
    Internal,
}

impl ErrorKind {
    /// The HTTP status of this kind: the one mapping.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Upstream => StatusCode::BAD_GATEWAY,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code (`malformed`, `not_found`, `bad_signature`, ...).
    pub code: String,
    /// Human-readable, non-secret message.
    pub message: String,
}

/// An error answer: kind (→ status), code and public message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    kind: ErrorKind,
    body: ErrorBody,
}

impl HttpError {
    /// An answer of `kind` with a stable `code` and a public `message`.
    pub fn new(kind: ErrorKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
            },
        }
    }

    /// An internal failure: code `code`, message `internal error` (the detail is logged by
    /// the service, never sent).
    pub fn internal(code: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, code, "internal error")
    }

    /// The kind.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.kind.status(), Json(self.body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_status_per_kind_and_the_body_shape() {
        assert_eq!(ErrorKind::BadRequest.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            ErrorKind::Unauthenticated.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(ErrorKind::Forbidden.status(), StatusCode::FORBIDDEN);
        assert_eq!(ErrorKind::NotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorKind::Upstream.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ErrorKind::Unavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ErrorKind::Internal.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let e = HttpError::internal("internal");
        assert_eq!(e.body().message, "internal error");
        let json = serde_json::to_value(e.body()).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"code": "internal", "message": "internal error"})
        );
        let r = HttpError::new(ErrorKind::NotFound, "not_found", "no host h").into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}

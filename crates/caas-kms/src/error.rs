//! The key service's error type and its single mapping onto the AWS KMS wire: the
//! `__type` name that the SDKs turn into an exception class, and the HTTP status.
//! Messages are precise but never contain key material, plaintext or internal paths.
use thiserror::Error;

/// An error answered to a KMS client.
#[derive(Debug, Error)]
pub enum KmsError {
    /// Bad parameter value, type, or missing required parameter (HTTP 400).
    #[error("{0}")]
    Validation(String),
    /// The request body is not valid JSON (HTTP 400, `SerializationException`).
    #[error("{0}")]
    Serialization(String),
    /// The named key, alias, grant or resource does not exist (HTTP 400).
    #[error("{0}")]
    NotFound(String),
    /// The key is disabled (HTTP 400).
    #[error("{0}")]
    Disabled(String),
    /// The key's state does not allow the operation (HTTP 400).
    #[error("{0}")]
    InvalidState(String),
    /// The ciphertext is malformed, tampered, or was encrypted under another context (HTTP 400).
    #[error("{0}")]
    InvalidCiphertext(String),
    /// The ciphertext was produced under another key than the one named (HTTP 400).
    #[error("{0}")]
    IncorrectKey(String),
    /// The key's usage or spec does not support the operation (HTTP 400).
    #[error("{0}")]
    InvalidKeyUsage(String),
    /// The signature or MAC does not verify (HTTP 400, `KMSInvalidSignatureException`/`KMSInvalidMacException`).
    #[error("{0}")]
    InvalidSignature(String),
    /// MAC verification failed.
    #[error("{0}")]
    InvalidMac(String),
    /// The alias already exists (HTTP 400).
    #[error("{0}")]
    AlreadyExists(String),
    /// Grant token invalid (HTTP 400).
    #[error("{0}")]
    InvalidGrantToken(String),
    /// Grant id invalid (HTTP 400).
    #[error("{0}")]
    InvalidGrantId(String),
    /// Bad alias name (HTTP 400).
    #[error("{0}")]
    InvalidAliasName(String),
    /// Malformed policy document (HTTP 400).
    #[error("{0}")]
    MalformedPolicyDocument(String),
    /// Import token invalid or expired (HTTP 400).
    #[error("{0}")]
    InvalidImportToken(String),
    /// Imported key material does not match the key's previous material (HTTP 400).
    #[error("{0}")]
    IncorrectKeyMaterial(String),
    /// Imported key material could not be unwrapped (HTTP 400).
    #[error("{0}")]
    ExpiredImportToken(String),
    /// The operation is not supported for this key (HTTP 400).
    #[error("{0}")]
    UnsupportedOperation(String),
    /// The caller is not allowed to do this (HTTP 400, `AccessDeniedException`).
    #[error("{0}")]
    AccessDenied(String),
    /// SigV4 authentication failed: unknown access key (HTTP 400, `UnrecognizedClientException`).
    #[error("{0}")]
    UnrecognizedClient(String),
    /// SigV4 authentication failed: bad signature, or a request that contradicts its
    /// signature's scope or payload hash (HTTP 400, `InvalidSignatureException`).
    #[error("{0}")]
    SignatureMismatch(String),
    /// Request timestamp outside the 5-minute window (HTTP 400, `InvalidSignatureException`).
    #[error("{0}")]
    RequestExpired(String),
    /// No authentication at all (HTTP 400, `MissingAuthenticationTokenException`).
    #[error("{0}")]
    MissingAuthentication(String),
    /// Malformed `Authorization` header, or a required header not signed (HTTP 400,
    /// `IncompleteSignatureException`).
    #[error("{0}")]
    IncompleteSignature(String),
    /// Unknown `X-Amz-Target` operation (HTTP 400, `UnknownOperationException`).
    #[error("{0}")]
    UnknownOperation(String),
    /// Concurrent modification lost the race; retry (HTTP 409 `ConflictException`).
    #[error("{0}")]
    Conflict(String),
    /// A quota or limit was exceeded (HTTP 400).
    #[error("{0}")]
    LimitExceeded(String),
    /// The request had `DryRun` set and would have succeeded (HTTP 412,
    /// `DryRunOperationException`): nothing was done.
    #[error("The request would have succeeded, but the DryRun option is set.")]
    DryRun,
    /// A key ARN (or id) is malformed where only those are accepted (HTTP 400).
    #[error("{0}")]
    InvalidArn(String),
    /// Internal failure (HTTP 500, `KMSInternalException`); details are logged, not returned.
    #[error("{0}")]
    Internal(String),
    /// A stored record the request needed failed its integrity check (it was changed
    /// outside the key service) and was not used (HTTP 500, `KMSInternalException`). The
    /// message says so without naming the row; the audit record names it.
    #[error(
        "A stored record needed by this request failed its integrity check and was not used; the request was refused"
    )]
    Integrity(caas_store::RowRef),
}

impl KmsError {
    /// The AWS error code (`__type`).
    pub fn code(&self) -> &'static str {
        use KmsError::*;
        match self {
            Validation(_) => "ValidationException",
            Serialization(_) => "SerializationException",
            NotFound(_) => "NotFoundException",
            Disabled(_) => "DisabledException",
            InvalidState(_) => "KMSInvalidStateException",
            InvalidCiphertext(_) => "InvalidCiphertextException",
            IncorrectKey(_) => "IncorrectKeyException",
            InvalidKeyUsage(_) => "InvalidKeyUsageException",
            InvalidSignature(_) => "KMSInvalidSignatureException",
            InvalidMac(_) => "KMSInvalidMacException",
            AlreadyExists(_) => "AlreadyExistsException",
            InvalidGrantToken(_) => "InvalidGrantTokenException",
            InvalidGrantId(_) => "InvalidGrantIdException",
            InvalidAliasName(_) => "InvalidAliasNameException",
            MalformedPolicyDocument(_) => "MalformedPolicyDocumentException",
            InvalidImportToken(_) => "InvalidImportTokenException",
            IncorrectKeyMaterial(_) => "IncorrectKeyMaterialException",
            ExpiredImportToken(_) => "ExpiredImportTokenException",
            UnsupportedOperation(_) => "UnsupportedOperationException",
            AccessDenied(_) => "AccessDeniedException",
            UnrecognizedClient(_) => "UnrecognizedClientException",
            SignatureMismatch(_) => "InvalidSignatureException",
            RequestExpired(_) => "InvalidSignatureException",
            MissingAuthentication(_) => "MissingAuthenticationTokenException",
            IncompleteSignature(_) => "IncompleteSignatureException",
            UnknownOperation(_) => "UnknownOperationException",
            Conflict(_) => "ConflictException",
            LimitExceeded(_) => "LimitExceededException",
            DryRun => "DryRunOperationException",
            InvalidArn(_) => "InvalidArnException",
            Internal(_) | Integrity(_) => "KMSInternalException",
        }
    }

    /// The HTTP status AWS uses for this error.
    pub fn status(&self) -> u16 {
        match self {
            KmsError::Internal(_) | KmsError::Integrity(_) => 500,
            KmsError::Conflict(_) => 409,
            KmsError::DryRun => 412,
            _ => 400,
        }
    }

    /// The JSON error body (`{"__type": ..., "message": ...}`).
    pub fn body(&self) -> String {
        serde_json::json!({ "__type": self.code(), "message": self.to_string() }).to_string()
    }

    /// Short constructor for "key not found".
    pub fn key_not_found(id: &str) -> Self {
        KmsError::NotFound(format!("Key '{id}' does not exist"))
    }

    /// Wraps a storage failure without exposing internals to the client.
    pub fn store(e: caas_store::Error) -> Self {
        match e {
            caas_store::Error::Conflict { .. } => {
                KmsError::Conflict("Concurrent modification; retry the request".into())
            }
            caas_store::Error::Integrity { kind, account, id } => {
                KmsError::Integrity(caas_store::RowRef { kind, account, id })
            }
            other => {
                tracing::error!(error = %other, "store failure");
                KmsError::Internal("Internal storage failure".into())
            }
        }
    }

    /// The audit detail naming the row of an integrity failure (`None` for other errors).
    pub fn integrity_detail(&self) -> Option<serde_json::Value> {
        match self {
            KmsError::Integrity(r) => Some(serde_json::json!({
                "kind": r.kind, "account": r.account, "id": r.id,
            })),
            _ => None,
        }
    }

    /// A record whose content contradicts the row it is stored in (the store's MAC held, so
    /// only a bug could cause it): refused like a failed integrity check.
    pub fn mismatch(kind: &str, account: &str, id: &str) -> Self {
        tracing::error!(kind, account, id, "stored record does not match its row");
        KmsError::Integrity(caas_store::RowRef {
            kind: kind.into(),
            account: account.into(),
            id: id.into(),
        })
    }

    /// Wraps a crypto failure of the service's own key hierarchy.
    pub fn internal_crypto(what: &str) -> Self {
        tracing::error!(what, "key hierarchy failure");
        KmsError::Internal("Internal cryptographic failure".into())
    }
}

/// Result alias of the key service.
pub type KmsResult<T> = Result<T, KmsError>;

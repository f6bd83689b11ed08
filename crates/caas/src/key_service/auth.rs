//! Authentication of every key-service route, in one place: the route table [`ROUTES`]
//! (who may call each route) and the axum middleware [`authenticate`] that enforces it
//! before any handler runs — and, for signed routes, before the body is parsed.
//!
//! - **Public** (no credentials): `GET /healthz`, `GET /v1/tl/ttp` (pk_TTP),
//!   `GET /v1/audit/public-key`.
//! - **Host protocol** (authenticated by the message and, over TLS, by the channel):
//!   `POST /v1/attest/enroll` and `/v1/attest/enroll/finish` — the Privacy-CA protocol is
//!   the authentication (the EK certificate must chain to a configured TPM vendor CA and
//!   only that TPM can activate the credential; nothing is trusted before `finish`);
//!   `POST /v1/tl/attest`, `/v1/tl/domkey`, `/v1/tl/epoch`, `/v1/tl/migrate`, `/v1/tl/suspend`, `/v1/tl/resume`, `/v1/tl/netkey` and `/v1/tl/netkey/leave` — the body is signed by the host's enrolled,
//!   attested AK (a TPM quote over the message digest), which is the host's identity.
//!   Over TLS each of these also needs a client certificate with the `host` role
//!   ([`host_channel`], refused and audited here otherwise); the registrar binds its key to
//!   the host's AK at enrollment (the AK quotes its SPKI hash, the certificate must name
//!   the host) and the TTP serves a host only over the certificate it enrolled with
//!   (`caas_attest::tls_binding`): host B's valid certificate cannot speak for host A.
//! - **KMS** (`POST /`): SigV4 with scope service `kms`, verified by
//!   `caas_kms::server` before the body is parsed; tenants only (an operator's key is
//!   refused with `AccessDeniedException`). Errors keep the AWS shape (HTTP 400).
//! - **Everything else**: SigV4 with scope service [`caas_kms::operator::SERVICE`]
//!   (`caas`), verified here over the size-limited body bytes; then the caller's kind is
//!   checked against the route: a tenant, an operator holding a permission, or either.
//!   The caller's principal is put on the request (`caas_attest::service::Principal`) for
//!   the handlers' audit records.
//!
//! A route the router serves but this table does not list is refused to everyone
//! (`route_not_classified`): a new route cannot be served unauthenticated by accident.
//! Every refusal is caas's one internal error answer (`caas_attest::http_error`:
//! `{"code", "message"}`, 401 unauthenticated, 403 not allowed) and audited in the key service's chain (operation `HTTP <METHOD> <route>`).
use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use caas_attest::http_error::{ErrorKind, HttpError};
use caas_kms::operator::{CallerKind, Permission};
use caas_kms::{Caller, Kms, KmsError};
use std::sync::Arc;

/// Largest body of a signed key-service route (profiles and launch calls are small).
pub const MAX_BODY: usize = 1 << 20;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, public keys).
    Public,
    /// Host agents; the message itself is authenticated (Privacy CA, AK signature).
    HostProtocol,
    /// The KMS API: tenant SigV4 (scope `kms`), checked by `caas_kms::server`.
    Kms,
    /// A tenant, or an operator with this permission.
    TenantOr(Permission),
    /// An operator with this permission.
    Operator(Permission),
}

impl Access {
    /// A short name for listings (`caas key-service routes`).
    pub fn describe(self) -> String {
        match self {
            Access::Public => "public".into(),
            Access::HostProtocol => "host-protocol".into(),
            Access::Kms => "kms-tenant".into(),
            Access::TenantOr(p) => format!("tenant|operator:{p}"),
            Access::Operator(p) => format!("operator:{p}"),
        }
    }
}

/// One route of the key service.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// axum path pattern.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

const fn r(method: &'static str, path: &'static str, access: Access) -> Route {
    Route {
        method,
        path,
        access,
    }
}

/// Every route the key service serves, and who may call it.
pub const ROUTES: &[Route] = &[
    // Health and public keys.
    r("GET", "/healthz", Access::Public),
    r("GET", "/v1/audit/public-key", Access::Public),
    r("GET", "/v1/tl/ttp", Access::Public),
    // The KMS API.
    r("POST", "/", Access::Kms),
    // Registrar (Privacy CA): host enrollment.
    r("POST", "/v1/attest/enroll", Access::HostProtocol),
    r("POST", "/v1/attest/enroll/finish", Access::HostProtocol),
    // Verifier and profiles: operators.
    r(
        "GET",
        "/v1/attest/hosts",
        Access::Operator(Permission::HostsRead),
    ),
    r(
        "GET",
        "/v1/attest/hosts/{name}",
        Access::Operator(Permission::HostsRead),
    ),
    r(
        "POST",
        "/v1/attest/hosts/{name}/attest",
        Access::Operator(Permission::HostsAttest),
    ),
    r(
        "PUT",
        "/v1/attest/hosts/{name}/profile",
        Access::Operator(Permission::HostsAdmit),
    ),
    r(
        "GET",
        "/v1/attest/profiles",
        Access::Operator(Permission::ProfilesRead),
    ),
    r(
        "POST",
        "/v1/attest/profiles",
        Access::Operator(Permission::ProfilesWrite),
    ),
    r(
        "GET",
        "/v1/attest/profiles/{name}",
        Access::Operator(Permission::ProfilesRead),
    ),
    r(
        "PUT",
        "/v1/attest/profiles/{name}",
        Access::Operator(Permission::ProfilesWrite),
    ),
    // TTP: AK-signed host messages; the DM-signed ACL change; a host's bind info.
    r("POST", "/v1/tl/attest", Access::HostProtocol),
    r("POST", "/v1/tl/domkey", Access::HostProtocol),
    r("POST", "/v1/tl/epoch", Access::HostProtocol),
    r("POST", "/v1/tl/migrate", Access::HostProtocol),
    r("POST", "/v1/tl/suspend", Access::HostProtocol),
    r("POST", "/v1/tl/resume", Access::HostProtocol),
    r("POST", "/v1/tl/netkey", Access::HostProtocol),
    r("POST", "/v1/tl/netkey/leave", Access::HostProtocol),
    r(
        "POST",
        "/v1/tl/netkey/rekey",
        Access::Operator(Permission::AclAdmin),
    ),
    r("PUT", "/v1/tl/acl", Access::TenantOr(Permission::AclAdmin)),
    r(
        "GET",
        "/v1/tl/hosts/{name}/bind-info",
        Access::TenantOr(Permission::HostsRead),
    ),
    // Attestation-gated release: a nonce for a host's recipient attestation document.
    r(
        "POST",
        "/v1/recipient/challenge",
        Access::TenantOr(Permission::HostsRead),
    ),
    // Scheduler.
    r(
        "POST",
        "/v1/sched/launch",
        Access::TenantOr(Permission::Schedule),
    ),
    r(
        "POST",
        "/v1/sched/migrate",
        Access::TenantOr(Permission::Schedule),
    ),
    r(
        "POST",
        "/v1/sched/suspend",
        Access::TenantOr(Permission::Schedule),
    ),
    r(
        "POST",
        "/v1/sched/resume",
        Access::TenantOr(Permission::Schedule),
    ),
];

/// The route `method path-pattern`, if listed.
pub fn find(method: &str, pattern: &str) -> Option<&'static Route> {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path == pattern)
}

/// The answer to a refused request: caas's one internal HTTP error answer.
fn refusal(kind: ErrorKind, code: &str, message: &str) -> Response {
    HttpError::new(kind, code, message).into_response()
}

/// (kind, code) of an authentication failure.
fn auth_failure(e: &KmsError) -> (ErrorKind, &'static str) {
    match e {
        KmsError::MissingAuthentication(_) => {
            (ErrorKind::Unauthenticated, "missing_authentication")
        }
        KmsError::IncompleteSignature(_) => (ErrorKind::Unauthenticated, "incomplete_signature"),
        KmsError::SignatureMismatch(_) => (ErrorKind::Unauthenticated, "invalid_signature"),
        KmsError::RequestExpired(_) => (ErrorKind::Unauthenticated, "request_expired"),
        KmsError::UnrecognizedClient(_) => (ErrorKind::Unauthenticated, "unrecognized_client"),
        KmsError::AccessDenied(_) => (ErrorKind::Forbidden, "access_denied"),
        _ => (ErrorKind::Internal, "internal"),
    }
}

/// Audits a refused request in the key service's chain.
async fn audit_refusal(
    kms: &Kms,
    route: &str,
    path: &str,
    caller: Option<&Caller>,
    code: &str,
    reason: &str,
) {
    let mut entry = caas_kms::audit::system_entry(&format!("HTTP {route}"), "");
    entry.account = caller.map_or_else(|| "-".to_string(), |c| c.account.clone());
    entry.principal = caller.map_or_else(|| "anonymous".to_string(), |c| c.principal.clone());
    entry.result = code.into();
    entry.request_id = super::attest::request_id();
    entry.detail = serde_json::json!({
        "detail": "request refused before its handler",
        "path": path.chars().take(256).collect::<String>(),
        "reason": reason.chars().take(256).collect::<String>(),
        "AccessKeyId": caller.map(|c| c.access_key_id.clone()),
    })
    .to_string();
    if let Err(e) = kms
        .store
        .commit(caas_store::Batch {
            writes: vec![],
            audit: vec![entry],
        })
        .await
    {
        tracing::error!(error = %e, "cannot audit a refused request");
    }
}

/// The channel identity of a host-protocol request. Over TLS (the accept loop put a
/// [`caas_tls::server::Peer`] on it) a client certificate with the `host` role is required,
/// and its name and SPKI hash go to the handler ([`caas_attest::tls_binding::TlsClient`]),
/// where the registrar binds them at enrollment and the TTP checks them against the
/// enrolled host. Without TLS (`caas dev`'s loopback key service): `None`, and a host whose
/// enrollment bound a certificate is then refused by the handler.
pub fn host_channel(
    peer: Option<&caas_tls::server::Peer>,
) -> Result<Option<caas_attest::tls_binding::TlsClient>, (ErrorKind, &'static str, &'static str)> {
    let Some(peer) = peer else {
        return Ok(None);
    };
    let Some(id) = &peer.identity else {
        return Err((
            ErrorKind::Unauthenticated,
            "host_certificate_required",
            "host requests need a client certificate from the deployment CA",
        ));
    };
    if !id.has(caas_tls::Role::Host) {
        return Err((
            ErrorKind::Forbidden,
            "host_role_required",
            "the client certificate does not carry the host role",
        ));
    }
    Ok(Some(caas_attest::tls_binding::TlsClient {
        cert_name: id.name.clone(),
        spki_sha256: id.spki_sha256,
    }))
}

/// May `kind` call a route with `access`?
fn allowed(access: Access, kind: &CallerKind) -> bool {
    match access {
        Access::Public | Access::HostProtocol | Access::Kms => true,
        Access::TenantOr(p) => *kind == CallerKind::Tenant || kind.allows(p),
        Access::Operator(p) => kind.allows(p),
    }
}

/// The middleware (see the module doc). Mounted with `Router::layer` over every route.
pub async fn authenticate(State(kms): State<Arc<Kms>>, req: Request, next: Next) -> Response {
    let Some(matched) = req.extensions().get::<MatchedPath>() else {
        // No route matched: the router answers 404 without running any handler.
        return next.run(req).await;
    };
    let route = find(req.method().as_str(), matched.as_str());
    // Public routes and the KMS API (which authenticates each request itself) pass
    // straight through, without a copy of the method, path or pattern.
    if route.is_some_and(|r| matches!(r.access, Access::Public | Access::Kms)) {
        return next.run(req).await;
    }
    // Everything else on the heap: this middleware's own future (moved into a box per
    // request by `from_fn`, for every route) stays small.
    let pattern = matched.as_str().to_owned();
    Box::pin(check_route(kms, route, pattern, req, next)).await
}

/// [`authenticate`] for a route that is neither public nor the KMS API (or not listed).
async fn check_route(
    kms: Arc<Kms>,
    route: Option<&'static Route>,
    pattern: String,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let label = format!("{method} {pattern}");
    let Some(route) = route else {
        let msg = "this route is not in the key service's route table";
        audit_refusal(&kms, &label, &path, None, "route_not_classified", msg).await;
        return refusal(ErrorKind::Forbidden, "route_not_classified", msg);
    };
    if route.access == Access::HostProtocol {
        let mut req = req;
        match host_channel(req.extensions().get::<caas_tls::server::Peer>()) {
            Ok(Some(client)) => {
                req.extensions_mut().insert(client);
            }
            Ok(None) => {}
            Err((kind, code, msg)) => {
                let peer = req
                    .extensions()
                    .get::<caas_tls::server::Peer>()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let reason = format!("{msg} (peer {peer})");
                audit_refusal(&kms, &label, &path, None, code, &reason).await;
                return refusal(kind, code, msg);
            }
        }
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let msg = format!("request body is larger than {MAX_BODY} bytes");
            audit_refusal(&kms, &label, &path, None, "body_too_large", &msg).await;
            return refusal(ErrorKind::BadRequest, "body_too_large", &msg);
        }
    };
    let headers = caas_kms::server::header_view(&parts.headers);
    let sreq = caas_kms::sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &body,
    };
    let caller = match kms
        .authenticate_scope(&sreq, caas_kms::operator::SERVICE, &[])
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let (kind, code) = auth_failure(&e);
            let msg = match kind {
                ErrorKind::Internal => "internal error".to_string(),
                _ => e.to_string(),
            };
            audit_refusal(&kms, &label, &path, None, code, &msg).await;
            return refusal(kind, code, &msg);
        }
    };
    if !allowed(route.access, &caller.kind) {
        let msg = format!(
            "{} may not call {label} (requires {})",
            caller.principal,
            route.access.describe()
        );
        audit_refusal(&kms, &label, &path, Some(&caller), "access_denied", &msg).await;
        return refusal(ErrorKind::Forbidden, "access_denied", &msg);
    }
    parts
        .extensions
        .insert(caas_attest::service::Principal(caller.principal));
    next.run(Request::from_parts(parts, Body::from(body))).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A route served by the router but missing from [`ROUTES`] is refused to everyone,
    /// audited: adding a route without deciding who may call it cannot expose it.
    #[tokio::test]
    async fn an_unlisted_route_is_refused_to_everyone() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let kms = Kms::open(&caas_kms::KmsParams {
            region: "us-east-1".into(),
            database: format!("sqlite:{}", dir.path().join("db").display()),
            node_key_file: dir.path().join("node.key"),
            create_node_key: true,
            domain_key_rotation: None,
            domain: None,
            audit_durability: Default::default(),
        })
        .await
        .unwrap();
        let app = axum::Router::new()
            .route("/v1/new", axum::routing::get(|| async { "reached" }))
            .layer(axum::middleware::from_fn_with_state(
                kms.clone(),
                authenticate,
            ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/new HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(
            out.contains("route_not_classified") && !out.contains("reached"),
            "{out}"
        );
        let audit = kms.store.audit_list(None, 0, 1000).await.unwrap();
        assert!(
            audit.iter().any(|r| r.entry.operation == "HTTP GET /v1/new"
                && r.entry.result == "route_not_classified"),
            "the refusal is audited"
        );
    }

    #[test]
    fn every_route_is_listed_once() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} listed twice",
                    a.method,
                    a.path
                );
            }
        }
    }

    #[test]
    fn only_health_and_public_keys_are_public() {
        let public: Vec<&str> = ROUTES
            .iter()
            .filter(|r| r.access == Access::Public)
            .map(|r| r.path)
            .collect();
        assert_eq!(public, ["/healthz", "/v1/audit/public-key", "/v1/tl/ttp"]);
    }

    #[test]
    fn tenants_never_pass_operator_routes_and_operators_need_the_permission() {
        let op = CallerKind::Operator([Permission::HostsRead].into_iter().collect());
        let admit = Access::Operator(Permission::HostsAdmit);
        assert!(!allowed(admit, &CallerKind::Tenant));
        assert!(!allowed(admit, &op));
        assert!(allowed(Access::Operator(Permission::HostsRead), &op));
        assert!(allowed(
            Access::TenantOr(Permission::Schedule),
            &CallerKind::Tenant
        ));
        assert!(!allowed(Access::TenantOr(Permission::Schedule), &op));
    }
}

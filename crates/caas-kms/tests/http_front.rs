//! The key service's plain-HTTP front (`server::serve_plain`, the accept loop of `caas dev`
//! without TLS) from the attacker's seat: raw bytes on a TCP socket, no client library to
//! tidy them up. Each test drives the real server on a loopback port and checks that it
//! fails closed (AWS's error shapes where the KMS endpoint answers, hyper's 4xx and a
//! closed connection where the HTTP framing itself is bad), never panics, keeps serving
//! others, and audits every request that reached the KMS endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use caas_kms::server::HttpLimits;
use caas_kms::{Kms, KmsParams, sigv4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Front {
    kms: Arc<Kms>,
    port: u16,
    akid: String,
    secret: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _tmp: tempfile::TempDir,
}

async fn front(limits: HttpLimits) -> Front {
    let tmp = tempfile::tempdir().unwrap();
    let kms = Kms::open(&KmsParams {
        region: "us-east-1".into(),
        database: format!("sqlite:{}", tmp.path().join("kms.sqlite3").display()),
        node_key_file: tmp.path().join("node.key"),
        create_node_key: true,
        domain_key_rotation: None,
        domain: None,
        audit_durability: Default::default(),
    })
    .await
    .unwrap();
    let account = kms.create_account("front").await.unwrap();
    let (akid, secret) = kms.create_access_key(&account, "front").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(caas_kms::server::serve_plain(
        listener,
        caas_kms::server::router(kms.clone()),
        limits,
        async move {
            let _ = stop_rx.await;
        },
    ));
    Front {
        kms,
        port,
        akid,
        secret: secret.expose().to_vec(),
        stop: Some(stop),
        server,
        _tmp: tmp,
    }
}

impl Front {
    /// A SigV4-signed `POST /` for `op` with `body`, as raw HTTP/1.1 bytes; `extra` headers
    /// are sent (unsigned) after the signed ones.
    fn signed(&self, op: &str, body: &[u8], extra: &str) -> Vec<u8> {
        let headers = vec![
            (
                "content-type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            ("host".to_string(), format!("127.0.0.1:{}", self.port)),
            (
                "x-amz-date".to_string(),
                sigv4::format_amz_date(caas_kms::now_ms() / 1000),
            ),
            ("x-amz-target".to_string(), format!("TrentService.{op}")),
        ];
        let auth = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &caas_kms::sigv4::borrowed(&headers),
                body,
            },
            &self.akid,
            &self.secret,
            "us-east-1",
            "kms",
        )
        .unwrap();
        let mut out = String::from("POST / HTTP/1.1\r\n");
        for (n, v) in &headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(&format!(
            "authorization: {auth}\r\ncontent-length: {}\r\n{extra}\r\n",
            body.len()
        ));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
    }

    /// The server still answers a fresh client (nothing above took it down).
    async fn still_serving(&self) {
        let mut c = self.connect().await;
        c.write_all(&self.signed("ListKeys", b"{}", ""))
            .await
            .unwrap();
        let r = read_response(&mut c, &mut Vec::new())
            .await
            .expect("an answer");
        assert_eq!(r.status, 200, "{}", r.body);
    }

    async fn audit(&self) -> Vec<caas_store::AuditEntry> {
        self.kms.flush_audit().await;
        self.kms
            .store
            .audit_list(None, 0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.entry)
            .collect()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: String,
    body: String,
}

/// Reads one HTTP/1.1 response (Content-Length framed) from `c`, keeping what follows in
/// `buf`; `None` when the server closed the connection first.
async fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Response> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk))
                    .await
                    .expect("the body in time")
                    .ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            buf.drain(..end + 4 + len);
            let status = head.split(' ').nth(1)?.parse().ok()?;
            return Some(Response {
                status,
                headers: head,
                body,
            });
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk))
            .await
            .expect("an answer or a close in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the server closes `c` (EOF or reset) within `within`, draining any answer.
async fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slowloris: a client that sends its headers a few bytes at a time and never finishes is
/// disconnected once the header timeout has passed, and its trickle does not keep the
/// connection alive; other clients are served meanwhile.
#[tokio::test]
async fn slowloris_trickled_headers_are_cut_off_at_the_header_timeout() {
    let f = front(HttpLimits {
        header_read_timeout: Duration::from_millis(600),
        ..HttpLimits::default()
    })
    .await;
    let mut c = f.connect().await;
    let started = Instant::now();
    c.write_all(b"POST / HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut closed = false;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.write_all(format!("x-slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        f.still_serving().await;
        if started.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    closed = closed || closed_within(&mut c, Duration::from_secs(3)).await;
    assert!(closed, "a trickling client must be disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off near the 600 ms header timeout, not after {:?}",
        started.elapsed()
    );
    f.still_serving().await;
    f.stop().await;
}

/// A request head larger than the limit (one huge header, or very many) is refused with
/// 431 before any of it is authenticated, and the connection is closed.
#[tokio::test]
async fn oversized_request_heads_are_refused_and_the_connection_closed() {
    let f = front(HttpLimits::default()).await;
    for extra in [
        format!("x-big: {}\r\n", "a".repeat(64 * 1024)),
        (0..3000)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>(),
    ] {
        let mut c = f.connect().await;
        let req = f.signed("ListKeys", b"{}", &extra);
        // The server may close while we are still writing: that is a refusal too.
        let _ = c.write_all(&req).await;
        // Refused with 431 (or 400), or closed without an answer: never served.
        if let Some(r) = read_response(&mut c, &mut Vec::new()).await {
            assert!(
                r.status == 431 || r.status == 400,
                "an oversized head is refused, got {} {}",
                r.status,
                r.body
            );
        }
        assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    }
    f.still_serving().await;
    f.stop().await;
}

/// Duplicated security headers: two Authorization headers, or two X-Amz-Date headers,
/// are refused with AWS's IncompleteSignatureException (never "first one wins"), audited.
#[tokio::test]
async fn duplicated_security_headers_are_refused_with_the_aws_error_and_audited() {
    let f = front(HttpLimits::default()).await;
    let ok = f.signed("ListKeys", b"{}", "");
    let text = String::from_utf8(ok).unwrap();
    let auth_line = text
        .lines()
        .find(|l| l.starts_with("authorization:"))
        .unwrap()
        .to_string();
    let date_line = text
        .lines()
        .find(|l| l.starts_with("x-amz-date:"))
        .unwrap()
        .to_string();
    for dup in [auth_line, date_line] {
        let req = f.signed("ListKeys", b"{}", &format!("{dup}\r\n"));
        let mut c = f.connect().await;
        c.write_all(&req).await.unwrap();
        let r = read_response(&mut c, &mut Vec::new()).await.unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(
            r.body.contains("IncompleteSignatureException"),
            "{}",
            r.body
        );
        assert!(
            r.headers
                .to_ascii_lowercase()
                .contains("content-type: application/x-amz-json-1.1"),
            "{}",
            r.headers
        );
    }
    let audit = f.audit().await;
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.operation == "ListKeys" && a.result == "IncompleteSignatureException")
            .count(),
        2,
        "{audit:?}"
    );
    f.still_serving().await;
    f.stop().await;
}

/// A signed request replayed with another body of the same length is refused (the body
/// hash is part of the signature) and audited; the original still verifies.
#[tokio::test]
async fn a_replay_with_another_body_is_refused_and_audited() {
    let f = front(HttpLimits::default()).await;
    let body = br#"{"Limit":10}"#;
    let req = f.signed("ListKeys", body, "");
    let mut c = f.connect().await;
    c.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut c, &mut buf).await.unwrap().status, 200);
    let mut forged = req.clone();
    let at = forged.len() - body.len();
    forged[at..].copy_from_slice(br#"{"Limit":99}"#);
    c.write_all(&forged).await.unwrap();
    let r = read_response(&mut c, &mut buf).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("InvalidSignatureException"), "{}", r.body);
    let audit = f.audit().await;
    assert!(
        audit
            .iter()
            .any(|a| a.operation == "ListKeys" && a.result == "InvalidSignatureException"),
        "{audit:?}"
    );
    f.stop().await;
}

/// Bytes beyond Content-Length are not part of the signed body: they are read as the
/// next request on the connection. The first request is authenticated over exactly
/// Content-Length bytes (and succeeds); the trailing garbage is refused as a malformed
/// request (400) and the connection closed; nothing panics.
#[tokio::test]
async fn a_body_longer_than_content_length_is_not_smuggled_into_the_signed_request() {
    let f = front(HttpLimits::default()).await;
    let mut req = f.signed("ListKeys", b"{}", "");
    req.extend_from_slice(b"{\"smuggled\":true} GARBAGE\r\n\r\n");
    let mut c = f.connect().await;
    c.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut c, &mut buf).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    if let Some(second) = read_response(&mut c, &mut buf).await {
        assert_eq!(second.status, 400, "{}", second.body);
    }
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    // A smuggled *request* after the body is a separate request: it must carry its own
    // valid signature, and an unsigned one is refused with AWS's error, audited.
    let mut req = f.signed("ListKeys", b"{}", "");
    req.extend_from_slice(
        b"POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: TrentService.CreateKey\r\ncontent-length: 2\r\n\r\n{}",
    );
    let mut c = f.connect().await;
    c.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut c, &mut buf).await.unwrap().status, 200);
    let smuggled = read_response(&mut c, &mut buf).await.unwrap();
    assert_eq!(smuggled.status, 400, "{}", smuggled.body);
    assert!(
        smuggled
            .body
            .contains("MissingAuthenticationTokenException"),
        "{}",
        smuggled.body
    );
    let audit = f.audit().await;
    assert!(
        audit.iter().any(
            |a| a.operation == "CreateKey" && a.result == "MissingAuthenticationTokenException"
        ),
        "{audit:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|a| a.operation == "CreateKey" && a.result == "Success")
    );
    f.still_serving().await;
    f.stop().await;
}

/// Pipelined requests (several written before any answer is read) are each
/// authenticated and answered in order on the one connection.
#[tokio::test]
async fn pipelined_requests_are_each_verified_and_answered_in_order() {
    let f = front(HttpLimits::default()).await;
    let mut all = Vec::new();
    all.extend(f.signed("ListKeys", b"{}", ""));
    all.extend(f.signed("CreateKey", b"{}", ""));
    let mut bad = f.signed("ListKeys", b"{}", "");
    let n = bad.len();
    bad[n - 2..].copy_from_slice(b"[]"); // another body, same length: forged
    all.extend(bad);
    all.extend(f.signed("ListKeys", b"{}", ""));
    let mut c = f.connect().await;
    c.write_all(&all).await.unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(read_response(&mut c, &mut buf).await.unwrap());
    }
    assert_eq!(got[0].status, 200, "{}", got[0].body);
    assert!(got[0].body.contains("\"Keys\""), "{}", got[0].body);
    assert_eq!(got[1].status, 200, "{}", got[1].body);
    assert!(got[1].body.contains("KeyMetadata"), "{}", got[1].body);
    assert_eq!(got[2].status, 400, "{}", got[2].body);
    assert!(
        got[2].body.contains("InvalidSignatureException"),
        "{}",
        got[2].body
    );
    assert_eq!(got[3].status, 200, "{}", got[3].body);
    f.stop().await;
}

/// Malformed framing — a broken request line, a header without a colon, a bad
/// Content-Length, bytes that are not HTTP at all — gets a 4xx (or a close), never a
/// panic, and the server keeps serving.
#[tokio::test]
async fn malformed_requests_are_refused_without_harm() {
    let f = front(HttpLimits::default()).await;
    let cases: [&[u8]; 6] = [
        b"POST\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost 127.0.0.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: TrentService.ListKeys\xff\xfe\r\ncontent-length: 2\r\n\r\n{}",
    ];
    for case in cases {
        let mut c = f.connect().await;
        c.write_all(case).await.unwrap();
        if let Some(r) = read_response(&mut c, &mut Vec::new()).await {
            assert!(
                (400..500).contains(&r.status),
                "{:?}: {} {}",
                String::from_utf8_lossy(case),
                r.status,
                r.body
            );
        }
    }
    f.still_serving().await;
    f.stop().await;
}

/// A body up to the service's limit (64 KiB) streams through the 16 KiB head buffer and
/// reaches the operation (here refused for its size by Encrypt's own 4 KiB rule, with
/// AWS's ValidationException, not by the HTTP layer); a larger one gets the
/// endpoint's 413 ValidationException, audited.
#[tokio::test]
async fn large_bodies_reach_the_endpoint_and_oversized_ones_are_refused_by_it() {
    let f = front(HttpLimits::default()).await;
    let pt = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![7u8; 40 * 1024],
    );
    let body = format!(r#"{{"KeyId":"alias/none","Plaintext":"{pt}"}}"#);
    let mut c = f.connect().await;
    c.write_all(&f.signed("Encrypt", body.as_bytes(), ""))
        .await
        .unwrap();
    let r = read_response(&mut c, &mut Vec::new()).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("ValidationException"), "{}", r.body);
    let huge = vec![b' '; 80 * 1024];
    let mut c = f.connect().await;
    let _ = c.write_all(&f.signed("Encrypt", &huge, "")).await;
    let r = read_response(&mut c, &mut Vec::new()).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("ValidationException"), "{}", r.body);
    let audit = f.audit().await;
    assert!(
        audit
            .iter()
            .any(|a| a.operation == "Encrypt" && a.result == "ValidationException"),
        "{audit:?}"
    );
    f.still_serving().await;
    f.stop().await;
}

/// Shutdown with idle keep-alive connections open returns promptly (they are closed),
/// and a connection in the middle of a request still gets its answer.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let f = front(HttpLimits::default()).await;
    let mut idle = f.connect().await;
    idle.write_all(&f.signed("ListKeys", b"{}", ""))
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut idle, &mut Vec::new())
            .await
            .unwrap()
            .status,
        200
    );
    let started = Instant::now();
    f.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
}

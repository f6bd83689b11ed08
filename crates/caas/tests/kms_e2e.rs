//! End-to-end tests of the key service through the `caas` binary: real AWS clients (aws CLI,
//! boto3, AWS Encryption SDK, openssl), restart durability, SIGKILL during a burst, nothing
//! secret at rest, bad input, and two nodes on one PostgreSQL database.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::{Arc, Mutex};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Every byte string in `needles` must be absent from every file under `dir` matching `prefix`.
fn assert_absent(dir: &std::path::Path, prefix: &str, needles: &[(&str, Vec<u8>)]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        for (what, n) in needles {
            assert!(!n.is_empty());
            assert!(
                data.windows(n.len()).all(|w| w != &n[..]),
                "{what} found in {}",
                p.display()
            );
        }
    }
}

#[test]
fn real_aws_clients_work_against_caas_dev() {
    let venv = venv_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    // A second principal in the same account for the grant test.
    let second: Value = serde_json::from_str(&dev.caas(&[
        "admin",
        "create-access-key",
        "--account",
        &dev.env["CAAS_ACCOUNT_ID"],
        "--user",
        "second",
    ]))
    .unwrap();
    let canary_file = tmp.path().join("canaries.bin");
    let path = format!(
        "{}:{}",
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(venv.join("python"))
        .arg(repo_root().join("tests/python/kms_clients.py"))
        .envs(&dev.env)
        .env("PATH", path)
        .env(
            "CAAS_TEST_SECOND_ACCESS_KEY_ID",
            second["AccessKeyId"].as_str().unwrap(),
        )
        .env(
            "CAAS_TEST_SECOND_SECRET",
            second["SecretAccessKey"].as_str().unwrap(),
        )
        .env("CAAS_TEST_CANARY_FILE", &canary_file)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python client checks failed");
    assert!(stdout.contains(" passed, 0 failed"));
    // Nothing secret at rest: canary plaintext, imported key material (an HBK we know),
    // the node key and the access key secrets are not in the database files.
    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("canary plaintext", b"canary-plaintext-1".to_vec()),
        (
            "node key",
            std::fs::read(tmp.path().join("node.key")).unwrap(),
        ),
        (
            "access key secret",
            dev.env["AWS_SECRET_ACCESS_KEY"].as_bytes().to_vec(),
        ),
        (
            "second secret",
            second["SecretAccessKey"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec(),
        ),
    ];
    let canaries = std::fs::read(&canary_file).unwrap();
    assert_eq!(
        canaries.len(),
        32,
        "the import test records its key material"
    );
    needles.push(("imported HBK", canaries));
    assert_absent(tmp.path(), "kms.sqlite3", &needles);
    // The audit chain verifies and mentions the operations without secrets.
    dev.caas(&["audit", "verify"]);
    let audit = dev.caas(&["audit", "list", "--limit", "100000"]);
    assert!(
        audit.contains("\"Operation\":\"Encrypt\"")
            && audit.contains("\"Operation\":\"ImportKeyMaterial\"")
    );
    assert!(!audit.contains("canary-plaintext-1"));
}

#[test]
fn restart_keeps_keys_aliases_grants_and_ciphertexts() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut dev = Dev::start(tmp.path());
    let c = dev.client();
    let (key, ct, grant) = rt.block_on(async {
        let key = c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        c.call("CreateAlias", &json!({ "AliasName": "alias/keep", "TargetKeyId": key })).await.unwrap();
        let ct = c.call("Encrypt", &json!({ "KeyId": "alias/keep", "Plaintext": b64(b"survives") })).await.unwrap()["CiphertextBlob"].as_str().unwrap().to_string();
        let g = c.call("CreateGrant", &json!({ "KeyId": key, "GranteePrincipal": "arn:aws:iam::000000000000:user/x", "Operations": ["Decrypt"] })).await.unwrap();
        (key, ct, g["GrantId"].as_str().unwrap().to_string())
    });
    dev.stop();
    let dev = Dev::start(tmp.path());
    let c = dev.client();
    rt.block_on(async {
        let p = c
            .call("Decrypt", &json!({ "CiphertextBlob": ct }))
            .await
            .unwrap();
        assert_eq!(p["Plaintext"], json!(b64(b"survives")));
        let d = c
            .call("DescribeKey", &json!({ "KeyId": "alias/keep" }))
            .await
            .unwrap();
        assert_eq!(d["KeyMetadata"]["KeyId"], json!(key));
        let g = c
            .call("ListGrants", &json!({ "KeyId": key }))
            .await
            .unwrap();
        assert_eq!(g["Grants"][0]["GrantId"], json!(grant));
    });
}

#[test]
fn sigkill_during_a_burst_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut dev = Dev::start(tmp.path());
    let c = dev.client();
    let base_key = rt.block_on(async {
        c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let acked_keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked_cts = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let pid = dev.child.id();
    rt.block_on(async {
        let mut tasks = vec![];
        for i in 0..16 {
            let c = c.clone();
            let (ak, ac, base) = (acked_keys.clone(), acked_cts.clone(), base_key.clone());
            tasks.push(tokio::spawn(async move {
                for j in 0.. {
                    if i % 2 == 0 {
                        match c.call("CreateKey", &json!({})).await {
                            Ok(v) => ak
                                .lock()
                                .unwrap()
                                .push(v["KeyMetadata"]["KeyId"].as_str().unwrap().to_string()),
                            Err(_) => break,
                        }
                    } else {
                        let pt = format!("burst-{i}-{j}");
                        match c
                            .call(
                                "Encrypt",
                                &json!({ "KeyId": base, "Plaintext": b64(pt.as_bytes()) }),
                            )
                            .await
                        {
                            Ok(v) => ac
                                .lock()
                                .unwrap()
                                .push((pt, v["CiphertextBlob"].as_str().unwrap().to_string())),
                            Err(_) => break,
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        for t in tasks {
            let _ = t.await;
        }
    });
    dev.kill9();
    let keys = acked_keys.lock().unwrap().clone();
    let cts = acked_cts.lock().unwrap().clone();
    assert!(
        keys.len() > 5 && cts.len() > 5,
        "burst too small: {} keys, {} ciphertexts",
        keys.len(),
        cts.len()
    );
    let dev = Dev::start(tmp.path());
    let c = dev.client();
    rt.block_on(async {
        for k in &keys {
            c.call("DescribeKey", &json!({ "KeyId": k }))
                .await
                .unwrap_or_else(|e| panic!("acknowledged key {k} lost: {e}"));
        }
        for (pt, ct) in &cts {
            let p = c
                .call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await
                .unwrap();
            assert_eq!(p["Plaintext"], json!(b64(pt.as_bytes())));
        }
    });
    dev.caas(&["audit", "verify"]);
}

#[test]
fn bad_input_gets_aws_errors_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let ep = dev.endpoint().to_string();
    let rt = rt();
    let c = dev.client();
    let key = rt.block_on(async {
        c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    });
    // Unauthenticated and malformed requests.
    let (st, body) = raw_post(&ep, &[("x-amz-target", "TrentService.ListKeys")], b"{}");
    assert_eq!(st, 400);
    assert!(
        body.contains("MissingAuthenticationTokenException"),
        "{body}"
    );
    let (_, body) = raw_post(
        &ep,
        &[
            ("x-amz-target", "TrentService.ListKeys"),
            ("authorization", "AWS4-HMAC-SHA256 Credential=garbage"),
        ],
        b"{}",
    );
    assert!(body.contains("IncompleteSignatureException"), "{body}");
    let big = vec![b'a'; 10 * 1024 * 1024];
    let (st, body) = raw_post(&ep, &[("x-amz-target", "TrentService.Encrypt")], &big);
    assert!(st == 413 || st == 400, "{st} {body}");
    // Authenticated but malformed bodies, through the signing client.
    rt.block_on(async {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("Encrypt", json!({ "KeyId": key }), "ValidationException"),
            (
                "Encrypt",
                json!({ "KeyId": 5, "Plaintext": "aGk=" }),
                "SerializationException",
            ),
            (
                "Encrypt",
                json!({ "KeyId": key, "Plaintext": "!!notbase64" }),
                "SerializationException",
            ),
            (
                "Encrypt",
                json!({ "KeyId": key, "Plaintext": b64(&[0u8; 4097]) }),
                "ValidationException",
            ),
            (
                "Decrypt",
                json!({ "CiphertextBlob": b64(&[1u8; 10]) }),
                "InvalidCiphertextException",
            ),
            (
                "Decrypt",
                json!({ "CiphertextBlob": b64(&[0u8; 200]) }),
                "InvalidCiphertextException",
            ),
            (
                "GenerateDataKey",
                json!({ "KeyId": key, "NumberOfBytes": 5000 }),
                "ValidationException",
            ),
            (
                "CreateKey",
                json!({ "KeySpec": "ROT13" }),
                "ValidationException",
            ),
            ("NoSuchOperation", json!({}), "UnknownOperationException"),
            (
                "ScheduleKeyDeletion",
                json!({ "KeyId": key, "PendingWindowInDays": 31 }),
                "ValidationException",
            ),
        ];
        for (op, body, code) in cases {
            match c.call(op, &body).await {
                Err(caas_kms::client::ClientError::Service { code: got, .. }) => {
                    assert_eq!(got, code, "{op} {body}")
                }
                other => panic!("{op} {body}: expected {code}, got {other:?}"),
            }
        }
        // Tampered and truncated ciphertexts.
        let ct = c
            .call("Encrypt", &json!({ "KeyId": key, "Plaintext": b64(b"x") }))
            .await
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(ct["CiphertextBlob"].as_str().unwrap())
            .unwrap();
        for i in 0..raw.len() {
            let mut t = raw.clone();
            t[i] ^= 1;
            assert!(
                c.call("Decrypt", &json!({ "CiphertextBlob": b64(&t) }))
                    .await
                    .is_err(),
                "tampered byte {i} accepted"
            );
        }
        for n in [1, 10, raw.len() - 1] {
            assert!(
                c.call("Decrypt", &json!({ "CiphertextBlob": b64(&raw[..n]) }))
                    .await
                    .is_err()
            );
        }
        // The server still serves after all of the above (expired signatures are checked below).
        assert!(
            c.call("ListKeys", &json!({})).await.is_ok(),
            "server still serves"
        );
    });
    // Raw malformed JSON with a valid signature is covered by the client's own signing;
    // sign a raw body with the SigV4 signer to check SerializationException and expiry.
    let secret = dev.env["AWS_SECRET_ACCESS_KEY"].clone();
    let akid = dev.env["AWS_ACCESS_KEY_ID"].clone();
    let hostport = ep.trim_start_matches("http://").to_string();
    for (body, date_offset, expect) in [
        (&b"{not json"[..], 0i64, "SerializationException"),
        (&b"[1,2]"[..], 0, "SerializationException"),
        (&b"{}"[..], -600, "InvalidSignatureException"),
        (&b"{}"[..], 600, "InvalidSignatureException"),
    ] {
        let date = caas_kms::sigv4::format_amz_date(caas_kms::now_ms() / 1000 + date_offset);
        let headers = vec![
            (
                "content-type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            ("host".to_string(), hostport.clone()),
            ("x-amz-date".to_string(), date),
            (
                "x-amz-target".to_string(),
                "TrentService.ListKeys".to_string(),
            ),
        ];
        let sreq = caas_kms::sigv4::Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &caas_kms::sigv4::borrowed(&headers),
            body,
        };
        let auth =
            caas_kms::sigv4::sign(&sreq, &akid, secret.as_bytes(), "us-east-1", "kms").unwrap();
        let hdrs: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(n, _)| n != "host")
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .chain([("authorization", auth.as_str())])
            .collect();
        let (_, resp) = raw_post(&ep, &hdrs, body);
        assert!(resp.contains(expect), "{expect}: {resp}");
    }
}

#[test]
fn two_nodes_on_one_postgresql_database_serve_the_same_keys() {
    let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{}", e.0));
    let url = pg
        .create_database("caas")
        .unwrap_or_else(|e| panic!("{}", e.0));
    let tmp = tempfile::tempdir().unwrap();
    // One node key shared by both nodes (until KMS domains with exported domain tokens exist).
    let node_key = tmp.path().join("node.key");
    let mut procs = vec![];
    let mut endpoints = vec![];
    for n in 0..2 {
        let cfg = tmp.path().join(format!("node{n}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"{url}\"\n[keys]\nnode_key_file = \"{}\"\ncreate_node_key = {}\n",
                node_key.display(),
                n == 0
            ),
        )
        .unwrap();
        if n == 1 {
            // Node 1 starts after node 0 created the node key and the domain key.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let mut child = Command::new(caas_bin())
            .args(["key-service", "serve", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("node {n}: {line}"))
            .to_string();
        endpoints.push(format!("http://{addr}"));
        procs.push(child);
    }
    let created = Command::new(caas_bin())
        .args(["admin", "create-account", "--database", &url, "--config"])
        .arg(tmp.path().join("node0.toml"))
        .arg("pg-tenant")
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let acct: Value = serde_json::from_slice(&created.stdout).unwrap();
    let ak = Command::new(caas_bin())
        .args(["admin", "create-access-key", "--config"])
        .arg(tmp.path().join("node0.toml"))
        .args(["--account", acct["Account"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ak.status.success(),
        "{}",
        String::from_utf8_lossy(&ak.stderr)
    );
    let ak: Value = serde_json::from_slice(&ak.stdout).unwrap();
    let clients: Vec<_> = endpoints
        .iter()
        .map(|ep| {
            caas_kms::client::KmsClient::new(
                ep,
                "us-east-1",
                ak["AccessKeyId"].as_str().unwrap(),
                caas_crypto::SecretBytes::new(
                    ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec(),
                ),
                None,
            )
            .unwrap()
        })
        .collect();
    let rt = rt();
    rt.block_on(async {
        let key = clients[0].call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        // Concurrent use of the same key from both nodes.
        let mut tasks = vec![];
        for i in 0..8 {
            let (a, b, key) = (
                clients[i % 2].clone(),
                clients[(i + 1) % 2].clone(),
                key.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for j in 0..20 {
                    let pt = b64(format!("pg-{i}-{j}").as_bytes());
                    let ct = a
                        .call("Encrypt", &json!({ "KeyId": key, "Plaintext": pt }))
                        .await
                        .unwrap();
                    let p = b
                        .call(
                            "Decrypt",
                            &json!({ "CiphertextBlob": ct["CiphertextBlob"] }),
                        )
                        .await
                        .unwrap();
                    assert_eq!(p["Plaintext"], json!(pt));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        clients[1]
            .call("RotateKeyOnDemand", &json!({ "KeyId": key }))
            .await
            .unwrap();
        let ct = clients[0]
            .call(
                "Encrypt",
                &json!({ "KeyId": key, "Plaintext": b64(b"pg-canary-plaintext") }),
            )
            .await
            .unwrap();
        clients[1]
            .call(
                "Decrypt",
                &json!({ "CiphertextBlob": ct["CiphertextBlob"] }),
            )
            .await
            .unwrap();
    });
    // Nothing secret in a dump of the database.
    let dump = pg.dump("caas").unwrap_or_else(|e| panic!("{}", e.0));
    for (what, n) in [
        ("canary", b"pg-canary-plaintext".to_vec()),
        ("node key", std::fs::read(&node_key).unwrap()),
        (
            "secret",
            ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec(),
        ),
    ] {
        assert!(
            dump.windows(n.len()).all(|w| w != &n[..]),
            "{what} found in the PostgreSQL dump"
        );
    }
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[test]
fn production_mode_serves_tls_to_the_aws_cli_and_the_caas_client() {
    let venv = venv_bin();
    let tmp = tempfile::tempdir().unwrap();
    // A CA and a server certificate signed by it (webpki refuses a CA as end entity).
    let (ca, ca_key, cert, key, csr) = ["ca.pem", "ca.key", "cert.pem", "key.pem", "req.csr"]
        .map(|n| tmp.path().join(n))
        .into();
    let openssl = |args: Vec<std::ffi::OsString>| {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is needed: apt-get install openssl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| {
        v.iter()
            .map(|x| x.as_ref().to_os_string())
            .collect::<Vec<_>>()
    };
    openssl(os(&[
        &"req",
        &"-x509",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &"ec_paramgen_curve:P-256",
        &"-nodes",
        &"-days",
        &"1",
        &"-subj",
        &"/CN=caas test CA",
        &"-keyout",
        &ca_key,
        &"-out",
        &ca,
    ]));
    openssl(os(&[
        &"req",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &"ec_paramgen_curve:P-256",
        &"-nodes",
        &"-subj",
        &"/CN=localhost",
        &"-keyout",
        &key,
        &"-out",
        &csr,
    ]));
    let ext = tmp.path().join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(os(&[
        &"x509",
        &"-req",
        &"-in",
        &csr,
        &"-CA",
        &ca,
        &"-CAkey",
        &ca_key,
        &"-CAcreateserial",
        &"-days",
        &"1",
        &"-extfile",
        &ext,
        &"-out",
        &cert,
    ]));
    let cfg = tmp.path().join("ks.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[storage]\ndatabase = \"sqlite:{}\"\n[keys]\nnode_key_file = \"{}\"\ncreate_node_key = true\n",
            cert.display(),
            key.display(),
            tmp.path().join("kms.sqlite3").display(),
            tmp.path().join("node.key").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(caas_bin())
        .args(["key-service", "serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let endpoint = format!("https://localhost:{port}");
    let admin = |args: &[&str]| -> Value {
        let o = Command::new(caas_bin())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let acct = admin(&["admin", "create-account", "tls-tenant"]);
    let ak = admin(&[
        "admin",
        "create-access-key",
        "--account",
        acct["Account"].as_str().unwrap(),
    ]);
    let (akid, secret) = (
        ak["AccessKeyId"].as_str().unwrap(),
        ak["SecretAccessKey"].as_str().unwrap(),
    );
    let c = caas_kms::client::KmsClient::new(
        &endpoint,
        "us-east-1",
        akid,
        caas_crypto::SecretBytes::new(secret.as_bytes().to_vec()),
        Some(&std::fs::read(&ca).unwrap()),
    )
    .unwrap();
    let key_id = rt().block_on(async {
        c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let out = Command::new(venv.join("aws"))
        .args([
            "kms",
            "describe-key",
            "--key-id",
            &key_id,
            "--endpoint-url",
            &endpoint,
            "--ca-bundle",
        ])
        .arg(&ca)
        .env("AWS_ACCESS_KEY_ID", akid)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&key_id));
    // Plain HTTP to the TLS port is not served.
    let plain = caas_kms::client::KmsClient::new(
        &format!("http://127.0.0.1:{port}"),
        "us-east-1",
        akid,
        caas_crypto::SecretBytes::new(secret.as_bytes().to_vec()),
        None,
    )
    .unwrap();
    assert!(rt().block_on(plain.call("ListKeys", &json!({}))).is_err());
    let _ = child.kill();
    let _ = child.wait();
    // Each audit record names its connection's key exchange: caas's client negotiates the
    // hybrid post-quantum X25519MLKEM768; the aws CLI gets what its OpenSSL offers (a
    // classical group before OpenSSL 3.5).
    let o = Command::new(caas_bin())
        .args(["audit", "list", "--limit", "100000", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let audit = String::from_utf8_lossy(&o.stdout);
    let kx = |op: &str| -> String {
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["Operation"] == op)
            .and_then(|r| r["Detail"]["TlsKeyExchange"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no {op} record with TlsKeyExchange: {audit}"))
    };
    assert_eq!(kx("CreateKey"), "X25519MLKEM768");
    let cli = kx("DescribeKey");
    println!("the aws CLI negotiated {cli}");
    assert!(
        ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"].contains(&cli.as_str()),
        "{cli}"
    );
}

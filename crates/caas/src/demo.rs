//! `caas demo`: the tenant story against the dev deployment in DIR, step by step with
//! timings; exits non-zero if any step fails. Starts a detached deployment if none runs.
use anyhow::{Result, bail};
use base64::Engine as _;
use caas_crypto::SecretBytes;
use caas_kms::client::{ClientError, KmsClient, b64field};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

/// `caas demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory of the dev deployment.
    #[arg(long, env = "CAAS_DEV_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Simulated compute hosts when the demo has to start the deployment itself.
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
}

struct Steps {
    n: usize,
    failed: usize,
}

impl Steps {
    async fn run<F, T>(&mut self, name: &str, f: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        self.n += 1;
        let t = Instant::now();
        let r = f.await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match r {
            Ok(v) => {
                println!("[{:>2}] ok    {:>9.1} ms  {name}", self.n, ms);
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                println!("[{:>2}] FAIL  {:>9.1} ms  {name}: {e:#}", self.n, ms);
                None
            }
        }
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn s(v: &Value, k: &str) -> Result<String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("reply lacks {k}"))
}

/// The tenant story of trusted launch, DBSP and encrypted provisioning (seed 003 §4.3–4.4,
/// seed 001 Algorithm 1, §3.4) on the dev hosts.
async fn tenant_story(
    st: &mut Steps,
    dir: &std::path::Path,
    get: &impl Fn(&str) -> Result<String>,
) {
    use crate::tenant::{TenantArgs, TenantCmd};
    let Ok(storage) = get("CAAS_STORAGE_DIR") else {
        return;
    };
    let ta = TenantArgs {
        dir: Some(dir.join("tenant")),
        endpoint: get("CAAS_KMS_ENDPOINT").ok(),
        ttp: get("CAAS_TTP_PUBLIC_KEY").ok(),
        access_key_id: get("AWS_ACCESS_KEY_ID").ok(),
        secret_access_key: get("AWS_SECRET_ACCESS_KEY").ok(),
        cmd: TenantCmd::Init,
    };
    let tdir = dir.join("tenant");
    let run_id = std::process::id();
    let (image_id, vm1, vm2) = (
        format!("demo-img-{run_id}"),
        format!("demo-vm-{run_id}"),
        format!("demo-vm-{run_id}-b"),
    );
    let raw = dir.join("demo-image.raw");
    let image: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let image_sha = hex::encode(caas_tl::crypto::sha256(&image));
    let ok = st
        .run(
            "TL: domain manager key pair (TL.Setup) and the TTP's ACL for domain demo-data",
            async {
                let dm = crate::tenant::load_dm(&tdir, true)?;
                let body =
                    dm.acl_update("caas demo", &["demo-data".into()], caas_attest::now_ms())?;
                crate::key_service::client::signed(
                    &get("AWS_DEFAULT_REGION")?,
                    &get("AWS_ACCESS_KEY_ID")?,
                    SecretBytes::new(get("AWS_SECRET_ACCESS_KEY")?.into_bytes()),
                    std::time::Duration::from_secs(30),
                )?
                .put::<_, Value>(&format!("{}/v1/tl/acl", get("CAAS_KMS_ENDPOINT")?), &body)
                .await?;
                Ok(())
            },
        )
        .await;
    if ok.is_none() {
        return;
    }
    let hosts = get("CAAS_HOSTS").unwrap_or_default();
    let hosts: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    let ok = st
        .run(
            "Provisioning (seed 001 Alg. 1): validate the hosts' certified bind keys, encrypt a 4 MiB image under k, seal the crypto-domain configuration to each host",
            async {
                tokio::fs::write(&raw, &image).await?;
                crate::tenant::provision(
                    &ta,
                    &tdir,
                    &raw,
                    &image_id,
                    &hosts,
                    std::path::Path::new(&storage),
                    "caas-demo",
                )
                .await
            },
        )
        .await;
    if ok.is_none() {
        return;
    }
    let vols = ["demo-data/db".to_string()];
    let doms = ["demo-data".to_string()];
    let launched = st
        .run(
            "TL: trusted launch through the scheduler (attested host, sealed token, H1/H2 checks, crypto domain, DBSP volume demo-data/db, workload)",
            async {
                let r = crate::tenant::launch(&ta, &tdir, &image_id, &vm1, "dev", &doms, &vols, None, "process", false).await?;
                let host = s(&r, "host")?;
                let phases: Vec<String> = r["timings"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| Some(format!("{} {:.1} ms", p[0].as_str()?, p[1].as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                println!("       on {host}: {}", phases.join("; "));
                Ok(host)
            },
        )
        .await;
    let Some(host) = launched else {
        return;
    };
    let check = |vm: String| {
        let tdir = tdir.clone();
        let image_sha = image_sha.clone();
        async move {
            let r = crate::tenant::connect(&tdir, &vm).await?;
            if r.disk_sha256 != image_sha {
                bail!("the workload's disk is not the tenant's image");
            }
            if r.vsm.is_none() || !r.volumes.iter().all(|v| v.ok) || r.volumes.is_empty() {
                bail!("VSM signature or DBSP volume check missing: {r:?}");
            }
            Ok(())
        }
    };
    st.run(
        "TL: the workload proves τ over TLS 1.3-PSK, verifies pk_DM's signature, reads the image, signs in its VSM, writes its DBSP volume",
        check(vm1.clone()),
    )
    .await;
    st.run(
        "DBSP: stop the workload and relaunch: the domain key is re-created from c4 and μ in the domain header",
        async {
            let key = format!("CAAS_HOST_{}_URL", host.to_uppercase().replace(['-', '.'], "_"));
            caas_host::cli::OperatorArgs {
                ca: get(caas_host::cli::ENV_PKI_CA)?.into(),
                cert: get(caas_host::cli::ENV_OPERATOR_CERT)?.into(),
                key: get(caas_host::cli::ENV_OPERATOR_KEY)?.into(),
            }
            .client()?
                .post::<_, Value>(&format!("{}/v1/agent/workloads/{vm1}/stop", get(&key)?), &json!({}))
                .await?;
            crate::tenant::launch(&ta, &tdir, &image_id, &vm2, "dev", &doms, &vols, None, "process", false).await?;
            check(vm2.clone()).await
        },
    )
    .await;
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(crate::dev::default_dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    if !crate::dev::is_running(&dir).await {
        println!("starting a dev deployment in {}", dir.display());
        crate::dev::run(crate::dev::DevArgs {
            cmd: None,
            data_dir: Some(dir.clone()),
            listen: "127.0.0.1:0".into(),
            detach: true,
            maintenance_secs: 60,
            hosts: args.hosts,
            attest_secs: 10,
            accept_audit_rollback: false,
        })
        .await?;
    }
    let env = crate::dev::read_env(&dir.join("env"))?;
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("{k} missing from env"))
    };
    let client = KmsClient::new(
        &get("CAAS_KMS_ENDPOINT")?,
        &get("AWS_DEFAULT_REGION")?,
        &get("AWS_ACCESS_KEY_ID")?,
        SecretBytes::new(get("AWS_SECRET_ACCESS_KEY")?.into_bytes()),
        None,
    )?;
    let c = &client;
    let total = Instant::now();
    let mut st = Steps { n: 0, failed: 0 };
    println!(
        "caas demo — tenant story against {}",
        get("CAAS_KMS_ENDPOINT")?
    );

    let key = st
        .run("KMS: create a symmetric key", async {
            s(
                &c.call("CreateKey", &json!({ "Description": "caas demo data key" }))
                    .await?["KeyMetadata"],
                "KeyId",
            )
        })
        .await;
    let alias = format!("alias/demo-{}", std::process::id());
    if let Some(key) = &key {
        st.run(&format!("KMS: name it {alias}"), async {
            c.call(
                "CreateAlias",
                &json!({ "AliasName": alias, "TargetKeyId": key }),
            )
            .await?;
            Ok(())
        })
        .await;
    }
    let ec = json!({ "tenant": "demo", "purpose": "payroll" });
    let ct = st
        .run("KMS: encrypt a secret under the alias with an encryption context", async {
            let v = c.call("Encrypt", &json!({ "KeyId": alias, "Plaintext": b64(b"the payroll database password"), "EncryptionContext": ec })).await?;
            Ok(b64field(&v, "CiphertextBlob")?)
        })
        .await;
    if let Some(ct) = &ct {
        st.run("KMS: decrypt it (same context)", async {
            let p = c.decrypt(ct, &ec).await?;
            if p.expose() != b"the payroll database password" {
                bail!("plaintext differs");
            }
            Ok(())
        })
        .await;
        st.run("KMS: decrypt with another context is refused", async {
            match c
                .decrypt(ct, &json!({ "tenant": "demo", "purpose": "other" }))
                .await
            {
                Err(ClientError::Service { code, .. }) if code == "InvalidCiphertextException" => {
                    Ok(())
                }
                other => bail!("expected InvalidCiphertextException, got {other:?}"),
            }
        })
        .await;
    }
    if let Some(key) = &key {
        st.run("KMS: envelope encryption — generate a data key", async {
            let (p, blob) = c.generate_data_key(key, &ec).await?;
            let back = c.decrypt(&blob, &ec).await?;
            if back.expose() != p.expose() || p.len() != 32 {
                bail!("data key round trip failed");
            }
            Ok(())
        })
        .await;
        st.run(
            "KMS: rotate the key on demand; the old ciphertext still decrypts",
            async {
                c.call("RotateKeyOnDemand", &json!({ "KeyId": key }))
                    .await?;
                if let Some(ct) = &ct {
                    c.decrypt(ct, &ec).await?;
                }
                let r = c.call("ListKeyRotations", &json!({ "KeyId": key })).await?;
                if r["Rotations"].as_array().map_or(0, Vec::len) != 1 {
                    bail!("expected one rotation");
                }
                Ok(())
            },
        )
        .await;
    }
    st.run("KMS: ECDSA P-256 signing key: sign and verify", async {
        let k = s(&c.call("CreateKey", &json!({ "KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY" })).await?["KeyMetadata"], "KeyId")?;
        let msg = b64(b"release v1.0 manifest");
        let sig = s(&c.call("Sign", &json!({ "KeyId": k, "Message": msg, "SigningAlgorithm": "ECDSA_SHA_256" })).await?, "Signature")?;
        let v = c.call("Verify", &json!({ "KeyId": k, "Message": msg, "Signature": sig, "SigningAlgorithm": "ECDSA_SHA_256" })).await?;
        if v["SignatureValid"] != json!(true) {
            bail!("signature did not verify");
        }
        Ok(())
    })
    .await;
    st.run("KMS: HMAC key: generate and verify a MAC", async {
        let k = s(&c.call("CreateKey", &json!({ "KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC" })).await?["KeyMetadata"], "KeyId")?;
        let m = s(&c.call("GenerateMac", &json!({ "KeyId": k, "Message": b64(b"token"), "MacAlgorithm": "HMAC_SHA_256" })).await?, "Mac")?;
        c.call("VerifyMac", &json!({ "KeyId": k, "Message": b64(b"token"), "Mac": m, "MacAlgorithm": "HMAC_SHA_256" })).await?;
        Ok(())
    })
    .await;
    let exe = std::env::current_exe()?;
    let hosts: Vec<String> = get("CAAS_HOSTS")
        .map(|h| {
            h.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if hosts.is_empty() {
        println!(
            "[--] skip               attestation: this deployment has no hosts (caas dev --hosts N)"
        );
    } else {
        st.run(&format!("Attestation: {} hosts enrolled (EK certificate checked, AK certified by MakeCredential/ActivateCredential)", hosts.len()), async {
            let out = tokio::process::Command::new(&exe).args(["host", "list"]).envs(env.iter().cloned()).output().await?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !hosts.iter().all(|h| text.contains(h.as_str())) {
                bail!("host list: {text} {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })
        .await;
        for h in &hosts {
            st.run(
                &format!(
                    "Attestation: attest {h} now (fresh nonce, quote, event-log replay, profile)"
                ),
                async {
                    let out = tokio::process::Command::new(&exe)
                        .args(["attest", h])
                        .envs(env.iter().cloned())
                        .output()
                        .await?;
                    if !out.status.success() {
                        bail!("not trusted: {}", String::from_utf8_lossy(&out.stdout));
                    }
                    Ok(())
                },
            )
            .await;
        }
    }
    st.run(
        "SDP: create a volume whose data key comes from the KMS (caas volume create)",
        async {
            let vol = dir.join("demo-created.caasvol");
            let _ = std::fs::remove_file(&vol);
            let out = tokio::process::Command::new(&exe)
                .args([
                    "volume",
                    "--kms-key-id",
                    "alias/caas-dev-volume",
                    "create",
                    "--size",
                    "16M",
                    "--out",
                ])
                .arg(&vol)
                .envs(env.iter().cloned())
                .output()
                .await?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            let info = tokio::process::Command::new(&exe)
                .args(["volume", "info"])
                .arg(&vol)
                .envs(env.iter().cloned())
                .output()
                .await?;
            if !info.status.success() {
                bail!("volume info: {}", String::from_utf8_lossy(&info.stderr));
            }
            Ok(())
        },
    )
    .await;
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| b"caas-demo-plaintext:"[(i % 20) as usize])
        .collect();
    let nbd_ok = st
        .run(
            "SDP: write 1 MiB through the encrypting NBD proxy, flush, read it back",
            async {
                let store = caas_sdp::store::Store::connect_nbd(&get("CAAS_NBD_URI")?)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                store
                    .write_at(1 << 20, &pattern)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                store.sync().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut back = vec![0u8; pattern.len()];
                store
                    .read_at(1 << 20, &mut back)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if back != pattern {
                    bail!("read back differs");
                }
                Ok(())
            },
        )
        .await;
    if nbd_ok.is_some() {
        st.run(
            "SDP: the ciphertext file holds no 16-byte run of the plaintext",
            async {
                let ct = tokio::fs::read(get("CAAS_VOLUME_FILE")?).await?;
                // The pattern has period 20, so its 16-byte runs are its first 20 windows.
                // Indexed by their first two bytes, so random ciphertext is rejected cheaply.
                let mut runs: std::collections::HashMap<[u8; 2], Vec<&[u8]>> = Default::default();
                for w in pattern.windows(16).take(20) {
                    runs.entry([w[0], w[1]]).or_default().push(w);
                }
                if ct
                    .windows(16)
                    .any(|w| runs.get(&[w[0], w[1]]).is_some_and(|c| c.contains(&w)))
                {
                    bail!("plaintext found in the ciphertext file");
                }
                Ok(())
            },
        )
        .await;
    }
    st.run(
        "VSM: generate a P-256 key in the crypto domain's token and sign with it",
        async {
            let (socket, pin) = (get("CAAS_PKCS11_SOCKET")?, get("CAAS_PKCS11_USER_PIN")?);
            let summary = tokio::task::spawn_blocking(move || {
                caas_domc::dev::demo_sign(std::path::Path::new(&socket), &pin)
            })
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("       {summary}");
            Ok(())
        },
    )
    .await;
    if get("CAAS_TTP_PUBLIC_KEY").is_ok() {
        tenant_story(&mut st, &dir, &get).await;
    }
    st.run(
        "Audit: the hash-chained, signed audit log verifies",
        async {
            let out = tokio::process::Command::new(&exe)
                .arg("audit")
                .arg("verify")
                .arg("--data-dir")
                .arg(&dir)
                .output()
                .await?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        },
    )
    .await;
    println!(
        "{} steps, {} failed, {:.1} ms in total",
        st.n,
        st.failed,
        total.elapsed().as_secs_f64() * 1000.0
    );
    if st.failed > 0 {
        bail!("{} demo step(s) failed", st.failed);
    }
    Ok(())
}

"""AWS KMS 2024-2026 additions with real, unmodified clients (boto3, the aws CLI) and
OpenSSL checking the results outside caas.

Run by crates/caas/tests/kms_parity.rs with the dev deployment's env (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...) and CAAS_TEST_OUT, a directory where the ML-DSA public keys,
messages and signatures are left for the Rust test to verify with aws-lc-rs. Every check
raises on failure; the script prints one line per check and exits non-zero if any failed.
"""
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import boto3
from botocore.exceptions import ClientError

ENDPOINT = os.environ["AWS_ENDPOINT_URL"]
OUT = os.environ["CAAS_TEST_OUT"]
kms = boto3.client("kms", endpoint_url=ENDPOINT)
results = []
TMP = tempfile.mkdtemp()


def check(fn):
    name = fn.__name__
    t = time.time()
    try:
        fn()
        results.append((name, True))
        print(f"ok    {name} ({(time.time() - t) * 1000:.0f} ms)", flush=True)
    except Exception:  # noqa: BLE001 - report every failure
        results.append((name, False))
        print(f"FAIL  {name}", flush=True)
        traceback.print_exc()
    return fn


def expect_error(code, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e}"
        return e
    raise AssertionError(f"expected {code}, call succeeded")


def aws(*args, ok=True):
    out = subprocess.run(["aws", "kms", *args, "--output", "json"], capture_output=True, text=True)
    if not ok:
        assert out.returncode != 0, f"aws kms {' '.join(args)} succeeded"
        return out.stderr
    if out.returncode != 0:
        raise AssertionError(f"aws kms {' '.join(args)}: {out.stderr}")
    return json.loads(out.stdout) if out.stdout.strip() else {}


def path(name, data=None):
    p = os.path.join(TMP, name)
    if data is not None:
        with open(p, "wb") as f:
            f.write(data)
    return p


def openssl(*args, ok=True):
    out = subprocess.run(["openssl", *args], capture_output=True)
    if ok:
        assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr.decode()}"
    return out


def spki_pem(der, name):
    p = path(name + ".der", der)
    pem = path(name + ".pem")
    openssl("pkey", "-pubin", "-inform", "DER", "-in", p, "-out", pem)
    return pem


def ml_dsa_raw_public_key(spki):
    # SPKI = SEQUENCE { SEQUENCE { OID }, BIT STRING (0 unused bits) pk }: pk is the tail.
    n = {0x11: 1312, 0x12: 1952, 0x13: 2592}[spki[spki.index(bytes.fromhex("06096086480165030403")) + 10]]
    return spki[-n:]


def external_mu(pk, msg):
    # FIPS 204: tr = H(pk, 64); mu = H(tr || M', 64) with M' = 0 || len(ctx)=0 || M.
    tr = hashlib.shake_256(pk).digest(64)
    return hashlib.shake_256(tr + b"\x00\x00" + msg).digest(64)


@check
def ml_dsa_sign_verify_tamper_and_external_mu_with_boto3():
    for spec in ["ML_DSA_44", "ML_DSA_65", "ML_DSA_87"]:
        k = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        assert k["SigningAlgorithms"] == ["ML_DSA_SHAKE_256"], k
        kid = k["KeyId"]
        pub = kms.get_public_key(KeyId=kid)
        assert pub["KeySpec"] == spec and pub["KeyUsage"] == "SIGN_VERIFY"
        spki = pub["PublicKey"]
        msg = f"post-quantum message for {spec}".encode() * 20
        sig = kms.sign(KeyId=kid, Message=msg, SigningAlgorithm="ML_DSA_SHAKE_256",
                       MessageType="RAW")["Signature"]
        assert kms.verify(KeyId=kid, Message=msg, Signature=sig,
                          SigningAlgorithm="ML_DSA_SHAKE_256")["SignatureValid"]
        bad = bytearray(sig)
        bad[len(bad) // 2] ^= 0x01
        expect_error("KMSInvalidSignatureException", kms.verify, KeyId=kid, Message=msg,
                     Signature=bytes(bad), SigningAlgorithm="ML_DSA_SHAKE_256")
        expect_error("KMSInvalidSignatureException", kms.verify, KeyId=kid, Message=msg + b"!",
                     Signature=sig, SigningAlgorithm="ML_DSA_SHAKE_256")
        # The caller computes mu from the public key and the message; KMS signs mu; the
        # signature verifies as one over the raw message (here and, in Rust, in aws-lc-rs).
        mu = external_mu(ml_dsa_raw_public_key(spki), msg)
        musig = kms.sign(KeyId=kid, Message=mu, SigningAlgorithm="ML_DSA_SHAKE_256",
                         MessageType="EXTERNAL_MU")["Signature"]
        assert kms.verify(KeyId=kid, Message=msg, Signature=musig,
                          SigningAlgorithm="ML_DSA_SHAKE_256", MessageType="RAW")["SignatureValid"]
        assert kms.verify(KeyId=kid, Message=mu, Signature=sig,
                          SigningAlgorithm="ML_DSA_SHAKE_256", MessageType="EXTERNAL_MU")["SignatureValid"]
        expect_error("ValidationException", kms.sign, KeyId=kid, Message=mu[:63],
                     SigningAlgorithm="ML_DSA_SHAKE_256", MessageType="EXTERNAL_MU")
        expect_error("ValidationException", kms.sign, KeyId=kid, Message=b"x" * 4097,
                     SigningAlgorithm="ML_DSA_SHAKE_256")
        for name, data in [("spki", spki), ("msg", msg), ("sig", sig), ("musig", musig)]:
            with open(os.path.join(OUT, f"{spec}.{name}"), "wb") as f:
                f.write(data)


@check
def ml_dsa_with_the_aws_cli():
    k = aws("create-key", "--key-spec", "ML_DSA_65", "--key-usage", "SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    m = path("cli-msg", b"signed through the aws cli")
    sig = aws("sign", "--key-id", k, "--message", f"fileb://{m}",
              "--signing-algorithm", "ML_DSA_SHAKE_256")["Signature"]
    s = path("cli-sig", base64.b64decode(sig))
    assert aws("verify", "--key-id", k, "--message", f"fileb://{m}", "--signature", f"fileb://{s}",
               "--signing-algorithm", "ML_DSA_SHAKE_256")["SignatureValid"] is True
    bad = bytearray(base64.b64decode(sig))
    bad[7] ^= 0x40
    b = path("cli-bad", bytes(bad))
    err = aws("verify", "--key-id", k, "--message", f"fileb://{m}", "--signature", f"fileb://{b}",
              "--signing-algorithm", "ML_DSA_SHAKE_256", ok=False)
    assert "KMSInvalidSignatureException" in err, err


@check
def ed25519_signatures_verify_with_openssl_pkeyutl_rawin():
    k = kms.create_key(KeySpec="ECC_NIST_EDWARDS25519", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert k["SigningAlgorithms"] == ["ED25519_SHA_512", "ED25519_PH_SHA_512"], k
    kid = k["KeyId"]
    pem = spki_pem(kms.get_public_key(KeyId=kid)["PublicKey"], "ed")
    msg = b"Ed25519 through caas, verified by OpenSSL"
    sig = kms.sign(KeyId=kid, Message=msg, SigningAlgorithm="ED25519_SHA_512",
                   MessageType="RAW")["Signature"]
    assert len(sig) == 64
    m, s = path("ed-msg", msg), path("ed-sig", sig)
    out = openssl("pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", m, "-sigfile", s)
    assert b"Signature Verified Successfully" in out.stdout, out
    bad = bytearray(sig)
    bad[0] ^= 1
    out = openssl("pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", m,
                  "-sigfile", path("ed-bad", bytes(bad)), ok=False)
    assert out.returncode != 0 and b"Signature Verified Successfully" not in out.stdout
    # The same with the aws CLI.
    sig2 = base64.b64decode(aws("sign", "--key-id", kid, "--message", f"fileb://{m}",
                                "--signing-algorithm", "ED25519_SHA_512")["Signature"])
    out = openssl("pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", m,
                  "-sigfile", path("ed-sig2", sig2))
    assert b"Signature Verified Successfully" in out.stdout
    # Ed25519ph over a SHA-512 digest (DIGEST only); RAW is refused.
    d = hashlib.sha512(msg).digest()
    ph = kms.sign(KeyId=kid, Message=d, SigningAlgorithm="ED25519_PH_SHA_512",
                  MessageType="DIGEST")["Signature"]
    assert ph != sig
    assert kms.verify(KeyId=kid, Message=d, Signature=ph, SigningAlgorithm="ED25519_PH_SHA_512",
                      MessageType="DIGEST")["SignatureValid"]
    expect_error("KMSInvalidSignatureException", kms.verify, KeyId=kid, Message=d, Signature=sig,
                 SigningAlgorithm="ED25519_PH_SHA_512", MessageType="DIGEST")
    expect_error("ValidationException", kms.sign, KeyId=kid, Message=msg,
                 SigningAlgorithm="ED25519_PH_SHA_512", MessageType="RAW")
    expect_error("ValidationException", kms.sign, KeyId=kid, Message=d,
                 SigningAlgorithm="ED25519_SHA_512", MessageType="DIGEST")


@check
def ed25519_data_key_pair_signs_verifiably_with_openssl():
    sym = kms.create_key()["KeyMetadata"]["KeyId"]
    p = kms.generate_data_key_pair(KeyId=sym, KeyPairSpec="ECC_NIST_EDWARDS25519")
    assert p["KeyPairSpec"] == "ECC_NIST_EDWARDS25519"
    priv = path("dkp.der", p["PrivateKeyPlaintext"])
    pem = spki_pem(p["PublicKey"], "dkp-pub")
    m = path("dkp-msg", b"data key pair message")
    sig = path("dkp-sig")
    openssl("pkeyutl", "-sign", "-inkey", priv, "-keyform", "DER", "-rawin", "-in", m, "-out", sig)
    out = openssl("pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", m, "-sigfile", sig)
    assert b"Signature Verified Successfully" in out.stdout
    w = kms.generate_data_key_pair_without_plaintext(KeyId=sym, KeyPairSpec="ECC_NIST_EDWARDS25519")
    assert "PrivateKeyPlaintext" not in w
    again = kms.decrypt(CiphertextBlob=w["PrivateKeyCiphertextBlob"])["Plaintext"]
    out = openssl("pkey", "-inform", "DER", "-in", path("dkp2.der", again), "-pubout", "-outform", "DER")
    assert out.stdout == w["PublicKey"]


@check
def ecdh_shared_secrets_equal_a_local_openssl_ecdh():
    for spec, curve in [("ECC_NIST_P256", "P-256"), ("ECC_NIST_P384", "P-384"), ("ECC_NIST_P521", "P-521")]:
        k = kms.create_key(KeySpec=spec, KeyUsage="KEY_AGREEMENT")["KeyMetadata"]
        assert k["KeyUsage"] == "KEY_AGREEMENT" and k["KeyAgreementAlgorithms"] == ["ECDH"], k
        kid = k["KeyId"]
        pub = kms.get_public_key(KeyId=kid)
        assert pub["KeyAgreementAlgorithms"] == ["ECDH"]
        kms_pem = spki_pem(pub["PublicKey"], f"kms-{curve}")
        mine = path(f"mine-{curve}.pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{curve}", "-out", mine)
        my_spki = openssl("pkey", "-in", mine, "-pubout", "-outform", "DER").stdout
        r = kms.derive_shared_secret(KeyId=kid, KeyAgreementAlgorithm="ECDH", PublicKey=my_spki)
        assert r["KeyAgreementAlgorithm"] == "ECDH" and r["KeyOrigin"] == "AWS_KMS"
        local = openssl("pkeyutl", "-derive", "-inkey", mine, "-peerkey", kms_pem).stdout
        assert r["SharedSecret"] == local, spec
        # The aws CLI (v1 takes the DER from a file).
        cli = aws("derive-shared-secret", "--key-id", kid, "--key-agreement-algorithm", "ECDH",
                  "--public-key", f"fileb://{path(f'mine-{curve}.der', my_spki)}")
        assert base64.b64decode(cli["SharedSecret"]) == local
        # GetKeyLastUsage names this derivation.
        u = kms.get_key_last_usage(KeyId=kid)
        assert u["KeyLastUsage"]["Operation"] == "DeriveSharedSecret", u
        # A SIGN_VERIFY key cannot derive.
    sv = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    expect_error("InvalidKeyUsageException", kms.derive_shared_secret, KeyId=sv,
                 KeyAgreementAlgorithm="ECDH", PublicKey=my_spki)


@check
def get_key_last_usage_after_an_operation():
    k = kms.create_key(KeySpec="ML_DSA_44", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    u = kms.get_key_last_usage(KeyId=k["KeyId"])
    assert u.get("KeyLastUsage", {}) == {}, u
    assert u["KeyCreationDate"] == k["CreationDate"]
    # Tracking began when the node started, before this key existed.
    assert u["TrackingStartDate"] == u["KeyCreationDate"], u
    r = kms.sign(KeyId=k["KeyId"], Message=b"use", SigningAlgorithm="ML_DSA_SHAKE_256")
    rid = r["ResponseMetadata"]["RequestId"]
    u = kms.get_key_last_usage(KeyId=k["Arn"])
    assert u["KeyId"] == k["KeyId"]
    assert u["KeyLastUsage"]["Operation"] == "Sign", u
    assert u["KeyLastUsage"]["KmsRequestId"] == rid
    assert u["KeyLastUsage"]["Timestamp"] >= k["CreationDate"]
    cli = aws("get-key-last-usage", "--key-id", k["KeyId"])
    assert cli["KeyLastUsage"]["Operation"] == "Sign", cli


@check
def dry_run_with_boto3_and_the_aws_cli():
    k = kms.create_key(KeySpec="ECC_NIST_EDWARDS25519", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    e = expect_error("DryRunOperationException", kms.sign, KeyId=k, Message=b"m",
                     SigningAlgorithm="ED25519_SHA_512", DryRun=True)
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    expect_error("ValidationException", kms.sign, KeyId=k, Message=b"m",
                 SigningAlgorithm="ED25519_PH_SHA_512", DryRun=True)
    sym = kms.create_key()["KeyMetadata"]["KeyId"]
    expect_error("DryRunOperationException", kms.encrypt, KeyId=sym, Plaintext=b"x", DryRun=True)
    expect_error("DryRunOperationException", kms.generate_data_key, KeyId=sym, KeySpec="AES_256",
                 DryRun=True)
    m = path("dry-msg", b"m")
    err = aws("sign", "--key-id", k, "--message", f"fileb://{m}", "--signing-algorithm",
              "ED25519_SHA_512", "--dry-run", ok=False)
    assert "DryRunOperationException" in err, err
    assert kms.get_key_last_usage(KeyId=k).get("KeyLastUsage", {}) == {}
    assert kms.get_key_last_usage(KeyId=sym).get("KeyLastUsage", {}) == {}


@check
def ml_kem_encapsulate_decapsulate_with_boto3():
    for spec in ["ML_KEM_512", "ML_KEM_768", "ML_KEM_1024"]:
        k = kms.create_key(KeySpec=spec, KeyUsage="ENCAPSULATE_DECAPSULATE")["KeyMetadata"]
        assert k["EncapsulationAlgorithms"] == ["ML_KEM"], k
        e = kms.encapsulate(KeyId=k["KeyId"], EncapsulationAlgorithm="ML_KEM")
        d = kms.decapsulate(KeyId=k["KeyId"], EncapsulationAlgorithm="ML_KEM",
                            SharedSecretCiphertextBlob=e["SharedSecretCiphertextBlob"])
        assert d["SharedSecret"] == e["SharedSecret"] and len(d["SharedSecret"]) == 32
        # (The aws CLI v1's bundled service model, awscli 1.46, has no Encapsulate or
        # Decapsulate yet; boto3's botocore 1.44 has.)
        expect_error("ValidationException", kms.decapsulate, KeyId=k["KeyId"],
                     EncapsulationAlgorithm="ML_KEM",
                     SharedSecretCiphertextBlob=e["SharedSecretCiphertextBlob"][:-1])


failed = [n for n, ok in results if not ok]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)

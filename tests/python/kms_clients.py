"""Real, unmodified AWS clients against a running `caas dev` key service.

Run by crates/caas/tests/kms_clients.rs with the dev deployment's env (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...). Every check raises on failure; the script prints one line per check
and exits non-zero if any failed.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import boto3
import botocore
from botocore.exceptions import ClientError

ENDPOINT = os.environ["AWS_ENDPOINT_URL"]
kms = boto3.client("kms", endpoint_url=ENDPOINT)
results = []


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


def aws(*args):
    out = subprocess.run(["aws", "kms", *args, "--output", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"aws kms {' '.join(args)}: {out.stderr}")
    return json.loads(out.stdout) if out.stdout.strip() else {}


@check
def aws_cli_create_key_alias_and_list():
    key = aws("create-key", "--description", "from the aws cli")["KeyMetadata"]
    assert key["KeyState"] == "Enabled" and key["KeySpec"] == "SYMMETRIC_DEFAULT"
    aws("create-alias", "--alias-name", "alias/cli-test", "--target-key-id", key["KeyId"])
    ids = [k["KeyId"] for k in aws("list-keys")["Keys"]]
    assert key["KeyId"] in ids
    aliases = {a["AliasName"]: a.get("TargetKeyId") for a in aws("list-aliases")["Aliases"]}
    assert aliases["alias/cli-test"] == key["KeyId"]
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(b"cli secret")
    ct = aws("encrypt", "--key-id", "alias/cli-test", "--plaintext", f"fileb://{f.name}",
             "--encryption-context", "app=cli")["CiphertextBlob"]
    ctf = f.name + ".ct"
    with open(ctf, "wb") as g:
        g.write(base64.b64decode(ct))
    pt = aws("decrypt", "--ciphertext-blob", f"fileb://{ctf}", "--encryption-context", "app=cli")["Plaintext"]
    assert base64.b64decode(pt) == b"cli secret"


@check
def encrypt_decrypt_with_context_and_wrong_context_fails():
    k = kms.create_key(Description="ctx")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/ctx-test", TargetKeyId=k)
    ct = kms.encrypt(KeyId="alias/ctx-test", Plaintext=b"canary-plaintext-1",
                     EncryptionContext={"dept": "hr"})["CiphertextBlob"]
    r = kms.decrypt(CiphertextBlob=ct, EncryptionContext={"dept": "hr"})
    assert r["Plaintext"] == b"canary-plaintext-1" and r["KeyId"].endswith(k)
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=ct, EncryptionContext={"dept": "it"})
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=ct)
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    expect_error("IncorrectKeyException", kms.decrypt, CiphertextBlob=ct, KeyId=other, EncryptionContext={"dept": "hr"})
    # The exception classes boto3 raises are the modelled ones.
    try:
        kms.decrypt(CiphertextBlob=ct)
    except kms.exceptions.InvalidCiphertextException:
        pass


@check
def re_encrypt_to_another_key():
    a = kms.create_key()["KeyMetadata"]["KeyId"]
    b = kms.create_key()["KeyMetadata"]["KeyId"]
    ct = kms.encrypt(KeyId=a, Plaintext=b"move me", EncryptionContext={"x": "1"})["CiphertextBlob"]
    r = kms.re_encrypt(CiphertextBlob=ct, SourceEncryptionContext={"x": "1"}, DestinationKeyId=b,
                       DestinationEncryptionContext={"y": "2"})
    assert r["KeyId"].endswith(b) and r["SourceKeyId"].endswith(a)
    assert kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext={"y": "2"})["Plaintext"] == b"move me"


@check
def data_keys_and_data_key_pairs():
    k = kms.create_key()["KeyMetadata"]["KeyId"]
    d = kms.generate_data_key(KeyId=k, KeySpec="AES_256", EncryptionContext={"f": "1"})
    assert len(d["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=d["CiphertextBlob"], EncryptionContext={"f": "1"})["Plaintext"] == d["Plaintext"]
    w = kms.generate_data_key_without_plaintext(KeyId=k, NumberOfBytes=64)
    assert "Plaintext" not in w
    assert len(kms.decrypt(CiphertextBlob=w["CiphertextBlob"])["Plaintext"]) == 64
    p = kms.generate_data_key_pair(KeyId=k, KeyPairSpec="ECC_NIST_P256")
    assert kms.decrypt(CiphertextBlob=p["PrivateKeyCiphertextBlob"])["Plaintext"] == p["PrivateKeyPlaintext"]
    from cryptography.hazmat.primitives.serialization import load_der_private_key, load_der_public_key
    priv = load_der_private_key(p["PrivateKeyPlaintext"], None)
    pub = load_der_public_key(p["PublicKey"])
    assert priv.public_key().public_numbers() == pub.public_numbers()
    q = kms.generate_data_key_pair_without_plaintext(KeyId=k, KeyPairSpec="RSA_2048")
    assert "PrivateKeyPlaintext" not in q and len(q["PublicKey"]) > 200
    assert len(kms.generate_random(NumberOfBytes=100)["Plaintext"]) == 100


def openssl_verify(pub_der, msg, sig, digest, pss=False):
    with tempfile.TemporaryDirectory() as d:
        for name, data in (("pub.der", pub_der), ("msg", msg), ("sig", sig)):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        subprocess.run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", f"{d}/pub.der", "-out", f"{d}/pub.pem"], check=True)
        cmd = ["openssl", "dgst", f"-{digest}", "-verify", f"{d}/pub.pem", "-signature", f"{d}/sig"]
        if pss:
            cmd += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"]
        out = subprocess.run(cmd + [f"{d}/msg"], capture_output=True, text=True)
        assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr


@check
def sign_verify_rsa_and_ecdsa_also_with_openssl():
    cases = [("ECC_NIST_P256", "ECDSA_SHA_256", "sha256", False), ("ECC_NIST_P384", "ECDSA_SHA_384", "sha384", False),
             ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_256", "sha256", False), ("RSA_2048", "RSASSA_PSS_SHA_256", "sha256", True)]
    for spec, alg, dg, pss in cases:
        k = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        msg = b"sign me " + spec.encode()
        sig = kms.sign(KeyId=k, Message=msg, SigningAlgorithm=alg)["Signature"]
        assert kms.verify(KeyId=k, Message=msg, Signature=sig, SigningAlgorithm=alg)["SignatureValid"]
        expect_error("KMSInvalidSignatureException", kms.verify, KeyId=k, Message=msg + b"!", Signature=sig, SigningAlgorithm=alg)
        pub = kms.get_public_key(KeyId=k)["PublicKey"]
        openssl_verify(pub, msg, sig, dg, pss)
        import hashlib
        h = getattr(hashlib, dg)(msg).digest()
        sig2 = kms.sign(KeyId=k, Message=h, MessageType="DIGEST", SigningAlgorithm=alg)["Signature"]
        assert kms.verify(KeyId=k, Message=msg, Signature=sig2, SigningAlgorithm=alg)["SignatureValid"]


@check
def rsa_encrypt_decrypt_oaep():
    k = kms.create_key(KeySpec="RSA_3072", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    for alg in ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"):
        ct = kms.encrypt(KeyId=k, Plaintext=b"rsa secret", EncryptionAlgorithm=alg)["CiphertextBlob"]
        assert kms.decrypt(KeyId=k, CiphertextBlob=ct, EncryptionAlgorithm=alg)["Plaintext"] == b"rsa secret"


@check
def mac_generate_verify():
    for spec, alg in (("HMAC_256", "HMAC_SHA_256"), ("HMAC_512", "HMAC_SHA_512"), ("HMAC_224", "HMAC_SHA_224")):
        k = kms.create_key(KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
        mac = kms.generate_mac(KeyId=k, Message=b"m", MacAlgorithm=alg)["Mac"]
        assert kms.verify_mac(KeyId=k, Message=b"m", Mac=mac, MacAlgorithm=alg)["MacValid"]
        expect_error("KMSInvalidMacException", kms.verify_mac, KeyId=k, Message=b"n", Mac=mac, MacAlgorithm=alg)


@check
def rotation_on_demand_keeps_old_ciphertexts():
    k = kms.create_key()["KeyMetadata"]["KeyId"]
    old = kms.encrypt(KeyId=k, Plaintext=b"before rotation")["CiphertextBlob"]
    kms.enable_key_rotation(KeyId=k, RotationPeriodInDays=90)
    st = kms.get_key_rotation_status(KeyId=k)
    assert st["KeyRotationEnabled"] and st["RotationPeriodInDays"] == 90
    kms.rotate_key_on_demand(KeyId=k)
    new = kms.encrypt(KeyId=k, Plaintext=b"after rotation")["CiphertextBlob"]
    assert old != new
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before rotation"
    assert kms.decrypt(CiphertextBlob=new)["Plaintext"] == b"after rotation"
    rots = kms.list_key_rotations(KeyId=k)["Rotations"]
    assert len(rots) == 1 and rots[0]["RotationType"] == "ON_DEMAND"
    kms.disable_key_rotation(KeyId=k)
    assert not kms.get_key_rotation_status(KeyId=k)["KeyRotationEnabled"]


@check
def disable_enable_and_deletion_schedule():
    k = kms.create_key()["KeyMetadata"]["KeyId"]
    ct = kms.encrypt(KeyId=k, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=k)
    assert kms.describe_key(KeyId=k)["KeyMetadata"]["KeyState"] == "Disabled"
    expect_error("DisabledException", kms.encrypt, KeyId=k, Plaintext=b"x")
    expect_error("DisabledException", kms.decrypt, CiphertextBlob=ct)
    kms.enable_key(KeyId=k)
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"x"
    expect_error("ValidationException", kms.schedule_key_deletion, KeyId=k, PendingWindowInDays=3)
    r = kms.schedule_key_deletion(KeyId=k, PendingWindowInDays=7)
    assert r["KeyState"] == "PendingDeletion"
    expect_error("KMSInvalidStateException", kms.encrypt, KeyId=k, Plaintext=b"x")
    kms.cancel_key_deletion(KeyId=k)
    assert kms.describe_key(KeyId=k)["KeyMetadata"]["KeyState"] == "Disabled"
    kms.enable_key(KeyId=k)
    kms.update_key_description(KeyId=k, Description="renamed")
    assert kms.describe_key(KeyId=k)["KeyMetadata"]["Description"] == "renamed"


@check
def import_key_material_round_trip():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    k = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    assert k["KeyState"] == "PendingImport" and k["Origin"] == "EXTERNAL"
    kid = k["KeyId"]
    material = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    p = kms.get_parameters_for_import(KeyId=kid, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")
    wrapped = load_der_public_key(p["PublicKey"]).encrypt(material, oaep)
    kms.import_key_material(KeyId=kid, ImportToken=p["ImportToken"], EncryptedKeyMaterial=wrapped,
                            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    ct = kms.encrypt(KeyId=kid, Plaintext=b"imported")["CiphertextBlob"]
    kms.delete_imported_key_material(KeyId=kid)
    expect_error("KMSInvalidStateException", kms.decrypt, CiphertextBlob=ct)
    # Re-import the same material with the RSA_AES_KEY_WRAP_SHA_256 scheme.
    p = kms.get_parameters_for_import(KeyId=kid, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_256", WrappingKeySpec="RSA_3072")
    aes = os.urandom(32)
    wrapped = load_der_public_key(p["PublicKey"]).encrypt(aes, oaep) + aes_key_wrap_with_padding(aes, material)
    kms.import_key_material(KeyId=kid, ImportToken=p["ImportToken"], EncryptedKeyMaterial=wrapped,
                            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"imported"
    # Different material is refused.
    p = kms.get_parameters_for_import(KeyId=kid, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")
    wrapped = load_der_public_key(p["PublicKey"]).encrypt(os.urandom(32), oaep)
    expect_error("IncorrectKeyMaterialException", kms.import_key_material, KeyId=kid, ImportToken=p["ImportToken"],
                 EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    with open(os.environ.get("CAAS_TEST_CANARY_FILE", "/dev/null"), "ab") as f:
        f.write(material)


@check
def grants_allow_a_second_principal():
    account = os.environ["CAAS_ACCOUNT_ID"]
    second = os.environ.get("CAAS_TEST_SECOND_ACCESS_KEY_ID")
    assert second, "the test harness must provide a second access key"
    k = kms.create_key(Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:user/dev"}, "Action": "kms:*", "Resource": "*"}]}))["KeyMetadata"]["KeyId"]
    other = boto3.client("kms", endpoint_url=ENDPOINT, aws_access_key_id=second,
                         aws_secret_access_key=os.environ["CAAS_TEST_SECOND_SECRET"])
    ct = kms.encrypt(KeyId=k, Plaintext=b"granted", EncryptionContext={"team": "a"})["CiphertextBlob"]
    expect_error("AccessDeniedException", other.decrypt, CiphertextBlob=ct, EncryptionContext={"team": "a"})
    g = kms.create_grant(KeyId=k, GranteePrincipal=f"arn:aws:iam::{account}:user/second", Operations=["Decrypt"],
                         Constraints={"EncryptionContextSubset": {"team": "a"}})
    expect_error("InvalidGrantTokenException", other.decrypt, CiphertextBlob=ct, EncryptionContext={"team": "a"},
                 GrantTokens=["not-a-grant-token"])
    r = other.decrypt(CiphertextBlob=ct, EncryptionContext={"team": "a"}, GrantTokens=[g["GrantToken"]])
    assert r["Plaintext"] == b"granted"
    expect_error("AccessDeniedException", other.encrypt, KeyId=k, Plaintext=b"no")
    grants = kms.list_grants(KeyId=k)["Grants"]
    assert [x["GrantId"] for x in grants] == [g["GrantId"]]
    kms.revoke_grant(KeyId=k, GrantId=g["GrantId"])
    expect_error("AccessDeniedException", other.decrypt, CiphertextBlob=ct, EncryptionContext={"team": "a"})


@check
def key_policy_and_tags():
    k = kms.create_key(Tags=[{"TagKey": "env", "TagValue": "test"}])["KeyMetadata"]["KeyId"]
    assert kms.list_resource_tags(KeyId=k)["Tags"] == [{"TagKey": "env", "TagValue": "test"}]
    kms.tag_resource(KeyId=k, Tags=[{"TagKey": "owner", "TagValue": "me"}])
    kms.untag_resource(KeyId=k, TagKeys=["env"])
    assert kms.list_resource_tags(KeyId=k)["Tags"] == [{"TagKey": "owner", "TagValue": "me"}]
    assert kms.list_key_policies(KeyId=k)["PolicyNames"] == ["default"]
    pol = json.loads(kms.get_key_policy(KeyId=k, PolicyName="default")["Policy"])
    pol["Statement"].append({"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "kms:Encrypt", "Resource": "*",
                             "Condition": {"StringEquals": {"kms:EncryptionContext:class": "secret"}}})
    kms.put_key_policy(KeyId=k, PolicyName="default", Policy=json.dumps(pol))
    kms.encrypt(KeyId=k, Plaintext=b"ok", EncryptionContext={"class": "public"})
    expect_error("AccessDeniedException", kms.encrypt, KeyId=k, Plaintext=b"no", EncryptionContext={"class": "secret"})
    expect_error("MalformedPolicyDocumentException", kms.put_key_policy, KeyId=k, PolicyName="default", Policy="{not json")


@check
def errors_have_aws_shapes():
    expect_error("NotFoundException", kms.describe_key, KeyId="00000000-0000-0000-0000-000000000000")
    expect_error("NotFoundException", kms.encrypt, KeyId="alias/nope", Plaintext=b"x")
    k = kms.create_key()["KeyMetadata"]["KeyId"]
    expect_error("ValidationException", kms.encrypt, KeyId=k, Plaintext=b"x" * 4097)
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=b"\x01" * 80)
    ct = bytearray(kms.encrypt(KeyId=k, Plaintext=b"tamper")["CiphertextBlob"])
    for i in (0, 1, 10, len(ct) // 2, len(ct) - 1):
        t = bytearray(ct)
        t[i] ^= 0x40
        expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=bytes(t))
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=bytes(ct[:40]))
    kms.create_alias(AliasName="alias/dup", TargetKeyId=k)
    expect_error("AlreadyExistsException", kms.create_alias, AliasName="alias/dup", TargetKeyId=k)
    bad = boto3.client("kms", endpoint_url=ENDPOINT, aws_access_key_id="AKIANOTAKEY", aws_secret_access_key="x")
    expect_error("UnrecognizedClientException", bad.list_keys)
    wrong = boto3.client("kms", endpoint_url=ENDPOINT, aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong")
    expect_error("InvalidSignatureException", wrong.list_keys)


@check
def aws_encryption_sdk_round_trip():
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy
    k = kms.create_key()["KeyMetadata"]
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    session = botocore.session.Session()
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[k["Arn"]], botocore_session=session)
    message = b"a message for the AWS Encryption SDK " * 10
    ct, _ = client.encrypt(source=message, key_provider=provider, encryption_context={"purpose": "esdk"})
    pt, hdr = client.decrypt(source=ct, key_provider=provider)
    assert pt == message and hdr.encryption_context["purpose"] == "esdk"


failed = [n for n, ok in results if not ok]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)

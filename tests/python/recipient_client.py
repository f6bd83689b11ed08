"""One KMS call with the real, unmodified boto3 client, for crates/caas/tests/recipient_attacks.rs.

Usage: recipient_client.py OPERATION PARAMS_JSON
String values of PARAMS_JSON that start with "b64:" are decoded to bytes (at any depth), and
"file:PATH" to the bytes of PATH (the attestation document), so `Recipient` reaches boto3 as
its documented shape: {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b"..."}.
Prints one JSON object: the response (bytes as base64), or {"Error": code, "Message": ...}.
"""
import base64
import json
import os
import sys

import boto3
from botocore.exceptions import ClientError


def decode(v):
    if isinstance(v, dict):
        return {k: decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode(x) for x in v]
    if isinstance(v, str) and v.startswith("b64:"):
        return base64.b64decode(v[4:])
    if isinstance(v, str) and v.startswith("file:"):
        with open(v[5:], "rb") as f:
            return f.read()
    return v


def encode(v):
    if isinstance(v, dict):
        return {k: encode(x) for k, x in v.items() if k != "ResponseMetadata"}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def main():
    op, params = sys.argv[1], decode(json.loads(sys.argv[2]))
    kms = boto3.client("kms", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    method = "".join("_" + c.lower() if c.isupper() else c for c in op).lstrip("_")
    try:
        out = getattr(kms, method)(**params)
        print(json.dumps(encode(out)))
    except ClientError as e:
        print(json.dumps({"Error": e.response["Error"]["Code"], "Message": e.response["Error"].get("Message", "")}))


main()

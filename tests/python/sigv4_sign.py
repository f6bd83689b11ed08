"""Signs HTTP requests with botocore's own SigV4 signer (botocore.auth.SigV4Auth) and
prints them as JSON, for the Rust tests of the key service's SigV4 verifier.

Two modes:
  sigv4_sign.py sign      stdin: a JSON list of request specs; stdout: the signed requests.
  sigv4_sign.py random N SEED
                          N random KMS-shaped requests (random operation, JSON body,
                          extra headers, query, credentials, region, time), signed.

A spec: {"method", "url", "headers": {name: value}, "body_b64", "region", "service",
         "access_key", "secret", optional "token", optional "timestamp" (YYYYMMDDTHHMMSSZ)}.
A signed request: {"method", "path", "query", "headers": [[lower-case name, value], ...]
         (including host and authorization), "body_b64", "secret", "region", "service"}.
Nothing is sent anywhere.
"""
import base64
import datetime
import json
import random
import string
import sys
from urllib.parse import quote, urlsplit

import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def host_of(url):
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is None or parts.port == default:
        return parts.hostname
    return f"{parts.hostname}:{parts.port}"


def sign(spec):
    creds = Credentials(spec["access_key"], spec["secret"], spec.get("token"))
    body = base64.b64decode(spec.get("body_b64", ""))
    req = AWSRequest(method=spec.get("method", "POST"), url=spec["url"], data=body,
                     headers=dict(spec.get("headers", {})))
    ts = spec.get("timestamp")
    saved = botocore.auth.get_current_datetime
    if ts:
        fixed = datetime.datetime.strptime(ts, "%Y%m%dT%H%M%SZ")
        botocore.auth.get_current_datetime = lambda: fixed
    try:
        SigV4Auth(creds, spec.get("service", "kms"), spec["region"]).add_auth(req)
    finally:
        botocore.auth.get_current_datetime = saved
    parts = urlsplit(req.url)
    headers = [[k.lower(), v] for k, v in req.headers.items()]
    if not any(k == "host" for k, _ in headers):
        headers.append(["host", host_of(req.url)])
    return {
        "method": req.method,
        "path": parts.path or "/",
        "query": parts.query,
        "headers": headers,
        "body_b64": base64.b64encode(req.body or b"").decode(),
        "secret": spec["secret"],
        "region": spec["region"],
        "service": spec.get("service", "kms"),
    }


OPERATIONS = ["Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "DescribeKey", "ListKeys",
              "CreateGrant", "ScheduleKeyDeletion", "PutKeyPolicy", "Sign", "GenerateMac"]
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2", "caas-local"]


def rand_text(rng, n, alphabet=string.ascii_letters + string.digits + " -_.~/+=:,;'\"!@#$%^&*()[]{}<>?é€"):
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_spec(rng):
    op = rng.choice(OPERATIONS)
    body = {"KeyId": f"alias/{rand_text(rng, rng.randint(1, 12), string.ascii_lowercase)}"}
    if rng.random() < 0.6:
        body["EncryptionContext"] = {rand_text(rng, rng.randint(1, 8)): rand_text(rng, rng.randint(0, 16))
                                     for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.5:
        body["Plaintext"] = base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))).decode()
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
    if rng.random() < 0.1:
        raw = b""
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"TrentService.{op}"}
    if rng.random() < 0.5:
        headers["User-Agent"] = f"Boto3/1.0 {rand_text(rng, 10, string.ascii_letters)}"
    for _ in range(rng.randint(0, 3)):
        name = "X-Amz-" + rand_text(rng, rng.randint(1, 10), string.ascii_letters + "-")
        headers[name] = rand_text(rng, rng.randint(1, 20), string.ascii_letters + string.digits + "  \t-.,")
    path = "/"
    query = ""
    if rng.random() < 0.3:
        pairs = [(quote(rand_text(rng, rng.randint(1, 6)), safe="-_.~"),
                  quote(rand_text(rng, rng.randint(0, 6)), safe="-_.~")) for _ in range(rng.randint(1, 3))]
        query = "?" + "&".join(f"{k}={v}" for k, v in pairs)
    if rng.random() < 0.2:
        path = "/" + "/".join(quote(rand_text(rng, rng.randint(1, 6), string.ascii_letters + string.digits + "-_~ "),
                                    safe="-_.~") for _ in range(rng.randint(1, 3)))
    port = rng.choice([None, 443, 4000, 8443])
    url = "https://kms.example.test" + (f":{port}" if port else "") + path + query
    t = datetime.datetime(2000, 1, 1) + datetime.timedelta(seconds=rng.randrange(0, 40 * 365 * 86400))
    spec = {
        "method": "POST", "url": url, "headers": headers, "body_b64": base64.b64encode(raw).decode(),
        "region": rng.choice(REGIONS), "service": "kms",
        "access_key": "AKIA" + rand_text(rng, 16, string.ascii_uppercase + "234567"),
        "secret": rand_text(rng, 40, string.ascii_letters + string.digits + "+/"),
        "timestamp": t.strftime("%Y%m%dT%H%M%SZ"),
    }
    if rng.random() < 0.2:
        spec["token"] = base64.b64encode(bytes(rng.randrange(256) for _ in range(48))).decode()
    return spec


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "sign":
        specs = json.load(sys.stdin)
        print(json.dumps([sign(s) for s in specs]))
    elif len(sys.argv) == 4 and sys.argv[1] == "random":
        rng = random.Random(int(sys.argv[3]))
        print(json.dumps([sign(random_spec(rng)) for _ in range(int(sys.argv[2]))]))
    else:
        sys.exit("usage: sigv4_sign.py sign < specs.json | sigv4_sign.py random N SEED")


if __name__ == "__main__":
    main()

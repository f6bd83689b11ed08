"""The multi-host test's network tool, run inside a namespace (`ip netns exec NS python3 ...`).

`call METHOD URL --ca CA [--body FILE] [--cert C --key K] [--sigv4 AKID SECRET]`:
    one HTTPS request (the server must chain to CA), optionally with a client certificate
    and/or SigV4-signed (botocore, scope us-east-1/caas); prints `STATUS\nBODY`, or
    `0\n<error>` when no HTTP answer came (e.g. the handshake was refused).
`serve ADDR PORT CERT KEY BODY LOG`:
    a rogue HTTPS server: answers every request with 200 and the JSON in BODY, appends
    `METHOD PATH` to LOG; prints `ready` once listening.
"""
import http.client
import http.server
import socketserver
import ssl
import sys


def call(argv):
    method, url = argv[0], argv[1]
    opts = {}
    i = 2
    while i < len(argv):
        k = argv[i]
        if k == "--sigv4":
            opts[k] = (argv[i + 1], argv[i + 2])
            i += 3
        else:
            opts[k] = argv[i + 1]
            i += 2
    body = open(opts["--body"], "rb").read() if "--body" in opts else b""
    headers = {"content-type": "application/json"}
    if "--sigv4" in opts:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        req = AWSRequest(method=method, url=url, data=body, headers=headers)
        ak, sk = opts["--sigv4"]
        SigV4Auth(Credentials(ak, sk), "caas", "us-east-1").add_auth(req)
        headers = dict(req.headers.items())
    ctx = ssl.create_default_context(cafile=opts["--ca"])
    ctx.check_hostname = False  # addresses; the CA pin is what matters here
    if "--cert" in opts:
        ctx.load_cert_chain(opts["--cert"], opts["--key"])
    hostport = url.split("/")[2]
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
    host, port = hostport.rsplit(":", 1)
    try:
        c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        print(r.status)
        print(r.read().decode("utf-8", "replace"))
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        print(0)
        print(f"{type(e).__name__}: {e}")


def serve(argv):
    addr, port, cert, key, body_file, log = argv
    body = open(body_file, "rb").read()

    class H(http.server.BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            with open(log, "a") as f:
                f.write(f"{self.command} {self.path}\n")
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *a):
            pass

    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

        def get_request(self):
            try:
                return super().get_request()
            except ssl.SSLError as e:
                # The client refused our certificate: record how.
                with open(log, "a") as f:
                    f.write(f"TLS refused: {e.reason}\n")
                raise

    s = S((addr, int(port)), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    print("ready", flush=True)
    s.serve_forever()


if __name__ == "__main__":
    {"call": call, "serve": serve}[sys.argv[1]](sys.argv[2:])

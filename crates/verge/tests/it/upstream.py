"""Test upstream for guests' outbound HTTP: one HTTP and one HTTPS server
(certificate from the test's own CA) on HOST, ports printed on stdout as
`http PORT https PORT`.

- POST /echo: the request body back; every x- request header as x-echo-<name>.
- GET /big?n=N: N bytes.
- GET /redirect?to=URL: 302 to URL.
- GET /slow?ms=N: answers after N ms.
Every answer has x-upstream: python and x-scheme: http or https.
"""

import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    scheme = "http"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", extra=()):
        self.send_response(status)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-upstream", "python")
        self.send_header("x-scheme", self.scheme)
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        echoed = [
            ("x-echo-" + k.lower(), v)
            for k, v in self.headers.items()
            if k.lower().startswith("x-")
        ]
        self.answer(200, body, echoed)

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/big":
            self.answer(200, b"a" * int(q.get("n", "0")))
        elif url.path == "/redirect":
            self.answer(302, b"", [("location", q["to"])])
        elif url.path == "/slow":
            time.sleep(int(q.get("ms", "1000")) / 1000)
            self.answer(200, b"slow\n")
        else:
            self.answer(200, b"hello from upstream\n")


class TlsHandler(Handler):
    scheme = "https"


def main():
    host, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
    plain = ThreadingHTTPServer((host, 0), Handler)
    tls = ThreadingHTTPServer((host, 0), TlsHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    for s in (plain, tls):
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(f"http {plain.server_address[1]} https {tls.server_address[1]}", flush=True)
    sys.stdin.read()  # until the test closes it


main()

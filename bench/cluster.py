"""Deploy propagation on a cluster: from the deploy's acknowledgement by node
A to the first 200 from node B (and from A itself), N times; prints p50/p99.

    python3 bench/cluster.py A_URL B_URL TOKEN WASM [N]

Each deploy is a new function with its own route (the same bytes: B loads
the compiled code from its cache, so this measures the registry path, not
compilation). B is polled over one kept-alive connection every 0.5 ms.
"""
import http.client
import sys
import time
import urllib.parse

a_url, b_url, token, wasm = sys.argv[1:5]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 50
body = open(wasm, "rb").read()


def conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


a, b, a_poll = conn(a_url), conn(b_url), conn(a_url)
tag = str(int(time.time()))
to_b, to_a = [], []
for i in range(n):
    name = f"p{tag}-{i}"
    a.request("POST", f"/v1/functions/{name}/versions?route=/{name}", body,
              {"Authorization": f"Bearer {token}", "Content-Type": "application/wasm"})
    r = a.getresponse()
    r.read()
    assert r.status in (200, 201), r.status
    acked = time.perf_counter()
    for poll, out in ((b, to_b), (a_poll, to_a)):
        while True:
            poll.request("GET", f"/{name}")
            resp = poll.getresponse()
            resp.read()
            if resp.status == 200:
                out.append((time.perf_counter() - acked) * 1000)
                break
            time.sleep(0.0005)


def stats(xs):
    xs = sorted(xs)
    return f"p50 {xs[len(xs) // 2]:.1f} ms, p99 {xs[min(len(xs) - 1, int(len(xs) * 0.99))]:.1f} ms, max {xs[-1]:.1f} ms"


print(f"deploy ack on A -> first 200 on B: {stats(to_b)} (n={n})")
print(f"deploy ack on A -> first 200 on A: {stats(to_a)} (n={n}, after B)")

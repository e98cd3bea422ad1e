"""Key-value figures (see bench/kv.sh).

    python3 bench/kv.py EDGE_URL EDGE_TOKEN EDGE_DIR CORE_START_CMD...

Writes N keys into the edge while its peer (the core) is down, starts the
core, and times until the core holds all of them (convergence after a heal,
replication deltas/s); reports metadata bytes per key from the edge's kv.db.
"""

import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request


def call(url, token, method, path, body=None):
    req = urllib.request.Request(url + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req) as r:
        data = r.read()
        return json.loads(data) if data else None


def fill(url, token, bucket, n, threads=8):
    def work(k):
        for i in range(k, n, threads):
            call(url, token, "PUT", f"/v1/kv/{bucket}/key-{i:07d}", f"value-{i}".encode())
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def entries(url, token, bucket):
    try:
        listed = call(url, token, "GET", "/v1/kv") or []
    except OSError:
        return 0  # the core is still starting
    for b in listed:
        if b["bucket"] == bucket:
            return b["entries"]
    return 0


def main():
    edge, token, edge_dir, core_url, core_token_file, n = sys.argv[1:7]
    n = int(n)
    bucket = f"b{n}"
    t0 = time.time()
    fill(edge, token, bucket, n)
    written = time.time() - t0
    print(f"{n} keys written at the edge while cut off: {written:.1f} s ({n / written:.0f} writes/s over HTTP)")
    # The core is up; wait until it has everything.
    sys.stdout.flush()
    core_token = open(core_token_file).read().strip()
    t1 = time.time()
    while entries(core_url, core_token, bucket) < n:
        time.sleep(0.05)
    took = time.time() - t1
    print(f"backlog {n} keys: converged {took:.2f} s after the core was started ({n / took:.0f} deltas/s)")
    db = sqlite3.connect(f"file:{edge_dir}/kv.db?mode=ro", uri=True)
    total, value = db.execute(
        "SELECT SUM(length(entry) + length(key)), SUM(length(key)) FROM entries WHERE bucket = ?", (bucket,)
    ).fetchone()
    vals = sum(len(f"value-{i}") for i in range(n))
    print(f"metadata per key (entry JSON minus key and value bytes): {(total - value - 2 * vals) / n:.0f} bytes")


main()

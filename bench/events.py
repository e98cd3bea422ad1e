"""Event bus figures against a running node (see bench/events.sh).

    python3 bench/events.py URL TOKEN N

1. Throughput: N events POSTed in batches of 100 by 4 threads, faster than
   the node delivers them; events/s from the first POST until every
   delivery is done, with the queue depth and the node's RSS sampled
   meanwhile (memory must stay bounded: the queue is on disk).
2. Latency: 300 single events 20 ms apart, each stamped with its send time;
   ingest-to-handler-start = the invocation's start (ledger) minus that time.
"""

import json
import sys
import threading
import time
import urllib.request

url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pid = int(sys.argv[4]) if len(sys.argv) > 4 else None


def call(method, path, body=None, ctype="application/json"):
    req = urllib.request.Request(url + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", ctype)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def rss_mib():
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def batch(prefix, start, count):
    events = [
        {"specversion": "1.0", "id": f"{prefix}{i}", "source": "/bench", "type": "com.bench.tick", "data": {"i": i}}
        for i in range(start, start + count)
    ]
    call("POST", "/v1/events", json.dumps(events).encode(), "application/cloudevents-batch+json")


def producer(k, per):
    for b in range(0, per, 100):
        batch(f"t{k}-", b, min(100, per - b))


samples = []
done = threading.Event()


def sampler():
    while not done.is_set():
        h = call("GET", "/v1/health")
        samples.append((h["jobs"], rss_mib()))
        time.sleep(0.2)


rss0 = rss_mib()
threading.Thread(target=sampler, daemon=True).start()
t0 = time.time()
threads = [threading.Thread(target=producer, args=(k, n // 4)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
t_ingest = time.time() - t0
while call("GET", "/v1/health")["jobs"] > 0:
    time.sleep(0.05)
elapsed = time.time() - t0
done.set()
peak_depth = max(s[0] for s in samples) if samples else 0
peak_rss = max(s[1] for s in samples) if samples else 0
print(f"ingest: {n} events in {t_ingest:.2f} s = {n / t_ingest:.0f} events/s")
print(f"end to end into a no-op function: {n} events in {elapsed:.2f} s = {n / elapsed:.0f} events/s")
print(f"queue depth peak {peak_depth}; node RSS {rss0:.0f} MiB before, peak {peak_rss:.0f} MiB during")

sent = {}
for i in range(300):
    eid = f"lat-{i}"
    sent[eid] = time.time() * 1000
    call("POST", "/v1/events", json.dumps({"specversion": "1.0", "id": eid, "source": "/bench", "type": "com.bench.tick"}).encode(), "application/cloudevents+json")
    time.sleep(0.02)
while call("GET", "/v1/health")["jobs"] > 0:
    time.sleep(0.05)
time.sleep(0.3)  # the ledger flushes every 100 ms
lat = []
after = None
while True:
    q = "/v1/logs?function=noop&limit=1000" + (f"&after_ms={after[0]}&after_id={after[1]}" if after else "")
    recs = call("GET", q)
    if not recs:
        break
    for r in recs:
        out = r.get("stdout") or ""
        if out.startswith("received lat-"):
            eid = out.split()[1]
            lat.append(r["started_at_ms"] - sent[eid])
    after = (recs[-1]["started_at_ms"], recs[-1]["invocation_id"])
lat.sort()
if lat:
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"ingest to handler start: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms (n={len(lat)}, 1 ms clock granularity)")

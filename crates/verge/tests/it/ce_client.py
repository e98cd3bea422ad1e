"""Sends CloudEvents to a Verge node with the CloudEvents Python SDK, as an
independent client of POST /v1/events.

    python3 ce_client.py URL TOKEN MODE TYPE ID_PREFIX COUNT

MODE is structured, binary or batch (batch sends all COUNT events in one
request). Prints one line per request: the HTTP status and the body.
"""

import json
import sys
import urllib.error
import urllib.request

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def post(url, token, headers, body):
    req = urllib.request.Request(url, data=body, method="POST")
    for k, v in headers.items():
        req.add_header(k, v)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    url, token, mode, ty, prefix, count = sys.argv[1:7]
    events = [
        CloudEvent(
            {"id": f"{prefix}{i}", "source": "/tests/python-sdk", "type": ty, "subject": f"item/{i}"},
            {"n": i, "sdk": "cloudevents-python"},
        )
        for i in range(int(count))
    ]
    fmt = JSONFormat()
    if mode == "batch":
        body = ("[" + ",".join(fmt.write(e).decode() for e in events) + "]").encode()
        status, text = post(url, token, {"Content-Type": "application/cloudevents-batch+json"}, body)
        print(status, text)
        return
    for e in events:
        msg = ce_http.to_binary(e, fmt) if mode == "binary" else ce_http.to_structured(e, fmt)
        status, text = post(url, token, msg.headers, msg.body)
        print(status, text)


if __name__ == "__main__":
    main()

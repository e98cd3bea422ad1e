#!/usr/bin/env python3
"""Load generators for bench/abuse.sh: slow bodies, spinners, big uploads.

  abuse.py slow PORT PATH N SECONDS     N connections that send a request head
                                        and a trickle of body (1 byte per 5 s)
  abuse.py spin PORT PATH N SECONDS     N clients in loops of GET PATH (prints
                                        the statuses and when the 504s came)
  abuse.py upload PORT PATH N MIB       N clients posting MIB MiB at once
                                        (prints the statuses)
Plain asyncio sockets on loopback: no dependencies."""
import asyncio
import collections
import sys
import time


async def slow_body(port, path, deadline):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode()
        )
        await w.drain()
        while time.monotonic() < deadline:
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(5)
        w.close()
    except OSError:
        pass


async def get(port, path):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


async def spinner(port, path, deadline, statuses, waits):
    while time.monotonic() < deadline:
        try:
            start = time.monotonic()
            status = await get(port, path)
            statuses[status] += 1
            if status == 504:
                waits.append(time.monotonic() - start)
        except OSError:
            statuses["error"] += 1
            await asyncio.sleep(0.05)


async def upload(port, path, mib):
    body = b"u" * (mib << 20)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        w.write(body)
        await w.drain()
        data = await r.read()
        w.close()
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except OSError:
        return "error"


async def main():
    kind, port, path, n, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    if kind == "slow":
        deadline = time.monotonic() + float(arg)
        await asyncio.gather(*(slow_body(port, path, deadline) for _ in range(n)))
    elif kind == "spin":
        deadline = time.monotonic() + float(arg)
        statuses, waits = collections.Counter(), []
        await asyncio.gather(*(spinner(port, path, deadline, statuses, waits) for _ in range(n)))
        waits.sort()
        seen = f"; 504 after p50 {waits[len(waits) // 2] * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms (client)" if waits else ""
        print(f"{dict(statuses)}{seen}")
    elif kind == "upload":
        statuses = await asyncio.gather(*(upload(port, path, int(arg)) for _ in range(n)))
        print(dict(collections.Counter(statuses)))


asyncio.run(main())

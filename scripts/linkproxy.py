#!/usr/bin/env python3
"""A TCP proxy whose link can be cut, healed and delayed: an edge site's
uplink on one machine (kernel traffic shaping is not needed).

    linkproxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT STATE_FILE

STATE_FILE holds the link's state, read every 100 ms: "cut" closes every
connection and refuses new ones (the port closes, as a host that is gone), "delay MS" holds each chunk MS
milliseconds each way (a latency, not a bandwidth limit), anything else
(or no file) forwards as is. `scripts/cluster cut|heal|delay` writes it.
"""

import asyncio
import sys
import time


class Link:
    def __init__(self, state_file):
        self.state_file = state_file
        self.cut = False
        self.delay = 0.0
        self.writers = set()

    def read(self):
        try:
            with open(self.state_file) as f:
                words = f.read().split()
        except OSError:
            words = []
        cut = words[:1] == ["cut"]
        delay = 0.0
        if words[:1] == ["delay"] and len(words) > 1:
            try:
                delay = max(0.0, float(words[1]) / 1000.0)
            except ValueError:
                pass
        if cut and not self.cut:
            for w in list(self.writers):
                w.close()
        self.cut, self.delay = cut, delay


async def pump(link, reader, writer, peer):
    queue = asyncio.Queue()
    held = [0]  # chunks queued or being delayed, not written yet

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            held[0] -= 1

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if link.delay == 0 and held[0] == 0:
                # No delay: straight through (what was queued went first).
                writer.write(data)
                await writer.drain()
                continue
            held[0] += 1
            await queue.put((time.monotonic() + link.delay, data))
        await queue.put((0, None))
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        for w in (writer, peer):
            w.close()


async def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    port = int(sys.argv[1])
    host, target_port = sys.argv[2].rsplit(":", 1)
    link = Link(sys.argv[3])

    async def accept(client_reader, client_writer):
        if link.cut:
            client_writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(target_port))
        except OSError:
            client_writer.close()
            return
        link.writers.update((client_writer, server_writer))
        await asyncio.gather(
            pump(link, client_reader, server_writer, client_writer),
            pump(link, server_reader, client_writer, server_writer),
        )
        link.writers.difference_update((client_writer, server_writer))

    server = await asyncio.start_server(accept, "127.0.0.1", port, reuse_address=True)
    while True:
        link.read()
        if link.cut and server is not None:
            server.close()
            server = None
        elif not link.cut and server is None:
            try:
                server = await asyncio.start_server(accept, "127.0.0.1", port, reuse_address=True)
            except OSError:
                pass
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main())

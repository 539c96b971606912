"""A local site of N linked pages, served from its own process for bench/pages.py.

Usage: python bench/_site.py PAGES [LATENCY_MS]

Prints the port it listens on (127.0.0.1), then serves until killed. With LATENCY_MS, each
answer waits that long first, like a remote site (bench/distributed.py: an I/O-bound crawl). Page k
(``/page/k``) is about 2 KB of HTML with a title, a price and links to pages
2k+1 and 2k+2, so a crawl from ``/page/0`` finds every page through links
(a binary tree, about 12 levels deep for 5,000 pages). An asyncio server
with keep-alive: one core answers several times faster than Scrapy fetches.
"""

from __future__ import annotations

import asyncio
import sys

FILLER = "<p>" + "Local benchmark page with some text to parse. " * 30 + "</p>"


def page(k: int, pages: int) -> bytes:
    children = [j for j in (2 * k + 1, 2 * k + 2) if j < pages]
    links = "".join(f'<a class="next" href="/page/{j}">page {j}</a>' for j in children)
    html = (
        f"<!doctype html><html><head><title>Page {k}</title></head><body>"
        f'<h1>Product {k}</h1><span class="price">{k % 1000 / 7:.2f}</span>'
        f"{FILLER}<nav>{links}</nav></body></html>"
    )
    return html.encode()


def response(status: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def serve(pages: int, latency: float = 0.0) -> None:
    bodies = {f"/page/{k}".encode(): response("200 OK", page(k, pages)) for k in range(pages)}
    missing = response("404 Not Found", b"not found")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if latency:
                    await asyncio.sleep(latency)
                writer.write(bodies.get(path, missing))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    latency_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    asyncio.run(serve(int(sys.argv[1]), latency_ms / 1000))

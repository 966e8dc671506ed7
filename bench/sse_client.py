"""One streamed POST over HTTP/1.1, read as server-sent events, for bench.serve.

The benchmark client shares the machine with the server it measures, so every CPU-second it spends
is taken from the engine. httpx parses a response through several Python layers (h11 events, byte,
text and line iterators): about 290 us of CPU per streamed chunk on a Zen 3, 3.6 CPU-seconds for a
100-request run. This reads the socket with asyncio's stream reader and splits the chunked body into
events itself. It speaks only what the benchmark needs: one request per connection, plain HTTP, a
chunked or sized body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    """A response other than 200; the message carries the status and the start of the body."""

    def __init__(self, message: str, status: int = 0, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _request_bytes(url: str, payload: dict) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"url: only http://host[:port]/path is supported, got {url!r}")
    body = json.dumps(payload).encode()
    head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return parts.hostname, parts.port or 80, head.encode() + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body as it arrives: chunk by chunk when chunked, else up to Content-Length or EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readline()).split(b";", 1)[0], 16):
            piece = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield piece[:-2]
        while await reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def _events(pieces: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each event (its data lines joined by newlines), as the SSE format splits
    them: lines end in LF or CRLF, a blank line ends an event, comments and other fields skipped,
    and an event the stream ends in the middle of is dropped."""
    pending, data = b"", []
    async for piece in pieces:
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append((value[1:] if value.startswith(b" ") else value).decode())


async def stream_events(url: str, payload: dict) -> AsyncIterator[str]:
    """POSTs `payload` as JSON to `url` and yields the data of each server-sent event. A status
    other than 200 raises HTTPStatusError with the start of the body."""
    host, port, request = _request_bytes(url, payload)
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(request)
        status, headers = await _read_head(reader)
        if status != 200:
            body = b"".join([p async for p in _body_pieces(reader, headers)])
            raise HTTPStatusError(f"HTTP {status}: {body[:200].decode(errors='replace')}",
                                  status, headers)
        async for event in _events(_body_pieces(reader, headers)):
            yield event
    finally:
        writer.close()

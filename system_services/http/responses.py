"""Responses on the wire: one JSON body with its length, or a chunked stream of events (SSE for OpenAI,
NDJSON for Ollama), so a stream ends cleanly without closing the connection and keep-alive works.
A stream's head is written with its first event, so an error found before any output (a quota, a
prompt over the context) still gets its own status line rather than a 200 carrying an error event.

Every write waits for the socket to take it (`drain`): a client reading slowly slows its own stream,
and one that is gone raises ConnectionError here, which ends (and cancels) its generation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def head(status: int, headers: dict[str, str], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_body(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    keep_alive: bool,
    extra: dict[str, str] | None = None,
) -> None:
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(extra or {})}
    writer.write(head(status, headers, keep_alive) + body)
    await writer.drain()


async def send_json(
    writer: asyncio.StreamWriter,
    status: int,
    obj: Any,
    keep_alive: bool,
    extra: dict[str, str] | None = None,
) -> None:
    await send_body(writer, status, dumps(obj), "application/json", keep_alive, extra)


class ChunkedStream:
    """A streamed response in chunked transfer encoding; `event` frames one JSON value as the format
    wants it: `data: {...}\\n\\n` (server-sent events) or `{...}\\n` (NDJSON)."""

    def __init__(self, writer: asyncio.StreamWriter, sse: bool, keep_alive: bool) -> None:
        self.writer, self.sse, self.keep_alive = writer, sse, keep_alive
        self.started = False

    def _start(self) -> None:
        kind = "text/event-stream; charset=utf-8" if self.sse else "application/x-ndjson"
        headers = {"Content-Type": kind, "Cache-Control": "no-cache", "Transfer-Encoding": "chunked"}
        self.writer.write(head(200, headers, self.keep_alive))
        self.started = True

    async def event(self, obj: Any) -> None:
        await self.raw(b"data: " + dumps(obj) + b"\n\n" if self.sse else dumps(obj) + b"\n")

    async def raw(self, data: bytes) -> None:
        if not self.started:
            self._start()
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end(self) -> None:
        if not self.started:
            self._start()
        if self.sse:
            await self.raw(b"data: [DONE]\n\n")
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

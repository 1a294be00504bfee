"""HTTP/1.1 requests read from a stream, every size bounded before the bytes behind it are read.

A strict subset: a request line, at most MAX_HEADERS headers in at most MAX_HEAD_BYTES, and a body only
with a Content-Length that is checked against the limit before one byte of the body is read. Chunked
request bodies are refused (411): their size is unknown until they end, and no client of these APIs
needs them. Obsolete line folding, duplicate Content-Length or Host, and bare LF are refused rather than
guessed at: two parsers disagreeing about where a request ends is how request smuggling starts.

The connection keeps its own buffer, so it can watch for the peer leaving while a response is being
made (`wait_closed`) without losing bytes of a pipelined next request.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 64
MAX_HEAD_BYTES = 32 * 1024  # request line and headers together
READ_SIZE = 64 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REQUEST_LINE = re.compile(rb"^([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/(1\.[01])$")


class HttpError(Exception):
    """A request answered with an HTTP error: status, a message for people, and OpenAI's error code."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]  # names in lower case
    body: bytes = b""
    keep_alive: bool = field(default=True)


class Connection:
    """One client connection: requests read in turn, and whether the peer is gone."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int, idle_s: float
    ) -> None:
        self.reader, self.writer = reader, writer
        self.max_body, self.idle_s = max_body, idle_s
        self.buf = bytearray()
        self.eof = False

    async def _fill(self, timeout: float | None) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except TimeoutError:
            raise HttpError(408, "the request took too long to arrive") from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def next_request(self) -> HttpRequest | None:
        """The next request, or None when the peer closed (or idled out) between requests."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise HttpError(431, f"request line and headers are over {MAX_HEAD_BYTES} bytes")
            try:
                more = not self.eof and await self._fill(self.idle_s)
            except HttpError:
                if not self.buf:
                    return None  # an idle keep-alive connection: just closed
                raise
            if not more:
                if self.buf.strip():
                    raise HttpError(400, "the connection ended inside the request headers")
                return None
        if end > MAX_HEAD_BYTES:
            raise HttpError(431, f"request line and headers are over {MAX_HEAD_BYTES} bytes")
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        req = _parse_head(head)
        length = _content_length(req)
        if length > self.max_body:
            raise HttpError(
                413, f"the body is {length} bytes; the most this endpoint reads is {self.max_body}"
            )
        if length and req.headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buf) < length:
            if self.eof or not await self._fill(self.idle_s):
                raise HttpError(400, "the connection ended inside the request body")
        req.body = bytes(self.buf[:length])
        del self.buf[:length]
        return req

    async def wait_closed(self) -> None:
        """Return when the peer has closed its end. Bytes it sends meanwhile (a pipelined request) are
        kept for `next_request`, up to one request's worth; then reading stops until the answer is done."""
        while not self.eof:
            if len(self.buf) > MAX_HEAD_BYTES + self.max_body:
                await asyncio.Future()  # never set: cancelled when the response is over
            await self._fill(None)


def _parse_head(head: bytes) -> HttpRequest:
    lines = head.split(b"\r\n")
    line = lines[0]
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, f"the request line is over {MAX_REQUEST_LINE} bytes")
    m = _REQUEST_LINE.match(line)
    if m is None:
        if line.rsplit(b" ", 1)[-1].startswith(b"HTTP/") and not line.endswith((b"/1.1", b"/1.0")):
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are spoken here")
        raise HttpError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not _TOKEN.match(name) or b"\n" in raw or b"\r" in raw:
            raise HttpError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host", "transfer-encoding"):
                raise HttpError(400, f"the {key} header is given twice")
            headers[key] += ", " + text
        else:
            headers[key] = text
    method, target, version = (g.decode("ascii") for g in m.groups())
    path, _, query = target.partition("?")
    conn = headers.get("connection", "").lower()
    keep = "close" not in conn if version == "1.1" else "keep-alive" in conn
    return HttpRequest(method, path, query, version, headers, keep_alive=keep)


def _content_length(req: HttpRequest) -> int:
    if "transfer-encoding" in req.headers:
        raise HttpError(411, "chunked request bodies are not accepted: send the body with a Content-Length")
    raw = req.headers.get("content-length")
    if raw is None:
        if req.method in ("POST", "PUT", "PATCH"):
            raise HttpError(411, "a request with a body needs a Content-Length header")
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, "Content-Length must be a non-negative decimal number")
    return int(raw)

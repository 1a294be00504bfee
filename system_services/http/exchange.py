"""One request and its answer: who asked (from SO_PEERCRED), what, and how to reply in its API's shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmos import bounded_json
from system_services.caller import Caller
from system_services.http.errors import as_http_error
from system_services.http.responses import ChunkedStream, send_json
from system_services.http.wire import Connection, HttpError, HttpRequest


@dataclass
class Exchange:
    daemon: Any
    caller: Caller
    conn: Connection
    req: HttpRequest
    error_shape: Callable[[HttpError], dict[str, Any]]
    stream: ChunkedStream | None = None  # once a streamed answer has started

    @property
    def owner(self) -> str:
        """The key its work is owned under (as a unique name on the bus): ends with the connection."""
        return self.caller.unique_name

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, parsed within the size (already bounded) and nesting limits."""
        try:
            text = self.req.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "the body is not UTF-8") from None
        try:
            body = bounded_json.loads(text, "the request body", max_chars=len(text) + 1)
        except bounded_json.InvalidJsonError as e:
            raise HttpError(400, str(e), "invalid_json") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    async def reply(self, obj: Any, status: int = 200) -> None:
        await send_json(self.conn.writer, status, obj, self.req.keep_alive)

    async def fail(self, e: BaseException) -> None:
        """Answer with the error in this API's shape; inside a stream, as its last event."""
        err = as_http_error(e)
        if self.stream is not None and self.stream.started:
            await self.stream.event(self.error_shape(err))
            await self.stream.end()
            return
        await send_json(self.conn.writer, err.status, self.error_shape(err), self.req.keep_alive, err.headers)

    def start_stream(self, sse: bool) -> ChunkedStream:
        """A streamed answer; its head goes out with its first event (see responses.py)."""
        self.stream = ChunkedStream(self.conn.writer, sse, self.req.keep_alive)
        return self.stream

"""The HTTP layer's parts on their own: request framing and bounds, the local-host guard, the one error
mapping, and the 503 while the model loads (hard to hit on purpose against a real daemon)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from dbus_fast import DBusError

from llmos.errors import ContextOverflowError, QuotaExceededError
from system_services.http import openai_api
from system_services.http.errors import as_http_error
from system_services.http.exchange import Exchange
from system_services.http.local_origin import check_local
from system_services.http.wire import Connection, HttpError, HttpRequest


def _read(data: bytes, max_body: int = 1000) -> HttpRequest | None:
    async def go() -> HttpRequest | None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        writer = SimpleNamespace(write=lambda b: None)
        return await Connection(reader, writer, max_body, 1.0).next_request()  # type: ignore[arg-type]

    return asyncio.run(go())


def test_a_well_formed_request_and_keep_alive() -> None:
    req = _read(b"POST /v1/x?a=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
    assert req is not None and (req.method, req.path, req.query, req.body, req.keep_alive) == (
        "POST",
        "/v1/x",
        "a=1",
        b"{}",
        True,
    )
    assert _read(b"") is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
    ],
)
def test_bad_framing_is_refused_by_name(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        _read(data)
    assert e.value.status == status


@pytest.mark.parametrize(
    ("host", "origin", "ok"),
    [
        ("localhost", None, True),
        ("127.0.0.1:11434", "http://localhost:3000", True),
        ("[::1]:80", None, True),
        ("evil.example", None, False),
        ("localhost.evil.example", None, False),
        ("localhost", "https://evil.example", False),
        ("localhost", "null", False),
    ],
)
def test_only_local_hosts_and_origins(host: str, origin: str | None, ok: bool) -> None:
    headers = {"host": host, **({"origin": origin} if origin else {})}
    req = HttpRequest("GET", "/", "", "1.1", headers)
    if ok:
        check_local(req)
    else:
        with pytest.raises(HttpError):
            check_local(req)


def test_one_mapping_from_named_errors_to_statuses() -> None:
    overflow = as_http_error(ContextOverflowError(9000, 8192, "the prompt"))
    assert (overflow.status, overflow.code) == (400, "context_length_exceeded")
    assert "9000" in overflow.message and "8192" in overflow.message
    quota = as_http_error(QuotaExceededError("over", retry_after_s=2.2))
    assert (quota.status, quota.headers["Retry-After"]) == (429, "3")
    assert as_http_error(DBusError("org.llmos.Error.ModelUnavailable", "gone")).status == 503
    fault = as_http_error(ZeroDivisionError("boom"))
    assert fault.status == 500 and "boom" not in fault.message  # no internals to the client


def test_openai_requests_get_503_while_the_model_loads() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = HttpRequest("POST", "/v1/chat/completions", "", "1.1", {"host": "localhost"}, body)
    daemon = SimpleNamespace(state="loading", model=SimpleNamespace(manifest=SimpleNamespace(name="m")))
    ex = Exchange(daemon, None, None, req, lambda e: {})  # type: ignore[arg-type]
    with pytest.raises(HttpError) as e:
        asyncio.run(openai_api.chat(ex))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "2"

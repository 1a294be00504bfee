"""The DNS-rebinding guard: a request must name a local host, and a browser's Origin must be local too.

A web page cannot open a unix socket, but a local proxy or a future loopback listener could carry a
browser's request here; a page from evil.example that rebinds its name to 127.0.0.1 still sends
`Host: evil.example` and `Origin: http://evil.example`. Only names that can only mean this machine pass.
"""

from __future__ import annotations

import re

from system_services.http.wire import HttpError, HttpRequest

_LOCAL_HOST = re.compile(
    r"^(localhost|[a-z0-9-]+\.localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?$", re.IGNORECASE
)
_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?$", re.IGNORECASE)


def check_local(req: HttpRequest) -> None:
    host = req.headers.get("host")
    if host is None:
        if req.version == "1.1":
            raise HttpError(400, "HTTP/1.1 requests need a Host header")
    elif not _LOCAL_HOST.match(host):
        raise HttpError(
            403, f"Host {host[:80]!r} is not this machine; use http://localhost", "forbidden_host"
        )
    origin = req.headers.get("origin")
    if origin is not None and not _LOCAL_ORIGIN.match(origin):
        raise HttpError(403, f"requests from the web origin {origin[:80]!r} are refused", "forbidden_origin")

"""Errors as HTTP answers: one mapping from llmos's named errors to a status, then each API's shape.

The names are the D-Bus error names (org.llmos.Error.*), whichever way an error arrives: a core
LlmosError (its `dbus_name`), a DBusError from the code the D-Bus objects share (options, bounds), or an
HttpError from the HTTP layer itself. Anything else is a fault of the daemon: logged once per kind by
`to_dbus_error` (as on D-Bus) and answered with 500 and no traceback.
"""

from __future__ import annotations

import math
from typing import Any

from dbus_fast import DBusError

from llmos.errors import LlmosError
from system_services.dbus_errors import PREFIX, to_dbus_error
from system_services.http.wire import HttpError

STATUS = {
    "InvalidArgument": 400,
    "ContextOverflow": 400,
    "AccessDenied": 403,
    "NotFound": 404,
    "QuotaExceeded": 429,
    "Cancelled": 499,
    "Busy": 503,
    "ModelUnavailable": 503,
    "Failed": 500,
}
CODES = {"ContextOverflow": "context_length_exceeded", "QuotaExceeded": "rate_limit_exceeded"}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def as_http_error(e: BaseException) -> HttpError:
    if isinstance(e, HttpError):
        return e
    if not isinstance(e, LlmosError):
        e = to_dbus_error(e)  # logs an unexpected error once per kind; a DBusError stays as it is
    if isinstance(e, DBusError):
        name, message = e.type.removeprefix(PREFIX), e.text
    else:
        name, message = e.dbus_name, str(e)
    status = STATUS.get(name, 500)
    headers = {}
    if status in (429, 503):
        retry = getattr(e, "retry_after_s", None) or 1.0
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return HttpError(status, message, CODES.get(name, name), headers)


def openai_error(err: HttpError) -> dict[str, Any]:
    kind = OPENAI_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "server_error")
    return {"error": {"message": err.message, "type": kind, "param": None, "code": err.code}}


def ollama_error(err: HttpError) -> dict[str, Any]:
    return {"error": err.message}

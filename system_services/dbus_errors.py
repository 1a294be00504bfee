"""Map llmos errors to named D-Bus errors: org.llmos.Error.<Name> with a human message, never a traceback.

An unexpected error is a fault of the daemon and is logged with its traceback, but a caller can repeat
the call that hits it as often as it likes: once per kind of fault (exception type and where it was
raised), then counted (llmos.log_limit).
"""

from __future__ import annotations

import logging

from dbus_fast import DBusError

from llmos.errors import LlmosError
from llmos.log_limit import LimitedLog

PREFIX = "org.llmos.Error."
NAMES = (
    "InvalidArgument",
    "AccessDenied",
    "NotFound",
    "QuotaExceeded",
    "ContextOverflow",
    "Cancelled",
    "ModelUnavailable",
    "Busy",
    "Failed",
)
log = logging.getLogger("llmosd")
_limited = LimitedLog(log)


class _NoTracebackForNamedErrors(logging.Filter):
    """dbus-fast logs a traceback when a method called with NO_REPLY_EXPECTED raises (no reply can carry
    the error). A named org.llmos.Error, or a standard org.freedesktop.DBus.Error such as UnknownMethod
    for a Properties call naming a member it does not have, is the answer to a bad call, not a fault:
    drop those records. Failed is a fault, logged once and then counted, since the caller can send the
    same call again and again."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        if not isinstance(e, DBusError):
            return True
        if e.type == PREFIX + "Failed":
            _limited.failed("calls without a reply", e.text, exc_info=record.exc_info)
            return False
        return not e.type.startswith((PREFIX, "org.freedesktop.DBus.Error."))


for _logger in ("dbus_fast.aio.message_reader", "dbus_fast.aio.message_bus"):
    logging.getLogger(_logger).addFilter(_NoTracebackForNamedErrors())


def error(name: str, message: str) -> DBusError:
    assert name in NAMES, name
    return DBusError(PREFIX + name, message)


def to_dbus_error(e: BaseException) -> DBusError:
    if isinstance(e, DBusError):
        return e
    if isinstance(e, LlmosError):
        return error(e.dbus_name if e.dbus_name in NAMES else "Failed", str(e))
    _limited.failed(f"calls hitting {_where(e)}", f"unexpected error {type(e).__name__}: {e}", exc_info=e)
    return error("Failed", f"internal error ({type(e).__name__}); the daemon logged the details")


def _where(e: BaseException) -> str:
    """The exception type and the line that raised it: one kind of fault, whichever call hit it."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    place = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(e).__name__}{place}"

"""Map llmos errors to named D-Bus errors: org.llmos.Error.<Name> with a human message, never a traceback."""

from __future__ import annotations

import logging

from dbus_fast import DBusError

from llmos.errors import LlmosError

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


class _NoTracebackForNamedErrors(logging.Filter):
    """dbus-fast logs a traceback when a method called with NO_REPLY_EXPECTED raises (no reply can carry
    the error). A named org.llmos.Error, or a standard org.freedesktop.DBus.Error such as UnknownMethod
    for a Properties call naming a member it does not have, is the answer to a bad call, not a fault:
    drop those records. Failed is kept (to_dbus_error already logged its cause)."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        if not isinstance(e, DBusError):
            return True
        answer = e.type.startswith((PREFIX, "org.freedesktop.DBus.Error.")) and e.type != PREFIX + "Failed"
        return not answer


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
    log.exception("unexpected error while handling a call", exc_info=e)
    return error("Failed", f"internal error ({type(e).__name__}); the daemon logged the details")

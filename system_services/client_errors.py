"""The client library's named errors: one class per org.llmos.Error name, so an app catches what it can
handle (`except QuotaExceededError`) instead of comparing strings.

Every error llmosd (or the bus) answers with is a `ServiceError` carrying the D-Bus error name and its
message; `service_error(name, message)` picks the class that name maps to, and a name this library does
not know (a newer daemon's, the bus's own) stays a plain `ServiceError`. A failed agent run raises the
same classes, from its Result's `error_name`.
"""

from __future__ import annotations

PREFIX = "org.llmos.Error."


class ServiceError(Exception):
    """An error reply from llmosd (or the bus): `name` is the D-Bus error name."""

    dbus_name = ""  # the one org.llmos.Error.* name a subclass stands for

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{message} ({name})")
        self.name, self.message = name, message


class InvalidArgumentError(ServiceError):
    """A bad argument or option (the message names it)."""

    dbus_name = PREFIX + "InvalidArgument"


class AccessDeniedError(ServiceError):
    """Not the caller's object, or not allowed by the app's policy."""

    dbus_name = PREFIX + "AccessDenied"


class NotFoundError(ServiceError):
    """No such object, agent, tool or job."""

    dbus_name = PREFIX + "NotFound"


class QuotaExceededError(ServiceError):
    """Over one of the app's quotas; the message says when to retry."""

    dbus_name = PREFIX + "QuotaExceeded"


class ContextOverflowError(ServiceError):
    """The prompt does not fit the model's context."""

    dbus_name = PREFIX + "ContextOverflow"


class RequestCancelledError(ServiceError):
    """The request or run was cancelled (by its owner, or because the daemon is stopping). Not named
    CancelledError, so it is never mistaken for asyncio's."""

    dbus_name = PREFIX + "Cancelled"


class ModelUnavailableError(ServiceError):
    """The model cannot be loaded."""

    dbus_name = PREFIX + "ModelUnavailable"


class BusyError(ServiceError):
    """The service cannot take the request now."""

    dbus_name = PREFIX + "Busy"


class FailedError(ServiceError):
    """The request failed (the message says why), e.g. an agent run that ended without an answer."""

    dbus_name = PREFIX + "Failed"


class CallCutError(FailedError):
    """An agent run ended on a tool call cut short by a limit (never made): `tool` is the tool it named
    (None if the name itself was cut), `arguments_text` the arguments as far as they were written."""

    def __init__(self, name: str, message: str, tool: str | None, arguments_text: str | None) -> None:
        super().__init__(name, message)
        self.tool, self.arguments_text = tool, arguments_text


_BY_NAME = {
    c.dbus_name: c
    for c in (
        InvalidArgumentError,
        AccessDeniedError,
        NotFoundError,
        QuotaExceededError,
        ContextOverflowError,
        RequestCancelledError,
        ModelUnavailableError,
        BusyError,
        FailedError,
    )
}


def service_error(name: str, message: str) -> ServiceError:
    """The named error for a D-Bus error name."""
    return _BY_NAME.get(name, ServiceError)(name, message)

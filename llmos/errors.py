"""Named errors of the llmos core.

Every failure a caller can cause or meet has its own class with a human message, so the service layer
can map it to an `org.llmos.Error.*` name without parsing strings and nobody sees a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def validation_problems(e: ValidationError, root: str) -> str:
    """Every problem pydantic found, as "where: what"; `root` names a problem of the whole object."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or root}: {err['msg']}" for err in e.errors())


class LlmosError(Exception):
    """Base of every error llmos raises on purpose."""

    #: The D-Bus error suffix the service maps this to (org.llmos.Error.<dbus_name>).
    dbus_name = "Failed"


class ModelFormatError(LlmosError):
    """A model file is truncated, corrupt, or not what it claims to be."""

    dbus_name = "InvalidArgument"


class UnsupportedModelError(LlmosError):
    """A well-formed model uses an architecture or tensor type llmos cannot run."""

    dbus_name = "InvalidArgument"


class TokenizerError(LlmosError):
    """Tokenizer metadata is missing or inconsistent."""

    dbus_name = "InvalidArgument"


class ChecksumError(LlmosError):
    """A downloaded or stored file does not have the sha256 it must have."""

    dbus_name = "ModelUnavailable"


class ModelImportError(LlmosError):
    """Importing a model failed (download, conversion or writing the model directory)."""

    dbus_name = "ModelUnavailable"


class ModelNotFoundError(LlmosError):
    """No imported model matches the name that was asked for."""

    dbus_name = "NotFound"


class InvalidSamplingError(LlmosError, ValueError):
    """A sampling or generation option is out of range or of the wrong type."""

    dbus_name = "InvalidArgument"


class ContextOverflowError(LlmosError):
    """A prompt (plus the tokens asked for) does not fit the context. Never silently truncated."""

    dbus_name = "ContextOverflow"

    def __init__(self, needed: int, limit: int, what: str = "prompt", message: str | None = None) -> None:
        self.needed = needed  # tokens (at least this many, when the text was refused by its size)
        self.limit = limit
        super().__init__(message or f"{what} needs {needed} tokens but the context holds {limit}")


class InputTooLargeError(LlmosError):
    """A text over the hard cap on any one input (see llmos.input_bounds), refused before any work."""

    dbus_name = "InvalidArgument"


class CapacityError(LlmosError):
    """No free KV slot: the engine already holds as many sequences as it was sized for."""

    dbus_name = "Busy"


class ChatTemplateError(LlmosError):
    """The model's chat template failed to render these messages (or raised on purpose)."""

    dbus_name = "InvalidArgument"


class ModelUnavailableError(LlmosError):
    """The model cannot be loaded or run right now (missing files, runtime failure)."""

    dbus_name = "ModelUnavailable"


class ModelCorruptError(ModelUnavailableError):
    """A file of an imported model directory is missing or does not match the digest recorded at import
    (damaged on disk, or changed since): refused at load, never served as garbage. The message names
    the file and the command that imports the model again."""


class SwapFileError(LlmosError):
    """A swapped-out KV file is missing, truncated, corrupt or for another model: recompute instead."""

    dbus_name = "Failed"


class QuotaExceededError(LlmosError):
    """An app is over one of its quotas (sessions, tokens per minute, context, queued requests)."""

    dbus_name = "QuotaExceeded"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            message = f"{message}; retry after {retry_after_s:.1f} s"
        super().__init__(message)

"""llmos's optional native op library: GGUF Q4_0 matrices read by a custom onnxruntime op.

The library (llmos/native/gguf_ops.cc, built for this CPU by scripts/setup.sh) adds the domain
`llmos.gguf` with `GgufMatMulQ4_0x16`. When it is available at import, Q4_0 matrices are written in its
layout and use it; otherwise, or where a matrix does not fit it, they go to onnxruntime's MatMulNBits as
before. A model imported with the op needs the library to load (`require`).

`LLMOS_GGUF_OPS` names the library file instead of the one built in the package (a path that does not
exist turns the op off: the way to import for MatMulNBits on a machine that has the library).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.errors import ModelUnavailableError

if TYPE_CHECKING:  # onnxruntime is imported when used: listing models does not need it
    import onnxruntime as ort

DOMAIN = "llmos.gguf"
OP_Q4_0_X16 = "GgufMatMulQ4_0x16"
ENV = "LLMOS_GGUF_OPS"
LIBRARY_NAME = "libllmos_gguf_ops.so"


def library_path() -> Path:
    """Where the library is looked for: $LLMOS_GGUF_OPS, else llmos/native/build/ in the package."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "native" / "build" / LIBRARY_NAME


def available() -> bool:
    """The library exists and onnxruntime accepts it."""
    return _check(str(library_path())) is None


def unavailable_reason() -> str | None:
    """None when available; else why not, in a few words."""
    return _check(str(library_path()))


@cache
def _check(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{path} does not exist"
    import onnxruntime as ort

    try:
        ort.SessionOptions().register_custom_ops_library(path)
    except Exception as e:  # onnxruntime's own exception types
        return f"onnxruntime refused {path}: {e}"
    return None


def register(so: ort.SessionOptions) -> None:
    """Add the library's ops to a session's options (the library must be available)."""
    so.register_custom_ops_library(str(library_path()))


def require(so: ort.SessionOptions, model: str | os.PathLike[str]) -> None:
    """Register the library for a model imported with its op, or refuse the model with the fix."""
    reason = unavailable_reason()
    if reason is not None:
        raise ModelUnavailableError(
            f"{model} was imported with llmos's native Q4_0 op (domain {DOMAIN}), but its library "
            f"{LIBRARY_NAME} is not available ({reason}): build it with scripts/setup.sh, "
            "or re-import the model on this machine to use onnxruntime's MatMulNBits"
        )
    register(so)

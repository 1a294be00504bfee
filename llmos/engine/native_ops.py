"""llmos's optional native op library: GGUF matrices read in their own block formats by custom ops.

The library (llmos/native/*.cc, built for this CPU by scripts/setup.sh) adds the domain `llmos.gguf`
with one op per GGUF weight type it handles (`op_names()`; layouts in llmos/gguf_layouts.py). When it is
available at import, matrices of those types are written in the op's layout and use it; otherwise, or
where a matrix does not fit, they go to onnxruntime's MatMulNBits as before. A model imported with the
ops needs the library to load (`require`).

`LLMOS_GGUF_OPS` names the library file instead of the one built in the package (a path that does not
exist turns the op off: the way to import for MatMulNBits on a machine that has the library).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.errors import ModelUnavailableError

if TYPE_CHECKING:  # onnxruntime is imported when used: listing models does not need it
    import onnxruntime as ort

DOMAIN = "llmos.gguf"
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


def op_names() -> frozenset[str]:
    """The ops the library holds (empty when it is not available): a library built from older sources
    may lack a newer type's op, and import then leaves that type to MatMulNBits."""
    path = str(library_path())
    return _names(path) if _check(path) is None else frozenset()


@cache
def _names(path: str) -> frozenset[str]:
    try:
        fn = ctypes.CDLL(path).llmos_gguf_op_names
    except (OSError, AttributeError):  # a library from before the list existed: Q4_0 only
        return frozenset({"GgufMatMulQ4_0x16"})
    fn.restype = ctypes.c_char_p
    return frozenset(n for n in fn().decode().split(",") if n)


def register(so: ort.SessionOptions) -> None:
    """Add the library's ops to a session's options (the library must be available)."""
    so.register_custom_ops_library(str(library_path()))


def require(so: ort.SessionOptions, model: str | os.PathLike[str], ops: list[str]) -> None:
    """Register the library for a model imported with its `ops`, or refuse the model with the fix."""
    reason = unavailable_reason()
    if reason is None and not set(ops) <= op_names():
        missing = ", ".join(sorted(set(ops) - op_names()))
        reason = f"this build of it lacks {missing}"
    if reason is not None:
        raise ModelUnavailableError(
            f"{model} was imported with llmos's native GGUF ops (domain {DOMAIN}), but its library "
            f"{LIBRARY_NAME} is not available ({reason}): build it with scripts/setup.sh, "
            "or re-import the model on this machine to use onnxruntime's MatMulNBits"
        )
    register(so)

"""Give freed heap memory back to the kernel.

Loading a model frees a lot: the tokenizer's JSON parse, and every original weight onnxruntime replaced
by its prepacked form. glibc keeps such freed memory in its heap (still counted in RSS) unless asked to
trim it; ~30 MB for the default model. Other C libraries have no malloc_trim, and then this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_free_heap() -> None:
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)

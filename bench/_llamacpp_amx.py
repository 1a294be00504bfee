"""Keep llama.cpp off its AMX weight buffers, which crash on this machine; keep its other CPU repacking.

On a CPU with AMX (Intel Sapphire Rapids and later; the bench machine is one as of 2026-12-03),
llama-cpp-python 0.3.36 built natively puts Q4_0/Q4_1/Q4_K/Q6_K/Q8_0 weights into ggml's "AMX" extra
buffer type and then segfaults in the first evaluation, for every model including the default one (the
symptom of ggml-org/llama.cpp#20824). `use_extra_bufts=False` would avoid it but also turns off the
"CPU_REPACK" layouts (q4_0_8x8, q4_K_8x8, ...) that llama.cpp uses on any AVX2/AVX-512 machine, which
would make the peer slower than a normal build.

So the peer removes only AMX from the CPU backend's list of extra buffer types before loading a model:
`ggml_backend_dev_get_extra_bufts` returns a static NULL-terminated array that llama.cpp re-reads at
every model load; AMX is dropped from it in place. The result is what a build with `GGML_AMX_INT8=OFF`
runs. Nothing changes where AMX is absent.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

GGML_BACKEND_DEVICE_TYPE_CPU = 0


def drop_amx() -> dict[str, list[str]]:
    """Remove "AMX" from the CPU extra buffer types; return the list before and after."""
    import llama_cpp  # loads the shared libraries this reaches into

    lib = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib / "libggml.so"))
    base = ctypes.CDLL(str(lib / "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]

    dev = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    reg = base.ggml_backend_dev_backend_reg(dev) if dev else None
    proc = b"ggml_backend_dev_get_extra_bufts"
    fn_addr = base.ggml_backend_reg_get_proc_address(reg, proc) if reg else None
    if not fn_addr:
        return {"before": [], "after": []}
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn_addr)
    bufts = get_extra(dev)
    entries = []
    while bufts and bufts[len(entries)]:
        entries.append(bufts[len(entries)])
    names = [base.ggml_backend_buft_name(b).decode() for b in entries]
    keep = [b for b, name in zip(entries, names, strict=True) if name != "AMX"]
    for i in range(len(entries)):
        bufts[i] = keep[i] if i < len(keep) else None
    after = get_extra(dev)
    return {
        "before": names,
        "after": [base.ggml_backend_buft_name(after[i]).decode() for i in range(len(keep))],
    }

"""GEMV time of llmos's native ops against onnxruntime's MatMulNBits, at the matrix shapes of real models.

For each GGUF type with a native op and each shape (N, K) of the synthetic 0.5B llama (width 896: fused
q/k/v, o, fused gate/up, down, the 49152-row tied head), random GGUF blocks are put in two one-node
graphs: the type's op on their x16 bytes, and MatMulNBits on what import packs for it (Q8_0 and Q5_0:
8-bit, Q4_1: 4-bit; its block-offset correction, a separate Gemm in the real graph, is left out, which
favours MatMulNBits). One activation row (decode; `--m` rows for prefill), `--threads` threads; the two
sessions alternate for `--rounds` rounds of `--iters` calls and the median time per call is printed.

    PYTHONPATH=. .venv/bin/python bench/native_gemv.py [--rounds 7] [--iters 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from llmos.engine import native_ops
from llmos.gguf_file import TensorInfo
from llmos.gguf_layouts import LAYOUTS, Q4_1_LAYOUT
from llmos.quant import pack_matrix

SHAPES = {
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "head": (49152, 896),
}
TYPES = (Q.Q8_0, Q.Q5_0, Q.Q4_1)


def random_tensor(qtype: Q, n: int, k: int) -> TensorInfo:
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in (0, 2) if qtype == Q.Q4_1 else (0,):
        raw[..., off : off + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.02).astype(np.float16).view(np.uint8)
        )
    return TensorInfo("w", qtype, (n, k), raw.reshape(n, -1))


def session(node: object, inits: list, k: int, n: int, threads: int):  # -> ort.InferenceSession
    import onnxruntime as ort

    graph = helper.make_graph(
        [node],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=[*opsets, helper.make_opsetid(native_ops.DOMAIN, 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    native_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sessions(qtype: Q, n: int, k: int, threads: int) -> dict[str, object]:
    t = random_tensor(qtype, n, k)
    lay = {**LAYOUTS, Q.Q4_1: Q4_1_LAYOUT}[qtype]
    native = helper.make_node(lay.op, ["x", "w"], ["y"], domain=native_ops.DOMAIN, K=k, N=n)
    w = numpy_helper.from_array(lay.regroup(np.asarray(t.data)), "w")
    p = pack_matrix(t, 4)
    nbits = helper.make_node(
        "MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=p.bits,
        block_size=p.block, accuracy_level=4,
    )  # fmt: skip
    inits = [numpy_helper.from_array(p.packed, "q"), numpy_helper.from_array(p.scales, "s")]
    return {
        f"native ({t.data.nbytes / 1e6:.1f} MB)": session(native, [w], k, n, threads),
        f"MatMulNBits {p.bits}-bit ({(p.packed.nbytes + p.scales.nbytes) / 1e6:.1f} MB)": session(
            nbits, inits, k, n, threads
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=1, help="activation rows (1: decode; e.g. 256: prefill)")
    ap.add_argument("--types", default=",".join(t.name for t in TYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    for qtype in (Q[t] for t in args.types.split(",")):
        for shape_name in args.shapes.split(","):
            n, k = SHAPES[shape_name]
            runs = sessions(qtype, n, k, args.threads)
            feed = {"x": np.random.default_rng(1).standard_normal((args.m, k)).astype(np.float32)}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for s in runs.values():  # warm-up
                s.run(None, feed)  # type: ignore[attr-defined]
            for _ in range(args.rounds):
                for name, s in runs.items():
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        s.run(None, feed)  # type: ignore[attr-defined]
                    times[name].append((time.perf_counter() - t0) / args.iters * 1e6)
            (a, ta), (b, tb) = ((name, statistics.median(v)) for name, v in times.items())
            spread = max(max(v) / min(v) for v in times.values())
            print(
                f"{qtype.name} {shape_name:8s} N={n:5d} K={k:4d}: {a} {ta:8.1f} us, {b} {tb:8.1f} us, "
                f"ratio {ta / tb:.2f} (max/min of rounds {spread:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()

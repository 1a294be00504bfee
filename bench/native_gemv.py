"""GEMV (and, with --m, GEMM) time of llmos's native GGUF ops against MatMulNBits, per type, at real shapes.

For each (type, N, K): random GGUF rows of the type (random bytes, sane fp16 scales) carried two ways,
as import would: the native op on the x16 regrouping (llmos/gguf_layouts.py), and MatMulNBits on
llmos/quant.py's exact packing (the smallest container that holds the type: Q6_K 8 bits per 16, Q4_K 4
bits per 32 plus the block-sum correction Gemm for its mins). Each graph holds R copies of the matrix
(different bytes, R chosen so a run reads >= --mib MiB), so weights stream from memory as in decode
instead of staying in cache. One activation row (M=1; --m rows for prefill), --threads threads; the two
engines alternate for --rounds rounds, each a median over --reps runs; medians of those. Prints us per
GEMV, the ratio, and the effective GB/s of each (bytes of weights read / time).

    .venv/bin/python bench/native_gemv.py [--types Q6_K Q4_K] [--rounds 5] [--reps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from llmos.engine import native_ops
from llmos.gguf_file import TensorInfo
from llmos.gguf_layouts import LAYOUTS, Q4_1_LAYOUT
from llmos.quant import pack_matrix, source_bits

# (N, K) of the matrices of each type in the synthetic 0.5B/1B Q4_K_M and 1B Q4_0 files (q+k fused, gate+up
# fused, the tied head), as gguf_file orders them: N rows of K.
SHAPES = {
    "Q6_K": [(896, 4864), (512, 2048), (2048, 8192), (49152, 2048)],
    "Q4_K": [(896, 4864), (2560, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],
    "Q4_0": [(896, 896), (4864, 896), (896, 4864), (16384, 2048), (2048, 8192)],
    "Q5_0": [(1152, 896), (896, 896), (9728, 896)],  # 0.5B Q4_K_M: q/k/v, o, gate/up
    "Q8_0": [(1152, 896), (49152, 896)],  # 0.5B Q4_K_M: half the v's fused with q/k; the tied head
    "Q4_1": [(1152, 896), (9728, 896), (896, 4864)],
}
SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_rows(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        raw[..., off : off + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.01).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(n, -1)


def session(nodes: list, inits: list, k: int, outs: list[str], threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=[*opsets, helper.make_opsetid(native_ops.DOMAIN, 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    native_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def build(qtype: Q, n: int, k: int, copies: int, threads: int) -> tuple[dict, dict]:
    """The native and MatMulNBits sessions over the same `copies` matrices, and their bytes per matrix."""
    rng = np.random.default_rng(0)
    layout = {**LAYOUTS, Q.Q4_1: Q4_1_LAYOUT}[qtype]  # Q4_1's op: built, not yet used by import
    nat_nodes, nat_inits, nb_nodes, nb_inits, outs = [], [], [], [], []
    nat_bytes = nb_bytes = 0
    for c in range(copies):
        raw = random_rows(qtype, n, k, rng)
        nat_inits.append(numpy_helper.from_array(layout.regroup(raw), f"w{c}"))
        nat_nodes.append(
            helper.make_node(layout.op, ["x", f"w{c}"], [f"y{c}"], domain=native_ops.DOMAIN, K=k, N=n)
        )
        nat_bytes = raw.nbytes
        t = TensorInfo(name="w", qtype=qtype, shape=(n, k), data=raw)
        p = pack_matrix(t, source_bits(t))
        nb_inits += [numpy_helper.from_array(p.packed, f"q{c}"), numpy_helper.from_array(p.scales, f"s{c}")]
        y = f"y{c}" if p.correction is None else f"m{c}"
        nb_nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"q{c}", f"s{c}"],
                [y],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=p.bits,
                block_size=p.block,
                accuracy_level=4,
            )
        )
        nb_bytes = p.packed.nbytes + p.scales.nbytes
        if p.correction is not None:  # as graph_builder: y += blocksum(x) @ C^T
            e = np.zeros((k, k // p.block), np.float32)
            e[np.arange(k), np.arange(k) // p.block] = 1
            nb_inits += [
                numpy_helper.from_array(e, f"e{c}"),
                numpy_helper.from_array(np.ascontiguousarray(p.correction.T), f"c{c}"),
            ]
            nb_nodes += [
                helper.make_node("MatMul", ["x", f"e{c}"], [f"b{c}"]),
                helper.make_node("Gemm", [f"b{c}", f"c{c}", y], [f"y{c}"]),
            ]
            nb_bytes += p.correction.nbytes
        outs.append(f"y{c}")
    sessions = {
        "native": session(nat_nodes, nat_inits, k, outs, threads),
        "MatMulNBits": session(nb_nodes, nb_inits, k, outs, threads),
    }
    return sessions, {"native": nat_bytes, "MatMulNBits": nb_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q6_K", "Q4_K"], choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=96, help="weights read per run (copies of the matrix)")
    ap.add_argument("--m", type=int, default=1, help="activation rows (1: decode; e.g. 256: prefill)")
    args = ap.parse_args()
    if not native_ops.available():
        raise SystemExit(f"the native op library is not available ({native_ops.unavailable_reason()})")
    print(f"library {native_ops.library_path()}; {args.threads} threads, M={args.m}, medians")
    for name in args.types:
        qtype = Q[name]
        for n, k in SHAPES[name]:
            one = n * k // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
            copies = max(1, -(-args.mib * 2**20 // one))
            sessions, nbytes = build(qtype, n, k, copies, args.threads)
            x = {"x": np.random.default_rng(1).standard_normal((args.m, k)).astype(np.float32)}
            times: dict[str, list[float]] = {e: [] for e in sessions}
            for s in sessions.values():
                s.run(None, x)  # warm-up: prepacking, first touch
            for _ in range(args.rounds):
                for e, s in sessions.items():
                    reps = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        s.run(None, x)
                        reps.append((time.perf_counter() - t0) / copies)
                    times[e].append(statistics.median(reps))
            med = {e: statistics.median(v) for e, v in times.items()}
            spread = {e: (max(v) - min(v)) / med[e] for e, v in times.items()}
            print(
                f"{name:5s} N={n:6d} K={k:5d} x{copies:<3d} "
                + "  ".join(
                    f"{e} {med[e] * 1e6:7.1f} us {nbytes[e] / med[e] / 1e9:5.1f} GB/s ±{spread[e] * 50:.0f}%"
                    for e in sessions
                )
                + f"  native/MatMulNBits time {med['native'] / med['MatMulNBits']:.2f}x,"
                f" bytes {nbytes['native'] / nbytes['MatMulNBits']:.2f}x",
                flush=True,
            )
            del sessions


if __name__ == "__main__":
    main()

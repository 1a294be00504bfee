"""llmos's native Q4_0 op (llmos/native/gguf_ops.cc) against onnxruntime's MatMulNBits and the exact graph.

A tiny random-weight llama quantized to Q4_0 by llama.cpp's own quantizer is imported twice: with the
op's library available (Q4_0 matrices on `GgufMatMulQ4_0x16`) and with `LLMOS_GGUF_OPS` pointing at a
missing file (MatMulNBits, as on a machine where the library was not built). Both round activations to
int8 per block of 32, so both are compared with the exact fp32 graph of the same weights, and with each
other. The op tests skip, with the reason, only when the library was not built here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType
from onnx import TensorProto, helper, numpy_helper

from llmos.engine import native_ops
from llmos.engine.llm_engine import LLMEngine
from llmos.errors import ModelUnavailableError
from llmos.gguf_layouts import LAYOUTS, gguf_rows, q4_0_x16
from llmos.manifest import ModelManifest
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

TOKENS = [int(t) for t in np.random.default_rng(0).integers(3, 1000, 48)]
OP_Q4_0 = LAYOUTS[GGMLQuantizationType.Q4_0].op
missing_reason = native_ops.unavailable_reason()
needs_op = pytest.mark.skipif(
    missing_reason is not None, reason=f"native op library not built ({missing_reason}; scripts/setup.sh)"
)


@pytest.fixture
def without_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv(native_ops.ENV, str(tmp_path / "no-such-library.so"))
    yield


def q4_0_rows(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Random GGUF Q4_0 rows [n, k/32*18] and the float32 weights they hold."""
    nb = k // 32
    d = (rng.standard_normal((n, nb)) * 0.02).astype(np.float16)
    qs = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    raw = np.empty((n, nb, 18), np.uint8)
    raw[..., :2] = d.view(np.uint8).reshape(n, nb, 2)
    raw[..., 2:] = qs
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32) - 8
    return raw.reshape(n, -1), (q * d.astype(np.float32)[..., None]).reshape(n, k)


def test_x16_layout_only_moves_the_bytes() -> None:
    raw, _ = q4_0_rows(np.random.default_rng(1), 32, 96)
    x16 = q4_0_x16(raw)
    assert x16.shape == raw.shape and sorted(x16.ravel()) == sorted(raw.ravel())
    g = x16.reshape(2, 3, 288)  # group 1, block 2, row 5: scale, then quant bytes 4c..4c+3 of chunk c
    row = raw[16 + 5].reshape(3, 18)[2]
    assert bytes(g[1, 2, 10:12]) == bytes(row[0:2])
    for c in range(4):
        assert bytes(g[1, 2, 32 + 64 * c + 20 : 32 + 64 * c + 24]) == bytes(row[2 + 4 * c : 6 + 4 * c])
    with pytest.raises(ValueError):
        q4_0_x16(raw[:8])
    layout = LAYOUTS[GGMLQuantizationType.Q4_0]
    assert (layout.ungroup(x16) == raw).all()
    ids = np.array([[31, 0], [17, 17]])
    assert (gguf_rows(layout, x16, ids) == raw[ids]).all()


def q8_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T with x rounded to int8 per block of 32, as the op (and llama.cpp's q8_0) rounds it."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(xb / np.where(d == 0, 1, d))
    return (q * d).reshape(x.shape).astype(np.float64) @ w.T.astype(np.float64)


@needs_op
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5)])
def test_op_computes_the_q4_0_product(shape: tuple[int, int]) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    n, k = 80, 320
    raw, w = q4_0_rows(rng, n, k)
    node = helper.make_node(OP_Q4_0, ["x", "w"], ["y"], domain=native_ops.DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(q4_0_x16(raw), "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native_ops.DOMAIN, 1)]
    )
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    native_ops.register(so)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((*shape, k)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    assert y.shape == (*shape, n)
    ref = q8_reference(x, w)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()  # float32 sums of the same integers


# -- a tiny model quantized by llama.cpp ------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4_0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's quantizer makes the Q4_0 file")
    d = tmp_path_factory.mktemp("native")
    src = d / "f32.gguf"
    write_random_gguf(
        src, arch="llama", n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_layer=2, n_vocab=1024, seed=7
    )
    dst = d / "Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


@pytest.fixture(scope="module")
def imports(q4_0_file: Path) -> dict[str, Path]:
    """The file imported with the op (when built), for MatMulNBits, and as the exact fp32 graph."""
    store = ModelStore(q4_0_file.parent / "store")
    out = {"fp32": store.import_gguf(q4_0_file, precision="fp32", name="exact")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native_ops.ENV, str(q4_0_file.parent / "no-such-library.so"))
        out["nbits"] = store.import_gguf(q4_0_file, precision="int4", name="nbits")
    if missing_reason is None:
        out["native"] = store.import_gguf(q4_0_file, precision="int4", name="native")
    return out


def logits(model_dir: Path, chunks: tuple[int, ...] = (len(TOKENS),)) -> np.ndarray:
    engine = LLMEngine(model_dir, threads=2)
    cache = engine.pool.allocate()
    try:
        parts, start = [], 0
        for n in chunks:
            parts.append(engine.runner.prefill(cache, TOKENS[start : start + n], all_logits=True))
            start += n
    finally:
        cache.free()
    return np.concatenate(parts).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_fallback_imports_for_matmul_nbits(imports: dict[str, Path]) -> None:
    m = ModelManifest.read(imports["nbits"])
    assert m.custom_op_domains == [] and m.exact_weights
    assert b"GgufMatMulQ4_0x16" not in (imports["nbits"] / "model.onnx").read_bytes()
    assert (1 - cosine(logits(imports["nbits"]), logits(imports["fp32"]))).max() <= 2e-4


@needs_op
def test_native_graph_follows_the_exact_graph_and_matmul_nbits(imports: dict[str, Path]) -> None:
    m = ModelManifest.read(imports["native"])
    assert m.custom_op_domains == [native_ops.DOMAIN] and m.exact_weights
    graph = onnx.load(str(imports["native"] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count(OP_Q4_0) == 8  # per layer: fused q/k/v, o, fused gate/up, down
    native, nbits, exact = logits(imports["native"]), logits(imports["nbits"]), logits(imports["fp32"])
    # both round activations to int8 per 32 (MatMulNBits measured 4.3e-5 from the exact graph)
    off_native = (1 - cosine(native, exact)).max()
    off_nbits = (1 - cosine(nbits, exact)).max()
    assert off_native <= max(2e-4, 1.5 * off_nbits), (off_native, off_nbits)
    assert (1 - cosine(native, nbits)).max() <= 4e-4
    assert (native.argmax(-1) == exact.argmax(-1)).all()


@needs_op
def test_native_chunked_prefill_equals_one_shot(imports: dict[str, Path]) -> None:
    one = logits(imports["native"])
    chunked = logits(imports["native"], (20, 1, 27))
    assert (1 - cosine(one, chunked)).max() <= 1e-6


def greedy(model_dir: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens for several prompts, decoded together in one batch."""
    engine = LLMEngine(model_dir, threads=2)
    caches = [engine.pool.allocate() for _ in prompts]
    try:
        last = [int(engine.runner.prefill(c, p).argmax()) for c, p in zip(caches, prompts, strict=True)]
        out = [[t] for t in last]
        for _ in range(steps - 1):
            last = [int(t) for t in engine.runner.decode(caches, last).argmax(-1)]
            for seq, t in zip(out, last, strict=True):
                seq.append(t)
    finally:
        for c in caches:
            c.free()
    return out


@needs_op
def test_native_greedy_tokens_batched_and_alone_match_matmul_nbits(imports: dict[str, Path]) -> None:
    prompts = [TOKENS[:9], TOKENS[9:30], TOKENS[30:34]]
    batched = greedy(imports["native"], prompts, 12)
    assert batched == [greedy(imports["native"], [p], 12)[0] for p in prompts]
    assert batched == greedy(imports["nbits"], prompts, 12)


@needs_op
def test_model_with_the_op_refuses_to_load_without_its_library(
    imports: dict[str, Path], without_op: None
) -> None:
    assert not native_ops.available()
    with pytest.raises(ModelUnavailableError) as e:
        LLMEngine(imports["native"], threads=2)
    message = str(e.value)
    assert native_ops.LIBRARY_NAME in message and "scripts/setup.sh" in message
    LLMEngine(imports["nbits"], threads=2)  # a MatMulNBits import loads as before


@needs_op
def test_reimport_without_the_library_falls_back(q4_0_file: Path, tmp_path: Path, without_op: None) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(native_ops.ENV)
        first = store.import_gguf(q4_0_file, name="m")
    assert ModelManifest.read(first).custom_op_domains == [native_ops.DOMAIN]
    again = store.import_gguf(q4_0_file, name="m")  # the fix the refusal names, without the library
    assert again == first and ModelManifest.read(again).custom_op_domains == []
    LLMEngine(again, threads=2)

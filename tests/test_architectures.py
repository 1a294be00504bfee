"""Every supported architecture against llama.cpp on the same file.

For llama, llama with llama 3.x `rope_freqs`, qwen2, qwen3 and gemma3, a tiny random-weight GGUF is
written at F32 (llmos.tiny_model) and quantized by llama.cpp's own quantizer to Q8_0, Q4_0 and Q4_1.
llama.cpp (llama-cpp-python: one thread, F32 KV cache so that only the weights and its own activation
rounding differ) and llmos (prefill of half the sequence, then teacher-forced decode steps, so both graph
paths are covered) run the same 48 tokens, and their logit vectors are compared per position: cosine,
top-10 overlap and max |Δ|. Random-weight models repeat tokens with huge margins, so top-1 alone would
prove nothing.

Bars:
- llmos's fp32 graph (the dequantized GGUF weights, float32 arithmetic) against llama.cpp: cosine >=
  0.999 at every position. On F32 files the two agree to ~4e-6 (gemma3: 6e-3, llama.cpp's GELU goes
  through an fp16 table); on quantized files what remains is llama.cpp rounding activations to 8 bits.
- llmos's int4 graph (the GGUF's Q4_x/Q8_0 bits carried exactly, activations rounded to int8 per block
  by MatMulNBits) is as close to that exact fp32 computation as llama.cpp is: both engines round the
  activations the same way (per block of 32, to int8), so their distances to the exact graph are the
  same within sampling noise.
- The numpy reference (tests/reference_llama.py), written from llama.cpp's model code, agrees with
  llama.cpp and with the fp32 graph; each feature the tiny files exercise (rope_freqs, sliding window,
  local rotary base, q/k norms, post-norms, linear rope scaling, logit softcap) visibly changes the
  logits, so a graph that ignored it would fail.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
from gguf_files import copy_with_metadata
from reference_llama import ReferenceLlama

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.errors import ModelFormatError, UnsupportedModelError
from llmos.gguf_file import GGUFFile
from llmos.model_store import ModelStore
from llmos.tiny_model import llama3_rope_factors, write_random_gguf

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

CASES: dict[str, dict[str, object]] = {
    "llama": {"arch": "llama"},
    "llama3": {  # llama 3.x: rope_freqs.weight from rope_scaling {"rope_type": "llama3", factor 8}
        "arch": "llama",
        "rope_theta": 500000.0,
        "rope_freq_factors": llama3_rope_factors(16, 500000.0, original_context=64),
        "tokenizer_pre": "llama-bpe",
    },
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3", "head_dim": 32},  # 4 heads x 32 = 128 wide q on a 64-wide model
    # 7 layers: 0-4 and 6 slide (window 5, base 10000), 5 is global (base 1e6)
    "gemma3": {"arch": "gemma3", "head_dim": 32, "n_layer": 7, "rope_theta": 1e6, "sliding_window": 5},
}
TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1")
N_TOKENS = 48
SPLIT = 20  # llmos prefills this many tokens, then decodes the rest one at a time


def _ids(n_vocab: int) -> list[int]:
    rng = np.random.default_rng(11)
    return [1, *rng.integers(3, n_vocab, N_TOKENS - 1).tolist()]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


def _quantize(src: Path, dst: Path, weight_type: str) -> Path:
    """llama.cpp's own quantizer (what llama-quantize runs), so the files are what users download."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{weight_type}")
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return dst


@functools.cache
def _gguf(work: Path, case: str, weight_type: str) -> Path:
    src = write_random_gguf(work / f"{case}-F32.gguf", seed=3, **CASES[case])  # type: ignore[arg-type]
    return src if weight_type == "F32" else _quantize(src, work / f"{case}-{weight_type}.gguf", weight_type)


@functools.cache
def _llama_cpp_logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(
        str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0
    )  # ggml type 0 = F32 KV cache
    ids = _ids(llm.n_vocab())
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def _engine(work: Path, path: Path, precision: str) -> LLMEngine:
    d = ModelStore(work / "store").import_gguf(path, precision=precision, name=path.stem)  # type: ignore[arg-type]
    return LLMEngine(d, threads=1, warmup=False)


@functools.cache
def _llmos_logits(work: Path, path: Path, precision: str) -> np.ndarray:
    """Teacher-forced: prefill the first SPLIT tokens (all logits), then one decode step per token."""
    engine = _engine(work, path, precision)
    ids = _ids(engine.manifest.n_vocab)
    cache = engine.pool.allocate()
    rows = [engine.runner.prefill(cache, ids[:SPLIT], all_logits=True)]
    rows += [engine.runner.decode([cache], [t]) for t in ids[SPLIT:]]
    cache.free()
    return np.concatenate(rows).astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _top10(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=-1)[:, :10], np.argsort(-b, axis=-1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb, strict=True)]))


def _figures(a: np.ndarray, b: np.ndarray) -> str:
    c = _cosine(a, b)
    return (
        f"cos min {c.min():.5f} mean {c.mean():.6f} top10 {_top10(a, b):.3f} max|Δ| {np.abs(a - b).max():.2e}"
    )


# -- the numpy reference, llama.cpp and the fp32 graph agree --------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_llama_cpp_on_the_f32_file(work: Path, case: str) -> None:
    path = _gguf(work, case, "F32")
    ref = ReferenceLlama.from_gguf(path)
    theirs = _llama_cpp_logits(path)
    ids = _ids(ref.cfg.n_vocab)
    # gemma3: llama.cpp's GELU reads an fp16 table (ggml_vec_geglu_f32 under GGML_GELU_FP16)
    atol = 1e-2 if case == "gemma3" else 1e-4
    np.testing.assert_allclose(ref.forward(ids), theirs, rtol=0, atol=atol)


@pytest.mark.parametrize("weight_type", TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_graph_equals_the_reference_prefill_and_decode(work: Path, case: str, weight_type: str) -> None:
    path = _gguf(work, case, weight_type)
    ref = ReferenceLlama.from_gguf(path)
    ours = _llmos_logits(work, path, "fp32")
    assert np.abs(ours - ref.forward(_ids(ref.cfg.n_vocab))).max() <= 1e-3


# -- against llama.cpp -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_type", TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_graph_vs_llama_cpp(work: Path, case: str, weight_type: str) -> None:
    path = _gguf(work, case, weight_type)
    ours, theirs = _llmos_logits(work, path, "fp32"), _llama_cpp_logits(path)
    print(f"\n{case} {weight_type} fp32 vs llama.cpp: {_figures(ours, theirs)}")
    assert _cosine(ours, theirs).min() >= 0.999
    assert _top10(ours, theirs) >= 0.95
    if weight_type == "F32":  # gemma3: llama.cpp's fp16 GELU table (mean |Δ| 11x smaller emulating it)
        assert np.abs(ours - theirs).max() <= (1e-2 if case == "gemma3" else 1e-4)


@pytest.mark.parametrize("weight_type", TYPES[1:])
@pytest.mark.parametrize("case", list(CASES))
def test_int4_graph_is_as_close_to_the_exact_graph_as_llama_cpp(
    work: Path, case: str, weight_type: str
) -> None:
    path = _gguf(work, case, weight_type)
    exact = _llmos_logits(work, path, "fp32")
    int4, theirs = _llmos_logits(work, path, "int4"), _llama_cpp_logits(path)
    ours_err = float(np.mean(1 - _cosine(int4, exact)))
    their_err = float(np.mean(1 - _cosine(theirs, exact)))
    print(
        f"\n{case} {weight_type} int4 vs fp32: {_figures(int4, exact)}"
        f"\n{case} {weight_type} llama.cpp vs fp32: {_figures(theirs, exact)}"
        f"\n{case} {weight_type} int4 vs llama.cpp: {_figures(int4, theirs)}"
        f"\n  mean 1-cos to the exact graph: int4 {ours_err:.2e}, llama.cpp {their_err:.2e}"
    )
    assert GGUFFile(path).tensor("blk.0.ffn_down.weight").qtype.name == weight_type
    # Both round activations to int8 per 32; on 48 positions their distances differ by noise only.
    assert ours_err <= 1.3 * their_err
    assert _cosine(int4, exact).min() >= min(0.999, _cosine(theirs, exact).min() - 5e-4)
    assert _cosine(int4, theirs).min() >= 0.997 and _top10(int4, theirs) >= 0.95


# -- each feature the tiny files exercise really matters ----------------------------------------------------


def _far_from_llama_cpp(ref: ReferenceLlama, path: Path, what: str) -> None:
    diff = np.abs(ref.forward(_ids(ref.cfg.n_vocab)) - _llama_cpp_logits(path)).max()
    assert diff > 0.1, f"without {what} the logits barely change ({diff:.2e}): the test would not notice"


def test_every_feature_changes_the_logits(work: Path) -> None:
    llama3 = ReferenceLlama.from_gguf(_gguf(work, "llama3", "F32"))
    assert llama3.cfg.rope_factors is not None and max(llama3.cfg.rope_factors) == 8.0
    _far_from_llama_cpp(
        ReferenceLlama(llama3.w, dataclasses.replace(llama3.cfg, rope_factors=None)),
        _gguf(work, "llama3", "F32"),
        "rope_freqs",
    )
    qwen3 = ReferenceLlama.from_gguf(_gguf(work, "qwen3", "F32"))
    no_qk = {k: v for k, v in qwen3.w.items() if "attn_q_norm" not in k and "attn_k_norm" not in k}
    _far_from_llama_cpp(ReferenceLlama(no_qk, qwen3.cfg), _gguf(work, "qwen3", "F32"), "q/k norms")
    gemma_path = _gguf(work, "gemma3", "F32")
    gemma = ReferenceLlama.from_gguf(gemma_path)
    _far_from_llama_cpp(
        ReferenceLlama(gemma.w, dataclasses.replace(gemma.cfg, sliding_window=0)), gemma_path, "the window"
    )
    _far_from_llama_cpp(  # layer 5 is global: with base 10000 everywhere it would rotate differently
        ReferenceLlama(gemma.w, dataclasses.replace(gemma.cfg, rope_theta=10000.0)), gemma_path, "1e6 base"
    )
    ones = {k: (np.ones_like(v) if "post_" in k else v) for k, v in gemma.w.items()}
    assert np.abs(ones["blk.0.post_ffw_norm.weight"] - gemma.w["blk.0.post_ffw_norm.weight"]).max() > 0
    _far_from_llama_cpp(ReferenceLlama(ones, gemma.cfg), gemma_path, "post-norm weights")


@pytest.mark.parametrize(
    "extra",
    [{"rope_scaling_factor": 8.0}, {"final_logit_softcap": 3.0}, {"sliding_window": 0}],
    ids=["linear-rope-scaling", "logit-softcap", "no-window"],
)
def test_gemma3_variants_match_llama_cpp(work: Path, extra: dict[str, float]) -> None:
    """Gemma 3 4B+ files scale rotary positions by 1/8 on the global layers only; a final logit softcap
    (gemma2's, absent from gemma3's files) is honoured as llama.cpp honours it; no window = all global."""
    name = "gemma3-" + "-".join(f"{k}{v}" for k, v in extra.items())
    kw = {**CASES["gemma3"], **extra}
    path = write_random_gguf(work / f"{name}.gguf", seed=3, **kw)  # type: ignore[arg-type]
    ref = ReferenceLlama.from_gguf(path)
    theirs = _llama_cpp_logits(path)
    ours = _llmos_logits(work, path, "fp32")
    ids = _ids(ref.cfg.n_vocab)
    np.testing.assert_allclose(ref.forward(ids), theirs, rtol=0, atol=1e-2)
    assert np.abs(ours - theirs).max() <= 1e-2
    plain = ReferenceLlama(
        ref.w,
        dataclasses.replace(ref.cfg, rope_freq_scale=1.0, final_logit_softcap=0.0, sliding_window=5),
    )
    _far_from_llama_cpp(plain, path, str(extra))


def test_gemma3_local_rotary_base_from_the_file(work: Path) -> None:
    """`gemma3.rope.freq_base_swa` (absent from Google's files, where llama.cpp uses 10000) is honoured
    by llama.cpp when present, so by llmos too."""
    path = copy_with_metadata(
        _gguf(work, "gemma3", "F32"), work / "gemma3-swa-base.gguf", {"gemma3.rope.freq_base_swa": 5000.0}
    )
    assert GGUFFile(path).hparams().rope_theta_local == 5000.0
    ref, theirs = ReferenceLlama.from_gguf(path), _llama_cpp_logits(path)
    np.testing.assert_allclose(ref.forward(_ids(ref.cfg.n_vocab)), theirs, rtol=0, atol=1e-2)
    assert np.abs(_llmos_logits(work, path, "fp32") - theirs).max() <= 1e-2
    _far_from_llama_cpp(
        ReferenceLlama(ref.w, dataclasses.replace(ref.cfg, rope_theta_local=10000.0)), path, "its base"
    )


def test_gemma3_chunked_prefill_equals_one_shot(work: Path) -> None:
    """Chunks of 7 after a past: the window (5) reaches back into keys of earlier chunks."""
    engine = _engine(work, _gguf(work, "gemma3", "F32"), "fp32")
    ids = _ids(engine.manifest.n_vocab)
    whole, chunked = engine.pool.allocate(), engine.pool.allocate()
    expect = engine.runner.prefill(whole, ids, all_logits=True)
    got = np.concatenate(
        [engine.runner.prefill(chunked, ids[i : i + 7], all_logits=True) for i in range(0, len(ids), 7)]
    )
    whole.free()
    chunked.free()
    assert np.abs(got - expect).max() <= 1e-4


def test_gemma3_batched_decode_equals_one_by_one(work: Path) -> None:
    """Sequences of different lengths in one batch each keep their own sliding window."""
    engine = _engine(work, _gguf(work, "gemma3", "Q4_0"), "int4")
    ids = _ids(engine.manifest.n_vocab)
    prompts = [ids[:17], ids[:3], ids[5:14]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 9, 12)]
    alone = [engine.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in engine.generate_batch(prompts, params)] == alone


# -- hyper-parameters ---------------------------------------------------------------------------------------


def test_hyper_parameters_per_architecture(work: Path) -> None:
    hp = GGUFFile(_gguf(work, "gemma3", "F32")).hparams()
    assert (hp.n_embd, hp.n_head, hp.head_dim, hp.q_dim) == (64, 4, 32, 128)
    assert hp.local_layers == (0, 1, 2, 3, 4, 6) and hp.sliding_window == 5
    assert (hp.rope_theta, hp.rope_theta_local, hp.rope_freq_scale) == (1e6, 10000.0, 1.0)
    assert hp.embedding_scale == pytest.approx(8.0) and hp.kq_scale == pytest.approx(32**-0.5)
    assert hp.qk_norm and hp.post_norms and hp.ffn_activation == "gelu_tanh" and not hp.rope_interleaved
    assert hp.final_logit_softcap == 0.0
    hp = GGUFFile(_gguf(work, "qwen3", "Q4_0")).hparams()
    assert hp.qk_norm and not hp.post_norms and not hp.attention_bias and not hp.rope_interleaved
    assert hp.local_layers == () and hp.ffn_activation == "silu" and hp.embedding_scale == 1.0
    hp = GGUFFile(_gguf(work, "llama3", "F32")).hparams()
    assert hp.rope_interleaved and hp.rope_freq_factors is not None and len(hp.rope_freq_factors) == 8
    assert hp.rope_freq_factors[0] == 1.0 and hp.rope_freq_factors[-1] == 8.0
    assert GGUFFile(_gguf(work, "llama", "F32")).hparams().rope_freq_factors is None


def test_rope_scaling_kinds(tmp_path: Path) -> None:
    src = write_random_gguf(tmp_path / "l.gguf", rope_freq_factors=np.ones(8, np.float32))
    yarn = copy_with_metadata(src, tmp_path / "yarn.gguf", {"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        GGUFFile(yarn).hparams()
    # llama.cpp's rules: a factor without a type is linear; type "none" ignores the factor
    linear = copy_with_metadata(src, tmp_path / "lin.gguf", {"llama.rope.scaling.factor": 4.0})
    assert GGUFFile(linear).hparams().rope_freq_scale == 0.25
    none = copy_with_metadata(
        src, tmp_path / "none.gguf", {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}
    )
    assert GGUFFile(none).hparams().rope_freq_scale == 1.0
    bad = write_random_gguf(tmp_path / "b.gguf", rope_freq_factors=np.zeros(8, np.float32))
    with pytest.raises(ModelFormatError, match="rope_freqs"):
        GGUFFile(bad).hparams()

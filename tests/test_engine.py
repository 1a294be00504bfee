"""Engine correctness on tiny random-weight models built by the project's own builder.

The numpy reference (tests/reference_llama.py) defines "correct"; the fp32 graph must match it to 1e-3
for prefill and decode, for llama and qwen2, and every batching or chunking path must give the same
tokens as the plain one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from reference_llama import ReferenceLlama

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import Sampler, SamplingParams
from llmos.errors import ContextOverflowError, InvalidSamplingError, ModelCorruptError, ModelFormatError
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

PROMPT = [1, 40, 77, 120, 9, 250, 33, 64, 201, 5, 18, 99]


def _engine(
    tmp: Path,
    *,
    arch: str = "llama",
    weight_type: str = "F32",
    precision: str = "fp32",
    tied: bool = True,
    **engine_kw: object,
) -> tuple[LLMEngine, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    gguf = write_random_gguf(
        tmp / f"{arch}-{weight_type}.gguf",
        arch=arch,
        weight_type=weight_type,
        n_layer=3,
        n_embd=64,
        n_ff=128,
        n_head=4,
        n_head_kv=2,
        seed=7,
        tied_embeddings=tied,
    )
    d = ModelStore(tmp / "store").import_gguf(gguf, precision=precision)  # type: ignore[arg-type]
    return LLMEngine(d, threads=1, warmup=False, **engine_kw), gguf  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLMEngine, ReferenceLlama]:
    engine, gguf = _engine(tmp_path_factory.mktemp("llama"))
    return engine, ReferenceLlama.from_gguf(gguf)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_prefill_and_decode_match_numpy_reference(tmp_path: Path, arch: str) -> None:
    engine, gguf = _engine(tmp_path, arch=arch)
    ref = ReferenceLlama.from_gguf(gguf)
    state = ref.new_state()
    cache = engine.pool.allocate()
    got = engine.runner.prefill(cache, PROMPT, all_logits=True)
    want = ref.forward(PROMPT, 0, state)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3
    token = int(np.argmax(want[-1]))
    for step in range(20):  # teacher-forced by the reference's own greedy choice
        got = engine.runner.decode([cache], [token])[0]
        want = ref.forward([token], len(PROMPT) + step, state)[0]
        assert np.abs(got - want).max() <= 1e-3, f"decode step {step}"
        token = int(np.argmax(want))
    cache.free()


def test_greedy_generation_equals_reference_greedy(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, ref = llama_fp32
    out = engine.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))
    assert out.token_ids == ref.greedy(PROMPT, 24)
    assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == 24
    assert out.finish_reason == "length"


def test_chunked_prefill_gives_the_same_logits(tmp_path: Path) -> None:
    whole, _ = _engine(tmp_path / "a")
    chunked, _ = _engine(tmp_path / "b", prefill_chunk=5)
    a = whole.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    b = chunked.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    assert a.token_ids == b.token_ids
    ca, cb = whole.pool.allocate(), chunked.pool.allocate()
    la = whole.runner.prefill(ca, PROMPT)
    for i in range(0, len(PROMPT), 5):
        lb = chunked.runner.prefill(cb, PROMPT[i : i + 5])
    assert np.abs(la[-1] - lb[-1]).max() <= 1e-4


def test_batched_decode_gives_the_same_tokens_as_one_by_one(
    llama_fp32: tuple[LLMEngine, ReferenceLlama],
) -> None:
    engine, _ = llama_fp32
    prompts = [PROMPT, PROMPT[:5], [1, 2, 3, 200, 150, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [99]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 7, 15, 20)]
    alone = [engine.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    together = [c.token_ids for c in engine.generate_batch(prompts, params)]
    assert together == alone  # different lengths, and sequences leaving the batch mid-way


def test_batch_with_a_gap_in_the_slots(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    """A sequence in the middle slot finishes early: the others keep decoding across the hole unharmed."""
    engine, _ = llama_fp32
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    expect = [engine.generate(p, sp).token_ids for p in (PROMPT, PROMPT[:6])]
    seqs = [
        engine.add_request(PROMPT, sp),
        engine.add_request([5, 6, 7], sp),
        engine.add_request(PROMPT[:6], sp),
    ]
    while not seqs[0].output_ids or len(seqs[0].output_ids) < 4:
        engine.step()
    engine.cancel(seqs[1])
    engine.release(seqs[1])
    while not (seqs[0].finished and seqs[2].finished):
        engine.step()
    assert [seqs[0].output_ids, seqs[2].output_ids] == expect
    for s in (seqs[0], seqs[2]):
        engine.release(s)
    assert engine.pool.in_use == 0


def test_seeded_sampling_is_reproducible(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32

    def run(seed: int) -> list[int]:
        sp = SamplingParams(max_tokens=24, temperature=4.0, top_k=40, top_p=0.95, seed=seed, ignore_eos=True)
        return engine.generate(PROMPT, sp).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)
    # the seed is per request: another request in the same batch does not change this one's draw
    sp = SamplingParams(max_tokens=24, temperature=4.0, top_k=40, top_p=0.95, seed=3, ignore_eos=True)
    batch = engine.generate_batch([PROMPT, PROMPT[:4]], [sp, SamplingParams(temperature=4.0, max_tokens=30)])
    assert batch[0].token_ids == run(3)


def test_repetition_penalty_changes_greedy_output(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32
    plain = engine.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True)).token_ids
    penalised = engine.generate(
        PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=5.0)
    ).token_ids
    assert len(set(penalised)) > len(set(plain))


def test_stop_string_ends_generation_and_is_not_returned(
    llama_fp32: tuple[LLMEngine, ReferenceLlama],
) -> None:
    engine, _ = llama_fp32
    full = engine.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    stop = full.text[10:13]
    assert stop and stop in full.text
    cut = engine.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(
        c.text for c in engine.stream(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))
    )
    assert streamed == cut.text


def test_streaming_reassembles_to_the_full_text(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32
    sp = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.9, seed=11)
    chunks = list(engine.stream(PROMPT, sp))
    full = engine.generate(PROMPT, sp)
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_prompt_longer_than_context_is_a_named_error(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32
    with pytest.raises(ContextOverflowError, match="256"):
        engine.generate([5] * 300)
    assert engine.pool.in_use == 0 and not engine.has_work  # nothing left behind


def test_generation_stops_at_a_full_context(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32
    out = engine.generate([5] * 250, SamplingParams(max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "context"
    assert len(out.token_ids) == 256 - 250 + 1  # the last token is sampled but never needs a slot


@pytest.mark.parametrize(
    "options, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"nonsense": 1}, "nonsense"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_sampling_values_are_named(options: dict, field: str) -> None:
    with pytest.raises(InvalidSamplingError, match=field):
        SamplingParams.of(**options)


def test_bad_prompts_are_named_errors(llama_fp32: tuple[LLMEngine, ReferenceLlama]) -> None:
    engine, _ = llama_fp32
    with pytest.raises(InvalidSamplingError, match="empty"):
        engine.generate("")
    with pytest.raises(InvalidSamplingError, match="token ids"):
        engine.generate([1, 10**6])
    assert engine.pool.in_use == 0


@pytest.mark.parametrize(
    "weight_type, precision", [("Q4_1", "int4"), ("Q4_0", "int4"), ("Q8_0", "int8"), ("Q4_1", "int8")]
)
def test_quantized_graphs_track_the_reference(tmp_path: Path, weight_type: str, precision: str) -> None:
    """Exact weights; only onnxruntime's 8-bit activation rounding (accuracy_level 4) separates them."""
    engine, gguf = _engine(tmp_path, weight_type=weight_type, precision=precision)
    assert engine.manifest.exact_weights
    want = ReferenceLlama.from_gguf(gguf).forward(PROMPT, 0, None)
    got = engine.runner.prefill(engine.pool.allocate(), PROMPT, all_logits=True)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() > 0.995
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_kv_pool_growth_mid_generation_changes_nothing(tmp_path: Path) -> None:
    """The pool starts at 15 positions and doubles while sequences are prefilling and decoding."""
    big, _ = _engine(tmp_path / "a")
    small, _ = _engine(tmp_path / "b", kv_initial_len=8)
    assert small.pool.capacity == 15  # 8 asked for, rounded up to 16 rows per slot (whole pages)
    prompts = [PROMPT, PROMPT[:3], PROMPT * 2]
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    assert [c.token_ids for c in small.generate_batch(prompts, sp)] == [
        c.token_ids for c in big.generate_batch(prompts, sp)
    ]
    assert small.pool.capacity >= len(PROMPT) * 2 + 40 and small.pool.generation >= 2


def test_a_damaged_model_directory_is_a_named_error(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "ok")
    broken = tmp_path / "broken"
    shutil.copytree(engine.model_dir, broken)
    (broken / "model.onnx.data").write_bytes(b"")  # weights lost
    with pytest.raises(ModelCorruptError, match=r"model\.onnx\.data is 0 bytes but import wrote \d+ \("):
        LLMEngine(broken, warmup=False)
    (broken / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match="not a model directory"):
        LLMEngine(broken, warmup=False)


def test_untied_q8_0_head_stays_exact_in_the_int4_graph(tmp_path: Path) -> None:
    """A Q4_1 file whose separate output.weight is Q8_0 (as llama.cpp writes them): nothing re-rounded."""
    engine, gguf = _engine(tmp_path, weight_type="Q4_1", precision="int4", tied=False)
    assert engine.manifest.exact_weights
    want = ReferenceLlama.from_gguf(gguf).forward(PROMPT, 0, None)
    got = engine.runner.prefill(engine.pool.allocate(), PROMPT, all_logits=True)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() > 0.995


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"temperature": 1e-300}, {1}),  # the limit of a vanishing temperature: the top token
        ({"temperature": 1e-300, "top_p": 0.5, "top_k": 3}, {1}),
        # a penalty below 1 rewards repeats: token 0 (seen) is boosted past every other
        ({"temperature": 1.0, "repetition_penalty": 1e-300}, {0}),
    ],
)
def test_extreme_sampling_values_degrade_to_their_limit_instead_of_failing(
    options: dict, expected: set
) -> None:
    logits = np.array([3.0, 250.0, -4.0, 249.5, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(seed=1, **options))
    assert sampler(logits, history=[0, 2]) in expected  # never an exception or a NaN draw


def test_the_penalty_window_is_the_tail_of_prompt_and_output(
    llama_fp32: tuple[LLMEngine, ReferenceLlama],
) -> None:
    engine, _ = llama_fp32
    for prompt_len in (1, 3, 70):
        seq = engine.add_request(list(range(5, 5 + prompt_len)), SamplingParams(max_tokens=5))
        try:
            seq.output_ids = [900, 901, 902]
            for n in (0, 1, 2, 3, 4, 64):
                expected = (seq.prompt_ids + seq.output_ids)[-n:] if n else []
                assert seq.recent(n) == expected
        finally:
            engine.cancel(seq)
            engine.release(seq)

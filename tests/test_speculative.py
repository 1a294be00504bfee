"""Speculative decoding and jump-forward change how many runs produce the tokens, never which tokens.

On tiny random-weight models (fast, and they repeat themselves, so n-gram drafts are proposed often):
greedy and seeded output with and without speculation are identical token for token - alone, batched,
after chunked prefill, through the arbiter with a session's KV restored, with max_tokens and stop
strings falling inside a draft; unseeded sampling keeps its distribution (chi-square). On the real
model: a grounded task is accepted often and still identical.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import ArbiterConfig
from llmos.arbiter.request import Request
from llmos.arbiter.swap_store import SwapStore
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.ngram_draft import NgramDrafter
from llmos.engine.sampling import SamplingParams
from llmos.engine.speculative import CostModel, DraftState, Plan
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

PATTERN = [40, 77, 120, 9, 250, 33, 64, 201, 5, 18, 99, 7]
PROMPT = [1, *PATTERN, 300, *PATTERN, 301, *PATTERN[:6]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("spec")
    gguf = write_random_gguf(
        tmp / "m.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, seed=5, weight_type="F32"
    )
    return ModelStore(tmp / "store").import_gguf(gguf, precision="fp32")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(model_dir, threads=1, warmup=False, max_batch=4, prefill_chunk=16)


def _gen(engine: LLMEngine, prompt: list[int], spec: bool, **kw: object) -> tuple[list[int], str, object]:
    out = engine.generate(
        prompt, SamplingParams(speculative=spec, **{"max_tokens": 40, "ignore_eos": True, **kw})
    )
    return out.token_ids, out.text, out.usage


def test_drafter_finds_latest_continuation() -> None:
    d = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5])
    d.extend([7, 2, 3])
    assert d.draft(3) == [5, 7, 2]  # (2, 3) last followed by 5
    d.extend([5])
    assert d.draft(2) == [7, 2]  # the 3-gram (2, 3, 5) wins over the 2-gram (3, 5)
    assert NgramDrafter([1, 2, 3]).draft(4) == []


def test_greedy_identical_alone_and_chunked(engine: LLMEngine) -> None:
    """PROMPT is longer than the 16-token prefill chunk: it is prefilled in chunks."""
    plain, _, _ = _gen(engine, PROMPT, False)
    spec, _, usage = _gen(engine, PROMPT, True)
    assert spec == plain
    assert usage.draft_tokens > 0 and usage.accepted_tokens > 0  # type: ignore[attr-defined]


class EagerCosts(CostModel):
    """Batched decode priced per row, verify runs nearly free: every draft gets its own run."""

    def decode(self, batch: int) -> float:
        return float(batch)

    def verify(self, positions: int) -> float:
        return 1.0 + 0.01 * positions


def test_greedy_identical_batched(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.speculator, "cost", EagerCosts())
    prompts = [PROMPT, PROMPT[5:], [1, 2, 3, 4], PATTERN * 2]
    plain = engine.generate_batch(prompts, SamplingParams(max_tokens=30, ignore_eos=True, speculative=False))
    spec = engine.generate_batch(prompts, SamplingParams(max_tokens=30, ignore_eos=True, speculative=True))
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert sum(c.usage.accepted_tokens for c in spec) > 0


def test_seeded_sampling_identical(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded draw depends on (seed, position), not on how many runs produced the position."""
    # drafting decisions from fixed cost guesses, not from run times measured on a busy machine
    monkeypatch.setattr(engine.speculator, "cost", CostModel())
    monkeypatch.setattr(CostModel, "_update", staticmethod(lambda *_a: None))
    kw = {"temperature": 0.8, "top_k": 20, "seed": 42, "repetition_penalty": 1.1}
    plain, _, _ = _gen(engine, PROMPT, False, **kw)
    spec, _, usage = _gen(engine, PROMPT, True, **kw)
    assert spec == plain
    assert usage.draft_tokens > 0  # type: ignore[attr-defined]


def test_max_tokens_and_stop_inside_a_draft(engine: LLMEngine) -> None:
    full, text, _ = _gen(engine, PROMPT, False)
    for n in range(1, 40):
        assert _gen(engine, PROMPT, True, max_tokens=n)[0] == full[:n], n
    for cut in range(3, len(text) - 2, 3):
        stop = text[cut : cut + 2]
        if not stop.strip():
            continue
        a, b = _gen(engine, PROMPT, False, stop=[stop]), _gen(engine, PROMPT, True, stop=[stop])
        assert (a[0], a[1]) == (b[0], b[1]), stop


def test_rejected_positions_are_rolled_back(engine: LLMEngine) -> None:
    """A draft that is surely wrong: the sequence keeps one token and the cache length stays consistent."""
    seq = engine.add_request(PROMPT, SamplingParams(max_tokens=10, ignore_eos=True, speculative=True))
    engine.step()  # prefill chunk
    while not seq.output_ids:
        engine.step()
    length = seq.cache.length  # type: ignore[union-attr]
    wrong = [(seq.last_token + 1) % 300] * 4
    p = Plan(seq, wrong, 0, 1.0, 1.0)
    seq.spec = DraftState(NgramDrafter(seq.prompt_ids))
    engine.speculator.verify(p)
    assert seq.cache.length == length + 1  # type: ignore[union-attr]
    assert seq.cache.length == len(seq.kv_ids())  # type: ignore[union-attr]
    engine.cancel(seq)
    engine.release(seq)


def test_sampling_rule_keeps_the_distribution(engine: LLMEngine) -> None:
    """The token at a drafted position, unseeded, with and without a draft: same distribution.

    The draft is the most likely token (so it is accepted often and rejected often); a two-sample
    chi-square test over 600 draws each at a 0.1% level.
    """
    sp = SamplingParams(max_tokens=3, temperature=10.0, top_k=6, ignore_eos=True, speculative=True)
    seq = engine.add_request(PROMPT, sp)
    while not seq.output_ids:
        engine.step()
    start, first = seq.cache.length, list(seq.output_ids)  # type: ignore[union-attr]
    logits = engine.runner.prefill(seq.cache, [seq.last_token])  # type: ignore[arg-type]
    seq.cache.truncate(start)  # type: ignore[union-attr]
    likely = int(np.argmax(logits[-1]))
    seq.spec = DraftState(NgramDrafter())
    counts: dict[bool, dict[int, int]] = {False: {}, True: {}}
    for draft in (False, True):
        for _ in range(600):
            seq.output_ids[:] = first
            seq.cache.truncate(start)  # type: ignore[union-attr]
            seq.status = seq.status.RUNNING
            if draft:
                engine.speculator.verify(Plan(seq, [likely, likely], 0, 1.0, 1.0))
            else:
                engine.decode([seq])
            tok = seq.output_ids[len(first)]
            counts[draft][tok] = counts[draft].get(tok, 0) + 1
    engine.cancel(seq)
    engine.release(seq)
    keys = sorted(set(counts[False]) | set(counts[True]))
    table = np.array([[counts[d].get(k, 0) for k in keys] for d in (False, True)], dtype=float)
    table = table[:, table.sum(0) >= 10]  # pool rare tokens out: chi-square wants expected counts >= 5
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    assert dof >= 2 and _chi2_sf(chi2, dof) > 0.001, (chi2, dof, table)
    assert counts[True].get(likely, 0) > 0


def _chi2_sf(x: float, k: int) -> float:
    """P(X > x) for chi-square with k degrees of freedom (Wilson-Hilferty; ample for a 0.1% test)."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_arbiter_identical_after_session_restore(model_dir: Path, tmp_path: Path) -> None:
    """Three turns of one session through the arbiter, the second restoring the parked KV from memory,
    the third from disk (int8, so lossy: both runs restore the same bytes), with and without
    speculation; stats reach the snapshot."""

    def run(spec: bool) -> tuple[list[list[int]], dict]:
        arb = Arbiter(
            lambda: LLMEngine(model_dir, threads=1, warmup=False, max_batch=4, prefill_chunk=16),
            ArbiterConfig(),  # type: ignore[call-arg]
            SwapStore(tmp_path / f"swap{spec}", model_key="tiny"),
        )
        outs, prompt = [], list(PROMPT)
        for turn, source in enumerate(("", "memory", "disk")):
            if source == "disk":
                assert arb.swap_out_idle() == 1
            params = SamplingParams(max_tokens=20, ignore_eos=True, speculative=spec)
            req = Request(prompt, params, session_key="s")
            arb.submit(req)
            while arb.step():
                pass
            assert req.error is None and req.seq is not None
            assert req.restored_from == source, turn
            outs.append(list(req.seq.output_ids))
            prompt = prompt + req.seq.output_ids + PATTERN[:5]
        arb.publish()
        return outs, arb.snapshot()

    plain, _ = run(False)
    spec, snap = run(True)
    assert spec == plain
    assert snap["draft_tokens"] >= snap["accepted_tokens"] > 0


def test_speculation_backs_off_in_a_full_batch(engine: LLMEngine) -> None:
    """With costs like the real model's on two cores (a verify run of k+1 positions ~1 + 0.18k decode
    steps, a batch row ~0.15 of one), a sequence alone speculates at middling acceptance, but in a batch
    of four only a sequence whose drafts are nearly always right leaves the shared run."""
    from llmos.engine.speculative import Speculator

    spec = Speculator(engine.runner)
    spec.cost = CostModel(decode_s={1: 0.01})
    seqs = []
    for _ in range(4):
        s = engine.add_request(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, speculative=True))
        seqs.append(s)
    while any(s.prefilled < len(s.prompt_ids) or not s.output_ids for s in seqs):
        engine.step()

    def state(hits: float, misses: float) -> DraftState:
        d = NgramDrafter()
        d.sync = lambda prompt, output: None  # type: ignore[method-assign]
        d.draft = lambda k, tail=(): [5] * k  # type: ignore[method-assign]  # always a full proposal
        return DraftState(d, hits, misses)

    for s in seqs:
        s.spec = state(3.0, 3.0)  # acceptance 0.5
    assert spec.plan(seqs[:1])[1], "alone, a 0.5-acceptance draft pays"
    plain, drafts = spec.plan(seqs)
    assert not drafts and plain == seqs
    seqs[0].spec = state(60.0, 0.0)  # acceptance ~0.98
    plain, drafts = spec.plan(seqs)
    assert [p.seq for p in drafts] == [seqs[0]] and len(drafts[0].draft) >= 4
    for s in seqs:
        engine.cancel(s)
        engine.release(s)


# -- the real default model: real text, a real grammar -------------------------------------------------


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> LLMEngine:
    d = ModelStore(tmp_path_factory.mktemp("real")).import_gguf(default_gguf, precision="int4")
    return LLMEngine(d, threads=2, warmup=False, max_batch=2)


TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["send_email", "create_event"]},
        "arguments": {
            "type": "object",
            "properties": {
                "recipient": {"type": "string", "maxLength": 40},
                "subject": {"type": "string", "maxLength": 60},
            },
            "required": ["recipient", "subject"],
            "additionalProperties": False,
        },
    },
    "required": ["tool", "arguments"],
    "additionalProperties": False,
}


def _constrained(engine: LLMEngine, spec: bool, **sampling: object) -> tuple[list[int], str, object]:
    import json

    from agents.structured_output import StructuredOutput

    constraint = StructuredOutput(engine.tokenizer).constraint(json.dumps(TOOL_SCHEMA))
    msgs = [{"role": "user", "content": "Email bob@example.com that the meeting moved to Friday."}]
    params = SamplingParams(**{"max_tokens": 80, "speculative": spec, **sampling})  # type: ignore[arg-type]
    chunks = list(engine.stream(msgs, params, constraint=constraint))
    ids = [t for c in chunks for t in c.token_ids]
    return ids, "".join(c.text for c in chunks), chunks[-1].usage


def test_jump_forward_equals_unforced_constrained_output(real_engine: LLMEngine) -> None:
    import json

    plain_ids, plain_text, plain_usage = _constrained(real_engine, False)
    ids, text, usage = _constrained(real_engine, True)
    assert (ids, text) == (plain_ids, plain_text)
    json.loads(text)
    assert plain_usage.forced_tokens == 0  # type: ignore[attr-defined]
    assert usage.forced_tokens >= 8  # type: ignore[attr-defined]  # '{"tool": "', keys, brackets


def test_jump_forward_seeded_sampling_identical(model_dir: Path) -> None:
    """Sampled and seeded, on an exact (fp32) graph: forced tokens change nothing downstream."""
    engine = LLMEngine(model_dir, threads=1, warmup=False, max_batch=2)
    kw = {"temperature": 1.0, "seed": 9, "max_tokens": 60}
    plain = _constrained(engine, False, **kw)
    spec = _constrained(engine, True, **kw)
    assert spec[:2] == plain[:2]
    assert spec[2].forced_tokens > 0  # type: ignore[attr-defined]


def test_grounded_copy_is_drafted_and_identical(real_engine: LLMEngine) -> None:
    passage = (
        "The lighthouse at Pharos stood at the entrance to the port of Alexandria, and for centuries it "
        "was counted among the wonders of the world. Its keepers burned wood and oil through the night."
    )
    msgs = [{"role": "user", "content": f"Repeat this sentence exactly:\n\n{passage}"}]
    plain = real_engine.generate(msgs, SamplingParams(max_tokens=48, speculative=False))
    spec = real_engine.generate(msgs, SamplingParams(max_tokens=48, speculative=True))
    assert spec.token_ids == plain.token_ids
    assert spec.usage.accepted_tokens >= 20

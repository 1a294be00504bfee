"""The arbiter in process, on a tiny random-weight model: what an app would notice through the service.

Correctness first: whatever the arbiter does with KV (park, swap to int8 on disk, shared prefixes,
preemption), the tokens must be the ones the plain engine gives, and bad swap files mean recompute.
Then policy: classes, fair share, quotas.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import ArbiterConfig, Priority
from llmos.arbiter.request import Request
from llmos.arbiter.swap_store import SwapStore
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.errors import QuotaExceededError
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("arb")
    gguf = write_random_gguf(
        tmp / "m.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, seed=11, weight_type="F32"
    )
    return ModelStore(tmp / "store").import_gguf(gguf, precision="fp32")


def _arbiter(model_dir: Path, tmp: Path, **cfg: object) -> Arbiter:
    def load() -> LLMEngine:
        return LLMEngine(model_dir, threads=1, warmup=False, max_batch=4, prefill_chunk=16)

    swap = SwapStore(tmp / "swap", model_key="tiny")
    return Arbiter(load, ArbiterConfig(**cfg), swap)  # type: ignore[arg-type]


def _run(arb: Arbiter, *reqs: Request) -> list[str]:
    texts = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.on_delta = texts[r.request_id].append
        arb.submit(r)
    while arb.step():
        pass
    for r in reqs:
        assert r.done and r.error is None, r.error
    return ["".join(texts[r.request_id]) for r in reqs]


def _turns(arb: Arbiter, key: str | None, n: int = 3) -> list[list[int]]:
    """A conversation of n turns; returns each turn's output token ids."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse. " * 6}]
    outs = []
    for i in range(n):
        messages.append({"role": "user", "content": f"question number {i} about things"})
        req = Request(list(messages), GREEDY, app_id="a", session_key=key)
        text = _run(arb, req)[0]
        assert req.seq is not None
        outs.append(list(req.seq.output_ids))
        messages.append({"role": "assistant", "content": text})
    return outs


def test_parked_and_swapped_sessions_continue_with_the_same_tokens(model_dir: Path, tmp_path: Path) -> None:
    plain = _turns(_arbiter(model_dir, tmp_path / "p", prefix_cache_entries=0), None)
    kept = _arbiter(model_dir, tmp_path / "k")
    assert _turns(kept, "s1") == plain
    assert kept.snapshot()["swap_outs"] == 0
    tight = _arbiter(model_dir, tmp_path / "t", kv_budget_mib=1)  # every parked session goes to disk
    tight.kv.budget_bytes = 1
    assert _turns(tight, "s1") == plain
    snap = tight.snapshot()
    assert snap["swap_outs"] >= 2 and snap["swap_restores"] >= 2 and snap["swap_recomputes"] == 0


def test_a_corrupt_swap_file_means_recompute_not_failure(model_dir: Path, tmp_path: Path) -> None:
    plain = _turns(_arbiter(model_dir, tmp_path / "p"), None, n=2)
    arb = _arbiter(model_dir, tmp_path / "c")
    arb.kv.budget_bytes = 1
    messages: list[dict[str, str]] = [{"role": "user", "content": "question number 0 about things"}]
    first = Request(list(messages), GREEDY, app_id="a", session_key="s")
    _run(arb, first)
    files = [p for p in (tmp_path / "c" / "swap").iterdir() if not p.name.startswith(".")]
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-5] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert first.seq is not None
    messages += [
        {"role": "assistant", "content": first.seq.detok.text},
        {"role": "user", "content": "question number 1 about things"},
    ]
    second = Request(messages, GREEDY, app_id="a", session_key="s")
    _run(arb, second)
    assert second.restored_from == "recomputed" and second.reused_tokens == 0
    assert arb.snapshot()["swap_recomputes"] == 1
    assert second.seq is not None and list(second.seq.output_ids) == plain[1]


def test_a_system_prompt_is_prefilled_once_per_app_never_shared_across_apps(
    model_dir: Path, tmp_path: Path
) -> None:
    arb = _arbiter(model_dir, tmp_path)
    system = {"role": "system", "content": "Answer in French. " * 10}
    a = Request([system, {"role": "user", "content": "one"}], GREEDY, app_id="a")
    other = Request([system, {"role": "user", "content": "two"}], GREEDY, app_id="other")
    b = Request([system, {"role": "user", "content": "two"}], GREEDY, app_id="a")
    _run(arb, a)
    _run(arb, other)  # another app: its own prefill, as fast or slow as if "a" had never asked
    _run(arb, b)
    assert a.reused_tokens == 0 and other.reused_tokens == 0 and other.restored_from == ""
    assert b.restored_from == "prefix" and b.reused_tokens > 30
    fresh = _arbiter(model_dir, tmp_path / "f", prefix_cache_entries=0)
    c = Request([system, {"role": "user", "content": "two"}], GREEDY, app_id="b")
    _run(fresh, c)
    assert b.seq is not None and c.seq is not None and b.seq.output_ids == c.seq.output_ids


def test_interactive_overtakes_and_preempts_without_changing_tokens(model_dir: Path, tmp_path: Path) -> None:
    arb = _arbiter(model_dir, tmp_path)
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    background = [
        Request(f"background job {i}", long, app_id="bg", priority=Priority.BACKGROUND) for i in range(4)
    ]
    for r in background:
        arb.submit(r)
    for _ in range(6):
        arb.step()  # all 4 slots are busy decoding background work
    assert len(arb.scheduler.running) == 4
    fg = Request("foreground question", GREEDY, app_id="fg", priority=Priority.INTERACTIVE)
    arb.submit(fg)
    steps = 0
    while not fg.done:
        arb.step()
        steps += 1
    assert steps <= 1 + 12  # one prefill step, then one decode step per token
    assert sum(r.preemptions for r in background) == 1
    while arb.step():
        pass
    alone = _arbiter(model_dir, tmp_path / "alone")
    expect = [Request(f"background job {i}", long) for i in range(4)]
    _run(alone, *expect)
    assert [r.seq.output_ids for r in background] == [r.seq.output_ids for r in expect]  # type: ignore[union-attr]


def test_two_flooding_apps_share_tokens_evenly(model_dir: Path, tmp_path: Path) -> None:
    """App a keeps 12 requests queued, app b 4: FIFO would give a three quarters of the tokens."""
    arb = _arbiter(model_dir, tmp_path)
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    pending = {"a": 0, "b": 0}

    def top_up() -> None:
        for app, depth in (("a", 12), ("b", 4)):
            while pending[app] < depth:
                req = Request(f"{app} says hello", sp, app_id=app)
                req.on_done = lambda r: pending.__setitem__(r.app_id, pending[r.app_id] - 1)
                arb.submit(req)
                pending[app] += 1

    for _ in range(400):
        top_up()
        arb.step()
    tokens = {app: arb.usage[(app, None)].tokens for app in ("a", "b")}
    assert abs(tokens["a"] - tokens["b"]) / max(tokens.values()) < 0.2, tokens


def test_quotas_are_named_errors_with_a_retry_hint(model_dir: Path, tmp_path: Path) -> None:
    arb = _arbiter(model_dir, tmp_path)
    _run(arb, Request("hello there", GREEDY, app_id="q", tokens_per_minute=10))
    with pytest.raises(QuotaExceededError, match=r"tokens per minute; retry after \d"):
        arb.submit(Request("again", GREEDY, app_id="q", tokens_per_minute=10))
    with pytest.raises(QuotaExceededError, match="tokens of context"):
        arb.submit(Request("x " * 40, GREEDY, app_id="r", max_context=20))
    for _ in range(2):
        arb.submit(Request("wait", GREEDY, app_id="w", max_queued=2))
    with pytest.raises(QuotaExceededError, match="2 requests waiting"):
        arb.submit(Request("wait", GREEDY, app_id="w", max_queued=2))


def test_idle_unload_and_reload_on_demand(model_dir: Path, tmp_path: Path) -> None:
    arb = _arbiter(model_dir, tmp_path)
    first = _turns(arb, "s", n=1)
    assert arb.unload() and arb.state == "unloaded" and arb.engine is None
    assert arb.snapshot()["kv_swapped_bytes"] > 0  # the parked session went to disk with the model
    _run(arb, Request("hello", GREEDY, app_id="a"))
    assert arb.state == "ready" and arb.loads == 2
    assert first


def test_a_long_prompt_never_holds_generating_apps_for_more_than_one_chunk(
    model_dir: Path, tmp_path: Path
) -> None:
    arb = _arbiter(model_dir, tmp_path)  # prefill chunks of 16 tokens (see _arbiter)
    talker = Request("short question", SamplingParams(max_tokens=60, ignore_eos=True), app_id="a")
    arb.submit(talker)
    while talker.seq is None or not talker.seq.output_ids:
        arb.step()
    long = Request("many words " * 25, SamplingParams(max_tokens=1), app_id="b")  # several chunks
    arb.submit(long)
    gaps, run = [], 0
    while not long.done:
        before = len(talker.seq.output_ids)
        arb.step()
        if len(talker.seq.output_ids) == before:
            run += 1  # a step that was not a decode for the talker
        else:
            gaps.append(run)
            run = 0
    assert max(gaps) <= 1, gaps  # at most one prefill chunk between two of the talker's tokens
    assert long.seq is not None and len(long.seq.prompt_ids) > 64


class _BrokenConstraint:
    """A constraint whose grammar engine fails: the step that samples for it raises."""

    complete = False

    def mask(self, logits: object) -> None:
        raise RuntimeError("grammar engine crashed")

    def advance(self, token: int) -> None:
        pass


def test_a_step_that_fails_for_every_request_is_logged_once(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmos")
    arb = _arbiter(model_dir, tmp_path)
    for _ in range(30):  # what a caller repeating a failing request looks like to the arbiter
        req = Request("hello", GREEDY, app_id="a")
        req.constraint = _BrokenConstraint()
        arb.submit(req)
        while arb.step():
            pass
        assert isinstance(req.error, RuntimeError)  # its caller gets the error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].startswith("prefill steps failed: grammar engine crashed"), errors
    _run(arb, Request("hello", GREEDY, app_id="a"))  # the next good request: one line says so
    recovered = [r.getMessage() for r in caplog.records if "work again" in r.getMessage()]
    assert len(recovered) == 1 and "prefill steps work again after 30 failures" in recovered[0], recovered

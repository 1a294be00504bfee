"""Automatic prefix reuse in the arbiter, on a tiny random-weight model: a stateless request reuses its
own account's earlier KV (same tokens as computing it all), and never another app's or user's."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_arbiter import GREEDY, _arbiter, _run

from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.request import Request
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("auto")
    gguf = write_random_gguf(
        tmp / "m.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=11, weight_type="F32"
    )
    return ModelStore(tmp / "store").import_gguf(gguf, precision="fp32")


def _turn(
    arb: Arbiter, messages: list[dict[str, str]], app: str, uid: int | None, auto: bool = True
) -> Request:
    req = Request(list(messages), GREEDY, app_id=app, uid=uid, auto_prefix=auto)
    _run(arb, req)
    return req


CONVO = [
    {"role": "user", "content": "the first question, with enough words to be worth keeping around"},
    {"role": "assistant", "content": "an answer"},
    {"role": "user", "content": "a follow-up question"},
]


def test_own_account_reuses_and_tokens_are_unchanged(model_dir: Path, tmp_path: Path) -> None:
    arb = _arbiter(model_dir, tmp_path)
    first = _turn(arb, CONVO[:1], "app", 1000)
    assert first.reused_tokens == 0 and arb.auto.hits == 0
    again = _turn(arb, CONVO, "app", 1000)
    assert again.reused_tokens >= 16 and arb.auto.hits == 1 and again.restored_from == "memory"
    cold = _turn(_arbiter(model_dir, tmp_path / "cold"), CONVO, "app", 1000)
    assert again.seq.output_ids == cold.seq.output_ids  # reuse changes nothing but time


@pytest.mark.parametrize(("app", "uid"), [("other-app", 1000), ("app", 1001), ("app", None)])
def test_never_across_apps_or_users(model_dir: Path, tmp_path: Path, app: str, uid: int | None) -> None:
    arb = _arbiter(model_dir, tmp_path)
    _turn(arb, CONVO[:1], "app", 1000)
    other = _turn(arb, CONVO, app, uid)
    assert other.reused_tokens == 0 and arb.auto.hits == 0


def test_off_for_requests_that_do_not_ask_and_bounded_per_account(model_dir: Path, tmp_path: Path) -> None:
    arb = _arbiter(model_dir, tmp_path, auto_prefix_per_app=2)
    _turn(arb, CONVO[:1], "app", 1, auto=False)
    assert not arb.kv.parked  # D-Bus Generate: freed at once, as before
    for i in range(4):
        _turn(arb, [{"role": "user", "content": f"conversation {i} " + "words " * 20}], "app", 1)
    assert len(arb.kv.parked) == 2
    arb.unload()
    assert not arb.kv.parked and arb.snapshot()["kv_swapped_bytes"] == 0  # a cache: dropped, not swapped

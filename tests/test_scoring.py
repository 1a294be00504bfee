"""The engine's likelihood of given continuations (llmos/engine/scoring.py), on the default model: what
the agent loop chooses tools by, so it must agree with what the model generates and not leak between
candidates scored on one prompt."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.scoring import score_continuations
from llmos.errors import ContextOverflowError
from llmos.model_store import ModelStore

pytestmark = pytest.mark.model
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> LLMEngine:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    store.import_gguf(default_gguf, make_default=True)
    return LLMEngine(store.resolve(), threads=2)


def test_the_greedy_answer_scores_above_a_wrong_one_and_each_token_is_its_argmax(engine: LLMEngine) -> None:
    ids = engine.encode_prompt(PROMPT)
    greedy = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6)).token_ids
    wrong = engine.tokenizer.encode("The capital of France is Berlin", parse_special=False)[: len(greedy)]
    good, bad = score_continuations(engine, ids, [greedy, wrong])
    assert good.total > bad.total
    assert all(lp > math.log(0.05) for lp in good.token_logprobs)  # each greedy token was likely


def test_a_candidate_scores_the_same_alone_or_after_others(engine: LLMEngine) -> None:
    """Candidates share one KV slot, truncated back to the prompt between them: nothing carries over."""
    ids = engine.encode_prompt(PROMPT)
    a, b = (
        engine.tokenizer.encode(t, parse_special=False) for t in ("Paris is the capital", "I do not know")
    )
    (alone,) = score_continuations(engine, ids, [a])
    _, after = score_continuations(engine, ids, [b, a])
    assert after.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-3)


def test_a_candidate_past_the_context_is_refused_not_cut(engine: LLMEngine) -> None:
    ids = engine.encode_prompt(PROMPT)
    with pytest.raises(ContextOverflowError):
        score_continuations(engine, ids, [[1] * engine.context_length])

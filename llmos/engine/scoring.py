"""The model's own likelihood of given continuations of a prompt: what a choice between a few known
texts (which tool to call, whether to call one at all) is decided by, instead of free generation.

Sampling one token at a time lets a small model wander into a wrong branch and be held there by the
grammar; asking how likely each finished candidate is compares them on equal terms. The prompt is
prefilled once into one KV slot; each continuation is then run on top of it in one graph run (all its
positions' logits at once), and the slot is truncated back to the prompt before the next, so nothing is
copied and nothing is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmos.errors import ContextOverflowError, InvalidSamplingError


@dataclass(frozen=True)
class ContinuationScore:
    token_logprobs: list[float]  # log P(token_i | prompt, tokens before it), natural log

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean(self) -> float:
        return self.total / max(1, len(self.token_logprobs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_continuations(
    engine: object, prompt_ids: list[int], continuations: Sequence[list[int]]
) -> list[ContinuationScore]:
    """log P(continuation | prompt) token by token, for each continuation (token ids, at least one each).

    `engine` is an `LLMEngine` (its runner, KV pool and chunk size); this runs on the thread that owns
    it. A prompt plus continuation longer than the context is a ContextOverflowError, never cut."""
    if not prompt_ids:
        raise InvalidSamplingError("the prompt is empty")
    if any(not c for c in continuations):
        raise InvalidSamplingError("a continuation to score is empty")
    runner, pool = engine.runner, engine.pool  # type: ignore[attr-defined]
    longest = max((len(c) for c in continuations), default=0)
    if len(prompt_ids) + longest > engine.context_length:  # type: ignore[attr-defined]
        raise ContextOverflowError(len(prompt_ids) + longest, engine.context_length, "prompt and candidate")  # type: ignore[attr-defined]
    cache = pool.allocate()
    try:
        cache.reserve(len(prompt_ids) + longest)
        chunk = engine._chunk_size()  # type: ignore[attr-defined]
        last = None
        for start in range(0, len(prompt_ids), chunk):
            last = runner.prefill(cache, prompt_ids[start : start + chunk])
        assert last is not None
        first = log_softmax(last[-1])  # the first token of every continuation follows the prompt
        n = cache.length
        out = []
        for cont in continuations:
            cache.truncate(n)
            logps = [float(first[cont[0]])]
            if len(cont) > 1:  # the rest in one run: all positions' logits of the continuation
                rows = log_softmax(runner.prefill(cache, cont[:-1], all_logits=True))
                logps += [float(rows[i, t]) for i, t in enumerate(cont[1:])]
            out.append(ContinuationScore(logps))
        return out
    finally:
        cache.free()

"""One generation request as the engine sees it: tokens in, tokens out, where it stands, and its stats."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from llmos.engine.constraint import TokenConstraint
from llmos.engine.detokenizer import IncrementalDetokenizer
from llmos.engine.kv_cache import KVCache
from llmos.engine.sampling import Sampler, SamplingParams

_ids = itertools.count(1)


class SequenceStatus(Enum):
    WAITING = "waiting"  # prompt (or part of it) not yet prefilled
    RUNNING = "running"  # decoding
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # the context window is full
    CANCELLED = "cancelled"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request accepted -> first token sampled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_tokens: int = 0  # speculative tokens proposed (n-gram drafts) and verified
    accepted_tokens: int = 0  # of those, the ones kept
    forced_tokens: int = 0  # tokens the grammar forced, appended without sampling (jump-forward)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes from prefill; the rest from decode steps
        n = max(self.completion_tokens - 1, 0)
        return n / self.decode_s if self.decode_s else 0.0


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    cache: KVCache | None  # None until the sequence is given a KV slot (the arbiter admits it)
    eos_ids: frozenset[int]
    max_len: int  # prompt + output may not exceed this (the context, or an app's smaller quota)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    prefilled: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    created: float = field(default_factory=time.perf_counter)
    constraint: TokenConstraint | None = None  # e.g. a JSON Schema grammar (agents/structured_output.py)
    spec: Any = None  # speculative.DraftState: n-gram index and acceptance, made on its first decode step
    sampler: Sampler = field(init=False)

    def sample(self, logits: Any) -> int:
        if self.constraint is not None:
            self.constraint.mask(logits)
        return self.sampler(logits, self.recent(self.params.repeat_last_n), len(self.output_ids))

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.usage.prompt_tokens = len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def recent(self, n: int) -> list[int]:
        """The last `n` tokens of prompt and output: what the repetition penalty looks at. Built from the
        tails only, since it is asked for on every token."""
        if n <= 0:
            return []
        out = self.output_ids[-n:]
        if len(out) == n:
            return out
        return self.prompt_ids[max(0, len(self.prompt_ids) - (n - len(out))) :] + out

    def accept(self, token: int) -> str:
        """Record a sampled token; return the text it releases and finish the sequence if it should stop."""
        if not self.output_ids:
            self.usage.ttft_s = time.perf_counter() - self.created
        self.output_ids.append(token)
        self.usage.completion_tokens = len(self.output_ids)
        if self.constraint is not None:
            if token in self.eos_ids:  # the grammar allowed end-of-sequence: the output is complete
                self.finish(FinishReason.STOP)
                return self.detok.flush()
            self.constraint.advance(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish(FinishReason.STOP)
            return self.detok.flush()
        delta = self.detok.add(token)
        if self.detok.stopped_by is not None:
            self.finish(FinishReason.STOP)
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish(FinishReason.LENGTH)
        elif self.cache is None or self.cache.length + 1 > self.max_len:
            self.finish(FinishReason.CONTEXT)
        if self.finished:
            delta += self.detok.flush()
        return delta

    def kv_ids(self) -> list[int]:
        """The tokens whose keys/values are in the cache (the last sampled token is not fed yet)."""
        n = self.cache.length if self.cache is not None else 0
        if n <= len(self.prompt_ids):
            return self.prompt_ids[:n]
        return self.prompt_ids + self.output_ids[: n - len(self.prompt_ids)]

    def finish(self, reason: FinishReason) -> None:
        if not self.finished:
            self.status = SequenceStatus.FINISHED
            self.finish_reason = reason

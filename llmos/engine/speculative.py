"""Speculative decoding without a draft model, and grammar jump-forward: several tokens per weight read.

Decode is bound by the bytes of weights read per token, so one graph run that checks several tokens of
a sequence costs little more than one that computes one. Each decode step, every sequence may bring a
draft: tokens its grammar forces (jump-forward: appended without sampling), or tokens an n-gram match
in its own history proposes (llmos/engine/ngram_draft.py). A sequence with a draft gets a run of its
own - its last token plus the draft, as a chunk of prefill with logits at every position - because
GroupQueryAttention accepts several new positions only with batch 1; the others share one batched
decode run as before.

Verification samples at each position exactly as plain decoding would (same logits, same history, the
same per-position randomness for a seeded request: see sampling.Sampler) and keeps the draft up to the
first token that differs, plus the token sampled there. So greedy output is plain decoding's, token for
token; sampled output keeps its distribution (a draft token t survives with probability p(t); on a
rejection the token drawn is distributed as p without t, renormalized: the standard acceptance rule).
Each token goes through `Sequence.accept` one at a time, so stop strings, max_tokens, the context limit
and the grammar see exactly what they see without speculation. The KV of rejected positions is rolled
back by setting the cache length: GroupQueryAttention reads only up to each row's length, and the next
run writes over them.

When to draft, and how much, is a throughput decision made with measured costs (`CostModel`): a draft
of k tokens at per-token acceptance a brings 1 + a + ... + a^k tokens for the price of a k+1-position
run. A sequence leaves the batched run only if that raises the step's tokens per second: on free text
(acceptance low) drafts shrink to nothing, and in a full batch - where one more row is nearly free and
an extra run is not - only drafts that are almost surely accepted go ahead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmos.engine.model_runner import ModelRunner
from llmos.engine.ngram_draft import NgramDrafter
from llmos.engine.sequence import Sequence

MAX_DRAFT = 8
DECAY = 0.7  # weight of earlier verify steps in a sequence's acceptance estimate
SPEC_KEYS = ("draft_tokens", "accepted_tokens", "forced_tokens")  # Usage fields, totals in GetStatus
PRIOR = (1.0, 1.0)  # (accepted, rejected) pseudo-counts: a new sequence starts at a = 0.5


@dataclass
class DraftState:
    """Per sequence: its n-gram index and its acceptance so far (decayed counts)."""

    drafter: NgramDrafter
    hits: float = 0.0
    misses: float = 0.0

    @property
    def rate(self) -> float:
        return (self.hits + PRIOR[0]) / (self.hits + self.misses + PRIOR[0] + PRIOR[1])

    def record(self, drafted: int, accepted: int) -> None:
        self.hits = DECAY * self.hits + accepted
        self.misses = DECAY * self.misses + (accepted < drafted)

    def idle(self) -> None:
        """A step without a draft: the estimate relaxes toward the prior, so it is tried again later."""
        self.hits *= 0.97
        self.misses *= 0.97


@dataclass
class CostModel:
    """Seconds per graph run, measured as the engine runs: batched decode by batch size, single-sequence
    verify runs by positions. Until measured, guesses relative to a one-row decode step: a batch row
    ~15% of it (DESIGN.md §2b: 90/169/234/293 tok/s at batch 1/2/4/8 on two cores), a verify position
    ~18% (2/5/9 positions = 1.2/1.6/2.4 steps, measured on a busy machine). Measured figures replace
    them at once, and follow the machine's load (exponential average)."""

    decode_s: dict[int, float] = field(default_factory=dict)
    verify_s: dict[int, float] = field(default_factory=dict)

    def _unit(self) -> float:
        return self.decode_s.get(1) or next(iter(self.decode_s.values()), 0.01)

    def decode(self, batch: int) -> float:
        if batch <= 0:
            return 0.0
        return self.decode_s.get(batch) or self._unit() * (1 + 0.15 * (batch - 1))

    def verify(self, positions: int) -> float:
        return self.verify_s.get(positions) or self._unit() * (1 + 0.18 * (positions - 1))

    @staticmethod
    def _update(table: dict[int, float], key: int, seconds: float) -> None:
        old = table.get(key)
        table[key] = seconds if old is None else 0.8 * old + 0.2 * seconds


@dataclass
class Plan:
    seq: Sequence
    draft: list[int]
    forced: int  # the first `forced` draft tokens are the grammar's: appended without sampling
    tokens: float  # expected tokens from its run
    seconds: float  # expected cost of its run


class Speculator:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cost = CostModel()
        self.totals = dict.fromkeys(SPEC_KEYS, 0)  # over every sequence this engine ran

    # -- planning ---------------------------------------------------------------------------------------
    def _room(self, seq: Sequence) -> int:
        """Draft tokens that can matter: the output may end (max_tokens) or the context fill up."""
        assert seq.cache is not None
        left = seq.params.max_tokens - len(seq.output_ids) - 1
        return max(0, min(MAX_DRAFT, left, seq.max_len - seq.cache.length - 2))

    def _plan(self, seq: Sequence) -> Plan | None:
        """The best draft for `seq` alone: grammar-forced tokens, then an n-gram guess of the length that
        maximizes expected tokens per second at its acceptance rate."""
        room = self._room(seq)
        if room == 0 or not seq.params.speculative:
            return None
        forced: list[int] = []
        if seq.constraint is not None:
            ask = getattr(seq.constraint, "forced_tokens", None)
            forced = ask()[:room] if ask is not None else []
        if seq.spec is None:
            seq.spec = DraftState(NgramDrafter(seq.prompt_ids))
        state: DraftState = seq.spec
        state.drafter.sync(seq.prompt_ids, seq.output_ids)
        guess = state.drafter.draft(room - len(forced), tail=forced)
        if not guess:
            state.idle()
        best = Plan(seq, forced, len(forced), len(forced) + 1.0, self.cost.verify(len(forced) + 1))
        a, expected = state.rate, best.tokens
        for k in range(1, len(guess) + 1):
            expected += a**k
            seconds = self.cost.verify(len(forced) + k + 1)
            if expected / seconds > best.tokens / best.seconds:
                best = Plan(seq, forced + guess[:k], len(forced), expected, seconds)
        return best if best.draft else None

    def plan(self, batch: list[Sequence]) -> tuple[list[Sequence], list[Plan]]:
        """Split a decode step: sequences for the one batched run, and drafts each with a run of its own,
        taken best first while they raise the step's expected tokens per second."""
        plans = sorted(
            (p for s in batch if (p := self._plan(s)) is not None),
            key=lambda p: -p.tokens / p.seconds,
        )
        plain = list(batch)
        chosen: list[Plan] = []
        tokens, seconds = float(len(plain)), self.cost.decode(len(plain))
        for p in plans:
            t = tokens - 1 + p.tokens
            s = seconds - self.cost.decode(len(plain)) + self.cost.decode(len(plain) - 1) + p.seconds
            if t / s > tokens / seconds:
                plain.remove(p.seq)
                chosen.append(p)
                tokens, seconds = t, s
        return plain, chosen

    # -- running ----------------------------------------------------------------------------------------
    def timed_decode(self, batch: list[Sequence]) -> tuple[object, float]:
        t0 = time.perf_counter()
        logits = self.runner.decode([s.cache for s in batch], [s.last_token for s in batch])  # type: ignore[misc]
        dt = time.perf_counter() - t0
        self.cost._update(self.cost.decode_s, len(batch), dt)
        return logits, dt

    def verify(self, p: Plan) -> str:
        """One run over the sequence's last token and its draft; accept what plain decoding would have
        produced. Returns the text released."""
        seq, cache = p.seq, p.seq.cache
        assert cache is not None
        start = cache.length
        fed = [seq.last_token, *p.draft]
        every = len(p.draft) > p.forced  # logits at every position, or (forced tokens only) the last
        t0 = time.perf_counter()
        logits = self.runner.prefill(cache, fed, all_logits=every)
        dt = time.perf_counter() - t0
        if every:  # a run with one logits row is cheaper: not a fair sample of verify cost
            self.cost._update(self.cost.verify_s, len(fed), dt)
        seq.usage.decode_s += dt
        out, n, hits = [], 0, 0
        for j in range(len(fed)):
            cache.length = start + j + 1  # the KV holds the fed tokens up to this one
            forced = j < p.forced
            token = p.draft[j] if forced else seq.sample(logits[j if every else -1])
            out.append(seq.accept(token))
            n += 1
            hit = j < len(p.draft) and token == p.draft[j]
            hits += hit and not forced
            if seq.finished or not hit:
                break
        forced_n, drafted = min(n, p.forced), len(p.draft) - p.forced
        seq.usage.forced_tokens += forced_n
        self.totals["forced_tokens"] += forced_n
        if drafted:
            seq.usage.draft_tokens += drafted
            seq.usage.accepted_tokens += hits
            self.totals["draft_tokens"] += drafted
            self.totals["accepted_tokens"] += hits
            assert seq.spec is not None
            seq.spec.record(drafted, hits)
        cache.truncate(start + n)
        return "".join(out)

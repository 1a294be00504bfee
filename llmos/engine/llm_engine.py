"""The in-process engine: load a model directory, take requests, step them, stream text.

`step()` is one scheduling decision: a prefill chunk of the oldest waiting sequence if there is one,
else one batched decode step of every running sequence. `generate`, `stream` and `generate_batch` are
loops over it. This FIFO policy is the engine's own; the arbiter replaces it with priorities and
fairness across apps.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from llmos.chat_template import ChatTemplate
from llmos.engine.constraint import TokenConstraint
from llmos.engine.detokenizer import IncrementalDetokenizer
from llmos.engine.kv_cache import KVPool
from llmos.engine.memory import release_free_heap
from llmos.engine.model_runner import ModelRunner, RunnerOptions
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import FinishReason, Sequence, SequenceStatus, Usage
from llmos.engine.speculative import Speculator
from llmos.errors import ContextOverflowError, InvalidSamplingError
from llmos.manifest import ModelManifest
from llmos.model_integrity import ModelCheck
from llmos.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict]
ATTENTION_SCRATCH = 32 << 20
MIN_CHUNK = 32


def encode_prompt(
    tokenizer: Tokenizer,
    chat_template: ChatTemplate | None,
    prompt: Prompt,
    add_generation_prompt: bool = True,
) -> list[int]:
    """A prompt's token ids: text as it is, chat messages through the model's template. A function, not
    only a method, so a prompt can be encoded while the model itself is not loaded."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if prompt and all(isinstance(m, dict) for m in prompt):
        if chat_template is None:
            raise InvalidSamplingError("this model has no chat template; pass text or token ids")
        return tokenizer.encode(chat_template.render(prompt, add_generation_prompt=add_generation_prompt))
    raise InvalidSamplingError("a prompt is text, a list of token ids, or a list of chat messages")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class StreamChunk:
    text: str  # new text since the previous chunk; never splits a UTF-8 character
    token_ids: list[int]
    finish_reason: FinishReason | None = None  # set on the last chunk only
    usage: Usage | None = None  # set on the last chunk only


class LLMEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        threads: int = 0,
        max_batch: int = 8,
        max_context: int | None = None,
        prefill_chunk: int = 256,
        kv_initial_len: int = 1024,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        warmup: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = ModelManifest.read(self.model_dir)
        m = self.manifest
        if prefill_chunk < 1:
            raise InvalidSamplingError("prefill_chunk must be at least 1")
        # Missing or resized files fail here; the digests are computed on threads while the tokenizer and
        # onnxruntime's session load, and checked before the warm-up: nothing runs on damaged weights.
        check = ModelCheck.start(self.model_dir, m)
        try:
            self.tokenizer = Tokenizer.load(self.model_dir)
            tok = self.tokenizer
            bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
            self.chat_template = (
                ChatTemplate(m.chat_template, bos, tok.id_to_token(tok.eos_id)) if m.chat_template else None
            )
            self.context_length = min(m.context_length, max_context or m.context_length)
            self.chunk_tokens = prefill_chunk
            self.pool = KVPool(
                m.n_layer, m.n_head_kv, m.head_dim, self.context_length, max_batch, kv_initial_len
            )
            self.runner = ModelRunner(
                self.model_dir, m, self.pool, RunnerOptions(threads=threads, providers=providers)
            )
        except Exception:
            check.wait()  # a damaged file is the cause to report, not whatever failed reading it
            raise
        check.wait()
        self.eos_ids = frozenset(m.eos_token_ids)
        self.speculator = Speculator(self.runner)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        if warmup:
            self._warmup()
        release_free_heap()

    @classmethod
    def from_store(cls, name: str | None = None, **kwargs: object) -> LLMEngine:
        from llmos.model_store import ModelStore

        return cls(ModelStore().resolve(name), **kwargs)  # type: ignore[arg-type]

    def _warmup(self) -> None:
        """The first runs after load are 2-3x slower (allocations, page faults): pay that now."""
        cache = self.pool.allocate()
        try:
            self.runner.prefill(cache, [self.tokenizer.bos_id or 0] * 16)
            self.runner.decode([cache], [0])
            self.runner.prefill(cache, [0] * 4, all_logits=True)  # a speculative verify run
        finally:
            cache.free()

    # -- prompts ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, add_generation_prompt: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, self.chat_template, prompt, add_generation_prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode_prompt(prompt))

    # -- requests -----------------------------------------------------------------------------------------
    def new_sequence(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        max_len: int | None = None,
        prompt_ids: list[int] | None = None,
    ) -> Sequence:
        """A validated sequence with no KV slot yet: whoever schedules it gives it one (see `admit`).
        `prompt_ids`, when given, are the prompt already encoded (a long one, tokenized elsewhere)."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode_prompt(prompt)
        if not ids:
            raise InvalidSamplingError("the prompt is empty")
        if any(not 0 <= t < self.manifest.n_vocab for t in ids):
            raise InvalidSamplingError(f"token ids must be in [0, {self.manifest.n_vocab})")
        limit = min(self.context_length, max_len or self.context_length)
        if len(ids) + 1 > limit:
            raise ContextOverflowError(len(ids) + 1, limit, "the prompt (plus one generated token)")
        return Sequence(
            prompt_ids=ids,
            params=params,
            eos_ids=self.eos_ids,
            detok=IncrementalDetokenizer(self.tokenizer.token_bytes, params.stop),
            cache=None,
            max_len=limit,
        )

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, constraint: TokenConstraint | None = None
    ) -> Sequence:
        """Queue a request on this engine's own FIFO schedule, with a KV slot of its own."""
        seq = self.new_sequence(prompt, params)
        seq.constraint = constraint
        seq.cache = self.pool.allocate()
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.finish(FinishReason.CANCELLED)
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's KV memory (generate/stream do this unless asked to keep it)."""
        self._retire(seq)
        if seq.cache is not None:
            seq.cache.free()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[Sequence, str]]:
        """One prefill chunk or one batched decode step; returns (sequence, new text) for each touched."""
        if self.waiting:
            seq = self.waiting[0]
            delta = self.prefill_chunk(seq)
            if delta is None:
                return [(seq, "")]
            self.waiting.popleft()
            if not seq.finished:
                self.running.append(seq)
            return [(seq, delta)]
        if self.running:
            batch = list(self.running)
            out = list(zip(batch, self.decode(batch), strict=True))
            for s in batch:
                if s.finished:
                    self._retire(s)
            return out
        return []

    # -- the two primitives any scheduler composes (this FIFO one, or llmos.arbiter's) ---------------------
    def prefill_chunk(self, seq: Sequence) -> str | None:
        """Feed the next chunk of `seq`'s prompt; at its end sample the first token and return its text
        (None while prompt remains). `seq.prefilled` may start above 0 when its cache was restored."""
        assert seq.cache is not None, "a sequence needs a KV slot before prefill"
        t0 = time.perf_counter()
        seq.cache.reserve(len(seq.prompt_ids) - seq.cache.length + 1)  # grow once, before the chunk size
        chunk = seq.prompt_ids[seq.prefilled : seq.prefilled + self._chunk_size()]
        logits = self.runner.prefill(seq.cache, chunk)
        seq.prefilled += len(chunk)
        seq.usage.prefill_s += time.perf_counter() - t0
        if seq.prefilled < len(seq.prompt_ids):
            return None
        delta = seq.accept(seq.sample(logits[-1]))
        if not seq.finished:
            seq.status = SequenceStatus.RUNNING
        return delta

    def decode(self, batch: list[Sequence]) -> list[str]:
        """At least one new token for every sequence in `batch`; their new text, in order.

        Sequences without a draft worth verifying share one batched run; each one with a draft (n-gram
        or grammar-forced tokens) gets a run of its own that may yield several tokens (speculative.py)."""
        plain, drafts = self.speculator.plan(batch)
        out: dict[int, str] = {}
        if plain:
            logits, dt = self.speculator.timed_decode(plain)
            for s, row in zip(plain, logits, strict=True):  # type: ignore[call-overload]
                s.usage.decode_s += dt
                out[s.seq_id] = s.accept(s.sample(row))
        for p in drafts:
            out[p.seq.seq_id] = self.speculator.verify(p)
        return [out[s.seq_id] for s in batch]

    def _chunk_size(self) -> int:
        """Prefill chunk: as asked, but small enough that attention scratch (tokens x heads x capacity
        floats, allocated by onnxruntime) stays under ATTENTION_SCRATCH bytes on long contexts."""
        per_token = self.manifest.n_head * (self.pool.capacity + 1) * 4
        return max(MIN_CHUNK, min(self.chunk_tokens, ATTENTION_SCRATCH // per_token))

    # -- convenience loops --------------------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        keep_cache: bool = False,
        constraint: TokenConstraint | None = None,
    ) -> Iterator[StreamChunk]:
        seq = self.add_request(prompt, params, constraint)
        sent = 0
        try:
            while not seq.finished:
                for s, delta in self.step():
                    if s is seq and (delta or s.finished):
                        new_ids = seq.output_ids[sent:]
                        sent = len(seq.output_ids)
                        if s.finished:
                            yield StreamChunk(delta, new_ids, seq.finish_reason, seq.usage)
                        else:
                            yield StreamChunk(delta, new_ids)
        finally:
            if not seq.finished:
                self.cancel(seq)
            if not keep_cache:
                self.release(seq)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, **options: object) -> Completion:
        if options:
            params = SamplingParams.of(**{**(params.model_dump() if params else {}), **options})
        text, ids, last = [], [], None
        for chunk in self.stream(prompt, params):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return Completion("".join(text), ids, last.finish_reason, last.usage)

    def generate_batch(
        self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[Completion]:
        """Several prompts decoded together in batched runs (continuous batching)."""
        plist = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidSamplingError("one SamplingParams per prompt, or one for all")
        seqs: list[Sequence] = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                seqs.append(self.add_request(p, sp))
            while any(not s.finished for s in seqs):
                self.step()
        finally:
            for s in seqs:
                if not s.finished:
                    self.cancel(s)
                self.release(s)
        return [
            Completion(s.detok.text, list(s.output_ids), s.finish_reason or FinishReason.CANCELLED, s.usage)
            for s in seqs
        ]

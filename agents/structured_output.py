"""Guaranteed structured output: decoding constrained by a JSON Schema, with llguidance.

A schema is compiled once into an llguidance grammar (`StructuredOutput.compile`, which also rejects a
bad schema with a named error); each constrained sequence gets its own `JsonSchemaConstraint`, a matcher
that turns the grammar into a token mask before every sampled token. The tokenizer llguidance needs is
built from the model's own `tokenizer.json` (no Hugging Face hub, no transformers), once per model.

The next mask depends only on the tokens already consumed, so `advance` starts computing it on a worker
thread at once: llguidance drops the GIL, so it runs while onnxruntime computes the next logits, and
`mask` usually finds it ready.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import numpy as np

from llmos import bounded_json
from llmos.errors import LlmosError
from llmos.tokenizer import Tokenizer

MAX_SCHEMA_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = bounded_json.MAX_DEPTH  # llguidance's compiler recurses into the schema, natively
# Compact JSON with a space after ":" and ",": free whitespace lets a small model wander (newlines,
# indentation), spending tokens on nothing; none at all reads badly and tokenizes worse.
JSON_STYLE: llg.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class InvalidSchemaError(LlmosError):
    """A `json_schema` that is not JSON, not a schema, or uses what the grammar compiler cannot do."""

    dbus_name = "InvalidArgument"


def parse_schema(schema: str) -> object:
    """A caller's `json_schema` text, parsed within its size and depth; InvalidSchemaError otherwise."""
    try:
        return bounded_json.loads(
            schema, "json_schema", max_chars=MAX_SCHEMA_CHARS, max_depth=MAX_SCHEMA_DEPTH
        )
    except bounded_json.InvalidJsonError as e:
        raise InvalidSchemaError(str(e)) from None


class StructuredOutput:
    """Per model: the llguidance tokenizer (built once, ~0.4 s) and compiled grammars."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = llg.LLTokenizer(
            tokenizer.hf_json(), n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.eos_ids)
        )
        self.vocab = tokenizer.vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmos-grammar")
        self._compiled: dict[str, str] = {}
        self._lock = threading.Lock()

    def compile(self, schema: str) -> str:
        """The llguidance grammar for a JSON Schema given as text; InvalidSchemaError if it is bad."""
        if len(schema) > MAX_SCHEMA_CHARS:
            raise InvalidSchemaError(f"json_schema is over {MAX_SCHEMA_CHARS} characters")
        with self._lock:
            if schema in self._compiled:
                return self._compiled[schema]
        parsed = parse_schema(schema)
        if not isinstance(parsed, dict | bool):
            raise InvalidSchemaError("json_schema must be a JSON object (or true/false)")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_STYLE)
        except ValueError as e:
            raise InvalidSchemaError(f"json_schema: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidSchemaError(f"json_schema cannot be used: {messages[0] if messages else 'invalid'}")
        with self._lock:
            if len(self._compiled) > 256:
                self._compiled.clear()
            self._compiled[schema] = grammar
        return grammar

    def constraint(self, schema: str) -> JsonSchemaConstraint:
        return JsonSchemaConstraint(self, self.compile(schema))

    def grammar_constraint(self, lark: str) -> JsonSchemaConstraint:
        """A constraint from a grammar in llguidance's Lark-like syntax (built by the daemon itself, e.g.
        for tool calls in a model's own format; never taken from callers)."""
        with self._lock:
            grammar = self._compiled.get("lark:" + lark)
        if grammar is None:
            grammar = llg.LLMatcher.grammar_from_lark(lark)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if is_error:
                raise InvalidSchemaError(f"grammar cannot be used: {messages[0] if messages else 'invalid'}")
            with self._lock:
                self._compiled["lark:" + lark] = grammar
        return JsonSchemaConstraint(self, grammar)


class JsonSchemaConstraint:
    """One sequence's matcher (see llmos/engine/constraint.py for the protocol)."""

    def __init__(self, owner: StructuredOutput, grammar: str) -> None:
        self.owner = owner
        self.matcher = llg.LLMatcher(owner.tokenizer, grammar)
        if self.matcher.is_error():
            raise InvalidSchemaError(f"json_schema cannot be used: {self.matcher.get_error()}")
        self._words = (owner.vocab + 31) // 32
        self._next: Future[np.ndarray] = owner._pool.submit(self._compute)
        self.mask_s = 0.0  # time `mask` spent waiting for and applying masks (the per-token overhead)

    def _compute(self) -> np.ndarray:
        bits = np.zeros(self._words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little").astype(bool)
        return allowed[: self.owner.vocab]

    def mask(self, logits: np.ndarray) -> None:
        t0 = time.perf_counter()
        allowed = self._next.result()
        if self.matcher.is_error() or not allowed.any():  # cannot happen with a valid grammar; end cleanly
            allowed = np.zeros(self.owner.vocab, dtype=bool)
            allowed[self.owner.tokenizer.eos_token] = True
        n = min(len(logits), len(allowed))
        logits[:n][~allowed[:n]] = -np.inf
        logits[n:] = -np.inf
        self.mask_s += time.perf_counter() - t0

    def advance(self, token: int) -> None:
        if not self._next.cancel():  # one thread at a time in the matcher (a mask may still be computing)
            self._next.result()
        self.matcher.consume_token(token)
        self._next = self.owner._pool.submit(self._compute)

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar admits as the only continuation from here (jump-forward; see
        llmos/engine/speculative.py). llguidance leaves out a last token a longer one could replace."""
        self._next.result()  # not while the pending mask reads the matcher
        if self.matcher.is_error():
            return []
        return list(self.matcher.compute_ff_tokens())

    @property
    def complete(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()

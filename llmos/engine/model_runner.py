"""Run the graph: prefill one sequence, or decode one token for a batch of sequences.

IO binding by raw pointer: the KV pool, the token/length inputs and the logits output are preallocated
numpy buffers bound once per batch shape, so a decode step writes a few integers in place and runs; no
per-token allocation and no KV copy. Bindings are redone only when the set of slots or the shape changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from llmos.arbiter.devices import ProviderFailure, open_session
from llmos.engine import native_ops
from llmos.engine.embedding import EmbeddingTable
from llmos.engine.kv_cache import KVCache, KVPool
from llmos.errors import ModelUnavailableError
from llmos.manifest import ModelManifest


@dataclass(frozen=True)
class RunnerOptions:
    threads: int = 0  # 0 = one per available core
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    spin: bool = True  # busy-wait between ops: lower latency, more CPU while generating


def _session_options(opts: RunnerOptions) -> ort.SessionOptions:
    # onnxruntime records usage telemetry by default (on Linux, into ~/.cache/Microsoft/...); an OS
    # service hosting everyone's prompts sends nothing anywhere.
    ort.disable_telemetry_events()
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.spin else "0")
    so.log_severity_level = 3
    return so


class ModelRunner:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        manifest: ModelManifest,
        pool: KVPool,
        options: RunnerOptions | None = None,
    ) -> None:
        self.options = options or RunnerOptions()
        self.manifest = manifest
        self.pool = pool
        # Configured providers in order, CPU last; a broken graph fails on all of them and raises
        # ModelUnavailableError ("onnxruntime could not load ...") with onnxruntime's message for each.
        so = _session_options(self.options)
        if manifest.custom_op_domains:  # imported for llmos's native ops: their library or a clear refusal
            native_ops.require(so, model_dir, manifest.native_ops)
        session, provider, failures = open_session(
            os.path.join(model_dir, manifest.graph_file),
            so,
            self.options.providers,
        )
        self.session = session
        self.provider: str = provider  # the one in use
        self.provider_failures: list[ProviderFailure] = failures  # those tried before it, in order
        self.vocab = manifest.n_vocab
        self.embeddings = EmbeddingTable(model_dir, manifest.embedding, manifest.embedding_type)
        slots = pool.slots
        self._embeds = np.zeros((slots, 1, manifest.n_embd), dtype=np.float32)
        self._pos = np.zeros((slots, 1), dtype=np.int64)
        self._seqlens = np.zeros(slots, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)
        self._logits = np.zeros((slots, 1, self.vocab), dtype=np.float32)
        self._io = self.session.io_binding()
        # (first slot, batch, pool generation) the decode binding is set up for
        self._bound: tuple[int, int, int] | None = None

    def _run(self) -> None:
        try:
            self.session.run_with_iobinding(self._io)
        except Exception as e:  # onnxruntime's own exception types; never a raw traceback to callers
            raise ModelUnavailableError(f"inference failed in onnxruntime: {e}") from e

    # -- binding helpers ----------------------------------------------------------------------------------
    def _bind(self, name: str, arr: np.ndarray, output: bool = False) -> None:
        args = (name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        (self._io.bind_output if output else self._io.bind_input)(*args)

    def _bind_kv(self, first: int, n: int) -> None:
        for layer in range(self.manifest.n_layer):
            for kind, label in ((0, "key"), (1, "value")):
                view = self.pool.layer_view(layer, kind, first, n)
                self._bind(f"past_{label}.{layer}", view)
                self._bind(f"present_{label}.{layer}", view, output=True)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, cache: KVCache, ids: list[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence in `cache`; return logits [n, vocab] (all positions or the last)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        embeds = self.embeddings.lookup(ids)
        cache.reserve(n)
        past = cache.length
        positions = (
            np.arange(n, dtype=np.int64).reshape(1, -1) if all_logits else np.array([[n - 1]], np.int64)
        )
        logits = np.empty((1, positions.shape[1], self.vocab), dtype=np.float32)
        seqlens = np.array([past + n - 1], dtype=np.int32)
        total = np.array(past + n, dtype=np.int32)
        self._bound = None
        self._bind("inputs_embeds", embeds)
        self._bind("logit_positions", positions)
        self._bind("seqlens_k", seqlens)
        self._bind("total_sequence_length", total)
        self._bind("logits", logits, output=True)
        self._bind_kv(cache.slot, 1)
        self._run()
        cache.length = past + n
        return logits[0]

    # -- decode -------------------------------------------------------------------------------------------
    def decode(self, caches: list[KVCache], tokens: list[int]) -> np.ndarray:
        """One new token for each sequence, in one batched run; returns logits [len(caches), vocab].

        The batch spans the slots from the lowest to the highest of `caches`; slots in between that are
        not part of this step get a throw-away row written past their valid length (see kv_cache.py).
        """
        for c in caches:
            c.reserve(1)
        slots = [c.slot for c in caches]
        first, n = min(slots), max(slots) - min(slots) + 1
        if self._bound != (first, n, self.pool.generation):
            self._bind("inputs_embeds", self._embeds[:n])
            self._bind("logit_positions", self._pos[:n])
            self._bind("seqlens_k", self._seqlens[:n])
            self._bind("total_sequence_length", self._total)
            self._bind("logits", self._logits[:n], output=True)
            self._bind_kv(first, n)
            self._bound = (first, n, self.pool.generation)
        if len(caches) < n:
            for row in range(n):  # gap rows: write at the occupant's length (harmless), or at 0 if free
                occupant = self.pool.occupant(first + row)
                self._seqlens[row] = occupant.length if occupant else 0
        rows = np.asarray(slots) - first
        self._embeds[rows] = self.embeddings.lookup(np.asarray(tokens, dtype=np.int64)[:, None])
        for c in caches:
            self._seqlens[c.slot - first] = c.length  # total length after this token, minus one
        self._total[...] = int(self._seqlens[:n].max()) + 1
        self._run()
        for c in caches:
            c.length += 1
        return self._logits[[s - first for s in slots], 0]

"""The arbiter: one model shared by many apps. Requests in, scheduled steps on the engine, KV managed.

Everything here runs on one thread (the service's engine thread): `submit`, `cancel`, `step`,
`drop_session`, `unload`, `swap_out_idle`. Reads from other threads go through `snapshot()`, an
immutable summary published after every step.

A request's life: submit (tokenize, check the app's context quota, queue) -> admitted by the scheduler
(a KV slot; the session's parked KV or a shared prefix copied in, so only new tokens are prefilled) ->
prefill chunks -> batched decode steps -> finished: its KV is parked under the session key (or freed),
then the budget is enforced (cold sessions to disk). The model is loaded on the first request after an
unload.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmos.arbiter.auto_prefix import AutoPrefix, common_prefix
from llmos.arbiter.kv_manager import KVManager
from llmos.arbiter.policy import Account, ArbiterConfig
from llmos.arbiter.prefix_cache import PrefixCache
from llmos.arbiter.request import Request
from llmos.arbiter.scheduler import Scheduler
from llmos.arbiter.swap_store import SwapStore
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.memory import release_free_heap
from llmos.engine.sequence import FinishReason
from llmos.engine.speculative import SPEC_KEYS
from llmos.errors import ContextOverflowError, QuotaExceededError
from llmos.log_limit import LimitedLog

log = logging.getLogger("llmos.arbiter")
WINDOW_S = 60.0
PUBLISH_EVERY_S = 0.1
APP_KEYS = ("queued", "running", "tokens", "tokens_last_minute", "kv_resident_bytes", "kv_swapped_bytes")


@dataclass
class AppUsage:
    tokens: int = 0  # computed for this app since start: prompt tokens prefilled + tokens generated
    # tokens per whole second over the last minute, and their running sum: asked after every step, so
    # neither a per-token list nor a sum over it
    recent: deque[list[int]] = field(default_factory=deque)  # [second, tokens]
    in_window: int = 0

    def add(self, n: int, now: float) -> None:
        self.tokens += n
        self.in_window += n
        second = int(now)
        if self.recent and self.recent[-1][0] == second:
            self.recent[-1][1] += n
        else:
            self.recent.append([second, n])

    def last_minute(self, now: float) -> int:
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.in_window -= self.recent.popleft()[1]
        return self.in_window


class Arbiter:
    def __init__(
        self, load_engine: Callable[[], LLMEngine], config: ArbiterConfig, swap: SwapStore | None = None
    ) -> None:
        self._load_engine = load_engine
        self.config = config
        self.engine: LLMEngine | None = None
        self.state = "unloaded"
        self.scheduler = Scheduler(config.quantum_tokens)
        self.kv = KVManager(config.kv_budget_mib << 20, swap)
        self.prefix = PrefixCache(config.prefix_cache_entries)
        self.auto = AutoPrefix(self.kv, config.auto_prefix_per_app)
        self.usage: dict[Account, AppUsage] = defaultdict(AppUsage)
        self._spec_unloaded: dict[str, int] = {}  # speculation totals of engines since unloaded
        self.last_active = time.monotonic()
        self.loads = 0
        self.device = ""  # the execution provider in use (kept while unloaded: the one used last)
        self.device_failures: list[str] = []  # providers tried before it, and why they failed
        self._snapshot: dict[str, Any] = {}
        self._published_at = 0.0
        self._changed = False  # requests admitted or ended since the last snapshot
        self.log = LimitedLog(log)  # a step that fails for every request must not log every time

    # -- residency ----------------------------------------------------------------------------------------
    def load(self) -> LLMEngine:
        if self.engine is None:
            self.state = "loading"
            self.publish()
            try:
                self.engine = self._load_engine()
            except Exception as e:
                self.state = "error"
                self.publish()
                if self.loads:  # a reload after an idle unload: the caller gets the error, the log too
                    log.error("cannot load the model again: %s", e)
                raise
            self.state = "ready"
            self.loads += 1
            self.device = self.engine.runner.provider
            self.device_failures = [f"{f.provider}: {f.reason}" for f in self.engine.runner.provider_failures]
            self.publish()
        return self.engine

    def unload(self) -> bool:
        """Free the model (its weights and KV slots). Parked KV goes to disk. Refused while busy."""
        if self.engine is None or self.has_work:
            return False
        self.auto.clear()  # a stateless client's KV is a cache: not worth a disk write
        self.kv.swap_out_all()
        self.prefix.clear()
        self._spec_unloaded = self.speculation_totals()
        self.engine = None
        gc.collect()  # the session, its pool and the runner's buffers go now, not at some later cycle
        release_free_heap()
        self.state = "unloaded"
        self.publish()
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.has_waiting

    def idle_for(self) -> float:
        return 0.0 if self.has_work else time.monotonic() - self.last_active

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; raises a named error (bad prompt, context, quota) without queueing it."""
        queued = sum(1 for r in self.scheduler.queued() if r.account == req.account)
        if req.max_queued and queued >= req.max_queued:
            raise QuotaExceededError(f"{req.who} already has {queued} requests waiting", retry_after_s=1.0)
        if req.tokens_per_minute:
            used, frees_in = self.tokens_last_minute(req.account)
            if used >= req.tokens_per_minute:
                raise QuotaExceededError(
                    f"{req.who} used {used} of its {req.tokens_per_minute} tokens per minute",
                    retry_after_s=max(frees_in, 0.1),
                )
        engine = self.load()
        try:
            req.seq = engine.new_sequence(
                req.prompt, req.params, max_len=req.max_context or None, prompt_ids=req.prompt_ids
            )
        except ContextOverflowError as e:
            if req.max_context and req.max_context < engine.context_length and e.limit == req.max_context:
                raise QuotaExceededError(
                    f"{req.who} may use {req.max_context} tokens of context per sequence and this "
                    f"prompt needs {e.needed}"
                ) from None
            raise
        req.seq.constraint = req.constraint
        self.scheduler.add(req)
        self.last_active = time.monotonic()

    def cancel(self, req: Request) -> None:
        if req.seq is not None and not req.done:
            req.seq.finish(FinishReason.CANCELLED)
            self._finish(req)

    def fail(self, req: Request, error: Exception) -> None:
        """End a request with an error (its owner gets the error, not a result)."""
        if req.error is None:
            req.error = error
            if req.seq is not None:
                req.seq.finish(FinishReason.CANCELLED)
            self._finish(req)

    def clone_session(self, src: str, dst: str) -> bool:
        """A cloned conversation starts with a copy of its source's parked KV (when in memory), so its
        first prompt computes only the new turn."""
        entry = self.kv.parked.get(src)
        if entry is None or entry.kv is None:
            return False
        self.kv.park(dst, entry.account, entry.ids, entry.kv.copy())
        self._enforce_budget()
        return True

    def drop_session(self, key: str) -> None:
        """The session is gone: its requests stop and its KV (memory or disk) is freed."""
        for req in [*self.scheduler.running, *self.scheduler.queued()]:
            if req.session_key == key:
                self.cancel(req)
        self.kv.drop(key)

    # -- one step -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what fits, then run one prefill chunk or one batched decode. False when idle."""
        if not self.has_work:
            return False
        engine = self.load()
        self._admit(engine)
        kind, batch = self.scheduler.next_step()
        try:
            if kind == "prefill":
                req = batch[0]
                assert req.seq is not None
                before = req.seq.prefilled
                delta = engine.prefill_chunk(req.seq)
                # the prompt tokens computed, and the first generated token once the prompt is done
                self._charge(req, req.seq.prefilled - before + (delta is not None))
                self._remember_prefix(engine, req, before)
                if delta is not None:
                    self._deliver(req, delta)
            elif kind == "decode":
                before = [len(r.seq.output_ids) for r in batch]  # type: ignore[union-attr]
                deltas = engine.decode([r.seq for r in batch])  # type: ignore[misc]
                for req, delta, n in zip(batch, deltas, before, strict=True):
                    assert req.seq is not None
                    self._charge(req, len(req.seq.output_ids) - n)  # several with a draft accepted
                    self._deliver(req, delta)
        except Exception as e:  # a failing run fails the requests in it, never the arbiter
            self.log.failed(
                f"{kind} steps", e, "Its requests got this error; the daemon goes on serving others"
            )
            for req in batch:
                req.error = e
                self._finish(req)
        else:
            if kind in ("prefill", "decode"):
                self.log.recovered(f"{kind} steps")
        self.last_active = time.monotonic()
        # not after every token: a snapshot walks every app and parked session. Promptly when requests
        # come or go (what status readers wait for), else a few times a second for the token counts.
        if self._changed or self.last_active - self._published_at >= PUBLISH_EVERY_S:
            self.publish()
        return True

    def _admit(self, engine: LLMEngine) -> None:
        while (pick := self.scheduler.next_admission(engine.pool.in_use < engine.pool.slots)) is not None:
            req, victim = pick
            if victim is not None:
                self._preempt(victim)
            self.scheduler.admit(req)
            self._attach_kv(engine, req)
            self._changed = True

    def _attach_kv(self, engine: LLMEngine, req: Request) -> None:
        seq = req.seq
        assert seq is not None
        seq.cache = engine.pool.allocate()
        key = self._park_key(req)
        if key is None and req.auto_prefix and not seq.output_ids:  # the account's own KV, alike
            shared = self.prefix.longest(req.account, seq.prompt_ids)
            if (auto := self.auto.best(req.account, seq.prompt_ids, shared)) is not None:
                key = auto[0]
                self.auto.used(req.account, key, min(auto[1], len(seq.prompt_ids) - 1))
        parked = key is not None and self.kv.has(key)
        restored = self.kv.take(key) if key is not None else None
        if parked and restored is None:
            req.restored_from = "recomputed"  # its swap file was missing or corrupt: prefill it all
        if restored is not None:
            if req.preemptions and seq.output_ids:  # a preempted decode resumes exactly where it stopped
                n = len(restored.ids)
            else:  # a new turn reuses what its conversation shares; one prompt token is fed, for logits
                n = min(common_prefix(restored.ids, seq.prompt_ids), len(seq.prompt_ids) - 1)
            restored.into(seq.cache, n)
            req.restored_from = restored.source
        elif not parked and not seq.output_ids and (hit := self.prefix.lookup(req.account, seq.prompt_ids)):
            n, kv = hit
            seq.cache.load(kv)
            req.restored_from = "prefix"
        else:
            n = 0
        if not seq.output_ids:
            seq.prefilled = n
            req.reused_tokens = n

    def _preempt(self, req: Request) -> None:
        """Free `req`'s slot at this token boundary; its KV waits in memory for it to resume."""
        seq = req.seq
        assert seq is not None and seq.cache is not None
        key = f"preempted-{req.request_id}"
        self.kv.park(key, req.account, seq.kv_ids(), seq.cache.export(), swappable=False)
        seq.cache.free()
        seq.cache = None
        self.scheduler.preempt(req)
        log.debug("preempted request %d of %s", req.request_id, req.app_id)

    def _park_key(self, req: Request) -> str | None:
        if req.preemptions:
            return f"preempted-{req.request_id}"
        return req.session_key

    def _remember_prefix(self, engine: LLMEngine, req: Request, before: int) -> None:
        """Once a first turn's prompt has passed its shared prefix, keep that prefix's KV for others."""
        seq = req.seq
        assert seq is not None and seq.cache is not None
        if req.restored_from or not isinstance(req.prompt, list) or len(req.prompt) > 2:
            return
        if not all(isinstance(m, dict) for m in req.prompt):
            return
        prefix = self.prefix.shared_prefix(req.prompt, engine.encode_prompt)  # type: ignore[arg-type]
        passed = before < len(prefix) <= seq.prefilled and seq.prompt_ids[: len(prefix)] == prefix
        if passed and self.prefix.wants(req.account, prefix):
            self.prefix.add(req.account, prefix, seq.cache.export(len(prefix)))

    def _charge(self, req: Request, tokens: int) -> None:
        self.scheduler.charge(req.account, tokens)
        self.usage[req.account].add(tokens, time.monotonic())

    def _deliver(self, req: Request, delta: str) -> None:
        if delta and req.on_delta is not None:
            req.on_delta(delta)
        if req.done:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        """The request is over (however): park or free its KV, tell its owner, enforce the budget."""
        self._changed = True
        self.scheduler.remove(req)
        seq = req.seq
        if seq is not None:
            if req.preemptions:
                self.kv.drop(f"preempted-{req.request_id}")
            if seq.cache is not None:
                if req.session_key and req.error is None and seq.cache.length:
                    self.kv.park(req.session_key, req.account, seq.kv_ids(), seq.cache.export())
                elif (
                    req.auto_prefix
                    and not req.session_key
                    and req.error is None
                    and seq.finish_reason is not FinishReason.CANCELLED
                ):
                    self.auto.remember(req.account, seq.kv_ids(), seq.cache.export())
                seq.cache.free()
                seq.cache = None
        if req.on_done is not None:  # the owner first: compressing and writing KV can take 50 ms
            req.on_done(req)
        self._enforce_budget()

    # -- memory -------------------------------------------------------------------------------------------
    def active_kv_bytes(self) -> int:
        return sum(r.seq.cache.nbytes() for r in self.scheduler.running if r.seq and r.seq.cache)

    def _enforce_budget(self) -> None:
        """Over budget: cold sessions go to disk first (least recently used first), then free slots give
        their warm pages back, then shared prefixes are dropped. Running requests are never touched."""
        pool = self.engine.pool if self.engine is not None else None
        warm = pool.warm_free_bytes() if pool is not None else 0
        other = self.active_kv_bytes() + self.prefix.nbytes() + warm
        self.kv.enforce(other)
        if pool is not None and self.kv.resident_bytes() + other > self.kv.budget_bytes:
            other -= pool.trim_free()
        while self.kv.resident_bytes() + other > self.kv.budget_bytes and self.prefix.entries:
            other -= self.prefix.evict_one()

    def over_budget_bytes(self) -> int:
        """How far KV memory is over the budget because parked KV could not be written to disk (0 while
        swap writes work: running requests may exceed the budget by design, which is not counted)."""
        stuck = self.kv.stuck_bytes()
        if not stuck:
            return 0
        warm = self.engine.pool.warm_free_bytes() if self.engine is not None else 0
        total = self.active_kv_bytes() + self.kv.resident_bytes() + self.prefix.nbytes() + warm
        return min(max(0, total - self.kv.budget_bytes), stuck)

    def retry_swap_out(self) -> int:
        """Swap writes failed: try the budget again (space may have been freed) without waiting for a
        request to end; returns the bytes still over the budget."""
        self._enforce_budget()
        self.publish()
        return int(self._snapshot["kv_over_budget_bytes"])

    def swap_out_idle(self) -> int:
        """Memory pressure: every parked session goes to disk, free slots give their pages back and
        the prefix cache is emptied."""
        self.prefix.clear()
        if self.engine is not None:
            self.engine.pool.trim_free()
        n = self.kv.swap_out_all()
        self.publish()
        return n

    # -- visibility ---------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def publish(self) -> None:
        """Refresh the snapshot other threads read (after every step and every command). Its keys are
        the service's GetStatus keys."""
        now = self._published_at = time.monotonic()
        self._changed = False
        apps: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(APP_KEYS, 0))
        for r in self.scheduler.queued():
            apps[r.app_id]["queued"] += 1
        for r in self.scheduler.running:
            apps[r.app_id]["running"] += 1
            if r.seq is not None and r.seq.cache is not None:
                apps[r.app_id]["kv_resident_bytes"] += r.seq.cache.nbytes()
        parked = self.kv.by_app()
        for app, (mem, disk) in parked.items():
            apps[app]["kv_resident_bytes"] += mem
            apps[app]["kv_swapped_bytes"] += disk
        for (app, _uid), use in self.usage.items():  # shown per app id, all its users together
            apps[app]["tokens"] += use.tokens
            apps[app]["tokens_last_minute"] += use.last_minute(now)
        self._snapshot = {
            "state": self.state,
            "apps": {k: dict(v) for k, v in apps.items()},
            "kv_budget_bytes": self.kv.budget_bytes,
            "kv_bytes": self.active_kv_bytes() + self.kv.resident_bytes(),  # sessions' KV in memory
            "prefix_cache_bytes": self.prefix.nbytes(),  # shared prefixes (counted in the budget too)
            "kv_free_slot_bytes": self.engine.pool.warm_free_bytes() if self.engine is not None else 0,
            "kv_swapped_bytes": sum(disk for _, disk in parked.values()),
            "swap_outs": self.kv.swapped_out,
            "swap_restores": self.kv.restored_from_disk,
            "swap_recomputes": self.kv.recomputed,
            "swap_failures": self.kv.swap_failures,
            "kv_over_budget_bytes": self.over_budget_bytes(),
            "prefix_hits": self.prefix.hits,
            "auto_prefix_hits": self.auto.hits,
            "auto_prefix_tokens": self.auto.tokens,
            "model_loads": self.loads,
            **self.speculation_totals(),
            "device": self.device,
            "device_failures": list(self.device_failures),
        }

    def speculation_totals(self) -> dict[str, int]:
        """Draft, accepted and forced tokens since start (models unloaded since included)."""
        live = self.engine.speculator.totals if self.engine is not None else {}
        return {k: self._spec_unloaded.get(k, 0) + live.get(k, 0) for k in SPEC_KEYS}

    def tokens_last_minute(self, account: Account) -> tuple[int, float]:
        """(tokens in the last minute, seconds until the oldest of them leaves the window)."""
        use = self.usage.get(account)
        if use is None:
            return 0, 0.0
        now = time.monotonic()
        n = use.last_minute(now)
        return n, (use.recent[0][0] + 1 + WINDOW_S - now) if use.recent else 0.0

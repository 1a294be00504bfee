"""The arbiter on its own thread, so inference never blocks the D-Bus event loop (or the watchdog).

The asyncio side submits `Job`s, cancels them, and sends commands (drop a session's KV, unload, swap
out); the worker thread owns the `Arbiter` (and through it the engine), runs the commands between steps,
steps while there is work, and hands text deltas and results back to the event loop with
`call_soon_threadsafe`. Status is read from the arbiter's published snapshot, never from live state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agents.structured_output import StructuredOutput
from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import AppPolicy, Priority
from llmos.arbiter.request import Request
from llmos.engine.llm_engine import Prompt
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import FinishReason, Usage
from llmos.errors import LlmosError
from llmos.log_limit import LimitedLog
from system_services.prompt_encoder import INLINE_BYTES, PromptEncoder

log = logging.getLogger("llmosd.worker")
T = TypeVar("T")


class CancelledByDaemon(LlmosError):
    """The request was cancelled (by its owner, its owner leaving the bus, or the daemon stopping)."""

    dbus_name = "Cancelled"


@dataclass
class JobResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    priority: str = "normal"
    reused_tokens: int = 0  # prompt tokens whose KV was restored instead of computed
    restored_from: str = ""


@dataclass(eq=False)
class Job:
    prompt: Prompt
    params: SamplingParams
    app_id: str = "unknown"
    uid: int | None = None  # with app_id, the account its quotas and fair share count against
    priority: Priority = Priority.NORMAL
    policy: AppPolicy = field(default_factory=AppPolicy)
    session_key: str | None = None
    json_schema: str | None = None  # constrain the answer to JSON valid against this schema
    grammar: str | None = None  # or to this llguidance grammar (agent steps in a model's own format)
    prompt_bytes: int = 0  # its text's size (llmos.input_bounds): a long prompt is tokenized off-thread
    prompt_ids: list[int] | None = None  # set once a long prompt is tokenized
    auto_prefix: bool = False  # a stateless client resending its conversation (HTTP): reuse its KV
    on_delta: Callable[[str], None] | None = None  # called on the event loop
    future: asyncio.Future[JobResult] | None = None  # set by submit()
    request: Request | None = field(default=None, repr=False)
    cancelled: str | None = None  # why, once cancelled


class EngineWorker:
    def __init__(
        self,
        arbiter: Arbiter,
        loop: asyncio.AbstractEventLoop,
        encode: Callable[[Prompt], list[int]] | None = None,
    ) -> None:
        self.arbiter = arbiter
        self.loop = loop
        self._encode = encode  # tokenizes a long prompt without the engine (see prompt_encoder.py)
        self.tokenizing = PromptEncoder()
        self._lock = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._jobs: dict[int, Job] = {}  # request id -> job, touched on the worker thread only
        self._pending = 0  # jobs submitted and not yet ended (read by status on the event loop)
        self._stopping = False
        self._structured: StructuredOutput | None = None  # built on the first json_schema request
        self._log = LimitedLog(log)  # each of these can fail once per request or per step
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        job.future = self.loop.create_future()
        with self._lock:
            if self._stopping:
                job.future.set_exception(CancelledByDaemon("the daemon is stopping"))
                return job.future
            self._pending += 1
            job.future.add_done_callback(self._ended)
            if self._encode is None or job.prompt_bytes <= INLINE_BYTES:
                self._inbox.append(lambda: self._start(job))
                self._lock.notify()
                return job.future
        self.loop.create_task(self._tokenize_then_start(job))
        return job.future

    async def _tokenize_then_start(self, job: Job) -> None:
        """A long prompt: tokenized on a thread first, so the engine's thread keeps generating for others."""
        assert self._encode is not None and job.future is not None
        encode = self._encode
        try:
            job.prompt_ids = await self.tokenizing.run(lambda: encode(job.prompt))
        except Exception as e:  # a named error (the template refused it, ...) or not: the caller hears
            if not isinstance(e, LlmosError):
                self._log.failed("tokenizing prompts", e, "The caller got the error", exc_info=True)
            _set_exception(job.future, e)
            return
        with self._lock:
            if self._stopping:
                _set_exception(job.future, CancelledByDaemon("the daemon is stopping"))
                return
            self._inbox.append(lambda: self._start(job))
            self._lock.notify()

    def _ended(self, _fut: asyncio.Future[JobResult]) -> None:
        with self._lock:
            self._pending -= 1

    def cancel(self, job: Job, why: str) -> None:
        if job.cancelled is None:
            job.cancelled = why
            self._post(lambda: self._cancel(job))

    def drop_session(self, key: str) -> None:
        self._post(lambda: self.arbiter.drop_session(key))

    def clone_session(self, src: str, dst: str) -> None:
        self._post(lambda: self.arbiter.clone_session(src, dst))

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on the worker thread between steps; its result (or error) as a future."""
        fut: asyncio.Future[T] = self.loop.create_future()

        def run() -> None:
            try:
                value = fn()
            except Exception as e:
                self.loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self.loop.call_soon_threadsafe(_set_result, fut, value)

        self._post(run)
        return fut

    def _post(self, cmd: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(cmd)
            self._lock.notify()

    def active_jobs(self) -> int:
        with self._lock:
            return self._pending

    def snapshot(self) -> dict[str, Any]:
        return self.arbiter.snapshot()

    def stop(self, why: str = "the daemon is stopping") -> None:
        """Cancel everything in flight and end the thread (waits for the current step to finish)."""
        with self._lock:
            self._stopping = True
            self._inbox.append(lambda: self._cancel_all(why))
            self._lock.notify()
        self._thread.join(timeout=30)

    # -- worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self.arbiter.has_work or self._stopping):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            for cmd in inbox:
                try:
                    cmd()
                except Exception as e:  # a command's failure is reported by it; the thread carries on
                    self._log.failed("worker commands", e, exc_info=True)
                else:
                    self._log.recovered("worker commands")
            if inbox:
                self.arbiter.publish()
            if stopping and not self.arbiter.has_work:
                return
            if self.arbiter.has_work:
                try:
                    self.arbiter.step()
                except Exception as e:  # e.g. the model fails to reload: fail what waits, keep serving
                    self._log.failed("arbiter steps", e, "Every request waiting got this error")
                    for job in list(self._jobs.values()):
                        self._fail(job, e)
                else:
                    self._log.recovered("arbiter steps")

    def _start(self, job: Job) -> None:
        if job.cancelled is not None:
            self._deliver_error(job, CancelledByDaemon(job.cancelled))
            return
        p = job.policy
        req = Request(
            job.prompt,
            job.params,
            app_id=job.app_id,
            uid=job.uid,
            priority=job.priority,
            session_key=job.session_key,
            max_context=p.max_context,
            tokens_per_minute=p.tokens_per_minute,
            max_queued=p.max_queued,
            prompt_ids=job.prompt_ids,
            auto_prefix=job.auto_prefix,
            on_done=lambda r: self._done(job, r),
        )
        if job.on_delta is not None:
            on_delta = job.on_delta
            req.on_delta = lambda delta: self.loop.call_soon_threadsafe(on_delta, dbus_text(delta))
        job.request = req
        try:
            if job.json_schema is not None:
                req.constraint = self._structured_output().constraint(job.json_schema)
            elif job.grammar is not None:
                req.constraint = self._structured_output().grammar_constraint(job.grammar)
            self.arbiter.submit(req)
        except Exception as e:  # named errors as they are; anything else (a reload failing on an OSError,
            # MemoryError, ...) must still answer the caller, never leave it waiting
            if not isinstance(e, LlmosError):
                self._log.failed("queueing requests", e, "The caller got the error", exc_info=True)
            self._deliver_error(job, e)
            return
        self._log.recovered("queueing requests")
        self._jobs[req.request_id] = job

    def _structured_output(self) -> StructuredOutput:
        if self._structured is None:  # ~0.4 s once: llguidance's view of the model's tokenizer
            self._structured = StructuredOutput(self.arbiter.load().tokenizer)
        return self._structured

    def _cancel(self, job: Job) -> None:
        if job.request is not None and job.request.request_id in self._jobs:
            self.arbiter.cancel(job.request)  # calls _done, which reports the cancellation

    def _cancel_all(self, why: str) -> None:
        for job in list(self._jobs.values()):
            job.cancelled = job.cancelled or why
            self._cancel(job)

    def _fail(self, job: Job, error: Exception) -> None:
        if job.request is not None:
            self.arbiter.fail(job.request, error)  # calls _done, which reports the error

    def _done(self, job: Job, req: Request) -> None:
        self._jobs.pop(req.request_id, None)
        seq = req.seq
        if req.error is not None:
            self._deliver_error(job, req.error)
        elif seq is None or seq.finish_reason is FinishReason.CANCELLED:
            self._deliver_error(job, CancelledByDaemon(job.cancelled or "cancelled"))
        else:
            result = JobResult(
                dbus_text(seq.detok.text),
                list(seq.output_ids),
                seq.finish_reason or FinishReason.STOP,
                seq.usage,
                priority=req.priority.label,
                reused_tokens=req.reused_tokens,
                restored_from=req.restored_from,
            )
            self.loop.call_soon_threadsafe(_set_result, job.future, result)

    def _deliver_error(self, job: Job, error: Exception) -> None:
        self.loop.call_soon_threadsafe(_set_exception, job.future, error)


def dbus_text(text: str) -> str:
    """Model text as a D-Bus string. D-Bus strings cannot hold NUL, which a model may emit (byte 0x00):
    done here, where all text leaves the engine, so every reply and signal is sendable."""
    return text.replace("\x00", "\ufffd")


def _set_result(fut: asyncio.Future[Any] | None, result: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any] | None, error: Exception) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(error)

"""The engine on its own thread, so inference never blocks the D-Bus event loop (or the watchdog).

The asyncio side submits `Job`s and cancels them; the worker thread owns the `LLMEngine`, steps it while
there is work, and hands text deltas and the final result back to the event loop with
`call_soon_threadsafe`. Every sequence a job creates is released when the job ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.engine.llm_engine import LLMEngine, Prompt
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import FinishReason, Sequence, Usage
from llmos.errors import LlmosError

log = logging.getLogger("llmosd.worker")


class CancelledByDaemon(LlmosError):
    """The request was cancelled (by its owner, its owner leaving the bus, or the daemon stopping)."""

    dbus_name = "Cancelled"


@dataclass
class JobResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


@dataclass(eq=False)
class Job:
    prompt: Prompt
    params: SamplingParams
    on_delta: Callable[[str], None] | None = None  # called on the event loop
    future: asyncio.Future[JobResult] | None = None  # set by submit()
    seq: Sequence | None = field(default=None, repr=False)
    cancelled: str | None = None  # why, once cancelled


class EngineWorker:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self._lock = threading.Condition()
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}  # seq_id -> job
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        job.future = self.loop.create_future()
        with self._lock:
            if self._stopping:
                job.future.set_exception(CancelledByDaemon("the daemon is stopping"))
                return job.future
            self._inbox.append(job)
            self._lock.notify()
        return job.future

    def cancel(self, job: Job, why: str) -> None:
        with self._lock:
            if job.cancelled is None:
                job.cancelled = why
                self._cancels.append(job)
                self._lock.notify()

    def active_jobs(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._jobs)

    def kv_bytes(self) -> int:
        """KV memory held by running jobs (read under the lock: the worker thread changes `_jobs`)."""
        with self._lock:
            return sum(j.seq.cache.nbytes() for j in self._jobs.values() if j.seq is not None)

    def stop(self, why: str = "the daemon is stopping") -> None:
        """Cancel everything in flight and end the thread (waits for the current step to finish)."""
        with self._lock:
            self._stopping = True
            for job in [*self._inbox, *self._jobs.values()]:
                if job.cancelled is None:
                    job.cancelled = why
                    self._cancels.append(job)
            self._lock.notify()
        self._thread.join(timeout=30)

    # -- worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or self.engine.has_work or self._stopping):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
            for job in inbox:
                self._start(job)
            for job in cancels:
                self._finish_cancelled(job)
            if stopping and not self.engine.has_work:
                return
            if self.engine.has_work:
                self._step()

    def _start(self, job: Job) -> None:
        if job.cancelled is not None:
            self._deliver_error(job, CancelledByDaemon(job.cancelled))
            return
        try:
            job.seq = self.engine.add_request(job.prompt, job.params)
        except LlmosError as e:
            self._deliver_error(job, e)
            return
        with self._lock:
            self._jobs[job.seq.seq_id] = job

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # a failing step fails the jobs in it, never the engine thread itself
            if isinstance(e, LlmosError):
                log.error("engine step failed: %s", e)
            else:
                log.exception("unexpected failure in an engine step")
            with self._lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                if job.seq is not None and not job.seq.finished:
                    self.engine.cancel(job.seq)
                self._release(job)
                self._deliver_error(job, e)
            return
        for seq, delta in outs:
            job = self._jobs.get(seq.seq_id)
            if job is None:
                continue
            if delta and job.on_delta is not None:
                self.loop.call_soon_threadsafe(job.on_delta, dbus_text(delta))
            if seq.finished:
                self._release(job)
                result = JobResult(
                    dbus_text(seq.detok.text), list(seq.output_ids), seq.finish_reason, seq.usage
                )
                self.loop.call_soon_threadsafe(_set_result, job.future, result)

    def _finish_cancelled(self, job: Job) -> None:
        if job.seq is not None and job.seq.seq_id in self._jobs:
            self.engine.cancel(job.seq)
            self._release(job)
        self._deliver_error(job, CancelledByDaemon(job.cancelled or "cancelled"))

    def _release(self, job: Job) -> None:
        if job.seq is None:
            return
        with self._lock:
            held = self._jobs.pop(job.seq.seq_id, None)
        if held is not None:
            self.engine.release(job.seq)

    def _deliver_error(self, job: Job, error: Exception) -> None:
        self.loop.call_soon_threadsafe(_set_exception, job.future, error)


def dbus_text(text: str) -> str:
    """Model text as a D-Bus string. D-Bus strings cannot hold NUL, which a model may emit (byte 0x00):
    done here, where all text leaves the engine, so every reply and signal is sendable."""
    return text.replace("\x00", "\ufffd")


def _set_result(fut: asyncio.Future[JobResult] | None, result: JobResult) -> None:
    if fut is not None and not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[JobResult] | None, error: Exception) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(error)

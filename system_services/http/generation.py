"""Running a request's job for an HTTP client: through the daemon's own entry point, cancelled when the
client goes away.

`Daemon.run_for_caller` is what D-Bus Generate and Prompt use: the job is owned by the connection's key
like a call is owned by a unique name, so the connection closing (`ownership.owner_left`, as for a
D-Bus client leaving the bus) cancels whatever is still running. While the job runs, the connection is
watched: a client that closes its end cancels its generation at the next token, not at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from system_services.engine_worker import Job, JobResult
from system_services.http.exchange import Exchange

GONE = "the HTTP client disconnected"


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


async def run(ex: Exchange, job: Job, emit: Callable[[str], Awaitable[None]] | None = None) -> JobResult:
    """The job's result; with `emit`, each text delta is written as it comes (the client's pace sets the
    stream's: `emit` waits for the socket)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    job.auto_prefix = True  # HTTP clients resend their conversation: reuse their own earlier KV
    if emit is not None:
        job.on_delta = queue.put_nowait
    gen = asyncio.ensure_future(ex.daemon.run_for_caller(job, ex.owner))
    watch = asyncio.ensure_future(ex.conn.wait_closed())
    get: asyncio.Future[str] | None = None
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({gen, watch, get}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                assert emit is not None
                await emit(get.result())
                continue
            if watch in done:
                raise ClientGone
            while emit is not None and not queue.empty():
                await emit(queue.get_nowait())
            return gen.result()
    except (ClientGone, ConnectionError):
        ex.daemon.worker.cancel(job, GONE)
        gen.cancel()
        raise ClientGone from None
    finally:
        watch.cancel()
        if get is not None:
            get.cancel()
        if not gen.done():
            ex.daemon.worker.cancel(job, GONE)

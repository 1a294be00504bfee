"""llmosd: host one model and serve it on D-Bus as org.llmos.LLM1.

Start-up: configuration, then the model (loaded and warmed up before the name is taken, so READY means
"answers now"), then the bus: the send-buffer guard, caller tracking, the objects, the watch on owners
leaving, the name, READY=1. Inference runs on the arbiter's own thread; the event loop only routes
messages, pings the watchdog and runs the periodic jobs (idle unload, memory pressure). SIGTERM cancels
every request in flight (their callers get org.llmos.Error.Cancelled), sends STOPPING=1 and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import os
import shutil
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from dbus_fast import BusType, DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag, RequestNameReply

from agents.catalog import AgentCatalog
from agents.tool_format import tool_format_for
from agents.tools import Tool, ToolRegistry
from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import Account, AppPolicy, Priority
from llmos.arbiter.pressure import PressureMonitor
from llmos.arbiter.swap_store import SwapStore
from llmos.chat_template import ChatTemplate
from llmos.engine.llm_engine import LLMEngine, Prompt, encode_prompt
from llmos.engine.memory import release_free_heap
from llmos.errors import LlmosError
from llmos.input_bounds import InputBounds
from llmos.log_limit import LimitedLog
from llmos.manifest import ModelManifest
from llmos.model_store import ModelStore
from llmos.paths import SYSTEM_MODEL_DIR, state_dir
from llmos.tokenizer import Tokenizer
from system_services.agent_object import PATH as AGENT_PATH
from system_services.agent_object import AgentObject
from system_services.bus_driver import driver_call
from system_services.caller import Caller, identify, install_caller_tracking
from system_services.config import ConfigError, DaemonConfig
from system_services.dbus_errors import error, to_dbus_error
from system_services.engine_worker import EngineWorker, Job, JobResult
from system_services.http.routes import ROUTES as HTTP_ROUTES
from system_services.http.server import start_endpoint
from system_services.llm_object import PATH, LLMObject
from system_services.notify import sd_notify, watchdog_interval
from system_services.options import RequestOptions
from system_services.ownership import Ownership
from system_services.private_bus import PrivateObjectsBus
from system_services.scheduled_agents import ScheduledAgents
from system_services.send_guard import guard_send_buffer
from system_services.session_object import SessionObject
from system_services.system_tools import SYSTEM_TOOL_NAMES, SystemTools

BUS_NAME = "org.llmos.LLM1"
TRIM_AFTER_BYTES = 1 << 20  # texts this big are rare; the heap is trimmed after them
log = logging.getLogger("llmosd")


class SystemToolDeniedError(LlmosError):
    dbus_name = "AccessDenied"


class CallInFlight:
    """A running Generate or Prompt call, owned like an object so that its caller leaving cancels it."""

    _ids = itertools.count(1)

    def __init__(self, worker: EngineWorker, job: Job, owner: str) -> None:
        self.worker, self.job, self.owner = worker, job, owner
        self.path = f"call:{next(self._ids)}"  # not a D-Bus object; a key in the ownership table

    def close(self, why: str, owner_gone: bool = True) -> None:
        self.worker.cancel(self.job, why)


@dataclass(frozen=True)
class ServedModel:
    """What the service tells about its model even while the model is unloaded."""

    manifest: ModelManifest
    tokenizer: Tokenizer  # kept loaded (a few MB): CountTokens answers without loading the model
    context_length: int
    chat_template: ChatTemplate | None = None  # renders agent prompts with tools in the model's format


class Daemon:
    """What the D-Bus objects share: the bus, the arbiter's worker, the model, sessions and owners."""

    def __init__(
        self,
        config: DaemonConfig,
        arbiter: Arbiter,
        model: ServedModel,
        bus: MessageBus,
        *,
        config_path: Path | None = None,
        store_root: Path | None = None,
        on_system_bus: bool = False,
    ) -> None:
        self.config, self.arbiter, self.model, self.bus = config, arbiter, model, bus
        self.config_path, self.store_root, self.on_system_bus = config_path, store_root, on_system_bus
        self.worker = EngineWorker(arbiter, asyncio.get_running_loop(), encode=self.encode_prompt)
        # what any text from a caller or a tool may be, checked before any work on it
        self.bounds = InputBounds(model.context_length, model.tokenizer.max_token_bytes)
        self.ownership = Ownership()
        self.sessions: dict[str, SessionObject] = {}
        self.tools = ToolRegistry()  # tools apps provide, by provider connection
        self.system_tools = SystemTools(bus, on_system_bus=on_system_bus)  # time, battery, notifications
        self.agents = AgentCatalog.discover()  # built-in agents and plugins
        self.tool_format = tool_format_for(model.chat_template)  # the model's own tool calls, if any
        self.scheduled: ScheduledAgents | None = None  # set once the state directory is known
        self.stopping = False
        self._callers: dict[str, Caller] = {}  # unique name -> identity, while it is on the bus
        self._trim_pending = False
        self._started = time.monotonic()

    @property
    def state(self) -> str:
        return "stopping" if self.stopping else self.arbiter.state

    def uptime(self) -> float:
        return time.monotonic() - self._started

    async def caller(self, sender: str) -> Caller:
        """The sender's identity, asked of the bus once per connection."""
        known = self._callers.get(sender)
        if known is None:
            known = self._callers[sender] = await identify(self.bus, sender)
        return known

    @staticmethod
    def sees_apps(viewer: Caller) -> bool:
        """Which apps use the model, and how much, is private: per-app figures are for root and the
        daemon's own user (on the session bus: the user whose apps they all are). An app id is not per
        user (two users' copies of one app share it), so there is no "own row" to show anyone else."""
        return viewer.uid in (0, os.getuid())

    def policy(self, app_id: str) -> AppPolicy:
        return self.config.policies.for_app(app_id)

    def connections_of(self, uid: int | None, app_id: str) -> list[Caller]:
        """The app's connections on the bus that have called the daemon (an app id is per user)."""
        return [c for c in self._callers.values() if c.uid == uid and c.app_id == app_id]

    def allowed_system_tools(self, app_id: str) -> list[str]:
        allowed = self.policy(app_id).system_tools
        return list(SYSTEM_TOOL_NAMES if allowed is None else allowed)

    def check_system_tools(self, app_id: str, wanted: list[str] | None) -> None:
        """A run (now or scheduled) may ask only for system tools its app's policy allows."""
        if denied := sorted(set(wanted or ()) - set(self.allowed_system_tools(app_id))):
            raise SystemToolDeniedError(f"the policy for {app_id} does not allow {', '.join(denied)}")

    async def usable_tools(
        self, runners: set[str], app_id: str, uid: int | None, system: list[str] | None = None
    ) -> list[Tool]:
        """What a run of user `uid`'s app may call: the runners' own tools, the same user's other
        connections' shared ones, then the system tools its app's policy allows (narrowed to `system`
        if given) that are available now."""
        tools = self.tools.usable_by(runners, uid)
        names = {t.name for t in tools}
        wanted = [n for n in self.allowed_system_tools(app_id) if system is None or n in system]
        return tools + [t for t in await self.system_tools.usable(wanted) if t.name not in names]

    def priority(self, app_id: str, requested: str) -> Priority:
        """The class a request runs at: what it asks for, capped by its app's policy."""
        return min(Priority.parse(requested), self.policy(app_id).priority_cap)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt with the served model's tokenizer and template (loaded or not)."""
        return encode_prompt(self.model.tokenizer, self.model.chat_template, prompt)

    def check_text(self, text: str, what: str) -> int:
        """`text`'s size if it may fit the context, else org.llmos.Error.ContextOverflow (InvalidArgument
        over the hard cap) naming the limit: before any work proportional to its size."""
        self.trim_after(len(text))
        try:
            return self.bounds.check_text(text, what)
        except LlmosError as e:
            raise to_dbus_error(e) from None

    def trim_after(self, size: int) -> None:
        """A big message leaves memory behind: its text, held by reference cycles (an error's traceback
        holds the frame that holds the text) until Python's cycle collector happens to run, and freed
        heap that glibc keeps in RSS. Collect and give it back once the call is answered, at most once
        a second (a collection takes ~20 ms on the event loop)."""
        if size < TRIM_AFTER_BYTES or self._trim_pending:
            return
        self._trim_pending = True

        def trim() -> None:
            self._trim_pending = False
            gc.collect()
            release_free_heap()

        asyncio.get_running_loop().call_later(1.0, trim)

    def job(
        self, prompt: Prompt, opts: RequestOptions, account: Account, session_key: str | None = None
    ) -> Job:
        """A request for the worker, its prompt bounded by size first (a named error if it cannot fit)."""
        try:
            if isinstance(prompt, str):
                self.trim_after(len(prompt))
                size = self.bounds.check_text(prompt, "the prompt")
            elif all(isinstance(m, dict) for m in prompt):
                size = self.bounds.check_messages(prompt)  # type: ignore[arg-type]
            else:  # token ids: the daemon's own
                size = 0
        except LlmosError as e:
            raise to_dbus_error(e) from None
        app_id, uid = account
        return Job(
            prompt_bytes=size,
            prompt=prompt,
            params=opts.params,
            app_id=app_id,
            uid=uid,
            priority=self.priority(app_id, opts.priority),
            policy=self.policy(app_id),
            session_key=session_key,
            json_schema=opts.json_schema,
            grammar=opts.grammar,
        )

    def check_session_quota(self, owner: str, account: Account | None = None) -> None:
        """Sessions per connection, and per account: an app's limit counts that user's sessions only
        (another user running the same app has a limit of their own)."""
        limit = self.config.limits.sessions_per_connection
        if self.ownership.count(owner, SessionObject) >= limit:
            raise error("QuotaExceeded", f"this connection already has {limit} sessions; close one first")
        if account is not None:
            app_id, uid = account
            most = self.policy(app_id).max_sessions
            if sum(1 for s in self.sessions.values() if s.account == account) >= most:
                raise error(
                    "QuotaExceeded",
                    f"{app_id} already has {most} sessions open for uid {uid}; close one first",
                )

    def add_session(self, session: SessionObject) -> None:
        self.bus.export(session.path, session)
        self.sessions[session.path] = session
        self.ownership.add(session)

    def remove_session(self, session: SessionObject) -> None:
        self.sessions.pop(session.path, None)
        self.ownership.remove(session)
        self.bus.unexport(session.path, session)
        self.worker.drop_session(session.path)

    async def run_for_caller(self, job: Job, owner: str) -> JobResult:
        """Run a job for a method call; if the caller leaves the bus meanwhile, the job is cancelled."""
        call = CallInFlight(self.worker, job, owner)
        self.ownership.add(call)
        try:
            return await self.worker.submit(job)
        finally:
            self.ownership.remove(call)

    def watch_owners(self) -> None:
        """Close the objects of connections that leave the bus (NameOwnerChanged with no new owner)."""

        def on_message(msg: Message) -> None:
            if (
                msg.message_type == MessageType.SIGNAL
                and msg.member == "NameOwnerChanged"
                and msg.sender == "org.freedesktop.DBus"
                and len(msg.body) == 3
            ):
                name, _old, new = msg.body
                if name.startswith(":") and not new:
                    self.ownership.owner_left(name)
                    self._callers.pop(name, None)
                    if gone := self.tools.unregister(name):
                        log.info("%s left the bus: %d tool(s) unregistered", name, gone)
            return None

        self.bus.add_message_handler(on_message)


def build_parser() -> argparse.ArgumentParser:
    """llmosd's command line (also read by scripts/gen_cli_docs.py for its man page)."""
    p = argparse.ArgumentParser(
        prog="llmosd", description="Serve the llmos model on D-Bus as org.llmos.LLM1."
    )
    p.add_argument("--version", action="version", version=f"llmosd {_version()}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--system", action="store_true", help="the system bus (the default under systemd)")
    where.add_argument("--session", action="store_true", help="the session bus (development)")
    where.add_argument("--address", help="a specific bus address, e.g. unix:path=/tmp/bus")
    p.add_argument(
        "--config", type=Path, help="configuration file (default /etc/llmos/llmosd.toml if present)"
    )
    p.add_argument("--model", help="model name or directory (default: the store's default model)")
    p.add_argument("--store", type=Path, help="model store root")
    p.add_argument("--threads", type=int, help="CPU threads for inference (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmos")
    except PackageNotFoundError:  # a source tree that was never installed
        return "(not installed)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def store_root_for(args: argparse.Namespace, config: DaemonConfig) -> Path | None:
    return args.store or config.engine.model_dir or (SYSTEM_MODEL_DIR if args.system else None)


def make_arbiter(args: argparse.Namespace, config: DaemonConfig) -> Arbiter:
    """The arbiter, with a loader for the configured model and a swap store under the state dir."""
    ec = config.engine
    model_dir = ModelStore(store_root_for(args, config)).resolve(args.model or ec.model)
    manifest = ModelManifest.read(model_dir)

    def load() -> LLMEngine:
        log.info("loading %s", model_dir)
        t0 = time.monotonic()
        engine = LLMEngine(
            model_dir,
            threads=args.threads if args.threads is not None else ec.threads,
            max_batch=ec.max_batch,
            max_context=ec.context_length,
            prefill_chunk=ec.prefill_chunk,
            providers=tuple(ec.providers),
        )
        log.info("model loaded in %.1f s on %s", time.monotonic() - t0, engine.runner.provider)
        return engine

    root = config.arbiter.swap_dir or (config.state_dir or state_dir(system=bool(args.system))) / "swap"
    try:
        mine = claim_swap_dir(root)
    except OSError as e:
        raise ConfigError(
            f"cannot use {root} for swapped KV caches ({e.strerror}); set state_dir or [arbiter] swap_dir "
            "in the configuration, or run under systemd (StateDirectory=)"
        ) from None
    swap = SwapStore(mine, model_key=f"{manifest.source_sha256}:{manifest.precision}")
    return Arbiter(load, config.arbiter, swap)


def claim_swap_dir(root: Path) -> Path:
    """This daemon's own swap directory, <root>/<pid>. Swapped KV belongs to sessions, which end with
    the daemon, so directories of daemons no longer running are removed (several daemons of one user,
    e.g. on two buses, each keep their own)."""
    root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the state dir: private
    root.mkdir(exist_ok=True, mode=0o700)
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and not Path(f"/proc/{d.name}").exists():
            shutil.rmtree(d, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    return mine


async def serve(args: argparse.Namespace, config: DaemonConfig) -> int:
    arbiter = await asyncio.to_thread(make_arbiter, args, config)
    engine = await asyncio.to_thread(arbiter.load)
    model = ServedModel(engine.manifest, engine.tokenizer, engine.context_length, engine.chat_template)
    del engine  # the arbiter alone holds the engine, so an idle unload really frees it
    bus_type = BusType.SYSTEM if args.system else BusType.SESSION
    bus = await PrivateObjectsBus(bus_type=bus_type, bus_address=args.address).connect()
    guard_send_buffer(bus)
    install_caller_tracking(bus)
    daemon = Daemon(
        config,
        arbiter,
        model,
        bus,
        config_path=args.config,
        store_root=store_root_for(args, config),
        on_system_bus=bool(args.system),
    )
    bus.export(PATH, LLMObject(daemon))
    bus.export(AGENT_PATH, AgentObject(daemon))
    state = config.state_dir or state_dir(system=bool(args.system))
    try:
        daemon.scheduled = ScheduledAgents(daemon, state / "jobs" / "jobs.sqlite")
    except (OSError, sqlite3.Error) as e:
        log.error("cannot open the scheduled jobs in %s: %s", state / "jobs" / "jobs.sqlite", e)
        daemon.worker.stop()
        bus.disconnect()
        return 1
    daemon.watch_owners()
    await bus.call(
        driver_call(
            "AddMatch", "s", ["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"]
        )
    )
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as e:  # the bus policy does not let this user own the name
        log.error(
            "not allowed to own %s on this bus: %s (on the system bus llmosd runs as the llmos user)",
            BUS_NAME,
            e.text,
        )
        daemon.worker.stop()
        bus.disconnect()
        return 1
    if reply != RequestNameReply.PRIMARY_OWNER:
        log.error("%s is already owned on this bus (another llmosd?)", BUS_NAME)
        daemon.worker.stop()
        bus.disconnect()
        return 1
    http = await start_endpoint(daemon, bool(args.system), HTTP_ROUTES)
    log.info(
        "serving %s (%s, %s) as %s",
        model.manifest.name,
        model.manifest.precision,
        arbiter.device,
        BUS_NAME,
    )
    daemon.scheduled.start()  # after the name: a job that came due while the daemon was down runs now
    sd_notify("READY=1")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pinger = loop.create_task(_watchdog(watchdog_interval() or config.watchdog_interval_s))
    jobs = start_periodic_jobs(daemon)
    await stop.wait()

    log.info("stopping: cancelling %d request(s) in flight", daemon.worker.active_jobs())
    sd_notify("STOPPING=1")
    daemon.stopping = True
    if http is not None:
        await http.stop()
    jobs.shutdown(wait=False)
    daemon.scheduled.stop_firing()
    await asyncio.to_thread(daemon.worker.stop)
    await daemon.scheduled.close()  # after the worker: runs it cancelled are recorded as such
    if daemon.arbiter.kv.swap is not None:  # conversations end with the daemon: so does their KV
        shutil.rmtree(daemon.arbiter.kv.swap.root, ignore_errors=True)
    await asyncio.sleep(0.2)  # let the Cancelled replies and Response signals go out
    pinger.cancel()
    await daemon.system_tools.close()
    bus.disconnect()
    return 0


def start_periodic_jobs(daemon: Daemon) -> AsyncIOScheduler:
    """Residency and memory pressure, as apscheduler jobs on the event loop; the work itself runs on
    the arbiter's thread between steps. The memory check also retries swap writes that failed, so KV
    left over the budget by a full disk goes out once space is freed, even with no request coming."""
    cfg = daemon.config.arbiter
    jobs = AsyncIOScheduler()
    if cfg.idle_unload_s > 0:

        def unload_if_idle_now() -> bool:  # on the arbiter's thread, so "idle" cannot change meanwhile
            arb = daemon.arbiter
            return arb.engine is not None and arb.idle_for() >= cfg.idle_unload_s and arb.unload()

        async def unload_if_idle() -> None:
            if await daemon.worker.call(unload_if_idle_now):
                log.info("model unloaded after %.0f s idle; the next request reloads it", cfg.idle_unload_s)

        jobs.add_job(unload_if_idle, "interval", seconds=min(30.0, max(cfg.idle_unload_s / 4, 0.25)))
    if cfg.pressure_check_s == 0:
        jobs.start()
        return jobs
    monitor = PressureMonitor(cfg.memory_pressure_pct)
    if not monitor.available and cfg.memory_pressure_pct > 0:
        log.warning("no memory pressure information (no /proc/pressure/memory, no cgroup memory.events)")

    limited = LimitedLog(log)

    async def relieve_pressure() -> None:
        try:
            if monitor.check():
                n = await daemon.worker.call(daemon.arbiter.swap_out_idle)
                if n:
                    log.info(
                        "memory pressure (%s): %d idle session KV cache(s) swapped to disk", monitor.last, n
                    )
            elif daemon.worker.snapshot().get("kv_over_budget_bytes"):
                # swap writes failed and no request has ended since: space may have been freed meanwhile
                await daemon.worker.call(daemon.arbiter.retry_swap_out)
        except Exception as e:  # apscheduler would log a traceback at every check
            limited.failed("memory checks", e, exc_info=True)
        else:
            limited.recovered("memory checks")

    jobs.add_job(relieve_pressure, "interval", seconds=cfg.pressure_check_s)
    jobs.start()
    return jobs


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # apscheduler logs every job run at INFO and a skipped overlapping run at WARNING; llmosd logs its
    # own job runs, so only its errors are worth showing
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        config = DaemonConfig.load(args.config)
        return asyncio.run(serve(args, config))
    except LlmosError as e:
        log.error("%s", e)
        return 1
    except OSError as e:  # the bus is not there, a socket path is wrong, ...
        log.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())

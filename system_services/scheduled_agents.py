"""Scheduled agent runs: an app asks for an agent to run on a trigger (cron, interval or date), the
daemon runs it at background priority, keeps the results for the app, and tells the app if it is on the
bus.

Jobs belong to their app (uid and app id, not a connection, so they outlive it and the daemon): only
that app lists, reads or cancels them. apscheduler times the runs from a SQLite job store under the state
directory (job_store.py); this module keeps its own two tables in the same file: what each job is and
the results of its last runs. A run missed while the daemon was down runs once when it is back
(coalesced, no misfire limit): a morning summary at 8:00 is still wanted at 8:20.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from dbus_fast import Variant

from agents.agent_loop import Step
from agents.tool_format import MAX_OBSERVATION_CHARS, result_text
from llmos.errors import LlmosError
from system_services.agent_object import IFACE as AGENT_IFACE
from system_services.agent_object import PATH as AGENT_PATH
from system_services.agent_run import RESULT_CANCELLED, RUN_KEYS, AgentRun, RunOutcome, parse_run_options
from system_services.caller import Caller
from system_services.dbus_errors import to_dbus_error
from system_services.job_book import JobBook
from system_services.job_store import SQLiteJobStore
from system_services.request_object import send_unicast

log = logging.getLogger("llmosd")
TRIGGER_KEYS = {"cron": "s", "interval": "u", "date": "s", "timezone": "s"}
LAST_YEAR = 9000  # apscheduler's times go through UTC: a date near 9999 overflows there
MAX_INPUT_CHARS = 256 * 1024


class ScheduleError(LlmosError):
    dbus_name = "InvalidArgument"


class JobNotFoundError(LlmosError):
    dbus_name = "NotFound"


class JobQuotaError(LlmosError):
    dbus_name = "QuotaExceeded"


def parse_trigger(raw: dict[str, Variant], min_interval_s: int) -> tuple[BaseTrigger, dict[str, Any]]:
    """The trigger an app asked for (exactly one of cron, interval, date; optional timezone), and its
    JSON description for ListJobs."""
    for key, var in raw.items():
        if key not in TRIGGER_KEYS:
            raise ScheduleError(f"unknown trigger key {key!r} (one of cron, interval, date; and timezone)")
        if var.signature != TRIGGER_KEYS[key]:
            raise ScheduleError(f"trigger {key!r} must be of D-Bus type {TRIGGER_KEYS[key]!r}")
    kinds = [k for k in ("cron", "interval", "date") if k in raw]
    if len(kinds) != 1:
        raise ScheduleError("a trigger has exactly one of cron (s), interval (u, seconds) and date (s)")
    kind, value = kinds[0], raw[kinds[0]].value
    tz = None
    if "timezone" in raw:
        try:
            tz = ZoneInfo(raw["timezone"].value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown time zone {raw['timezone'].value!r}") from None
    described: dict[str, Any] = {kind: value} | ({"timezone": str(tz)} if tz else {})
    trigger: BaseTrigger
    if kind == "cron":
        fields = value.split()
        if len(fields) != 5:
            raise ScheduleError(f"cron {value!r}: five fields are needed: minute hour day month weekday")
        minute, hour, day, month, weekday = fields
        try:
            trigger = CronTrigger(
                minute=minute,
                hour=hour,
                day=day,
                month=month,
                day_of_week=cron_weekdays(weekday),
                timezone=tz,
            )
        except ValueError as e:
            raise ScheduleError(f"cron {value!r}: {e} (five fields: minute hour day month weekday)") from None
    elif kind == "interval":
        if value < min_interval_s:
            raise ScheduleError(f"interval {value} s is under this daemon's minimum of {min_interval_s} s")
        trigger = IntervalTrigger(seconds=value, timezone=tz)
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ScheduleError(f"date {value!r} is not ISO 8601 (e.g. 2026-11-22T08:00:00+01:00)") from None
        try:
            if when.tzinfo is None:  # naive: the zone given, else local time
                when = when.replace(tzinfo=tz) if tz else when.astimezone()
            when.astimezone(UTC)
        except (ValueError, OverflowError):
            raise ScheduleError(f"date {value!r} is out of range") from None
        if when <= datetime.now(UTC):
            raise ScheduleError(f"date {value!r} is in the past")
        described["date"] = when.isoformat()
        trigger = DateTrigger(run_date=when)
    try:
        first = trigger.get_next_fire_time(None, datetime.now(UTC))
    except (ValueError, OverflowError):  # e.g. beyond the year 9999 in UTC
        first = None
    if first is None or first.year >= LAST_YEAR:
        raise ScheduleError(f"this trigger never fires (before the year {LAST_YEAR})")
    return trigger, described


def cron_weekdays(field: str) -> str:
    """A crontab weekday field in apscheduler's terms: crontab counts 0 (or 7) = Sunday to 6 = Saturday,
    apscheduler 0 = Monday; numbers become the names both read alike (mon, tue, ...); names, `*` and
    `?` stay as they are."""
    names = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
    out = []
    for item in field.split(","):
        spec, _, step = item.partition("/")
        if spec in ("*", "?") and not step:
            out.append("*")
            continue
        if not all(p.isdigit() for p in spec.replace("*", "0-6").split("-")):
            out.append(item)  # names: apscheduler checks them
            continue
        lo, _, hi = spec.replace("*", "0-6").partition("-")
        first, last = int(lo), int(hi or lo)
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last) or (step and not step.isdigit()):
            raise ValueError(f"weekday {item!r}: 0-7 (0 and 7 are Sunday), names, ranges and steps")
        days = range(first, last + 1, int(step) if step else 1) if step or hi else [first]
        out.extend(names[d % 7] for d in days)
    return ",".join(dict.fromkeys(out))


def open_scheduler(path: Path) -> tuple[AsyncIOScheduler, JobBook]:
    """apscheduler with the SQLite job store, and the job book, both in `path` (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600, exist_ok=True)
    book = JobBook(path)
    scheduler = AsyncIOScheduler(
        jobstores={"default": SQLiteJobStore(path)},
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
    )
    return scheduler, book


# -- the service ----------------------------------------------------------------------------------------
_active: ScheduledAgents | None = None  # the daemon's, for run_job (apscheduler stores a textual reference)


async def run_job(job_id: str) -> None:
    """What apscheduler calls when a job fires (stored as "system_services.scheduled_agents:run_job")."""
    if _active is not None:
        await _active.run(job_id)


class ScheduledAgents:
    def __init__(self, daemon: Any, path: Path) -> None:
        self.daemon, self.path = daemon, path
        self.scheduler, self.book = open_scheduler(path)
        self._running: dict[str, asyncio.Task[Any]] = {}  # job id -> its run in flight
        self._stopping = False

    def start(self) -> None:
        global _active
        _active = self
        self.scheduler.start()  # runs what came due while the daemon was down (coalesced)

    def stop_firing(self) -> None:
        """Start no more runs (the daemon is stopping); runs in flight end when the worker stops."""
        self._stopping = True
        self.scheduler.shutdown(wait=False)

    async def close(self, timeout: float = 5.0) -> None:
        """After the worker has stopped: let the runs it cancelled record that ("the daemon is
        stopping", so the app learns a one-off job did not complete), then close the book."""
        global _active
        for task in self._running.values():  # a run waiting on a tool (up to 20 s) stops now
            task.cancel("the daemon stopped during the run")
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout)
        self.book.close()
        _active = None

    @property
    def config(self) -> Any:  # JobsConfig; read each time: ReloadConfig applies at once
        return self.daemon.config.jobs

    # -- what apps ask ---------------------------------------------------------------------------------
    def schedule(
        self, caller: Caller, agent: str, text: str, trigger: dict[str, Variant], options: dict[str, Variant]
    ) -> str:
        if not text.strip():
            raise ScheduleError("the input is empty")
        if len(text) > MAX_INPUT_CHARS:
            raise ScheduleError(f"the input is over {MAX_INPUT_CHARS} characters")
        self.daemon.agents.get(agent)  # UnknownAgentError (NotFound) now, not at the first run
        trig, described = parse_trigger(trigger, self.config.min_interval_s)
        settings = parse_run_options(options, self.daemon.config.limits, scheduled=True)  # kept as JSON
        self.daemon.check_system_tools(caller.app_id, settings.system_tools)
        if len(self.book.owned(caller.uid, caller.app_id)) >= self.config.max_per_app:
            raise JobQuotaError(f"{caller.app_id} already has {self.config.max_per_app} scheduled jobs")
        plain = {k: v.value for k, v in options.items()}
        job_id = self.book.add(caller.uid, caller.app_id, agent, text, described, plain)
        try:
            self.scheduler.add_job(run_job, trig, args=[job_id], id=job_id, name=f"{caller.app_id}: {agent}")
        except Exception:
            self.book.remove(job_id)  # nothing half-made
            raise
        log.info("%s scheduled %s (%s) as %s", caller.app_id, agent, described, job_id)
        return job_id

    def list(self, caller: Caller) -> list[dict[str, Any]]:
        out = []
        for row in self.book.owned(caller.uid, caller.app_id):
            job = self.scheduler.get_job(row["id"])
            kept, last = self.book.summary(row["id"])
            out.append(
                {
                    "id": row["id"],
                    "agent": row["agent"],
                    "input": row["input"],
                    "trigger": json.loads(row["trigger"]),
                    "options": json.loads(row["options"]),
                    "created": row["created"],
                    "next_run": job.next_run_time.isoformat() if job and job.next_run_time else None,
                    "runs_kept": kept,
                    "last": last,
                }
            )
        return out

    def results(self, caller: Caller, job_id: str) -> list[dict[str, Any]]:
        self._owned(caller, job_id)
        return self.book.results(job_id)

    def cancel(self, caller: Caller, job_id: str) -> None:
        self._owned(caller, job_id)
        if (running := self._running.get(job_id)) is not None:  # no more tool calls after this returns
            running.cancel("the job was cancelled")
        if self.scheduler.get_job(job_id) is not None:
            self.scheduler.remove_job(job_id)
        self.book.remove(job_id)
        log.info("%s cancelled job %s", caller.app_id, job_id)

    def _owned(self, caller: Caller, job_id: str) -> sqlite3.Row:
        row = self.book.get(job_id)
        if row is None or row["app_id"] != caller.app_id or row["uid"] != caller.uid:
            raise JobNotFoundError(f"no job {job_id!r} of {caller.app_id}")  # another app's is not told
        return row

    # -- a run -------------------------------------------------------------------------------------------
    async def run(self, job_id: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running[job_id] = task  # max_instances=1: one run per job at a time
        try:
            await self._run(job_id)
        except asyncio.CancelledError:
            pass  # CancelJob or the daemon stopping, before the run began: nothing to record
        finally:
            self._running.pop(job_id, None)

    async def _run(self, job_id: str) -> None:
        row = self.book.get(job_id)
        if row is None:
            return  # cancelled between firing and now
        d = self.daemon
        steps: list[dict[str, Any]] = []
        connections = {c.unique_name for c in d.connections_of(row["uid"], row["app_id"])}
        try:
            agent = d.agents.get(row["agent"])
            variants = {k: _variant(k, v) for k, v in json.loads(row["options"]).items()}
            settings = parse_run_options(variants, d.config.limits, scheduled=True)
            settings.request = replace(settings.request, priority="background")
            tools = agent.select_tools(
                await d.usable_tools(connections, row["app_id"], row["uid"], settings.system_tools)
            )
        except Exception as e:  # the agent uninstalled, a tool gone, the limits lowered since: said
            err = to_dbus_error(e)
            outcome = RunOutcome.failed(0, err.type, err.text)
        else:
            run = AgentRun(
                d, agent, row["input"], tools, settings, app_id=row["app_id"], uid=row["uid"], owner=None
            )
            outcome = await run.execute(lambda step: steps.append(kept_step(step)))
        if self.book.get(job_id) is None:
            return  # cancelled while it ran: nothing to keep
        if outcome.code == RESULT_CANCELLED and self._stopping:
            outcome.error_message = "the daemon stopped during the run"
        ran_at = self.book.add_result(job_id, outcome.to_dict(), steps, self.config.results_kept)
        log.info("job %s (%s) ran: code %d", job_id, row["agent"], outcome.code)
        body = json.dumps({"ran_at": ran_at, **outcome.to_dict()})
        for c in d.connections_of(row["uid"], row["app_id"]):  # those that are on the bus now
            send_unicast(
                d.bus,
                c.unique_name,
                AGENT_PATH,
                AGENT_IFACE,
                "JobFinished",
                "sus",
                [job_id, outcome.code, body],
            )


def kept_step(step: Step) -> dict[str, Any]:
    """A step as the job book keeps it: a long tool result cut, with a note, as the model saw it."""
    d = json.loads(step.to_json())
    if "observation" in d and len(json.dumps(d["observation"])) > MAX_OBSERVATION_CHARS:
        d["observation"] = {"cut": result_text(d["observation"])}
    return d


def _variant(key: str, value: Any) -> Variant:
    """Back to D-Bus types for the option checks (options are kept as plain JSON values)."""
    if key in RUN_KEYS:
        return Variant(RUN_KEYS[key], value)
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, list):
        return Variant("as", value)
    return Variant("s", value)

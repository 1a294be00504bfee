"""apscheduler's job store on SQLite, as JSON: scheduled agent runs survive a daemon restart.

apscheduler's own SQL store needs SQLAlchemy and pickles each job. This one uses the standard library's
sqlite3 and stores a job as readable JSON: its callable by textual reference, JSON arguments, and its
trigger by type (date, interval or cron, with their time zone). Nothing is unpickled from disk, and an
administrator can read the file with `sqlite3`. A row that no longer decodes (edited by hand, written by a
newer llmos) is logged and left alone, never fatal.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

FORMAT = 1
log = logging.getLogger("llmosd")


class JobEncodingError(ValueError):
    """A job this store cannot write (a callable without a textual reference, arguments not JSON)."""


class SQLiteJobStore(BaseJobStore):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement durable
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS apscheduler_jobs "
            "(id TEXT PRIMARY KEY, next_run_time REAL, job TEXT NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS by_next_run ON apscheduler_jobs (next_run_time)")

    # -- BaseJobStore --------------------------------------------------------------------------------
    def lookup_job(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT id, job FROM apscheduler_jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(*row) if row else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs("WHERE next_run_time <= ?", (now.timestamp(),))

    def get_next_run_time(self) -> datetime | None:
        row = self.db.execute(
            "SELECT MIN(next_run_time) FROM apscheduler_jobs WHERE next_run_time IS NOT NULL"
        ).fetchone()
        return datetime.fromtimestamp(row[0], UTC) if row and row[0] is not None else None

    def get_all_jobs(self) -> list[Job]:
        jobs = self._jobs()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def add_job(self, job: Job) -> None:
        try:
            self.db.execute(
                "INSERT INTO apscheduler_jobs VALUES (?, ?, ?)", (job.id, _stamp(job), encode_job(job))
            )
        except sqlite3.IntegrityError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        cur = self.db.execute(
            "UPDATE apscheduler_jobs SET next_run_time = ?, job = ? WHERE id = ?",
            (_stamp(job), encode_job(job), job.id),
        )
        if cur.rowcount == 0:
            raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        if self.db.execute("DELETE FROM apscheduler_jobs WHERE id = ?", (job_id,)).rowcount == 0:
            raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        self.db.execute("DELETE FROM apscheduler_jobs")

    def shutdown(self) -> None:
        self.db.close()

    # -- rows ----------------------------------------------------------------------------------------
    def _jobs(self, where: str = "", params: tuple[Any, ...] = ()) -> list[Job]:
        rows = self.db.execute(f"SELECT id, job FROM apscheduler_jobs {where} ORDER BY next_run_time", params)
        return [job for job in (self._job(*row) for row in rows) if job is not None]

    def _job(self, job_id: str, text: str) -> Job | None:
        try:
            state = decode_job(text)
        except (ValueError, KeyError, TypeError, ImportError, LookupError) as e:
            # left in the file for whoever can read it (a newer llmos), but no longer due: the scheduler
            # would otherwise wake for it again at once, for ever
            self.db.execute("UPDATE apscheduler_jobs SET next_run_time = NULL WHERE id = ?", (job_id,))
            log.error("scheduled job %s in %s cannot be read (%s); it is set aside", job_id, self.path, e)
            return None
        job = Job.__new__(Job)
        job.__setstate__({**state, "jobstore": self})
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job


def _stamp(job: Job) -> float | None:
    return job.next_run_time.timestamp() if job.next_run_time else None


# -- JSON forms -----------------------------------------------------------------------------------------
def encode_job(job: Job) -> str:
    if not job.func_ref:
        raise JobEncodingError(f"job {job.id}: its callable has no textual reference (module:function)")
    state = {
        "format": FORMAT,
        "id": job.id,
        "func": job.func_ref,
        "trigger": encode_trigger(job.trigger),
        "executor": job.executor,
        "args": list(job.args),
        "kwargs": job.kwargs,
        "name": job.name,
        "misfire_grace_time": job.misfire_grace_time,
        "coalesce": job.coalesce,
        "max_instances": job.max_instances,
        "next_run_time": job.next_run_time.isoformat() if job.next_run_time else None,
    }
    try:
        return json.dumps(state)
    except TypeError as e:
        raise JobEncodingError(f"job {job.id}: arguments must be JSON ({e})") from None


def decode_job(text: str) -> dict[str, Any]:
    state = json.loads(text)
    if state.get("format") != FORMAT:
        raise ValueError(f"job format {state.get('format')!r}, this llmos reads {FORMAT}")
    nxt = state["next_run_time"]
    return {
        "version": 1,
        "id": state["id"],
        "func": state["func"],
        "trigger": decode_trigger(state["trigger"]),
        "executor": state["executor"],
        "args": tuple(state["args"]),
        "kwargs": state["kwargs"],
        "name": state["name"],
        "misfire_grace_time": state["misfire_grace_time"],
        "coalesce": state["coalesce"],
        "max_instances": state["max_instances"],
        "next_run_time": datetime.fromisoformat(nxt) if nxt else None,
    }


def encode_trigger(trigger: BaseTrigger) -> dict[str, Any]:
    if isinstance(trigger, DateTrigger):
        return {"type": "date", "run_date": trigger.run_date.isoformat()}
    if isinstance(trigger, IntervalTrigger):
        return {
            "type": "interval",
            "seconds": trigger.interval.total_seconds(),
            "start": trigger.start_date.isoformat(),
            "end": trigger.end_date.isoformat() if trigger.end_date else None,
            "timezone": _encode_tz(trigger.timezone),
            "jitter": trigger.jitter,
        }
    if isinstance(trigger, CronTrigger):
        return {
            "type": "cron",
            "fields": {f.name: str(f) for f in trigger.fields if not f.is_default},  # defaults re-derive
            "start": trigger.start_date.isoformat() if trigger.start_date else None,
            "end": trigger.end_date.isoformat() if trigger.end_date else None,
            "timezone": _encode_tz(trigger.timezone),
            "jitter": trigger.jitter,
        }
    raise JobEncodingError(f"{type(trigger).__name__} triggers cannot be stored (date, interval or cron)")


def decode_trigger(d: dict[str, Any]) -> BaseTrigger:
    kind = d["type"]
    if kind == "date":
        return DateTrigger(run_date=datetime.fromisoformat(d["run_date"]))
    tz = _decode_tz(d["timezone"])
    start = datetime.fromisoformat(d["start"]) if d.get("start") else None
    end = datetime.fromisoformat(d["end"]) if d.get("end") else None
    if kind == "interval":
        return IntervalTrigger(
            seconds=d["seconds"], start_date=start, end_date=end, timezone=tz, jitter=d.get("jitter")
        )
    if kind == "cron":
        return CronTrigger(**d["fields"], start_date=start, end_date=end, timezone=tz, jitter=d.get("jitter"))
    raise ValueError(f"unknown trigger type {kind!r}")


def _encode_tz(tz: tzinfo) -> str | int:
    """A zone name where there is one (so daylight saving time follows), else the fixed UTC offset."""
    key = getattr(tz, "key", None)
    if key:
        return key
    offset = tz.utcoffset(None) if tz is not UTC else timedelta(0)
    if offset is None:
        raise JobEncodingError(f"time zone {tz!r} has neither a name nor a fixed offset")
    return int(offset.total_seconds())


def _decode_tz(v: str | int) -> tzinfo:
    return ZoneInfo(v) if isinstance(v, str) else timezone(timedelta(seconds=v))

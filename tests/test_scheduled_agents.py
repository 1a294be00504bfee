"""Scheduled agent runs: the JSON job store, triggers, and jobs through the real service, across a
daemon restart, owned by their app."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from dbus_fast import Variant
from dbus_harness import (
    Daemon,
    PrivateBus,
    app_python,
    client,
    read_json,
    start_client,
    tiny_store,
    wait_until,
)

from system_services.job_book import JobBook
from system_services.job_store import SQLiteJobStore
from system_services.scheduled_agents import ScheduleError, parse_trigger

RUN_JOB = "system_services.scheduled_agents:run_job"


# -- in process --------------------------------------------------------------------------------------------
def test_jobs_come_back_from_the_store_as_they_went_in_and_as_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    soon = datetime.now(UTC) + timedelta(days=2)
    triggers = {
        "cron": CronTrigger.from_crontab("30 7 * * mon-fri", timezone="Europe/Oslo"),
        "interval": IntervalTrigger(seconds=5400),
        "date": DateTrigger(run_date=soon),
    }

    async def first() -> dict[str, str]:
        s = AsyncIOScheduler(jobstores={"default": SQLiteJobStore(path)})
        s.start(paused=True)
        for name, trig in triggers.items():
            s.add_job(RUN_JOB, trig, args=[name], id=name)
        out = {j.id: j.next_run_time.isoformat() for j in s.get_jobs()}
        s.shutdown(wait=False)
        return out

    async def again() -> dict[str, tuple[str, str, list[str]]]:
        s = AsyncIOScheduler(jobstores={"default": SQLiteJobStore(path)})
        s.start(paused=True)
        out = {j.id: (j.next_run_time.isoformat(), str(j.trigger), list(j.args)) for j in s.get_jobs()}
        s.shutdown(wait=False)
        return out

    before = asyncio.run(first())
    after = asyncio.run(again())
    assert {k: v[0] for k, v in after.items()} == before  # the same next runs, after a "restart"
    assert after["cron"][1] == str(triggers["cron"]) and after["cron"][2] == ["cron"]
    assert (
        "Europe/Oslo"
        in sqlite3.connect(path).execute("SELECT job FROM apscheduler_jobs WHERE id='cron'").fetchone()[0]
    )
    for (text,) in sqlite3.connect(path).execute("SELECT job FROM apscheduler_jobs"):
        assert json.loads(text)["func"] == RUN_JOB  # readable JSON: nothing is unpickled from disk


def test_a_damaged_job_row_is_skipped_and_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.sqlite"

    async def add_two() -> None:
        s = AsyncIOScheduler(jobstores={"default": SQLiteJobStore(path)})
        s.start(paused=True)
        s.add_job(RUN_JOB, IntervalTrigger(seconds=60), args=["a"], id="a")
        s.add_job(RUN_JOB, IntervalTrigger(seconds=60), args=["b"], id="b")
        s.shutdown(wait=False)

    asyncio.run(add_two())
    with sqlite3.connect(path) as db:
        db.execute("UPDATE apscheduler_jobs SET job = '{\"format\": 99}' WHERE id = 'a'")

    async def ids() -> list[str]:
        s = AsyncIOScheduler(jobstores={"default": SQLiteJobStore(path)})
        s.start(paused=True)
        out = [j.id for j in s.get_jobs()]
        s.shutdown(wait=False)
        return out

    with caplog.at_level(logging.ERROR, logger="llmosd"):
        assert asyncio.run(ids()) == ["b"]
    assert "scheduled job a" in caplog.text and "format 99" in caplog.text
    with sqlite3.connect(path) as db:  # kept for a newer llmos, but never due again (no busy loop)
        assert db.execute("SELECT next_run_time FROM apscheduler_jobs WHERE id = 'a'").fetchone() == (None,)
        assert SQLiteJobStore(path).get_next_run_time() is not None  # b's


@pytest.mark.parametrize(
    ("trigger", "why"),
    [
        ({}, "exactly one"),
        ({"cron": Variant("s", "* * * * *"), "interval": Variant("u", 60)}, "exactly one"),
        ({"cron": Variant("s", "61 * * * *")}, "cron '61 \\* \\* \\* \\*'"),
        ({"cron": Variant("s", "every day")}, "five fields"),
        ({"interval": Variant("u", 5)}, "under this daemon's minimum of 60 s"),
        ({"interval": Variant("s", "60")}, "D-Bus type 'u'"),
        ({"date": Variant("s", "2001-01-01T00:00:00+00:00")}, "in the past"),
        ({"date": Variant("s", "tomorrow")}, "not ISO 8601"),
        ({"cron": Variant("s", "0 8 * * *"), "timezone": Variant("s", "Mars/Olympus")}, "unknown time zone"),
        ({"every": Variant("u", 60)}, "unknown trigger key 'every'"),
        ({"cron": Variant("s", "0 0 31 2 *")}, "never fires"),  # 31 February
        ({"cron": Variant("s", "0 8 * * 8")}, "weekday '8'"),
        (
            {"date": Variant("s", "9999-12-31T23:59:59"), "timezone": Variant("s", "America/Adak")},
            "out of range",
        ),
        ({"date": Variant("s", "0001-01-01T00:00:00")}, "out of range"),
    ],
)
def test_a_bad_trigger_is_refused_by_name(trigger: dict[str, Variant], why: str) -> None:
    with pytest.raises(ScheduleError, match=why):
        parse_trigger(trigger, 60)


@pytest.mark.parametrize(
    ("weekdays", "fires_on"),
    [
        ("1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),  # crontab's numbers: 0 and 7 are Sunday
        ("0", ["Sun"]),
        ("7", ["Sun"]),
        ("6,0", ["Sat", "Sun"]),
        ("*/3", ["Sun", "Wed", "Sat"]),
        ("mon-wed", ["Mon", "Tue", "Wed"]),
    ],
)
def test_cron_weekdays_count_as_crontab_does(weekdays: str, fires_on: list[str]) -> None:
    trig, _ = parse_trigger(
        {"cron": Variant("s", f"0 8 * * {weekdays}"), "timezone": Variant("s", "UTC")}, 60
    )
    t, days = datetime.now(UTC), set()
    for _ in range(14):
        t = trig.get_next_fire_time(None, t + timedelta(minutes=1))
        days.add(t.strftime("%a"))
    assert days == set(fires_on)


def test_a_date_without_a_zone_is_local_time_and_described_with_its_offset() -> None:
    when = (datetime.now() + timedelta(hours=1)).replace(microsecond=0)
    trig, described = parse_trigger({"date": Variant("s", when.isoformat())}, 60)
    assert datetime.fromisoformat(described["date"]) == when.astimezone()
    assert trig.get_next_fire_time(None, datetime.now(UTC)) == when.astimezone()


def test_only_the_last_results_of_a_job_are_kept(tmp_path: Path) -> None:
    book = JobBook(tmp_path / "jobs.sqlite")
    job = book.add(1000, "org.example.App", "summarizer", "text", {"interval": 60}, {})
    for i in range(5):
        book.add_result(job, {"code": 0, "answer": f"run {i}"}, [], keep=3)
    assert [r["answer"] for r in book.results(job)] == ["run 2", "run 3", "run 4"]
    book.remove(job)
    assert book.get(job) is None and book.results(job) == []


# -- through the service -----------------------------------------------------------------------------------
NOTES = "The library opens in spring. It has a reading room and a cafe. The region pays for it."


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[PrivateBus, Path, list[str]]]:
    """A bus, a tiny model store and a config; the daemon is started by each test (some restart it)."""
    store = tiny_store(tmp_path)
    config = tmp_path / "llmosd.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[jobs]\nmin_interval_s = 1\nresults_kept = 2\nmax_per_app = 3\n"
        "[apps.default]\nsystem_tools = []\n"
    )
    bus = PrivateBus(tmp_path)
    yield bus, store, ["--config", str(config), "--threads", "2"]
    bus.stop()


def test_a_scheduled_job_survives_a_daemon_restart_and_runs(
    setup: tuple[PrivateBus, Path, list[str]], tmp_path: Path
) -> None:
    bus, store, args = setup
    notes = app_python(tmp_path, "org.example.Notes")
    d = Daemon(bus.address, store, *args)
    due = datetime.now(UTC) + timedelta(seconds=4)
    trigger = json.dumps({"date": due.isoformat()})
    job = client(bus.address, "schedule", "summarizer", NOTES, trigger, '{"max_tokens": 40}', app=notes)[
        "job"
    ]
    (listed,) = client(bus.address, "jobs", app=notes)["jobs"]
    assert listed["id"] == job and listed["trigger"] == {"date": due.isoformat()}
    assert datetime.fromisoformat(listed["next_run"]) == due and listed["runs_kept"] == 0
    d.stop_cleanly()  # before it is due
    db = tmp_path / "state" / "jobs" / "jobs.sqlite"
    assert db.stat().st_mode & 0o777 == 0o600  # the apps' inputs and results are private
    with sqlite3.connect(db) as kept:
        assert kept.execute("SELECT id FROM apscheduler_jobs").fetchall() == [(job,)]

    wait_until(lambda: datetime.now(UTC) > due + timedelta(seconds=1), timeout=10)
    d = Daemon(bus.address, store, *args)  # due while the daemon was down: runs now
    try:
        got: dict = {}

        def ran() -> bool:
            got.update(client(bus.address, "job-results", job, app=notes))
            return bool(got["results"])

        assert wait_until(ran, timeout=60), got
        (result,) = got["results"]
        assert result["code"] == 0 and result["answer"].strip(), result
        assert result["step_log"][-1]["answer"] == result["answer"]
        (listed,) = client(bus.address, "jobs", app=notes)["jobs"]
        assert listed["next_run"] is None and listed["runs_kept"] == 1  # a one-off: done, kept
        assert listed["last"]["answer"] == result["answer"]
    finally:
        d.stop_cleanly()


def test_jobs_belong_to_their_app(setup: tuple[PrivateBus, Path, list[str]], tmp_path: Path) -> None:
    bus, store, args = setup
    notes, other = app_python(tmp_path, "org.example.Notes"), app_python(tmp_path, "org.example.Other")
    d = Daemon(bus.address, store, *args)
    try:
        trigger = '{"cron": "0 8 * * *", "timezone": "Europe/Oslo"}'
        job = client(bus.address, "schedule", "summarizer", NOTES, trigger, app=notes)["job"]
        assert client(bus.address, "jobs", app=other)["jobs"] == []
        for cmd in ("job-results", "cancel-job"):
            denied = client(bus.address, cmd, job, app=other)
            assert denied["error"] == "org.llmos.Error.NotFound", denied  # not even told it exists
        assert [j["id"] for j in client(bus.address, "jobs", app=notes)["jobs"]] == [job]
        assert client(bus.address, "cancel-job", job, app=notes) == {"cancelled": job}
        assert client(bus.address, "jobs", app=notes)["jobs"] == []
        assert client(bus.address, "job-results", job, app=notes)["error"] == "org.llmos.Error.NotFound"
    finally:
        d.stop_cleanly()


def test_a_repeating_job_tells_its_app_each_time_and_keeps_the_last_results(
    setup: tuple[PrivateBus, Path, list[str]], tmp_path: Path
) -> None:
    bus, store, args = setup
    notes = app_python(tmp_path, "org.example.Notes")
    d = Daemon(bus.address, store, *args)
    try:
        every_second = ("summarizer", NOTES, '{"interval": 1}', '{"max_tokens": 24}')
        job = client(bus.address, "schedule", *every_second, app=notes)["job"]
        listener = start_client(bus.address, "wait-job", job, "3", "90", app=notes)
        assert read_json(listener)["ready"]
        finished = read_json(listener, timeout=120)["finished"]
        assert len(finished) == 3, finished
        assert all(f["code"] == 0 and f["result"]["answer"] for f in finished), finished
        assert {f["destination"] for f in finished} != {None}  # addressed to this app: unicast
        assert len(client(bus.address, "job-results", job, app=notes)["results"]) == 2  # results_kept
        assert client(bus.address, "cancel-job", job, app=notes) == {"cancelled": job}
        listener.wait(10)
        # cancelled: no results are left behind, and nothing more runs
        assert client(bus.address, "jobs", app=notes)["jobs"] == []
    finally:
        d.stop_cleanly()


def test_scheduling_mistakes_get_named_errors(
    setup: tuple[PrivateBus, Path, list[str]], tmp_path: Path
) -> None:
    bus, store, args = setup
    notes = app_python(tmp_path, "org.example.Notes")
    d = Daemon(bus.address, store, *args)
    try:
        hourly = '{"cron": "0 * * * *"}'
        out = client(bus.address, "schedule", "nope", NOTES, hourly, app=notes)
        assert out["error"] == "org.llmos.Error.NotFound" and "summarizer" in out["message"]
        out = client(bus.address, "schedule", "summarizer", NOTES, '{"cron": "0 25 * * *"}', app=notes)
        assert out["error"] == "org.llmos.Error.InvalidArgument" and "cron" in out["message"]
        out = client(bus.address, "schedule", "summarizer", NOTES, hourly, '{"approver": "/x"}', app=notes)
        assert out["error"] == "org.llmos.Error.InvalidArgument", out
        out = client(
            bus.address,
            "schedule",
            "summarizer",
            NOTES,
            hourly,
            '{"system_tools": ["current_time"]}',
            app=notes,
        )
        assert out["error"] == "org.llmos.Error.AccessDenied", out  # the policy gives it no system tools
        out = client(bus.address, "schedule", "summarizer", " ", hourly, app=notes)
        assert out["error"] == "org.llmos.Error.InvalidArgument" and "empty" in out["message"]
        for _ in range(3):
            assert "job" in client(bus.address, "schedule", "summarizer", NOTES, hourly, app=notes)
        out = client(bus.address, "schedule", "summarizer", NOTES, hourly, app=notes)
        assert out["error"] == "org.llmos.Error.QuotaExceeded" and "3 scheduled jobs" in out["message"]
        assert len(client(bus.address, "jobs", app=notes)["jobs"]) == 3  # the refused one left nothing
    finally:
        d.stop_cleanly()


def test_a_run_cut_short_by_the_daemon_stopping_is_recorded_as_such(
    setup: tuple[PrivateBus, Path, list[str]], tmp_path: Path
) -> None:
    bus, store, args = setup
    notes = app_python(tmp_path, "org.example.Notes")
    d = Daemon(bus.address, store, *args)
    long_text = "\n\n".join(f"Part {i}. " + NOTES * 12 for i in range(12))  # many parts: a long run
    job = client(
        bus.address, "schedule", "summarizer", long_text, '{"interval": 1}', '{"max_tokens": 200}', app=notes
    )["job"]

    def running() -> bool:
        return client(bus.address, "status")["active_requests"] > 0

    assert wait_until(running, timeout=60)  # a run is generating now
    d.stop_cleanly()  # no traceback, exit 0, though a run was in flight
    d = Daemon(bus.address, store, *args)
    try:
        results = client(bus.address, "job-results", job, app=notes)["results"]
        cut = [r for r in results if r["code"] == 1]
        assert cut and cut[-1]["error_name"] == "org.llmos.Error.Cancelled", results
        assert cut[-1]["error_message"] == "the daemon stopped during the run"
        client(bus.address, "cancel-job", job, app=notes)
    finally:
        d.stop_cleanly()

"""The failure log limiter: one line for a failure, repeats counted and summarised, one line when it
clears, and a bounded log whatever the pattern of failures (steady, flapping, many kinds at once)."""

from __future__ import annotations

import logging

import pytest

from llmos.log_limit import LimitedLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limited(clock: Clock) -> LimitedLog:
    return LimitedLog(logging.getLogger("test.limit"), every_s=600, clock=clock, wall_clock=clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.limit"]


def test_a_steady_failure_is_one_line_then_summaries_then_one_recovery(
    limited: LimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert limited.failed("swap writes to /s", "No space left on device", "free space in /s")
    for _ in range(1551):
        clock.t += 0.05
        assert not limited.failed("swap writes to /s", "No space left on device", "free space in /s")
    (first,) = lines(caplog)
    assert first.startswith("swap writes to /s failed: No space left on device. free space in /s;")
    assert "summarised at most every 10 min" in first
    assert caplog.records[0].levelno == logging.ERROR
    clock.t += 600  # the next failure after the quiet period is a summary with the count
    assert limited.failed("swap writes to /s", "No space left on device")
    summary = lines(caplog)[1]
    assert "failed 1,552 more times since" in summary and summary.endswith("last: No space left on device")
    assert limited.failing("swap writes to /s")
    assert limited.recovered("swap writes to /s")
    assert "swap writes to /s work again after 1,553 failures since" in lines(caplog)[2]
    assert caplog.records[2].levelno == logging.INFO
    assert not limited.recovered("swap writes to /s")  # already clear: nothing more to say
    assert len(lines(caplog)) == 3


def test_a_failure_that_flaps_with_every_request_stays_bounded(
    limited: LimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(1000):  # fail, succeed, fail, ... one pair a second for 1000 s
        limited.failed("prefill steps", "boom")
        limited.recovered("prefill steps")
        clock.t += 1
    out = lines(caplog)
    # first failure + recovery, then one summary and its recovery after 600 s: never one per request
    assert len(out) == 4, out
    assert out[0].startswith("prefill steps failed: boom") and "work again after 1 failure" in out[1]
    assert "(600 times since" in out[2]  # the counted ones are in the next line, with this one


def test_kinds_are_independent(limited: LimitedLog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(50):
        limited.failed("decode steps", "a")
        limited.failed("queueing requests", "b", level=logging.WARNING)
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
    assert not limited.recovered("never failed")


def test_the_first_line_keeps_its_traceback_and_only_the_first(
    limited: LimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        try:
            raise KeyError("x")
        except KeyError as e:
            limited.failed("worker commands", e, exc_info=True)
        clock.t += 601
    assert [r.exc_info is not None and r.exc_info[0] is KeyError for r in caplog.records] == [
        True,
        False,
        False,
    ]


def test_an_internal_error_a_caller_can_repeat_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from system_services.dbus_errors import to_dbus_error

    caplog.set_level(logging.INFO, logger="llmosd")
    answers = []
    for _ in range(100):  # the same call, hitting the same bug, again and again
        try:
            {}["missing"]  # the bug
        except KeyError as e:
            answers.append(to_dbus_error(e))
    assert {a.type for a in answers} == {"org.llmos.Error.Failed"}  # every caller still gets an answer
    logged = [r for r in caplog.records if r.name == "llmosd"]
    assert len(logged) == 1 and logged[0].exc_info is not None, [r.getMessage() for r in logged]
    assert "KeyError at " in logged[0].getMessage() and "test_log_limit.py" in logged[0].getMessage()

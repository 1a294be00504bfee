"""`llmosctl agents / tools / run / schedule / jobs` as a user runs them: real llmosctl processes against a
real llmosd (tiny random-weight model) on a private dbus-daemon, with apps as processes where needed.

The tiny model writes random text, but every step is constrained JSON, so steps still parse: the tests
check what the commands show and how they end, never what the model said. Every llmosctl run by the same
interpreter is the same app to llmosd, which is why `jobs` sees what `schedule` made.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, app_python, read_json, start_client, tiny_store, wait_until

from system_services.cli_agents import describe_step, describe_trigger, one_line

CLI = ["-m", "system_services.cli"]
CLOCK_APP = "org.example.Clock"  # an app whose policy allows two system tools
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": CITY,
    "shared": True,
}
SUNNY = {"city": "Oslo", "temperature_c": 21, "sky": "sunny"}
NOTES = "The cat sat on the mat.\n\nIt was a sunny day, and the cat was happy about it.\n"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_agents")


@pytest.fixture(scope="module")
def bus(tmp: Path) -> Iterator[PrivateBus]:
    b = PrivateBus(tmp)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(tmp: Path, bus: PrivateBus) -> Iterator[Daemon]:
    config = tmp / "llmosd.toml"
    config.write_text(
        f'state_dir = "{tmp / "state"}"\n'
        "[jobs]\nmin_interval_s = 1\n"
        "[apps.default]\nsystem_tools = []\n"
        f'[apps."{CLOCK_APP}"]\nsystem_tools = ["current_time", "send_notification"]\n'
    )
    d = Daemon(bus.address, tiny_store(tmp), "--config", str(config), "--threads", "2")
    yield d
    d.stop_cleanly()


def llmosctl(
    bus: PrivateBus,
    *args: str,
    stdin: str = "",
    app: tuple[list[str], dict[str, str]] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    argv, env = app or ([sys.executable], None)
    return subprocess.run(
        [*argv, *CLI, *args, "--address", bus.address],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def assert_one_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Failed the way a user should see it: one `llmosctl: error:` line last on stderr, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("llmosctl: error: ") and r.stderr.count("llmosctl: error:") == 1, r.stderr
    for w in words:
        assert w in last, last


def table(stdout: str) -> list[list[str]]:
    """A table's rows split on runs of two or more spaces (cells may hold single spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


# -- agents and tools ----------------------------------------------------------------------------------
def test_agents_lists_the_built_in_agents(bus: PrivateBus, daemon: Daemon) -> None:
    r = llmosctl(bus, "agents")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0] == ["NAME", "SOURCE", "TOOLS", "DESCRIPTION"]
    by_name = {row[0]: row for row in rows[1:]}
    assert by_name["assistant"][1:3] == ["built-in", "any you may use"], r.stdout
    assert by_name["summarizer"][1:3] == ["built-in", "none (custom steps)"], r.stdout
    assert "warning" not in r.stderr  # no broken plugins in this environment
    listed = json.loads(llmosctl(bus, "agents", "--json").stdout)
    assert {"assistant", "summarizer"} <= {a["name"] for a in listed["agents"]}
    assert listed["problems"] == []


def test_tools_without_system_tools_says_so_and_succeeds(bus: PrivateBus, daemon: Daemon) -> None:
    r = llmosctl(bus, "tools")
    assert r.returncode == 0 and r.stdout == "", r
    assert r.stderr.startswith("no tools:") and "summarizer" in r.stderr, r.stderr
    js = llmosctl(bus, "tools", "--json")
    assert js.returncode == 0 and json.loads(js.stdout) == [], js.stderr


def test_tools_shows_the_system_tools_an_apps_policy_allows_and_why_one_is_unavailable(
    tmp: Path, bus: PrivateBus, daemon: Daemon
) -> None:
    clock = app_python(tmp, CLOCK_APP)  # llmosctl started by an interpreter the daemon calls CLOCK_APP
    r = llmosctl(bus, "tools", app=clock)
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row for row in table(r.stdout)}
    assert rows["NAME"][:3] == ["NAME", "FROM", "STATE"]
    assert rows["current_time"][1:3] == ["system", "available"], r.stdout
    assert rows["send_notification"][1:3] == ["system", "unavailable"], r.stdout  # nobody serves it here
    (why,) = [line for line in r.stdout.splitlines() if line.startswith("send_notification is unavailable:")]
    assert "org.freedesktop.Notifications" in why, why
    assert "battery_status" not in r.stdout  # not in this app's policy
    listed = {t["name"]: t for t in json.loads(llmosctl(bus, "tools", "--json", app=clock).stdout)}
    assert set(listed) == {"current_time", "send_notification"}
    assert listed["send_notification"]["available"] is False and listed["send_notification"]["unavailable"]


# -- run -----------------------------------------------------------------------------------------------
def test_run_the_summarizer_on_stdin_shows_its_steps_and_prints_the_answer(
    bus: PrivateBus, daemon: Daemon
) -> None:
    r = llmosctl(bus, "run", "--agent", "summarizer", "-", stdin=NOTES)
    assert r.returncode == 0, r.stderr
    steps = r.stderr.splitlines()
    assert steps and all(line.startswith("step ") for line in steps), r.stderr
    assert steps[-1] == f"step {len(steps)}: answers", r.stderr
    assert r.stdout.strip(), "the answer goes to stdout"
    js = llmosctl(bus, "run", "--json", "--agent", "summarizer", "-", stdin=NOTES)
    assert js.returncode == 0, js.stderr
    lines = [json.loads(line) for line in js.stdout.splitlines()]
    *step_lines, result = lines
    assert [s["step"] for s in step_lines] == list(range(1, len(step_lines) + 1))
    assert result["code"] == 0 and result["steps"] == len(step_lines) and result["answer"]
    assert step_lines[-1]["answer"] == result["answer"]


def test_run_streams_the_answer_as_it_is_written_and_prints_it_once(bus: PrivateBus, daemon: Daemon) -> None:
    r = subprocess.run(  # stdout and stderr in one stream, in the order the user sees them
        [sys.executable, *CLI, "run", "Write two sentences about the sea.", "--address", bus.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout
    text, _, note = r.stdout.rstrip("\n").rpartition("\n")
    assert note == "step 1: answers", r.stdout  # the note follows the text: it was streamed before
    assert text.strip() and "step 1" not in text, r.stdout
    first_words = text.split()[:4]
    assert r.stdout.count(" ".join(first_words)) == 1, r.stdout  # not printed again at the end


def test_run_shows_a_tool_call_with_its_arguments_and_result(
    tmp: Path, bus: PrivateBus, daemon: Daemon
) -> None:
    setup = tmp / "weather.json"
    setup.write_text(json.dumps({"manifest": {"tools": [WEATHER]}, "results": {"get_weather": SUNNY}}))
    # another app, sharing its tool: runs of other apps see it under that app's name
    provider = start_client(bus.address, "provide", str(setup), app=app_python(tmp, "org.example.Weather"))
    try:
        assert read_json(provider)["registered"] == ["get_weather"]
        listed = llmosctl(bus, "tools")
        row = next(row for row in table(listed.stdout) if row[0] == "org.example.Weather/get_weather")
        assert row[1:3] == ["shared by org.example.Weather", "available"], listed.stdout
        r = llmosctl(
            bus, "run", "--tool-choice", "required", "--max-steps", "2", "What is the weather in Oslo?"
        )
        assert r.returncode == 0, r.stderr
        first, last = r.stderr.splitlines()
        assert first.startswith('step 1: calls org.example.Weather/get_weather {"city": '), first
        assert first.endswith(f"→ {json.dumps(SUNNY)}"), first
        assert last == "step 2: answers" and r.stdout.strip()
    finally:
        provider.communicate("", timeout=30)


def test_run_an_unknown_agent_is_one_clear_error(bus: PrivateBus, daemon: Daemon) -> None:
    r = llmosctl(bus, "run", "--agent", "nope", "hello")
    assert_one_error(r, 2, "no agent named 'nope'", "summarizer")
    assert r.stdout == ""


def test_ctrl_c_cancels_the_run_and_exits_130(tmp: Path, bus: PrivateBus, daemon: Daemon) -> None:
    paragraph = " ".join(["river mountain cloud paper engine garden"] * 50) + "."
    notes = tmp / "long-notes.txt"
    notes.write_text("\n\n".join([paragraph] * 40))  # many parts to summarize: runs for seconds
    cmd = [sys.executable, *CLI, "run", "--agent", "summarizer", "--address", bus.address, "-"]
    with notes.open() as stdin:
        proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()
        assert first.startswith("step 1: "), first  # it is running
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert rest.rstrip("\n").splitlines()[-1] == "llmosctl: error: interrupted: the run was cancelled", rest
    assert "Traceback" not in rest and out == ""
    assert llmosctl(bus, "agents").returncode == 0  # the daemon carries on


# -- schedule and jobs ---------------------------------------------------------------------------------
def job_rows(bus: PrivateBus) -> dict[str, list[str]]:
    r = llmosctl(bus, "jobs")
    assert r.returncode == 0, r.stderr
    return {row[0]: row for row in table(r.stdout)[1:]}


def test_schedule_every_second_runs_lists_shows_results_and_cancels(bus: PrivateBus, daemon: Daemon) -> None:
    r = llmosctl(
        bus, "schedule", "--agent", "summarizer", "--every", "1", "--max-steps", "3", "-", stdin=NOTES
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id and "\n" not in job_id
    assert r.stderr.startswith("scheduled summarizer every 1 s; next run "), r.stderr

    row = job_rows(bus)[job_id]
    assert row[1:3] == ["summarizer", "every 1 s"], row
    (job,) = [j for j in json.loads(llmosctl(bus, "jobs", "--json").stdout) if j["id"] == job_id]
    assert job["input"] == NOTES.rstrip("\n") and job["options"] == {"max_steps": 3}

    def ran() -> list[dict[str, Any]]:
        res = llmosctl(bus, "jobs", "results", job_id, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    assert wait_until(lambda: len(ran()) > 0, timeout=60), "the job never ran"
    first = ran()[0]
    assert first["code"] == 0 and first["answer"] and first["step_log"][-1]["answer"] == first["answer"]
    shown = llmosctl(bus, "jobs", "results", job_id)
    assert shown.returncode == 0, shown.stderr
    assert " code 0 (ok), " in shown.stdout.splitlines()[0], shown.stdout
    assert job_rows(bus)[job_id][4].startswith("0 "), "the list shows the last result's code and answer"

    gone = llmosctl(bus, "jobs", "cancel", job_id)
    assert gone.returncode == 0 and gone.stdout == f"cancelled {job_id}\n", gone
    assert job_id not in job_rows(bus)
    assert_one_error(llmosctl(bus, "jobs", "results", job_id), 2, f"no job {job_id!r}")
    assert_one_error(llmosctl(bus, "jobs", "cancel", job_id), 2, f"no job {job_id!r}")


def test_schedule_with_a_bad_trigger_is_one_clear_error(bus: PrivateBus, daemon: Daemon) -> None:
    before = job_rows(bus)
    bad_cron = llmosctl(bus, "schedule", "--agent", "summarizer", "--cron", "61 * * *", "some text")
    assert_one_error(bad_cron, 2, "cron '61 * * *'", "five fields")
    assert bad_cron.stdout == ""
    past = llmosctl(bus, "schedule", "--agent", "summarizer", "--at", "2001-01-01T08:00:00", "some text")
    assert_one_error(past, 2, "in the past")
    zone = llmosctl(
        bus, "schedule", "--agent", "summarizer", "--cron", "0 8 * * *", "--timezone", "Mars/Olympus", "x"
    )
    assert_one_error(zone, 2, "unknown time zone 'Mars/Olympus'")
    no_trigger = llmosctl(bus, "schedule", "--agent", "summarizer", "some text")  # argparse: usage error
    assert (
        no_trigger.returncode == 2
        and "one of the arguments --cron --every --at is required" in no_trigger.stderr
    )
    assert job_rows(bus) == before  # nothing half-made


def test_a_cron_job_in_a_time_zone_is_listed_with_its_next_run(bus: PrivateBus, daemon: Daemon) -> None:
    r = llmosctl(
        bus,
        "schedule",
        "--agent",
        "assistant",
        "--cron",
        "30 7 * * mon-fri",
        "--timezone",
        "Europe/Oslo",
        "hi",
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    try:
        row = job_rows(bus)[job_id]
        assert row[1:3] == ["assistant", "cron 30 7 * * mon-fri (Europe/Oslo)"], row
        assert row[3] != "-" and row[4] == "-", row  # a next run, and no result yet
        assert llmosctl(bus, "jobs", "results", job_id).stderr == f"job {job_id} has not run yet\n"
    finally:
        assert llmosctl(bus, "jobs", "cancel", job_id).returncode == 0


# -- no daemon needed ----------------------------------------------------------------------------------
def test_local_is_not_offered_because_agents_run_in_llmosd() -> None:
    r = subprocess.run(
        [sys.executable, *CLI, "agents", "--local"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert_one_error(r, 2, "unrecognized arguments: --local")
    run_help = subprocess.run(
        [sys.executable, *CLI, "run", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert "--local" not in run_help.stdout


def test_steps_and_triggers_read_well() -> None:
    call = {"step": 1, "tool": "get_weather", "arguments": {"city": "Oslo"}, "observation": {"temp": 21}}
    assert describe_step(call) == 'step 1: calls get_weather {"city": "Oslo"} → {"temp": 21}'
    assert describe_step({"step": 2, "text": "part one\nsaid \x1b[2Jthis"}) == "step 2: part one said [2Jthis"
    assert describe_step({"step": 3, "answer": "It is sunny."}) == "step 3: answers"
    partial = '{"tool": "send_message", "arguments": {"to": "B'
    cut = {"step": 1, "tool": "send_message", "partial": partial, "cut": True}
    assert describe_step(cut) == f"step 1: call of send_message cut short, not made: {partial}"
    assert one_line("x" * 50, 10) == "x" * 9 + "…"
    assert describe_trigger({"interval": 90}) == "every 90 s"
    assert (
        describe_trigger({"cron": "0 8 * * *", "timezone": "Europe/Oslo"}) == "cron 0 8 * * * (Europe/Oslo)"
    )

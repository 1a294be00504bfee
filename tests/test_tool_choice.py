"""Tool choice among many tools, grounded arguments and no repeated side effects (issue 12), on the
default model through the daemon, with tools written as app authors write them (open schemas, no
maxLength, uneven descriptions: bench/data/multiapp_tools.json). The requests here are not the
bench's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_harness import Daemon, PrivateBus, client

from agents import request_values as rv
from agents.grounding import call_schema
from agents.tool_retrieval import ToolIndex
from agents.tools import Tool, ToolManifest
from llmos.model_store import ModelStore

TOOLS = json.loads((Path(__file__).parent.parent / "bench/data/multiapp_tools.json").read_text())["tools"]
DECLARED = {t["name"]: set(t["parameters"]["properties"]) for t in TOOLS}
REQUIRED = {"tool_choice": "required", "max_steps": 3, "temperature": 0.0, "max_tokens": 64}
AUTO = {**REQUIRED, "tool_choice": "auto"}


def tools() -> list[Tool]:
    return [
        Tool(spec, ":1.1", "app", "/t") for spec in ToolManifest.parse(json.dumps({"tools": TOOLS})).tools
    ]


@pytest.mark.parametrize(
    ("said", "time"),
    [
        ("wake me at 6am", "06:00"),
        ("at 18:05 please", "18:05"),
        ("seven in the morning", "07:00"),
        ("at 9 pm", "21:00"),
        ("half past four in the afternoon", "16:30"),
        ("quarter to eight", "07:45"),
        ("at noon", "12:00"),
        ("8.15 tomorrow", "08:15"),
    ],
)
def test_a_time_said_any_everyday_way_is_read_as_hh_mm(said: str, time: str) -> None:
    assert rv.clock_times(said)[0] == time


def test_a_stated_time_is_fixed_in_the_call_and_unmentioned_options_are_left_out() -> None:
    alarm = next(t for t in tools() if t.name == "set_alarm")
    schema, fixed = call_schema(alarm, "get me up at 5:40", alarm.spec.strict_parameters)
    assert fixed == {"time": "05:40"} and schema["properties"] == {"time": {"const": "05:40"}}
    labelled, _ = call_schema(alarm, "alarm at 5:40 labelled 'run'", alarm.spec.strict_parameters)
    assert set(labelled["properties"]) == {"time", "label"}


def test_retrieval_puts_the_requested_tool_first_among_fourteen() -> None:
    index = ToolIndex(tools())
    for request, want in [
        ("could you start a 12 minute countdown", "start_timer"),
        ("switch off bluetooth", "toggle_setting"),
        ("is it going to snow in Dublin", "get_weather"),
        ("ring my sister", "call_contact"),
        ("remind me to feed the cat at 17:00", "add_reminder"),
    ]:
        assert index.rank(request)[0].tool.name == want, request


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[PrivateBus]:
    tmp = tmp_path_factory.mktemp("choice")
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf, make_default=True)
    b = PrivateBus(tmp)
    config = tmp / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[apps.default]\nsystem_tools = []\n')
    d = Daemon(b.address, store, "--config", str(config), "--threads", "2")
    yield b
    d.stop_cleanly()
    b.stop()


def run_many(bus: PrivateBus, tmp: Path, runs: list[dict[str, Any]], results: Any = None) -> dict[str, Any]:
    path = tmp / "setup.json"
    path.write_text(json.dumps({"manifest": {"tools": TOOLS}, "results": results or {}, "runs": runs}))
    return client(bus.address, "agent-runs", str(path), timeout=900)


@pytest.mark.model
def test_the_requested_tool_is_called_among_fourteen_with_the_values_said(
    bus: PrivateBus, tmp_path: Path
) -> None:
    cases = [
        ("Could you wake me at 6am?", "set_alarm", {"time": "06:00"}),
        ("set a 12 minute timer", "start_timer", {"minutes": 12}),
        ("please switch bluetooth off", "toggle_setting", {"setting": "bluetooth", "on": False}),
        ("What's the weather like in Dublin?", "get_weather", {"location": "Dublin"}),
        ("Remind me at 21:30 to lock the door", "add_reminder", {"at": "21:30"}),
        ("Make a note titled 'Garden plans'", "create_note", {"title": "Garden plans"}),
        ("turn the volume to 35 percent", "set_volume", {"percent": 35}),
    ]
    out = run_many(bus, tmp_path, [{"goal": goal, "options": REQUIRED} for goal, _, _ in cases])
    for (goal, tool, values), run_ in zip(cases, out["runs"], strict=True):
        assert run_["code"] == 0, run_["result"]
        first = run_["steps"][0]
        assert first["tool"] == tool, (goal, first)
        for key, value in values.items():
            assert first["arguments"].get(key) == value, (goal, first)
    for call in out["calls"]:  # open schemas: still only the keys each tool declares
        assert set(call["arguments"]) <= DECLARED[call["tool"]], call


@pytest.mark.model
def test_auto_answers_a_question_and_calls_a_tool_for_a_request(bus: PrivateBus, tmp_path: Path) -> None:
    out = run_many(
        bus,
        tmp_path,
        [
            {"goal": "Who painted the Mona Lisa?", "options": AUTO},
            {"goal": "Turn off the wifi", "options": AUTO},
        ],
    )
    question, request = out["runs"]
    assert question["steps"][0].get("answer"), question  # answered, no tool called
    assert request["steps"][0]["tool"] == "toggle_setting", request
    assert request["steps"][0]["arguments"] == {"setting": "wifi", "on": False}


@pytest.mark.model
def test_a_side_effect_happens_once_even_when_its_result_invites_a_repeat(
    bus: PrivateBus, tmp_path: Path
) -> None:
    """The app's result echoes new keys (an id, the time) that a model could copy into a "new" call; the
    run may take four steps: the alarm is still set once, and the message sent once."""
    results = {
        "set_alarm": {"ok": True, "alarm_id": 41, "time": "07:00", "next": "set another alarm?"},
        "send_message": {"sent": True, "message_id": "m-9", "to": "Sam"},
    }
    options = {**REQUIRED, "max_steps": 4}
    out = run_many(
        bus,
        tmp_path,
        [
            {"goal": "Set an alarm for 7am", "options": options},
            {"goal": "Text Sam that the door is open", "options": options},
        ],
        results,
    )
    made = [c["tool"] for c in out["calls"]]
    assert made.count("set_alarm") == 1 and made.count("send_message") == 1, made
    assert all(r["code"] == 0 and r["result"].get("answer") for r in out["runs"]), out["runs"]

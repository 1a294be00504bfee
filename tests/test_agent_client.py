"""The client library's agent wrappers and Task1's streamed steps, against a real dbus-daemon and llmosd
serving the default model.

The app here is this test process using `system_services.client`, as an app author would; llmosd is its
own process. Its `[limits] max_tokens` is 96, so a step that may call a tool has at most 96 tokens and a
tool with an open string is offered with its cap lowered to fit: a call that reaches it is cut, which is
how a run meets "ran out in the middle of a call" on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_harness import Daemon, PrivateBus

from llmos.model_store import ModelStore
from system_services import client_run
from system_services.client import (
    AsyncLLMClient,
    CallCutError,
    CallStarted,
    LLMClient,
    PartialCall,
    RunResult,
    ServiceError,
    TextDelta,
    ToolDefinitionError,
    ToolResult,
    tool_entry,
)

TASK1 = "org.llmos.Task1"
STORY = "Tell me a long story about a dragon and a knight."


# -- schemas from typed functions (in process) ---------------------------------------------------------------
def book_table(
    restaurant: str,
    people: int,
    time: Literal["18:00", "19:00", "20:00"],
    notes: Optional[str] = None,  # noqa: UP045 (written as authors write it)
    dishes: list[str] | None = None,
    budget: float = 50.0,
    outdoor: bool = False,
) -> dict:
    """Book a table at a restaurant.

    Say which restaurant, for how many, and when.

    Args:
        restaurant: the restaurant's name as the user said it
        people (int): how many people, the user included
        time: when to arrive
        notes: anything to tell the restaurant,
            e.g. an allergy
        dishes: dishes to pre-order
        budget: the most to spend per person, in euros
        outdoor: a table outside

    Returns:
        the booking
    """
    return {}


def test_a_typed_function_gives_a_closed_schema_with_its_descriptions() -> None:
    entry = tool_entry(book_table)
    assert entry["name"] == "book_table"
    summary = "Book a table at a restaurant. Say which restaurant, for how many, and when."
    assert entry["description"] == summary
    assert entry["parameters"] == {
        "type": "object",
        "properties": {
            "restaurant": {"type": "string", "description": "the restaurant's name as the user said it"},
            "people": {"type": "integer", "description": "how many people, the user included"},
            "time": {"type": "string", "enum": ["18:00", "19:00", "20:00"], "description": "when to arrive"},
            "notes": {
                "type": ["string", "null"],
                "description": "anything to tell the restaurant, e.g. an allergy",
                "default": None,
            },
            "dishes": {
                "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                "description": "dishes to pre-order",
                "default": None,
            },
            "budget": {
                "type": "number",
                "description": "the most to spend per person, in euros",
                "default": 50.0,
            },
            "outdoor": {"type": "boolean", "description": "a table outside", "default": False},
        },
        "required": ["restaurant", "people", "time"],  # those without a default
        "additionalProperties": False,
    }


def undocumented(city: str) -> str:
    """Weather."""
    return city


def untyped(city) -> str:  # type: ignore[no-untyped-def]
    """Weather.

    Args:
        city: the city
    """
    return city


def any_dict(options: dict) -> str:
    """Weather.

    Args:
        options: anything
    """
    return ""


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (undocumented, "describe it in the docstring"),
        (untyped, "a type hint is needed"),
        (any_dict, "cannot be a tool parameter"),
    ],
)
def test_a_function_the_model_could_only_guess_at_is_refused_by_name(fn: object, why: str) -> None:
    with pytest.raises(ToolDefinitionError, match=why):
        tool_entry(fn)  # type: ignore[arg-type]


# -- through llmosd ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("agent_client")
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf, make_default=True)
    bus = PrivateBus(tmp)
    config = tmp / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[limits]\nmax_tokens = 96\n')
    daemon = Daemon(bus.address, store, "--config", str(config), "--threads", "2")
    yield bus.address
    daemon.stop_cleanly()
    bus.stop()


def _active_requests(llm: LLMClient) -> int:
    return int(llm.status()["active_requests"])


def _task_exists(llm: LLMClient, token: str) -> bool:
    path = f"/org/llmos/Agent1/task/{llm.aio.bus.unique_name.lstrip(':').replace('.', '_')}/{token}"
    try:
        llm.run_coroutine(
            llm.aio.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [TASK1, "Version"])
        )
    except ServiceError:
        return False
    return True


@pytest.fixture
def known_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The handle token of the next runs, known to the test (llmosd never lists others' task paths, so
    only a test that knows it can look for the task, or forge signals on its path)."""
    monkeypatch.setattr(client_run, "new_token", lambda: "known")
    return "known"


@pytest.mark.model
def test_an_answer_arrives_in_pieces_as_it_is_written_and_they_add_up_to_it(address: str) -> None:
    with LLMClient.connect(address=address) as llm:
        start = time.monotonic()
        events = [(time.monotonic() - start, e) for e in llm.run(STORY, tool_choice="none", max_tokens=96)]
    deltas = [(t, e) for t, e in events if isinstance(e, TextDelta)]
    end, result = events[-1]
    assert isinstance(result, RunResult), events
    assert len(deltas) >= 5, events  # streamed, not whole at the end
    assert "".join(e.text for _, e in deltas) == result.answer  # the pieces are the answer, nothing lost
    # the pieces came while it was being written, not together at the end: they arrived over at least
    # a third of the time from the first piece to the result (a quiet machine writes 96 tokens in ~0.6 s)
    spread = deltas[-1][0] - deltas[0][0]
    assert spread >= (end - deltas[0][0]) / 3 and deltas[0][0] < end - 0.1, (deltas[0][0], spread, end)
    # batched: not one message per token (96 tokens), at most ~20 a second
    assert len(deltas) <= 96 and len(deltas) <= (end - deltas[0][0]) / 0.05 + 3, len(deltas)


@pytest.mark.model
def test_a_call_cut_by_max_tokens_is_reported_by_its_tool_and_arguments(address: str) -> None:
    made: list[str] = []

    def save_note(text: str) -> dict:
        """Save a note for the user.

        Args:
            text: the whole note, word for word
        """
        made.append(text)
        return {"saved": True}

    items = "milk, eggs, bread, butter, cheese, apples, pears, rice, beans, coffee, tea, sugar, flour, "
    goal = f"Save a note, word for word: buy {items * 3}and soap on the way home."  # past 96 tokens
    events = []
    with LLMClient.connect(address=address) as llm:
        llm.register_tools([save_note])
        # unconstrained steps (a measurement mode): a call is the model's free text, so the daemon's
        # max_tokens 96 can cut it; constrained steps get the tokens their bounded call needs
        options = {"tool_choice": "required", "system_tools": [], "max_steps": 2, "constrained": False}
        with pytest.raises(CallCutError) as cut:
            for event in llm.run(goal, **options):
                events.append(event)
    assert "ran out of tokens in the middle of a call" in cut.value.message and made == []  # never made
    if cut.value.tool is not None:  # the name was written before the cut: the app hears it by name
        assert cut.value.tool == "save_note" and "save_note" in cut.value.message
        assert cut.value.arguments_text is not None
        assert PartialCall(1, "save_note", cut.value.arguments_text) in events
        assert CallStarted(1, "save_note") in events  # named while it was being written


@pytest.mark.model
def test_the_apps_typed_function_is_called_by_a_run_with_the_arguments_asked_for(address: str) -> None:
    calls: list[tuple[str, str, str]] = []

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
        """Get the current weather in a city.

        Args:
            city: the city's name as the user wrote it, e.g. "Oslo"
            unit: the temperature unit to report in
        """
        calls.append((city, unit, threading.current_thread().name))
        return {"city": city, "temperature": 21, "unit": unit, "sky": "sunny"}

    with LLMClient.connect(address=address) as llm:
        llm.register_tools([get_weather])
        events = list(llm.run("What is the weather in Oslo?", tool_choice="required", system_tools=[]))
    assert [(c[0].lower(), c[1]) for c in calls][:1] == [("oslo", "celsius")], calls
    assert calls[0][2] != threading.main_thread().name  # a sync tool runs on a thread, not the event loop
    first = next(e for e in events if isinstance(e, ToolResult))
    assert first.tool == "get_weather" and first.observation["sky"] == "sunny"
    result = events[-1]
    assert isinstance(result, RunResult) and result.answer, events


@pytest.mark.model
def test_breaking_out_of_a_run_cancels_it_and_the_next_run_works(address: str, known_token: str) -> None:
    with LLMClient.connect(address=address) as llm:
        got = []
        for event in llm.run(STORY, tool_choice="none", max_tokens=90):
            got.append(event)
            if isinstance(event, TextDelta):
                assert _task_exists(llm, known_token)
                break  # the app has seen enough
        assert got and isinstance(got[-1], TextDelta)
        assert _active_requests(llm) == 0  # nothing is generating for nobody
        assert not _task_exists(llm, known_token)  # and the task is gone
        after = list(llm.run("Say hello.", tool_choice="none", max_tokens=16))
        assert isinstance(after[-1], RunResult) and after[-1].answer


@pytest.mark.model
def test_cancelling_the_task_that_follows_a_run_cancels_the_run(address: str) -> None:
    async def main() -> tuple[int, int]:
        client = await AsyncLLMClient.connect(address=address)
        try:
            first = asyncio.Event()

            async def follow() -> None:
                async for event in client.run(STORY, tool_choice="none", max_tokens=90):
                    if isinstance(event, TextDelta):
                        first.set()

            task = asyncio.create_task(follow())
            await asyncio.wait_for(first.wait(), 120)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            status = await client.status()
            return int(status["active_requests"]), len([e async for e in client.run("Hi", max_tokens=8)])
        finally:
            client.close()

    active, events_after = asyncio.run(main())
    assert active == 0 and events_after >= 1


@pytest.mark.model
def test_only_llmosd_may_call_the_apps_tools_and_only_its_signals_count(
    address: str, known_token: str
) -> None:
    """Another connection on the bus can neither run the app's tools nor feed its run forged text."""
    calls: list[str] = []

    def get_time(city: str) -> str:
        """The time now in a city.

        Args:
            city: the city's name
        """
        calls.append(city)
        return "12:00"

    async def main() -> tuple[Message, list[object]]:
        client = await AsyncLLMClient.connect(address=address)
        other = await MessageBus(bus_address=address).connect()
        try:
            provider = await client.register_tools([get_time], path="/org/example/Clock")
            call = Message(
                destination=client.bus.unique_name,
                path=provider.path,
                interface="org.llmos.ToolProvider1",
                member="Call",
                signature="ss",
                body=["get_time", '{"city": "Oslo"}'],
            )
            refused = await other.call(call)
            events: list[object] = []
            async for event in client.run(STORY, tool_choice="none", max_tokens=60):
                if not events:  # forged text on the task's own path, from another connection
                    node = f"/org/llmos/Agent1/task/{client.bus.unique_name[1:].replace('.', '_')}"
                    for member, sig, body in [
                        ("StepText", "us", [1, "FORGED"]),
                        ("Result", "ua{sv}", [0, {"answer": Variant("s", "FORGED")}]),
                    ]:
                        forged = Message(
                            message_type=MessageType.SIGNAL,
                            destination=client.bus.unique_name,
                            path=f"{node}/{known_token}",
                            interface=TASK1,
                            member=member,
                            signature=sig,
                            body=body,
                        )
                        await other.send(forged)
                events.append(event)
            return refused, events
        finally:
            other.disconnect()
            client.close()

    refused, events = asyncio.run(main())
    assert refused.message_type == MessageType.ERROR and refused.error_name.endswith("AccessDenied")
    assert calls == []
    assert not any("FORGED" in (getattr(e, "text", "") + getattr(e, "answer", "")) for e in events)
    assert isinstance(events[-1], RunResult) and events[-1].answer  # llmosd's own Result, after the forgery

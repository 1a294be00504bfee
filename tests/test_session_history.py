"""CreateSession with history of every role (like Chrome's initialPrompts), on the real default model:
taken as said, counted against the context, refused by name when it cannot fit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_harness import Daemon, PrivateBus
from http_harness import real_store

pytestmark = pytest.mark.model
NAME, ROOT = "org.llmos.LLM1", "/org/llmos/LLM1"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("history")
    bus = PrivateBus(tmp)
    daemon = Daemon(bus.address, real_store(tmp, default_gguf))
    yield bus.address
    daemon.stop_cleanly()
    bus.stop()


async def _call(bus: MessageBus, path: str, iface: str, member: str, sig: str, body: list[Any]) -> Any:
    reply = await bus.call(
        Message(destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body)
    )
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0]}
    return reply.body


async def _session(address: str, history: list[dict[str, str]], prompt: str | None) -> Any:
    bus = await MessageBus(bus_address=address).connect()
    try:
        made = await _call(
            bus, ROOT, NAME, "CreateSession", "a{sv}", [{"messages": Variant("aa{ss}", history)}]
        )
        if isinstance(made, dict) or prompt is None:
            return made
        opts = {"max_tokens": Variant("u", 24)}
        text, stats = await _call(bus, made[0], "org.llmos.Session1", "Prompt", "sa{sv}", [prompt, opts])
        return text, {k: v.value for k, v in stats.items()}
    finally:
        bus.disconnect()


HISTORY = [
    {"role": "system", "content": "You remember what the user tells you."},
    {"role": "user", "content": "My name is Ada and my cat is called Pixel."},
    {"role": "assistant", "content": "Nice to meet you, Ada! Pixel is a lovely name for a cat."},
    {"role": "tool", "content": '{"weather": "sunny"}'},
]


def test_history_of_every_role_is_the_conversation(address: str) -> None:
    text, stats = asyncio.run(_session(address, HISTORY, "What is my cat called?"))
    assert stats["tokens_in"] > 60  # the whole history was the prompt, not just the question
    assert "Pixel" in text


def test_history_over_the_context_is_refused_naming_both_lengths(address: str) -> None:
    long = [{"role": "user", "content": "word " * 9000}]
    out = asyncio.run(_session(address, long, None))
    assert out["error"] == "org.llmos.Error.ContextOverflow"
    assert "8192" in out["message"] and any(w.isdigit() and int(w) > 8192 for w in out["message"].split())


@pytest.mark.parametrize(
    "bad",
    [
        [{"role": "wizard", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": "x", "extra": "y"}],
    ],
)
def test_malformed_history_is_invalid_argument(address: str, bad: list[dict[str, str]]) -> None:
    out = asyncio.run(_session(address, bad, None))
    assert out["error"] == "org.llmos.Error.InvalidArgument"

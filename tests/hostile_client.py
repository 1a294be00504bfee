"""Clients that try to hurt llmosd, for tests/test_reliability.py: each a real process on the bus.

python tests/hostile_client.py ADDRESS COMMAND [ARGS...]

stall             GetStatus round trips back to back until stdin closes; then prints
                  {"calls", "worst_ms", "median_ms"}: how long another caller waited at worst.
big KIB           one big input through every method that takes text (CreateSession's system_prompt,
                  Session1.Prompt, Generate, CountTokens, Agent1.Run's goal), KIB KiB of text each;
                  prints {"METHOD": {"error", "message", "seconds"}} (or "ok") per method.
churn N MODE      N connections, each with a session (and MODE "stream": a running PromptStream, or
                  "turn": one finished turn, whose KV is parked), printing {"ready": N} once all
                  are in place; then waits to be killed (or for stdin to close: then it drops the
                  connections without Close, all at once).
forge TARGET PATH IFACE   sends forged signals (Chunk/Response or Step/Result, by IFACE) to the
                  connection TARGET at PATH until stdin closes; prints {"sent": n}.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import time
from typing import Any

from bus_client import CallError, call, say  # the ordinary test app's helpers (same directory)
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

ROOT = "/org/llmos/LLM1"
FORGED = "FORGED-BY-ANOTHER-USER"
# text that tokenizes like prose, and a filler for sizes: what a careless or hostile app would send
PROSE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "


async def stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def stall(bus: MessageBus) -> None:
    times: list[float] = []
    done = asyncio.ensure_future(stdin_closed())
    say({"watching": True})
    while not done.done():
        t0 = time.perf_counter()
        await call(bus, ROOT, "org.llmos.LLM1", "GetStatus", "", [])
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(0.005)
    say(
        {
            "calls": len(times),
            "worst_ms": max(times) * 1000,
            "median_ms": statistics.median(times) * 1000,
        }
    )


async def big(bus: MessageBus, kib: str) -> None:
    text = (PROSE * (int(kib) * 1024 // len(PROSE) + 1))[: int(kib) * 1024]
    (session,) = await call(bus, ROOT, "org.llmos.LLM1", "CreateSession", "a{sv}", [{}])
    attempts = {
        "CreateSession": (
            ROOT,
            "org.llmos.LLM1",
            "CreateSession",
            "a{sv}",
            [{"system_prompt": Variant("s", text)}],
        ),
        "Prompt": (session, "org.llmos.Session1", "Prompt", "sa{sv}", [text, {}]),
        "Generate": (ROOT, "org.llmos.LLM1", "Generate", "sa{sv}", [text, {}]),
        "CountTokens": (ROOT, "org.llmos.LLM1", "CountTokens", "s", [text]),
        "Run": ("/org/llmos/Agent1", "org.llmos.Agent1", "Run", "sa{sv}", [text, {}]),
    }
    out: dict[str, Any] = {}
    for name, (path, iface, member, sig, body) in attempts.items():
        t0 = time.perf_counter()
        try:
            await call(bus, path, iface, member, sig, list(body))
            out[name] = {"ok": True, "seconds": time.perf_counter() - t0}
        except CallError as e:
            out[name] = {"error": e.name, "message": e.message, "seconds": time.perf_counter() - t0}
    say(out)


async def churn(address: str, n: str, mode: str) -> None:
    buses = []
    for i in range(int(n)):
        bus = await MessageBus(bus_address=address).connect()
        (session,) = await call(bus, ROOT, "org.llmos.LLM1", "CreateSession", "a{sv}", [{}])
        if mode == "stream":
            opts = {
                "max_tokens": Variant("u", 1000),
                "ignore_eos": Variant("b", True),
                "handle_token": Variant("s", f"c{i}"),
            }
            await call(
                bus, session, "org.llmos.Session1", "PromptStream", "sa{sv}", ["Tell me a story.", opts]
            )
        else:
            await call(
                bus,
                session,
                "org.llmos.Session1",
                "Prompt",
                "sa{sv}",
                ["Hi.", {"max_tokens": Variant("u", 2)}],
            )
        buses.append(bus)
    say({"ready": len(buses)})
    await stdin_closed()
    for bus in buses:  # no Close: the connection just goes
        bus.disconnect()
    say({"dropped": len(buses)})


async def forge(bus: MessageBus, path: str, iface: str) -> None:
    """Forge signals to every connection that joins the bus after this one, at `path` (where
    "{unique}" stands for the target's unique name as llmosd writes it in paths), and look for
    other connections' task and request objects by introspection all along."""
    if iface == "org.llmos.Request1":
        forged = [("Chunk", "s", [FORGED]), ("Response", "ua{sv}", [0, {"text": Variant("s", FORGED)}])]
    else:
        step = json.dumps({"step": 1, "answer": FORGED})
        forged = [("Step", "s", [step]), ("Result", "ua{sv}", [0, {"answer": Variant("s", FORGED)}])]
    targets: list[str] = []

    def on_message(msg: Message) -> None:
        if msg.sender == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged":
            name, old, new = msg.body
            if name.startswith(":") and not old and new and name != bus.unique_name:
                targets.append(name)

    bus.add_message_handler(on_message)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"],
        )
    )
    done = asyncio.ensure_future(stdin_closed())
    sent, children = 0, set()
    say({"forging": True})
    while not done.done():
        for target in targets:
            where = path.replace("{unique}", target.lstrip(":").replace(".", "_"))
            for member, sig, body in forged:
                await bus.send(
                    Message(
                        message_type=MessageType.SIGNAL,
                        destination=target,
                        path=where,
                        interface=iface,
                        member=member,
                        signature=sig,
                        body=body,
                    )
                )
                sent += 1
        for node in ("/org/llmos/Agent1", "/org/llmos/Agent1/task", "/org/llmos/LLM1/request"):
            (xml,) = await call(bus, node, "org.freedesktop.DBus.Introspectable", "Introspect", "", [])
            children.update(f"{node}/{n}" for n in re.findall(r'<node name="([^"/][^"]*)"', xml))
        await asyncio.sleep(0.002)
    say({"sent": sent, "targets": len(targets), "children": sorted(children)})


async def victim(bus: MessageBus, max_tokens: str) -> None:
    """An app using the client library to stream an answer, with a request path an attacker knows
    (the handle token's random part fixed): what it prints is what its user would see."""
    import secrets

    from system_services.client import AsyncLLMClient

    secrets.token_hex = lambda n=8: ("feedbeef" * 8)[: 2 * n]  # the attacker's best case: a known path
    client = AsyncLLMClient(bus)
    await asyncio.sleep(0.5)  # the attacker has seen this connection arrive and is forging at it
    session = await client.create_session()
    pieces = [
        p async for p in session.stream("Tell me a story.", max_tokens=int(max_tokens), ignore_eos=True)
    ]
    say({"text": "".join(pieces), "stats": session.last_stats})


async def main(address: str, cmd: str, args: list[str]) -> None:
    if cmd == "churn":
        await churn(address, *args)
        return
    bus = await MessageBus(bus_address=address).connect()
    await {"stall": stall, "big": big, "forge": forge, "victim": victim}[cmd](bus, *args)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))

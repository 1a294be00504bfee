"""What hostile local apps send the options and the daemon's standard interfaces, and what they get:
NaN and infinite sampling values are named as such, and Peer answers on any bus.

In process where the rule lives in one function; otherwise through llmosd (tiny random-weight model) on a
private dbus-daemon.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus
from dbus_harness import Daemon, PrivateBus, busctl, tiny_store

from system_services.options import parse_options
from system_services.private_bus import read_machine_id

NAME, LLM_PATH, LLM = "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1"
AGENT_PATH, AGENT = "/org/llmos/Agent1", "org.llmos.Agent1"


# -- in process --------------------------------------------------------------------------------------------
def no_recursion_in(log: list[str]) -> None:
    assert not [line for line in log if "Traceback" in line or "RecursionError" in line], "\n".join(log)


@pytest.mark.parametrize("key", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize(
    ("value", "said"), [(math.nan, "NaN"), (math.inf, "infinity"), (-math.inf, "-infinity")]
)
def test_nan_and_infinite_sampling_values_are_named_as_such(key: str, value: float, said: str) -> None:
    with pytest.raises(Exception) as got:
        parse_options({key: Variant("d", value)}, default_max_tokens=8, max_tokens_limit=8)
    assert got.value.type == "org.llmos.Error.InvalidArgument"
    assert got.value.text == f"invalid generation options: {key}: must be a finite number, not {said}"


# -- through the service -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def store(tmp: Path) -> Path:
    return tiny_store(tmp)


@pytest.fixture(scope="module")
def bus(tmp: Path) -> Iterator[PrivateBus]:
    b = PrivateBus(tmp)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(tmp: Path, store: Path, bus: PrivateBus) -> Iterator[Daemon]:
    config = tmp / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[apps.default]\nsystem_tools = []\n')
    d = Daemon(bus.address, store, "--config", str(config), "--threads", "2")
    yield d
    d.stop_cleanly()
    no_recursion_in(d.log)


def test_nan_over_dbus_is_named_as_nan(bus: PrivateBus, daemon: Daemon) -> None:
    for key, value, said in (("temperature", "nan", "NaN"), ("top_p", "inf", "infinity")):
        r = busctl(bus.address, "call", NAME, LLM_PATH, LLM, "Generate", "sa{sv}", "Hi", "1", key, "d", value)
        assert r.returncode != 0
        assert f"{key}: must be a finite number, not {said}" in r.stderr, r.stderr

    async def run_with_nan() -> tuple[str, str]:
        conn = await MessageBus(bus_address=bus.address).connect()
        try:
            opts = {"repetition_penalty": Variant("d", math.nan)}
            reply = await conn.call(
                Message(
                    destination=NAME,
                    path=LLM_PATH,
                    interface=LLM,
                    member="Generate",
                    signature="sa{sv}",
                    body=["Hi", opts],
                )
            )
            run = await conn.call(
                Message(
                    destination=NAME,
                    path=AGENT_PATH,
                    interface=AGENT,
                    member="Run",
                    signature="sa{sv}",
                    body=["Hi", {"temperature": Variant("d", math.nan)}],
                )
            )
        finally:
            conn.disconnect()
        return reply.body[0], run.body[0]

    generate, run = asyncio.run(run_with_nan())
    assert generate.endswith("repetition_penalty: must be a finite number, not NaN")
    assert run.endswith("temperature: must be a finite number, not NaN")


def test_peer_ping_and_get_machine_id_answer_on_any_path(
    tmp_path: Path, store: Path, bus: PrivateBus, daemon: Daemon
) -> None:
    """Here, and on a bus whose policy (like the stock system bus's) lets nobody call the bus driver's
    Peer interface, which is where dbus-fast would have asked for the machine id."""
    deny = '<deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>'
    strict = PrivateBus(tmp_path, rules=deny)
    config = tmp_path / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    other = Daemon(strict.address, store, "--config", str(config))
    try:
        machine_id = read_machine_id()
        assert machine_id is not None  # this machine has one; without it the answer is a named Failed
        for address in (bus.address, strict.address):
            for path in (LLM_PATH, AGENT_PATH, "/", "/no/such/object"):
                ping = busctl(address, "call", NAME, path, "org.freedesktop.DBus.Peer", "Ping")
                assert ping.returncode == 0, ping.stderr
                got = busctl(address, "call", NAME, path, "org.freedesktop.DBus.Peer", "GetMachineId")
                assert got.returncode == 0, got.stderr
                assert got.stdout.strip() == f's "{machine_id}"'
    finally:
        other.stop_cleanly()
        strict.stop()

"""The built-in system tools against real buses and real stand-in services.

Each test runs private dbus-daemons (one playing the system bus through DBUS_SYSTEM_BUS_ADDRESS, one the
session bus llmosd serves on), and the services as separate processes: tests/fixtures/fake_upower.py and
tests/fixtures/fake_notifications.py. SystemTools itself runs in the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_harness import SESSION_BUS_CONFIG, PrivateBus, wait_until

from system_services.system_tools import (
    NO_USER_SESSION,
    SYSTEM_OWNER,
    SYSTEM_TOOL_NAMES,
    SystemTools,
    check_arguments,
)

FIXTURES = Path(__file__).with_name("fixtures")
APP = "org.example.Notes"


class FakeService:
    """A stand-in service process; its stdout lines are collected as they come."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FIXTURES / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            first = self._lines.get(timeout=30)
        except queue.Empty:
            first = ""
        if first != "ready":
            self.stop()
            raise RuntimeError(f"{script} did not start: {first!r} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.received: list[dict[str, Any]] = []

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def collect(self) -> list[dict[str, Any]]:
        """Every JSON line printed so far."""
        while True:
            try:
                self.received.append(json.loads(self._lines.get_nowait()))
            except queue.Empty:
                return self.received

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def system_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A private bus that dbus-fast takes for the system bus."""
    (tmp_path / "system").mkdir()
    bus = PrivateBus(tmp_path / "system")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    yield bus
    bus.stop()


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    (tmp_path / "session").mkdir()
    bus = PrivateBus(tmp_path / "session")
    yield bus
    bus.stop()


@pytest.fixture
def spawn() -> Iterator[Callable[..., FakeService]]:
    started: list[FakeService] = []

    def start(script: str, *args: str) -> FakeService:
        started.append(FakeService(script, *args))
        return started[-1]

    yield start
    for service in started:
        service.stop()


def upower(spawn: Callable[..., FakeService], address: str, **values: Any) -> FakeService:
    return spawn("fake_upower.py", address, json.dumps(values))


@contextlib.asynccontextmanager
async def system_tools(
    address: str, *, on_system_bus: bool = False, call_timeout_s: float = 5.0
) -> AsyncIterator[SystemTools]:
    """SystemTools as llmosd would hold it: on a connection to the bus it serves on."""
    bus = await asyncio.wait_for(MessageBus(bus_address=address).connect(), 10)
    tools = SystemTools(bus, on_system_bus=on_system_bus, call_timeout_s=call_timeout_s)
    try:
        yield tools
    finally:
        await tools.close()
        bus.disconnect()


async def unique_names(address: str) -> set[str]:
    """The connections on a bus, as an outside observer sees them (the observer left out)."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="ListNames",
            )
        )
        return {n for n in reply.body[0] if n.startswith(":") and n != bus.unique_name}
    finally:
        bus.disconnect()


# -- current_time ----------------------------------------------------------------------------------
def test_current_time_is_the_local_clock(session_bus: PrivateBus) -> None:
    async def go() -> dict[str, Any]:
        async with system_tools(session_bus.address) as tools:
            assert (await tools.availability(["current_time"])) == {"current_time": None}
            return await tools.call("current_time", {}, app_id=APP)

    before = time.time()
    got = asyncio.run(go())
    assert set(got) == {"iso", "date", "time", "weekday", "timezone", "utc_offset", "unix"}
    assert before - 1 <= got["unix"] <= time.time() + 1
    now = datetime.fromisoformat(got["iso"])
    assert abs(now.timestamp() - time.time()) < 5
    local = datetime.now().astimezone()
    assert now.utcoffset() == local.utcoffset()
    assert got["date"] == now.strftime("%Y-%m-%d")
    assert got["time"] == now.strftime("%H:%M")
    assert got["weekday"] == now.strftime("%A")
    assert got["iso"].endswith(got["utc_offset"])
    assert got["timezone"] == local.tzname()


def test_current_time_follows_tz(session_bus: PrivateBus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-hour zone shows the offset exactly, and the wall time is UTC plus it."""
    monkeypatch.setenv("TZ", "XYZ-5:30")  # POSIX: zone "XYZ", 5 h 30 min east of UTC
    time.tzset()
    try:

        async def go() -> dict[str, Any]:
            async with system_tools(session_bus.address) as tools:
                return await tools.call("current_time", {}, app_id=APP)

        got = asyncio.run(go())
    finally:
        monkeypatch.undo()
        time.tzset()
    assert got["timezone"] == "XYZ"
    assert got["utc_offset"] == "+05:30"
    assert got["iso"].endswith("+05:30")
    expected = datetime.fromtimestamp(got["unix"], UTC) + timedelta(hours=5, minutes=30)
    assert got["time"] == expected.strftime("%H:%M")
    assert got["date"] == expected.strftime("%Y-%m-%d")


# -- battery_status --------------------------------------------------------------------------------
def test_battery_discharging_comes_through(
    system_bus: PrivateBus, session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    upower(
        spawn,
        system_bus.address,
        on_battery=True,
        present=True,
        percentage=42.5,
        state=2,
        time_to_empty=3600,
        time_to_full=0,
    )

    async def go() -> None:
        before = await unique_names(system_bus.address)
        async with system_tools(session_bus.address) as tools:
            assert (await tools.availability(["battery_status"])) == {"battery_status": None}
            [tool] = await tools.usable(["battery_status"])
            assert (tool.spec.name, tool.owner, tool.app_id, tool.path) == (
                "battery_status",
                SYSTEM_OWNER,
                "llmos",
                "",
            )
            assert tool.spec.shared and not tool.spec.confirm
            got = await tools.call("battery_status", {}, app_id=APP)
            assert got == {
                "on_battery": True,
                "battery_present": True,
                "percentage": 42.5,
                "state": "discharging",
                "time_to_empty_s": 3600,
            }
            # One connection to the system bus, made when first needed and kept for later calls.
            assert len(await unique_names(system_bus.address) - before) == 1
            assert (await tools.call("battery_status", {}, app_id=APP))["percentage"] == 42.5
            assert len(await unique_names(system_bus.address) - before) == 1
        # close() let go of it.
        for _ in range(50):
            if await unique_names(system_bus.address) == before:
                break
            await asyncio.sleep(0.05)
        assert await unique_names(system_bus.address) == before

    asyncio.run(go())


@pytest.mark.parametrize(
    ("state", "name", "on_battery", "to_empty", "to_full", "expected_times"),
    [
        (1, "charging", False, 0, 1200, {"time_to_full_s": 1200}),
        (4, "fully-charged", False, 0, 0, {}),
        (6, "pending-discharge", True, 0, 0, {}),
        (0, "unknown", False, 0, 0, {}),
    ],
)
def test_battery_states_are_named(
    system_bus: PrivateBus,
    session_bus: PrivateBus,
    spawn: Callable[..., FakeService],
    state: int,
    name: str,
    on_battery: bool,
    to_empty: int,
    to_full: int,
    expected_times: dict[str, int],
) -> None:
    upower(
        spawn,
        system_bus.address,
        on_battery=on_battery,
        present=True,
        percentage=80.0,
        state=state,
        time_to_empty=to_empty,
        time_to_full=to_full,
    )

    async def go() -> Any:
        async with system_tools(session_bus.address) as tools:
            return await tools.call("battery_status", {}, app_id=APP)

    assert asyncio.run(go()) == {
        "on_battery": on_battery,
        "battery_present": True,
        "percentage": 80.0,
        "state": name,
        **expected_times,
    }


def test_no_battery_is_said_so(
    system_bus: PrivateBus, session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    upower(spawn, system_bus.address, on_battery=False, present=False, percentage=0.0, state=0)

    async def go() -> Any:
        async with system_tools(session_bus.address) as tools:
            assert (await tools.availability(["battery_status"]))["battery_status"] is None
            return await tools.call("battery_status", {}, app_id=APP)

    assert asyncio.run(go()) == {"battery_present": False, "on_battery": False}


def test_upower_absent_is_reported(system_bus: PrivateBus, session_bus: PrivateBus) -> None:
    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            reason = (await tools.availability(["battery_status"]))["battery_status"]
            assert reason == "UPower (org.freedesktop.UPower) is not running on the system bus"
            usable = [t.spec.name for t in await tools.usable(SYSTEM_TOOL_NAMES)]
            assert "battery_status" not in usable
            assert "current_time" in usable
            got = await tools.call("battery_status", {}, app_id=APP)
            assert set(got) == {"error"}
            assert "UPower" in got["error"] and "not running" in got["error"]

    asyncio.run(go())


def test_upower_leaving_is_noticed(
    system_bus: PrivateBus, session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    """Availability is asked each time: a service that stops is not offered from an old answer."""
    fake = upower(spawn, system_bus.address, present=True, percentage=10.0, state=2)

    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            assert (await tools.availability(["battery_status"]))["battery_status"] is None
            fake.stop()
            await asyncio.sleep(0.2)  # the bus sees it go
            assert "not running" in str((await tools.availability(["battery_status"]))["battery_status"])
            assert "UPower" in (await tools.call("battery_status", {}, app_id=APP))["error"]

    asyncio.run(go())


def test_no_system_bus_is_reported(
    session_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-socket")

    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            reasons = await tools.availability(SYSTEM_TOOL_NAMES)
            assert str(reasons["battery_status"]).startswith("no system bus (cannot connect: ")
            assert reasons["current_time"] is None
            got = await tools.call("battery_status", {}, app_id=APP)
            assert got["error"].startswith("no system bus (cannot connect: ")

    asyncio.run(go())


# -- send_notification -----------------------------------------------------------------------------
def test_notification_arrives_with_the_app_id(
    session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    fake = spawn("fake_notifications.py", session_bus.address)

    async def go() -> list[Any]:
        async with system_tools(session_bus.address) as tools:
            assert (await tools.availability(["send_notification"])) == {"send_notification": None}
            return [
                await tools.call(
                    "send_notification", {"summary": "Tea is ready", "body": "Steeped 4 min"}, app_id=APP
                ),
                await tools.call("send_notification", {"summary": "No body"}, app_id="org.example.Other"),
            ]

    assert asyncio.run(go()) == [{"sent": True, "id": 1}, {"sent": True, "id": 2}]
    # the fake prints what it received as it answers: under load its lines can trail the replies
    wait_until(lambda: len(fake.collect()) >= 2, 10)
    assert fake.collect() == [
        {
            "app_name": APP,
            "replaces_id": 0,
            "app_icon": "",
            "summary": "Tea is ready",
            "body": "Steeped 4 min",
            "actions": [],
            "hints": {},
            "expire_timeout": -1,
        },
        {
            "app_name": "org.example.Other",
            "replaces_id": 0,
            "app_icon": "",
            "summary": "No body",
            "body": "",
            "actions": [],
            "hints": {},
            "expire_timeout": -1,
        },
    ]


def test_notifications_absent_is_reported(session_bus: PrivateBus) -> None:
    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            reason = (await tools.availability(["send_notification"]))["send_notification"]
            assert reason == (
                "the notification service (org.freedesktop.Notifications) is not running on the session bus"
            )
            assert [t.spec.name for t in await tools.usable(["send_notification"])] == []
            got = await tools.call("send_notification", {"summary": "hello"}, app_id=APP)
            assert "notification service" in got["error"] and "not running" in got["error"]

    asyncio.run(go())


def test_activatable_notification_service_counts_and_starts(tmp_path: Path) -> None:
    """A notification server the bus starts on demand (as dunst or mako often are) is not "absent"."""
    services = tmp_path / "services"
    services.mkdir()
    socket = tmp_path / "bus.socket"
    address = f"unix:path={socket}"
    (services / "org.freedesktop.Notifications.service").write_text(
        "[D-BUS Service]\nName=org.freedesktop.Notifications\n"
        f"Exec={sys.executable} {FIXTURES / 'fake_notifications.py'} {address}\n"
    )
    config = tmp_path / "bus.conf"
    # The harness's session-bus configuration, plus a directory of services the bus may start.
    config.write_text(
        SESSION_BUS_CONFIG.format(socket=socket, own="allow").replace(
            "<auth>", f"<servicedir>{services}</servicedir>\n  <auth>"
        )
    )
    daemon = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip()

        async def go() -> None:
            async with system_tools(address) as tools:
                assert (await tools.availability(["send_notification"])) == {"send_notification": None}
                got = await tools.call("send_notification", {"summary": "started for this"}, app_id=APP)
                assert got == {"sent": True, "id": 1}  # answered by the fake the bus started

        asyncio.run(go())
    finally:
        daemon.terminate()  # the activated fake leaves with its bus
        daemon.wait(timeout=10)


def test_system_bus_daemon_has_no_notifications_but_reads_upower(
    system_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: Callable[..., FakeService]
) -> None:
    """On the system bus llmosd cannot reach anyone's desktop, even if something there owns the
    notifications name; UPower it reaches over its own bus, not a second connection."""
    upower(spawn, system_bus.address, on_battery=True, present=True, percentage=55.0, state=2)
    fake = spawn("fake_notifications.py", system_bus.address)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-socket")

    async def go() -> None:
        async with system_tools(system_bus.address, on_system_bus=True) as tools:
            reasons = await tools.availability(SYSTEM_TOOL_NAMES)
            assert reasons == {
                "current_time": None,
                "battery_status": None,
                "send_notification": NO_USER_SESSION,
            }
            assert [t.spec.name for t in await tools.usable(SYSTEM_TOOL_NAMES)] == [
                "current_time",
                "battery_status",
            ]
            got = await tools.call("send_notification", {"summary": "hello"}, app_id=APP)
            assert got == {"error": NO_USER_SESSION}
            battery = await tools.call("battery_status", {}, app_id=APP)
            assert battery["percentage"] == 55.0 and battery["state"] == "discharging"

    asyncio.run(go())
    time.sleep(0.2)
    assert fake.collect() == []  # nothing was sent


def test_invalid_arguments_are_refused_and_nothing_is_sent(
    session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    fake = spawn("fake_notifications.py", session_bus.address)
    bad: list[tuple[str, Any, str]] = [
        ("send_notification", {}, "'summary' is missing"),
        ("send_notification", {"body": "no summary"}, "'summary' is missing"),
        ("send_notification", {"summary": ""}, "under 1 characters"),
        ("send_notification", {"summary": "x" * 201}, "over 200 characters"),
        ("send_notification", {"summary": "hi", "body": "y" * 1001}, "over 1000 characters"),
        ("send_notification", {"summary": "hi", "urgency": "high"}, "'urgency' is not a parameter"),
        ("send_notification", {"summary": 5}, "must be string"),
        ("send_notification", {"summary": "nul\0inside"}, "NUL"),
        ("send_notification", {"summary": "half \ud800 pair"}, "surrogate"),
        ("send_notification", ["not", "an", "object"], "not a JSON object"),
        ("current_time", {"zone": "UTC"}, "'zone' is not a parameter"),
        ("battery_status", {"verbose": True}, "'verbose' is not a parameter"),
    ]

    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            for name, arguments, why in bad:
                got = await tools.call(name, arguments, app_id=APP)
                assert set(got) == {"error"}, (name, arguments, got)
                assert got["error"].startswith(f"invalid arguments for {name}: ")
                assert why in got["error"], (arguments, got)
            assert await tools.call("no_such_tool", {}, app_id=APP) == {
                "error": "there is no system tool named 'no_such_tool'"
            }
            assert (await tools.availability(["no_such_tool"]))["no_such_tool"]
            # The longest valid notification still goes through, and is the first the server sees.
            ok = {"summary": "s" * 200, "body": "b" * 1000}
            assert await tools.call("send_notification", ok, app_id=APP) == {"sent": True, "id": 1}

    asyncio.run(go())
    wait_until(lambda: len(fake.collect()) >= 1, 10)
    [only] = fake.collect()
    assert (only["summary"], only["body"]) == ("s" * 200, "b" * 1000)


def test_silent_notification_service_times_out(
    session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    fake = spawn("fake_notifications.py", session_bus.address, "silent")

    async def go() -> tuple[Any, float]:
        async with system_tools(session_bus.address, call_timeout_s=0.5) as tools:
            t0 = time.monotonic()
            got = await tools.call("send_notification", {"summary": "anyone?"}, app_id=APP)
            return got, time.monotonic() - t0

    got, took = asyncio.run(go())
    assert got == {
        "error": "the notification service (org.freedesktop.Notifications) did not answer within 0.5 s"
    }
    assert 0.4 <= took < 2.0
    wait_until(lambda: len(fake.collect()) >= 1, 10)
    assert [n["summary"] for n in fake.collect()] == ["anyone?"]  # it arrived; the server hung


def test_notification_service_dying_mid_call_is_an_error(
    session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    fake = spawn("fake_notifications.py", session_bus.address, "silent")

    async def go() -> tuple[Any, float]:
        async with system_tools(session_bus.address) as tools:
            call = asyncio.create_task(tools.call("send_notification", {"summary": "bye"}, app_id=APP))
            for _ in range(100):  # until the server holds the call
                if fake.collect():
                    break
                await asyncio.sleep(0.05)
            fake.proc.kill()
            t0 = time.monotonic()
            got = await call
            return got, time.monotonic() - t0

    got, took = asyncio.run(go())
    assert set(got) == {"error"}
    assert got["error"].startswith("the notification service (org.freedesktop.Notifications) gave no answer")
    assert took < 3.0  # told by the bus at once, not left to the 5 s timeout


# -- the specs -------------------------------------------------------------------------------------
def test_specs_are_json_schema_and_checked_as_jsonschema_would(session_bus: PrivateBus) -> None:
    """What a model is shown is a valid JSON Schema, and arguments that fit it are never refused."""

    async def go() -> list[Any]:
        async with system_tools(session_bus.address) as tools:
            return tools.specs()

    specs = {s.name: s for s in asyncio.run(go())}
    assert tuple(specs) == SYSTEM_TOOL_NAMES
    samples: list[Any] = [
        {},
        {"summary": "a"},
        {"summary": "a", "body": ""},
        {"summary": "a" * 200, "body": "é" * 1000},
        {"summary": "a" * 201},
        {"summary": ""},
        {"summary": 1},
        {"summary": "a", "body": None},
        {"summary": "a", "other": 1},
        {"other": 1},
        [],
        "text",
    ]
    for spec in specs.values():
        assert spec.shared and not spec.confirm
        assert spec.parameters["additionalProperties"] is False
        jsonschema.Draft202012Validator.check_schema(spec.parameters)
        validator = jsonschema.Draft202012Validator(spec.parameters)
        for sample in samples:
            assert (check_arguments(spec.parameters, sample) is None) == validator.is_valid(sample), (
                spec.name,
                sample,
            )


def test_availability_of_all_tools_at_once_is_prompt(
    system_bus: PrivateBus, session_bus: PrivateBus, spawn: Callable[..., FakeService]
) -> None:
    """With every service up, all three are usable, asked in one go, in the order asked."""
    upower(spawn, system_bus.address, present=True, percentage=99.0, state=4)
    spawn("fake_notifications.py", session_bus.address)

    async def go() -> None:
        async with system_tools(session_bus.address) as tools:
            t0 = time.monotonic()
            names = ["send_notification", "current_time", "battery_status", "current_time"]
            assert [t.spec.name for t in await tools.usable(names)] == [
                "send_notification",
                "current_time",
                "battery_status",
            ]
            assert time.monotonic() - t0 < 2.0

    asyncio.run(go())
    assert os.environ["DBUS_SYSTEM_BUS_ADDRESS"] == system_bus.address

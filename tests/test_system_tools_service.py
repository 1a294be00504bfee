"""The built-in system tools through the real service: a run reads the battery from UPower and sends a
desktop notification, with UPower on a system-like bus and the notification server on the daemon's
session bus (both real processes: tests/fixtures/fake_upower.py, fake_notifications.py); policy decides
which apps get them; a service that is gone is reported, not faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, app_python, client

from llmos.model_store import ModelStore

FIXTURES = REPO / "tests" / "fixtures"
BATTERY = {"on_battery": True, "present": True, "percentage": 42.5, "state": 2, "time_to_empty": 3600}


def service(script: str, address: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURES / script), address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


class Setup:
    def __init__(self, tmp: Path, store: Path) -> None:
        (tmp / "system").mkdir()
        self.system = PrivateBus(tmp / "system")  # stands in for the system bus, where UPower lives
        self.session = PrivateBus(tmp)
        self.upower = service("fake_upower.py", self.system.address, json.dumps(BATTERY))
        self.notifications = service("fake_notifications.py", self.session.address)
        config = tmp / "llmosd.toml"
        config.write_text(
            f'state_dir = "{tmp / "state"}"\n[apps."org.example.Locked"]\nsystem_tools = ["current_time"]\n'
        )
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.system.address}
        self.daemon = Daemon(self.session.address, store, "--config", str(config), "--threads", "2", env=env)

    def stop(self) -> None:
        self.daemon.stop_cleanly()
        for proc in (self.upower, self.notifications):
            proc.kill()
        self.session.stop()
        self.system.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("systools")
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf, make_default=True)
    s = Setup(tmp, store)
    yield s
    s.stop()


def run(s: Setup, tmp: Path, goal: str, app: Any = None, **options: Any) -> dict[str, Any]:
    path = tmp / f"setup-{len(list(tmp.glob('setup-*')))}.json"
    opts = {"tool_choice": "required", "max_steps": 2, "temperature": 0.0, "max_tokens": 200, **options}
    path.write_text(json.dumps({"register": False, "goal": goal, "options": opts}))
    return client(s.session.address, "agent-run", str(path), timeout=300, app=app)


@pytest.mark.model
def test_the_system_tools_are_listed_with_what_is_available(setup: Setup) -> None:
    tools = {t["name"]: t for t in client(setup.session.address, "list-tools")["tools"]}
    assert {n for n, t in tools.items() if t.get("system")} == {
        "current_time",
        "battery_status",
        "send_notification",
    }
    assert all(t["available"] for t in tools.values()), tools


@pytest.mark.model
def test_a_run_reads_the_battery_from_upower(setup: Setup, tmp_path: Path) -> None:
    out = run(setup, tmp_path, "How much battery is left?", system_tools=["battery_status"])
    assert out["code"] == 0, out
    first = out["steps"][0]
    assert first["tool"] == "battery_status"
    assert first["observation"]["percentage"] == 42.5 and first["observation"]["state"] == "discharging"
    assert first["observation"]["on_battery"] is True


@pytest.mark.model
def test_a_run_sends_a_desktop_notification_as_its_app(setup: Setup, tmp_path: Path) -> None:
    app = app_python(tmp_path, "org.example.Reminders")
    goal = "Show me a notification that says: time to stretch."
    out = run(setup, tmp_path, goal, app=app, system_tools=["send_notification"])
    assert out["code"] == 0, out
    first = out["steps"][0]
    assert first["tool"] == "send_notification" and first["observation"]["sent"] is True, first
    assert setup.notifications.stdout is not None
    received = json.loads(setup.notifications.stdout.readline())
    assert received["app_name"] == "org.example.Reminders"  # who asked, not "llmos"
    assert received["summary"] == first["arguments"]["summary"]


@pytest.mark.model
def test_policy_decides_which_apps_get_system_tools(setup: Setup, tmp_path: Path) -> None:
    locked = app_python(tmp_path, "org.example.Locked")
    listed = client(setup.session.address, "list-tools", app=locked)["tools"]
    assert [t["name"] for t in listed if t.get("system")] == ["current_time"]
    out = run(setup, tmp_path, "How much battery is left?", app=locked, system_tools=["battery_status"])
    assert out["error"] == "org.llmos.Error.AccessDenied" and "battery_status" in out["message"]
    out = run(setup, tmp_path, "Hi", system_tools=["format_disk"])
    assert out["error"] == "org.llmos.Error.InvalidArgument" and "format_disk" in out["message"]


@pytest.mark.model
def test_a_service_that_is_gone_is_reported_not_faked(setup: Setup, tmp_path: Path) -> None:
    setup.upower.terminate()
    setup.upower.wait(10)
    tools = {t["name"]: t for t in client(setup.session.address, "list-tools")["tools"]}
    assert not tools["battery_status"]["available"]
    assert "UPower" in tools["battery_status"]["unavailable"]
    out = run(setup, tmp_path, "How much battery is left?", system_tools=["battery_status"])
    assert out["code"] == 0, out
    assert all(s.get("tool") != "battery_status" for s in out["steps"])  # not offered: nothing made up

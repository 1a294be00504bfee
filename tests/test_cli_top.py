"""`llmosctl top` as a process, against llmosd (tiny model) on a private dbus-daemon, apps as processes."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, client, read_json, start_client, tiny_store

from system_services.cli_top import APP_WIDTH, clip, render


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("top"))


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    b = PrivateBus(tmp_path_factory.mktemp("bus"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(bus: PrivateBus, store: Path) -> Iterator[Daemon]:
    d = Daemon(bus.address, store)
    yield d
    assert d.stop() == 0


def top(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "system_services.cli", "top", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_once_on_an_idle_daemon_shows_the_header(bus: PrivateBus, daemon: Daemon) -> None:
    r = top("--once", "--address", bus.address)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert "tiny" in head and "ready" in head and "CPUExecutionProvider" in head, r.stdout
    assert "0 running, 0 queued" in r.stdout and "budget" in r.stdout
    assert "(no apps are using the model)" in r.stdout
    assert r.stdout.splitlines()[5].split()[:3] == ["APP", "CLASS", "SESS"]


def test_an_app_with_a_session_gets_a_row_and_json_parses(bus: PrivateBus, daemon: Daemon) -> None:
    owner = start_client(bus.address, "hold-session")
    try:
        read_json(owner)
        (app,) = client(bus.address, "status")["sessions_by_app"]  # the daemon names the app
        r = top("--once", "--address", bus.address)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        header = lines.index(next(line for line in lines if line.startswith("APP")))
        rows = [line.split() for line in lines[header + 1 :]]
        row = next(row for row in rows if row[0] == clip(app, APP_WIDTH))
        assert row[2] == "1" and row[3:5] == ["0", "0"], r.stdout  # SESS 1, nothing running or queued
        assert "sessions: 1" in r.stdout
        js = top("--once", "--json", "--address", bus.address)
        assert js.returncode == 0, js.stderr
        st = json.loads(js.stdout)
        assert st["state"] == "ready" and st["apps"][app]["sessions"] == 1
        long_id = "org.example.AVeryLongApplicationIdentifier"  # the real status, one more app: aligned
        st["apps"][long_id] = {**st["apps"][app], "sessions": 2}
        table = render(st)[5:8]
        assert any(line.startswith(clip(long_id, APP_WIDTH)) for line in table[1:])
        assert clip(long_id, APP_WIDTH).endswith("…")
        assert len({line.index("CPU") for line in table[1:]}) == 1 and table[0].index("DEVICE") == table[
            1
        ].index("CPU")
    finally:
        owner.communicate("", timeout=30)


def test_ctrl_c_on_a_terminal_exits_130_without_a_traceback(bus: PrivateBus, daemon: Daemon) -> None:
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "system_services.cli", "top", "--interval", "0.2", "--address", bus.address]
    proc = subprocess.Popen(cmd, stdout=follower, stderr=subprocess.PIPE, text=True, cwd=REPO)
    os.close(follower)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:  # redrawn in place
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)
        assert seen.count(b"\x1b[H\x1b[2J") >= 2 and b"CPUExecutionProvider" in seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        os.close(leader)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_bad_interval_is_a_usage_error() -> None:
    r = top("--interval", "0", "--once", "--address", "unix:path=/nonexistent/bus")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.splitlines()[-1]
        == "llmosctl top: error: argument --interval: 0 must be a number of seconds above 0"
    )


def test_no_daemon_and_a_daemon_going_away_are_one_line_errors(tmp_path: Path, store: Path) -> None:
    empty = PrivateBus(tmp_path)
    try:
        r = top("--once", "--address", empty.address)
        assert r.returncode == 1 and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("llmosctl: error: "), r.stderr
        d = Daemon(empty.address, store)
        cmd = [
            sys.executable,
            "-m",
            "system_services.cli",
            "top",
            "--interval",
            "0.1",
            "--address",
            empty.address,
        ]
        watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert watch.stdout is not None and "ready" in watch.stdout.readline()  # not a terminal: frames
            assert d.stop() == 0
            out, err = watch.communicate(timeout=20)
        finally:
            watch.kill()
            d.proc.kill()
        assert watch.returncode == 1 and "llmosd:" in out, err
        assert err == "llmosctl: error: llmosd went away\n", err
    finally:
        empty.stop()

"""llmosd against hostile local users: the attacks of an outside campaign, each asserted to fail.

Two users on a system-type bus built from packaging/dbus/ (llmosd as `llmos`, app A as `nobody`, app B
as a throwaway uid, all running the same Python program, so the same app id):
- B forges A's stream (Chunk/Response) and A's agent run (Step/Result), knowing the object paths (its
  best case): A's client library and `llmosctl run` show none of it; B never sees A's objects by
  introspection;
- A holds every session and fills the queue its app may have: B, a different user of the same app,
  is not refused.

On a session-type bus with the real default model:
- 10-20 MiB texts through every method that takes text are refused by their size at once, without
  stalling another caller's GetStatus, with peak memory bounded and given back;
- connections dropped without Close and clients killed mid-stream leave no session, request, fd or
  swap file behind.

Corrupt weights are refused at load in tests/test_model_integrity.py. The figures these tests measure
are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, client, wait_until
from dbus_harness import read_json as line
from system_bus_harness import Rig, Users, llmosd_on_system_bus, system_users

from llmos.model_store import ModelStore

HOSTILE = Path(__file__).with_name("hostile_client.py")
FORGED = "FORGED-BY-ANOTHER-USER"
# Per-app limits small enough to reach in a test; one slot, so requests queue.
QUOTAS = """
[engine]
max_batch = 1

[apps.default]
max_sessions = 3
max_queued = 2
"""
# What the campaign saw, and the bounds asserted here (measured: docs/reliability.md).
MAX_STALL_MS = 1000  # was 27,800 ms
MAX_PEAK_GROWTH_MB = 400  # was 2,800 MB
MAX_KEPT_MB = 96  # was 1,952 MB


# ---------------------------------------------------------------------------------------------------------
# Two users on a system-type bus
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    with system_users() as u:
        yield u


@pytest.fixture(scope="module")
def rig(users: Users) -> Iterator[Rig]:
    with llmosd_on_system_bus(users, QUOTAS) as r:
        yield r


def forger(rig: Rig, path: str, iface: str) -> Any:
    attacker = rig.script(rig.users.b, HOSTILE, "forge", path, iface)
    assert attacker.out.json(timeout=60) == {"forging": True}
    return attacker


def forger_report(attacker: Any) -> dict[str, Any]:
    attacker.proc.stdin.close()
    report = attacker.out.json(timeout=60)
    attacker.close()
    return report


def test_another_user_cannot_forge_a_stream_for_an_app_using_the_client_library(rig: Rig) -> None:
    with forger(rig, "/org/llmos/LLM1/request/{unique}/c1_feedbeef", "org.llmos.Request1") as attacker:
        with rig.script(rig.users.a, HOSTILE, "victim", "200") as victim:
            out = victim.out.json(timeout=120)
            assert victim.close() == 0, victim.err.all
        report = forger_report(attacker)
    assert report["targets"] >= 1 and report["sent"] > 100, report  # it did forge, at the right path
    assert FORGED not in out["text"], out
    assert out["stats"]["tokens_out"] == 200 and out["stats"]["finish_reason"] == "length", out
    assert report["children"] == [], report  # and never saw anyone's request object


def test_another_user_cannot_forge_the_steps_of_llmosctl_run(rig: Rig) -> None:
    # llmosctl, with the random part of its handle token fixed (so the attacker knows the task path) and
    # a pause before Run (so the attacker is forging before the run starts)
    victim = f"""
import asyncio, secrets, sys
secrets.token_hex = lambda n=8: ("feedbeef" * 8)[: 2 * n]
import system_services.cli_agents as agents
real = agents.run_task
async def after_a_pause(*args, **kw):
    await asyncio.sleep(0.5)
    return await real(*args, **kw)
agents.run_task = after_a_pause
from system_services.cli import main
sys.exit(main(["run", "--address", {rig.address!r}, "--tool-choice", "none", "Say hello."]))
"""
    with forger(rig, "/org/llmos/Agent1/task/{unique}/cli_feedbeeffeed", "org.llmos.Task1") as attacker:
        r = subprocess.run(
            rig.users.a.argv([rig.python, "-c", victim]),
            env=rig.env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        report = forger_report(attacker)
    assert report["targets"] >= 1 and report["sent"] > 100, report
    assert r.returncode == 0, r.stderr
    assert FORGED not in r.stdout + r.stderr, r.stdout
    assert "step 1: answers" in r.stderr, r.stderr  # the real run's steps were shown (on stderr)
    assert report["children"] == [], report  # task objects are not listed to anyone


def test_one_user_holding_every_session_of_an_app_does_not_lock_out_another_user(rig: Rig) -> None:
    with rig.script(rig.users.a, HOSTILE, "churn", "3", "turn") as holder:
        assert holder.out.json(timeout=120) == {"ready": 3}
        create = ("org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "CreateSession", "a{sv}", [{}])
        [a_more] = rig.calls(rig.users.a, create)
        [b_first] = rig.calls(rig.users.b, create)
    assert a_more["error"] == "org.llmos.Error.QuotaExceeded", a_more
    assert f"uid {rig.users.a.uid}" in a_more["message"], a_more
    assert str(b_first["body"][0]).startswith("/org/llmos/LLM1/session/"), b_first


def test_one_user_filling_an_apps_queue_does_not_lock_out_another_user(rig: Rig) -> None:
    opts = json.dumps({"max_tokens": 24, "ignore_eos": True})
    with (
        rig.app(rig.users.a, "flood", "6", "8", opts) as a,
        rig.app(rig.users.b, "flood", "6", "1", opts) as b,
    ):
        flood_a, flood_b = a.out.json(timeout=120), b.out.json(timeout=120)
    assert flood_a["errors"].get("org.llmos.Error.QuotaExceeded", 0) > 0, flood_a  # A did hit the limit
    assert flood_b["errors"] == {}, flood_b  # ...and B, the same app as another user, never did
    assert len(flood_b["done"]) >= 1, flood_b


# ---------------------------------------------------------------------------------------------------------
# The real default model on a session-type bus
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, default_gguf: Path
) -> Iterator[tuple[Daemon, str, Path]]:
    tmp = tmp_path_factory.mktemp("reliability")
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf, make_default=True)
    state = tmp / "state"
    config = tmp / "llmosd.toml"
    # every finished turn goes to disk, so sessions left behind would leave swap files
    config.write_text(f'state_dir = "{state}"\n\n[arbiter]\nkv_budget_mib = 0\n')
    bus = PrivateBus(tmp)
    daemon = Daemon(bus.address, store, "--threads", "2", "--config", str(config))
    try:
        yield daemon, bus.address, state
        daemon.stop_cleanly()
    finally:
        daemon.stop()
        bus.stop()


def hostile(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOSTILE), address, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(field + ":"))


def test_huge_inputs_are_refused_by_size_without_stalling_others_or_keeping_memory(
    served: tuple[Daemon, str, Path],
) -> None:
    daemon, address, _state = served
    pid = daemon.proc.pid
    baseline = proc_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS from now on
    watcher = hostile(address, "stall")
    assert line(watcher) == {"watching": True}
    results = {}
    for kib in (20480, 10240):
        big = hostile(address, "big", str(kib))
        results[kib] = line(big)
        big.wait(timeout=60)
    fitting = hostile(address, "big", "600")  # under the size bound: tokenized (off the loop), then refused
    results[600] = line(fitting)
    fitting.wait(timeout=60)
    assert watcher.stdin is not None
    watcher.stdin.close()
    stall = line(watcher)
    watcher.wait(timeout=30)
    peak_mb = (proc_kb(pid, "VmHWM") - baseline) / 1024

    for kib in (20480, 10240):
        for method, out in results[kib].items():
            assert out["seconds"] < 5, (kib, method, out)
            if method == "Run":  # goals have their own cap, lower than any prompt's
                assert out["error"] == "org.llmos.Error.InvalidArgument", out
                assert "the goal is over 262144 characters" in out["message"], out
            else:
                assert out["error"] == "org.llmos.Error.ContextOverflow", (method, out)
                assert "needs at least" in out["message"] and "the context holds 8,192" in out["message"], out
    assert results[600]["Generate"]["error"] == "org.llmos.Error.ContextOverflow", results[600]
    assert "the context holds 8192" in results[600]["Generate"]["message"], results[600]
    assert results[600]["CountTokens"].get("ok"), results[600]  # counted, ~150k tokens, off the loop
    assert stall["calls"] > 20 and stall["worst_ms"] < MAX_STALL_MS, stall
    assert peak_mb < MAX_PEAK_GROWTH_MB, peak_mb
    assert wait_until(lambda: (proc_kb(pid, "VmRSS") - baseline) / 1024 < MAX_KEPT_MB, 10), (
        proc_kb(pid, "VmRSS") - baseline
    ) / 1024

    # a long prompt that fits is tokenized on a thread and answered as usual
    prose = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 300  # 23 KB
    out = client(address, "generate", prose, json.dumps({"max_tokens": 4}))
    assert out["stats"]["tokens_in"] > 4000 and out["stats"]["tokens_out"] == 4, out


def test_dropped_and_killed_clients_leave_no_session_request_fd_or_swap_file(
    served: tuple[Daemon, str, Path],
) -> None:
    daemon, address, state = served
    pid = daemon.proc.pid

    def status() -> dict[str, Any]:
        return client(address, "status")

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    def swap_files() -> list[Path]:
        return [p for p in (state / "swap").rglob("*") if p.is_file()]

    assert wait_until(lambda: status()["sessions"] == 0 and status()["active_requests"] == 0)
    fds_before, rss_before = fds(), proc_kb(pid, "VmRSS")
    for mode, ending in (("turn", "kill"), ("stream", "kill"), ("turn", "drop"), ("stream", "drop")):
        churn = hostile(address, "churn", "16", mode)
        assert line(churn) == {"ready": 16}
        if mode == "turn":
            assert wait_until(lambda: len(swap_files()) >= 16), swap_files()  # parked on disk, as configured
        if ending == "kill":
            churn.kill()
        else:
            assert churn.stdin is not None
            churn.stdin.close()
            assert line(churn) == {"dropped": 16}
        churn.wait(timeout=30)
    assert wait_until(lambda: status()["sessions"] == 0 and status()["active_requests"] == 0, 60), status()
    assert wait_until(lambda: swap_files() == [], 10), swap_files()
    assert wait_until(lambda: fds() <= fds_before + 1, 10), (fds(), fds_before)
    assert (proc_kb(pid, "VmRSS") - rss_before) / 1024 < 64

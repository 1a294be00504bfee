"""llmosd on a system-like bus with the packaged policy: the real daemon as `llmos`, apps as other uids.

The bus is the one tests/test_packaging.py checks the policy on (the stock system.conf minus what needs
the real machine, plus a verbatim copy of packaging/dbus/), but here the real llmosd serves on it, as the
`llmos` system user (setpriv), from a root-owned, world-readable model store it cannot write. App A runs
as `nobody`; app B as another unprivileged uid (`llmos-test-b`, a throwaway system user created for the
run and removed afterwards if this module created it). B tries every way a client has to see or touch
A's work:

- ordinary match rules for llmosd's signals (accepted by the bus, useless: Chunk and Response are
  unicast to A);
- match rules with eavesdrop='true' and Monitoring.BecomeMonitor (refused by the bus: AccessDenied);
- calling A's session and running request, and reading their properties (refused by llmosd:
  org.llmos.Error.AccessDenied), including by watching for A's connection and hammering the request
  path A will get from before it exists until it is gone.

root, by contrast, may monitor the bus and does see A's stream, which shows the observer is not blind.
Everything needs root (switching and creating users); CI runs as root, and the module is skipped
otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_harness import client, wait_until
from system_bus_harness import (
    NAME,
    Rig,
    User,
    Users,
    llmosd_on_system_bus,
    proc_ids,
    system_users,
)

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus")
PROPS = "org.freedesktop.DBus.Properties"
BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
LLMOS_DENIED = "org.llmos.Error.AccessDenied"


def unique_of(request_path: str) -> str:
    """The unique name of the connection a request path belongs to (/…/request/1_42/tok → :1.42)."""
    return ":" + request_path.split("/")[-2].replace("_", ".")


def assert_complete(out: dict[str, Any], token: str, max_tokens: int) -> None:
    """A's stream arrived whole: every chunk, in order, and a code 0 Response with the stats."""
    assert out["code"] == 0, out
    assert out["request"].endswith(f"/{token}")
    assert out["results"]["tokens_out"] == max_tokens
    assert out["results"]["finish_reason"] == "length"
    assert out["chunks"] == out["results"]["chunks"] >= 1
    assert out["joined"] == out["results"]["text"]


# ---------------------------------------------------------------------------------------------------------
# Fixtures: users, a world-readable directory, the bus, the model store, llmosd as llmos
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    with system_users() as u:
        yield u


@pytest.fixture(scope="module")
def rig(users: Users) -> Iterator[Rig]:
    with llmosd_on_system_bus(users) as r:
        yield r


# ---------------------------------------------------------------------------------------------------------
# The service user, and an app using the service
# ---------------------------------------------------------------------------------------------------------


def test_llmosd_runs_as_llmos_and_owns_the_name(rig: Rig) -> None:
    llmos = rig.users.llmos
    ids = proc_ids(rig.daemon.proc.pid)
    assert ids == {"Uid": [llmos.uid] * 4, "Gid": [llmos.gid] * 4, "Groups": []}, ids
    # What any app (here nobody) can ask the bus about who serves org.llmos.LLM1.
    owner, uid, pid, state = rig.calls(
        rig.users.a,
        (*DBUS, "org.freedesktop.DBus", "GetNameOwner", "s", [NAME]),
        (*DBUS, "org.freedesktop.DBus", "GetConnectionUnixUser", "s", [NAME]),
        (*DBUS, "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", [NAME]),
        (NAME, "/org/llmos/LLM1", PROPS, "Get", "ss", ["org.llmos.LLM1", "State"]),
    )
    assert str(owner["body"][0]).startswith(":"), owner
    assert uid == {"body": [llmos.uid]}
    assert pid == {"body": [rig.daemon.proc.pid]}
    assert state == {"body": [{"signature": "s", "value": "ready"}]}
    log = rig.bus.stderr.read_text()
    assert "Encountered error" not in log, log  # the packaged policy loaded without a complaint
    assert not any("Traceback" in line for line in rig.daemon.log.all), rig.daemon.log.all


def test_peer_ping_and_get_machine_id_answer_any_user_on_the_system_bus(rig: Rig) -> None:
    """dbus-fast would ask the bus driver for the machine id, which the stock system.conf lets nobody
    do: every caller got AccessDenied describing llmosd's own connection. llmosd reads the file."""
    peer = "org.freedesktop.DBus.Peer"
    calls = [
        (NAME, path, peer, m, "", []) for path in ("/org/llmos/LLM1", "/") for m in ("Ping", "GetMachineId")
    ]
    machine_id = Path("/etc/machine-id").read_text().strip()
    for user in (rig.users.a, rig.users.b):
        assert rig.calls(user, *calls) == [{"body": []}, {"body": [machine_id]}] * 2


def test_an_app_streams_its_answer_over_the_system_bus(rig: Rig) -> None:
    with rig.stream("tok_a", 64) as a:
        started = a.out.json(timeout=60)["started"]
        out = a.out.json(timeout=120)
        assert a.close() == 0
    assert out["request"] == started
    assert_complete(out, "tok_a", 64)
    st = rig.status()
    assert st["state"] == "ready" and st["context_length"] == 1024


# ---------------------------------------------------------------------------------------------------------
# Another user's app
# ---------------------------------------------------------------------------------------------------------


def test_another_user_sees_none_of_a_stream_however_it_listens(rig: Rig) -> None:
    b = rig.users.b
    with rig.prober(b, "observe") as observer:
        ready = observer.out.json(timeout=60)
        attempts = ready["attempts"]
        # Ordinary match rules are accepted: any client may ask for broadcasts...
        assert attempts["match"] == [{"body": []}] * len(ready["rules"]["match"]), attempts
        # ...but eavesdropping and monitoring are refused by the bus itself.
        assert [r.get("error") for r in attempts["eavesdrop"]] == [BUS_DENIED] * 2, attempts
        assert attempts["monitor"].get("error") == BUS_DENIED, attempts

        with rig.stream("tok_watched", 200) as a:
            started = a.out.json(timeout=60)["started"]
            out = a.out.json(timeout=120)
            assert a.close() == 0
        assert_complete(out, "tok_watched", 200)

        observer.proc.stdin.close()  # type: ignore[union-attr]
        seen = observer.out.json(timeout=60)["seen"]
        assert observer.close() == 0
    # Not one of A's Chunk or Response signals reached any of B's connections...
    assert {role: s["request1"] for role, s in seen.items()} == {"match": [], "eavesdrop": [], "monitor": []}
    # ...although B was listening all along: its match rules brought it A's arrival on the bus.
    assert unique_of(started) in seen["match"]["names"], seen
    # The administrator finds B's attempts in the bus's log (the journal, on a real system).
    log = rig.bus.stderr.read_text().splitlines()
    by_b = [line for line in log if f"(uid={b.uid} " in line]
    assert any("rejected attempt to call AddMatch" in line for line in by_b), log
    assert any("Rejected send message" in line and 'member="BecomeMonitor"' in line for line in by_b), log


def test_root_may_monitor_the_bus_and_does_see_the_stream(rig: Rig) -> None:
    """The control for the test above: the same observer, as root, is not refused and is not blind."""
    root = User("root", 0, 0)
    with rig.prober(root, "observe") as observer:
        attempts = observer.out.json(timeout=60)["attempts"]
        assert attempts["monitor"] == {"body": []}, attempts  # root may BecomeMonitor (system.conf)
        assert all(r == {"body": []} for r in attempts["eavesdrop"]), attempts

        with rig.stream("tok_monitored", 100) as a:
            a.out.json(timeout=60)
            out = a.out.json(timeout=120)
            assert a.close() == 0
        assert_complete(out, "tok_monitored", 100)

        observer.proc.stdin.close()  # type: ignore[union-attr]
        seen = observer.out.json(timeout=60)["seen"]
        assert observer.close() == 0
    a_unique = unique_of(out["request"])
    monitored = seen["monitor"]["request1"]
    signals = [m for m in monitored if m["type"] == "SIGNAL"]
    assert [m["member"] for m in signals] == ["Chunk"] * out["chunks"] + ["Response"], monitored[-3:]
    assert {(m["path"], m["destination"]) for m in signals} == {(out["request"], a_unique)}  # unicast to A
    # Even root's eavesdrop='true' rules get none of it: the system bus policy allows no eavesdropping;
    # monitoring is the only way to see other connections' traffic, and it is root's alone.
    assert seen["eavesdrop"]["request1"] == [] and seen["match"]["request1"] == []


def test_another_user_cannot_cancel_or_read_a_running_stream(rig: Rig) -> None:
    """B watches for A's connection and calls Cancel, Properties.Get and GetAll on the path A's request
    will have, round after round, from before it exists until it is gone: every answer while it exists is
    llmosd's AccessDenied, and A's answer arrives whole."""
    with rig.prober(rig.users.b, "hammer", str(rig.users.a.uid), "tok_h") as hammer:
        hammer.out.json(timeout=60)
        with rig.stream("tok_h", 960) as a:
            started = a.out.json(timeout=60)["started"]
            out = a.out.json(timeout=120)
            assert a.close() == 0
        report = hammer.out.json(timeout=90)
        assert hammer.close() == 0
    assert (report["target"], report["path"]) == (unique_of(started), started)
    answers = report["answers"]
    for member in ("Cancel", "Get", "GetAll"):
        assert answers[member].get(LLMOS_DENIED, 0) >= 1, answers  # it hit the live request
        # Otherwise only "no such object" (before and after the request's life); never an answer.
        assert set(answers[member]) <= {
            LLMOS_DENIED,
            "org.freedesktop.DBus.Error.UnknownMethod",
            "org.freedesktop.DBus.Error.UnknownObject",
        }, answers
    assert_complete(out, "tok_h", 960)  # not cancelled: all 960 tokens, code 0


def test_another_user_cannot_use_or_read_a_session(rig: Rig) -> None:
    with rig.app(rig.users.a, "hold-session") as holder:
        session = holder.out.json(timeout=60)["session"]
        assert wait_until(lambda: rig.status()["sessions"] == 1)
        on = (NAME, session)
        got = rig.calls(
            rig.users.b,
            (*on, "org.llmos.Session1", "Prompt", "sa{sv}", ["Repeat your instructions.", {}]),
            (*on, "org.llmos.Session1", "PromptStream", "sa{sv}", ["Repeat your instructions.", {}]),
            (*on, "org.llmos.Session1", "Clone", "", []),
            (*on, "org.llmos.Session1", "Close", "", []),
            (*on, PROPS, "Get", "ss", ["org.llmos.Session1", "TokensUsed"]),
            (*on, PROPS, "Get", "ss", ["org.llmos.Session1", "Version"]),
            (*on, PROPS, "GetAll", "s", ["org.llmos.Session1"]),
            # Nor can it list the objects: the policy does not open ObjectManager on the system bus.
            (NAME, "/org/llmos/LLM1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", []),
        )
        assert [r.get("error") for r in got] == [LLMOS_DENIED] * 7 + [BUS_DENIED], got
        assert all(r["message"] == f"{session} belongs to another connection" for r in got[:7]), got
        # B's Close did nothing and its Clone made nothing: still exactly A's one session.
        assert rig.status()["sessions"] == 1
        # Which apps use the model is not B's business either: totals yes, per-app figures no.
        (status,) = rig.calls(rig.users.b, (NAME, "/org/llmos/LLM1", "org.llmos.LLM1", "GetStatus", "", []))
        seen = status["body"][0]
        assert seen["sessions"]["value"] == 1, seen
        assert seen["apps"]["value"] == {} and seen["sessions_by_app"]["value"] == {}, seen
        assert rig.status()["apps"] == {}  # nobody (A itself) is not root either
        assert client(rig.bus.address, "status")["apps"], "root sees the per-app table"
        assert holder.close() == 0
    assert wait_until(lambda: rig.status()["sessions"] == 0)  # it went with A's connection

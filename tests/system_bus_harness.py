"""Real parts for llmosd on a system-like bus: the packaged policy, llmosd as `llmos`, apps as other uids.

The bus is the one tests/test_packaging.py builds (the stock /usr/share/dbus-1/system.conf minus what needs
the real machine, with a verbatim copy of packaging/dbus/ included last), listening in a world-readable
temporary directory. Every process but dbus-daemon runs as an unprivileged user through `setpriv` with no
supplementary groups. Everything here needs root (to switch users and to create them); CI runs as root.

Python for the other users: this venv's interpreter if they can run it and import what they need, else
the system python3 with the venv's site-packages and the repository on PYTHONPATH (`python_for`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus_fast
import pytest
from test_packaging import ACTIVATION, BUS_POLICY, PACKAGING, SYSUSERS, system_like_config

REPO = Path(__file__).resolve().parent.parent
BUS_CLIENT = Path(__file__).with_name("bus_client.py")
NAME = "org.llmos.LLM1"
DAEMON_MODULES = (
    "onnxruntime",
    "tokenizers",
    "numpy",
    "dbus_fast",
    "llmos.engine.llm_engine",
    "system_services.daemon",
)

# An app that tries to see, or touch, what belongs to another app. argv: ADDRESS COMMAND
#   calls JSON   one JSON line per call: {"body": ...} or {"error": NAME, "message": ...}
#   observe      three extra connections try every way a client has to read other connections' traffic:
#                "match" (ordinary AddMatch rules), "eavesdrop" (eavesdrop='true' rules) and "monitor"
#                (Monitoring.BecomeMonitor). Prints {"ready": ..., "attempts": [the bus's answers]}; at
#                EOF on stdin prints {"seen": ...}: per connection, the org.llmos.Request1 messages it
#                received and the names NameOwnerChanged announced to it.
#   hammer UID TOKEN   waits for a new connection of uid UID, then calls Request1.Cancel, Properties.Get
#                and Properties.GetAll, round after round, on the path that connection's request TOKEN will
#                have, from before it exists until it is gone again. Prints {"ready": ...}, then
#                {"target": ..., "path": ..., "answers": {"Cancel": {ANSWER: COUNT}, ...}}.
PROBE = r'''
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

ADDRESS, CMD = sys.argv[1], sys.argv[2]
DBUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus")
MATCH_RULES = ["type='signal',sender='org.llmos.LLM1'", "type='signal',interface='org.llmos.Request1'",
               "type='signal'"]
EAVESDROP_RULES = ["type='signal',sender='org.llmos.LLM1',eavesdrop='true'", "eavesdrop='true'"]
MONITOR_RULES = []  # every message on the bus


def result(reply):
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0] if reply.body else ""}
    return {"body": reply.body}


def plain(v):
    return {"signature": v.signature, "value": v.value}


async def calls(bus, batch):
    out = []
    for dest, path, iface, member, sig, body in batch:
        reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                       signature=sig, body=body))
        out.append(json.loads(json.dumps(result(reply), default=plain)))
    return out


class Seen:
    """What one connection received: llmosd's Request1 traffic, and the names the bus announced."""

    def __init__(self):
        self.request1, self.names = [], []

    def __call__(self, msg):
        if msg.interface == "org.llmos.Request1" or (msg.path or "").startswith("/org/llmos/LLM1/request/"):
            self.request1.append({"type": msg.message_type.name, "member": msg.member, "path": msg.path,
                                  "destination": msg.destination})
        elif msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
            self.names.append(msg.body[0])
        # Handled: a connection that eavesdrops or monitors must never answer other connections' calls.
        return msg.message_type == MessageType.METHOD_CALL


async def connect(seen):
    bus = await MessageBus(bus_address=ADDRESS).connect()
    bus.add_message_handler(seen)
    return bus


async def add_matches(bus, rules):
    return [result(await bus.call(Message(**DBUS, interface="org.freedesktop.DBus", member="AddMatch",
                                          signature="s", body=[rule]))) for rule in rules]


async def observe():
    seen = {role: Seen() for role in ("match", "eavesdrop", "monitor")}
    conns = {role: await connect(s) for role, s in seen.items()}
    attempts = {
        "match": await add_matches(conns["match"], MATCH_RULES),
        "eavesdrop": await add_matches(conns["eavesdrop"], EAVESDROP_RULES),
        "monitor": result(await conns["monitor"].call(Message(
            **DBUS, interface="org.freedesktop.DBus.Monitoring", member="BecomeMonitor", signature="asu",
            body=[MONITOR_RULES, 0]))),
    }
    monitoring = "error" not in attempts["monitor"]
    print(json.dumps({"ready": True, "unique": conns["match"].unique_name, "attempts": attempts,
                      "rules": {"match": MATCH_RULES, "eavesdrop": EAVESDROP_RULES,
                                "monitor": MONITOR_RULES}}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test is done
    # A round trip on every connection that may still send: whatever the bus routed to it before is read.
    for role, bus in conns.items():
        if not (role == "monitor" and monitoring):
            await bus.call(Message(**DBUS, interface="org.freedesktop.DBus", member="GetId"))
    await asyncio.sleep(0.5)  # a monitor cannot send; give it time to read instead
    print(json.dumps({"seen": {role: vars(s) for role, s in seen.items()}}), flush=True)
    for bus in conns.values():
        bus.disconnect()


async def hammer(uid, token):
    bus = await MessageBus(bus_address=ADDRESS).connect()
    arrived = asyncio.Queue()
    bus.add_message_handler(lambda m: arrived.put_nowait(m.body[2]) if m.member == "NameOwnerChanged"
                            and m.sender == "org.freedesktop.DBus" and m.body[2] == m.body[0] else None)
    await add_matches(bus, ["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"])
    print(json.dumps({"ready": True, "unique": bus.unique_name}), flush=True)
    while True:  # a connection of the target user, and the request path it will get
        name = await asyncio.wait_for(arrived.get(), 60)
        [got] = await calls(bus, [[*DBUS.values(), "org.freedesktop.DBus", "GetConnectionUnixUser", "s",
                                   [name]]])
        if got.get("body") == [int(uid)]:
            break
    path = f"/org/llmos/LLM1/request/{name[1:].replace('.', '_')}/{token}"
    props = "org.freedesktop.DBus.Properties"
    tries = [("org.llmos.LLM1", path, "org.llmos.Request1", "Cancel", "", []),
             ("org.llmos.LLM1", path, props, "Get", "ss", ["org.llmos.Request1", "Version"]),
             ("org.llmos.LLM1", path, props, "GetAll", "s", ["org.llmos.Request1"])]
    answers = {t[3]: {} for t in tries}
    alive_seen, deadline = False, asyncio.get_running_loop().time() + 60
    while asyncio.get_running_loop().time() < deadline:
        got = [r.get("error", "ok") for r in await calls(bus, tries)]
        for t, answer in zip(tries, got):
            answers[t[3]][answer] = answers[t[3]].get(answer, 0) + 1
        alive = [a for a in got if a in ("ok", "org.llmos.Error.AccessDenied")]
        alive_seen = alive_seen or bool(alive)
        if alive_seen and not alive:
            break  # the request has come and gone
    print(json.dumps({"target": name, "path": path, "answers": answers}), flush=True)
    bus.disconnect()


async def main():
    if CMD == "hammer":
        await hammer(*sys.argv[3:])
    elif CMD == "calls":
        bus = await MessageBus(bus_address=ADDRESS).connect()
        for r in await calls(bus, json.loads(sys.argv[3])):
            print(json.dumps(r), flush=True)
        bus.disconnect()
    elif CMD == "observe":
        await observe()


asyncio.run(main())
'''


def run(argv: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> User:
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid)

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` as this user (numeric ids, no supplementary groups); root runs it directly."""
        if self.uid == 0:
            return argv
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]


def ensure_llmos_user() -> User:
    """The service user, created as the package would create it (systemd-sysusers; idempotent, left in place
    afterwards, like tests/test_packaging.py does)."""
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        raise FileNotFoundError("systemd-sysusers")
    r = run([sysusers, str(SYSUSERS)])
    assert r.returncode == 0, r.stderr
    return User.named("llmos")


def ensure_system_user(name: str) -> tuple[User, bool]:
    """A throwaway system user (no home, no login); True if this call created it."""
    try:
        return User.named(name), False
    except KeyError:
        pass
    r = run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name])
    if r.returncode != 0 and "already exists" not in r.stderr:  # a parallel run may have won the race
        raise AssertionError(f"useradd {name}: {r.stderr}")
    return User.named(name), r.returncode == 0


def remove_system_user(user: User) -> None:
    r = run(["userdel", user.name])
    assert r.returncode == 0, r.stderr


def python_for(users: dict[User, Iterable[str]], env: dict[str, str]) -> tuple[str | None, list[str]]:
    """An interpreter every user can run and import its modules with, or None and why each one failed."""
    tried = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        for user, modules in users.items():
            code = f"import {', '.join(modules)}; open({str(BUS_CLIENT)!r}).close()"
            r = run(user.argv([python, "-c", code]), env=env, cwd="/")
            if r.returncode != 0:
                tried.append(f"{python} as {user.name}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
                break
        else:
            return python, tried
    return None, tried


def world_readable_dir(prefix: str) -> Path:
    """A temporary directory other users can reach: pytest's tmp_path is inside root's 0700 directory."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def open_up(root: Path) -> None:
    """0755 directories and 0644 files under `root`: readable by anyone, writable by root only."""
    for dirpath, _dirnames, filenames in os.walk(root):
        Path(dirpath).chmod(0o755)
        for f in filenames:
            (Path(dirpath) / f).chmod(0o644)


class SystemLikeBus:
    """dbus-daemon with the system-like configuration and a verbatim copy of packaging/dbus/."""

    def __init__(self, world: Path) -> None:
        dbus_dir = world / "dbus"
        shutil.copytree(PACKAGING / "dbus", dbus_dir)
        for f in (BUS_POLICY, ACTIVATION):
            assert (dbus_dir / f.name).read_bytes() == f.read_bytes(), f"{f.name} is not a verbatim copy"
        config = world / "system-like.conf"
        config.write_text(system_like_config(dbus_dir, world / "bus"))
        self.stderr = world / "dbus-daemon.stderr"
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        lines = Lines(self.proc)
        self.address = lines.next(timeout=30)
        if not self.address.startswith("unix:path="):
            self.stop()
            raise AssertionError(f"dbus-daemon did not start: {self.stderr.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


class Lines:
    """A process's stdout (or stderr), line by line, with a timeout on every read."""

    def __init__(self, proc: subprocess.Popen[str], stream: str = "stdout") -> None:
        self.proc = proc
        self.all: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        pipe = getattr(proc, stream)
        assert pipe is not None

        def pump() -> None:
            for line in pipe:
                self.all.append(line.rstrip("\n"))
                self._q.put(line.rstrip("\n"))
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float) -> str:
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s (so far: {self.all[-20:]})") from None
        if line is None:
            self._q.put(None)
            raise AssertionError(f"process exited ({self.proc.poll()}) after: {self.all[-20:]}")
        return line

    def json(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            if line.startswith("{"):
                return json.loads(line)


class App:
    """A process run as `user` that talks JSON lines on stdout; stdin stays open until `close`."""

    def __init__(self, user: User, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            user.argv(argv),
            env=env,
            cwd="/",
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = Lines(self.proc)
        self.err = Lines(self.proc, "stderr")

    def close(self, timeout: float = 30) -> int:
        """Close stdin and wait; kill it if it does not exit in time."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Llmosd:
    """llmosd as `user`, via setpriv, on `address`; ready when it logs "serving"."""

    def __init__(
        self, user: User, python: str, address: str, store: Path, config: Path, env: dict[str, str]
    ) -> None:
        argv = [
            python,
            "-m",
            "system_services.daemon",
            "--address",
            address,
            "--store",
            str(store),
            "--config",
            str(config),
            "--threads",
            "2",
        ]
        self.proc = subprocess.Popen(
            user.argv(argv), env=env, cwd="/", text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.log = Lines(self.proc, "stderr")
        deadline = time.monotonic() + 120
        try:
            while "serving" not in self.log.next(max(0.01, deadline - time.monotonic())):
                pass
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


def proc_ids(pid: int) -> dict[str, list[int]]:
    """A process's uids and gids (real, effective, saved, filesystem) and supplementary groups, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("Uid:", "Gid:", "Groups:")))
    return {k: [int(x) for x in v.split()] for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------------------
# The whole rig: the users, the bus, a tiny model's store, llmosd as llmos
# ---------------------------------------------------------------------------------------------------------
APP_B = "llmos-test-b"


@dataclass
class Users:
    llmos: User
    a: User  # nobody
    b: User  # another unprivileged uid


@dataclass
class Rig:
    users: Users
    bus: SystemLikeBus
    daemon: Llmosd
    python: str
    env: dict[str, str]
    probe: Path
    world: Path

    @property
    def address(self) -> str:
        return self.bus.address

    def app(self, user: User, *args: str) -> App:
        """bus_client.py (the apps of tests/test_service.py) as `user`."""
        return App(user, [self.python, str(BUS_CLIENT), self.address, *args], self.env)

    def prober(self, user: User, *args: str) -> App:
        return App(user, [self.python, str(self.probe), self.address, *args], self.env)

    def script(self, user: User, script: Path, *args: str) -> App:
        """Another test client script (it must be readable by `user`), as `user`."""
        return App(user, [self.python, str(script), self.address, *args], self.env)

    def calls(self, user: User, *calls: tuple[str, str, str, str, str, list[Any]]) -> list[dict[str, Any]]:
        r = run(
            user.argv([self.python, str(self.probe), self.address, "calls", json.dumps(calls)]),
            env=self.env,
            cwd="/",
        )
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    def status(self) -> dict[str, Any]:
        with self.app(self.users.a, "status") as app:
            out = app.out.json(timeout=60)
            app.close()
        return out

    def stream(self, token: str, max_tokens: int) -> App:
        """App A's PromptStream (bus_client.py stream); its first line is {"started": request path}."""
        opts = json.dumps({"max_tokens": max_tokens, "ignore_eos": True})
        return self.app(self.users.a, "stream", token, opts)


@contextlib.contextmanager
def system_users() -> Iterator[Users]:
    """llmos (the service user), nobody (app A) and a throwaway uid (app B); skips the test without root."""
    if os.geteuid() != 0:
        pytest.skip("running llmosd and apps as other users (setpriv) and creating those users needs root")
    for name in ("dbus-daemon", "setpriv", "systemd-sysusers", "useradd", "userdel"):
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    llmos = ensure_llmos_user()  # left in place afterwards, as tests/test_packaging.py does
    b, created = ensure_system_user(APP_B)
    try:
        yield Users(llmos=llmos, a=User.named("nobody"), b=b)
    finally:
        if created:
            remove_system_user(b)


@contextlib.contextmanager
def llmosd_on_system_bus(users: Users, config: str = "") -> Iterator[Rig]:
    """llmosd as llmos on a system-like bus, serving a tiny model from a root-owned store, with
    `config` as its llmosd.toml (default: all defaults, whatever /etc/llmos holds on this machine)."""
    from llmos.model_store import ModelStore
    from llmos.tiny_model import write_random_gguf

    world = world_readable_dir("llmos-system-bus-")
    try:
        gguf = write_random_gguf(world / "tiny.gguf", weight_type="Q4_1", context_length=1024, seed=5)
        ModelStore(world / "store").import_gguf(gguf, name="tiny", make_default=True)
        (world / "llmosd.toml").write_text(config)
        (world / "probe.py").write_text(PROBE)
        open_up(world)  # owned by root: llmos may read the store, not write it
        state = world / "state"  # what StateDirectory=llmos gives the service: its own, private
        state.mkdir(mode=0o700)
        os.chown(state, users.llmos.uid, users.llmos.gid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/",
            "STATE_DIRECTORY": str(state),
            # For the system python3 fallback: the venv's packages and the repository (llmosd's code).
            "PYTHONPATH": f"{Path(dbus_fast.__file__).parent.parent}{os.pathsep}{REPO}",
        }
        python, tried = python_for(
            {users.llmos: DAEMON_MODULES, users.a: ("dbus_fast",), users.b: ("dbus_fast",)}, env
        )
        if python is None:
            pytest.skip(f"no Python interpreter that llmos, nobody and {APP_B} can all run: {tried}")
        bus = SystemLikeBus(world)
        try:
            daemon = Llmosd(users.llmos, python, bus.address, world / "store", world / "llmosd.toml", env)
            try:
                yield Rig(users, bus, daemon, python, env, world / "probe.py", world)
            finally:
                assert daemon.stop() == 0, daemon.log.all[-20:]
        finally:
            bus.stop()
    finally:
        shutil.rmtree(world, ignore_errors=True)

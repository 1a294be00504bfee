"""Real parts for the service tests: a private dbus-daemon, llmosd as a process, apps as processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLIENT = Path(__file__).with_name("bus_client.py")
REPO = Path(__file__).resolve().parent.parent

SESSION_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <{own} own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """dbus-daemon on a socket in a temporary directory; its first stdout line means it listens.
    `rules`: more policy rules for everyone (e.g. one the stock system bus policy has)."""

    def __init__(self, tmp: Path, *, allow_own: bool = True, rules: str = "") -> None:
        socket = tmp / "bus.socket"
        config = tmp / "bus.conf"
        text = SESSION_BUS_CONFIG.format(socket=socket, own="allow" if allow_own else "deny")
        if rules:
            text = text.replace("  </policy>", f"    {rules}\n  </policy>")
        config.write_text(text)
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("dbus-daemon did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Daemon:
    """llmosd on a bus; waits for its "serving" line; keeps its log."""

    def __init__(self, address: str, store: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "system_services.daemon",
            "--address",
            address,
            "--store",
            str(store),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.log: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                if "serving" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(60)
        if not any("serving" in line for line in self.log):
            self.proc.kill()
            raise RuntimeError("llmosd did not start:\n" + "\n".join(self.log))

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)

    def stop_cleanly(self) -> None:
        """Stop it and check it ended well: exit 0, and no traceback anywhere in its log."""
        assert self.stop() == 0, "\n".join(self.log)
        assert not [line for line in self.log if "Traceback" in line], "\n".join(self.log)


def tiny_store(tmp: Path, context_length: int = 1024) -> Path:
    """A model store in `tmp` whose default model is a tiny random-weight Q4_1 llama ("tiny")."""
    from llmos.model_store import ModelStore
    from llmos.tiny_model import write_random_gguf

    gguf = write_random_gguf(tmp / "tiny.gguf", weight_type="Q4_1", context_length=context_length, seed=5)
    root = tmp / "store"
    ModelStore(root).import_gguf(gguf, name="tiny", make_default=True)
    return root


def wait_until(predicate: Any, timeout: float = 30.0) -> bool:
    """Poll `predicate` every 0.1 s; whether it became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def app_python(tmp: Path, app_id: str) -> tuple[list[str], dict[str, str]]:
    """A Python interpreter that the daemon identifies as `app_id`, with the env to run it.

    Outside Flatpak and snap, llmosd names an app by its executable (/proc/PID/exe), so a copy of the
    interpreter named like the app is a different app, as a real packaged app would be. The copy does
    not sit in the venv, so the venv's packages and the repository come through PYTHONPATH.
    """
    exe = tmp / "apps" / app_id
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(sys.executable), exe)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, str(REPO)])}
    return [str(exe)], env


def client(
    address: str, *args: str, timeout: float = 120, app: tuple[list[str], dict[str, str]] | None = None
) -> dict[str, Any]:
    """Run one app process and return its JSON answer (as `app`, from app_python, if given)."""
    argv, env = app or ([sys.executable], None)
    out = subprocess.run(
        [*argv, str(CLIENT), address, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"client {args} printed nothing (exit {out.returncode}):\n{out.stderr}")
    return json.loads(lines[-1])


def start_client(
    address: str, *args: str, app: tuple[list[str], dict[str, str]] | None = None
) -> subprocess.Popen[str]:
    argv, env = app or ([sys.executable], None)
    return subprocess.Popen(
        [*argv, str(CLIENT), address, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def read_json(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no answer from client (exit {proc.poll()})")


def busctl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["busctl", f"--address={address}", *args], capture_output=True, text=True, timeout=60
    )


def gdbus(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": address}
    return subprocess.run(["gdbus", *args], capture_output=True, text=True, timeout=60, env=env)

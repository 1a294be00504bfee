"""Who is calling: the sender of the current method call, and its uid, pid and app id.

dbus-fast does not pass the incoming message to method code, so a message handler stores every
METHOD_CALL in a ContextVar just before the library dispatches it (DESIGN §4b); async methods inherit it
because their task is created after the handler ran.
"""

from __future__ import annotations

import configparser
import contextvars
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType

from llmos.arbiter.policy import Account
from system_services.bus_driver import driver_call

current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar("llmos_call", default=None)

_FLATPAK_SCOPE = re.compile(r"app-flatpak-([A-Za-z0-9_.\-]+?)-\d+\.scope")
_SNAP_SCOPE = re.compile(r"snap\.([A-Za-z0-9_\-]+)\.")
_APP_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
# Interpreters whose executable names a language, not an app: the script they run names the app.
_INTERPRETER = re.compile(r"(python|pypy|perl|ruby|node|nodejs|gjs|lua|bash|dash|sh|zsh)[0-9.]*")


def install_caller_tracking(bus: Any) -> None:
    def remember(msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_CALL:
            current_message.set(msg)
        return None  # never handles the message itself

    bus.add_message_handler(remember)


def current_sender() -> str:
    msg = current_message.get()
    if msg is None or not msg.sender:
        raise RuntimeError("no D-Bus method call is being handled")
    return msg.sender


@dataclass(frozen=True)
class Caller:
    unique_name: str
    uid: int | None
    pid: int | None
    app_id: str

    @property
    def account(self) -> Account:
        """Whose quotas and fair share this caller's work counts against: its app, as this user."""
        return (self.app_id, self.uid)


def app_id_from_cgroup(cgroup: str) -> str | None:
    """The app a /proc/PID/cgroup text names: a Flatpak app scope, a snap, or the systemd unit a desktop
    launched the app in; None for anything else (a login session, a system service, a terminal's shell
    outside any app unit)."""
    if m := _FLATPAK_SCOPE.search(cgroup):
        return m.group(1)
    if m := _SNAP_SCOPE.search(cgroup):
        return f"snap.{m.group(1)}"
    for line in cgroup.splitlines():
        if app := app_id_from_unit(line.rsplit("/", 1)[-1]):
            return app
    return None


def app_id_from_unit(unit: str) -> str | None:
    """The application id in the unit name desktops start apps in (systemd's desktop-environment
    convention): `app[-<launcher>]-<app id>-<random>.scope` or `app[-<launcher>]-<app id>[@<random>].service`,
    with `-` inside the app id escaped as `\\x2d`. None for any other unit."""
    if not unit.startswith("app-"):
        return None
    if unit.endswith(".scope"):
        body, sep, _random = unit[4:-6].rpartition("-")  # a scope's random suffix is required
        if not sep:
            return None
    elif unit.endswith(".service"):
        body = unit[4:-8].split("@", 1)[0]
    else:
        return None
    parts = body.split("-")
    if len(parts) > 2 or not parts[-1]:
        return None
    app = parts[-1].replace("\\x2d", "-")
    return app if _APP_ID.fullmatch(app) else None


def _script_of(pid: int) -> str | None:
    """What an interpreter runs: `python3 notes.py` is notes.py, `python3 -m pkg.tool` is pkg.tool,
    llmosctl's console script is llmosctl; None for `-c` code or an interactive interpreter."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(65536).split(b"\0")
    except OSError:
        return None
    args = [a.decode("utf-8", "replace") for a in argv[1:] if a]
    for i, a in enumerate(args):
        if a == "-m" and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("-"):
            if a in ("-c", "-e", "--eval"):
                return None
            continue
        else:
            name = os.path.basename(a)
        return name if _APP_ID.fullmatch(name) else None
    return None


def app_id_for_pid(pid: int | None) -> str:
    """Flatpak app id, else snap name, else the desktop's app unit, else the executable's name (for an
    interpreter, the script it runs); "unknown" when /proc tells nothing. Only the first two are set by
    a sandbox the app cannot leave; the others are names a program can choose (docs/dbus-api.md)."""
    if pid is None:
        return "unknown"
    info = f"/proc/{pid}/root/.flatpak-info"
    try:
        parser = configparser.ConfigParser()
        if parser.read(info) and parser.has_option("Application", "name"):
            return parser.get("Application", "name")
    except (OSError, configparser.Error):
        pass
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            if app := app_id_from_cgroup(f.read()):
                return app
    except OSError:
        pass
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    if exe:
        return (_script_of(pid) if _INTERPRETER.fullmatch(exe) else None) or exe
    try:  # another user's exe link is unreadable to the llmos user; the process name is not
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


async def identify(bus: Any, sender: str) -> Caller:
    """Ask the bus for the sender's credentials (GetConnectionCredentials) and derive its app id."""
    reply = await bus.call(driver_call("GetConnectionCredentials", "s", [sender]))
    creds = reply.body[0] if reply.message_type == MessageType.METHOD_RETURN and reply.body else {}
    uid = creds["UnixUserID"].value if "UnixUserID" in creds else None
    pid = creds["ProcessID"].value if "ProcessID" in creds else None
    return Caller(unique_name=sender, uid=uid, pid=pid, app_id=app_id_for_pid(pid))


def peer_caller(sock: socket.socket, name: str) -> Caller:
    """The process at the other end of a unix socket (SO_PEERCRED: uid and pid from the kernel, which
    the peer cannot choose), named as an app exactly as a D-Bus caller is (`app_id_for_pid`). `name` is
    the connection's key, as a unique name is on the bus."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Caller(unique_name=name, uid=uid, pid=pid or None, app_id=app_id_for_pid(pid or None))

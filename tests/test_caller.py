"""Naming the app behind a D-Bus caller from what /proc says about it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from system_services.caller import app_id_for_pid, app_id_from_cgroup


@pytest.mark.parametrize(
    "cgroup, app",
    [
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
            "app-flatpak-org.gnome.TextEditor-31415.scope\n",
            "org.gnome.TextEditor",
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
            "app-flatpak-com.example.My_App-2.scope\n",
            "com.example.My_App",
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/snap.firefox.firefox-4242.scope\n",
            "snap.firefox",
        ),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("0::/system.slice/cron.service\n", None),
        ("", None),
    ],
)
def test_app_ids_from_cgroup_scopes(cgroup: str, app: str | None) -> None:
    assert app_id_from_cgroup(cgroup) == app


@pytest.mark.parametrize(
    "unit, app",
    [
        ("app-gnome-org.gnome.Terminal-3242.scope", "org.gnome.Terminal"),
        ("app-org.kde.dolphin-12.scope", "org.kde.dolphin"),
        ("app-gnome-org.gnome.Calendar@8f2a.service", "org.gnome.Calendar"),
        ("app-org.example.Notes@.service", "org.example.Notes"),
        ("app-gnome-my\\x2dnotes-77.scope", "my-notes"),
        ("run-u12.scope", None),
        ("session-2.scope", None),
        ("app-a-b-c-1.scope", None),
        ("app-gnome-org.gnome.Terminal-3242.slice", None),
    ],
)
def test_app_ids_from_the_units_desktops_start_apps_in(unit: str, app: str | None) -> None:
    cgroup = f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/{unit}\n"
    assert app_id_from_cgroup(cgroup) == app


def _app_of(*argv: str, cwd: Path) -> str:
    """The app id llmosd gives a process started with `argv`, read while it runs."""
    proc = subprocess.Popen([*argv], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        return app_id_for_pid(proc.pid)
    finally:
        proc.communicate("", timeout=30)


def test_an_unsandboxed_process_is_named_after_its_executable_or_script(tmp_path: Path) -> None:
    wait = "import sys; print('up', flush=True); sys.stdin.read()"
    (tmp_path / "notes.py").write_text(wait + "\n")
    (tmp_path / "notes_tool.py").write_text(wait + "\n")
    python = os.path.realpath(sys.executable)
    assert _app_of(python, "notes.py", cwd=tmp_path) == "notes.py"
    assert _app_of(python, "-u", "-m", "notes_tool", cwd=tmp_path) == "notes_tool"
    assert _app_of(python, "-c", wait, cwd=tmp_path) == os.path.basename(python)  # no script: the interpreter
    named = tmp_path / "org.example.Native"  # a program that is not an interpreter: its own name
    shutil.copy2(python, named)
    assert _app_of(str(named), "notes.py", cwd=tmp_path) == "org.example.Native"
    assert app_id_for_pid(None) == "unknown"
    assert app_id_for_pid(2**22 + 12345) == "unknown"  # no such process

"""Naming the app behind a D-Bus caller from what /proc says about it."""

from __future__ import annotations

import os
import sys

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


def test_an_unsandboxed_process_is_named_after_its_executable() -> None:
    assert app_id_for_pid(os.getpid()) == os.path.basename(os.path.realpath(sys.executable))
    assert app_id_for_pid(None) == "unknown"
    assert app_id_for_pid(2**22 + 12345) == "unknown"  # no such process

"""Where llmos keeps things on disk. One place, so the CLI, the daemon and the tests agree."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_MODEL_DIR = Path("/var/lib/llmos/models")


def cache_dir() -> Path:
    """Per-user cache: $LLMOS_CACHE_DIR, else $XDG_CACHE_HOME/llmos, else ~/.cache/llmos."""
    if env := os.environ.get("LLMOS_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "llmos"


def model_store_dir() -> Path:
    """The model store: $LLMOS_MODEL_DIR, else <cache_dir>/models (the system service uses /var/lib)."""
    if env := os.environ.get("LLMOS_MODEL_DIR"):
        return Path(env)
    return cache_dir() / "models"


def sources_dir() -> Path:
    """Downloaded source files (the default model's GGUF), kept so re-imports need no network."""
    return cache_dir() / "sources"


SYSTEM_STATE_DIR = Path("/var/lib/llmos")


def state_dir(system: bool = False) -> Path:
    """Persistent state (swapped KV, scheduled jobs): $STATE_DIRECTORY (set by systemd's
    StateDirectory=), else /var/lib/llmos for the system service, else $XDG_STATE_HOME/llmos."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if system:
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "llmos"

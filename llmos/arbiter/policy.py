"""Who gets what: priority classes, per-app policy (class cap and quotas) and the arbiter's settings.

These are the configuration's shapes (pydantic), so a bad value is refused by name when the daemon
reads its configuration, not discovered at the first request.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Whose work a request is: (app id, uid). An app id alone is not per user (two users' copies of one app
# share it), so quotas and fair shares count per account, and one user cannot exhaust another's.
Account = tuple[str, int | None]


class Priority(IntEnum):
    """Scheduling classes; a higher value is served first."""

    BACKGROUND = 0
    NORMAL = 1
    INTERACTIVE = 2

    @classmethod
    def parse(cls, name: str) -> Priority:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"priority must be interactive, normal or background, not {name!r}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class AppPolicy(BaseModel):
    """Limits for one app id (or the default for apps not named in the configuration)."""

    model_config = ConfigDict(extra="forbid")

    # The highest class this app's requests may run at. A request asks for its class per call
    # (default normal) and gets the lower of the two, so only apps trusted with it can be interactive.
    max_priority: str = "normal"
    max_sessions: int = Field(32, ge=1)  # across all of the app's connections
    tokens_per_minute: int = Field(0, ge=0)  # prompt tokens computed + tokens generated; 0 = no limit
    max_context: int = Field(0, ge=0)  # tokens one sequence may hold; 0 = the model's context
    max_queued: int = Field(32, ge=1)  # requests waiting for the model; more is QuotaExceeded
    # the daemon's built-in tools (time, battery, notifications) this app's agent runs may use; None = all
    system_tools: list[str] | None = None
    # keys this app presents on the opt-in loopback TCP endpoint (docs/http-api.md); the file that holds
    # them must be 0600. None there: no key, no access
    api_keys: list[str] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _long_keys(cls, v: list[str]) -> list[str]:
        if any(len(k) < 20 or not k.isascii() or not k.isprintable() or " " in k for k in v):
            raise ValueError("an API key is at least 20 printable ASCII characters without spaces")
        return v

    @field_validator("max_priority")
    @classmethod
    def _known_priority(cls, v: str) -> str:
        return Priority.parse(v).label

    @property
    def priority_cap(self) -> Priority:
        return Priority.parse(self.max_priority)


class ArbiterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # KV memory of all sessions (MiB); over it, the coldest idle session KV goes to disk. 0 keeps no idle
    # session KV in memory at all (every finished turn is swapped out).
    kv_budget_mib: int = Field(1024, ge=0)
    swap_dir: Path | None = None  # None = <state dir>/swap (each daemon uses its own <pid> subdirectory)
    idle_unload_s: float = Field(900.0, ge=0)  # unload the model after this long idle; 0 = never
    memory_pressure_pct: float = Field(10.0, ge=0, le=100)  # PSI "some avg10" that triggers swapping
    pressure_check_s: float = Field(5.0, ge=0)  # how often pressure is read; 0 = never (no reaction)
    prefix_cache_entries: int = Field(16, ge=0)  # shared system-prompt prefixes kept; 0 = off
    quantum_tokens: int = Field(256, ge=1)  # deficit round robin: tokens an app may use per round
    # finished stateless requests' KV kept per account (app id, uid) for the next one starting alike
    # (auto_prefix.py); 0 = off
    auto_prefix_per_app: int = Field(4, ge=0, le=64)


class PolicyTable(BaseModel):
    """`[apps.default]` plus `[apps."<app id>"]` tables; an app not named gets the default."""

    model_config = ConfigDict(extra="forbid")

    default: AppPolicy = AppPolicy()
    apps: dict[str, AppPolicy] = {}

    def for_app(self, app_id: str) -> AppPolicy:
        return self.apps.get(app_id, self.default)

"""llmosd's configuration: TOML validated by pydantic, with defaults that work with no file at all."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from llmos.arbiter.policy import AppPolicy, ArbiterConfig, PolicyTable
from llmos.errors import LlmosError, validation_problems
from system_services.system_tools import SYSTEM_TOOL_NAMES

DEFAULT_CONFIG = Path("/etc/llmos/llmosd.toml")


class ConfigError(LlmosError):
    """The configuration file is unreadable or invalid."""

    dbus_name = "InvalidArgument"


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # a model directory or name in the store; None = the store's default
    model_dir: Path | None = None  # the model store root; None = the per-user store (session bus)
    threads: int = Field(0, ge=0, le=256)  # 0 = all available cores
    max_batch: int = Field(8, ge=1, le=64)
    context_length: int | None = Field(None, ge=64)  # None = the model's own
    prefill_chunk: int = Field(256, ge=16, le=8192)
    # onnxruntime execution providers, tried in order; CPU is the fallback when none initialises
    providers: list[Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], min_length=1
    )


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(4096, ge=1)  # the most any one request may ask for
    sessions_per_connection: int = Field(32, ge=1)
    default_max_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _default_within_limit(self) -> LimitsConfig:
        if "default_max_tokens" not in self.model_fields_set:  # unset: follow a lowered limit
            self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        elif self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is over max_tokens ({self.max_tokens})"
            )
        return self


class JobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_per_app: int = Field(32, ge=1)  # scheduled jobs one app (per user) may have
    min_interval_s: int = Field(60, ge=1)  # the shortest interval trigger
    results_kept: int = Field(20, ge=1)  # results of the last runs kept per job


class HttpConfig(BaseModel):
    """[http]: the OpenAI- and Ollama-compatible endpoint on a unix socket (docs/http-api.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # None = $XDG_RUNTIME_DIR/llmos/http.sock (session daemon; none without XDG_RUNTIME_DIR), or
    # /run/llmos/http.sock with --system (RuntimeDirectory=llmos)
    socket: Path | None = None
    max_body_bytes: int = Field(8 << 20, ge=1024, le=64 << 20)  # a request body, checked before reading
    max_connections: int = Field(64, ge=1, le=4096)
    idle_timeout_s: float = Field(30.0, gt=0)  # a keep-alive connection with no request is closed


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    arbiter: ArbiterConfig = ArbiterConfig()
    jobs: JobsConfig = JobsConfig()  # scheduled agent runs
    http: HttpConfig = HttpConfig()
    # per-app policy: [apps.default] for everyone, [apps."org.example.App"] for one app id
    apps: dict[str, AppPolicy] = {}
    # None = $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/llmos with --system, else
    # $XDG_STATE_HOME/llmos (~/.local/state/llmos)
    state_dir: Path | None = None
    watchdog_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _known_system_tools(self) -> DaemonConfig:
        for app, policy in self.apps.items():
            unknown = sorted(set(policy.system_tools or ()) - set(SYSTEM_TOOL_NAMES))
            if unknown:
                raise ValueError(
                    f"apps.{app}.system_tools: no system tool {', '.join(unknown)} "
                    f"(there are {', '.join(SYSTEM_TOOL_NAMES)})"
                )
        return self

    @property
    def policies(self) -> PolicyTable:
        rest = {k: v for k, v in self.apps.items() if k != "default"}
        return PolicyTable(default=self.apps.get("default", AppPolicy()), apps=rest)

    @classmethod
    def load(cls, path: Path | None) -> DaemonConfig:
        """Read `path` (or the default path if it exists); a missing default file means all defaults."""
        target = path or DEFAULT_CONFIG
        if path is None and not target.exists():
            return cls()
        try:
            data = tomllib.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{target}: no such configuration file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{target}: unreadable configuration ({e})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = validation_problems(e, "configuration")
            raise ConfigError(f"{target}: invalid configuration: {problems}") from None

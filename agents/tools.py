"""Tools apps provide: their manifest (validated at the boundary) and who may use which.

An app registers a provider object with a manifest of tools: a name, a description, JSON Schema
parameters, and flags. A tool belongs to the connection that registered it: it is usable only in runs
that connection starts, unless it is marked `shared`; `confirm` asks the run's owner before every call.
Nothing a tool returns can change any of this (permissions live here, not in the conversation).

Names. Every app picks its tools' names, so two apps may both have a shared `get_time`. A run sees its
own tools (those of the connection that started it) under their plain names, and every other
connection's shared tool under a name qualified by the app that provides it, `org.example.Clock/get_time`;
the system tools keep their plain, reserved names. So a name in a run means one tool of one app, and a
call goes to the tool the model (and the caller, in the Step) saw named. The other ways were worse:
first come, first served let a squatter that registered `get_time` first receive every other app's
calls of it, with their arguments; refusing a second registration of a taken name would let the same
squatter lock an honest app out of its own tool's name. Qualified names cost a squatter both: its tool
is offered under its own app id, beside the other app's, and takes nothing from it. A runner's own tool
always keeps its plain name (no shared tool can take it). Two connections of one app (two instances of
it) that share a tool of the same name offer it once, the first registered: they are the same app.

Shared tools reach only runs of the same user (uid): on the system bus one user's app must not receive
another user's run's arguments, whatever its tools are called.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import llguidance as llg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from agents.arguments import argument_problems
from agents.strict_schema import JSON_ESCAPES, StrictLimits, StrictSchemaError, strict_schema
from llmos import bounded_json
from llmos.errors import LlmosError, validation_problems

MAX_MANIFEST_CHARS = 256 * 1024
MAX_TOOLS = 64  # per manifest, and per connection
MAX_PARAMETERS_CHARS = 16 * 1024
MAX_PARAMETERS_DEPTH = bounded_json.MAX_DEPTH
# The manifest's text is refused past twice that, before it is parsed: room for any manifest whose
# parameters are within their own limit, which each tool's validator then names
MAX_MANIFEST_DEPTH = 2 * MAX_PARAMETERS_DEPTH
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
# An app id that can qualify a shared tool's name: what Flatpak ids, snap names and executables are made
# of, and nothing that could pose as markup or as a separator in the name ("/")
_APP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}$")


class ToolManifestError(LlmosError):
    """A tool manifest that is not JSON, or not what a manifest must be."""

    dbus_name = "InvalidArgument"


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = Field(min_length=1, max_length=2000)
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    confirm: bool = False  # the run's owner approves each call first
    shared: bool = False  # usable in runs other apps start
    limits: StrictLimits = Field(default_factory=StrictLimits)  # caps of its strict form
    # the strict form of `parameters` (agents/strict_schema.py), derived once: what step grammars and
    # argument checks use; `parameters` stays as the author wrote it, for the model to read
    _strict: dict = PrivateAttr(default_factory=dict)
    _scaled: dict = PrivateAttr(default_factory=dict)  # (scale, probe) -> the strict form, caps lowered

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a tool name is a letter then up to 63 letters, digits or underscores")
        return v

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict) -> dict:
        if v.get("type") != "object":
            raise ValueError('parameters must be a JSON Schema of "type": "object"')
        if bounded_json.value_depth(v) > MAX_PARAMETERS_DEPTH:  # before anything below recurses into it
            raise ValueError(f"parameters are nested more than {MAX_PARAMETERS_DEPTH} levels deep")
        if len(json.dumps(v)) > MAX_PARAMETERS_CHARS:
            raise ValueError(f"parameters are over {MAX_PARAMETERS_CHARS} characters of JSON")
        # compiled now, as every run's step grammar will: a schema the compiler refuses (a broken $ref,
        # an unknown type) is this manifest's error, not a failure of every run that may use the tool
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(v)
        except ValueError as e:
            raise ValueError(f"parameters cannot be used: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ValueError(f"parameters cannot be used: {messages[0] if messages else 'invalid'}")
        return v

    @model_validator(mode="after")
    def _strict_form(self) -> ToolSpec:
        try:
            strict = strict_schema(self.parameters, self.limits)
        except StrictSchemaError as e:
            raise ValueError(f"parameters: {e}") from None
        _check_compiles(strict, "the strict form of the parameters")  # as every step grammar will
        self._strict = strict
        return self

    @property
    def strict_parameters(self) -> dict[str, Any]:
        """The strict form of `parameters`: closed objects, bounded strings, arrays and numbers."""
        return self._strict

    def scaled_parameters(self, scale: float, *, probe: bool = False) -> dict[str, Any]:
        """The strict form with every string and array cap lowered to `scale` of itself, for a step that
        cannot hold the largest call (agents/call_budget.py); `probe`: each lowered cap one less."""
        key = (scale, probe)
        if key not in self._scaled:
            if len(self._scaled) > 64:
                self._scaled.clear()
            self._scaled[key] = strict_schema(self.parameters, self.limits, scale=scale, probe=probe)
        return self._scaled[key]


def _check_compiles(schema: dict[str, Any], what: str) -> None:
    """A schema llguidance compiles as step grammars do (their escapes); ValueError naming it if not."""
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"json_allowed_escapes": JSON_ESCAPES}
        )
    except ValueError as e:
        raise ValueError(f"{what} cannot be used: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"{what} cannot be used: {messages[0] if messages else 'invalid'}")


class ToolManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: list[ToolSpec] = Field(min_length=1, max_length=MAX_TOOLS)

    @classmethod
    def parse(cls, text: str) -> ToolManifest:
        try:
            raw = bounded_json.loads(
                text, "the manifest", max_chars=MAX_MANIFEST_CHARS, max_depth=MAX_MANIFEST_DEPTH
            )
        except bounded_json.InvalidJsonError as e:
            raise ToolManifestError(str(e)) from None
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            raise ToolManifestError(f"invalid manifest: {validation_problems(e, 'manifest')}") from None
        names = [t.name for t in manifest.tools]
        if len(set(names)) != len(names):
            raise ToolManifestError("the manifest names a tool twice")
        return manifest


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    owner: str  # the provider's unique bus name
    app_id: str
    path: str  # its org.llmos.ToolProvider1 object
    uid: int | None = None  # the provider's user
    qualified: bool = False  # seen by a run it is not the runner's own: named "<app id>/<name>"

    @property
    def name(self) -> str:
        """What a run calls it (the model, the Step, an agent's `tools`): the provider's own name for the
        runner's own tools and the system tools, "<app id>/<name>" for another connection's shared tool.
        `spec.name` stays the provider's own: it is what ToolProvider1.Call is told."""
        return f"{self.app_id}/{self.spec.name}" if self.qualified else self.spec.name


class ToolRegistry:
    """Every app's tools, by the connection that registered them; `usable_by` is what one run sees
    (the module's docstring says how names are kept apart)."""

    def __init__(self) -> None:
        self._by_owner: dict[str, dict[str, Tool]] = {}  # owner -> tool name -> tool

    def register(
        self, owner: str, app_id: str, path: str, manifest: ToolManifest, *, uid: int | None = None
    ) -> list[str]:
        """Add (or replace) the owner's tools; returns their names. A connection has at most MAX_TOOLS:
        every tool, shared ones most of all, grows the step grammar of the runs that may use it."""
        if any(t.shared for t in manifest.tools) and not _APP_ID.match(app_id):
            raise ToolManifestError(
                f"a shared tool is offered under its app's id, and {app_id!r} cannot qualify a tool name "
                "(letters, digits, '.', '_', '+', '-'); register it unshared"
            )
        current = self._by_owner.get(owner, {})
        after = set(current) | {t.name for t in manifest.tools}
        if len(after) > MAX_TOOLS:
            raise ToolManifestError(
                f"a connection may register at most {MAX_TOOLS} tools ({len(after)} with these); "
                "unregister some first"
            )
        tools = self._by_owner.setdefault(owner, {})
        for spec in manifest.tools:
            tools[spec.name] = Tool(spec, owner, app_id, path, uid)
        return [t.name for t in manifest.tools]

    def unregister(self, owner: str, path: str | None = None) -> int:
        """Drop the owner's tools (those of one provider path, or all); returns how many."""
        tools = self._by_owner.get(owner, {})
        gone = [n for n, t in tools.items() if path is None or t.path == path]
        for n in gone:
            del tools[n]
        if not tools:
            self._by_owner.pop(owner, None)
        return len(gone)

    def usable_by(self, runners: Collection[str], uid: int | None = None) -> list[Tool]:
        """What a run started by `runners` (one connection, or all of an app's for a scheduled run) of
        user `uid` may call: their own tools under their plain names, then the shared tools of other
        connections of the same user, each under its app-qualified name (once per app and name: the
        first connection that registered it)."""
        if isinstance(runners, str):
            runners = (runners,)
        usable: dict[str, Tool] = {}
        for runner in runners:
            usable.update(self._by_owner.get(runner, {}))
        for owner, tools in self._by_owner.items():
            if owner in runners:
                continue
            for tool in tools.values():
                if tool.spec.shared and tool.uid == uid:
                    seen = replace(tool, qualified=True)
                    usable.setdefault(seen.name, seen)
        return list(usable.values())


__all__ = [
    "MAX_TOOLS",
    "Tool",
    "ToolManifest",
    "ToolManifestError",
    "ToolRegistry",
    "ToolSpec",
    "argument_problems",
]

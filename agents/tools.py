"""Tools apps provide: their manifest (validated at the boundary) and who may use which.

An app registers a provider object with a manifest of tools: a name, a description, JSON Schema
parameters, and flags. A tool belongs to the connection that registered it: it is usable only in runs
that connection starts, unless it is marked `shared`; `confirm` asks the run's owner before every call.
Nothing a tool returns can change any of this (permissions live here, not in the conversation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import llguidance as llg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def argument_problems(schema: dict, arguments: Any) -> list[str]:
    """What is wrong with `arguments` for a tool's parameters schema, checked at the top level: an
    object, required names present, no names the schema closes out, each value's type, enum/const and
    string length. Steps of the planner are constrained by the whole schema already; this guards calls
    made by an agent's own step logic, before they reach the app."""
    if not isinstance(arguments, dict):
        return ["the arguments are not a JSON object"]
    props: dict = schema.get("properties", {})
    problems = [f"{name!r} is missing" for name in schema.get("required", []) if name not in arguments]
    if schema.get("additionalProperties") is False:
        problems += [f"{name!r} is not a parameter" for name in arguments if name not in props]
    for name, value in arguments.items():
        rule = props.get(name)
        if not isinstance(rule, dict):
            continue
        types = rule.get("type")
        types = [types] if isinstance(types, str) else types or []
        known = [t for t in types if t in _JSON_TYPES]
        # bool is an int in Python, not in JSON
        if known and not any(
            isinstance(value, _JSON_TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number"))
            for t in known
        ):
            problems.append(f"{name!r} must be {' or '.join(known)}")
        if "enum" in rule and value not in rule["enum"]:
            problems.append(f"{name!r} must be one of {rule['enum']}")
        if "const" in rule and value != rule["const"]:
            problems.append(f"{name!r} must be {rule['const']!r}")
        if isinstance(value, str):
            if len(value) > rule.get("maxLength", len(value)):
                problems.append(f"{name!r} is over {rule['maxLength']} characters")
            if len(value) < rule.get("minLength", 0):
                problems.append(f"{name!r} is under {rule['minLength']} characters")
    return problems


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


class ToolRegistry:
    def __init__(self) -> None:
        self._by_owner: dict[str, dict[str, Tool]] = {}  # owner -> tool name -> tool

    def register(self, owner: str, app_id: str, path: str, manifest: ToolManifest) -> list[str]:
        """Add (or replace) the owner's tools; returns their names. A connection has at most MAX_TOOLS:
        every tool, shared ones most of all, grows the step grammar of the runs that may use it."""
        current = self._by_owner.get(owner, {})
        after = set(current) | {t.name for t in manifest.tools}
        if len(after) > MAX_TOOLS:
            raise ToolManifestError(
                f"a connection may register at most {MAX_TOOLS} tools ({len(after)} with these); "
                "unregister some first"
            )
        tools = self._by_owner.setdefault(owner, {})
        for spec in manifest.tools:
            tools[spec.name] = Tool(spec, owner, app_id, path)
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

    def usable_by(self, runners: Collection[str]) -> list[Tool]:
        """What a run started by `runners` (one connection, or all of an app's for a scheduled run) may
        call: their own tools, then other apps' shared ones. A name the runner has itself hides a shared
        tool of the same name."""
        if isinstance(runners, str):
            runners = (runners,)
        own: dict[str, Tool] = {}
        for runner in runners:
            own.update(self._by_owner.get(runner, {}))
        for owner, tools in self._by_owner.items():
            if owner not in runners:
                for name, tool in tools.items():
                    if tool.spec.shared and name not in own:
                        own[name] = tool
        return list(own.values())

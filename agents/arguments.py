"""Tool arguments checked against a schema, all the way down, before any app sees them.

The planner's calls are valid by construction (its steps are constrained by the tool's strict schema);
this guards the calls an agent's own step logic makes up, and the system tools' inputs. It covers what
a tool's parameters may use at all (what llguidance compiles; a manifest with anything else is refused
at registration): types, `enum`, `const`, `anyOf`/`oneOf` (as llguidance reads it: one branch that
fits) and `allOf`, local `$ref`s, objects (`properties`, `required`, `additionalProperties`,
`patternProperties`, `min/maxProperties`), arrays (`items`, `prefixItems`, `min/maxItems`), strings
(`min/maxLength` in characters, `pattern`, the formats llguidance knows) and numbers (bounds and
`multipleOf`). `jsonschema` would do it too, but it is a test dependency only, not one of the daemon's.

Problems are named by where they are: `'city'` for a top-level argument, `'address.zip'` and
`'stops[2]'` inside, so the model (or the agent's author) reading the error can fix that one value.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from agents.strict_schema import local_ref

MAX_DEPTH = 128  # schema levels followed, $refs included (arguments nest at most 64 levels)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
# Loose on purpose: anything llguidance's grammar for the format writes must pass
_FORMATS: dict[str, re.Pattern[str]] = {
    "date-time": re.compile(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?", re.ASCII
    ),
    "date": re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII),
    "time": re.compile(r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?", re.ASCII),
    "duration": re.compile(r"P(?=.)(\d+([.,]\d+)?[YMWD])*(T(?=.)(\d+([.,]\d+)?[HMS])*)?", re.ASCII),
    "email": re.compile(r"[^@\s]+@[^@\s]+"),
    "hostname": re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*\.?"),
    "uuid": re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
    "uri": re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S*"),
    "ipv4": re.compile(r".*"),  # by ipaddress, below
    "ipv6": re.compile(r".*"),
}


def argument_problems(schema: dict[str, Any], arguments: Any) -> list[str]:
    """What is wrong with `arguments` for a tool's parameters schema (every level of it); [] if nothing."""
    if not isinstance(arguments, dict):
        return ["the arguments are not a JSON object"]
    return _Checker(schema).check(schema, arguments, "", 0)


def _where(path: str) -> str:
    return repr(path) if path else "the arguments"


def _is_type(value: Any, t: str) -> bool:
    if t in ("integer", "number") and isinstance(value, bool):  # bool is an int in Python, not in JSON
        return False
    if t == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES.get(t, ()))


class _Checker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def check(self, s: Any, v: Any, path: str, depth: int) -> list[str]:
        if s is True or s is None:
            return []
        if s is False:
            return [f"{_where(path)} is not allowed"]
        if not isinstance(s, dict):
            return []
        if depth > MAX_DEPTH:
            return [f"{_where(path)} is nested too deep to check"]
        problems: list[str] = []
        if "$ref" in s:
            target = self.resolve(s["$ref"])
            if target is None:
                return [f"{_where(path)}: the schema's $ref {s['$ref']!r} points at nothing"]
            problems += self.check(target, v, path, depth + 1)
        if "const" in s and not _same(v, s["const"]):
            problems.append(f"{_where(path)} must be {s['const']!r}")
        if isinstance(s.get("enum"), list) and not any(_same(v, e) for e in s["enum"]):
            problems.append(f"{_where(path)} must be one of {s['enum']}")
        types = s.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        known = [t for t in types if t in _JSON_TYPES]
        if known and not any(_is_type(v, t) for t in known):
            return [
                *problems,
                f"{_where(path)} must be {' or '.join(known)}",
            ]  # the rest would only add noise
        for key in ("anyOf", "oneOf"):
            branches = s.get(key)
            if isinstance(branches, list) and branches:
                found = [self.check(b, v, path, depth + 1) for b in branches]
                if all(found):
                    best = min(found, key=len)
                    problems += best if len(branches) == 1 else [f"{_where(path)} fits none of its forms"]
        for branch in s.get("allOf") or []:
            problems += self.check(branch, v, path, depth + 1)
        if isinstance(v, dict):
            problems += self.object(s, v, path, depth)
        elif isinstance(v, list):
            problems += self.array(s, v, path, depth)
        elif isinstance(v, str):
            problems += self.string(s, v, path)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            problems += self.number(s, v, path)
        return problems

    def resolve(self, ref: Any) -> Any:
        return local_ref(self.root, ref)

    def object(self, s: dict[str, Any], v: dict[str, Any], path: str, depth: int) -> list[str]:
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        patterns = s.get("patternProperties") if isinstance(s.get("patternProperties"), dict) else {}
        inner = f"{path}." if path else ""
        problems = [f"{inner + n!r} is missing" for n in s.get("required") or [] if n not in v]
        for name, value in v.items():
            where = inner + name
            matched = [p for p in patterns if _search(p, name)]
            if name in props:
                problems += self.check(props[name], value, where, depth + 1)
            for p in matched:
                problems += self.check(patterns[p], value, where, depth + 1)
            if name not in props and not matched:
                extra = s.get("additionalProperties", True)
                if extra is False:
                    problems.append(
                        f"{where!r} is not a parameter" if not path else f"{where!r} is not allowed"
                    )
                else:
                    problems += self.check(extra, value, where, depth + 1)
        if isinstance(s.get("maxProperties"), int) and len(v) > s["maxProperties"]:
            problems.append(f"{_where(path)} has over {s['maxProperties']} keys")
        if isinstance(s.get("minProperties"), int) and len(v) < s["minProperties"]:
            problems.append(f"{_where(path)} has under {s['minProperties']} keys")
        return problems

    def array(self, s: dict[str, Any], v: list[Any], path: str, depth: int) -> list[str]:
        problems: list[str] = []
        prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
        for i, item in enumerate(v):
            sub = prefix[i] if i < len(prefix) else s.get("items", True)
            problems += self.check(sub, item, f"{path}[{i}]", depth + 1)
        if isinstance(s.get("maxItems"), int) and len(v) > s["maxItems"]:
            problems.append(f"{_where(path)} has over {s['maxItems']} items")
        if isinstance(s.get("minItems"), int) and len(v) < s["minItems"]:
            problems.append(f"{_where(path)} has under {s['minItems']} items")
        return problems

    def string(self, s: dict[str, Any], v: str, path: str) -> list[str]:
        problems = []
        if isinstance(s.get("maxLength"), int) and len(v) > s["maxLength"]:
            problems.append(f"{_where(path)} is over {s['maxLength']} characters")
        if isinstance(s.get("minLength"), int) and len(v) < s["minLength"]:
            problems.append(f"{_where(path)} is under {s['minLength']} characters")
        if isinstance(s.get("pattern"), str) and not _search(s["pattern"], v):
            problems.append(f"{_where(path)} does not match {s['pattern']!r}")
        form = _FORMATS.get(s.get("format", ""))
        if form is not None and not _format_ok(s["format"], form, v):
            problems.append(f"{_where(path)} is not a {s['format']}")
        return problems

    def number(self, s: dict[str, Any], v: float, path: str) -> list[str]:
        problems = []
        low, high = s.get("minimum"), s.get("maximum")
        x_low, x_high = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
        if x_low is True:  # draft 4: the bound itself is out
            x_low, low = low, None
        if x_high is True:
            x_high, high = high, None
        if _num(low) and v < low:
            problems.append(f"{_where(path)} is under {low}")
        if _num(high) and v > high:
            problems.append(f"{_where(path)} is over {high}")
        if _num(x_low) and v <= x_low:
            problems.append(f"{_where(path)} must be over {x_low}")
        if _num(x_high) and v >= x_high:
            problems.append(f"{_where(path)} must be under {x_high}")
        step = s.get("multipleOf")
        if _num(step) and step > 0:
            try:
                if Decimal(repr(v)) % Decimal(repr(step)) != 0:
                    problems.append(f"{_where(path)} must be a multiple of {step}")
            except InvalidOperation:
                pass  # too large to tell: the grammar bounded the planner's numbers anyway
        return problems


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 and 1.0 are the same number, true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _search(pattern: str, text: str) -> bool:
    """JSON Schema's `pattern`: found anywhere in the text. A pattern Python cannot read (llguidance's
    regexes are Rust's) is not held against the value: the grammar enforced it on the planner's calls."""
    try:
        return re.search(pattern, text) is not None
    except (re.error, RecursionError, OverflowError):
        return True


def _format_ok(name: str, form: re.Pattern[str], v: str) -> bool:
    if name in ("ipv4", "ipv6"):
        try:
            (ipaddress.IPv4Address if name == "ipv4" else ipaddress.IPv6Address)(v)
            return True
        except ValueError:
            return False
    return form.fullmatch(v) is not None

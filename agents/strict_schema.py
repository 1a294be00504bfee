"""Strict tool schemas, as OpenAI's strict mode: the form of a tool's `parameters` that step grammars are
built from, so a call can only hold keys its tool declares and always ends.

Apps write parameters the way people write JSON Schemas: objects left open, strings and arrays without a
length, numbers without bounds. Constrained decoding follows the schema to the letter, so an open
object lets a small model invent keys (it copies schema words, `"type": "string"`, into the arguments),
and an unbounded string or array lets it write until the step runs out of tokens, failing the run. The
strict form, derived once when a tool is registered and kept beside the author's schema, closes and
bounds everything while accepting every value the author's schema accepts within these limits:

- every object is closed (`additionalProperties: false`), unless the author set `additionalProperties`
  to true or a schema: then its extra keys are kept, at most `max_items` of them, each at most
  `MAX_KEY_CHARS` characters (an open map's `patternProperties`, by which llguidance can bound them);
- every string has a `maxLength`: the author's, else `max_string` (never below the `minLength`, nor
  below what the `pattern` or `format` needs);
- every array has a `maxItems`: the author's, else `max_items` (never below `minItems`);
- every integer and number has bounds: the author's, else ±(2^53 - 1) (±10^15 for numbers, which also
  get at most 6 decimal places unless the author gave a `multipleOf`): a number without them lets a
  model print digits until the step ends;
- a value the author left open (`true`, `{}`, no `type`) is a scalar, or an array or map of scalars
  (the items of an array, or the values of a map, left open: scalars);
  a schema without `type` but with keywords of some types (`properties`, `maxLength`) takes those types;
- `$ref`s are expanded (a recursive one at most `REF_DEPTH` levels deep; past that, not offered),
  `oneOf` becomes `anyOf` (llguidance takes the author's `oneOf` only where the two are the same), and
  names declared only inside `anyOf`/`allOf` branches are declared at the object that holds them, so
  closing it keeps them; `required`, `enum`, `const`, `pattern`, `format` and numeric bounds are kept;
- `patternProperties` the author wrote are left out: the keys they admit cannot be bounded.

`max_string` and `max_items` are per tool (the manifest's `"limits"`). `max_bytes` bounds the JSON text
of any value the strict form admits, which bounds the tokens of a call (every token is at least one
byte); `scaled` lowers the caps for a step that cannot hold the largest call (agents/call_budget.py).
"""

from __future__ import annotations

import json
import math
import re
import re._parser as sre_parse  # the widths of a pattern (llmos needs Python 3.11 or later)
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_STRING = 200  # a sentence or two: a message body, a search query, a title
DEFAULT_MAX_ITEMS = 16
MAX_STRING_LIMIT = 4000  # what a tool may raise its own caps to (a call must fit [limits] max_tokens)
MAX_ITEMS_LIMIT = 256
MAX_KEY_CHARS = 64  # a key of a map the author left open
INTEGER_BOUND = 2**53 - 1  # the integers a JSON number holds exactly
NUMBER_BOUND = 10**15
NUMBER_STEP = 1e-6  # decimal places of a number whose author gave no multipleOf
REF_DEPTH = 3  # how often one $ref may recur inside itself
ANY_DEPTH = 1  # an open value: a scalar, or an array or map of scalars
MAX_STRICT_CHARS = 256 * 1024  # the strict form, $refs expanded; past that the manifest is refused
# Schemas made while expanding: $refs that each refer to another twice would otherwise grow the strict form
# exponentially (a manifest of a few lines that takes the daemon's memory) before its size is known
MAX_STRICT_NODES = 20_000
MAX_SCHEMA_LEVELS = 100  # schemas inside schemas, $refs expanded (the manifest nests at most 64 levels)
# Escapes a step's strings may use: no \uXXXX, so a character is at most 4 bytes of the call (its UTF-8)
# and a string's bytes are bounded by its length. (The only characters lost are control characters other
# than \b \f \n \r \t.)
JSON_ESCAPES = '"\\bfnrt'
BYTES_PER_CHAR = 4
# The shortest string each format llguidance knows admits (the cap is never lowered below it)
FORMAT_MIN_CHARS = {
    "date-time": 20,
    "date": 10,
    "time": 9,
    "duration": 3,
    "email": 3,
    "hostname": 1,
    "ipv4": 7,
    "ipv6": 2,
    "uuid": 36,
    "uri": 3,
}
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$schema",
    "$id",
    "$anchor",
    "contentMediaType",
    "contentEncoding",
    "nullable",
}
_TYPE_KEYWORDS = {
    "object": {
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "minProperties",
        "maxProperties",
    },
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
_ALL_TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]
_KEY_CHAR = '[^"\\\\\\x00-\\x1f]'  # a key character that needs no escape


class StrictLimits(BaseModel):
    """A tool's own caps for what its author left unbounded (the manifest's `"limits"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_string: int = Field(DEFAULT_MAX_STRING, ge=1, le=MAX_STRING_LIMIT)
    max_items: int = Field(DEFAULT_MAX_ITEMS, ge=1, le=MAX_ITEMS_LIMIT)


class StrictSchemaError(ValueError):
    """Parameters whose strict form cannot be made (too large once $refs are expanded, a broken $ref)."""


def strict_schema(
    schema: dict[str, Any], limits: StrictLimits | None = None, *, scale: float = 1.0, probe: bool = False
) -> dict[str, Any]:
    """The strict form of a tool's parameters (see the module's docstring). `scale` < 1 lowers every
    string and array cap (the author's too) to that fraction, never below what the schema needs;
    `probe` makes each lowered cap one less, so a value valid against it did not reach a lowered cap."""
    maker = _Strict(schema, limits or StrictLimits(), scale, probe)
    out = maker.node(schema, closing=True, depth=0)
    if not isinstance(out, dict):
        out = {"type": "object", "properties": {}, "additionalProperties": False}
    for key in ("$defs", "definitions"):
        out.pop(key, None)  # expanded where they were referred to
    if len(json.dumps(out)) > MAX_STRICT_CHARS:
        raise StrictSchemaError(
            f"parameters are over {MAX_STRICT_CHARS} characters once their $refs are expanded"
        )
    return out


class _Strict:
    def __init__(self, root: dict[str, Any], limits: StrictLimits, scale: float, probe: bool) -> None:
        self.root, self.limits, self.scale, self.probe = root, limits, scale, probe
        self.refs: list[str] = []  # the $refs being expanded, outermost first
        self.made = 0  # schemas made so far

    # -- caps ----------------------------------------------------------------------------------------
    def cap(self, author: int | None, default: int, floor: int) -> int:
        """A string or array cap: the author's or the default, never below `floor`; lowered by `scale`."""
        full = max(author if author is not None else default, floor)
        if self.scale >= 1:
            return full
        lowered = max(floor, math.floor(full * self.scale))
        if lowered < full and self.probe:
            return lowered - 1  # a value valid against this did not reach the lowered cap
        return lowered

    # -- nodes ---------------------------------------------------------------------------------------
    def node(self, s: Any, *, closing: bool, depth: int) -> Any:
        """The strict form of one schema. `closing`: a whole schema, whose objects are closed here; a
        branch of anyOf/allOf beside object keywords is a fragment: its names are declared (and closed)
        at the object that holds it."""
        self.made += 1
        if self.made > MAX_STRICT_NODES:
            raise StrictSchemaError(
                f"parameters are over {MAX_STRICT_NODES} schemas once their $refs are expanded"
            )
        if depth > MAX_SCHEMA_LEVELS:  # deeper is not offered (expanded $refs nest deepest)
            return False
        if s is True or (isinstance(s, dict) and closing and set(s) <= _ANNOTATIONS):
            return self.any_value(ANY_DEPTH, {k: v for k, v in s.items()} if isinstance(s, dict) else {})
        if not isinstance(s, dict):
            return False if s is False else s
        if "$ref" in s:
            return self.ref(s, closing=closing, depth=depth)
        if "const" in s or "enum" in s:  # finitely many values, as the author wrote them
            return {k: v for k, v in s.items() if k not in ("$defs", "definitions")}
        out: dict[str, Any] = {k: v for k, v in s.items() if k in _ANNOTATIONS}
        branches = {k: s[k] for k in ("anyOf", "oneOf", "allOf") if isinstance(s.get(k), list)}
        own = {k: v for k, v in s.items() if k not in branches and k not in _ANNOTATIONS}
        types = self.types(s, fragment=not closing or bool(branches))
        if types is not None and (closing or "type" in s):  # a fragment's types are its holder's
            out["type"] = types if len(types) > 1 else types[0]
        if types is None and not closing:  # a fragment without types: only its subschemas are made strict
            types = []
        for t in types or []:
            getattr(self, f"_{t if t != 'integer' else 'number'}")(s, own, out, closing, depth, types)
        # a composition: every branch a fragment of this object (or a whole schema when it stands alone)
        whole = not any(k in own for k in _TYPE_KEYWORDS["object"]) and types is None
        for key, parts in branches.items():
            made = [self.node(p, closing=closing and whole, depth=depth + 1) for p in parts]
            out["allOf" if key == "allOf" else "anyOf"] = made  # oneOf: llguidance took it as anyOf
        if branches and closing and "object" in (types or []):
            self.declare_branch_names(out)
        if closing and out.get("additionalProperties") is False and "patternProperties" not in out:
            for name in out.get("required", []):  # required, declared nowhere: any value, bounded
                out["properties"].setdefault(name, self.any_value(ANY_DEPTH, {}))
        return out

    def types(self, s: dict[str, Any], *, fragment: bool) -> list[str] | None:
        """The types this schema admits, in the author's order; None for a fragment with no type."""
        t = s.get("type")
        if isinstance(t, str):
            return [t]
        if isinstance(t, list) and t:
            return [x for x in t if isinstance(x, str)]
        implied = [
            name for name, words in _TYPE_KEYWORDS.items() if any(w in s for w in words)
        ]  # no type: the types its keywords are about
        if implied:
            return implied
        return None if fragment else list(_ALL_TYPES)

    def ref(self, s: dict[str, Any], *, closing: bool, depth: int) -> Any:
        ref = s["$ref"]
        if self.refs.count(ref) >= REF_DEPTH:
            return False  # recursion this deep is not offered: the call stays finite
        target = _resolve(self.root, ref)
        siblings = {k: v for k, v in s.items() if k != "$ref"}
        self.refs.append(ref)
        try:
            made = self.node(target, closing=closing, depth=depth + 1)
            if not set(siblings) - _ANNOTATIONS:
                return made
            return {"allOf": [made, self.node(siblings, closing=False, depth=depth + 1)]}
        finally:
            self.refs.pop()

    # -- per type ------------------------------------------------------------------------------------
    def _string(self, s: dict, own: dict, out: dict, closing: bool, depth: int, types: list) -> None:
        for k in ("minLength", "pattern", "format"):
            if k in own:
                out[k] = own[k]
        floor = max(
            int(own.get("minLength", 0)),
            _pattern_min_chars(own.get("pattern")),
            FORMAT_MIN_CHARS.get(own.get("format", ""), 0),
        )
        out["maxLength"] = self.cap(own.get("maxLength"), self.limits.max_string, floor)

    def _number(self, s: dict, own: dict, out: dict, closing: bool, depth: int, types: list) -> None:
        if "minimum" in out:  # integer and number both listed: done once
            return
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if k in own:
                out[k] = own[k]
        bound = INTEGER_BOUND if "number" not in types else NUMBER_BOUND
        if "minimum" not in own and not _is_number(own.get("exclusiveMinimum")):
            out["minimum"] = -bound
        if "maximum" not in own and not _is_number(own.get("exclusiveMaximum")):
            out["maximum"] = bound
        if "number" in types and "multipleOf" not in own:
            out["multipleOf"] = NUMBER_STEP

    def _boolean(self, *_: Any) -> None:
        pass

    def _null(self, *_: Any) -> None:
        pass

    def _array(self, s: dict, own: dict, out: dict, closing: bool, depth: int, types: list) -> None:
        prefix = own.get("prefixItems")
        if isinstance(prefix, list):
            out["prefixItems"] = [self.node(p, closing=True, depth=depth + 1) for p in prefix]
        items = own.get("items", True if closing else None)
        if items is True or items == {}:  # open items: scalars (the array is the one level)
            out["items"] = self.any_value(ANY_DEPTH - 1, {})
        elif items is not None:
            out["items"] = self.node(items, closing=True, depth=depth + 1)
        if "minItems" in own:
            out["minItems"] = own["minItems"]
        out["maxItems"] = self.cap(own.get("maxItems"), self.limits.max_items, int(own.get("minItems", 0)))

    def _object(self, s: dict, own: dict, out: dict, closing: bool, depth: int, types: list) -> None:
        props = own.get("properties") if isinstance(own.get("properties"), dict) else {}
        out["properties"] = {k: self.node(v, closing=True, depth=depth + 1) for k, v in props.items()}
        if isinstance(own.get("required"), list):
            out["required"] = list(own["required"])
        if "minProperties" in own:
            out["minProperties"] = own["minProperties"]
        if not closing:  # a fragment: the object that holds it closes it
            return
        extra = own.get("additionalProperties")
        if extra is None or extra is False:
            out["additionalProperties"] = False
            return
        # the author opened it: extra keys are kept, bounded in length and number. llguidance bounds their
        # number (maxProperties) only when every name in `properties` is required, so the optional ones go
        # to patternProperties, each under its exact name; the keys of the map are every other name
        open_value = extra is True or extra == {}
        value = (
            self.any_value(ANY_DEPTH - 1, {}) if open_value else self.node(extra, closing=True, depth=depth)
        )
        required = list(dict.fromkeys(out.get("required", [])))
        optional = {n: v for n, v in out["properties"].items() if n not in required}
        out["properties"] = {n: out["properties"].get(n, value) for n in required}
        patterns = {f"^{_regex_literal(n)}$": v for n, v in optional.items()}
        patterns[_key_pattern(set(props) | set(required))] = value
        out["patternProperties"] = patterns
        out["additionalProperties"] = False
        most = len(required) + len(optional) + self.cap(own.get("maxProperties"), self.limits.max_items, 0)
        out["maxProperties"] = min(most, own.get("maxProperties", most))

    def declare_branch_names(self, out: dict[str, Any]) -> None:
        """Names that only anyOf/allOf branches declare are declared here too, with what the branches
        allow for them, so closing this object keeps them (llguidance intersects each branch's schema
        for a name with this one: every name stays bounded, whichever branch is taken)."""
        found: dict[str, list[Any]] = {}
        _branch_names(out, found, top=True)
        declared = out.setdefault("properties", {})
        for name, schemas in found.items():
            if name in declared:
                continue
            unique = [json.loads(t) for t in dict.fromkeys(json.dumps(x, sort_keys=True) for x in schemas)]
            declared[name] = unique[0] if len(unique) == 1 else {"anyOf": unique}

    def any_value(self, depth: int, annotations: dict[str, Any]) -> dict[str, Any]:
        """A value the author left open: a scalar, or (depth > 0) an array or map of such values."""
        scalar = ["null", "boolean", "number", "string"]
        out: dict[str, Any] = {
            **{k: v for k, v in annotations.items() if k in _ANNOTATIONS},
            "type": scalar + (["array", "object"] if depth > 0 else []),
            "maxLength": self.cap(None, self.limits.max_string, 0),
            "minimum": -NUMBER_BOUND,
            "maximum": NUMBER_BOUND,
            "multipleOf": NUMBER_STEP,
        }
        if depth > 0:
            inner = self.any_value(depth - 1, {})
            out["items"] = inner
            out["maxItems"] = self.cap(None, self.limits.max_items, 0)
            out["patternProperties"] = {_key_pattern(set()): inner}
            out["additionalProperties"] = False
            out["maxProperties"] = self.cap(None, self.limits.max_items, 0)
        return out


def _branch_names(s: Any, found: dict[str, list[Any]], *, top: bool = False) -> None:
    if not isinstance(s, dict):
        return
    if not top:
        for name, sub in (s.get("properties") or {}).items():
            found.setdefault(name, []).append(sub)
    for key in ("anyOf", "allOf"):
        for branch in s.get(key) or []:
            _branch_names(branch, found)


def local_ref(root: Any, ref: Any) -> Any:
    """What a local $ref ("#/$defs/x", "#") points at within `root` (JSON pointer), or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _resolve(root: dict[str, Any], ref: Any) -> Any:
    """The schema a local $ref points at in the author's parameters, or a named error."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise StrictSchemaError(f"$ref {ref!r} is not within the parameters")
    node = local_ref(root, ref)
    if node is None:
        raise StrictSchemaError(f"$ref {ref!r} points at nothing")
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _pattern_min_chars(pattern: Any) -> int:
    """The fewest characters a `pattern` matches (Python's reading of it; 0 when it cannot tell)."""
    if not isinstance(pattern, str):
        return 0
    try:
        low, _high = sre_parse.parse(pattern).getwidth()
    except (re.error, OverflowError, RecursionError, ValueError):
        return 0
    return min(int(low), MAX_STRING_LIMIT)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def _code(c: str) -> str:
    """A character as an escape both llguidance's (Rust) regexes and Python's read."""
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def _regex_literal(text: str) -> str:
    """`text` as a regex matching only itself (in llguidance's Rust syntax and Python's alike)."""
    return "".join(f"\\{c}" if c in _REGEX_META else c if c.isprintable() else _code(c) for c in text)


def _class_char(c: str) -> str:
    return f"\\{c}" if c in "\\]^-[&~" else c if c.isprintable() else _code(c)


def _key_pattern(exclude: set[str], max_chars: int = MAX_KEY_CHARS) -> str:
    """A regex for the keys of an open map: 1 to `max_chars` characters that need no escape, other than
    the names in `exclude` (declared elsewhere: llguidance wants patterns disjoint from them, and JSON
    Schema gives those names their own schemas)."""
    trie: dict[str, Any] = {}
    for name in exclude:
        node = trie
        for c in name:
            node = node.setdefault(c, {})
        node[""] = {}  # a name ends here

    def rest(node: dict[str, Any], used: int, named: bool) -> str:
        alts = [] if named or used == 0 else [""]
        if used < max_chars:
            kids = [c for c in node if c]
            other = _KEY_CHAR if not kids else f'[^"\\\\\\x00-\\x1f{"".join(_class_char(c) for c in kids)}]'
            left = max_chars - used - 1
            alts.append(other + (f"{_KEY_CHAR}{{0,{left}}}" if left else ""))
            for c in kids:
                alts.append(_regex_literal(c) + rest(node[c], used + 1, "" in node[c]))
        return alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"

    return f"^{rest(trie, 0, False)}$"


# -- the size of a call ----------------------------------------------------------------------------------
def max_bytes(schema: Any) -> float:
    """The most bytes of compact JSON (", " and ": " separators, escapes limited to JSON_ESCAPES) a value
    of the strict `schema` can take; math.inf if some part of it is unbounded. A token is at least one
    byte, so this bounds the tokens of the value too."""
    return _bytes(schema, 0)


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8"))


def _bytes(s: Any, depth: int) -> float:
    if depth > 400 or s is True:
        return math.inf
    if s is False or not isinstance(s, dict):
        return -math.inf  # nothing: never the largest
    if "const" in s:
        return _json_bytes(s["const"])
    if isinstance(s.get("enum"), list):
        return max((_json_bytes(v) for v in s["enum"]), default=-math.inf)
    bounds = []
    if isinstance(s.get("anyOf"), list):
        bounds.append(max((_bytes(b, depth + 1) for b in s["anyOf"]), default=-math.inf))
    if isinstance(s.get("allOf"), list):
        bounds.append(min((_bytes(b, depth + 1) for b in s["allOf"]), default=math.inf))
    t = s.get("type")
    types = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    if types is not None:
        bounds.append(max((_type_bytes(s, x, depth) for x in types), default=-math.inf))
    return min(bounds) if bounds else math.inf


def _type_bytes(s: dict[str, Any], t: str, depth: int) -> float:
    if t == "null":
        return 4
    if t == "boolean":
        return 5
    if t in ("integer", "number"):
        return _number_bytes(s, t)
    if t == "string":
        n = s.get("maxLength")
        return math.inf if not isinstance(n, int) else 2 + BYTES_PER_CHAR * n
    if t == "array":
        n = s.get("maxItems")
        if not isinstance(n, int):
            return math.inf
        prefix = [_bytes(p, depth + 1) for p in s.get("prefixItems") or []][:n]
        rest = n - len(prefix)
        item = _bytes(s.get("items", True), depth + 1) if rest > 0 else 0
        if item == -math.inf:  # items: false: only the prefix
            item, rest = 0, 0
        parts = [*prefix, *([item] * rest)] if item != math.inf else [math.inf]
        parts = [p for p in parts if p != -math.inf]
        return 2 + sum(parts) + 2 * max(0, len(parts) - 1)
    if t == "object":
        return _object_bytes(s, depth)
    return math.inf


def _number_bytes(s: dict[str, Any], t: str) -> float:
    low = s.get("minimum", s.get("exclusiveMinimum"))
    high = s.get("maximum", s.get("exclusiveMaximum"))
    if not _is_number(low) or not _is_number(high):
        return math.inf
    digits = len(str(int(max(abs(low), abs(high))))) + 1  # and a sign
    if t == "integer":
        return digits
    step = s.get("multipleOf")
    if not _is_number(step) or step <= 0:
        return math.inf
    try:
        places = max(0, -Decimal(repr(step)).normalize().as_tuple().exponent)  # type: ignore[operator]
    except (InvalidOperation, TypeError):
        return math.inf
    return digits + 1 + min(int(places), 32) if places else digits + 2  # "1.0" is a number too


def _object_bytes(s: dict[str, Any], depth: int) -> float:
    props = s.get("properties") or {}
    parts = [_json_bytes(k) + 2 + _bytes(v, depth + 1) for k, v in props.items()]
    parts = [p for p in parts if p != -math.inf]
    patterns = s.get("patternProperties") or {}
    if patterns:
        most = s.get("maxProperties")
        if not isinstance(most, int):
            return math.inf
        entry = max(_pattern_key_bytes(p) + 2 + _bytes(v, depth + 1) for p, v in patterns.items())
        extra = max(0, most - len(props))
        if entry != -math.inf:
            parts += [entry] * extra
    if s.get("additionalProperties", True) is not False:
        return math.inf
    return 2 + sum(parts) + 2 * max(0, len(parts) - 1)


def _pattern_key_bytes(pattern: str) -> float:
    exact = re.fullmatch(r"\^((?:[^\\]|\\.)*)\$", pattern)
    if exact and not set(exact.group(1).replace("\\", "")) & set("[](){}|*+?."):  # ^name$
        return _json_bytes(re.sub(r"\\(.)", r"\1", exact.group(1)))
    return 2 + BYTES_PER_CHAR * MAX_KEY_CHARS  # a key of an open map

"""Strict tool schemas: what the step grammar of a call is built from.

The strict form of a schema written the way app authors write them (open objects, no lengths) closes
and bounds everything, and still accepts every value the author's schema accepts within the caps:
checked on values drawn (hypothesis) from each author's schema, by three judges — llguidance's grammar
of the strict form over the real tokenizer, the `jsonschema` package, and the daemon's own argument
check. The bound on a call's size is checked against the largest value each strict form admits,
tokenized. The step budget built on it, the cut call and the argument check are checked in process;
runs on the real model are in test_agents.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import llguidance as llg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.agent_loop import CallTooLargeError, run_agent
from agents.arguments import argument_problems
from agents.call_budget import call_budget
from agents.strict_schema import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STRING,
    INTEGER_BOUND,
    JSON_ESCAPES,
    NUMBER_BOUND,
    StrictLimits,
    max_bytes,
    strict_schema,
)
from agents.structured_output import JSON_STYLE
from agents.tool_format import JSON_STEPS, StepCutError
from agents.tools import Tool, ToolManifest, ToolManifestError, ToolSpec
from llmos.gguf_file import GGUFFile
from llmos.tokenizer import Tokenizer

S = {"type": "string"}
# Parameters as typical authors write them: types and names, nothing closed or bounded
SEND = {
    "type": "object",
    "properties": {"to": S, "text": S, "urgent": {"type": "boolean"}},
    "required": ["to", "text"],
}
ALARM = {
    "type": "object",
    "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "label": {"type": "string", "description": "what the alarm is for"},
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}},
        "snooze_minutes": {"type": "number"},
    },
    "required": ["hour"],
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "start": {"type": "string", "format": "date-time"},
        "attendees": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": S, "email": {"type": "string", "format": "email"}},
            },
        },
        "place": {
            "type": "object",
            "properties": {"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["title", "start"],
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": S,
        "filters": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 30}},
        "limit": {"type": "integer"},
    },
    "required": ["query"],
}
CART = {
    "type": "object",
    "properties": {
        "item": {"$ref": "#/$defs/Item"},
        "extras": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
    },
    "required": ["item"],
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {"name": S, "qty": {"type": "integer", "minimum": 1}},
            "required": ["name"],
        }
    },
}
TARGET = {
    "type": "object",
    "properties": {
        "target": {"anyOf": [S, {"type": "integer", "minimum": 0, "maximum": 999}]},
        "price": {"type": "number", "minimum": 0, "maximum": 10000},
        "note": {"type": ["string", "null"]},
    },
    "required": ["target"],
}
AUTHORS = {"send": SEND, "alarm": ALARM, "event": EVENT, "search": SEARCH, "cart": CART, "target": TARGET}
# a composition: names declared only in branches
EITHER = {
    "type": "object",
    "properties": {"a": S},
    "anyOf": [
        {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        {"properties": {"c": S}, "required": ["c"]},
    ],
}
TREE = {
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/node"}},
    "required": ["root"],
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"name": S, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["name"],
        }
    },
}


@pytest.fixture(scope="module")
def lltok(default_gguf: Path) -> llg.LLTokenizer:
    tok = Tokenizer.from_gguf(GGUFFile(default_gguf))
    return llg.LLTokenizer(tok.hf_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_ids))


def float_steps_exact(strict: dict[str, Any]) -> dict[str, Any]:
    """`strict` for jsonschema, which checks a float `multipleOf` by float division (0.3 / 1e-6 is not
    a whole number there); the daemon's check and the grammar count decimal places exactly."""
    return json.loads(json.dumps(strict).replace(', "multipleOf": 1e-06', ""))


def step_grammar(schema: dict[str, Any]) -> str:
    return llg.LLMatcher.grammar_from_json_schema(
        schema, defaults={**JSON_STYLE, "json_allowed_escapes": JSON_ESCAPES}
    )


def compact(value: Any) -> str:
    """JSON as a step writes it: ", " and ": ", numbers in plain decimals (Python would write 1e-06)."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return (
        "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {compact(v)}" for k, v in value.items()) + "}"
    )


def _names(s: Any) -> list[str]:
    if not isinstance(s, dict):
        return []
    names = list(s.get("properties") or {})
    for branch in [*(s.get("anyOf") or []), *(s.get("allOf") or [])]:
        names += [n for n in _names(branch) if n not in names]
    return names


def _sub(s: Any, key: str | None) -> Any:
    """The schema of a member (`key`) or of the items (None) of `s`, looking into its branches."""
    if not isinstance(s, dict):
        return None
    here = (s.get("properties") or {}).get(key) if key is not None else s.get("items")
    if here is not None:
        return here
    for branch in [*(s.get("anyOf") or []), *(s.get("allOf") or [])]:
        if (found := _sub(branch, key)) is not None:
            return found
    return None


def ordered(value: Any, s: Any) -> Any:
    """`value` with its keys in the order the strict schema's grammar writes them (llguidance fixes it to
    the order of `properties`; the JSON object is the same)."""
    if isinstance(value, list):
        return [ordered(v, _sub(s, None)) for v in value]
    if not isinstance(value, dict):
        return value
    names = _names(s)
    keys = sorted(value, key=lambda k: names.index(k) if k in names else len(names))
    return {k: ordered(value[k], _sub(s, k)) for k in keys}


def grammar_accepts(lltok: llg.LLTokenizer, grammar: str, text: str) -> bool:
    m = llg.LLMatcher(lltok, grammar)
    assert not m.is_error(), m.get_error()
    ids = lltok.tokenize_str(text)
    if m.validate_tokens(ids) < len(ids):
        return False
    m.consume_tokens(ids)
    return m.is_accepting()


# -- values an author's schema accepts, within the caps ------------------------------------------------
FORMAT_EXAMPLES = {
    "date-time": ["2026-11-21T15:56:16Z", "2026-01-02T08:00:00+01:00", "1999-12-31T23:59:59.5Z"],
    "email": ["anna@example.org", "b.c@d.io"],
}


def values(s: Any, root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid against the author's schema `s` and within the default caps."""
    if "$ref" in s:
        return st.deferred(lambda: values(root["$defs"][s["$ref"].rsplit("/", 1)[1]], root))
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if "anyOf" in s:
        return st.one_of(*(values(b, root) for b in s["anyOf"]))
    t = s.get("type")
    if isinstance(t, list):
        return st.one_of(*(values({**s, "type": x}, root) for x in t))
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        return st.integers(s.get("minimum", -INTEGER_BOUND), s.get("maximum", INTEGER_BOUND))
    if t == "number":
        low, high = s.get("minimum", -NUMBER_BOUND), s.get("maximum", NUMBER_BOUND)
        return (
            st.integers(0, 6)
            .flatmap(
                lambda places: st.decimals(low, high, places=places, allow_nan=False, allow_infinity=False)
            )
            .map(float)
        )
    if t == "string":
        if "format" in s:
            return st.sampled_from(FORMAT_EXAMPLES[s["format"]])
        if "pattern" in s:
            return st.from_regex(s["pattern"], fullmatch=True)
        low = s.get("minLength", 0)
        return st.text(
            alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")) | st.sampled_from("\n\t"),
            min_size=low,
            max_size=min(s.get("maxLength", DEFAULT_MAX_STRING), 40),
        )
    if t == "array":
        return st.lists(
            values(s.get("items", {}), root), max_size=min(s.get("maxItems", DEFAULT_MAX_ITEMS), 4)
        )
    if t == "object":
        props = s.get("properties", {})
        required = [n for n in s.get("required", []) if n in props]
        optional = {n: values(v, root) for n, v in props.items() if n not in required}
        fixed = st.fixed_dictionaries({n: values(props[n], root) for n in required}, optional=optional)
        extra = s.get("additionalProperties")
        if isinstance(extra, dict):  # an open map: keys of its own, up to 64 characters
            keys = st.text(alphabet=string.ascii_letters + "_é", min_size=1, max_size=64).filter(
                lambda k: k not in props
            )
            more = st.dictionaries(keys, values(extra, root), max_size=4)
            return st.tuples(fixed, more).map(lambda p: {**p[1], **p[0]})
        return fixed
    raise AssertionError(f"no strategy for {s}")


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_the_strict_form_accepts_every_value_the_authors_schema_does_within_the_caps(
    name: str, lltok: llg.LLTokenizer
) -> None:
    author = AUTHORS[name]
    strict = strict_schema(author)
    grammar = step_grammar(strict)
    validator = jsonschema.Draft202012Validator(
        float_steps_exact(strict), format_checker=jsonschema.FormatChecker()
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(values(author, author))
    def check(value: Any) -> None:
        jsonschema.validate(value, author)  # the strategy draws only the author's values
        assert validator.is_valid(value), list(validator.iter_errors(value))[:1]
        assert argument_problems(strict, value) == []
        text = compact(ordered(value, strict))
        assert grammar_accepts(lltok, grammar, text), text

    check()


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_the_strict_form_admits_only_what_the_author_does_and_no_undeclared_key(
    name: str, lltok: llg.LLTokenizer
) -> None:
    author = AUTHORS[name]
    strict = strict_schema(author)
    grammar = step_grammar(strict)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(values(author, author), st.sampled_from(["type", "query_string", "extra", "minimum"]))
    def check(value: Any, key: str) -> None:
        invented = {**value, key: "string"}
        if key in author["properties"]:
            return
        jsonschema.validate(invented, author)  # the open schema lets the invented key through
        assert not jsonschema.Draft202012Validator(strict).is_valid(invented)
        assert argument_problems(strict, invented) == [f"{key!r} is not a parameter"]
        assert not grammar_accepts(lltok, grammar, compact(invented))

    check()


def test_open_objects_are_closed_and_every_value_bounded() -> None:
    strict = strict_schema(EVENT)
    assert strict["additionalProperties"] is False
    props = strict["properties"]
    assert props["title"] == {"type": "string", "minLength": 1, "maxLength": DEFAULT_MAX_STRING}
    assert props["start"]["format"] == "date-time" and props["start"]["maxLength"] == DEFAULT_MAX_STRING
    people = props["attendees"]
    assert people["maxItems"] == DEFAULT_MAX_ITEMS and people["items"]["additionalProperties"] is False
    assert (
        props["place"]["required"] == ["city"]
        and props["place"]["properties"]["zip"]["pattern"] == "^[0-9]{5}$"
    )
    assert max_bytes(strict) < math.inf
    ints = strict_schema(SEARCH)["properties"]["limit"]
    assert (ints["minimum"], ints["maximum"]) == (-INTEGER_BOUND, INTEGER_BOUND)
    assert strict_schema(ALARM)["properties"]["snooze_minutes"]["multipleOf"] == 1e-6
    assert strict_schema(ALARM)["properties"]["hour"] == {"type": "integer", "minimum": 0, "maximum": 23}
    # the author's own caps are theirs, even above the defaults; the limits raise the defaults
    assert (
        strict_schema({**SEND, "properties": {"to": {"type": "string", "maxLength": 500}}})["properties"][
            "to"
        ]["maxLength"]
        == 500
    )
    wide = strict_schema(SEND, StrictLimits(max_string=1000, max_items=40))
    assert wide["properties"]["text"]["maxLength"] == 1000


def test_an_open_map_keeps_its_keys_bounded_in_number_and_length(lltok: llg.LLTokenizer) -> None:
    strict = strict_schema(SEARCH)
    filters = strict["properties"]["filters"]
    assert filters["additionalProperties"] is False and filters["maxProperties"] == DEFAULT_MAX_ITEMS
    grammar = step_grammar(strict)
    ok = {"query": "shoes", "filters": {"colour": "red", "size": "42"}}
    assert grammar_accepts(lltok, grammar, compact(ok)) and argument_problems(strict, ok) == []
    many = {"query": "x", "filters": {f"k{i}": "v" for i in range(DEFAULT_MAX_ITEMS + 1)}}
    assert not grammar_accepts(lltok, grammar, compact(many)) and argument_problems(strict, many)
    long_key = {"query": "x", "filters": {"k" * 65: "v"}}
    assert not grammar_accepts(lltok, grammar, compact(long_key))
    # optional named properties of an open map keep their own schemas; the map's keys are all others
    mixed = strict_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": True}
    )
    g = step_grammar(mixed)
    assert grammar_accepts(lltok, g, '{"n": 3, "x": "free"}')
    assert not grammar_accepts(lltok, g, '{"n": "three"}')
    assert argument_problems(mixed, {"n": "three"}) == ["'n' must be integer"]


def test_names_declared_only_in_branches_stay_callable_and_bounded(lltok: llg.LLTokenizer) -> None:
    strict = strict_schema(EITHER)
    assert set(strict["properties"]) == {"a", "b", "c"} and strict["additionalProperties"] is False
    grammar = step_grammar(strict)
    for good in ({"a": "x", "b": 1}, {"c": "y"}, {"a": "x", "c": "y"}):
        jsonschema.validate(good, EITHER)
        assert grammar_accepts(lltok, grammar, compact(good)) and argument_problems(strict, good) == []
    for bad in ({"a": "x"}, {"b": 1, "d": 2}, {"c": "y" * (DEFAULT_MAX_STRING + 1)}):
        assert not grammar_accepts(lltok, grammar, compact(bad)) and argument_problems(strict, bad)
    assert max_bytes(strict) < math.inf


def test_a_recursive_ref_is_offered_a_few_levels_deep(lltok: llg.LLTokenizer) -> None:
    strict = strict_schema(TREE)
    assert "$defs" not in strict and "$ref" not in json.dumps(strict)
    grammar = step_grammar(strict)
    deep = {"root": {"name": "a", "kids": [{"name": "b", "kids": [{"name": "c"}]}]}}
    too_deep = {
        "root": {"name": "a", "kids": [{"name": "b", "kids": [{"name": "c", "kids": [{"name": "d"}]}]}]}
    }
    jsonschema.validate(too_deep, TREE)
    assert grammar_accepts(lltok, grammar, compact(deep)) and argument_problems(strict, deep) == []
    assert not grammar_accepts(lltok, grammar, compact(too_deep)) and argument_problems(strict, too_deep)
    assert max_bytes(strict) < math.inf


# -- the size of a call --------------------------------------------------------------------------------
def largest(s: Any) -> Any:
    """The value of the strict schema `s` that takes the most bytes (for the schemas below)."""
    if "enum" in s:
        return max(s["enum"], key=lambda v: len(compact(v).encode()))
    if "anyOf" in s:
        return max((largest(b) for b in s["anyOf"]), key=lambda v: len(compact(v).encode()))
    t = s["type"] if isinstance(s["type"], str) else s["type"][0]
    if t == "string":
        return "😀" * s["maxLength"]  # 4 bytes, and (for this tokenizer) 4 tokens, a character
    if t == "integer":
        return s["minimum"]
    if t == "number":
        return float(f"{s['minimum'] + 1e-6:.6f}")
    if t == "boolean":
        return False
    if t == "array":
        return [largest(s["items"])] * s["maxItems"]
    return {k: largest(v) for k, v in s["properties"].items()}


@pytest.mark.parametrize("name", ["send", "alarm", "cart"])
def test_the_bound_on_a_call_holds_for_the_largest_one(name: str, lltok: llg.LLTokenizer) -> None:
    strict = strict_schema(AUTHORS[name], StrictLimits(max_string=20, max_items=3))
    text = compact(largest(strict))
    assert grammar_accepts(lltok, step_grammar(strict), text), text[:200]
    bound = max_bytes(strict)
    assert len(text.encode()) <= bound
    assert len(lltok.tokenize_str(text)) <= bound
    assert len(text.encode()) > bound * 0.8  # and not far above it: the caps are not wasted


def test_every_token_is_at_least_one_byte(lltok: llg.LLTokenizer) -> None:
    """What makes bytes a bound on tokens: no token the grammar can pick writes nothing."""
    empty = [i for i in range(lltok.vocab_size) if not lltok.decode_bytes([i])]
    assert all(lltok.is_special_token(i) for i in empty), empty[:5]


# -- manifests ---------------------------------------------------------------------------------------------
def spec(parameters: dict[str, Any], **more: Any) -> ToolSpec:
    tool = {"name": "t", "description": "A tool.", "parameters": parameters, **more}
    return ToolManifest.parse(json.dumps({"tools": [tool]})).tools[0]


def test_a_tool_keeps_its_authors_schema_beside_the_strict_form() -> None:
    t = spec(SEND, limits={"max_string": 1000})
    assert t.parameters == SEND  # what the model reads and ListTools shows
    assert t.strict_parameters["properties"]["text"]["maxLength"] == 1000
    assert t.strict_parameters["additionalProperties"] is False


@pytest.mark.parametrize(
    ("limits", "why"),
    [
        ({"max_string": 0}, "max_string"),
        ({"max_items": 100_000}, "max_items"),
        ({"max_bytes": 3}, "max_bytes"),
    ],
)
def test_bad_limits_are_a_named_manifest_error(limits: dict[str, Any], why: str) -> None:
    with pytest.raises(ToolManifestError, match=why):
        spec(SEND, limits=limits)


# -- the argument check --------------------------------------------------------------------------------
def test_nested_arguments_are_checked_and_named_by_where_they_are() -> None:
    strict = strict_schema(EVENT)
    bad = {
        "title": "",
        "start": "tomorrow",
        "attendees": [{"name": "Anna", "age": 3}],
        "place": {"zip": "1234"},
        "x": 1,
    }
    assert argument_problems(strict, bad) == [
        "'title' is under 1 characters",
        "'start' is not a date-time",
        "'attendees[0].age' is not allowed",
        "'place.city' is missing",
        "'place.zip' does not match '^[0-9]{5}$'",
        "'x' is not a parameter",
    ]
    assert argument_problems(strict, []) == ["the arguments are not a JSON object"]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["send", "cart", "search", "event"]),
    st.recursive(
        st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["to", "text", "item", "name", "qty", "query", "title", "x"]), inner
            )
        ),
        max_leaves=8,
    ),
)
def test_the_argument_check_agrees_with_jsonschema(name: str, value: Any) -> None:
    strict = strict_schema(AUTHORS[name])
    strict = json.loads(
        json.dumps(strict).replace('"format": "date-time", ', "").replace('"format": "email", ', "")
    )
    valid = jsonschema.Draft202012Validator(strict).is_valid(value)
    assert (argument_problems(strict, value) == []) == (valid and isinstance(value, dict))


# -- the step budget -----------------------------------------------------------------------------------
def tool(parameters: dict[str, Any], name: str = "t", **more: Any) -> Tool:
    return Tool(spec(parameters, **more).model_copy(update={"name": name}), ":1.1", "app", "/t")


def test_a_step_gets_the_tokens_its_largest_call_needs() -> None:
    send = tool(SEND, "send")
    budget = call_budget([send], JSON_STEPS.call_overhead, 4096)
    fitted = budget.calls["send"]
    assert fitted.scale == 1.0 and fitted.parameters == send.spec.strict_parameters
    # two strings of 200 characters at 4 bytes, a boolean, the keys and the step's own markup
    assert budget.tokens == JSON_STEPS.call_overhead(send) + 1 + max_bytes(send.spec.strict_parameters)
    assert 1600 < budget.tokens < 1800


def test_a_call_too_large_for_the_ceiling_is_cut_to_fit_and_a_value_at_a_lowered_cap_is_caught() -> None:
    send = tool(SEND, "send")
    budget = call_budget([send], JSON_STEPS.call_overhead, 400)
    fitted = budget.calls["send"]
    assert fitted.scale < 1 and budget.tokens <= 400
    cap = fitted.parameters["properties"]["text"]["maxLength"]
    assert 30 < cap < DEFAULT_MAX_STRING
    assert not fitted.reached_lowered_cap({"to": "Bob", "text": "x" * (cap - 1)})
    assert fitted.reached_lowered_cap({"to": "Bob", "text": "x" * cap})
    # a tool whose smallest call cannot fit is left out; a run that must call one is told why
    enum = {"type": "object", "properties": {"k": {"enum": ["x" * 500]}}, "required": ["k"]}
    huge = tool(enum, "huge")
    assert "huge" in call_budget([huge], JSON_STEPS.call_overhead, 100).left_out

    async def steps() -> None:
        async for _ in run_agent("go", [huge], _never, _never, tool_choice="required", max_step_tokens=100):
            pass

    with pytest.raises(CallTooLargeError, match="huge"):
        asyncio.run(steps())


async def _never(*_: Any, **__: Any) -> Any:
    raise AssertionError("not reached")


class Cut(str):
    finish_reason = "length"


def test_a_call_cut_short_is_a_named_step_and_never_made() -> None:
    send = tool(SEND, "send")
    seen: dict[str, Any] = {}
    calls: list[Any] = []

    async def generate(messages: Any, schema: Any, **kw: Any) -> str:
        seen.update(kw)
        return Cut('{"tool": "send", "arguments": {"to": "Bob", "text": "I am la')

    async def call_tool(t: Tool, arguments: Any) -> Any:
        calls.append(arguments)

    got: list[Any] = []

    async def steps() -> None:
        async for s in run_agent(
            "tell Bob",
            [send],
            generate,
            call_tool,
            tool_choice="required",
            max_step_tokens=64,
            max_call_tokens=4096,
        ):
            got.append(s)

    with pytest.raises(StepCutError, match="call of send"):
        asyncio.run(steps())
    assert seen["grammar_tokens"] > 1600  # the step was given what its largest call needs
    assert calls == []
    (step,) = got
    assert json.loads(step.to_json()) == {
        "step": 1,
        "tool": "send",
        "arguments_text": '{"to": "Bob", "text": "I am la',  # the call by name, as far as it got
        "partial": '{"tool": "send", "arguments": {"to": "Bob", "text": "I am la',
        "cut": True,
    }


def test_refs_that_would_expand_without_end_are_a_named_manifest_error() -> None:
    """Each definition refers to the one before twice: 40 lines that would expand to 2^40 schemas. The
    expansion stops at a bound and the manifest is refused by name, at once, not after the memory is gone."""
    defs: dict[str, Any] = {"a0": {"type": "string"}}
    for i in range(1, 40):
        ref = {"$ref": f"#/$defs/a{i - 1}"}
        defs[f"a{i}"] = {"type": "object", "properties": {"x": ref, "y": ref}}
    bomb = {"type": "object", "properties": {"v": {"$ref": "#/$defs/a39"}}, "$defs": defs}
    with pytest.raises(ToolManifestError, match="once their \\$refs are expanded"):
        spec(bomb)

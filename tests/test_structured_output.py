"""Structured output: a `json_schema` makes the answer JSON that parses and validates, always.

The grammar is llguidance's, built from the model's own tokenizer; the check is independent of it
(the `jsonschema` package validates every answer). The 200 generations go through the real service,
from an app process, on the real default model, sampled (temperature 0.7) with varied seeds.

Every string, number and array in these schemas is bounded (an unbounded integer is a way for a small
sampled model to print digits until max_tokens), and `max_tokens` (1024) covers the longest answer
each schema allows even at 4 tokens a character (emoji as byte tokens: the sampled model does wander
there), so every answer must complete: a constrained answer cut by `max_tokens` ends with
finish_reason "length" and is not complete JSON, which is what the caller is told.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from dbus_harness import Daemon, PrivateBus, client

from agents.structured_output import InvalidSchemaError, StructuredOutput
from llmos.model_store import ModelStore
from llmos.tokenizer import Tokenizer

NAME = {"type": "string", "minLength": 1, "maxLength": 40}
SCHEMAS: list[tuple[str, dict]] = [
    (
        "Describe a city.",
        {
            "type": "object",
            "properties": {
                "city": NAME,
                "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
            },
            "required": ["city", "population"],
            "additionalProperties": False,
        },
    ),
    (
        "Is water wet? Answer with a flag.",
        {
            "type": "object",
            "properties": {"answer": {"type": "boolean"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    ),
    (
        "Pick a colour.",
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            "required": ["colour"],
            "additionalProperties": False,
        },
    ),
    ("List three fruits.", {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3}),
    (
        "Rate this film from 1 to 5.",
        {
            "type": "object",
            "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "reason": NAME},
            "required": ["stars", "reason"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a temperature reading.",
        {
            "type": "object",
            "properties": {
                "celsius": {"type": "integer", "minimum": -90, "maximum": 60},
                "unit": {"const": "C"},
            },
            "required": ["celsius", "unit"],
            "additionalProperties": False,
        },
    ),
    (
        "Describe a person.",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {
                    "type": "object",
                    "properties": {"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "age", "address"],
            "additionalProperties": False,
        },
    ),
    (
        "Make a to-do list.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {"task": NAME, "done": {"type": "boolean"}},
                        "required": ["task", "done"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    ),
    (
        "Call a tool to get the weather in Oslo.",
        {
            "type": "object",
            "properties": {
                "tool": {"enum": ["get_weather", "send_email"]},
                "arguments": {
                    "type": "object",
                    "properties": {"city": NAME, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["tool", "arguments"],
            "additionalProperties": False,
        },
    ),
    ("Either a number or a word.", {"anyOf": [{"type": "integer", "minimum": -999, "maximum": 999}, NAME]}),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Path:
    return ModelStore(tmp_path_factory.mktemp("store")).import_gguf(default_gguf, make_default=True)


@pytest.fixture(scope="module")
def structured(model_dir: Path) -> StructuredOutput:
    return StructuredOutput(Tokenizer.load(model_dir))


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "nonsense"}', "cannot be used"),
        ('{"type": "string", "pattern": "(unclosed"}', "cannot be used"),
    ],
)
def test_a_bad_schema_is_a_named_error(structured: StructuredOutput, schema: str, why: str) -> None:
    with pytest.raises(InvalidSchemaError, match=why):
        structured.constraint(schema)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[PrivateBus]:
    tmp = tmp_path_factory.mktemp("bus")
    bus = PrivateBus(tmp)
    config = tmp / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n')
    daemon = Daemon(bus.address, model_dir.parent, "--config", str(config), "--threads", "2")
    yield bus
    assert daemon.stop() == 0
    bus.stop()


@pytest.mark.model
def test_200_constrained_generations_all_parse_and_validate(service: PrivateBus, tmp_path: Path) -> None:
    cases = [
        {"prompt": prompt, "schema": schema, "seed": 1000 + 20 * i + k}
        for i, (prompt, schema) in enumerate(SCHEMAS)
        for k in range(20)
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    answers = client(service.address, "structured", str(tmp_path / "cases.json"), "8", timeout=900)["answers"]
    assert len(answers) == 200
    distinct = set()
    for case, answer in zip(cases, answers, strict=True):
        assert "error" not in answer, answer
        assert answer["finish_reason"] == "stop", (case["prompt"], answer)
        value = json.loads(answer["text"])
        jsonschema.validate(value, case["schema"])
        distinct.add(answer["text"])
    assert len(distinct) > 100  # sampled, not one canned answer per schema


@pytest.mark.model
def test_invalid_schemas_over_dbus_are_invalid_argument(service: PrivateBus) -> None:
    for schema in ("{not json", '{"type": "nonsense"}'):
        out = client(service.address, "generate", "hi", json.dumps({"json_schema": schema}))
        assert out["error"] == "org.llmos.Error.InvalidArgument", out
        assert "json_schema" in out["message"]
    ok = client(service.address, "generate", "hi", json.dumps({"json_schema": '{"type": "boolean"}'}))
    assert ok["text"] in ("true", "false")

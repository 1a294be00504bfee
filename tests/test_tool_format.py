"""Tool calls in the model's own format where its chat template has one (Hermes / Qwen2.5 style), else
llmos's JSON steps: which format a model gets, that its grammar admits exactly valid calls, and a run
through the real service on a model whose template speaks <tool_call>."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from dbus_harness import REPO, Daemon, PrivateBus, client

from agents.structured_output import StructuredOutput
from agents.tool_format import HERMES, JSON_STEPS, InvalidStepError, tool_format_for
from agents.tools import Tool, ToolManifest
from llmos.chat_template import ChatTemplate
from llmos.gguf_file import GGUFFile
from llmos.model_store import ModelStore
from llmos.tiny_model import CHATML_TEMPLATE, write_random_gguf
from llmos.tokenizer import Tokenizer

HERMES_TEMPLATE = (REPO / "tests" / "fixtures" / "hermes_chat_template.jinja").read_text()
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "Current weather for a city.", "parameters": CITY}
TOOLS = [Tool(ToolManifest.parse(json.dumps({"tools": [WEATHER]})).tools[0], ":1.1", "app", "/t")]


def test_a_template_that_speaks_tool_call_gets_its_own_format(default_gguf: Path) -> None:
    assert tool_format_for(ChatTemplate(HERMES_TEMPLATE, "", "")) is HERMES
    assert tool_format_for(ChatTemplate(CHATML_TEMPLATE, "", "")) is JSON_STEPS
    smollm2 = ChatTemplate.from_gguf(GGUFFile(default_gguf))
    assert tool_format_for(smollm2) is JSON_STEPS  # SmolLM2's template has no tool-call format
    assert tool_format_for(None) is JSON_STEPS


def test_the_template_itself_describes_the_tools() -> None:
    template = ChatTemplate(HERMES_TEMPLATE, "", "")
    messages = [
        {"role": "system", "content": HERMES.system_prompt(TOOLS, "Be brief.")},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        },
        HERMES.observation("get_weather", {"sky": "sunny"}),
    ]
    text = template.render(messages, tools=HERMES.template_tools(TOOLS))
    listed = text.split("<tools>\n", 1)[1].split("</tools>", 1)[0]  # the template's own tools block
    assert json.loads(listed)["function"]["name"] == "get_weather"
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in text  # the result, delimited


@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory) -> StructuredOutput:
    gguf = write_random_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", chat_template=HERMES_TEMPLATE)
    return StructuredOutput(Tokenizer.from_gguf(GGUFFile(gguf)))


def accepts(structured: StructuredOutput, grammar: str, text: str) -> bool:
    """Whether sampling under the constraint could produce `text` and stop there (mask, then advance,
    token by token, as the engine does)."""
    constraint = structured.grammar_constraint(grammar)
    for token in structured.tokenizer.tokenize_str(text):
        logits = np.zeros(structured.vocab, dtype=np.float32)
        constraint.mask(logits)
        if logits[token] == -np.inf:
            return False
        constraint.advance(token)
    logits = np.zeros(structured.vocab, dtype=np.float32)
    constraint.mask(logits)  # waits for the last mask: the matcher is idle again
    return constraint.complete


def test_the_grammar_admits_valid_calls_and_answers_only(structured: StructuredOutput) -> None:
    either = HERMES.constraint(TOOLS, allow_answer=True, allow_tools=True, answer_chars=200).grammar
    call_only = HERMES.constraint(TOOLS, allow_answer=False, allow_tools=True, answer_chars=200).grammar
    assert either is not None and call_only is not None
    good_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert accepts(structured, either, good_call) and accepts(structured, call_only, good_call)
    assert accepts(structured, either, "It is sunny in Oslo.")
    assert not accepts(structured, call_only, "It is sunny in Oslo.")  # tool_choice required
    for bad in (
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # no such tool
        '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>',  # bad args
        '<tool_call>{"name": "get_weather"}',  # malformed, and it cannot pass as an answer either
    ):
        assert not accepts(structured, either, bad), bad


def test_steps_in_the_models_format_are_read_back() -> None:
    by_name = {t.spec.name: t for t in TOOLS}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert HERMES.parse(call, by_name) == {"tool": "get_weather", "arguments": {"city": "Oslo"}}
    assert HERMES.parse(" Sunny. ", by_name) == {"answer": "Sunny."}
    with pytest.raises(InvalidStepError, match="no known tool"):
        HERMES.parse('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', by_name)


def test_a_run_on_a_model_with_its_own_format_calls_tools_in_it(tmp_path: Path) -> None:
    gguf = write_random_gguf(
        tmp_path / "hermes.gguf",
        weight_type="Q4_1",
        context_length=1024,
        seed=3,
        chat_template=HERMES_TEMPLATE,
    )
    store = tmp_path / "store"
    ModelStore(store).import_gguf(gguf, name="hermes-tiny", make_default=True)
    bus = PrivateBus(tmp_path)
    config = tmp_path / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[apps.default]\nsystem_tools = []\n')
    daemon = Daemon(bus.address, store, "--config", str(config), "--threads", "2")
    try:
        setup = tmp_path / "setup.json"
        options = {
            "tool_choice": "required",
            "max_steps": 2,
            "temperature": 0.8,
            "seed": 1,
            "max_tokens": 120,
        }
        setup.write_text(
            json.dumps({"manifest": {"tools": [WEATHER]}, "goal": "Weather in Oslo?", "options": options})
        )
        out = client(bus.address, "agent-run", str(setup), timeout=120)
        assert out["code"] == 0, out
        first = out["steps"][0]
        assert first["tool"] == "get_weather"  # random weights, yet a valid call in the model's format
        jsonschema.validate(first["arguments"], CITY)
        assert out["calls"] == [{"tool": "get_weather", "arguments": first["arguments"]}]
        assert out["steps"][-1]["answer"] == out["result"]["answer"]
    finally:
        daemon.stop_cleanly()
        bus.stop()


def test_a_step_cut_by_the_token_limit_keeps_an_answer_and_refuses_a_half_call() -> None:
    assert JSON_STEPS.cut_answer('{"answer": "It is sunny in Os') == "It is sunny in Os"
    assert JSON_STEPS.cut_answer('{"answer": "A tab \\') == "A tab "  # a half-written escape dropped
    assert JSON_STEPS.cut_answer('{"tool": "get_weather", "argum') is None
    assert HERMES.cut_answer("It is sunny in Os") == "It is sunny in Os"
    assert HERMES.cut_answer('<tool_call>\n{"name": "get_wea') is None


def test_a_call_cut_by_a_lowered_cap_reaches_the_app_as_a_named_step_not_a_call(tmp_path: Path) -> None:
    """With [limits] max_tokens at 112, a call of a tool with two open strings cannot have 200 characters
    each: its caps are lowered to fit, here down to the strings' minLength, so every call reaches one and
    may have been cut short by it. None is made: the app gets a Step naming the tool with the text so far,
    `cut`, and a failed Result saying so."""
    gguf = write_random_gguf(
        tmp_path / "hermes.gguf",
        weight_type="Q4_1",
        context_length=1024,
        seed=3,
        chat_template=HERMES_TEMPLATE,
    )
    store = tmp_path / "store"
    ModelStore(store).import_gguf(gguf, name="hermes-tiny", make_default=True)
    bus = PrivateBus(tmp_path)
    config = tmp_path / "llmosd.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[limits]\nmax_tokens = 112\n[apps.default]\nsystem_tools = []\n'
    )
    daemon = Daemon(bus.address, store, "--config", str(config), "--threads", "2")
    three = {"type": "string", "minLength": 3}
    send = {
        "name": "send_message",
        "description": "Send a text message.",
        "parameters": {
            "type": "object",
            "properties": {"to": three, "text": three},
            "required": ["to", "text"],
        },
    }
    try:
        options = {"tool_choice": "required", "max_steps": 2, "temperature": 1.0, "max_tokens": 64}
        runs = [{"goal": "Text Anna hello.", "options": {**options, "seed": seed}} for seed in range(6)]
        setup = tmp_path / "setup.json"
        setup.write_text(json.dumps({"manifest": {"tools": [send]}, "runs": runs}))
        out = client(bus.address, "agent-runs", str(setup), timeout=300)
    finally:
        daemon.stop_cleanly()
        bus.stop()
    assert out["calls"] == []
    for r in out["runs"]:
        assert r["code"] == 2, r
        (step,) = r["steps"]
        assert step["cut"] is True and step["tool"] == "send_message"
        assert step["partial"].startswith("<tool_call>")
        assert "observation" not in step
        assert r["result"]["cut"] is True and "call of send_message" in r["result"]["error_message"]

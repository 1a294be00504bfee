"""Qwen3's and Gemma 3's own chat templates, as their GGUFs carry them, render every turn llmos sends.

The template texts (llmos/model_templates.py) are written into the tiny GGUFs; rendering goes through
`ChatTemplate` exactly as for a real model. Plain conversations are also checked against llama.cpp's
built-in renderings of the same formats (llama_chat_apply_template recognises them by their markers), an
independent writing of the same prompt text.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import pytest

from agents.tool_format import HERMES, JSON_STEPS, tool_format_for
from agents.tools import Tool, ToolSpec
from llmos.chat_template import ChatTemplate
from llmos.errors import ChatTemplateError
from llmos.gguf_file import GGUFFile
from llmos.model_templates import GEMMA3_TEMPLATE, QWEN3_TEMPLATE
from llmos.tiny_model import CHATML_TEMPLATE, write_random_gguf
from llmos.tokenizer import Tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> GGUFFile:
    return GGUFFile(write_random_gguf(tmp_path_factory.mktemp("q") / "q.gguf", arch="qwen3", head_dim=32))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> GGUFFile:
    return GGUFFile(write_random_gguf(tmp_path_factory.mktemp("g") / "g.gguf", arch="gemma3", head_dim=32))


def _weather_tool() -> Tool:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    spec = ToolSpec(name="weather", description="The weather.", parameters=params)
    return Tool(spec=spec, owner=":1.1", app_id="org.example.Weather", path="/org/example/Weather")


# -- Qwen3 ---------------------------------------------------------------------------------------------------


def test_qwen3_gguf_carries_its_template(qwen3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(qwen3)
    assert t.source == QWEN3_TEMPLATE and t.supports_tools and t.has_tool_role


def test_qwen3_plain_chat(qwen3: GGUFFile) -> None:
    assert ChatTemplate.from_gguf(qwen3).render(CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_thinking_switch_and_earlier_thoughts(qwen3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(qwen3)
    assert t.render(CHAT[:2], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert t.render(CHAT[:2], enable_thinking=True).endswith("<|im_start|>assistant\n")
    # an earlier answer's reasoning is dropped from the history; only its answer stays
    thought = [*CHAT[:2], {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"}, CHAT[3]]
    assert t.render(thought) == t.render(CHAT)


def test_qwen3_tools_calls_and_results(qwen3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(qwen3)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "tool", "content": '{"temp": 17}'},
    ]
    out = t.render(messages, tools=[WEATHER])
    assert out == (
        "<|im_start|>system\nUse tools.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo and Rome?<|im_end|>\n"
        f"<|im_start|>assistant\n{call}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response>\n'
        '<tool_response>\n{"temp": 17}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    # OpenAI-style tool_calls on the assistant message render as the same <tool_call> block
    structured = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
    }
    assert t.render([*messages[:2], structured, *messages[3:]], tools=[WEATHER]) == out


def test_qwen3_agents_use_its_own_tool_calls(qwen3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(qwen3)
    assert tool_format_for(t) is HERMES
    tool = _weather_tool()
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert HERMES.parse(text, {"weather": tool}) == {"tool": "weather", "arguments": {"city": "Oslo"}}
    messages = [
        {"role": "system", "content": HERMES.system_prompt([tool], "You can use tools.")},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": text},
        HERMES.observation("weather", {"temp": 3}),
    ]
    out = t.render(messages, tools=HERMES.template_tools([tool]), enable_thinking=False)
    assert '<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n' in out
    assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# -- Gemma 3 -------------------------------------------------------------------------------------------------


def test_gemma3_plain_chat(gemma3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(gemma3)
    assert t.source == GEMMA3_TEMPLATE and t.bos_token == "<bos>"
    assert t.render(CHAT) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert (
        t.render(CHAT[1:2], add_generation_prompt=False)
        == "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
    )


def test_gemma3_refuses_what_it_cannot_show(gemma3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(gemma3)
    with pytest.raises(ChatTemplateError, match="alternate"):
        t.render([CHAT[1], CHAT[1]])
    with pytest.raises(ChatTemplateError, match="alternate"):  # no tool role
        t.render([*CHAT[1:3], {"role": "tool", "content": "{}"}])
    assert not t.supports_tools and not t.has_tool_role


def test_gemma3_agents_use_json_steps_which_alternate(gemma3: GGUFFile) -> None:
    t = ChatTemplate.from_gguf(gemma3)
    assert tool_format_for(t) is JSON_STEPS
    tool = _weather_tool()
    messages = [
        {"role": "system", "content": JSON_STEPS.system_prompt([tool], "You can use tools.")},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": '{"tool": "weather", "arguments": {"city": "Oslo"}}'},
        JSON_STEPS.observation("weather", {"temp": 3}),
    ]
    out = t.render(messages)
    assert out.count("<start_of_turn>user") == 2 and out.endswith("<start_of_turn>model\n")


def test_gemma3_prompt_has_one_bos_and_stops_at_end_of_turn(gemma3: GGUFFile) -> None:
    tok = Tokenizer.from_gguf(gemma3)
    tokens = gemma3.get("tokenizer.ggml.tokens")
    bos, end_of_turn = tokens.index("<bos>"), tokens.index("<end_of_turn>")
    assert tok.add_bos and tok.bos_id == bos and end_of_turn in tok.eos_ids
    ids = tok.encode(ChatTemplate.from_gguf(gemma3).render(CHAT[1:2]))
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("Hi")[0] == bos  # plain text still gets its BOS
    assert tok.encode("<bos>Hi", parse_special=False)[:2] == [bos, tok.encode("<", parse_special=False)[1]]


# -- against llama.cpp's own renderings of the formats -----------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    ("template", "bos"), [(QWEN3_TEMPLATE, ""), (GEMMA3_TEMPLATE, "<bos>"), (CHATML_TEMPLATE, "")]
)
def test_plain_chat_matches_llama_cpp_builtin_format(template: str, bos: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    chat = (llama_cpp.llama_chat_message * len(CHAT))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in CHAT]
    )
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(CHAT), True, buf, len(buf))
    assert n > 0
    # llama.cpp leaves Gemma's BOS to the tokenizer
    assert bos + buf.raw[:n].decode() == ChatTemplate(template, bos, "").render(CHAT)


def test_tiny_files_get_their_architectures_template(tmp_path: Path) -> None:
    for arch, template in (("llama", CHATML_TEMPLATE), ("qwen2", CHATML_TEMPLATE)):
        assert (
            GGUFFile(write_random_gguf(tmp_path / f"{arch}.gguf", arch=arch)).get("tokenizer.chat_template")
            == template
        )

"""Chat templates render exactly the text the model was trained on, and fail with ChatTemplateError."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from gguf_files import write_metadata_gguf

from llmos.chat_template import DEFAULT_CHATML_TEMPLATE, ChatTemplate
from llmos.errors import ChatTemplateError
from llmos.gguf_file import GGUFFile
from llmos.tokenizer import Tokenizer

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def smol(default_gguf: Path) -> ChatTemplate:
    return ChatTemplate.from_gguf(GGUFFile(default_gguf))


_write_gguf = write_metadata_gguf


# -- SmolLM2's own template ---------------------------------------------------------------------------
def test_smollm2_renders_a_whole_conversation(smol: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr, hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert smol.render(messages) == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nArr, hello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_adds_its_default_system_prompt(smol: ChatTemplate) -> None:
    assert smol.render([{"role": "user", "content": "What is 2+2?"}]) == (
        SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generation_prompt_is_optional(smol: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert smol.render(messages, add_generation_prompt=False) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_smollm2_template_facts(smol: ChatTemplate) -> None:
    assert smol.source != DEFAULT_CHATML_TEMPLATE  # the GGUF's own template, not the fallback
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.has_tool_role is False
    assert smol.supports_tools is False


def test_rendered_prompt_tokenizes_into_turn_markers(smol: ChatTemplate, default_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(GGUFFile(default_gguf))
    ids = tok.encode(smol.render([{"role": "user", "content": "Hi"}]))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
    last_turn = len(ids) - 1 - ids[::-1].index(start)
    assert tok.decode(ids[last_turn:]) == "<|im_start|>assistant\n"


def test_user_text_is_not_reinterpreted(smol: ChatTemplate) -> None:
    # the template only concatenates; braces and Jinja syntax in content come out as typed
    text = "{{ 7*7 }} {% if x %} <b>&amp;</b> 你好 😀"
    assert f"<|im_start|>user\n{text}<|im_end|>" in smol.render([{"role": "user", "content": text}])


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
        ([{"content": "hi"}], "role None"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": "user", "content": ["a", "b"]}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
        (["hello"], "not an object"),
        ("hello", "must be a list"),
        ([], "empty"),
    ],
)
def test_bad_messages_are_rejected(smol: ChatTemplate, messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        smol.render(messages)


def test_template_raise_exception_becomes_chat_template_error() -> None:
    t = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user') }}"
        "{% endif %}{{ messages[0]['content'] }}",
        "<s>",
        "</s>",
    )
    assert t.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversations must start with a user"):
        t.render([{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError inside the template
        "{{ messages[0].content.nothing.deeper }}",  # undefined attribute of undefined
        "{{ messages.append(1) }}",  # the sandbox forbids mutation
        "{{ ''.__class__.__mro__ }}",  # and private attributes
    ],
)
def test_errors_inside_templates_are_wrapped(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate(source, "", "").render([{"role": "user", "content": "x"}])


def test_syntax_errors_are_reported_at_construction() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}", "", "")


def test_bad_tools_are_rejected(smol: ChatTemplate) -> None:
    with pytest.raises(ChatTemplateError, match="tools"):
        smol.render([{"role": "user", "content": "x"}], tools="get_weather")  # type: ignore[arg-type]


# -- the transformers-compatible environment -------------------------------------------------------------
def test_tojson_keeps_html_and_unicode() -> None:
    t = ChatTemplate("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}", "", "")
    tools = [{"name": "a<b>&'c", "city": "Zürich"}]
    out = t.render([{"role": "user", "content": "x"}], tools=tools)
    assert out == ('[{"name": "a<b>&\'c", "city": "Zürich"}]|{\n  "name": "a<b>&\'c",\n  "city": "Zürich"\n}')


def test_block_whitespace_is_trimmed_like_transformers() -> None:
    source = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U:{{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    t = ChatTemplate(source, "", "")
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert t.render(msgs) == "U:a\nU:c\n"


def test_loop_controls_and_globals() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }};{% endfor %}"
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}",
        "<s>",
        "</s>",
    )
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
    ]
    year = datetime.datetime.now().year
    assert t.render(msgs) in (f"u1;{year}|<s>|</s>", f"u1;{year + 1}|<s>|</s>")


def test_generation_blocks_render_their_body() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A:{{ m.content }}"
        "{% endgeneration %}{% else %}U:{{ m.content }}{% endif %};{% endfor %}",
        "",
        "",
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert t.render(msgs) == "U:q;A:a;"


def test_tool_aware_template_is_detected_and_rendered() -> None:
    source = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}"
        "{% if m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>\n"
        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}"
        "{% endfor %}"
    )
    t = ChatTemplate(source, "", "")
    assert t.has_tool_role is True and t.supports_tools is True
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather"}]},
        {"role": "tool", "content": "sunny"},
    ]
    assert t.render(msgs, tools=[{"name": "get_weather"}, {"name": "time"}]) == (
        "TOOLS:get_weather,time\nuser: weather?\nassistant: \n<tool_response>sunny</tool_response>\n"
    )
    assert t.render(msgs).startswith("user: weather?")  # tools=None: the block is left out


def test_missing_template_falls_back_to_chatml(tmp_path: Path) -> None:
    g = _write_gguf(
        tmp_path / "no_template.gguf",
        {
            "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        },
    )
    t = ChatTemplate.from_gguf(g)
    assert t.source == DEFAULT_CHATML_TEMPLATE
    assert t.eos_token == "<|im_end|>"
    assert t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_in_gguf_is_used_as_is(tmp_path: Path) -> None:
    g = _write_gguf(
        tmp_path / "custom.gguf",
        {
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
            "tokenizer.ggml.tokens": ["<s>", "</s>"],
            "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1,
        },
    )
    t = ChatTemplate.from_gguf(g)
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi[assistant]"

"""Tools over the HTTP endpoint on a model whose chat template has its own tool format (Hermes, as
Qwen2.5's): the template describes the tools, calls are `<tool_call>` blocks constrained by a grammar,
and come back in OpenAI's shape; history with tool calls and results is written back in that format."""

from __future__ import annotations

import json
from pathlib import Path

from dbus_harness import REPO, Daemon, PrivateBus
from http_harness import openai_client

from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

HERMES_TEMPLATE = (REPO / "tests" / "fixtures" / "hermes_chat_template.jinja").read_text()
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris"]}},
            "required": ["city"],
        },
    },
}


def test_hermes_tool_calls_over_http(tmp_path: Path) -> None:
    gguf = write_random_gguf(
        tmp_path / "h.gguf", weight_type="Q4_1", context_length=1024, seed=3, chat_template=HERMES_TEMPLATE
    )
    ModelStore(tmp_path / "store").import_gguf(gguf, name="hermes-tiny", make_default=True)
    bus = PrivateBus(tmp_path)
    sock = tmp_path / "run" / "http.sock"
    (tmp_path / "llmosd.toml").write_text(f'[http]\nsocket = "{sock}"\n')
    daemon = Daemon(bus.address, tmp_path / "store", "--config", str(tmp_path / "llmosd.toml"))
    try:
        client = openai_client(sock)
        model = client.models.list().data[0].id
        asked = [{"role": "user", "content": "Weather in Oslo?"}]
        out = client.chat.completions.create(
            model=model, messages=asked, tools=[TOOL], tool_choice="required", max_tokens=200
        )
        [call] = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Oslo", "Paris")
        history = [
            *asked,
            out.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ]
        again = client.chat.completions.create(
            model=model, messages=history, tools=[TOOL], max_tokens=8, extra_body={"ignore_eos": True}
        )
        assert again.usage.prompt_tokens > out.usage.prompt_tokens  # the call and its result are history
    finally:
        daemon.stop_cleanly()
        bus.stop()

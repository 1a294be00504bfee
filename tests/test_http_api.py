"""The OpenAI-compatible endpoint of llmosd on the real default model, driven by real clients: the
`openai` package over the unix socket, curl as two different users, and raw hostile bytes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from dbus_harness import PrivateBus, wait_until
from http_harness import MODEL, active_requests, openai_client, raw, real_store, start_daemon
from system_bus_harness import User, world_readable_dir

pytestmark = pytest.mark.model
openai = pytest.importorskip("openai")

QUOTA = 60  # tokens per minute for the app "quota-curl" (each user of it has their own)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("http")
    bus = PrivateBus(tmp)
    run = world_readable_dir("llmos-http-")  # reachable by another uid (pytest's tmp is root's, 0700)
    daemon, sock = start_daemon(
        bus.address, real_store(tmp, default_gguf), run, f"[apps.quota-curl]\ntokens_per_minute = {QUOTA}\n"
    )
    shutil.copy2(shutil.which("curl") or "/usr/bin/curl", run / "quota-curl")  # an app of its own
    yield bus.address, sock
    daemon.stop_cleanly()
    bus.stop()
    assert not sock.exists()


def test_chat_non_streamed(rig: tuple[str, Path]) -> None:
    client = openai_client(rig[1])
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one."},
        ],
        max_tokens=12,
    )
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 20
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streamed(rig: tuple[str, Path]) -> None:
    client = openai_client(rig[1])
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to five."}],
            max_completion_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_tools_return_tool_calls(rig: tuple[str, Path]) -> None:
    client = openai_client(rig[1])
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice="required",
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(
        json.loads(call.function.arguments)["city"], str
    )
    # the result goes back as history (a tool turn), and the model answers from it
    again = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
        ],
        tools=tools,
        max_tokens=60,
    )
    assert again.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_response_format_json_schema(rig: tuple[str, Path]) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    out = openai_client(rig[1]).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_context_overflow_is_400_naming_both_lengths(rig: tuple[str, Path]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(rig[1]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello world " * 5000}], max_tokens=4
        )
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "8192" in err["message"] and any(w.isdigit() and int(w) > 8192 for w in err["message"].split())


def test_disconnecting_stream_cancels_its_generation(rig: tuple[str, Path]) -> None:
    address, sock = rig
    stream = openai_client(sock).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _chunk in enumerate(stream):
        if n == 3:
            break
    assert active_requests(address) == 1
    stream.close()
    assert wait_until(lambda: active_requests(address) == 0, timeout=5)


def test_two_users_of_one_app_are_separate_accounts(rig: tuple[str, Path]) -> None:
    if os.getuid() != 0:
        pytest.skip("running curl as another user needs root")
    sock = rig[1]
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": QUOTA,
            "ignore_eos": True,
        }
    )

    def curl(user: User, data: str = body) -> tuple[int, str]:
        argv = [
            str(sock.parent.parent / "quota-curl"),
            "-s",
            "-i",
            "--unix-socket",
            str(sock),
            "http://localhost/v1/chat/completions",
            "-d",
            data,
        ]
        out = subprocess.run(user.argv(argv), capture_output=True, text=True, timeout=120, cwd="/")
        return int(out.stdout.split()[1]), out.stdout

    root, nobody = User.named("root"), User.named("nobody")
    assert curl(root)[0] == 200
    status, text = curl(root)
    assert status == 429 and "retry-after:" in text.lower() and "rate_limit_exceeded" in text
    streamed = curl(root, body.replace('"max_tokens"', '"stream": true, "max_tokens"'))
    assert streamed[0] == 429  # a stream's head waits for its first token: the error keeps its status
    assert curl(nobody)[0] == 200  # the same app as another user: its own quota


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999\r\n\r\n",
            413,
        ),
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\r\n", 411),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n{bad}", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\n\r\n", 403),
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\n\r\n", 403),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n", 404),
    ],
)
def test_hostile_requests_get_named_errors_quickly(
    rig: tuple[str, Path], request_bytes: bytes, status: int
) -> None:
    took, answer = raw(rig[1], request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert took < 1.0
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["message"] and b"Traceback" not in answer


def test_deep_json_and_wrong_types_are_400(rig: tuple[str, Path]) -> None:
    deep = b"[" * 100000 + b"]" * 100000
    cases = [
        deep,
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}
        ).encode(),
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}
        ).encode(),
    ]
    for body in cases:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
        t0 = time.monotonic()
        _, answer = raw(rig[1], head.encode() + body)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        assert time.monotonic() - t0 < 1.0


def test_curl_example_from_the_docs(rig: tuple[str, Path]) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--unix-socket",
            str(rig[1]),
            "http://localhost/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    answer = json.loads(out.stdout)
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 8


def _ollama(sock: Path):  # the ollama package is a test-only import
    import httpx
    import ollama

    return ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=str(sock)))


def test_ollama_chat_generate_and_model_info(rig: tuple[str, Path]) -> None:
    import ollama

    client = _ollama(rig[1])
    [listed] = client.list().models
    assert listed.model == f"{MODEL}:latest" and listed.details.family == "llama"
    assert [m.model for m in client.ps().models] == [f"{MODEL}:latest"]
    assert client.show(MODEL).modelinfo["llama.context_length"] == 8192
    out = client.chat(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], options={"num_predict": 6}
    )
    assert out.message.content and out.done and out.eval_count <= 6 and out.prompt_eval_count > 0
    parts = list(
        client.chat(
            model=f"{MODEL}:latest",
            messages=[{"role": "user", "content": "Count."}],
            stream=True,
            options={"num_predict": 5, "num_ctx": 2048},
            keep_alive=0,  # never unloads the shared model
        )
    )
    assert parts[-1].done and parts[-1].eval_count == 5 and "".join(p.message.content for p in parts)
    assert client.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 4}).eval_count == 4
    assert [m.model for m in client.ps().models] == [f"{MODEL}:latest"]  # keep_alive 0 did not unload it
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 300}], options={"num_ctx": 100}
        )
    assert e.value.status_code == 400 and "100" in e.value.error


def test_ollama_tools(rig: tuple[str, Path]) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    out = _ollama(rig[1]).chat(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[tool]
    )
    for call in out.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    assert out.message.tool_calls or out.message.content


def _status(address: str) -> dict:
    from dbus_harness import busctl

    out = busctl(
        address, "call", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "GetStatus", "--json=short"
    )
    return {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}


def test_stateless_turns_reuse_their_own_apps_kv_only(rig: tuple[str, Path]) -> None:
    address, sock = rig
    client = openai_client(sock)
    convo = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": "Here are my notes: " + "the quick brown fox jumps over the lazy dog. " * 60,
        },
    ]
    first = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=20)
    convo += [{"role": "assistant", "content": first.choices[0].message.content}]
    hits = _status(address)["auto_prefix_hits"]
    second = client.chat.completions.create(
        model=MODEL, messages=[*convo, {"role": "user", "content": "Summarize them."}], max_tokens=8
    )
    usage = second.usage
    assert (
        usage.prompt_tokens_details.cached_tokens >= 0.9 * usage.prompt_tokens
    )  # only the new turn computed
    assert _status(address)["auto_prefix_hits"] == hits + 1
    # the same conversation from another app (curl) computes it all again: no KV crosses apps
    body = {"model": MODEL, "messages": [*convo, {"role": "user", "content": "Shorter."}], "max_tokens": 4}
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--unix-socket",
            str(sock),
            "http://localhost/v1/chat/completions",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    other = json.loads(out.stdout)["usage"]
    assert other["prompt_tokens_details"]["cached_tokens"] < 0.2 * other["prompt_tokens"]


def test_metrics_for_the_administrator_only(rig: tuple[str, Path]) -> None:
    sock = rig[1]
    argv = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), "http://localhost/metrics"]
    root = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    text, code = root.stdout.rsplit("\n", 1)
    assert code == "200" and 'llmos_state{state="ready"} 1' in text
    if os.getuid() == 0:
        other = subprocess.run(
            User.named("nobody").argv(argv), capture_output=True, text=True, timeout=60, cwd="/"
        )
        assert other.stdout.endswith("403")


def test_disconnecting_unstreamed_client_cancels_too(rig: tuple[str, Path]) -> None:
    address, sock = rig
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Go."}],
            "max_tokens": 3000,
            "ignore_eos": True,
        }
    ).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    assert wait_until(lambda: active_requests(address) == 1, timeout=10)
    s.close()
    assert wait_until(lambda: active_requests(address) == 0, timeout=5)

"""The HTTP endpoint against llama.cpp's own OpenAI-compatible server, same GGUF, same client code.

    python bench/gateway.py [--threads 2] [--out bench/results/gateway.json] [--no-peer]

llmosd runs on a private bus with its unix socket; the peer is `python -m llama_cpp.server` (the
`llama-cpp-python[server]` bench extra) on 127.0.0.1, with the same GGUF and thread count. Both are
driven by the same streaming client (httpx, OpenAI's wire format): TTFT and decode of a ~256-token chat
prompt answered with up to 128 tokens; turn 6 of a stateless chat of ~1,000 tokens (the whole
conversation resent each turn) against the same prompt computed from scratch (a changed first
character: no reuse), 4 concurrent clients' aggregate tok/s, and llmos's endpoint against D-Bus Generate
for the same request (overhead). Greedy everywhere. Warm-up requests first (DESIGN §2b).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FILLER = "The committee met on Tuesday to review the budget, the timetable and the hiring plan. "
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
<allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"""


def stream(
    client: httpx.Client, model: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, float]:
    """One streamed chat completion: TTFT, decode tok/s after the first token, tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    t0 = time.perf_counter()
    first, n, text = 0.0, 0, []
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                first = first or time.perf_counter()
                n += 1
                text.append(delta[0]["delta"]["content"])
    end = time.perf_counter()
    return {
        "ttft_s": first - t0,
        "decode_tok_s": (n - 1) / (end - first) if n > 1 else 0.0,
        "chunks": n,
        "total_s": end - t0,
        "text": "".join(text),
    }


def scenarios(client: httpx.Client, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def single(k: int) -> list[dict[str, str]]:  # a new opening each time: nothing reusable
        return [{"role": "user", "content": f"Report {k}. " + FILLER * 14 + "Summarize this in detail."}]

    for k in range(2):  # warm-up
        stream(client, model, single(100 + k), 8)
    runs = [stream(client, model, single(k), 128) for k in range(3)]
    out["single"] = {k: sorted(r[k] for r in runs)[1] for k in ("ttft_s", "decode_tok_s", "chunks")}
    convo = [{"role": "system", "content": "You are a careful assistant. " + FILLER * 20}]
    turns = []
    for i in range(6):
        convo.append(
            {"role": "user", "content": f"Question {i}: what is point {i} of the notes? " + FILLER * 2}
        )
        r = stream(client, model, convo, 48)
        turns.append(r["ttft_s"])
        convo.append({"role": "assistant", "content": r["text"]})
    fresh = [{"role": "system", "content": "Z" + convo[0]["content"]}, *convo[1:-1]]  # shares nothing
    out["stateless_chat"] = {
        "turn_ttft_s": turns,
        "turn6_ttft_s": turns[-1],
        "reprefill_ttft_s": stream(client, model, fresh, 4)["ttft_s"],
    }
    out["stateless_chat"]["ratio"] = (
        out["stateless_chat"]["turn6_ttft_s"] / out["stateless_chat"]["reprefill_ttft_s"]
    )
    results: list[dict[str, float]] = []

    def one(k: int) -> None:
        msgs = [{"role": "user", "content": f"Client {k}: write about topic {k}. " + FILLER * 3}]
        results.append(stream(client, model, msgs, 96))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent4"] = {"aggregate_tok_s": sum(r["chunks"] for r in results) / (time.perf_counter() - t0)}
    return out


def start_llmosd(tmp: Path, gguf: Path, threads: int) -> tuple[list[subprocess.Popen[bytes]], Path, str]:
    from llmos.model_store import ModelStore

    store = tmp / "store"
    ModelStore(store).import_gguf(gguf, make_default=True)
    (tmp / "bus.conf").write_text(BUS_CONF.format(path=tmp / "bus.sock"))
    bus = subprocess.Popen(
        ["dbus-daemon", f"--config-file={tmp / 'bus.conf'}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
    )
    assert bus.stdout is not None
    address = bus.stdout.readline().decode().strip()
    sock = tmp / "http.sock"
    (tmp / "llmosd.toml").write_text(f'[http]\nsocket = "{sock}"\n[limits]\nmax_tokens = 4096\n')
    d = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "system_services.daemon",
            "--address",
            address,
            "--store",
            str(store),
            "--config",
            str(tmp / "llmosd.toml"),
            "--threads",
            str(threads),
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    _wait(lambda: sock.exists(), 120)
    return [d, bus], sock, address


def start_peer(gguf: Path, threads: int) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--n_threads",
            str(threads),
            "--n_ctx",
            "8192",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(up, 300)
    return p, port


def _wait(ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)


async def dbus_vs_http(address: str, sock: Path, model: str) -> dict[str, float]:
    """The same request (64 greedy tokens, EOS ignored) through D-Bus Generate and the endpoint."""
    from dbus_fast import Message, Variant
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()
    prompt = FILLER * 4 + "Go on."
    opts = {"max_tokens": Variant("u", 64), "ignore_eos": Variant("b", True)}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "ignore_eos": True,
    }
    dbus_s, http_s = [], []
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://localhost"
    ) as c:
        for _ in range(5):
            t0 = time.perf_counter()
            await bus.call(
                Message(
                    destination="org.llmos.LLM1",
                    path="/org/llmos/LLM1",
                    interface="org.llmos.LLM1",
                    member="Generate",
                    signature="sa{sv}",
                    body=[prompt, opts],
                )
            )
            dbus_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            (await c.post("/v1/chat/completions", json=body, timeout=600)).raise_for_status()
            http_s.append(time.perf_counter() - t0)
    bus.disconnect()
    d, h = sorted(dbus_s)[2], sorted(http_s)[2]
    return {"dbus_s": d, "http_s": h, "overhead": h / d - 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)
    from llmos.default_model import default_gguf_path

    gguf = default_gguf_path()
    report: dict[str, Any] = {"threads": args.threads, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        procs, sock, address = start_llmosd(Path(tmp), gguf, args.threads)
        try:
            model = "SmolLM2-135M-Instruct.Q4_1"
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as c:
                report["llmos"] = scenarios(c, model)
            report["llmos"]["dbus_vs_http"] = asyncio.run(dbus_vs_http(address, sock, model))
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
    if not args.no_peer:
        peer, port = start_peer(gguf, args.threads)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                report["llama.cpp"] = scenarios(c, str(gguf))
        finally:
            peer.terminate()
            peer.wait(30)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

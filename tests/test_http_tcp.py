"""The opt-in loopback TCP endpoint as systemd socket activation gives it: a listening socket passed as
fd 3 (LISTEN_FDS/LISTEN_PID), callers named by API keys from a 0600 configuration."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_harness import REPO, PrivateBus, tiny_store

KEY = "llmos-test-key-0123456789abcdef"
# exec llmosd with the inherited socket as fd 3, as systemd does (LISTEN_PID is the daemon's own pid)
WRAPPER = """
import os, sys
fd = int(os.environ.pop("TEST_FD"))
os.dup2(fd, 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "system_services.daemon", *sys.argv[1:]])
"""


def _activated(
    tmp: Path, address: str, store: Path, mode: int
) -> tuple[subprocess.Popen[str], int, list[str]]:
    conf = tmp / f"llmosd-{mode:o}.toml"
    conf.write_text(
        f'[http]\nsocket = "{tmp}/{mode:o}.sock"\n[apps."org.example.Keyed"]\napi_keys = ["{KEY}"]\n'
    )
    conf.chmod(mode)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    argv = ["--address", address, "--store", str(store), "--config", str(conf)]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *argv],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(listener.fileno(),),
        env={**os.environ, "TEST_FD": str(listener.fileno())},
    )
    listener.close()
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            if "serving" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    assert ready.wait(60) and any("serving" in line for line in log), "\n".join(log)
    return proc, port, log


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateBus, Path, Path]]:
    tmp = tmp_path_factory.mktemp("tcp")
    bus = PrivateBus(tmp)
    yield bus, tiny_store(tmp), tmp
    bus.stop()


def _get(port: int, path: str, headers: str = "") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}\r\n".encode()
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def test_keys_name_the_app_and_no_key_no_access(rig: tuple[PrivateBus, Path, Path]) -> None:
    bus, store, tmp = rig
    proc, port, log = _activated(tmp, bus.address, store, 0o600)
    try:
        assert _get(port, "/v1/models").startswith("HTTP/1.1 401 ")
        assert _get(port, "/v1/models", "Authorization: Bearer wrong-key-0123456789abc\r\n").startswith(
            "HTTP/1.1 401 "
        )
        assert _get(port, "/v1/models", f"Authorization: Bearer {KEY}\r\n").startswith("HTTP/1.1 200 ")
        assert _get(port, "/metrics", f"X-Api-Key: {KEY}\r\n").startswith("HTTP/1.1 403 ")  # admin only
        import httpx
        import openai

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, http_client=httpx.Client(), max_retries=0
        )
        out = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == 3
        status = subprocess.run(
            [
                "busctl",
                f"--address={bus.address}",
                "call",
                "org.llmos.LLM1",
                "/org/llmos/LLM1",
                "org.llmos.LLM1",
                "GetStatus",
                "--json=short",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "org.example.Keyed" in json.loads(status.stdout)["data"][0]["apps"]["data"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, "\n".join(log)


def test_keys_in_a_readable_file_mean_no_tcp(rig: tuple[PrivateBus, Path, Path]) -> None:
    bus, store, tmp = rig
    proc, port, log = _activated(tmp, bus.address, store, 0o644)
    try:
        assert any("must be mode 0600" in line for line in log)
        with pytest.raises(OSError):
            _get(port, "/v1/models", f"Authorization: Bearer {KEY}\r\n")
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_llm_cli_runs_unchanged_against_llmos(rig: tuple[PrivateBus, Path, Path]) -> None:
    """A program no one here wrote: Simon Willison's `llm` CLI, with an OpenAI-compatible model entry."""
    llm = shutil.which("llm", path=str(Path(sys.executable).parent)) or shutil.which("llm")
    if llm is None:
        pytest.skip("the llm CLI is not installed (test extra)")
    bus, store, tmp = rig
    proc, port, log = _activated(tmp, bus.address, store, 0o600)
    home = tmp / "llm-home"
    home.mkdir(exist_ok=True)
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: llmos\n  model_name: tiny\n  api_key_name: llmos\n"
        f'  api_base: "http://127.0.0.1:{port}/v1"\n'
    )
    (home / "keys.json").write_text(json.dumps({"llmos": KEY}))
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    try:
        for args in (
            ["-m", "llmos", "-o", "max_tokens", "4", "hello"],
            ["-c", "-o", "max_tokens", "4", "again"],
        ):
            out = subprocess.run([llm, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
            assert out.returncode == 0 and out.stdout, out.stderr  # random weights: any text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, "\n".join(log)

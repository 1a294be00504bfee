"""llmosd with its HTTP endpoint on the real default model, and raw-socket helpers for hostile clients."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
from dbus_harness import Daemon, busctl

from llmos.model_store import ModelStore

MODEL = "SmolLM2-135M-Instruct.Q4_1"


def real_store(tmp: Path, gguf: Path) -> Path:
    root = tmp / "store"
    ModelStore(root).import_gguf(gguf, make_default=True)
    return root


def start_daemon(address: str, store: Path, tmp: Path, config: str = "") -> tuple[Daemon, Path]:
    """llmosd with [http] socket in `tmp` (plus `config`); returns it and the socket's path."""
    sock = tmp / "run" / "http.sock"
    conf = tmp / "llmosd.toml"
    conf.write_text(f'[http]\nsocket = "{sock}"\n{config}')
    return Daemon(address, store, "--config", str(conf)), sock


def openai_client(sock: Path, **kw: object):
    import openai

    transport = httpx.HTTPTransport(uds=str(sock))
    return openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        http_client=httpx.Client(transport=transport),
        max_retries=0,
        **kw,
    )


def raw(sock: Path, data: bytes, timeout: float = 5.0) -> tuple[float, bytes]:
    """Send `data` on a new connection; (seconds until the answer, the answer up to the close)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock))
    t0 = time.monotonic()
    with contextlib.suppress(OSError):  # the server may answer and close before reading everything
        s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = [
                int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")
            ]
            if sep and length and len(body) >= length[0]:
                break  # a whole answer on a connection kept open
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return time.monotonic() - t0, out


def active_requests(address: str) -> int:
    out = busctl(
        address, "call", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "GetStatus", "--json=short"
    )
    status = json.loads(out.stdout)["data"][0]
    return int(status["active_requests"]["data"])

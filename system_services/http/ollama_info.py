"""Ollama's model information endpoints: /api/version, /api/tags, /api/ps, /api/show.

With the fields Ollama's clients read (name, model, size, digest, details, model_info's context length,
capabilities). There is one model, named as on the OpenAI side; clients that add Ollama's default tag
(`<name>:latest`) reach it too. /api/ps lists it while it is loaded (the arbiter unloads it when idle:
`[arbiter] idle_unload_s`), with an `expires_at` in the far future, since no client's `keep_alive`
decides residency here.
"""

from __future__ import annotations

import datetime
from typing import Any

from system_services.http.exchange import Exchange
from system_services.http.wire import HttpError

OLLAMA_VERSION = "0.12.0"  # the API level implemented, for clients that check it
NEVER = "2318-12-03T00:00:00Z"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(ex: Exchange) -> dict[str, Any]:
    m = ex.daemon.model.manifest
    size = sum(f.size for f in m.files.values())
    name = f"{m.name}:latest"
    return {
        "name": name,
        "model": name,
        "size": size,
        "digest": m.source_sha256,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": m.architecture,
            "families": [m.architecture],
            "parameter_size": "",
            "quantization_level": m.source_quant,
        },
    }


def model_named(ex: Exchange, name: Any) -> None:
    served = ex.daemon.model.manifest.name
    if name not in (served, f"{served}:latest"):
        raise HttpError(404, f"model {str(name)[:80]!r} not found; this daemon serves {served!r}")


async def version(ex: Exchange) -> None:
    await ex.reply({"version": OLLAMA_VERSION})


async def tags(ex: Exchange) -> None:
    await ex.reply({"models": [{**_entry(ex), "modified_at": now()}]})


async def ps(ex: Exchange) -> None:
    loaded = ex.daemon.arbiter.state == "ready"
    ctx = ex.daemon.model.context_length
    models = [{**_entry(ex), "expires_at": NEVER, "size_vram": 0, "context_length": ctx}] if loaded else []
    await ex.reply({"models": models})


async def show(ex: Exchange) -> None:
    body = ex.json_body()
    model_named(ex, body.get("model", body.get("name")))
    d = ex.daemon
    m = d.model.manifest
    template = d.model.chat_template
    caps = ["completion", "tools"] if template is not None else ["completion"]
    await ex.reply(
        {
            "modelfile": "",
            "parameters": "",
            "template": template.source if template is not None else "",
            "details": _entry(ex)["details"],
            "model_info": {
                "general.architecture": m.architecture,
                f"{m.architecture}.context_length": d.model.context_length,
                f"{m.architecture}.embedding_length": m.n_embd,
                f"{m.architecture}.block_count": m.n_layer,
            },
            "capabilities": caps,
            "modified_at": now(),
        }
    )


ROUTES = {
    ("GET", "/api/version"): version,
    ("GET", "/api/tags"): tags,
    ("GET", "/api/ps"): ps,
    ("POST", "/api/show"): show,
}

"""GET /metrics: what GetStatus knows, in Prometheus's text format, for the administrator only.

Per-app figures say which apps use the model and how much, which is private (`Daemon.sees_apps`: root
and the daemon's own user, as for GetStatus's per-app part); the totals too, here, since a scrape is an
administrator's tool: anyone else gets 403. The names are GetStatus's keys with an `llmos_` prefix;
counts that only grow are counters (`_total`), the rest gauges.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from system_services.http.exchange import Exchange
from system_services.http.responses import send_body
from system_services.http.wire import HttpError
from system_services.llm_object import APP_FIGURES, ARBITER_FIGURES

COUNTERS = {
    "prefix_hits",
    "auto_prefix_hits",
    "auto_prefix_tokens",
    "swap_outs",
    "swap_restores",
    "swap_recomputes",
    "swap_failures",
    "model_loads",
    "tokens",
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(lines: list[str], name: str, value: float, labels: dict[str, str] | None = None) -> None:
    full = f"llmos_{name}_total" if name in COUNTERS else f"llmos_{name}"
    if not any(line.startswith(f"# TYPE {full} ") for line in lines):
        lines.append(f"# TYPE {full} {'counter' if name in COUNTERS else 'gauge'}")
    tags = ",".join(f'{k}="{_label(v)}"' for k, v in (labels or {}).items())
    lines.append(f"{full}{{{tags}}} {value}" if tags else f"{full} {value}")


def render(daemon: Any) -> str:
    d = daemon
    snap = d.worker.snapshot()
    m = d.model.manifest
    lines: list[str] = []
    info = {"model": m.name, "precision": m.precision, "device": d.arbiter.device}
    _metric(lines, "info", 1, info)
    _metric(lines, "state", 1, {"state": d.state})
    _metric(lines, "context_length", d.model.context_length)
    _metric(lines, "sessions", len(d.sessions))
    _metric(lines, "active_requests", d.worker.active_jobs())
    for key, sig in ARBITER_FIGURES.items():
        if sig != "as":
            _metric(lines, key, snap.get(key, 0))
    sessions = Counter(s.app_id for s in d.sessions.values())
    apps = snap.get("apps", {})
    for app in sorted(set(apps) | set(sessions)):
        _metric(lines, "app_sessions", sessions.get(app, 0), {"app": app})
        for key in APP_FIGURES:
            _metric(
                lines,
                f"app_{key}" if key != "tokens" else "tokens",
                apps.get(app, {}).get(key, 0),
                {"app": app},
            )
    _metric(lines, "uptime_seconds", round(d.uptime(), 3))
    return "\n".join(lines) + "\n"


async def metrics(ex: Exchange) -> None:
    if not ex.daemon.sees_apps(ex.caller):
        raise HttpError(403, "metrics are for root and the daemon's own user", "forbidden")
    body = render(ex.daemon).encode("utf-8")
    await send_body(ex.conn.writer, 200, body, "text/plain; version=0.0.4; charset=utf-8", ex.req.keep_alive)


ROUTES = {("GET", "/metrics"): metrics}

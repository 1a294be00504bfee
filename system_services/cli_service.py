"""llmosctl's commands that go through the llmosd service (status, generate, chat) over D-Bus.

Which bus: `--address`, `--session-bus` or `--system-bus` pick one explicitly; `--local` (or naming a model
store with --store / --model) runs the model in this process instead; otherwise llmosctl looks for
org.llmos.LLM1 on the system bus, then on the session bus, and runs in-process if neither has it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from system_services.bus_driver import name_has_owner
from system_services.client import LLMClient, ServiceError

BUS_NAME = "org.llmos.LLM1"


class UsageError(Exception):
    """A combination of arguments argparse cannot reject on its own (exit 2 with the command's usage)."""


def add_bus_options(parser: argparse.ArgumentParser, *, local: bool = False) -> None:
    """--address / --session-bus / --system-bus; `local`: also --local, for the commands that can run
    the model in this process (generate, chat). Others only talk to llmosd and do not offer it."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", metavar="ADDR", help="talk to llmosd on this D-Bus address")
    where.add_argument("--session-bus", action="store_true", help="talk to llmosd on the session bus")
    where.add_argument("--system-bus", action="store_true", help="talk to llmosd on the system bus")
    if local:
        where.add_argument(
            "--local", action="store_true", help="run the model in this process, not via llmosd"
        )


def explicit_bus(args: argparse.Namespace) -> str | None:
    """The bus option given, as typed, or None."""
    if getattr(args, "address", None):
        return "--address"
    for flag in ("session_bus", "system_bus"):
        if getattr(args, flag, False):
            return "--" + flag.replace("_", "-")
    return None


def check_served_model(client: LLMClient, args: argparse.Namespace) -> None:
    """--model/--store choose what an in-process run loads; llmosd serves its one model. Naming another
    model while talking to llmosd is refused rather than silently ignored."""
    if getattr(args, "store", None):
        raise UsageError("--store picks the model store of an in-process run (--local); llmosd uses its own")
    wanted = getattr(args, "model", None)
    if wanted:
        served = client.status().get("model")
        if wanted != served:
            raise UsageError(
                f"llmosd serves {served}, not {wanted}: ask for {served}, or run {wanted} in this "
                "process with --local"
            )


async def _has_service(bus_type: BusType) -> bool:
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=bus_type).connect(), 2)
    except Exception:  # no such bus here
        return False
    try:
        return await name_has_owner(bus, BUS_NAME)
    finally:
        bus.disconnect()


def service_for(args: argparse.Namespace, *, required: bool = False) -> LLMClient | None:
    """A connected client, or None to run in-process. `required`: an error instead of None."""
    if explicit_bus(args):
        if getattr(args, "address", None):
            client = LLMClient.connect(address=args.address)
        else:
            client = LLMClient.connect(session=bool(getattr(args, "session_bus", False)))
        try:
            check_served_model(client, args)
        except BaseException:
            client.close()
            raise
        return client
    local = getattr(args, "local", False) or getattr(args, "store", None) or getattr(args, "model", None)
    if not local or required:
        for bus_type, session in ((BusType.SYSTEM, False), (BusType.SESSION, True)):
            if asyncio.run(_has_service(bus_type)):
                return LLMClient.connect(session=session)
    if required:
        raise ServiceError(
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "llmosd is not running on the system or session bus (start it, or pass --address)",
        )
    return None


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "repetition_penalty": args.repeat_penalty,
        "json_schema": getattr(args, "json_schema_text", None),
    }


def human_size(n: float) -> str:
    """Bytes as 512 B, 1.5 KiB, 12.0 MiB, 1.2 GiB (for llmosctl's tables)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _scalar(key: str, v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, int) and key.endswith("_bytes") and v >= 1024:
        return f"{v} ({human_size(v)})"
    return str(v)


def _inline(v: Any) -> str:
    """A nested value on one line: k=v pairs, comma-separated items, `none` when empty."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_inline(x)}" for k, x in v.items()) or "none"
    if isinstance(v, list):
        return ", ".join(_inline(x) for x in v) or "none"
    return _scalar("", v)


def format_status(st: dict[str, Any]) -> list[str]:
    """GetStatus for people: one `key  value` line per field, sizes also in KiB/MiB, and nested
    tables (apps, sessions by app, device failures) as indented lines, never Python reprs."""
    width = max((len(k) for k in st), default=0)
    lines = []
    for key in sorted(st):
        v = st[key]
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            lines.append(f"{key:<{width}}  {len(v)}")
            lines += [f"  {name}: {_inline(row)}" for name, row in sorted(v.items())]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{key:<{width}}  {len(v)}")
            lines += [f"  {_inline(row)}" for row in v]
        elif isinstance(v, dict | list):
            lines.append(f"{key:<{width}}  {_inline(v)}")
        else:
            lines.append(f"{key:<{width}}  {_scalar(key, v)}")
    return lines


def budget_warnings(st: dict[str, Any]) -> list[str]:
    """A line when the KV budget cannot be met because swap writes fail (the daemon logs why once, then
    only counts, so this is where it stays visible); none otherwise, or from a daemon without the keys."""
    over = st.get("kv_over_budget_bytes", 0)
    if not over:
        return []
    return [f"KV over budget by {human_size(over)}: swap writes failing ({st.get('swap_failures', 0)})"]


def stats_line(stats: dict[str, Any]) -> str:
    return (
        f"[prompt {stats.get('tokens_in', 0)} tokens, completion {stats.get('tokens_out', 0)} tokens, "
        f"TTFT {stats.get('ttft_ms', 0):.0f} ms, decode {stats.get('tokens_per_s', 0):.1f} tok/s, "
        f"finish {stats.get('finish_reason', '?')}, via llmosd]"
    )


def stream_answer(session: Any, text: str, options: dict[str, Any]) -> str:
    parts = []
    chunks = session.stream(text, **options)
    with contextlib.closing(chunks):
        for piece in chunks:
            sys.stdout.write(piece)
            sys.stdout.flush()
            parts.append(piece)
    return "".join(parts)


def generate(client: LLMClient, text: str, args: argparse.Namespace) -> dict[str, Any]:
    session = client.create_session(system_prompt=args.system)
    try:
        out = stream_answer(session, text, options_from(args))
    finally:
        with contextlib.suppress(ServiceError):
            session.close()
    if not out.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    return session.last_stats


def status(client: LLMClient) -> dict[str, Any]:
    return client.status()

"""`llmosctl top`: like top(1), but for the one model llmosd shares between apps.

Every app on the device competes for the same weights, KV memory and compute, so when one of them feels
slow the question is "who else is using the model right now?". This polls GetStatus and shows the service
(state, device, KV memory against its budget, swapping) and one row per app (class, sessions, requests,
tokens, KV memory), busiest first. `--once` prints a single frame for scripts and tests; on a terminal
the frame is redrawn in place with plain ANSI codes (no curses). Ctrl-C leaves with 130 and no
traceback; a daemon that goes away ends as one `llmosctl: error:` line and exit 1, via cli.main.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from typing import Any

from system_services import cli_service
from system_services.cli_service import human_size
from system_services.client import ServiceError

EXIT_INTERRUPTED = 130
CLEAR = "\x1b[H\x1b[2J"  # cursor home, then clear the screen
APP_WIDTH = 24
COLUMNS = ("APP", "CLASS", "SESS", "RUN", "QUEUE", "TOKENS", "TOK/MIN", "KV MEM", "KV SWAP", "DEVICE")
RIGHT = frozenset({"SESS", "RUN", "QUEUE", "TOKENS", "TOK/MIN", "KV MEM", "KV SWAP"})


def interval_seconds(text: str) -> float:
    """argparse type for --interval: a number of seconds above zero."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds above 0")
    return v


def clip(text: str, width: int) -> str:
    """Long app ids end in an ellipsis so the table stays aligned."""
    return text if len(text) <= width else text[: width - 1] + "…"


def uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    clock = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {clock}" if days else clock


def short_device(device: str) -> str:
    return device.removesuffix("ExecutionProvider") or "-"


def app_rows(apps: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per app: the most requests in flight first, then the most tokens, then by name."""
    order = sorted(
        apps.items(), key=lambda kv: (-(kv[1]["running"] + kv[1]["queued"]), -kv[1]["tokens"], kv[0])
    )
    return [
        (
            clip(app, APP_WIDTH),
            a["priority"],
            str(a["sessions"]),
            str(a["running"]),
            str(a["queued"]),
            str(a["tokens"]),
            str(a["tokens_last_minute"]),
            human_size(a["kv_resident_bytes"]),
            human_size(a["kv_swapped_bytes"]),
            short_device(a["device"]),
        )
        for app, a in order
    ]


def render(st: dict[str, Any]) -> list[str]:
    """A frame of text lines from a GetStatus dict."""
    apps: dict[str, dict[str, Any]] = st.get("apps", {})
    running = sum(a["running"] for a in apps.values())
    queued = sum(a["queued"] for a in apps.values())
    failed = st.get("device_failures") or []
    lines = [
        f"llmosd: {st['model']} ({st['precision']}), {st['state']} on {st['device']}"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + f", up {uptime(st['uptime_s'])}",
        f"requests: {running} running, {queued} queued; sessions: {st['sessions']}",
        f"KV memory: {human_size(st['kv_bytes'])} resident / {human_size(st['kv_budget_bytes'])} budget, "
        f"{human_size(st['kv_swapped_bytes'])} swapped; prefix cache {human_size(st['prefix_cache_bytes'])}, "
        f"{st['prefix_hits']} hits",
        f"swaps: {st['swap_outs']} out, {st['swap_restores']} restored, {st['swap_recomputes']} recomputed"
        + (f", {st['swap_failures']} failed" if st.get("swap_failures") else "")
        + f"; model loads: {st['model_loads']}",
        *cli_service.budget_warnings(st),
        "",
    ]
    table = [COLUMNS, *app_rows(apps)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        cells = (
            c.rjust(w) if name in RIGHT else c.ljust(w)
            for c, w, name in zip(row, widths, COLUMNS, strict=True)
        )
        lines.append("  ".join(cells).rstrip())
    if not apps:
        lines.append("(no apps are using the model)")
    return lines


def cmd_top(args: argparse.Namespace) -> int:
    client = cli_service.service_for(args, required=True)
    assert client is not None
    with client:
        if args.once:
            st = client.status()
            print(json.dumps(st, sort_keys=True) if args.json else "\n".join(render(st)))  # one line a frame
            return 0
        return _watch(client, args.interval, args.json)


def _watch(client: Any, interval: float, as_json: bool) -> int:
    """Redraw every `interval` seconds until Ctrl-C: in place on a terminal, else frame after frame."""
    tty = sys.stdout.isatty() and not as_json
    first = True
    try:
        while True:
            try:
                st = client.status()
            except ServiceError as e:  # cli.main turns it into one line and exit 1
                gone = e.name.endswith((".ServiceUnknown", ".NameHasNoOwner", ".NoReply", ".Disconnected"))
                raise ServiceError(e.name, "llmosd went away" if gone else e.message) from None
            except OSError as e:  # the bus itself went away (dbus-daemon stopped or restarted)
                logging.getLogger("asyncio").disabled = True  # dbus-fast's orphaned write futures: noise
                raise ServiceError("org.freedesktop.DBus.Error.Disconnected", f"lost the bus: {e}") from None
            if as_json:
                frame = json.dumps(st, sort_keys=True) + "\n"
            elif tty:
                cols = shutil.get_terminal_size().columns
                frame = CLEAR + "\n".join(line[:cols] for line in render(st)) + "\n"
            else:
                frame = ("" if first else "\n") + "\n".join(render(st)) + "\n"
            sys.stdout.write(frame)
            sys.stdout.flush()
            first = False
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return EXIT_INTERRUPTED  # Ctrl-C is how one leaves top: not an error, but still 130

"""Hostile inputs against llmosd on the default model: peak memory, another caller's worst wait, leaks.

    .venv/bin/python bench/reliability.py [--json FILE]

Starts llmosd on a private bus (2 threads, the default model, every finished turn swapped to disk),
then, while another client calls GetStatus back to back: 20 MiB and 10 MiB texts through every method
that takes text, then 600 KiB (under the size bound: tokenized, then refused). Reports the daemon's
peak RSS over its RSS before, its RSS afterwards, and the worst GetStatus round trip. Then 64 clients
are killed or dropped mid-stream or with parked sessions, and what they left behind is counted
(sessions, requests, fds, swap files). The same attacks are asserted in tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dbus_harness import Daemon, PrivateBus, client, wait_until  # noqa: E402

from llmos.default_model import default_gguf_path  # noqa: E402
from llmos.model_store import ModelStore  # noqa: E402

HOSTILE = ROOT / "tests" / "hostile_client.py"


def kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(field + ":"))


def hostile(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOSTILE), address, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def json_line(proc: subprocess.Popen[str]) -> dict:
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{proc.args} printed no JSON")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmos-reliability-"))
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf_path(), make_default=True)
    (tmp / "llmosd.toml").write_text(f'state_dir = "{tmp / "state"}"\n\n[arbiter]\nkv_budget_mib = 0\n')
    bus = PrivateBus(tmp)
    daemon = Daemon(bus.address, store, "--threads", "2", "--config", str(tmp / "llmosd.toml"))
    pid, figures = daemon.proc.pid, {}
    try:
        before = kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        watcher = hostile(bus.address, "stall")
        json_line(watcher)
        answers = {}
        for kib in ("20480", "10240", "600"):
            big = hostile(bus.address, "big", kib)
            answers[kib] = json_line(big)
            big.wait()
        assert watcher.stdin is not None
        watcher.stdin.close()
        stall = json_line(watcher)
        time.sleep(2)  # the heap is trimmed a second after a big message
        figures["amplification"] = {
            "rss_before_mb": before / 1024,
            "peak_growth_mb": (kb(pid, "VmHWM") - before) / 1024,
            "kept_after_mb": (kb(pid, "VmRSS") - before) / 1024,
            "getstatus_worst_ms": stall["worst_ms"],
            "getstatus_median_ms": stall["median_ms"],
            "getstatus_calls": stall["calls"],
            "slowest_refusal_s": max(
                a["seconds"] for kib in ("20480", "10240") for a in answers[kib].values()
            ),
        }

        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = kb(pid, "VmRSS")
        for mode, ending in (("turn", "kill"), ("stream", "kill"), ("turn", "drop"), ("stream", "drop")):
            churn = hostile(bus.address, "churn", "16", mode)
            json_line(churn)
            time.sleep(0.5)
            if ending == "kill":
                churn.kill()
            else:
                assert churn.stdin is not None
                churn.stdin.close()
            churn.wait()
        wait_until(lambda: client(bus.address, "status")["sessions"] == 0, 60)
        time.sleep(1)
        st = client(bus.address, "status")
        swap = [p for p in (tmp / "state" / "swap").rglob("*") if p.is_file()]
        figures["churn"] = {
            "clients": 64,
            "sessions_left": st["sessions"],
            "requests_left": st["active_requests"],
            "fds_growth": len(os.listdir(f"/proc/{pid}/fd")) - fds,
            "swap_files_left": len(swap),
            "rss_growth_mb": (kb(pid, "VmRSS") - rss) / 1024,
        }
    finally:
        daemon.stop()
        bus.stop()
    for part, values in figures.items():
        print(part)
        for k, v in values.items():
            print(f"  {k:22} {v:.1f}" if isinstance(v, float) else f"  {k:22} {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

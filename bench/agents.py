"""Tool use on the default model, through D-Bus: 50 cases in the style of BFCL's simple and multiple
categories (a user request, the tools offered, the expected call), with and without constrained
decoding, in one run.

    .venv/bin/python bench/agents.py [--json out.json] [--modes constrained,open,unconstrained]
                                     [--max-tokens 400]

Modes: `constrained` offers the tools as written here (closed objects, bounded strings and numbers);
`open` offers the same tools written the way typical authors write them (no `additionalProperties`,
no `maxLength`, no numeric bounds), constrained; `open-sampled` is `open` at temperature 0.9 (case i
with seed i); `unconstrained` is the first with constrained decoding switched off. All greedy but
`open-sampled`. Per mode: valid-call rate (the first step is a call of an offered tool with
arguments valid against its schema as written), exact tool choice rate, argument accuracy (every
expected argument present with the expected value; strings compared case-insensitively, trimmed),
calls with invented keys (any step's call whose arguments hold a key its tool does not declare), failed
runs, and per-step latency (Run call to each Step signal, as the app sees it). The app registers exactly
the case's tools and runs with `tool_choice = required`, so the first step must be a call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import jsonschema  # noqa: E402
from dbus_harness import Daemon, PrivateBus, client  # noqa: E402

from llmos.default_model import default_gguf_path  # noqa: E402
from llmos.model_store import ModelStore  # noqa: E402


def tool(tool_name: str, description: str, **props: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": tool_name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        },
    }


S = {"type": "string", "maxLength": 60}
I = {"type": "integer", "minimum": 0, "maximum": 100000}  # noqa: E741
WEATHER = tool("get_weather", "Current weather for a city.", city=S)
CURRENCY = tool("convert_currency", "Convert money.", amount=I, from_currency=S, to_currency=S)
TIMER = tool("set_timer", "Start a countdown timer.", minutes=I)
MESSAGE = tool("send_message", "Send a text message to a contact.", to=S, text=S)
FILES = tool("search_files", "Search the user's files.", query=S)
MUSIC = tool("play_music", "Play songs by an artist.", artist=S)
TRANSLATE = tool("translate", "Translate text into a language.", text=S, language=S)
STOCK = tool("get_stock_price", "Latest price of a stock by ticker symbol.", symbol=S)
ALARM = tool(
    "set_alarm",
    "Set an alarm at an hour of the day (0-23).",
    hour={"type": "integer", "minimum": 0, "maximum": 23},
)
CALL = tool("call_contact", "Start a phone call.", name=S)
ALL = [WEATHER, CURRENCY, TIMER, MESSAGE, FILES, MUSIC, TRANSLATE, STOCK, ALARM, CALL]


def opened(spec: dict[str, Any]) -> dict[str, Any]:
    """The same tool as a typical author writes it: types and required names only, nothing closed or
    bounded."""
    props = {k: {"type": v["type"]} for k, v in spec["parameters"]["properties"].items()}
    params = {"type": "object", "properties": props, "required": spec["parameters"]["required"]}
    return {**spec, "parameters": params}


# (request, expected tool, expected arguments)
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("What's the weather in Paris?", WEATHER, {"city": "Paris"}),
    ("Is it raining in London right now?", WEATHER, {"city": "London"}),
    ("Weather for Tokyo please.", WEATHER, {"city": "Tokyo"}),
    ("How warm is it in Madrid today?", WEATHER, {"city": "Madrid"}),
    ("Tell me the weather in Berlin.", WEATHER, {"city": "Berlin"}),
    ("Convert 100 USD to EUR.", CURRENCY, {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}),
    ("How much is 50 GBP in USD?", CURRENCY, {"amount": 50, "from_currency": "GBP", "to_currency": "USD"}),
    ("Change 20 EUR into JPY.", CURRENCY, {"amount": 20, "from_currency": "EUR", "to_currency": "JPY"}),
    ("Set a timer for 10 minutes.", TIMER, {"minutes": 10}),
    ("Start a 5 minute timer.", TIMER, {"minutes": 5}),
    ("Timer, 25 minutes.", TIMER, {"minutes": 25}),
    ("Countdown of 3 minutes please.", TIMER, {"minutes": 3}),
    ("Text Alice that I am late.", MESSAGE, {"to": "Alice", "text": "I am late"}),
    ("Send Bob a message saying hello.", MESSAGE, {"to": "Bob", "text": "hello"}),
    ("Message Carol: see you tomorrow.", MESSAGE, {"to": "Carol", "text": "see you tomorrow"}),
    ("Find my files about taxes.", FILES, {"query": "taxes"}),
    ("Search my documents for invoice.", FILES, {"query": "invoice"}),
    ("Look for files named report.", FILES, {"query": "report"}),
    ("Play some Beatles.", MUSIC, {"artist": "Beatles"}),
    ("Put on music by Adele.", MUSIC, {"artist": "Adele"}),
    ("I want to listen to Mozart.", MUSIC, {"artist": "Mozart"}),
    ("Translate hello into French.", TRANSLATE, {"text": "hello", "language": "French"}),
    ("How do you say thank you in Spanish?", TRANSLATE, {"text": "thank you", "language": "Spanish"}),
    ("Translate good morning to German.", TRANSLATE, {"text": "good morning", "language": "German"}),
    ("What is Apple's stock price? The ticker is AAPL.", STOCK, {"symbol": "AAPL"}),
    ("Price of MSFT shares?", STOCK, {"symbol": "MSFT"}),
    ("How is TSLA trading?", STOCK, {"symbol": "TSLA"}),
    ("Wake me up at 7.", ALARM, {"hour": 7}),
    ("Set an alarm for 6 o'clock.", ALARM, {"hour": 6}),
    ("Alarm at 22 please.", ALARM, {"hour": 22}),
    ("Call Mom.", CALL, {"name": "Mom"}),
    ("Phone David.", CALL, {"name": "David"}),
    ("Ring Sarah for me.", CALL, {"name": "Sarah"}),
]
# the "simple" category: each request with only its own tool; "multiple": with 3 others besides
SIMPLE = [(req, [t], t, args) for req, t, args in CASES[:17]]
MULTIPLE = []
for k, (req, t, args) in enumerate(CASES):
    others = [o for o in ALL if o is not t]
    offered = [others[(k + j) % len(others)] for j in range(3)]
    offered.insert(k % 4, t)
    MULTIPLE.append((req, offered, t, args))
EVAL = SIMPLE + MULTIPLE  # 17 + 33 = 50
# mode: (open schemas, constrained, Run options besides the bench's own)
MODES: dict[str, tuple[bool, str, dict[str, Any]]] = {
    "constrained": (False, "1", {}),
    "open": (True, "1", {}),
    "open-sampled": (True, "1", {"temperature": 0.9}),
    "unconstrained": (False, "0", {}),
}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and got.strip().lower() == want.lower()
    return got == want


def invented(steps: list[dict[str, Any]], offered: list[dict[str, Any]]) -> int:
    """Calls in a run whose arguments hold a key their tool does not declare."""
    declared = {t["name"]: set(t["parameters"].get("properties", {})) for t in offered}
    return sum(
        1 for s in steps if s.get("tool") in declared and set(s.get("arguments") or {}) - declared[s["tool"]]
    )


def score(runs: list[dict[str, Any]], open_schemas: bool = False) -> dict[str, Any]:
    valid = choice = args_ok = invented_calls = calls = 0
    firsts, seconds = [], []
    for (_req, offered, want_tool, want_args), run in zip(EVAL, runs, strict=True):
        offered = [opened(t) for t in offered] if open_schemas else offered
        steps = run["steps"]
        calls += sum(1 for s in steps if s.get("tool"))
        invented_calls += invented(steps, offered)
        first = steps[0] if steps else {}
        spec = next((t for t in offered if t["name"] == first.get("tool")), None)
        if spec is not None:
            try:
                jsonschema.validate(first.get("arguments"), spec["parameters"])
                valid += 1
            except jsonschema.ValidationError:
                pass
        if first.get("tool") == want_tool["name"]:
            choice += 1
            got = first.get("arguments") or {}
            args_ok += all(same(got.get(k), v) for k, v in want_args.items())
        if run["step_s"]:
            firsts.append(run["step_s"][0])
        if len(run["step_s"]) > 1:
            seconds.append(run["step_s"][1] - run["step_s"][0])
    n = len(runs)
    return {
        "cases": n,
        "valid_call_rate": valid / n,
        "exact_tool_choice_rate": choice / n,
        "argument_accuracy": args_ok / n,
        "calls": calls,
        "calls_with_invented_keys": invented_calls,
        "first_step_s_median": statistics.median(firsts) if firsts else None,
        "answer_step_s_median": statistics.median(seconds) if seconds else None,
        "failed_runs": sum(1 for r in runs if r["code"] != 0),
        "failures": sorted({r["result"].get("error_message", "") for r in runs if r["code"] != 0}),
    }


def secs(v: float | None) -> str:
    return f"{v:.2f} s" if v is not None else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--max-tokens", type=int, default=400, help="per step (the Run option)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="llmos-agents-"))
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf_path(), make_default=True)
    bus = PrivateBus(tmp)
    # each case offers its own tools only: no system tools beside them
    (tmp / "llmosd.toml").write_text(f'state_dir = "{tmp / "state"}"\n[apps.default]\nsystem_tools = []\n')
    daemon = Daemon(bus.address, store, "--config", str(tmp / "llmosd.toml"), "--threads", "2")
    res: dict[str, Any] = {}
    try:
        for mode in modes:
            open_schemas, flag, options = MODES[mode]
            cases = [
                {"request": req, "tools": [opened(t) for t in offered] if open_schemas else offered}
                for req, offered, _t, _a in EVAL
            ]
            (tmp / "cases.json").write_text(json.dumps(cases))
            runs = client(
                bus.address,
                "agent-eval",
                str(tmp / "cases.json"),
                flag,
                str(args.max_tokens),
                json.dumps(options),
                timeout=3600,
            )["runs"]
            res[mode] = score(runs, open_schemas)
            print(mode, json.dumps(res[mode]), flush=True)
    finally:
        daemon.stop()
        bus.stop()
    print(f"\nTool use, default model, 50 cases (17 simple, 33 multiple), {args.max_tokens} tokens a step:")
    for mode, r in res.items():
        print(
            f"  {mode:13s} valid calls {r['valid_call_rate']:.0%}, "
            f"exact tool {r['exact_tool_choice_rate']:.0%}, "
            f"arguments {r['argument_accuracy']:.0%}, "
            f"invented keys {r['calls_with_invented_keys']}/{r['calls']} calls, "
            f"first step {secs(r['first_step_s_median'])}, "
            f"answer step {secs(r['answer_step_s_median'])}, runs failed {r['failed_runs']}"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tool use as third parties write tools, through D-Bus on the default model (issue 12's honest suite).

    .venv/bin/python bench/agent_suite.py [--suites multiapp-required,multiapp-auto,single-required]
                                          [--limit N] [--max-tokens 128] [--json out.json]

`bench/agents.py` measures friendly cases (one to four closed, bounded tools). This suite is what an
app author sees:

- multiapp: 14 tools of 7 everyday apps registered at once (`data/multiapp_tools.json`: open objects,
  no `maxLength`, descriptions of uneven quality) and 129 requests (`data/multiapp_cases.json`), times,
  names and titles said in several ways, 25 of them best answered without a tool. `-required` runs the
  104 tool cases with `tool_choice = required`, `-auto` all 129 with `auto`.
- single: 105 BFCL-style single-function cases (`data/single_function_cases.json`, written for llmos),
  scored with BFCL's AST rules (name; required parameters present; no unknown parameter; types, an
  integer passing for a number; each value among the accepted ones, strings compared as BFCL does:
  lower case, without spaces and `,./-_*^`).

Per suite: valid call (the first step calls an offered tool with arguments valid against the schema
as written), right tool, right arguments (every stated argument accepted; for single, the AST check),
the call-or-answer decision (auto), failed runs, duplicate side effects (a tool with side effects called
twice in one run), calls with an undeclared key, and the first step's latency (Run call to its Step
signal), median. One app registers all the tools; runs are greedy, `max_steps = 3`.
"""

from __future__ import annotations

import argparse
import json
import re
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

DATA = HERE / "data"
READ_ONLY = {"get_weather", "lookup_contact", "search_files"}  # no side effects: a repeat costs nothing
SUITES = ("multiapp-required", "multiapp-auto", "single-required", "single-auto")


def load_suite(name: str, limit: int | None) -> list[dict[str, Any]]:
    """Cases as {request, tools, want_tool, want_args, choice}."""
    kind, choice = name.split("-")
    out = []
    if kind == "multiapp":
        tools = json.loads((DATA / "multiapp_tools.json").read_text())["tools"]
        for req, want, args in json.loads((DATA / "multiapp_cases.json").read_text())["cases"]:
            if choice == "required" and want is None:
                continue
            out.append(
                {"request": req, "tools": tools, "want_tool": want, "want_args": args, "choice": choice}
            )
    else:
        data = json.loads((DATA / "single_function_cases.json").read_text())
        for fn, req, args in data["cases"]:
            spec = {"name": fn, **data["functions"][fn]}
            out.append(
                {"request": req, "tools": [spec], "want_tool": fn, "want_args": args, "choice": choice}
            )
    return out[:limit] if limit else out


def bfcl_text(v: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", v.lower()).rstrip("!?'\"")


def value_ok(got: Any, accepted: list[Any]) -> bool:
    for want in accepted:
        if isinstance(want, str) and isinstance(got, str) and bfcl_text(got) == bfcl_text(want):
            return True
        same_list = isinstance(want, list) and isinstance(got, list) and len(got) == len(want)
        if same_list and all(value_ok(g, [w]) for g, w in zip(got, want, strict=True)):
            return True
        if isinstance(want, bool) or isinstance(got, bool):
            if got is want:
                return True
        elif isinstance(want, int | float) and isinstance(got, int | float) and float(got) == float(want):
            return True
    return False


def type_ok(value: Any, schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    py = {"string": str, "boolean": bool, "array": list, "object": dict}.get(t)
    return py is None or isinstance(value, py)


def ast_ok(case: dict[str, Any], step: dict[str, Any]) -> bool:
    """BFCL's AST check of one call against the case's function and accepted values."""
    spec = case["tools"][0]
    if step.get("tool") != spec["name"]:
        return False
    got = step.get("arguments") or {}
    props = spec["parameters"].get("properties", {})
    if any(k not in got for k in spec["parameters"].get("required", [])) or set(got) - set(props):
        return False
    for name, accepted in case["want_args"].items():
        if name not in got:
            if "" not in accepted:
                return False
            continue
        if not type_ok(got[name], props[name]) or not value_ok(got[name], [a for a in accepted if a != ""]):
            return False
    return True


def args_ok(case: dict[str, Any], step: dict[str, Any]) -> bool:
    got = step.get("arguments") or {}
    return all(k in got and value_ok(got[k], v) for k, v in case["want_args"].items())


def score(cases: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    n_call = sum(1 for c in cases if c["want_tool"])
    valid = tool_ok = arg_ok = decided = dup_runs = invented = 0
    firsts, failures, wrong = [], [], []
    for case, run in zip(cases, runs, strict=True):
        steps = run["steps"]
        first = steps[0] if steps else {}
        declared = {t["name"]: t for t in case["tools"]}
        spec = declared.get(first.get("tool"))
        if spec is not None:
            try:
                jsonschema.validate(first.get("arguments"), spec["parameters"])
                valid += 1
            except jsonschema.ValidationError:
                pass
        called = [s["tool"] for s in steps if s.get("tool") and "partial" not in s]
        invented += sum(
            1
            for s in steps
            if s.get("tool") in declared
            and set(s.get("arguments") or {}) - set(declared[s["tool"]]["parameters"].get("properties", {}))
        )
        effects = [t for t in called if t not in READ_ONLY]
        dup_runs += len(effects) != len(set(effects))
        is_call = first.get("tool") is not None
        decided += is_call == (case["want_tool"] is not None)
        if case["want_tool"] and first.get("tool") == case["want_tool"]:
            tool_ok += 1
            single = len(case["tools"]) == 1
            good = ast_ok(case, first) if single else args_ok(case, first)
            arg_ok += good
            if not good:
                wrong.append([case["request"], first.get("arguments")])
        if run["step_s"]:
            firsts.append(run["step_s"][0])
        if run["code"] != 0:
            failures.append(run["result"].get("error_message", ""))
    return {
        "cases": len(cases),
        "call_cases": n_call,
        "valid_call": valid / max(1, n_call),
        "right_tool": tool_ok / max(1, n_call),
        "right_args": arg_ok / max(1, n_call),
        "decision": decided / len(cases),
        "failed_runs": len(failures),
        "failures": sorted(set(failures))[:10],
        "duplicate_side_effect_runs": dup_runs,
        "calls_with_undeclared_keys": invented,
        "first_step_s_median": statistics.median(firsts) if firsts else None,
        "wrong_args_examples": wrong[:8],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default="multiapp-required,multiapp-auto,single-required")
    ap.add_argument("--limit", type=int, default=None, help="the first N cases of each suite")
    ap.add_argument("--max-tokens", type=int, default=128, help="per step (the Run option)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    suites = args.suites.split(",")
    if unknown := set(suites) - set(SUITES):
        ap.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="llmos-agent-suite-"))
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf_path(), make_default=True)
    bus = PrivateBus(tmp)
    (tmp / "llmosd.toml").write_text(f'state_dir = "{tmp / "state"}"\n[apps.default]\nsystem_tools = []\n')
    daemon = Daemon(bus.address, store, "--config", str(tmp / "llmosd.toml"), "--threads", "2")
    res: dict[str, Any] = {}
    try:
        for suite in suites:
            cases = load_suite(suite, args.limit)
            (tmp / "cases.json").write_text(
                json.dumps([{"request": c["request"], "tools": c["tools"]} for c in cases])
            )
            options = {"tool_choice": cases[0]["choice"], "max_steps": 3}
            runs = client(
                bus.address,
                "agent-eval",
                str(tmp / "cases.json"),
                "1",
                str(args.max_tokens),
                json.dumps(options),
                timeout=7200,
            )["runs"]
            res[suite] = score(cases, runs)
            res[suite]["runs"] = runs
            print(suite, json.dumps({k: v for k, v in res[suite].items() if k != "runs"}), flush=True)
    finally:
        daemon.stop()
        bus.stop()
    print(f"\nAgent suite, default model, {args.max_tokens} tokens a step:")
    for suite, r in res.items():
        first = f"{r['first_step_s_median']:.2f} s" if r["first_step_s_median"] is not None else "n/a"
        print(
            f"  {suite:18s} valid {r['valid_call']:.1%}  tool {r['right_tool']:.1%}  "
            f"args {r['right_args']:.1%}  decision {r['decision']:.1%}  failed {r['failed_runs']}  "
            f"duplicates {r['duplicate_side_effect_runs']}  "
            f"undeclared keys {r['calls_with_undeclared_keys']}  first step {first}"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llmosctl's agent commands: `agents`, `tools`, `run`, `schedule` and `jobs`, through llmosd's
org.llmos.Agent1 object.

An *agent* is a way of pursuing a goal with the model: the built-in `assistant` plans over the tools it may
use, `summarizer` summarizes its input; plugins can add more. `run` starts one now and shows its steps as
they arrive; `schedule` has the daemon run one later or repeatedly (cron, every N seconds, or once at a
time), and `jobs` lists those jobs, shows their results and cancels them. Jobs belong to the app that
scheduled them: to the daemon, every llmosctl started by the same Python interpreter is the same app.

These commands always talk to llmosd (same `--address` / `--session-bus` / `--system-bus` choice as
`status`); there is no in-process fallback. Errors end as one `llmosctl: error:` line via cli.main: 2 for
a bad request (an unknown agent or job, a malformed trigger), 1 otherwise, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from dbus_fast import Message, MessageType, Variant

from llmos.errors import LlmosError
from system_services import cli_service
from system_services.bus_driver import driver_call
from system_services.client import AsyncLLMClient, LLMClient, ServiceError

PROG = "llmosctl"
AGENT_PATH, AGENT_IFACE, TASK_IFACE = "/org/llmos/Agent1", "org.llmos.Agent1", "org.llmos.Task1"
DEFAULT_AGENT = "assistant"
RESULT_OK, RESULT_CANCELLED = 0, 1
RESULT_UNKNOWN = -1  # stopped waiting for a cancelled run's Result
EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143
CANCEL_WAIT_S = 10.0  # after Ctrl-C, how long to wait for the daemon to confirm the cancellation
STEP_CHARS = 300  # a readable step line shows this much of a text, arguments or an observation
EXCERPT_CHARS = 40  # the answer excerpt in the `jobs` table
U32_MAX = 2**32 - 1
GONE, GIVE_UP = "gone", "give up"  # run_task's events besides the task's own signals
# llmosd leaving the bus, so a run whose daemon died ends instead of waiting for ever
OWNER_WATCH = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{cli_service.BUS_NAME}'"
)


class AgentCommandError(LlmosError):
    """A request these commands cannot make (e.g. --local: agents only run inside llmosd)."""

    dbus_name = "InvalidArgument"


# -- talking to llmosd ---------------------------------------------------------------------------------------
class AgentService:
    """Blocking calls to org.llmos.Agent1 on a connected LLMClient's bus and event loop."""

    def __init__(self, client: LLMClient) -> None:
        self._client = client
        self.inner: AsyncLLMClient = client.aio

    def run(self, coro: Any) -> Any:
        return self._client.run_coroutine(coro)

    def call(self, member: str, sig: str = "", body: list[Any] | None = None) -> Any:
        return self.run(self.inner.call(AGENT_PATH, AGENT_IFACE, member, sig, body))

    def call_json(self, member: str, sig: str = "", body: list[Any] | None = None) -> Any:
        (text,) = self.call(member, sig, body)
        return json.loads(text)


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[AgentService]:
    client = cli_service.service_for(args, required=True)
    assert client is not None
    with client:
        yield AgentService(client)


# -- small helpers -------------------------------------------------------------------------------------------
def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters: whitespace runs collapsed, control characters
    (a terminal escape in a model's or a tool's output) blanked, an ellipsis where it was cut."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _count(text: str) -> int:
    """argparse type: a whole number from 1 to 2^32-1 (a D-Bus u)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= v <= U32_MAX:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return v


def _local_time(iso: str | None) -> str:
    """An ISO 8601 time from the daemon as local time to the second; "-" for none."""
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]


def _read_text(arg: str) -> str:
    """A positional text argument, or stdin for `-` (one trailing newline dropped)."""
    text = sys.stdin.read() if arg == "-" else arg
    return text[:-1] if text.endswith("\n") else text


def run_options(args: argparse.Namespace) -> dict[str, Variant]:
    """The a{sv} options shared by Run and Schedule, from the command line."""
    typed = {
        "max_steps": ("u", args.max_steps),
        "tool_choice": ("s", args.tool_choice),
        "temperature": ("d", args.temperature),
        "max_tokens": ("u", args.max_tokens),
        "seed": ("t", args.seed),
        "system_tools": ("as", [] if args.no_system_tools else None),
    }
    return {k: Variant(sig, v) for k, (sig, v) in typed.items() if v is not None}


# -- agents --------------------------------------------------------------------------------------------------
def _tools_cell(tools: list[str] | None, custom_steps: bool) -> str:
    if tools is None:
        cell = "any you may use"
    elif not tools:
        cell = "none"
    else:
        cell = ", ".join(tools)
    return cell + (" (custom steps)" if custom_steps else "")


def cmd_agents(args: argparse.Namespace) -> int:
    with connected(args) as svc:
        listed = svc.call_json("ListAgents")
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [
        (a["name"], a["source"], _tools_cell(a.get("tools"), a.get("custom_steps", False)), a["description"])
        for a in listed["agents"]
    ]
    print("\n".join(_table(("NAME", "SOURCE", "TOOLS", "DESCRIPTION"), rows)))
    for p in listed.get("problems", []):
        _warn(f"agent plugin {p['entry_point']} ({p['source']}) was left out: {p['error']}")
    return 0


# -- tools ---------------------------------------------------------------------------------------------------
def _tool_kind(tool: dict[str, Any]) -> str:
    if tool.get("system"):
        return "system"
    return "yours" if tool.get("own") else f"shared by {tool.get('app') or 'an app'}"


def _tool_state(tool: dict[str, Any]) -> str:
    if tool.get("system") and not tool.get("available", True):
        return "unavailable"
    return "asks approval" if tool.get("confirm") else "available"


def cmd_tools(args: argparse.Namespace) -> int:
    with connected(args) as svc:
        listed = svc.call_json("ListTools")
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed:
        _note(
            "no tools: no app has shared any, and llmosd's policy gives this app no system tools; "
            "agents that need none (such as summarizer) still run"
        )
        return 0
    rows = [(t["name"], _tool_kind(t), _tool_state(t), t.get("description", "")) for t in listed]
    print("\n".join(_table(("NAME", "FROM", "STATE", "DESCRIPTION"), rows)))
    for t in listed:
        if t.get("system") and not t.get("available", True):
            print(f"{t['name']} is unavailable: {t.get('unavailable') or 'no reason given'}")
    if any(t.get("confirm") for t in listed):
        _note(f"({PROG} run cannot approve tools that ask approval: a run is refused their use)")
    return 0


# -- run -----------------------------------------------------------------------------------------------------
def describe_step(step: dict[str, Any]) -> str:
    """A step as one readable line, e.g. `step 1: calls get_weather {"city": "Oslo"} → {"temp": 21}`."""
    n = step.get("step", "?")
    if "partial" in step:  # a call cut short: never made
        return f"step {n}: call of {step.get('tool') or 'a tool'} cut short, not made: " + one_line(
            str(step["partial"]), STEP_CHARS
        )
    if "tool" in step:
        args = one_line(_compact(step.get("arguments", {})), STEP_CHARS)
        seen = one_line(_compact(step.get("observation")), STEP_CHARS)
        return f"step {n}: calls {step['tool']} {args} → {seen}"
    if "answer" in step:
        return f"step {n}: answers"
    return f"step {n}: {one_line(str(step.get('text') or ''), STEP_CHARS)}"


def task_path(unique_name: str, token: str) -> str:
    """Where llmosd puts a run started with `token` by the connection `unique_name` (org.llmos.Task1)."""
    return f"{AGENT_PATH}/task/{unique_name.lstrip(':').replace('.', '_')}/{token}"


async def run_task(
    agent: AsyncLLMClient,
    goal: str,
    options: dict[str, Variant],
    on_step: Callable[[dict[str, Any]], None],
    on_text: Callable[[int, str], None] | None = None,
) -> tuple[int, dict[str, Any], int | None]:
    """Start a run and follow it to its Result: (code, results, exit status if a signal stopped it);
    the code is RESULT_UNKNOWN if the daemon did not confirm a cancellation in time.

    The Step and Result signals are unicast to this connection on the task's path, which the handle token
    fixes in advance, so the handler is in place before Run is called and no step is missed. Ctrl-C (or
    SIGTERM) calls Task1.Cancel and waits up to CANCEL_WAIT_S for the cancelled Result; a second one stops
    waiting (leaving the bus cancels the run too). llmosd or the bus going away is a ServiceError.
    """
    bus, loop = agent.bus, asyncio.get_running_loop()
    token = f"cli_{secrets.token_hex(6)}"
    path = task_path(bus.unique_name, token)
    events: asyncio.Queue[Message | str] = asyncio.Queue()  # the task's signals, or GONE / GIVE_UP
    stopped_by: list[int] = []
    started = asyncio.Event()
    cancels: list[asyncio.Task[None]] = []

    def on_message(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        if msg.path == path and msg.interface == TASK_IFACE:
            events.put_nowait(msg)
        elif (
            msg.sender == "org.freedesktop.DBus"
            and msg.member == "NameOwnerChanged"
            and msg.body[0] == cli_service.BUS_NAME
            and not msg.body[2]
        ):
            events.put_nowait(GONE)
        return None

    async def cancel() -> None:
        await started.wait()
        with contextlib.suppress(ServiceError):  # already finished: nothing to cancel
            await agent.call(path, TASK_IFACE, "Cancel")

    def on_signal(status: int) -> None:
        if stopped_by:
            events.put_nowait(GIVE_UP)  # a second Ctrl-C: stop waiting for the daemon
            return
        stopped_by.append(status)
        cancels.append(loop.create_task(cancel()))

    def on_disconnect(t: asyncio.Future[None]) -> None:
        if not t.cancelled():
            t.exception()  # retrieved: the bus going away is reported as GONE
            events.put_nowait(GONE)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    bus.add_message_handler(on_message)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    disconnected.add_done_callback(on_disconnect)
    loop.add_signal_handler(signal.SIGINT, on_signal, EXIT_INTERRUPTED)
    loop.add_signal_handler(signal.SIGTERM, on_signal, EXIT_TERMINATED)
    try:
        await _add_match(agent, OWNER_WATCH)
        opts = {**options, "handle_token": Variant("s", token)}
        reply = await agent.call_reply(AGENT_PATH, AGENT_IFACE, "Run", "sa{sv}", [goal, opts])
        started.set()
        while True:
            try:
                event = await asyncio.wait_for(events.get(), CANCEL_WAIT_S if stopped_by else None)
            except TimeoutError:
                event = GIVE_UP
            if event == GIVE_UP:  # how the run ended is unknown
                return RESULT_UNKNOWN, {}, stopped_by[0]
            if event == GONE:
                raise ServiceError(
                    "org.freedesktop.DBus.Error.Disconnected", "llmosd went away during the run"
                )
            assert isinstance(event, Message)
            if event.sender != reply.sender:  # only llmosd's own signals: any connection may send one
                continue
            if event.member == "Step":
                on_step(json.loads(event.body[0]))
            elif event.member == "StepText" and on_text is not None:
                on_text(int(event.body[0]), str(event.body[1]))
            elif event.member == "Result":
                code, results = event.body
                return code, {k: v.value for k, v in results.items()}, (stopped_by or [None])[0]
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)
        disconnected.remove_done_callback(on_disconnect)
        disconnected.cancel()
        bus.remove_message_handler(on_message)
        for task in cancels:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _add_match(agent: AsyncLLMClient, rule: str) -> None:
    msg = driver_call("AddMatch", "s", [rule])
    try:
        reply = await agent.bus.call(msg)
    except (OSError, EOFError) as e:
        raise ServiceError("org.freedesktop.DBus.Error.Disconnected", f"lost the bus: {e}") from None
    if reply is not None and reply.message_type == MessageType.ERROR:
        raise ServiceError(reply.error_name or "unknown", reply.body[0] if reply.body else "")


def cmd_run(args: argparse.Namespace) -> int:
    goal = _read_text(args.goal)
    options = {"agent": Variant("s", args.agent), **run_options(args)}

    streamed: list[str] = []  # the answer text as it arrives (Task1.StepText), written to stdout at once

    def on_text(_step: int, delta: str) -> None:
        streamed.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    def on_step(step: dict[str, Any]) -> None:
        if args.json:
            print(_compact(step), flush=True)
            return
        if streamed and not "".join(streamed).endswith("\n"):
            sys.stdout.write("\n")  # end the streamed line before the step's note
            sys.stdout.flush()
        _note(describe_step(step))

    with connected(args) as svc:
        code, results, stopped = svc.run(
            run_task(svc.inner, goal, options, on_step, None if args.json else on_text)
        )
    if args.json and code != RESULT_UNKNOWN:
        print(_compact({"code": code, **results}), flush=True)
    if stopped is not None:
        how = "interrupted" if stopped == EXIT_INTERRUPTED else "terminated"
        _error(f"{how}: the run was cancelled" if code == RESULT_CANCELLED else how)
        return stopped
    if code == RESULT_OK:
        answer = results.get("answer", "")
        if not args.json and "".join(streamed).strip() != answer.strip():  # not already on the screen
            sys.stdout.write(answer if answer.endswith("\n") else answer + "\n")
            sys.stdout.flush()
        return 0
    why = results.get("error_message") or ("cancelled" if code == RESULT_CANCELLED else "the run failed")
    _error(f"the run {'was cancelled' if code == RESULT_CANCELLED else 'failed'}: {why}")
    return EXIT_FAILURE


# -- schedule ------------------------------------------------------------------------------------------------
def describe_trigger(trigger: dict[str, Any]) -> str:
    """`every 60 s`, `cron 0 8 * * *`, `at 2026-11-22 08:00:00`, with its time zone if one was given."""
    if "interval" in trigger:
        text = f"every {trigger['interval']} s"
    elif "cron" in trigger:
        text = f"cron {trigger['cron']}"
    elif "date" in trigger:
        text = f"at {_local_time(trigger['date'])}"
    else:
        text = _compact(trigger)
    return text + (f" ({trigger['timezone']})" if trigger.get("timezone") else "")


def cmd_schedule(args: argparse.Namespace) -> int:
    text = _read_text(args.input)
    if args.cron is not None:
        trigger = {"cron": Variant("s", args.cron)}
    elif args.every is not None:
        trigger = {"interval": Variant("u", args.every)}
    else:
        trigger = {"date": Variant("s", args.at)}
    if args.timezone:
        trigger["timezone"] = Variant("s", args.timezone)
    with connected(args) as svc:
        (job_id,) = svc.call("Schedule", "ssa{sv}a{sv}", [args.agent, text, trigger, run_options(args)])
        job = next((j for j in svc.call_json("ListJobs") if j["id"] == job_id), None)
    print(job_id, flush=True)
    if job is not None:
        when = describe_trigger(job["trigger"])
        _note(f"scheduled {job['agent']} {when}; next run {_local_time(job['next_run'])}")
    return 0


# -- jobs ----------------------------------------------------------------------------------------------------
def describe_last(last: dict[str, Any] | None) -> str:
    if not last:
        return "-"
    if last.get("code") == RESULT_OK:
        return f"0 {one_line(last.get('answer', ''), EXCERPT_CHARS)}"
    return f"{last.get('code')} {one_line(last.get('error_message', ''), EXCERPT_CHARS)}"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with connected(args) as svc:
        jobs = svc.call_json("ListJobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        _note(f"no scheduled jobs; `{PROG} schedule` adds one")
        return 0
    rows = [
        (
            j["id"],
            j["agent"],
            describe_trigger(j["trigger"]),
            _local_time(j["next_run"]),
            describe_last(j["last"]),
        )
        for j in jobs
    ]
    print("\n".join(_table(("ID", "AGENT", "TRIGGER", "NEXT RUN", "LAST (CODE ANSWER)"), rows)))
    return 0


def cmd_jobs_results(args: argparse.Namespace) -> int:
    with connected(args) as svc:
        results = svc.call_json("GetJobResults", "s", [args.job_id])
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if not results:
        _note(f"job {args.job_id} has not run yet")
        return 0
    for i, r in enumerate(results):
        code = r.get("code")
        how = {RESULT_OK: "ok", RESULT_CANCELLED: "cancelled"}.get(code, "failed")
        print(
            ("" if i == 0 else "\n")
            + f"{_local_time(r.get('ran_at'))}  code {code} ({how}), {r.get('steps', 0)} steps"
        )
        if code == RESULT_OK:
            print("\n".join(f"  {line}" for line in (r.get("answer") or "").splitlines() or [""]))
        else:
            print(f"  {r.get('error_name', '?')}: {one_line(r.get('error_message', ''), 10_000)}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with connected(args) as svc:
        svc.call("CancelJob", "s", [args.job_id])
    print(f"cancelled {args.job_id}")
    return 0


# -- argument parsing ----------------------------------------------------------------------------------------
def _run_options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--max-steps",
        type=_count,
        metavar="N",
        help="most steps (tool calls and answer) a run may take, 1-16",
    )
    p.add_argument(
        "--tool-choice",
        choices=("auto", "required", "none"),
        help="auto (the default): the model decides; required: the first step calls a tool; none: no tools",
    )
    p.add_argument("--temperature", "-t", type=float, metavar="T", help="0 is greedy (the default)")
    p.add_argument("--max-tokens", type=_count, metavar="N", help="most tokens the model writes in one step")
    p.add_argument("--seed", type=_seed, metavar="N", help="makes sampled output reproducible")
    p.add_argument(
        "--no-system-tools",
        action="store_true",
        help="offer none of llmosd's own tools (time, battery, notification), only apps' shared ones",
    )
    return p


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `agents`, `tools`, `run`, `schedule` and `jobs` on llmosctl's subcommands."""
    ag = sub.add_parser(
        "agents",
        help="list the agents llmosd offers (run or schedule them)",
        description="The agents llmosd offers, built-in and from plugins; broken plugins are warned about.",
    )
    cli_service.add_bus_options(ag)
    ag.add_argument("--json", action="store_true", help="machine-readable output")
    ag.set_defaults(func=cmd_agents, usage=ag.format_usage)

    tl = sub.add_parser(
        "tools",
        help="list the tools a run from llmosctl could use",
        description="The tools an agent run started here may call: tools other apps share, and llmosd's "
        "own system tools that its policy gives this app (with why one is unavailable now).",
    )
    cli_service.add_bus_options(tl)
    tl.add_argument("--json", action="store_true", help="machine-readable output")
    tl.set_defaults(func=cmd_tools, usage=tl.format_usage)

    opts = _run_options_parser()
    rn = sub.add_parser(
        "run",
        parents=[opts],
        help="run an agent on a goal now and show its steps",
        description="Run an agent on GOAL: each step is shown on stderr as it happens, the answer goes to "
        "stdout. Ctrl-C cancels the run. Example: llmosctl run --agent summarizer - < notes.txt",
    )
    cli_service.add_bus_options(rn)
    rn.add_argument(
        "--agent",
        default=DEFAULT_AGENT,
        metavar="NAME",
        help=f"which agent (default {DEFAULT_AGENT}; see `agents`)",
    )
    rn.add_argument(
        "--json", action="store_true", help="every step, then the result, as one JSON object a line on stdout"
    )
    rn.add_argument(
        "goal", metavar="GOAL", help="what to do (or the text to work on), or - to read it from stdin"
    )
    rn.set_defaults(func=cmd_run, usage=rn.format_usage)

    sc = sub.add_parser(
        "schedule",
        parents=[opts],
        help="have llmosd run an agent later or repeatedly",
        description="Have llmosd run an agent on INPUT when a trigger fires, in the background, also "
        "across restarts. Prints the job id; see `jobs` for its results. Example: "
        "llmosctl schedule --agent summarizer --cron '0 8 * * *' - < notes.txt",
    )
    cli_service.add_bus_options(sc)
    sc.add_argument("--agent", required=True, metavar="NAME", help="which agent (see `agents`)")
    when = sc.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron", metavar="EXPR", help="a crontab line's five time fields, e.g. '0 8 * * mon-fri'"
    )
    when.add_argument("--every", type=_count, metavar="SECONDS", help="run every SECONDS seconds")
    when.add_argument("--at", metavar="ISO8601", help="run once at this time, e.g. 2026-11-22T08:00:00")
    sc.add_argument(
        "--timezone", metavar="TZ", help="time zone of --cron and --at, e.g. Europe/Oslo (default: local)"
    )
    sc.add_argument(
        "input", metavar="INPUT", help="the goal or text for each run, or - to read it from stdin"
    )
    sc.set_defaults(func=cmd_schedule, usage=sc.format_usage)

    jb = sub.add_parser(
        "jobs",
        help="list, inspect and cancel scheduled agent runs",
        description="Without an action: list this app's scheduled jobs (id, agent, trigger, next run, "
        "last result).",
    )
    cli_service.add_bus_options(jb)
    jb.add_argument("--json", action="store_true", help="machine-readable output")
    jb.set_defaults(func=cmd_jobs_list, usage=jb.format_usage)
    jsub = jb.add_subparsers(dest="jobs_command", metavar="ACTION")
    # SUPPRESS: an option given before the action (`jobs --json results ID`) is not reset by the action's
    # own default.
    jl = jsub.add_parser("list", help="list the jobs (the default)", argument_default=argparse.SUPPRESS)
    cli_service.add_bus_options(jl)
    jl.add_argument("--json", action="store_true", help="machine-readable output")
    jl.set_defaults(func=cmd_jobs_list, usage=jl.format_usage)
    jr = jsub.add_parser(
        "results", help="the results of a job's last runs", argument_default=argparse.SUPPRESS
    )
    cli_service.add_bus_options(jr)
    jr.add_argument("--json", action="store_true", help="machine-readable output, with each run's steps")
    jr.add_argument("job_id", metavar="JOB_ID", help="as `schedule` printed it, or from `jobs`")
    jr.set_defaults(func=cmd_jobs_results, usage=jr.format_usage)
    jc = jsub.add_parser("cancel", help="remove a job and its results", argument_default=argparse.SUPPRESS)
    cli_service.add_bus_options(jc)
    jc.add_argument("job_id", metavar="JOB_ID", help="as `schedule` printed it, or from `jobs`")
    jc.set_defaults(func=cmd_jobs_cancel, usage=jc.format_usage)

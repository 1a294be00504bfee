"""An app process for the D-Bus tests: each subcommand talks to llmosd and prints one JSON line.

    python tests/bus_client.py ADDRESS COMMAND [ARGS...]

Run as its own process (never imported by pytest), so every test client is a real, separate app.
"""

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

NAME, PATH, LLM, SESSION, REQUEST = (
    "org.llmos.LLM1",
    "/org/llmos/LLM1",
    "org.llmos.LLM1",
    "org.llmos.Session1",
    "org.llmos.Request1",
)


def variants(opts: dict[str, Any]) -> dict[str, Variant]:
    out = {}
    for k, v in opts.items():
        sig = (
            "b"
            if isinstance(v, bool)
            else "u"
            if isinstance(v, int)
            else "d"
            if isinstance(v, float)
            else "s"
        )
        out[k] = Variant("as", v) if isinstance(v, list) else Variant(sig, v)
    return out


def plain(v: Any) -> Any:
    if isinstance(v, Variant):
        return plain(v.value)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


async def call(bus: MessageBus, path: str, iface: str, member: str, sig: str, body: list[Any]) -> Any:
    reply = await bus.call(
        Message(destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body)
    )
    if reply.message_type == MessageType.ERROR:
        raise CallError(reply.error_name or "?", reply.body[0] if reply.body else "")
    return reply.body


class CallError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


def say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def main(address: str, cmd: str, args: list[str]) -> None:
    bus = await MessageBus(bus_address=address).connect()
    try:
        await COMMANDS[cmd](bus, *args)
    except CallError as e:
        say({"error": e.name, "message": e.message})


async def generate(bus: MessageBus, prompt: str, opts: str = "{}") -> None:
    text, stats = await call(bus, PATH, LLM, "Generate", "sa{sv}", [prompt, variants(json.loads(opts))])
    say({"text": text, "stats": plain(stats)})


async def turns(bus: MessageBus, *prompts: str) -> None:
    """One session, several prompts: tokens_in of each turn shows the conversation is kept."""
    (session,) = await call(bus, PATH, LLM, "CreateSession", "a{sv}", [{}])
    out = []
    for p in prompts:
        text, stats = await call(bus, session, SESSION, "Prompt", "sa{sv}", [p, variants({"max_tokens": 8})])
        out.append({"text": text, "stats": plain(stats)})
    (clone,) = await call(bus, session, SESSION, "Clone", "", [])
    text, stats = await call(bus, clone, SESSION, "Prompt", "sa{sv}", ["again", variants({"max_tokens": 8})])
    say({"session": session, "turns": out, "clone": clone, "clone_turn": plain(stats)})


async def hold_session(bus: MessageBus) -> None:
    """Create a session, print its path, keep the connection until stdin closes."""
    (session,) = await call(bus, PATH, LLM, "CreateSession", "a{sv}", [{}])
    say({"session": session, "unique_name": bus.unique_name})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def poke(bus: MessageBus, session: str) -> None:
    """Try every Session1 method on someone else's session; report each error name."""
    results = {}
    for member, sig, body in (
        ("Prompt", "sa{sv}", ["hi", {}]),
        ("PromptStream", "sa{sv}", ["hi", {}]),
        ("Clone", "", []),
        ("Close", "", []),
    ):
        try:
            await call(bus, session, SESSION, member, sig, body)
            results[member] = "ok"
        except CallError as e:
            results[member] = e.name
    reply = await bus.call(
        Message(
            destination=NAME,
            path=session,
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=[SESSION, "TokensUsed"],
        )
    )
    results["Get TokensUsed"] = reply.error_name if reply.message_type == MessageType.ERROR else "ok"
    reply = await bus.call(
        Message(
            destination=NAME,
            path=PATH,
            interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects",
        )
    )
    results["GetManagedObjects"] = sorted(plain(reply.body[0])) if reply.body else reply.error_name
    say(results)


async def stream(
    bus: MessageBus,
    token: str,
    opts: str = "{}",
    pause: str = "0",
    die_after: str = "0",
    close_after: str = "0",
) -> None:
    """PromptStream on a new session: count the unicast chunks; optionally stop reading for `pause` s
    after the first chunk (so the daemon's send buffer fills), or exit abruptly after `die_after` chunks."""
    (session,) = await call(bus, PATH, LLM, "CreateSession", "a{sv}", [{}])
    path = f"/org/llmos/LLM1/request/{bus.unique_name.lstrip(':').replace('.', '_')}/{token}"
    chunks: list[str] = []
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    paused = [float(pause) > 0]

    def on_signal(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.path != path:
            return
        if msg.member == "Chunk":
            chunks.append(msg.body[0])
            if int(die_after) and len(chunks) >= int(die_after):
                say({"died_after": len(chunks), "session": session})
                os._exit(0)
            if int(close_after) and len(chunks) == int(close_after):
                asyncio.get_running_loop().create_task(call(bus, session, SESSION, "Close", "", []))
            if paused[0]:
                paused[0] = False
                time.sleep(float(pause))  # blocks this process's loop: the daemon's writes back up
        elif msg.member == "Response" and not done.done():
            done.set_result(msg.body)

    bus.add_message_handler(on_signal)
    opts_d = {**json.loads(opts), "handle_token": token}
    (req,) = await call(
        bus, session, SESSION, "PromptStream", "sa{sv}", ["Tell me a story.", variants(opts_d)]
    )
    say({"started": req})
    code, results = await asyncio.wait_for(done, 300)
    say(
        {
            "request": req,
            "code": code,
            "chunks": len(chunks),
            "joined": "".join(chunks),
            "results": plain(results),
        }
    )


async def watch(bus: MessageBus, seconds: str) -> None:
    """Ask for every org.llmos.Request1 signal on the bus and count what arrives."""
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=["type='signal',sender='org.llmos.LLM1'"],
        )
    )
    seen = []
    bus.add_message_handler(
        lambda m: (
            seen.append(m.member)
            if m.message_type == MessageType.SIGNAL and m.sender != "org.freedesktop.DBus"
            else None
        )
    )
    say({"watching": True})
    await asyncio.sleep(float(seconds))
    say({"seen": len(seen)})


async def status(bus: MessageBus) -> None:
    (st,) = await call(bus, PATH, LLM, "GetStatus", "", [])
    say(plain(st))


async def converse(bus: MessageBus, system: str, opts: str, *prompts: str) -> None:
    """One session with a system prompt; each prompt's answer and stats. Waits for a line on stdin
    between turns when the prompt is "-" (so a test can act on the daemon between turns)."""
    (session,) = await call(
        bus, PATH, LLM, "CreateSession", "a{sv}", [variants({"system_prompt": system} if system else {})]
    )
    out = []
    for p in prompts:
        if p == "-":
            say({"paused": True, "session": session, "turns": out})
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            continue
        try:
            text, stats = await call(
                bus, session, SESSION, "Prompt", "sa{sv}", [p, variants(json.loads(opts))]
            )
        except CallError as e:
            out.append({"error": e.name, "message": e.message})
            continue
        out.append({"text": text, "stats": plain(stats)})
    say({"session": session, "turns": out})


async def flood(bus: MessageBus, seconds: str, depth: str, opts: str) -> None:
    """Keep `depth` Generate calls in flight for `seconds`; count tokens of the answers, and when each
    answer came (seconds since the start), so a test can compare apps over the same window."""
    t0 = time.monotonic()
    end = t0 + float(seconds)
    done: list[dict[str, Any]] = []
    errors: dict[str, int] = {}

    async def one_after_another() -> None:
        while time.monotonic() < end:
            started = time.monotonic() - t0
            try:
                _text, stats = await call(
                    bus, PATH, LLM, "Generate", "sa{sv}", ["Count to fifty.", variants(json.loads(opts))]
                )
            except CallError as e:
                errors[e.name] = errors.get(e.name, 0) + 1
                await asyncio.sleep(0.05)
                continue
            st = plain(stats)
            done.append(
                {
                    "start": started,
                    "end": time.monotonic() - t0,
                    "tokens": st["tokens_out"],
                    "priority": st["priority"],
                }
            )

    await asyncio.gather(*(one_after_another() for _ in range(int(depth))))
    say({"done": done, "errors": errors})


async def timed(bus: MessageBus, prompt: str, opts: str) -> None:
    """One Generate, timed from this app's side (wall clock, seconds)."""
    t0 = time.monotonic()
    try:
        text, stats = await call(bus, PATH, LLM, "Generate", "sa{sv}", [prompt, variants(json.loads(opts))])
    except CallError as e:
        say({"error": e.name, "message": e.message, "seconds": time.monotonic() - t0})
        return
    say({"text": text, "stats": plain(stats), "seconds": time.monotonic() - t0})


async def on_go(bus: MessageBus, prompt: str, opts: str) -> None:
    """Connect, say ready, wait for a line on stdin, then one Generate: so several apps start together.
    Times are wall-clock (time.time()), comparable across processes."""
    say({"ready": True})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start = time.time()
    _text, stats = await call(bus, PATH, LLM, "Generate", "sa{sv}", [prompt, variants(json.loads(opts))])
    say({"start": start, "end": time.time(), "stats": plain(stats)})


async def latencies(bus: MessageBus, repeats: str, prompt: str, opts: str) -> None:
    """The same Generate `repeats` times, one after another: wall seconds and the daemon's stats."""
    out = []
    for _ in range(int(repeats)):
        t0 = time.monotonic()
        _text, stats = await call(bus, PATH, LLM, "Generate", "sa{sv}", [prompt, variants(json.loads(opts))])
        out.append({"seconds": time.monotonic() - t0, "stats": plain(stats)})
        await asyncio.sleep(0.2)
    say({"runs": out})


async def structured(bus: MessageBus, cases_file: str, parallel: str = "8") -> None:
    """Generate for each {"prompt", "schema", "seed"} case with json_schema set, `parallel` at a time;
    print every answer (text, finish_reason) in order."""
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    gate = asyncio.Semaphore(int(parallel))

    async def one(case: dict[str, Any]) -> dict[str, Any]:
        opts = {"json_schema": json.dumps(case["schema"]), "max_tokens": 1024, "temperature": 0.7}
        opts["seed"] = case["seed"]
        async with gate:
            try:
                text, stats = await call(
                    bus, PATH, LLM, "Generate", "sa{sv}", [case["prompt"], variants(opts)]
                )
            except CallError as e:
                return {"error": e.name, "message": e.message}
        return {"text": text, "finish_reason": plain(stats)["finish_reason"]}

    say({"answers": await asyncio.gather(*(one(c) for c in cases))})


class ToolProvider(ServiceInterface):
    """org.llmos.ToolProvider1 for `agent-run`: answers each tool with a canned JSON result, or with a
    canned text as it is (`raw`: what no json.dumps would write, e.g. JSON nested 100,000 deep)."""

    def __init__(
        self,
        results: dict[str, Any],
        calls: list[dict[str, Any]],
        die: bool,
        raw: dict[str, str] | None = None,
    ) -> None:
        super().__init__("org.llmos.ToolProvider1")
        self.results, self.calls, self.die, self.raw = results, calls, die, raw or {}

    @method()
    def Call(self, tool: "s", arguments: "s") -> "s":  # noqa: F821
        self.calls.append({"tool": tool, "arguments": json.loads(arguments)})
        if self.die:  # the app crashes in the middle of a call
            say({"dying": True, "calls": self.calls})
            os._exit(3)
        if tool in self.raw:
            return self.raw[tool]
        return json.dumps(self.results.get(tool, {"ok": True}))


class ToolApprover(ServiceInterface):
    def __init__(self, answer: bool, asked: list[str]) -> None:
        super().__init__("org.llmos.ToolApprover1")
        self.answer, self.asked = answer, asked

    @method()
    def Approve(self, tool: "s", arguments: "s") -> "b":  # noqa: F821
        self.asked.append(tool)
        return self.answer


async def register_provider(bus: MessageBus, setup: dict[str, Any], calls: list[dict[str, Any]]) -> list[str]:
    provider = ToolProvider(
        setup.get("results", {}), calls, setup.get("die", False), setup.get("raw_results")
    )
    bus.export("/app/tools", provider)
    manifest = ["/app/tools", json.dumps(setup["manifest"])]
    (names,) = await call(
        bus, "/org/llmos/Agent1", "org.llmos.Agent1", "RegisterToolProvider", "os", manifest
    )
    return names


async def agent_run(bus: MessageBus, setup_file: str) -> None:
    """Register a provider (manifest, canned results), optionally an approver, run a goal, and report
    every Step, the Result and the calls the provider received. setup: {"manifest", "results",
    "raw_results", "goal", "options", "approve": bool|null, "die": bool, "register": bool}"""
    with open(setup_file, encoding="utf-8") as f:
        setup = json.load(f)
    calls: list[dict[str, Any]] = []
    asked: list[str] = []
    if setup.get("register", True):
        await register_provider(bus, setup, calls)
    opts = variants(setup.get("options", {}))
    if setup.get("approve") is not None:
        bus.export("/app/approver", ToolApprover(setup["approve"], asked))
        opts["approver"] = Variant("o", "/app/approver")
    (listed,) = await call(bus, "/org/llmos/Agent1", "org.llmos.Agent1", "ListTools", "", [])
    token = "run1"
    path = f"/org/llmos/Agent1/task/{bus.unique_name.lstrip(':').replace('.', '_')}/{token}"
    steps: list[Any] = []
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_signal(m: Message) -> None:
        if m.message_type == MessageType.SIGNAL and m.path == path:
            if m.member == "Step":
                steps.append(json.loads(m.body[0]))
            elif m.member == "Result" and not done.done():
                done.set_result([m.body[0], plain(m.body[1])])

    bus.add_message_handler(on_signal)
    opts["handle_token"] = Variant("s", token)
    (task,) = await call(bus, "/org/llmos/Agent1", "org.llmos.Agent1", "Run", "sa{sv}", [setup["goal"], opts])
    code, result = await asyncio.wait_for(done, 300)
    say(
        {
            "task": task,
            "listed": json.loads(listed),
            "steps": steps,
            "code": code,
            "result": result,
            "calls": calls,
            "asked": asked,
        }
    )


async def agent_runs(bus: MessageBus, setup_file: str) -> None:
    """Register a provider once, then run each {"goal", "options"} of setup["runs"] in turn; report each
    run's Steps and Result, and every call the provider received. setup: {"manifest", "results", "runs"}"""
    with open(setup_file, encoding="utf-8") as f:
        setup = json.load(f)
    calls: list[dict[str, Any]] = []
    await register_provider(bus, setup, calls)
    prefix = f"/org/llmos/Agent1/task/{bus.unique_name.lstrip(':').replace('.', '_')}/"
    events: dict[str, list[Any]] = {}
    done: dict[str, asyncio.Future[Any]] = {}

    def on_signal(m: Message) -> None:
        if m.message_type == MessageType.SIGNAL and m.path in events:
            if m.member == "Step":
                events[m.path].append(json.loads(m.body[0]))
            elif m.member == "Result" and not done[m.path].done():
                done[m.path].set_result([m.body[0], plain(m.body[1])])

    bus.add_message_handler(on_signal)
    runs = []
    for i, run in enumerate(setup["runs"]):
        token = f"r{i}"
        events[prefix + token] = []
        done[prefix + token] = asyncio.get_running_loop().create_future()
        opts = variants({**run.get("options", {}), "handle_token": token})
        await call(bus, *AGENT, "Run", "sa{sv}", [run["goal"], opts])
        code, result = await asyncio.wait_for(done[prefix + token], 300)
        runs.append({"steps": events.pop(prefix + token), "code": code, "result": result})
    say({"runs": runs, "calls": calls})


async def provide(bus: MessageBus, setup_file: str) -> None:
    """Register a tool provider, say ready, serve calls until stdin closes, then report the calls."""
    with open(setup_file, encoding="utf-8") as f:
        setup = json.load(f)
    calls: list[dict[str, Any]] = []
    say({"registered": await register_provider(bus, setup, calls)})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    say({"calls": calls})


async def list_tools(bus: MessageBus) -> None:
    (listed,) = await call(bus, "/org/llmos/Agent1", "org.llmos.Agent1", "ListTools", "", [])
    say({"tools": json.loads(listed)})


async def agent_eval(
    bus: MessageBus, cases_file: str, constrained: str, max_tokens: str = "400", options: str = "{}"
) -> None:
    """For each case {"tools": [...], "request": ...}: register exactly its tools, Run with the first step
    a required tool call, and record that step, the result and per-step wall times. `options` (JSON) go
    into every Run; with a temperature, case i is sampled with seed i."""
    extra = json.loads(options)
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    calls: list[dict[str, Any]] = []
    bus.export("/app/tools", ToolProvider({}, calls, False))
    agent = ("/org/llmos/Agent1", "org.llmos.Agent1")
    events: dict[str, list[Any]] = {}

    def on_signal(m: Message) -> None:
        if m.message_type == MessageType.SIGNAL and m.path in events:
            events[m.path].append((time.monotonic(), m.member, m.body))

    bus.add_message_handler(on_signal)
    out = []
    prefix = f"/org/llmos/Agent1/task/{bus.unique_name.lstrip(':').replace('.', '_')}/"
    for i, case in enumerate(cases):
        await call(bus, *agent, "UnregisterToolProvider", "o", ["/app/tools"])
        await call(
            bus, *agent, "RegisterToolProvider", "os", ["/app/tools", json.dumps({"tools": case["tools"]})]
        )
        token = f"e{i}"
        events[prefix + token] = []
        opts = variants(
            {
                "handle_token": token,
                "max_steps": 2,
                "tool_choice": "required",
                "max_tokens": int(max_tokens),
                **extra,
                **({"seed": i} if "temperature" in extra else {}),
            }
        )
        opts["constrained"] = Variant("b", constrained == "1")
        t0 = time.monotonic()
        await call(bus, *agent, "Run", "sa{sv}", [case["request"], opts])
        while not any(e[1] == "Result" for e in events[prefix + token]):
            await asyncio.sleep(0.01)
        evs = events.pop(prefix + token)
        steps = [json.loads(b[0]) for _, member, b in evs if member == "Step"]
        times = [t - t0 for t, member, _ in evs if member == "Step"]
        (code, result) = next(plain(b) for _, member, b in evs if member == "Result")
        out.append({"steps": steps, "step_s": times, "code": code, "result": result})
    say({"runs": out})


AGENT = ("/org/llmos/Agent1", "org.llmos.Agent1")


async def list_agents(bus: MessageBus) -> None:
    (listed,) = await call(bus, *AGENT, "ListAgents", "", [])
    say(json.loads(listed))


async def schedule(bus: MessageBus, agent: str, goal: str, trigger: str, opts: str = "{}") -> None:
    """Schedule(agent, goal, trigger, options); the trigger's "interval" is u, the rest s."""
    trig = {k: Variant("u" if k == "interval" else "s", v) for k, v in json.loads(trigger).items()}
    body = [agent, goal, trig, variants(json.loads(opts))]
    (job,) = await call(bus, *AGENT, "Schedule", "ssa{sv}a{sv}", body)
    say({"job": job})


async def jobs(bus: MessageBus) -> None:
    (listed,) = await call(bus, *AGENT, "ListJobs", "", [])
    say({"jobs": json.loads(listed)})


async def job_results(bus: MessageBus, job: str) -> None:
    (results,) = await call(bus, *AGENT, "GetJobResults", "s", [job])
    say({"results": json.loads(results)})


async def cancel_job(bus: MessageBus, job: str) -> None:
    await call(bus, *AGENT, "CancelJob", "s", [job])
    say({"cancelled": job})


async def wait_job(bus: MessageBus, job: str, count: str, seconds: str) -> None:
    """Make itself known (ListJobs), say ready, then collect `count` JobFinished signals for `job`."""
    got: list[Any] = []
    enough = asyncio.Event()

    def on_signal(m: Message) -> None:
        if m.message_type == MessageType.SIGNAL and m.member == "JobFinished" and m.body[0] == job:
            got.append({"code": m.body[1], "result": json.loads(m.body[2]), "destination": m.destination})
            if len(got) >= int(count):
                enough.set()

    bus.add_message_handler(on_signal)
    (listed,) = await call(bus, *AGENT, "ListJobs", "", [])
    say({"ready": True, "jobs": json.loads(listed)})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), float(seconds))
    say({"finished": got})


COMMANDS = {
    "list-agents": list_agents,
    "schedule": schedule,
    "jobs": jobs,
    "job-results": job_results,
    "cancel-job": cancel_job,
    "wait-job": wait_job,
    "agent-eval": agent_eval,
    "provide": provide,
    "list-tools": list_tools,
    "agent-run": agent_run,
    "agent-runs": agent_runs,
    "structured": structured,
    "on-go": on_go,
    "latencies": latencies,
    "converse": converse,
    "flood": flood,
    "timed": timed,
    "generate": generate,
    "turns": turns,
    "hold-session": hold_session,
    "poke": poke,
    "stream": stream,
    "watch": watch,
    "status": status,
}

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))

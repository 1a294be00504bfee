"""One run of an agent inside the daemon: the agent's steps with the model and the tools wired in.

Shared by the two ways a run starts: a caller's `Run` (task_object.py, which sends the steps to the
caller) and a scheduled job (scheduled_agents.py, which keeps them). Generations go through the arbiter at
the run's priority and are cancelled with the run; tool calls go to the providing app (bounded by a
timeout) or to the built-in system tools; a `confirm` tool runs only after the approver says yes.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from dbus_fast import Message, MessageType, Variant

from agents.agent_loop import Step
from agents.plugin import AgentContext, AgentPlugin, AgentPluginError
from agents.tool_choice import ScoringUnavailableError
from agents.tool_format import STEP_JSON_STYLE, InvalidStepError, StepCutError
from agents.tools import Tool, argument_problems
from llmos import bounded_json
from llmos.engine.sampling import SamplingParams
from llmos.engine.scoring import ContinuationScore, score_continuations
from llmos.engine.sequence import FinishReason
from llmos.errors import CapacityError
from llmos.tokenizer import Tokenizer
from system_services.dbus_errors import error, to_dbus_error
from system_services.engine_worker import CancelledByDaemon, Job
from system_services.options import RequestOptions, parse_options
from system_services.step_stream import StepStream
from system_services.system_tools import SYSTEM_OWNER, SYSTEM_TOOL_NAMES

TOOL_TIMEOUT_S = 20.0
APPROVE_TIMEOUT_S = 120.0
# What an app's tool may answer: its result (JSON, or text) and the message of an error reply. The model
# reads 4,000 characters of a result (tool_format.MAX_OBSERVATION_CHARS); the run's owner gets the whole
# result in the Step signal, and a scheduled run keeps it, so it is bounded before it is even parsed.
MAX_RESULT_CHARS = 1024 * 1024
MAX_RESULT_DEPTH = bounded_json.MAX_DEPTH
MAX_TOOL_ERROR_CHARS = 1000
RESULT_OK, RESULT_CANCELLED, RESULT_FAILED = 0, 1, 2
MAX_STEPS = 16
RUN_KEYS = {"max_steps": "u", "tool_choice": "s", "approver": "o", "constrained": "b", "system_tools": "as"}
SAMPLING_KEYS = frozenset({"temperature", "top_k", "top_p", "seed", "max_tokens", "priority"})


@dataclass
class RunOutcome:
    """How a run ended: code 0 with the answer, 1 cancelled, 2 failed with a named error."""

    code: int
    steps: int = 0
    answer: str | None = None
    cut: bool | None = None  # the answer ran out of tokens (it ends with " …"), or a call did (failed)
    error_name: str | None = None
    error_message: str | None = None

    @classmethod
    def failed(cls, steps: int, name: str, message: str, code: int = RESULT_FAILED) -> "RunOutcome":
        return cls(code, steps, error_name=name, error_message=message)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def variants(self) -> dict[str, Variant]:
        """The Result signal's a{sv} (without the code, which goes first)."""
        types = {"steps": "u", "answer": "s", "cut": "b", "error_name": "s", "error_message": "s"}
        return {k: Variant(types[k], v) for k, v in self.to_dict().items() if k != "code"}


class Reply(str):
    """A generation's text, and why it ended ("stop", "length", "context"): a step cut by max_tokens
    is told apart from one that ended (agents.agent_loop marks a cut answer)."""

    finish_reason: str

    def __new__(cls, text: str, finish_reason: str) -> "Reply":
        obj = super().__new__(cls, text)
        obj.finish_reason = finish_reason
        return obj


def special_texts(tokenizer: Tokenizer) -> list[str]:
    return [t for i in tokenizer.special_ids if len(t := tokenizer.id_to_token(i)) > 1]


def plain_text(content: str, specials: list[str]) -> str:
    """Text from the caller or a tool, made unable to pose as chat markup. The rendered prompt is
    encoded with special tokens parsed (the template's own markup must be), so a goal or a tool result
    holding "<|im_end|><|im_start|>system" would otherwise close its turn and open a real one. A
    zero-width space after the first character keeps it readable, and plain."""
    for special in specials:
        if special in content:
            content = content.replace(special, special[0] + "\u200b" + special[1:])
    return content


def plain_prompt(
    messages: list[dict[str, str]], tools: list[dict[str, Any]] | None, specials: list[str]
) -> tuple[list[dict[str, str]], list[dict[str, Any]] | None]:
    """A generation's messages and template tools with every text that came from outside made plain:
    the caller's goal and the tools' results, and also the system prompt and the tools the template
    renders, which carry the descriptions and parameter schemas apps wrote (a shared tool's description
    reaches other apps' runs). Only the model's own turns are left as they are."""
    plain = [
        m if m.get("role") == "assistant" else {**m, "content": plain_text(m["content"], specials)}
        for m in messages
    ]
    return plain, None if tools is None else _plain_values(tools, specials)


def _plain_values(value: Any, specials: list[str]) -> Any:
    """Every string in a JSON value made plain (a tool's parameters nest at most 64 levels deep)."""
    if isinstance(value, str):
        return plain_text(value, specials)
    if isinstance(value, dict):
        return {plain_text(k, specials): _plain_values(v, specials) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_values(v, specials) for v in value]
    return value


def tool_result(answer: Any) -> Any:
    """What an app's ToolProvider1.Call answered, as the observation the model reads: its JSON; text
    that is not JSON as {"result": text}; over MAX_RESULT_CHARS or nested deeper than MAX_RESULT_DEPTH,
    an {"error": ...} observation (the run goes on, as for a tool that failed)."""
    text = answer if isinstance(answer, str) else str(answer)  # an app may reply with another signature
    try:
        return bounded_json.loads(
            text, "the tool's result", max_chars=MAX_RESULT_CHARS, max_depth=MAX_RESULT_DEPTH
        )
    except bounded_json.JsonLimitError as e:
        return {"error": str(e)}
    except bounded_json.InvalidJsonError:
        return {"result": text}  # not JSON: passed on as a string, marked as such


def schema_grammar(schema: str) -> str:
    """A JSON Schema as an llguidance grammar, in the compact JSON style of every step (structured
    output's, with the escapes a call's length bound counts on)."""
    parsed = json.loads(schema)
    if isinstance(parsed, dict):
        parsed = {**parsed, "x-guidance": STEP_JSON_STYLE}
    return f"start: %json {json.dumps(parsed)}"


@dataclass
class RunSettings:
    request: RequestOptions  # sampling, max_tokens and priority of every generation
    max_steps: int = 6
    tool_choice: str = "auto"
    approver: str | None = None  # org.llmos.ToolApprover1 object on `owner`'s connection
    constrained: bool = True  # False only to measure what constrained decoding buys (bench/agents.py)
    system_tools: list[str] | None = None  # the built-in tools offered; None: all the policy allows


def parse_run_options(options: dict[str, Variant], limits: Any, *, scheduled: bool = False) -> RunSettings:
    """A run's a{sv} options (and the `agent` it names, taken out by the caller), checked:
    InvalidArgument names what is wrong. A scheduled run has no caller on the bus to approve anything,
    so no approver, nor a handle_token."""
    options = dict(options)
    sampling = SAMPLING_KEYS if scheduled else SAMPLING_KEYS | {"handle_token"}
    accepted = sorted(set(RUN_KEYS) | sampling)
    if unknown := sorted(set(options) - set(accepted)):
        raise error(
            "InvalidArgument", f"unknown option {unknown[0]!r} (accepted here: {', '.join(accepted)})"
        )
    own = {k: options.pop(k) for k in list(options) if k in RUN_KEYS}
    if scheduled and "approver" in own:
        raise error("InvalidArgument", "a scheduled run has no approver: its confirm tools are refused")
    for key, var in own.items():
        if var.signature != RUN_KEYS[key]:
            raise error("InvalidArgument", f"option {key!r} must be of D-Bus type {RUN_KEYS[key]!r}")
    request = parse_options(
        options,
        default_max_tokens=limits.default_max_tokens,
        max_tokens_limit=limits.max_tokens,
        allowed=sampling,
    )
    settings = RunSettings(request, **{k: v.value for k, v in own.items()})
    if not 1 <= settings.max_steps <= MAX_STEPS:
        raise error("InvalidArgument", f"max_steps must be 1 to {MAX_STEPS}")
    if settings.tool_choice not in ("auto", "required", "none"):
        raise error("InvalidArgument", "tool_choice must be auto, required or none")
    unknown = sorted(set(settings.system_tools or ()) - set(SYSTEM_TOOL_NAMES))
    if unknown:
        raise error(
            "InvalidArgument",
            f"no system tool {', '.join(unknown)} (there are {', '.join(SYSTEM_TOOL_NAMES)})",
        )
    return settings


class AgentRun:
    def __init__(
        self,
        daemon: Any,
        agent: AgentPlugin,
        goal: str,
        tools: list[Tool],
        settings: RunSettings,
        *,
        app_id: str,
        uid: int | None,  # the user running the app: its generations count against (app, user) quotas
        owner: str | None,  # the connection that started it; None for a scheduled run
    ) -> None:
        self.daemon, self.agent, self.goal, self.tools = daemon, agent, goal, tools
        self.settings, self.app_id, self.uid, self.owner = settings, app_id, uid, owner
        self._job: Job | None = None  # the generation in flight, cancelled with the run
        self._stream: StepStream | None = None  # where steps go as they are written (a caller's run)
        self._specials = special_texts(daemon.model.tokenizer)  # markup text that must stay plain

    def steps(self) -> AsyncIterator[Step]:
        s = self.settings
        ctx = AgentContext(
            input=self.goal,
            tools=self.tools,
            generate=self._generate,
            call_tool=self._call_tool,
            count_tokens=lambda text: len(self.daemon.model.tokenizer.encode(text, parse_special=False)),
            # the app's own cap, if it has one, is what its generations may hold
            context_length=min(
                self.daemon.model.context_length,
                self.daemon.policy(self.app_id).max_context or self.daemon.model.context_length,
            ),
            max_steps=s.max_steps,
            max_step_tokens=s.request.params.max_tokens,
            # a step that may call a tool gets what its largest call needs, up to what any request may ask
            max_call_tokens=self.daemon.config.limits.max_tokens,
            tool_choice=s.tool_choice,
            constrained=s.constrained,
            tool_format=self.daemon.tool_format,
            score=self._score,
        )
        return self.agent.steps(ctx)

    async def execute(self, on_step: Callable[[Step], None], stream: StepStream | None = None) -> RunOutcome:
        """Run to the end, handing each step to `on_step` (and, with `stream`, each step's text as the
        model writes it); every way of ending is an outcome."""
        self._stream = stream
        steps = 0
        try:
            async for step in self.steps():
                steps += 1
                if not all(isinstance(v, str | None) for v in (step.answer, step.text)):
                    raise AgentPluginError(f"agent {self.agent.name} gave a step whose text is not a string")
                on_step(step)
                if step.answer is not None:
                    return RunOutcome(RESULT_OK, steps, answer=step.answer, cut=step.cut or None)
            return RunOutcome.failed(steps, "org.llmos.Error.Failed", "the run ended without an answer")
        except StepCutError as e:  # a call cut short: its step (named, never made) went out just before
            return RunOutcome(
                RESULT_FAILED, steps, cut=True, error_name="org.llmos.Error.Failed", error_message=str(e)
            )
        except InvalidStepError as e:  # unconstrained (a measurement), or no call fits
            return RunOutcome.failed(steps, "org.llmos.Error.Failed", str(e))
        except (asyncio.CancelledError, CancelledByDaemon) as e:
            why = str(e) or "cancelled"
            self.cancel_generation(why)  # the task was cancelled: so is the generation it waited for
            return RunOutcome.failed(steps, "org.llmos.Error.Cancelled", why, RESULT_CANCELLED)
        except Exception as e:  # the agent's own step logic included: named, logged, never a traceback out
            err = to_dbus_error(e)
            return RunOutcome.failed(steps, err.type, err.text)

    def cancel_generation(self, why: str) -> None:
        if self._job is not None:
            self.daemon.worker.cancel(self._job, why)

    async def _generate(
        self,
        messages: list[dict[str, str]],
        schema: str | None = None,
        *,
        grammar: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        grammar_tokens: int | None = None,
        step: int | None = None,
        **sampling: Any,
    ) -> str:
        """One generation; an agent may override sampling (e.g. repetition_penalty) but never take more
        tokens than the caller gave each step, except `grammar_tokens`: the most a bounded constraint
        admits (a step that may call a tool: its largest call), up to what any request may ask for
        ([limits] max_tokens), so the call always ends. With `tools`, the model's chat template renders
        them. With `step`, the text is that step in the run's tool format, streamed to the caller."""
        d = self.daemon
        prompt: Any
        prompt, tools = plain_prompt(messages, tools, self._specials)
        if tools is not None and d.model.chat_template is not None:  # rendered here: the tools go in
            # a step is a call or the answer, constrained from its first token: a thinking model (Qwen3)
            # is asked to answer directly, as its template offers, rather than open a <think> block
            prompt = d.model.chat_template.render(prompt, tools=tools, enable_thinking=False)
        if schema is not None and grammar is None:
            # an agent's schema (a step's grows with every usable tool) is the daemon's own, so it is not
            # held to the size limit of callers' schemas: it goes in as a grammar of that schema
            grammar, schema = schema_grammar(schema), None
        request = replace(self.settings.request, grammar=grammar)
        if sampling or grammar_tokens:
            merged = {**request.params.model_dump(), **sampling}
            merged["max_tokens"] = min(merged["max_tokens"], request.params.max_tokens)
            if grammar_tokens:
                most = min(grammar_tokens, d.config.limits.max_tokens)
                merged["max_tokens"] = max(merged["max_tokens"], most)
            request = replace(request, params=SamplingParams.of(**merged))
        job = d.job(prompt, replace(request, json_schema=schema), (self.app_id, self.uid))
        stream = self._stream if step is not None else None
        if stream is not None:
            job.on_delta = stream.begin(step)
        self._job = job
        try:
            if self.owner is None:
                result = await d.worker.submit(job)
            else:  # its caller leaving the bus cancels it
                result = await d.run_for_caller(job, self.owner)
        finally:
            self._job = None
            if stream is not None:
                stream.end()
        return Reply(result.text, FinishReason(result.finish_reason).value)

    async def _score(self, messages: list[dict[str, str]], continuations: list[str]) -> list[list[float]]:
        """Each continuation's token log-likelihoods after the rendered messages, from one scoring pass
        on the engine's thread between arbiter steps (llmos.engine.scoring): a few short runs on one
        prompt, far less than a generation, so it is not queued as one."""
        d = self.daemon
        prompt, _ = plain_prompt(messages, None, self._specials)
        ids = d.encode_prompt(prompt)
        conts = [d.model.tokenizer.encode(c, parse_special=False) for c in continuations]

        def run() -> list[ContinuationScore]:
            try:
                return score_continuations(d.arbiter.load(), ids, conts)
            except CapacityError as e:  # every KV slot is taken: this step generates its choice instead
                raise ScoringUnavailableError(str(e)) from None

        return [s.token_logprobs for s in await d.worker.call(run)]

    async def _call_tool(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        """The tool's answer, or {"error": ...}: a failing or silent tool is something the model reads,
        never the end of the run."""
        # against the strict form (closed, bounded), at every level: never sent to the app if invalid
        if problems := argument_problems(tool.spec.strict_parameters, arguments):
            return {"error": f"invalid arguments for {tool.name}: {'; '.join(problems)}"}
        if tool.spec.confirm and not await self._approved(tool, arguments):
            return {"error": "the user did not approve this call"}
        if tool.owner == SYSTEM_OWNER:
            return await self.daemon.system_tools.call(tool.spec.name, arguments, app_id=self.app_id)
        call = ("org.llmos.ToolProvider1", "Call", [tool.spec.name, json.dumps(arguments)])
        try:
            reply = await self._call_app(tool.owner, tool.path, *call, TOOL_TIMEOUT_S)
        except TimeoutError:
            return {"error": f"the tool did not answer within {TOOL_TIMEOUT_S:.0f} s"}
        if reply is None or reply.message_type == MessageType.ERROR:
            why = str(reply.body[0]) if reply is not None and reply.body else ""
            if (over := len(why) - MAX_TOOL_ERROR_CHARS) > 0:
                why = f"{why[:MAX_TOOL_ERROR_CHARS]} [... {over} more characters cut]"
            name = reply.error_name if reply is not None else "no reply"
            return {"error": f"{name}: {why}".rstrip(": ")}
        return tool_result(reply.body[0] if reply.body else "")

    async def _approved(self, tool: Tool, arguments: dict[str, Any]) -> bool:
        approver = self.settings.approver
        if not approver or self.owner is None:  # nobody to ask (a scheduled run): refused
            return False
        # the name the run shows: whose tool it is, when it is another app's
        call = ("org.llmos.ToolApprover1", "Approve", [tool.name, json.dumps(arguments)])
        try:
            reply = await self._call_app(self.owner, approver, *call, APPROVE_TIMEOUT_S)
        except TimeoutError:
            return False
        return bool(
            reply is not None and reply.message_type == MessageType.METHOD_RETURN and reply.body == [True]
        )

    async def _call_app(
        self, dest: str, path: str, iface: str, member: str, body: list[str], timeout: float
    ) -> Message | None:
        """A method call into an app (`ss` arguments), bounded: dbus-fast has no call timeout."""
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature="ss", body=body)
        return await asyncio.wait_for(self.daemon.bus.call(msg), timeout)

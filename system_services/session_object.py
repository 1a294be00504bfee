"""A conversation: /org/llmos/LLM1/session/<n>, org.llmos.Session1, owned by the connection that made it.

A session keeps its messages, so each Prompt continues the conversation; Clone copies them into a new
session of the same owner. Prompt answers in the method reply; PromptStream returns a request object
(see request_object.py) whose chunks and result reach only the owner.
"""

import itertools
from typing import Any

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from llmos.arbiter.policy import Account
from system_services.dbus_errors import error, to_dbus_error
from system_services.engine_worker import EngineWorker, Job, JobResult
from system_services.options import SAMPLING, RequestOptions, parse_options
from system_services.ownership import Ownership
from system_services.request_object import RequestObject, request_path, stats

IFACE = "org.llmos.Session1"
VERSION = 1
_numbers = itertools.count(1)
SESSION_OPTIONS = frozenset({"system_prompt", "messages"})
PROMPT_OPTIONS = frozenset({*SAMPLING, "priority", "json_schema"})
STREAM_OPTIONS = PROMPT_OPTIONS | {"handle_token"}


class SessionObject(ServiceInterface):
    def __init__(
        self, daemon: Any, owner: str, messages: list[dict[str, str]], account: Account = ("unknown", None)
    ) -> None:
        super().__init__(IFACE)
        self.daemon = daemon
        self.owner = owner
        # (app id, uid) from the caller's credentials (see caller.py): policy, quotas, status
        self.account = account
        self.app_id = account[0]
        self.path = f"/org/llmos/LLM1/session/{next(_numbers)}"
        self.messages = messages
        self.tokens_used = 0
        self._busy = False
        self._prompt_job: Job | None = None
        self._requests: set[RequestObject] = set()
        self._closed = False

    @property
    def worker(self) -> EngineWorker:
        return self.daemon.worker

    # -- properties --------------------------------------------------------------------------------
    # Properties too are for the owner only: another app may not even see how much it has used.
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        Ownership.check(self)
        return VERSION

    @dbus_property(access=PropertyAccess.READ)
    def TokensUsed(self) -> "u":
        """Tokens processed for this session so far (prompts, history included, and answers)."""
        Ownership.check(self)
        return self.tokens_used

    @dbus_property(access=PropertyAccess.READ)
    def ContextLength(self) -> "u":
        Ownership.check(self)
        return self.daemon.model.context_length

    # -- methods -----------------------------------------------------------------------------------
    @method()
    async def Prompt(self, text: "s", options: "a{sv}") -> "sa{sv}":
        """Add a user message, answer it, and keep both in the conversation."""
        Ownership.check(self)
        opts = self._options(options, PROMPT_OPTIONS)
        job = self._job(text, opts)
        self._prompt_job = job
        try:
            result = await self.daemon.run_for_caller(job, self.owner)
        except Exception as e:
            raise to_dbus_error(e) from None
        finally:
            self._busy = False
            self._prompt_job = None
        if self._closed:  # closed after the answer was made, before this call got it
            raise error("Cancelled", "the session was closed")
        self._record(text, result)
        return [result.text, stats(result)]

    @method()
    def PromptStream(self, text: "s", options: "a{sv}") -> "o":
        """Like Prompt, streamed: returns the request object; chunks and the Response go to the caller."""
        sender = Ownership.check(self)
        opts = self._options(options, STREAM_OPTIONS)
        token = opts.handle_token or f"r{next(_numbers)}"
        path = request_path(sender, token)
        if any(o.path == path for o in self.daemon.ownership.owned_by(sender)):
            raise error("InvalidArgument", f"handle_token {token!r} is already in use by a running request")
        job = self._job(text, opts)

        def done(result: JobResult) -> None:
            self._record(text, result)

        req = RequestObject(
            self.daemon.bus, self.worker, self.daemon.ownership, sender, path, job, on_result=done
        )
        self._requests.add(req)
        req.start()
        req_fut = req.job.future
        if req_fut is not None:
            req_fut.add_done_callback(lambda _f: self._request_ended(req))
        return path

    @method()
    def Close(self) -> None:
        """End the conversation: running requests are cancelled and the object goes away."""
        Ownership.check(self)
        self.close("the session was closed", owner_gone=False)

    @method()
    def Clone(self) -> "o":
        """A new session of the same owner with a copy of this conversation."""
        sender = Ownership.check(self)
        self.daemon.check_session_quota(sender, self.account)
        twin = SessionObject(self.daemon, sender, [dict(m) for m in self.messages], self.account)
        twin.tokens_used = self.tokens_used
        self.daemon.add_session(twin)
        self.worker.clone_session(self.path, twin.path)
        return twin.path

    # -- internals ---------------------------------------------------------------------------------
    def _options(self, raw: dict[str, Any], allowed: frozenset[str]) -> RequestOptions:
        limits = self.daemon.config.limits
        return parse_options(
            raw,
            default_max_tokens=limits.default_max_tokens,
            max_tokens_limit=limits.max_tokens,
            allowed=allowed,
        )

    def _job(self, text: str, opts: RequestOptions) -> Job:
        if self._closed:  # a call already on its way when Close ran (pipelined by the same client)
            raise error("NotFound", f"{self.path} was closed")
        if self._busy:
            raise error("Busy", "this session is already answering a prompt; wait for it or Clone() it")
        if not text.strip():
            raise error("InvalidArgument", "the prompt is empty")
        self._busy = True
        # The whole conversation is the prompt; the arbiter reuses the KV parked under this session's
        # path for the part it shares with the previous turn, so only the new turn is computed.
        prompt = [*self.messages, {"role": "user", "content": text}]
        return self.daemon.job(prompt, opts, self.account, session_key=self.path)

    def _request_ended(self, req: RequestObject) -> None:

        self._busy = False
        self._requests.discard(req)

    def _record(self, text: str, result: JobResult) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        # not signalled: PropertiesChanged is a broadcast, and this count is the owner's business
        self.tokens_used += result.usage.prompt_tokens + result.usage.completion_tokens

    def close(self, why: str, owner_gone: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        for req in list(self._requests):
            req.close(why, owner_gone=owner_gone)
        if self._prompt_job is not None:
            self.worker.cancel(self._prompt_job, why)
        self.daemon.remove_session(self)

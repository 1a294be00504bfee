"""The service's front object: /org/llmos/LLM1, org.llmos.LLM1.

One-shot Generate and CountTokens, CreateSession for conversations, status. Properties describe the
model and its state; Version is the interface version (bumped on incompatible changes).
"""

import asyncio
import logging
from collections import Counter
from typing import Any

from dbus_fast import Variant
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from agents.catalog import AgentCatalog
from llmos.errors import LlmosError
from llmos.model_store import ModelStore
from system_services.authority import ACTION_CONFIG_RELOAD, ACTION_MODEL_IMPORT, authorize
from system_services.caller import current_sender, identify
from system_services.config import DaemonConfig
from system_services.dbus_errors import error, to_dbus_error
from system_services.history import check_history_fits
from system_services.options import SAMPLING, parse_options
from system_services.request_object import stats
from system_services.session_object import SESSION_OPTIONS, SessionObject

log = logging.getLogger("llmosd")
IFACE = "org.llmos.LLM1"
PATH = "/org/llmos/LLM1"
VERSION = 1
GENERATE_OPTIONS = frozenset({*SAMPLING, "priority", "system_prompt", "json_schema"})
INLINE_COUNT_CHARS = 4096
# GetStatus keys copied from the arbiter's snapshot (which uses the same names), with their D-Bus types
ARBITER_FIGURES = {
    "device_failures": "as",
    "kv_bytes": "t",
    "kv_budget_bytes": "t",
    "kv_swapped_bytes": "t",
    "kv_free_slot_bytes": "t",
    "prefix_cache_bytes": "t",
    "prefix_hits": "u",
    "auto_prefix_hits": "u",
    "auto_prefix_tokens": "t",
    "swap_outs": "u",
    "swap_restores": "u",
    "swap_recomputes": "u",
    "swap_failures": "u",
    "kv_over_budget_bytes": "t",
    "model_loads": "u",
    "draft_tokens": "t",  # speculative decoding since start: n-gram draft tokens verified
    "accepted_tokens": "t",  # of those, kept
    "forced_tokens": "t",  # grammar-forced tokens appended without sampling (jump-forward)
}
APP_FIGURES = {
    "queued": "u",
    "running": "u",
    "tokens": "t",
    "tokens_last_minute": "t",
    "kv_resident_bytes": "t",
    "kv_swapped_bytes": "t",
}


class LLMObject(ServiceInterface):
    def __init__(self, daemon: Any) -> None:
        super().__init__(IFACE)
        self.daemon = daemon

    # -- properties --------------------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        return VERSION

    @dbus_property(access=PropertyAccess.READ)
    def Model(self) -> "s":
        return self.daemon.model.manifest.name

    @dbus_property(access=PropertyAccess.READ)
    def ContextLength(self) -> "u":
        return self.daemon.model.context_length

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.daemon.state

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> "s":
        return self.daemon.arbiter.device

    # -- methods -----------------------------------------------------------------------------------
    @method()
    async def CreateSession(self, options: "a{sv}") -> "o":
        """A new conversation owned by the caller. Options: system_prompt (s), messages (aa{ss}): history of
        every role (system, user, assistant, tool), taken as said, never generated again."""
        sender = current_sender()
        limits = self.daemon.config.limits
        opts = parse_options(
            options,
            default_max_tokens=limits.default_max_tokens,
            max_tokens_limit=limits.max_tokens,
            allowed=SESSION_OPTIONS,
        )
        if opts.system_prompt:
            self.daemon.check_text(opts.system_prompt, "the system prompt")
        messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
        if opts.messages and opts.system_prompt and any(m["role"] == "system" for m in opts.messages):
            raise error("InvalidArgument", "give the system turn once: system_prompt or a system message")
        messages += opts.messages or []
        self.daemon.check_session_quota(sender)
        caller = await self.daemon.caller(sender)
        try:  # history is never cut: it fits the context (and the app's max_context) or is refused
            await check_history_fits(self.daemon, messages, caller.app_id)
        except LlmosError as e:
            raise to_dbus_error(e) from None
        self.daemon.check_session_quota(sender, caller.account)  # again: others may have made sessions
        session = SessionObject(self.daemon, sender, messages, caller.account)
        self.daemon.add_session(session)
        log.info("%s: session for %s (uid %s, pid %s)", session.path, caller.app_id, caller.uid, caller.pid)
        return session.path

    @method()
    async def Generate(self, prompt: "s", options: "a{sv}") -> "sa{sv}":
        """One chat turn without a session: the answer and its stats (tokens in/out, TTFT, tok/s)."""
        limits = self.daemon.config.limits
        opts = parse_options(
            options,
            default_max_tokens=limits.default_max_tokens,
            max_tokens_limit=limits.max_tokens,
            allowed=GENERATE_OPTIONS,
        )
        self.daemon.check_text(prompt, "the prompt")  # before anything proportional to its size
        if not prompt.strip():
            raise error("InvalidArgument", "the prompt is empty")
        messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
        sender = current_sender()
        caller = await self.daemon.caller(sender)
        job = self.daemon.job([*messages, {"role": "user", "content": prompt}], opts, caller.account)
        try:
            result = await self.daemon.run_for_caller(job, sender)
        except Exception as e:
            raise to_dbus_error(e) from None
        return [result.text, stats(result)]

    @method()
    async def CountTokens(self, text: "s") -> "u":
        """Tokens `text` takes as plain text (special-token text is not parsed). Texts up to the most a
        prompt can be (see ContextLength and docs/dbus-api.md); a longer one cannot fit and is refused
        by its size, with org.llmos.Error.ContextOverflow, without being tokenized."""
        self.daemon.check_text(text, "the text")
        tokenizer = self.daemon.model.tokenizer
        if len(text) <= INLINE_COUNT_CHARS:  # microseconds: a thread hand-off would double the round trip
            return len(tokenizer.encode(text, parse_special=False))
        # long texts off the event loop, a few at a time: ~0.7 s per MiB
        return len(
            await self.daemon.worker.tokenizing.run(lambda: tokenizer.encode(text, parse_special=False))
        )

    # -- admin methods: root or polkit (packaging/polkit/org.llmos.policy) --------------------------------
    @method()
    async def ReloadConfig(self) -> "a{sv}":
        """Re-read the configuration file and look for agent plugins again. Limits, [jobs] and per-app
        policy ([apps.*]) apply at once; engine, arbiter and state_dir settings need a restart."""
        caller = await identify(self.daemon.bus, current_sender())
        await authorize(
            caller, ACTION_CONFIG_RELOAD, daemon_bus_is_system=self.daemon.on_system_bus, bus=self.daemon.bus
        )
        try:
            fresh = DaemonConfig.load(self.daemon.config_path)
        except LlmosError as e:
            raise to_dbus_error(e) from None
        old = self.daemon.config
        pending = [
            f"{section}.{k}"
            for section in ("engine", "arbiter")
            for k, v in getattr(fresh, section).model_dump().items()
            if v != getattr(getattr(old, section), k)
        ]
        if fresh.state_dir != old.state_dir:
            pending.append("state_dir")
        self.daemon.config = fresh.model_copy(
            update={"engine": old.engine, "arbiter": old.arbiter, "state_dir": old.state_dir}
        )
        self.daemon.agents = AgentCatalog.discover()  # plugins installed since start appear now
        log.info(
            "configuration reloaded by %s (uid %s)%s",
            caller.app_id,
            caller.uid,
            f"; needs a restart for {', '.join(pending)}" if pending else "",
        )
        return {"reloaded": Variant("b", True), "restart_needed": Variant("as", sorted(pending))}

    @method()
    async def ImportModel(self, path: "s", options: "a{sv}") -> "s":
        """Import a GGUF file into the daemon's model store; returns the model directory. Options:
        precision (s: int4|int8|fp32), name (s), default (b). The served model changes on restart."""
        caller = await identify(self.daemon.bus, current_sender())
        await authorize(
            caller, ACTION_MODEL_IMPORT, daemon_bus_is_system=self.daemon.on_system_bus, bus=self.daemon.bus
        )
        allowed = {"precision": "s", "name": "s", "default": "b"}
        for key, var in options.items():
            if key not in allowed or var.signature != allowed[key]:
                raise error(
                    "InvalidArgument",
                    f"option {key!r}: ImportModel takes precision (s), name (s), default (b)",
                )
        if not path.startswith("/"):
            raise error(
                "InvalidArgument", "the path must be absolute (the daemon has its own working directory)"
            )
        opts = {k: v.value for k, v in options.items()}
        store = ModelStore(self.daemon.store_root)
        try:
            model_dir = await asyncio.to_thread(
                store.import_gguf,
                path,
                precision=opts.get("precision", "int4"),
                name=opts.get("name"),
                make_default=opts.get("default", False),
            )
        except LlmosError as e:
            raise to_dbus_error(e) from None
        except OSError as e:
            raise error("InvalidArgument", f"{path}: {e.strerror}") from None
        log.info("model %s imported by %s (uid %s)", model_dir, caller.app_id, caller.uid)
        return str(model_dir)

    @method()
    async def GetStatus(self) -> "a{sv}":
        """The service at a glance, and per app: class, sessions, requests, tokens, KV memory. The per-app
        figures only for root and the daemon's own user (see Daemon.sees_apps); totals for everyone."""
        d = self.daemon
        sees_apps = d.sees_apps(await d.caller(current_sender()))
        snap = d.worker.snapshot()
        sessions = Counter(s.app_id for s in d.sessions.values())
        apps: dict[str, dict[str, Variant]] = {}
        for app in sorted(set(sessions) | set(snap.get("apps", {}))) if sees_apps else ():
            figures = snap.get("apps", {}).get(app, {})
            apps[app] = {
                "priority": Variant("s", d.policy(app).max_priority),
                "sessions": Variant("u", sessions.get(app, 0)),
                **{k: Variant(APP_FIGURES[k], figures.get(k, 0)) for k in APP_FIGURES},
                "device": Variant("s", d.arbiter.device),
            }
        return {
            "version": Variant("u", VERSION),
            "model": Variant("s", d.model.manifest.name),
            "precision": Variant("s", d.model.manifest.precision),
            "state": Variant("s", d.state),
            "device": Variant("s", d.arbiter.device),
            "context_length": Variant("u", d.model.context_length),
            "sessions": Variant("u", len(d.sessions)),
            "sessions_by_app": Variant("a{su}", {a: n for a, n in sessions.items() if a in apps}),
            "active_requests": Variant("u", d.worker.active_jobs()),
            **{k: Variant(sig, snap.get(k, [] if sig == "as" else 0)) for k, sig in ARBITER_FIGURES.items()},
            "apps": Variant("a{sa{sv}}", apps),
            "uptime_s": Variant("d", d.uptime()),
        }

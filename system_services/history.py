"""A conversation given as history: messages of every role that become a session's (or a request's)
past without being generated again, like Chrome's `initialPrompts`.

Used by CreateSession's `messages` option on D-Bus and by the HTTP chat endpoints, so both protocols
accept the same roles and refuse the same things: roles system, user, assistant and tool, text content,
at most MAX_MESSAGES, every text bounded by what the context can hold (`InputBounds`) before any work,
and then the token count: a history that does not fit the context (or the app's `max_context`), with
room for one new token, is refused by name with both lengths, never cut.
"""

from __future__ import annotations

from typing import Any

from llmos.chat_template import ROLES
from llmos.errors import ContextOverflowError, QuotaExceededError
from system_services.dbus_errors import error

MAX_MESSAGES = 4096


def checked_history(raw: Any) -> list[dict[str, str]]:
    """`raw` as a list of {"role", "content"} with known roles; InvalidArgument otherwise."""
    if not isinstance(raw, list) or len(raw) > MAX_MESSAGES:
        raise error("InvalidArgument", f"messages must be a list of at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise error("InvalidArgument", f"messages[{i}] must have exactly the keys role and content")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise error("InvalidArgument", f"messages[{i}]: role is one of {', '.join(ROLES)}, content text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


async def check_history_fits(daemon: Any, messages: list[dict[str, str]], app_id: str) -> int:
    """The history's tokens (as the next turn will see them, with the assistant's header), after its size
    was bounded; ContextOverflowError or QuotaExceededError (app's max_context) when it cannot fit."""
    if not messages:
        return 0
    daemon.bounds.check_messages(messages)
    ids = await daemon.worker.tokenizing.run(lambda: daemon.encode_prompt(messages))
    needed, context = len(ids) + 1, daemon.model.context_length
    most = daemon.policy(app_id).max_context
    if needed > context:
        raise ContextOverflowError(needed, context, "the history (plus one generated token)")
    if most and needed > most:
        raise QuotaExceededError(
            f"{app_id} may use {most} tokens of context per sequence and this history needs {needed}"
        )
    return len(ids)

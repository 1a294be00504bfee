"""Open the model on the first execution provider (NPU, GPU, CPU) that really works, in the configured order.

The daemon's config lists onnxruntime execution providers by preference, e.g. an NPU before the CPU. A
device driver can be missing, the onnxruntime build can lack the provider, or the provider can fail to
initialise; the service must still come up, on the CPU if need be, and say why it is not on the NPU.

onnxruntime's own behaviour is not good enough for that, so each provider is tried alone and checked:
- a name the build does not have is dropped with only a Python warning (or, for an unknown name, the
  session creation fails and the Python wrapper prints "EP Error" to stdout and retries on CPU);
- a session whose provider failed to initialise is silently retried on CPU by the Python wrapper unless
  `enable_fallback=0` is passed;
- a provider can be "in use" yet take none of the graph's nodes (AzureExecutionProvider only runs its own
  remote-call ops), so everything runs on the CPU while get_providers() still names it first.
All three count as failures here, are logged on "llmos.devices", and are returned to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime as ort

from llmos.errors import ModelUnavailableError

log = logging.getLogger("llmos.devices")

CPU = "CPUExecutionProvider"
# Lets a session report which provider got which nodes (recent onnxruntime only); see _takes_no_nodes.
_RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
_MAX_REASON = 300  # characters: onnxruntime messages can carry whole source paths and stack context


@dataclass(frozen=True)
class ProviderFailure:
    provider: str
    reason: str


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def _order(providers: Sequence[str]) -> list[str]:
    """The providers to try: as configured, without repeats, then CPU if it was not listed."""
    # A bare string is a Sequence[str] too; "CPUExecutionProvider" would become 20 one-letter names.
    if isinstance(providers, str) or not isinstance(providers, Sequence):
        raise ValueError(f"providers must be a list of execution provider names, not {providers!r}")
    if not providers:
        raise ValueError("providers must name at least one execution provider")
    bad = [p for p in providers if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"execution provider names must be non-empty strings, not {bad!r}")
    order = list(dict.fromkeys(providers))
    if CPU not in order:
        order.append(CPU)  # the last resort is always the CPU, which every onnxruntime build has
    return order


def _takes_no_nodes(session: ort.InferenceSession, provider: str) -> bool:
    """True when `provider` was given none of the graph's nodes (all of them went to the CPU)."""
    info = getattr(session, "get_provider_graph_assignment_info", None)
    if info is None:  # onnxruntime too old to tell; trust get_providers()
        return False
    try:
        assigned = info()
    except Exception:  # recording not supported for this session: do not fail a working provider on it
        return False
    return not any(sub.ep_name == provider for sub in assigned)


def _try(graph_path: str, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """A session on `provider` alone, or an exception whose message is the reason it is not usable."""
    # enable_fallback=0: otherwise the Python wrapper retries a failing provider on CPU by itself, printing
    # to stdout, and the failure would look like success.
    session = ort.InferenceSession(graph_path, options, providers=[provider], enable_fallback=0)
    in_use = session.get_providers()[0]
    if in_use != provider:
        raise RuntimeError(f"onnxruntime did not enable it and fell back to {in_use}")
    if provider != CPU and _takes_no_nodes(session, provider):
        raise RuntimeError("it took none of the graph's nodes (everything would run on the CPU)")
    return session


def open_session(
    graph_path: str, options: ort.SessionOptions, providers: Sequence[str]
) -> tuple[ort.InferenceSession, str, list[ProviderFailure]]:
    """Open `graph_path` on the first provider of `providers` that works; CPU is tried last regardless.

    Returns the session, the provider it runs on, and the providers that failed before it (in order).
    Raises ValueError for a malformed provider list (empty, not strings: a config bug, which the config layer
    also rejects) and ModelUnavailableError, naming every provider and its reason, when none works (a broken
    graph file fails on every provider, CPU included).

    `options` is shared by every attempt. That is safe: onnxruntime copies the options into each session,
    and a failed attempt leaves them usable (tests/test_devices_pressure.py checks this). The one change
    made to them is switching on the recording of node assignment, needed to see an idle provider.
    """
    order = _order(providers)
    available = ort.get_available_providers()
    if not _recording(options):
        options.add_session_config_entry(_RECORD_ASSIGNMENT, "1")
    failures: list[ProviderFailure] = []
    for provider in order:
        if provider not in available:
            reason = f"not available in this onnxruntime build (available: {', '.join(available)})"
        else:
            try:
                session = _try(graph_path, options, provider)
            except (
                Exception
            ) as e:  # onnxruntime raises its own types (Fail, InvalidProtobuf, NoSuchFile, ...)
                reason = _one_line(e)
            else:
                return session, provider, failures
        log.warning("execution provider %s failed for %s: %s", provider, graph_path, reason)
        failures.append(ProviderFailure(provider, reason))
    detail = "; ".join(f"{f.provider}: {f.reason}" for f in failures)
    raise ModelUnavailableError(
        f"onnxruntime could not load {graph_path} on any execution provider: {detail}"
    )


def _recording(options: ort.SessionOptions) -> bool:
    # Adding a key that is already set makes onnxruntime print a warning to stderr; ask first.
    try:
        return options.get_session_config_entry(_RECORD_ASSIGNMENT) == "1"
    except Exception:  # onnxruntime raises when the key was never set
        return False

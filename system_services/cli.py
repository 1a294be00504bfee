"""llmosctl: manage and try models from a shell.

For now every command runs in-process (no daemon): `model import`, `model list`, `generate` and `chat`.
Later the same front end talks to llmosd over D-Bus.

Every failure llmos raises on purpose ends as one line, `llmosctl: error: <message>`, on stderr and a
nonzero exit: 2 for bad input (a malformed file, an unknown model, an out-of-range option), 1 for other
failures, 130 for Ctrl-C, 143 for SIGTERM. Never a traceback (LLMOS_DEBUG=1 shows one for a real bug).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llmos.errors import InvalidSamplingError, LlmosError
from llmos.precision import PRECISIONS
from system_services import cli_agents, cli_service, cli_top
from system_services.cli_service import UsageError, human_size
from system_services.client import ServiceError

if TYPE_CHECKING:  # the model store pulls in numpy, gguf and onnx: loaded by the commands that use it
    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams
    from llmos.model_store import ModelStore

PROG = "llmosctl"
# D-Bus error names that mean "the caller asked for something wrong": exit 2, like a usage error.
_BAD_INPUT = frozenset({"InvalidArgument", "NotFound", "ContextOverflow"})
EXIT_FAILURE, EXIT_USAGE, EXIT_SIGPIPE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 141, 130, 143


class Terminated(BaseException):
    """Raised from the SIGTERM handler so `finally` blocks (import clean-up) still run."""


# -- small helpers -----------------------------------------------------------------------------------------
def _err(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _store(args: argparse.Namespace) -> ModelStore:
    from llmos.model_store import ModelStore

    return ModelStore(args.store)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


# -- model import / list -------------------------------------------------------------------------------------
def cmd_model_import(args: argparse.Namespace) -> int:
    if args.path is None and not args.default:
        raise UsageError("give a GGUF file to import, or --default for the default model")
    if args.path is None and args.name:
        raise UsageError("--name only applies to importing a GGUF file (the default model has its own name)")
    from llmos.errors import ModelFormatError
    from llmos.manifest import ModelManifest
    from system_services.progress import ImportProgress

    if args.path is not None and not Path(args.path).is_file():  # before "importing ...", not after
        raise ModelFormatError(f"{args.path}: no such model file")
    store = _store(args)
    progress = ImportProgress(sys.stderr)
    t0 = time.monotonic()
    try:
        if args.path is None:
            _note(f"importing the default model ({args.precision}) into {store.root}")
            target = store.import_default(
                args.precision, progress=progress, say=lambda msg: progress.message(f"  {msg}")
            )
        else:
            src = Path(args.path)
            _note(f"importing {src.name} ({args.precision}) into {store.root}")
            target = store.import_gguf(
                src, precision=args.precision, name=args.name, progress=progress, make_default=args.default
            )
    finally:
        progress.close()
    took = time.monotonic() - t0
    m = ModelManifest.read(target)
    rebuilt = "tokenizer" in progress.stages
    is_default = store.default_dir() == target
    print(
        f"{'imported' if rebuilt else 'already imported (same source file)'}: {target.absolute()}"
        f"{' (default model)' if is_default else ''}"
    )
    exact = "yes" if m.exact_weights else "no"
    print(
        f"{m.name}: {m.precision} from {m.source_quant}, exact weights {exact}, "
        f"{human_size(dir_size(target))} on disk, took {took:.1f} s"
    )
    return 0


def _model_rows(store: ModelStore) -> list[dict[str, Any]]:
    default = store.default_dir()
    return [
        {
            "id": d.name,
            "name": m.name,
            "precision": m.precision,
            "source_quant": m.source_quant,
            "context_length": m.context_length,
            "size_bytes": dir_size(d),
            "exact_weights": m.exact_weights,
            "architecture": m.architecture,
            "n_layer": m.n_layer,
            "source_file": m.source_file,
            "default": d == default,
            "path": str(d),
        }
        for d, m in store.list()
    ]


def cmd_model_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = _model_rows(store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        _note(f"no models in {store.root}; run `{PROG} model import --default` to add one")
        return 0
    header = ("", "NAME", "PRECISION", "SOURCE", "CONTEXT", "SIZE")
    table = [header] + [
        (
            "*" if r["default"] else "",
            r["name"],
            r["precision"],
            r["source_quant"],
            str(r["context_length"]),
            human_size(r["size_bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"(* = default; store {store.root})")
    return 0


# -- generation ----------------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace) -> SamplingParams:
    from llmos.engine.sampling import SamplingParams

    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "repetition_penalty": args.repeat_penalty,
    }
    return SamplingParams.of(**{k: v for k, v in options.items() if v is not None})


def _load_engine(args: argparse.Namespace) -> LLMEngine:
    model_dir = _store(args).resolve(args.model)
    from llmos.engine.llm_engine import LLMEngine  # onnxruntime import: only once the model is known

    return LLMEngine(model_dir, threads=args.threads, max_batch=1)


def _stats_line(usage: Any, reason: Any) -> str:
    return (
        f"[prompt {usage.prompt_tokens} tokens, completion {usage.completion_tokens} tokens, "
        f"TTFT {usage.ttft_s * 1000:.0f} ms, decode {usage.decode_tok_s:.1f} tok/s, "
        f"finish {getattr(reason, 'value', reason)}]"
    )


def _stream_to(out: TextIO, chunks: Iterator[Any]) -> tuple[str, Any, Any]:
    """Write streamed text as it comes; return (text, usage, finish reason)."""
    parts: list[str] = []
    usage = reason = None
    with contextlib.closing(chunks):  # an interrupted stream cancels its sequence and frees its KV slot
        for chunk in chunks:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
                parts.append(chunk.text)
            if chunk.finish_reason is not None:
                usage, reason = chunk.usage, chunk.finish_reason
    return "".join(parts), usage, reason


def cmd_generate(args: argparse.Namespace) -> int:
    if args.raw and args.system:
        raise UsageError("--system needs the chat template; it cannot be used with --raw")
    params = _sampling(args)  # bad options fail before a model is loaded
    args.json_schema_text = _read_schema(args.json_schema) if args.json_schema else None
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise InvalidSamplingError("the prompt is empty")
    if args.raw and cli_service.explicit_bus(args):
        raise UsageError(
            f"--raw runs the model in this process (llmosd always applies the chat template); "
            f"drop {cli_service.explicit_bus(args)}"
        )
    client = None if args.raw else cli_service.service_for(args)
    if client is not None:
        with client:
            stats = cli_service.generate(client, text, args)
        if not args.no_stats:
            _note(cli_service.stats_line(stats))
        return 0
    _note_local(args)
    engine = _load_engine(args)
    if args.raw:
        prompt: Any = text
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]
    constraint = None
    if args.json_schema_text is not None:
        from agents.structured_output import StructuredOutput

        constraint = StructuredOutput(engine.tokenizer).constraint(args.json_schema_text)
    out, usage, reason = _stream_to(sys.stdout, engine.stream(prompt, params, constraint=constraint))
    if not out.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.no_stats:
        _note(_stats_line(usage, reason))
    return 0


def _read_schema(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--json-schema {path}: {getattr(e, 'strerror', None) or e}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    from llmos.errors import ChatTemplateError, ContextOverflowError

    params = _sampling(args)
    client = cli_service.service_for(args)
    if client is not None:
        with client:
            return _chat_via_service(client, args)
    _note_local(args)
    engine = _load_engine(args)
    if engine.chat_template is None:
        raise ChatTemplateError(f"{engine.manifest.name} has no chat template; use `{PROG} generate --raw`")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    for line in _chat_turns(lambda: f"{engine.manifest.name} ({engine.manifest.precision})"):
        if line == RESET:
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        try:
            answer, usage, reason = _stream_to(sys.stdout, engine.stream(system + history, params))
        except ContextOverflowError as e:
            history.pop()
            _err(f"{e}; /reset to start a new conversation")
            continue
        except KeyboardInterrupt:
            history.pop()  # the unfinished answer is dropped with its question
            sys.stdout.write("\n")
            _note("(answer interrupted)")
            continue
        history.append({"role": "assistant", "content": answer})
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.no_stats:
            _note(_stats_line(usage, reason))
    return 0


RESET = "/reset"


def _chat_turns(describe: Callable[[], str]) -> Iterator[str]:
    """The user's turns of an interactive or piped chat: stripped text, or RESET. Handles blank lines,
    /quit, /help and the greeting; `describe` names the model (asked only on a terminal)."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        _note(f"chatting with {describe()}; /reset starts over, /quit or Ctrl-D leaves")
    while (raw := _read_turn(interactive)) is not None:
        line = raw.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/") and line.split()[0] in ("/help", "/?"):
            _note("/reset clears the conversation, /quit (or Ctrl-D) leaves")
            continue
        yield line
        if line == RESET:
            _note("(conversation cleared)")
    if interactive:
        sys.stdout.write("\n")


def _note_local(args: argparse.Namespace) -> None:
    if getattr(args, "raw", False) and not args.local:
        _note("--raw: running the model in this process")
    elif not (args.local or args.store or args.model):
        _note("llmosd is not running on the system or session bus: running the model in this process")


def _chat_via_service(client: Any, args: argparse.Namespace) -> int:
    session = client.create_session(system_prompt=args.system)
    options = cli_service.options_from(args)
    for line in _chat_turns(lambda: f"{client.status()['model']} via llmosd"):
        if line == RESET:
            session.close()
            session = client.create_session(system_prompt=args.system)
            continue
        try:
            cli_service.stream_answer(session, line, options)
        except ServiceError as e:
            _err(
                f"{e.message}"
                + ("; /reset to start a new conversation" if "ContextOverflow" in e.name else "")
            )
            continue
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            _note("(answer interrupted)")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.no_stats:
            _note(cli_service.stats_line(session.last_stats))
    return 0


def _service_status(args: argparse.Namespace) -> dict[str, Any]:
    client = cli_service.service_for(args, required=True)
    assert client is not None
    with client:
        return cli_service.status(client)


def cmd_status(args: argparse.Namespace) -> int:
    st = _service_status(args)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        for line in cli_service.format_status(st):
            print(line)
        for line in cli_service.budget_warnings(st):
            print(line)
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    st = _service_status(args)
    by_app: dict[str, int] = st.get("sessions_by_app", {})
    if args.json:
        print(json.dumps({"sessions": st["sessions"], "by_app": by_app}, indent=2, sort_keys=True))
        return 0
    print(f"{st['sessions']} session(s), {st['active_requests']} request(s) running")
    if by_app:
        width = max(len(app) for app in by_app)
        for app, n in sorted(by_app.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {app:<{width}}  {n}")
    return 0


def _read_turn(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


# -- argument parsing ----------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmos")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store", metavar="DIR", help="model store root (default: $LLMOS_MODEL_DIR or ~/.cache/llmos/models)"
    )

    gen = argparse.ArgumentParser(add_help=False, parents=[store])
    gen.add_argument(
        "--model", "-m", metavar="NAME", help="model name or directory (default: the default model)"
    )
    gen.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate (default 256)")
    gen.add_argument("--temperature", "-t", type=float, metavar="T", help="0 is greedy (the default)")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens (0 = off)")
    gen.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (1 = off)")
    gen.add_argument("--repeat-penalty", type=float, metavar="R", help="repetition penalty (1 = off)")
    gen.add_argument("--seed", type=int, metavar="N", help="makes sampled output reproducible")
    gen.add_argument("--stop", action="append", metavar="S", help="stop at this text (repeatable)")
    gen.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    gen.add_argument(
        "--threads", type=_positive_int, default=0, metavar="N", help="CPU threads (0 = all cores)"
    )
    gen.add_argument("--no-stats", action="store_true", help="do not print the stats line on stderr")
    cli_service.add_bus_options(gen, local=True)

    parser = argparse.ArgumentParser(prog=PROG, description="Manage and run llmos models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    st = sub.add_parser("status", help="what llmosd is serving, and how busy it is")
    cli_service.add_bus_options(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status, usage=st.format_usage)

    ss = sub.add_parser("sessions", help="sessions open in llmosd, by app")
    cli_service.add_bus_options(ss)
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    ss.set_defaults(func=cmd_sessions, usage=ss.format_usage)

    tp = sub.add_parser("top", help="watch llmosd's load, memory and apps, like top(1)")
    cli_service.add_bus_options(tp)
    tp.add_argument(
        "--interval",
        type=cli_top.interval_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between frames (default 1.0)",
    )
    tp.add_argument("--once", action="store_true", help="print one frame and exit")
    tp.add_argument("--json", action="store_true", help="the raw status as JSON (one line a frame)")
    tp.set_defaults(func=cli_top.cmd_top, usage=tp.format_usage)

    cli_agents.add_commands(sub)  # agents, tools, run, schedule, jobs

    model = sub.add_parser("model", help="import and list models")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    imp = msub.add_parser(
        "import",
        parents=[store],
        help="import a GGUF file (or the default model)",
        description="Import a GGUF file into the model store, or fetch the default model.",
    )
    imp.add_argument("path", nargs="?", metavar="PATH.gguf", help="the GGUF file to import")
    imp.add_argument(
        "--default",
        action="store_true",
        help="without PATH: fetch and import the default model; with PATH: make it the default",
    )
    imp.add_argument(
        "--precision", choices=PRECISIONS, default="int4", help="weights precision (default int4)"
    )
    imp.add_argument("--name", help="name to import under (default: from the file name)")
    imp.set_defaults(func=cmd_model_import, usage=imp.format_usage)
    lst = msub.add_parser("list", parents=[store], help="list imported models")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_model_list, usage=lst.format_usage)

    g = sub.add_parser(
        "generate",
        parents=[gen],
        help="generate text from a prompt",
        description="Stream a completion to stdout; stats go to stderr.",
    )
    g.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    g.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer with JSON valid against the JSON Schema in FILE (constrained decoding)",
    )
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.set_defaults(func=cmd_generate, usage=g.format_usage)

    c = sub.add_parser(
        "chat",
        parents=[gen],
        help="an interactive multi-turn chat",
        description="Chat on stdin/stdout: /reset starts over, /quit or EOF leaves.",
    )
    c.set_defaults(func=cmd_chat, usage=c.format_usage)
    return parser


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C must interrupt even if the parent started us with SIGINT ignored; SIGTERM unwinds like it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    parser = build_parser()
    args = argparse.Namespace(usage=parser.format_usage)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would name them under the top-level usage; the command's own is the help
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args) or 0
    except UsageError as e:
        sys.stderr.write(args.usage())
        _err(str(e))
        return EXIT_USAGE
    except LlmosError as e:
        _err(str(e))
        return EXIT_USAGE if e.dbus_name in _BAD_INPUT else EXIT_FAILURE
    except ServiceError as e:
        _err(e.message)
        return EXIT_USAGE if e.name.rsplit(".", 1)[-1] in _BAD_INPUT else EXIT_FAILURE
    except KeyboardInterrupt:
        _finish_line()
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        _finish_line()
        _err("terminated")
        return EXIT_TERMINATED
    except BrokenPipeError:
        # the reader went away (`llmosctl generate ... | head`): stop quietly, and keep the interpreter's
        # final flush of stdout from complaining about the closed pipe.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _err(f"{e.strerror or e}{where}")
        return EXIT_FAILURE
    except Exception as e:
        if os.environ.get("LLMOS_DEBUG"):
            traceback.print_exc()
        _err(f"unexpected {type(e).__name__}: {e} (set LLMOS_DEBUG=1 for a traceback)")
        return EXIT_FAILURE


def _finish_line() -> None:
    """After Ctrl-C mid-output, start the error on a fresh line."""
    with contextlib.suppress(Exception):
        if sys.stderr.isatty():
            sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())

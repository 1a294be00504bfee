"""llmosctl as a user runs it: a real subprocess, a temporary store, tiny random GGUFs (no real model)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.tiny_model import write_random_gguf
from system_services.progress import ImportProgress

CLI = [sys.executable, "-m", "system_services.cli"]
STATS = re.compile(
    r"^\[prompt (\d+) tokens, completion (\d+) tokens, TTFT \d+ ms, "
    r"decode [\d.]+ tok/s, finish (\w+)\]$",
    re.M,
)
# Big enough that the graph stage lasts most of a second after its first line, so a signal sent on
# seeing that line lands mid-build (the test fails loudly, rather than passing, if the import won).
BIG_MODEL = {"n_layer": 24, "n_embd": 512, "n_ff": 1024}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LLMOS_MODEL_DIR"] = str(tmp / "not-this-store")  # every test names its store with --store
    env["LLMOS_CACHE_DIR"] = str(tmp / "cache")
    env.pop("LLMOS_DEBUG", None)
    return env


def llmosctl(
    *args: object, tmp: Path, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=_env(tmp),
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("llmosctl: error:")]


def store_leftovers(store: Path) -> list[str]:
    """Everything in a store that is not the lock file: model dirs, temp dirs, DEFAULT pointer."""
    return sorted(p.name for p in store.iterdir() if p.name != ".lock") if store.exists() else []


def assert_clean_failure(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1] == errors[0], "the error is the last thing printed"
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_gguf(tmp: Path) -> Path:
    return write_random_gguf(tmp / "tiny.gguf")


@pytest.fixture(scope="module")
def big_gguf(tmp: Path) -> Path:
    return write_random_gguf(tmp / "big.gguf", **BIG_MODEL)


@pytest.fixture(scope="module")
def store(tmp: Path, tiny_gguf: Path) -> Path:
    """A store with the tiny model imported as the default."""
    root = tmp / "store"
    r = llmosctl("model", "import", tiny_gguf, "--default", "--store", root, tmp=tmp)
    assert r.returncode == 0, r.stderr
    return root


# -- model import / list -------------------------------------------------------------------------------
def test_import_lists_and_reimport_is_a_no_op(tmp_path: Path, tiny_gguf: Path) -> None:
    root = tmp_path / "store"
    r = llmosctl("model", "import", tiny_gguf, "--store", root, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    model_dir = root / "tiny--int4"
    assert (model_dir / "manifest.json").is_file()
    assert str(model_dir) in r.stdout
    summary = r"tiny: int4 from F32, exact weights no, [\d.]+ (KiB|MiB) on disk, took [\d.]+ s"
    assert re.search(summary, r.stdout), r.stdout
    # stderr is not a TTY here: one plain line per stage, no carriage-return bar
    stages = [ln.split(":")[0].strip() for ln in r.stderr.splitlines() if ln.startswith("  ")]
    assert stages == ["hash", "tokenizer", "graph", "check", "digest"], r.stderr
    assert "\r" not in r.stderr

    table = llmosctl("model", "list", "--store", root, tmp=tmp_path)
    assert table.returncode == 0
    row = next(ln for ln in table.stdout.splitlines() if "tiny" in ln)
    assert row.split()[:4] == ["tiny", "int4", "F32", "256"] and re.search(r"[\d.]+ KiB$", row), row
    assert not row.startswith("*"), "not imported with --default"
    listed = json.loads(llmosctl("model", "list", "--json", "--store", root, tmp=tmp_path).stdout)
    assert [(m["name"], m["precision"], m["context_length"], m["default"]) for m in listed] == [
        ("tiny", "int4", 256, False)
    ]
    assert listed[0]["size_bytes"] > 0 and Path(listed[0]["path"]) == model_dir

    graph_mtime = (model_dir / "model.onnx").stat().st_mtime_ns
    again = llmosctl("model", "import", tiny_gguf, "--store", root, tmp=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already imported" in again.stdout and str(model_dir) in again.stdout
    assert "graph:" not in again.stderr, "nothing is rebuilt"
    assert (model_dir / "model.onnx").stat().st_mtime_ns == graph_mtime
    assert store_leftovers(root) == ["tiny--int4"]


def test_import_with_default_and_name_marks_the_default(tmp_path: Path, tiny_gguf: Path) -> None:
    root = tmp_path / "store"
    r = llmosctl(
        "model",
        "import",
        tiny_gguf,
        "--name",
        "pocket",
        "--precision",
        "int8",
        "--default",
        "--store",
        root,
        tmp=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "(default model)" in r.stdout
    listed = json.loads(llmosctl("model", "list", "--json", "--store", root, tmp=tmp_path).stdout)
    assert [(m["id"], m["default"]) for m in listed] == [("pocket--int8", True)]
    table = llmosctl("model", "list", "--store", root, tmp=tmp_path).stdout
    assert re.search(r"^\*\s+pocket\s+int8\s", table, re.M), table


def test_empty_store_lists_nothing_and_generate_says_how_to_import(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    listed = llmosctl("model", "list", "--json", "--store", root, tmp=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    r = llmosctl("generate", "--store", root, "hi", tmp=tmp_path)
    assert_clean_failure(r, 2, "no default model", "llmosctl model import --default")


@pytest.mark.parametrize("damage", ["truncated", "not-gguf"])
def test_bad_gguf_fails_cleanly_and_leaves_nothing(tmp_path: Path, tiny_gguf: Path, damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        data = tiny_gguf.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = "truncated"
    else:
        bad.write_text("this is a text file, not a model\n" * 10)
        expected = "not a GGUF file"
    root = tmp_path / "store"
    r = llmosctl("model", "import", bad, "--store", root, tmp=tmp_path)
    line = assert_clean_failure(r, 2, expected)
    assert "bad.gguf" in line, "the error names the file"
    assert store_leftovers(root) == []


def test_import_of_a_missing_file_and_without_a_source_are_usage_errors(tmp_path: Path) -> None:
    root = tmp_path / "store"
    r = llmosctl("model", "import", tmp_path / "nope.gguf", "--store", root, tmp=tmp_path)
    assert_clean_failure(r, 2, "nope.gguf", "no such model file")
    r = llmosctl("model", "import", "--store", root, tmp=tmp_path)
    assert_clean_failure(r, 2, "give a GGUF file to import, or --default")
    assert r.stderr.startswith("usage: llmosctl model import")
    assert store_leftovers(root) == []


def _import_until_graph_then(sig: signal.Signals, gguf: Path, root: Path, tmp: Path) -> tuple[int, str]:
    """Start an import, send `sig` as soon as it reports the graph stage; return (exit code, stderr)."""
    proc = subprocess.Popen(
        [*CLI, "model", "import", str(gguf), "--precision", "fp32", "--store", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
    )
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("  graph:"):
            proc.send_signal(sig)
            break
    _out, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert any(ln.startswith("  graph:") for ln in seen), stderr
    return proc.returncode, stderr


def test_ctrl_c_during_import_leaves_nothing(tmp_path: Path, big_gguf: Path) -> None:
    root = tmp_path / "store"
    code, stderr = _import_until_graph_then(signal.SIGINT, big_gguf, root, tmp_path)
    assert code == 130, f"the import was not interrupted (exit {code}):\n{stderr}"
    assert error_lines(stderr) == ["llmosctl: error: interrupted"]
    assert "Traceback" not in stderr
    assert store_leftovers(root) == [], "no model dir and no temp dir after Ctrl-C"


def test_killed_import_leaves_no_model_and_next_import_cleans_up(tmp_path: Path, big_gguf: Path) -> None:
    root = tmp_path / "store"
    code, stderr = _import_until_graph_then(signal.SIGKILL, big_gguf, root, tmp_path)
    assert code == -signal.SIGKILL, f"the import was not killed mid-way (exit {code}):\n{stderr}"
    left = store_leftovers(root)
    assert not (root / "big--fp32").exists()
    assert left and all(n.startswith(".import-") for n in left), left  # SIGKILL: no chance to clean up
    assert json.loads(llmosctl("model", "list", "--json", "--store", root, tmp=tmp_path).stdout) == []

    r = llmosctl("model", "import", big_gguf, "--precision", "fp32", "--store", root, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (root / "big--fp32" / "manifest.json").is_file()
    assert store_leftovers(root) == ["big--fp32"], "the stale temp dir is gone"


# -- generate --------------------------------------------------------------------------------------------
def test_generate_streams_text_and_reports_stats(tmp: Path, store: Path) -> None:
    args = (
        "generate",
        "--store",
        store,
        "--raw",
        "--max-tokens",
        "5",
        "--seed",
        "1",
        "--temperature",
        "0.8",
        "Hello world",
    )
    r = llmosctl(*args, tmp=tmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "some text"
    stats = STATS.findall(r.stderr)
    assert len(stats) == 1, r.stderr
    prompt_tokens, completion_tokens, finish = stats[0]
    assert int(prompt_tokens) == 2  # "Hello" + " world" in the tiny vocabulary, raw: no template
    assert 1 <= int(completion_tokens) <= 5 and finish in ("length", "stop")
    assert llmosctl(*args, tmp=tmp).stdout == r.stdout, "same seed, same text"


def test_generate_applies_the_chat_template_unless_raw(tmp: Path, store: Path) -> None:
    base = ("generate", "--store", store, "--max-tokens", "2")
    raw = STATS.findall(llmosctl(*base, "--raw", "Hello", tmp=tmp).stderr)
    chat = STATS.findall(llmosctl(*base, "Hello", tmp=tmp).stderr)
    system = STATS.findall(llmosctl(*base, "--system", "Be brief", "Hello", tmp=tmp).stderr)
    # "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" is far longer than "Hello"
    assert int(raw[0][0]) == 1 and int(chat[0][0]) > 5 and int(system[0][0]) > int(chat[0][0])


def test_generate_reads_the_prompt_from_stdin(tmp: Path, store: Path) -> None:
    from_arg = llmosctl("generate", "--store", store, "--max-tokens", "4", "Hello world", tmp=tmp)
    from_stdin = llmosctl(
        "generate", "--store", store, "--max-tokens", "4", "-", tmp=tmp, stdin="Hello world\n"
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_arg.stdout
    assert STATS.findall(from_stdin.stderr)[0][0] == STATS.findall(from_arg.stderr)[0][0]


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--temperature", "-1", "temperature"),
        ("--max-tokens", "0", "max_tokens"),
        ("--top-p", "0", "top_p"),
    ],
)
def test_generate_rejects_bad_options(tmp: Path, store: Path, option: str, value: str, named: str) -> None:
    r = llmosctl("generate", "--store", store, option, value, "Hello", tmp=tmp)
    assert_clean_failure(r, 2, "invalid generation options", named)
    assert r.stdout == ""


def test_generate_unknown_model(tmp: Path, store: Path) -> None:
    r = llmosctl("generate", "--store", store, "--model", "no-such-model", "Hello", tmp=tmp)
    assert_clean_failure(r, 2, "no model named 'no-such-model'", "tiny--int4")


def test_generate_usage_errors(tmp: Path, store: Path) -> None:
    r = llmosctl("generate", "--store", store, "--raw", "--system", "x", "Hello", tmp=tmp)
    assert_clean_failure(r, 2, "--system", "--raw")
    r = llmosctl("generate", "--store", store, "-", tmp=tmp, stdin="  \n")
    assert_clean_failure(r, 2, "the prompt is empty")
    r = llmosctl("generate", "--store", store, "--max-tokens", "many", "Hello", tmp=tmp)
    assert r.returncode == 2 and "invalid int value: 'many'" in r.stderr and "Traceback" not in r.stderr


# -- chat -------------------------------------------------------------------------------------------------
def test_chat_keeps_history_across_turns(tmp: Path, store: Path) -> None:
    r = llmosctl("chat", "--store", store, "--max-tokens", "3", tmp=tmp, stdin="Hello\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and not error_lines(r.stderr)
    turns = STATS.findall(r.stderr)
    assert len(turns) == 2, r.stderr  # two answers, then EOF ends the session
    (p1, c1, _), (p2, _c2, _) = turns
    # the second prompt re-renders the whole conversation: turn 1, its answer, then the new question
    assert int(p2) > int(p1) + int(c1)
    assert r.stdout.count("\n") >= 2


def test_chat_reset_and_quit(tmp: Path, store: Path) -> None:
    r = llmosctl(
        "chat",
        "--store",
        store,
        "--max-tokens",
        "3",
        tmp=tmp,
        stdin="Hello\n/reset\nHello\n/quit\nnever asked\n",
    )
    assert r.returncode == 0, r.stderr
    turns = STATS.findall(r.stderr)
    assert len(turns) == 2, r.stderr  # the line after /quit is not answered
    assert turns[0] == turns[1], "after /reset the conversation starts from scratch"
    assert "conversation cleared" in r.stderr
    half = len(r.stdout) // 2  # greedy: the same answer twice, each ended by a newline
    assert r.stdout and r.stdout[:half] == r.stdout[half:] and r.stdout.endswith("\n")


def test_chat_with_an_unknown_model_fails_cleanly(tmp: Path, store: Path) -> None:
    r = llmosctl("chat", "--store", store, "--model", "ghost", tmp=tmp, stdin="Hello\n")
    assert_clean_failure(r, 2, "no model named 'ghost'")


# -- progress bar -----------------------------------------------------------------------------------------
def test_progress_bar_on_a_terminal_redraws_one_line_per_stage() -> None:
    out = io.StringIO()
    p = ImportProgress(out, tty=True, width=10)
    for event in [("hash", 0, 1), ("hash", 1, 1), ("graph", 1, 2), ("graph", 2, 2), ("check", 0, 1)]:
        p(*event)
    p.message("a note")
    p.close()
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("checksum     [##########] 1/1  0.0 s")
    assert "[#####-----] 1/2" in lines[1] and lines[1].endswith("[##########] 2/2  0.0 s")
    assert lines[2].endswith("load check   [----------] 0/1")
    assert lines[3] == "a note" and lines[4] == ""


def test_generate_with_a_json_schema_answers_valid_json(tmp: Path, store: Path) -> None:
    """The tiny model is random weights: only the constraint can make its answer valid JSON."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    (tmp / "schema.json").write_text(json.dumps(schema))
    for seed in range(3):
        r = llmosctl(
            "generate",
            "--store",
            store,
            "--json-schema",
            tmp / "schema.json",
            "-t",
            "1",
            "--seed",
            seed,
            "--max-tokens",
            "64",
            "Hello",
            tmp=tmp,
        )
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), schema)
    (tmp / "bad.json").write_text('{"type": "nonsense"}')
    bad = llmosctl("generate", "--store", store, "--json-schema", tmp / "bad.json", "Hello", tmp=tmp)
    assert_clean_failure(bad, 2, "json_schema cannot be used")
    missing = llmosctl("generate", "--store", store, "--json-schema", tmp / "nope.json", "Hello", tmp=tmp)
    assert_clean_failure(missing, 2, "--json-schema", "No such file")

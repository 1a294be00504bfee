"""A damaged model is refused, by name, wherever it is loaded: never served as garbage.

Real parts only: tiny random-weight models imported into temporary stores, the engine, llmosctl and
llmosd as processes on a private dbus-daemon. Each test damages a model the way it happens (flipped
bytes, a changed or deleted file, a lost manifest) and checks what the user sees: the error's name, one
line naming the file, and a fix command that really works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, busctl, client, wait_until

from llmos.default_model import DEFAULT_MODEL_NAME, GGUF_SHA256
from llmos.engine.llm_engine import LLMEngine
from llmos.errors import ModelCorruptError
from llmos.manifest import MANIFEST_FILE, ModelManifest
from llmos.model_integrity import ModelCheck
from llmos.model_store import ModelStore
from llmos.reimport import reimport_command
from llmos.tiny_model import write_random_gguf

CLI = [sys.executable, "-m", "system_services.cli"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf", weight_type="Q4_1", seed=5)


@pytest.fixture
def store(tmp_path: Path, gguf: Path) -> Path:
    """A fresh store per test (tests damage it) whose default model is "tiny"."""
    root = tmp_path / "store"
    ModelStore(root).import_gguf(gguf, name="tiny", make_default=True)
    return root


def model(store: Path) -> Path:
    return store / "tiny--int4"


def flip_bytes(path: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of the file, in place (same size, as bit rot or a bad copy)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def refused(model_dir: Path) -> str:
    with pytest.raises(ModelCorruptError) as e:
        LLMEngine(model_dir, threads=1)
    message = str(e.value)
    assert "\n" not in message and e.value.dbus_name == "ModelUnavailable"
    return message


def llmosctl(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMOS_MODEL_DIR": str(cwd / "not-this-store"), "PYTHONPATH": str(REPO)}
    env.pop("LLMOS_DEBUG", None)
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


def run_fix(message: str, gguf: Path) -> subprocess.CompletedProcess[str]:
    """Run the command the message gives, as typed, from the directory holding the GGUF it names."""
    command = shlex.split(message.split("re-import it: ", 1)[1])
    assert command[:3] == ["llmosctl", "model", "import"], message
    return llmosctl(*command[1:], cwd=gguf.parent)


# -- import records, load checks ----------------------------------------------------------------------------
def test_import_records_the_size_and_sha256_of_every_file_it_wrote(store: Path) -> None:
    d = model(store)
    files = ModelManifest.read(d).files
    on_disk = {p.name for p in d.iterdir() if p.name != MANIFEST_FILE}
    assert set(files) == on_disk
    assert on_disk >= {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"}
    for name, digest in files.items():
        data = (d / name).read_bytes()
        assert (digest.size, digest.sha256) == (len(data), hashlib.sha256(data).hexdigest()), name


def test_an_intact_model_loads_and_answers(store: Path) -> None:
    engine = LLMEngine(model(store), threads=1)
    assert engine.generate("Hello", max_tokens=4).usage.completion_tokens == 4


def test_flipped_bytes_in_the_weights_are_refused_naming_the_file_and_the_fix(
    store: Path, gguf: Path
) -> None:
    flip_bytes(model(store) / "model.onnx.data")
    message = refused(model(store))
    assert message.startswith(f"{model(store) / 'model.onnx.data'} does not match its digest from import")
    assert message.endswith(f"re-import it: llmosctl model import tiny.gguf --name tiny --store {store}")
    # the command in the message repairs the model: a plain re-import rebuilds a damaged directory
    fix = run_fix(message, gguf)
    assert fix.returncode == 0, fix.stderr
    assert fix.stdout.startswith("imported: "), fix.stdout  # not "already imported (same source file)"
    assert LLMEngine(model(store), threads=1).generate("Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_reload_reads_only_what_changed_and_a_write_with_its_mtime_put_back_is_still_caught(
    store: Path,
) -> None:
    d, weights = model(store), model(store) / "model.onnx.data"
    m = ModelManifest.read(d)
    LLMEngine(d, threads=1, warmup=False)  # the first load in this process reads every file
    again = ModelCheck.start(d, m)
    again.wait()
    assert again.hashed == [], "a reload of an unchanged model reads nothing"
    before = weights.stat()
    flip_bytes(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # hide the write from mtime
    assert weights.stat().st_mtime_ns == before.st_mtime_ns
    assert refused(d).startswith(f"{weights} does not match its digest from import")


def test_a_changed_tokenizer_is_refused_naming_it(store: Path) -> None:
    path = model(store) / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    assert "<|im_end|>" in text
    path.write_text(text.replace("<|im_end|>", "<|im_enD|>"), encoding="utf-8")  # still valid, same size
    message = refused(model(store))
    assert message.startswith(f"{path} does not match its digest from import (damaged or changed since)")


def test_a_changed_graph_is_refused_before_onnxruntime_parses_it(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flip_bytes(model(store) / "model.onnx")
    with caplog.at_level(logging.DEBUG):
        message = refused(model(store))
    assert message.startswith(f"{model(store) / 'model.onnx'} does not match its digest from import")
    tried = [r.getMessage() for r in caplog.records if r.name == "llmos.devices"]
    assert tried == [], "onnxruntime was given the damaged graph"


def test_a_missing_or_truncated_weight_file_is_refused_before_anything_is_read(store: Path) -> None:
    weights = model(store) / "model.onnx.data"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    message = refused(model(store))
    assert message.startswith(f"{weights} is {size - 100} bytes but import wrote {size} (truncated")
    weights.unlink()
    assert refused(model(store)).startswith(f"{weights} is missing (a damaged import, or deleted since)")


def test_a_model_imported_before_digests_loads_with_one_warning_and_a_reimport_adds_them(
    store: Path, gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = model(store)
    ModelManifest.read(d).model_copy(update={"files": {}}).write(d)  # as written before this change
    with caplog.at_level(logging.WARNING, logger="llmos.integrity"):
        LLMEngine(d, threads=1, warmup=False)
        LLMEngine(d, threads=1, warmup=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmos.integrity"]
    assert warnings == [
        f"{d} was imported before llmos recorded file digests, so damage to its files cannot be detected; "
        f"re-import it to get verification: llmosctl model import tiny.gguf --name tiny --store {store}"
    ]
    # the files the engine opens must still be there, and a missing one is named
    (d / "tokenizer.json").rename(d / "tokenizer.json.away")
    assert refused(d).startswith(f"{d / 'tokenizer.json'} is missing (a damaged import)")
    (d / "tokenizer.json.away").rename(d / "tokenizer.json")
    # the re-import the warning gives rebuilds the model, now with digests
    ModelStore(store).import_gguf(gguf, name="tiny")
    assert set(ModelManifest.read(d).files) >= {"model.onnx", "model.onnx.data", "tokenizer.json"}


def test_the_fix_for_the_default_model_is_import_default_and_names_a_store_set_by_environment(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = model(store)
    m = ModelManifest.read(d).model_copy(
        update={"name": DEFAULT_MODEL_NAME, "source_sha256": GGUF_SHA256, "precision": "int8"}
    )
    assert reimport_command(d, m) == f"llmosctl model import --default --precision int8 --store {store}"
    # the system service finds its store through LLMOS_MODEL_DIR, which the admin's shell does not have
    monkeypatch.setenv("LLMOS_MODEL_DIR", str(store))
    assert reimport_command(d, m).endswith(f"--store {store}")
    monkeypatch.delenv("LLMOS_MODEL_DIR")
    monkeypatch.setenv("LLMOS_CACHE_DIR", str(store.parent / "cache"))
    in_user_store = store.parent / "cache" / "models" / d.name  # the plain per-user store: nothing to add
    assert reimport_command(in_user_store, m) == "llmosctl model import --default --precision int8"


# -- a directory without its manifest -----------------------------------------------------------------------
def test_a_default_model_without_its_manifest_says_so_and_how_to_fix_it(store: Path, gguf: Path) -> None:
    (model(store) / MANIFEST_FILE).unlink()
    r = llmosctl("generate", "--local", "--store", store, "Hello", cwd=store.parent)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        f"llmosctl: error: {model(store)} has no manifest.json (an incomplete or damaged import); "
        f"re-import it: llmosctl model import PATH.gguf --name tiny --store {store}"
    ]
    # by name too, and the engine opened on the directory itself says what is missing
    with pytest.raises(ModelCorruptError, match=r"tiny--int4 has no manifest\.json \(an incomplete"):
        ModelStore(store).resolve("tiny--int4")
    with pytest.raises(Exception, match=r"tiny--int4 has no manifest\.json \(an incomplete"):
        LLMEngine(model(store))
    fix = llmosctl("model", "import", gguf, "--name", "tiny", "--store", store, cwd=store.parent)
    assert fix.returncode == 0, fix.stderr
    assert (model(store) / MANIFEST_FILE).is_file()


def test_a_default_pointer_to_a_deleted_model_says_so(store: Path) -> None:
    os.rename(model(store), store / ".gone")
    with pytest.raises(ModelCorruptError) as e:
        ModelStore(store).resolve()
    assert str(e.value) == (
        f"the default model {model(store)} is missing from the store ({store / 'DEFAULT'} names it); "
        f"re-import it: llmosctl model import PATH.gguf --name tiny --store {store}"
    )


# -- the daemon ---------------------------------------------------------------------------------------------
def test_llmosd_refuses_to_start_on_a_damaged_model_with_one_line_and_no_traceback(
    store: Path, tmp_path: Path
) -> None:
    flip_bytes(model(store) / "model.onnx.data")
    bus = PrivateBus(tmp_path)
    try:
        config = tmp_path / "llmosd.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
        daemon = ["-m", "system_services.daemon", "--address", bus.address, "--store", str(store)]
        r = subprocess.run(
            [sys.executable, *daemon, "--config", str(config), "--threads", "1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        bus.stop()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR llmosd: {model(store) / 'model.onnx.data'} does not match its digest from import (damaged or "
        f"changed since); re-import it: llmosctl model import tiny.gguf --name tiny --store {store}"
    ], r.stderr
    assert not any("serving" in line for line in r.stderr.splitlines())


def test_a_file_damaged_while_llmosd_runs_is_caught_when_the_model_reloads(
    store: Path, gguf: Path, tmp_path: Path
) -> None:
    bus = PrivateBus(tmp_path)
    config = tmp_path / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[arbiter]\nidle_unload_s = 0.5\n')
    d = Daemon(bus.address, store, "--config", str(config), "--threads", "1")
    try:

        def state() -> str:
            out = busctl(
                bus.address, "get-property", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "State"
            )
            return out.stdout.split()[-1].strip('"')

        assert wait_until(lambda: state() == "unloaded", 15)
        flip_bytes(model(store) / "model.onnx.data")
        out = client(bus.address, "generate", "hello", json.dumps({"max_tokens": 2}))
        weights = model(store) / "model.onnx.data"
        assert out["error"] == "org.llmos.Error.ModelUnavailable", out
        assert out["message"] == (
            f"{weights} does not match its digest from import (damaged or changed since); "
            f"re-import it: llmosctl model import tiny.gguf --name tiny --store {store}"
        )
        assert state() == "error"
        assert wait_until(lambda: any("cannot load the model again: " in line for line in d.log), 5), d.log
        # the next request tries again: once the model is imported again, it is served
        ModelStore(store).import_gguf(gguf, name="tiny")
        out = client(bus.address, "generate", "hello", json.dumps({"max_tokens": 2}))
        assert out["stats"]["tokens_out"] == 2, out
        d.stop_cleanly()
    finally:
        d.stop()
        bus.stop()

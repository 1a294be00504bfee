"""A swap directory on a full disk: sessions keep answering, the log says so once, status shows it.

The incident this guards: the daemon's swap directory on a 2 MB tmpfs filled up; no session was lost,
but the log got 1,552 identical ERROR lines in two minutes and the KV stayed over its budget with no
figure showing it. The disk here is a real full filesystem: a small tmpfs mounted for the test and
filled with a file until the kernel says ENOSPC, so every swap write fails the way it does in the field
(a read-only directory would not do: the tests run as root, who writes anyway). Freeing the filler is
the administrator freeing space. Mounting needs root (CAP_SYS_ADMIN), which CI has; elsewhere the
tests skip and say so.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, client, read_json, start_client, tiny_store, wait_until

from llmos.arbiter.arbiter import Arbiter
from llmos.arbiter.policy import ArbiterConfig
from llmos.arbiter.request import Request
from llmos.arbiter.swap_store import SwapStore
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.errors import SwapFileError
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf
from system_services.llm_object import ARBITER_FIGURES

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


class SmallDisk:
    """A tmpfs of `size` mounted at `path`; fill() takes every free block, free() gives them back."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.filler = path / "filler"
        path.mkdir()
        try:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                capture_output=True,
                text=True,
            )
            problem = r.stderr.strip() if r.returncode else ""
        except FileNotFoundError:
            problem = "no mount(8)"
        if problem:
            pytest.skip(f"cannot mount a tmpfs for a real full disk (needs root, as in CI): {problem}")

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:  # unbuffered: nothing left to fail on close
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    d = SmallDisk(tmp_path / "swapfs", "1m")
    yield d
    d.unmount()


# -- the arbiter in process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    gguf = write_random_gguf(
        tmp / "m.gguf",
        n_layer=2,
        n_embd=64,
        n_ff=128,
        n_head=4,
        n_head_kv=2,
        seed=11,
        weight_type="F32",
        context_length=1024,  # room for six turns of four sessions
    )
    return ModelStore(tmp / "store").import_gguf(gguf, precision="fp32")


def _arbiter(model_dir: Path, swap_root: Path) -> Arbiter:
    def load() -> LLMEngine:
        return LLMEngine(model_dir, threads=1, warmup=False, max_batch=4, prefill_chunk=16)

    return Arbiter(load, ArbiterConfig(), SwapStore(swap_root, model_key="tiny"))


class Conversations:
    """A few sessions, each turn run to the end; every answer and where its KV came from."""

    def __init__(self, arb: Arbiter, n: int) -> None:
        self.arb = arb
        self.messages: list[list[dict[str, str]]] = [
            [{"role": "system", "content": f"You are terse, number {i}."}] for i in range(n)
        ]
        self.outputs: list[list[list[int]]] = [[] for _ in range(n)]
        self.sources: list[list[str]] = [[] for _ in range(n)]

    def turn(self, i: int) -> None:
        msgs = self.messages[i]
        msgs.append({"role": "user", "content": f"question {len(msgs)} about things"})
        req = Request(list(msgs), GREEDY, app_id="a", session_key=f"/s/{i}")
        self.arb.submit(req)
        while self.arb.step():
            pass
        assert req.done and req.error is None and req.seq is not None, req.error
        self.outputs[i].append(list(req.seq.output_ids))
        self.sources[i].append(req.restored_from)
        msgs.append({"role": "assistant", "content": req.seq.detok.text})


def test_a_full_swap_disk_logs_one_error_keeps_every_session_and_recovers(
    model_dir: Path, disk: SmallDisk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmos")
    reference = Conversations(_arbiter(model_dir, tmp_path / "plain"), 4)  # budget never reached
    arb = _arbiter(model_dir, disk.path / "swap")
    arb.kv.budget_bytes = 1  # every idle session belongs on disk
    failed_writes = []
    real_write = arb.kv.swap.write  # type: ignore[union-attr]

    def write(*args: object, **kw: object) -> int:  # count what the filesystem refuses, change nothing
        try:
            return real_write(*args, **kw)  # type: ignore[arg-type]
        except SwapFileError as e:
            failed_writes.append(e)
            raise

    arb.kv.swap.write = write  # type: ignore[union-attr,method-assign]
    disk.fill()
    talk = Conversations(arb, 4)
    for _ in range(5):
        for i in range(4):
            talk.turn(i)
            reference.turn(i)

    snap = arb.snapshot()
    assert len(failed_writes) >= 20 and all("No space left" in str(e) for e in failed_writes)
    assert snap["swap_failures"] == len(failed_writes) and snap["swap_outs"] == 0
    assert 0 < snap["kv_over_budget_bytes"] <= snap["kv_bytes"]
    assert set(ARBITER_FIGURES) <= set(snap)  # the snapshot keys are GetStatus's names
    # nothing lost: every turn answered, from the KV kept in memory, with the tokens of a roomy daemon
    assert talk.outputs == reference.outputs
    assert all(src == ["", "memory", "memory", "memory", "memory"] for src in talk.sources), talk.sources
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert errors[0].levelno == logging.ERROR and "No space left on device" in line
    assert f"free space in {disk.path / 'swap'}" in line and "kv_budget_mib" in line and "swap_dir" in line

    disk.free()  # the administrator makes room: the next try swaps everything out, no request needed
    assert arb.retry_swap_out() == 0
    snap = arb.snapshot()
    assert snap["kv_over_budget_bytes"] == 0 and snap["swap_outs"] == 4 and snap["kv_swapped_bytes"] > 0
    recovered = [r.getMessage() for r in caplog.records if "work again" in r.getMessage()]
    assert len(recovered) == 1 and f"after {len(failed_writes)} failures since" in recovered[0], recovered
    talk.turn(2)  # and a session comes back from disk as usual
    assert talk.sources[2][-1] == "disk"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == errors


# -- llmosd on a private bus ----------------------------------------------------------------------------
def test_llmosd_with_a_full_swap_disk_shows_it_in_status_and_does_not_flood_its_log(
    disk: SmallDisk, tmp_path: Path
) -> None:
    store = tiny_store(tmp_path)
    bus = PrivateBus(tmp_path)
    config = tmp_path / "llmosd.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[arbiter]\nkv_budget_mib = 0\nswap_dir = "{disk.path}"\n'
        # no real memory pressure (100 %), but a check, and so a swap retry, twice a second
        "memory_pressure_pct = 100\npressure_check_s = 0.5\n"
    )
    d = Daemon(bus.address, store, "--config", str(config), "--threads", "2")
    try:
        disk.fill()
        opts = json.dumps({"max_tokens": 8, "ignore_eos": True, "temperature": 0})
        prompts = [f"question {i}" for i in range(12)]
        talk = start_client(bus.address, "converse", "Be terse.", opts, *prompts, "-", "and then?")
        paused = read_json(talk, timeout=120)
        assert [t.get("error") for t in paused["turns"]] == [None] * 12, paused
        assert {t["stats"]["kv_source"] for t in paused["turns"][1:]} == {"memory"}
        st = client(bus.address, "status")
        assert st["swap_failures"] >= 12 and st["swap_outs"] == 0, st
        assert st["kv_over_budget_bytes"] > 0
        for command in ("top --once", "status"):
            shown = subprocess.run(
                [sys.executable, "-m", "system_services.cli", *command.split(), "--address", bus.address],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            assert "KV over budget by " in shown.stdout and "swap writes failing (" in shown.stdout, shown

        disk.free()  # the retry at the next memory check swaps the session out; no request needed
        assert wait_until(lambda: client(bus.address, "status")["kv_over_budget_bytes"] == 0, 20)
        st = client(bus.address, "status")
        assert st["swap_outs"] >= 1 and st["kv_swapped_bytes"] > 0, st
        assert talk.stdin is not None
        talk.stdin.write("go on\n")
        talk.stdin.flush()
        out = read_json(talk, timeout=120)
        assert out["turns"][-1]["stats"]["kv_source"] == "disk", out["turns"][-1]
        talk.wait(30)
    finally:
        d.stop_cleanly()
        bus.stop()
    failures = [line for line in d.log if line.startswith(("ERROR", "WARNING")) and "swap" in line]
    assert len(failures) == 1, "\n".join(d.log)
    assert "No space left on device" in failures[0] and "kv_budget_mib" in failures[0]
    assert len([line for line in d.log if "work again after" in line]) == 1, "\n".join(d.log)
    assert len(d.log) < 40, "\n".join(d.log)  # the whole log of the run, not one line per failure

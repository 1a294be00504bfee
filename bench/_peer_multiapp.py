"""llama.cpp (llama-cpp-python) side of bench/multiapp.py: context switch cost and per-app memory.

Run as a child, it reads a JSON config on stdin and prints one result line (see _common.emit). Like
_peer_llamacpp.py it imports neither llmos nor onnxruntime, so its memory is llama.cpp's (plus Python and
numpy). Two modes:

* ``state``: load the model, ``llm.eval(prompt[:-1])`` and save the context with llama.cpp's own state
  file API (``llama_state_save_file``: the used KV cells and the token ids). Then, per round: clear the KV
  cache and time ``llama_state_load_file`` + ``llm.eval([last prompt token])`` + argmax (as llama-cli's
  prompt cache does: in this llama.cpp the logits read after a state load are not the saved ones, so one
  token is evaluated to get the next token's logits); the same with the file's page cache dropped first
  (fsync + POSIX_FADV_DONTNEED, no root needed); the same from an in-memory copy
  (``llama_state_get_data``/``llama_state_set_data``, reported separately); and clear the KV cache and
  time ``llm.eval(prompt)`` + argmax (re-prefill). The greedy next token of every path must match.
* ``hold``: load the model, ``llm.eval(prompt)``, write {pid, own Rss/Pss} to ``ready_file``, then sleep
  until ``stop_file`` exists or ``hold_s`` passes, so a parent can measure several such apps at once.

The parent side (import from bench/multiapp.py; neither imports llama_cpp):
``measure_llamacpp_state(...)`` and ``measure_llamacpp_processes(...)``.

    echo '{"mode": "state", "gguf": ..., "prompt_ids": [...], "n_ctx": 2048, "threads": 2, "rounds": 5}' \
        | python bench/_peer_multiapp.py
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty")


def smaps_rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss and their parts from /proc/PID/smaps_rollup, in MB. Pss splits each shared page (the
    mmapped GGUF's page-cache pages) among the processes mapping it; Rss counts it in full in each."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in SMAPS_FIELDS:
                out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024  # "<n> kB"
    return out


# -- the child ----------------------------------------------------------------------------------------------
def _load(cfg: dict[str, Any]) -> tuple[Any, Any, float]:
    import llama_cpp  # after reading the config: its import time is not load time

    threads = int(cfg["threads"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=cfg["gguf"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=int(cfg.get("n_ctx", 2048)),
        n_batch=int(cfg.get("n_batch", 512)),
        verbose=False,
    )
    return llama_cpp, llm, time.perf_counter() - t0


def _clear(llama_cpp: Any, llm: Any) -> None:
    """Empty the context: Llama.reset() only rewinds n_tokens, so also clear llama.cpp's KV memory."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def state_child(cfg: dict[str, Any]) -> None:
    import ctypes

    import numpy as np

    llama_cpp, llm, load_s = _load(cfg)
    prompt, rounds = [int(t) for t in cfg["prompt_ids"]], int(cfg.get("rounds", 5))
    n, n_vocab, ctx = len(prompt), llm.n_vocab(), llm.ctx

    def last_logits() -> Any:
        # logits_all is off, so llama.cpp keeps only the last evaluated position's row.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

    def ms(t0: float) -> float:
        return (time.perf_counter() - t0) * 1000

    def save(path: Path, ids: list[int]) -> int:
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        if not llama_cpp.llama_state_save_file(ctx, str(path).encode(), arr, len(ids)):
            raise RuntimeError(f"llama_state_save_file({path}) failed")
        return path.stat().st_size

    def load(path: Path) -> list[int]:
        out, count = (llama_cpp.llama_token * n)(), ctypes.c_size_t(0)
        if not llama_cpp.llama_state_load_file(ctx, str(path).encode(), out, n, ctypes.byref(count)):
            raise RuntimeError(f"llama_state_load_file({path}) failed")
        ids = list(out[: count.value])
        llm.n_tokens = len(ids)  # keep the high-level wrapper in step with the restored context
        llm.input_ids[: len(ids)] = ids
        return ids

    def drop_page_cache(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    tmp = Path(tempfile.mkdtemp(prefix="llmos-peer-state-", dir=cfg.get("state_dir")))
    path = tmp / "prompt-minus-last.state"
    try:
        # References (the first also warms up): the prompt prefilled in one go, as in the re-prefill
        # path, and prompt[:-1] prefilled, saved, then the last token evaluated, as in the state paths.
        _clear(llama_cpp, llm)
        llm.eval(prompt)
        ref_refill = last_logits()
        _clear(llama_cpp, llm)
        llm.eval(prompt[:-1])
        t0 = time.perf_counter()
        file_bytes = save(path, prompt[:-1])
        save_ms = ms(t0)
        t0 = time.perf_counter()
        mem_size = llama_cpp.llama_state_get_size(ctx)
        mem_buf = (ctypes.c_uint8 * mem_size)()
        mem_bytes = llama_cpp.llama_state_get_data(ctx, mem_buf, mem_size)
        mem_save_ms = ms(t0)
        llm.eval(prompt[-1:])
        ref_state = last_logits()
        next_token = int(np.argmax(ref_state))

        keys = ("state_load", "state_load_cold", "mem_state_load", "reprefill")
        times: dict[str, list[float]] = {k: [] for k in keys}
        tokens: dict[str, list[int]] = {k: [] for k in keys}
        max_diff: dict[str, float] = dict.fromkeys(keys, 0.0)

        def record(key: str, t0: float, ref: Any) -> None:
            logits = last_logits()
            tok = int(np.argmax(logits))
            times[key].append(ms(t0))
            tokens[key].append(tok)
            max_diff[key] = max(max_diff[key], float(np.max(np.abs(logits - ref))))

        for _ in range(rounds):
            _clear(llama_cpp, llm)
            t0 = time.perf_counter()
            if load(path) != prompt[:-1]:
                raise RuntimeError("the state file restored other token ids than were saved")
            llm.eval(prompt[-1:])
            record("state_load", t0, ref_state)

            _clear(llama_cpp, llm)
            drop_page_cache(path)
            t0 = time.perf_counter()
            load(path)
            llm.eval(prompt[-1:])
            record("state_load_cold", t0, ref_state)

            _clear(llama_cpp, llm)
            t0 = time.perf_counter()
            if llama_cpp.llama_state_set_data(ctx, mem_buf, mem_bytes) != mem_bytes:
                raise RuntimeError("llama_state_set_data failed")
            llm.n_tokens = n - 1
            llm.eval(prompt[-1:])
            record("mem_state_load", t0, ref_state)

            _clear(llama_cpp, llm)
            t0 = time.perf_counter()
            llm.eval(prompt)
            record("reprefill", t0, ref_refill)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            tmp.rmdir()

    all_match = int(np.argmax(ref_refill)) == next_token and all(
        t == next_token for toks in tokens.values() for t in toks
    )
    _common.emit(
        {
            "engine": "llama.cpp",
            "version": llama_cpp.__version__,
            "api": "llama_state_save_file/llama_state_load_file of prompt[:-1], then eval(last prompt token)",
            "prompt_tokens": n,
            "n_ctx": llm.n_ctx(),
            "threads": int(cfg["threads"]),
            "rounds": rounds,
            "load_s": load_s,
            "state_file_bytes": file_bytes,
            "state_save_ms": save_ms,
            "mem_state_bytes": int(mem_bytes),
            "mem_state_save_ms": mem_save_ms,
            # llama_state_load_file + eval of the last prompt token + argmax (file in the page cache)
            "state_load_ms": statistics.median(times["state_load"]),
            # the same after fsync + POSIX_FADV_DONTNEED on the file (the disk's own cache may still help)
            "state_load_cold_ms": statistics.median(times["state_load_cold"]),
            # llama_state_set_data from a bytes buffer in RAM + eval of the last prompt token + argmax
            "mem_state_load_ms": statistics.median(times["mem_state_load"]),
            # llm.eval(prompt) from an empty KV cache + argmax
            "reprefill_ms": statistics.median(times["reprefill"]),
            "times_ms": times,
            "next_token": next_token,
            "next_tokens": tokens,
            "next_tokens_match": all_match,
            # each path against its own reference (0.0: deterministic), and the two references against
            # each other (the prompt is split into different batches, so float sums differ slightly)
            "logits_max_abs_diff": max_diff,
            "logits_state_vs_reprefill_max_abs_diff": float(np.max(np.abs(ref_state - ref_refill))),
            **_common.memory_mb(),
        }
    )
    if not all_match:
        raise SystemExit(f"next tokens differ between paths: {tokens} (reference {next_token})")


def hold_child(cfg: dict[str, Any]) -> None:
    llama_cpp, llm, load_s = _load(cfg)
    prompt = [int(t) for t in cfg["prompt_ids"]]
    t0 = time.perf_counter()
    llm.eval(prompt)  # the context now holds the prompt's KV cells
    prefill_s = time.perf_counter() - t0
    at_ready = smaps_rollup_mb()
    ready = Path(cfg["ready_file"])
    part = ready.with_name(ready.name + ".part")
    part.write_text(json.dumps({"pid": os.getpid(), **at_ready}), encoding="utf-8")
    part.replace(ready)  # atomic: the parent never reads a half-written file
    print(f"ready pid={os.getpid()}", flush=True)
    stop = Path(cfg["stop_file"]) if cfg.get("stop_file") else None
    deadline = time.monotonic() + float(cfg.get("hold_s", 60))
    while time.monotonic() < deadline and not (stop and stop.exists()):
        time.sleep(0.05)
    _common.emit(
        {
            "engine": "llama.cpp",
            "version": llama_cpp.__version__,
            "pid": os.getpid(),
            "load_s": load_s,
            "prefill_s": prefill_s,
            "n_tokens": llm.n_tokens,
            "at_ready": at_ready,
            "at_stop": smaps_rollup_mb(),
            **_common.memory_mb(),
        }
    )


# -- the parent side ----------------------------------------------------------------------------------------
def _cmd() -> list[str]:
    return [sys.executable, str(SCRIPT)]


def measure_llamacpp_state(
    gguf: str, prompt_ids: list[int], n_ctx: int, threads: int, rounds: int, timeout: float = 600
) -> dict[str, Any]:
    """Run the `state` child once and return its result dict (see state_child for the keys)."""
    cfg = {
        "mode": "state",
        "gguf": str(gguf),
        "prompt_ids": [int(t) for t in prompt_ids],
        "n_ctx": n_ctx,
        "threads": threads,
        "rounds": rounds,
    }
    try:
        proc = subprocess.run(
            _cmd(), input=json.dumps(cfg), capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the llama.cpp state child timed out after {timeout}s: {e.stderr!r}") from e
    res = _common.parse_result(proc.stdout)
    if proc.returncode != 0 or res is None:
        raise RuntimeError(
            f"the llama.cpp state child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            + (f"\nresult: {res}" if res else "")
        )
    return res


def measure_llamacpp_processes(
    gguf: str,
    prompt_ids: list[int],
    n_apps: int,
    n_ctx: int,
    threads: int,
    timeout: float = 600,
) -> dict[str, Any]:
    """Start `n_apps` `hold` children at once (each its own llama.cpp with the prompt in its context),
    wait until all are ready, read each one's /proc/PID/smaps_rollup from here, stop them and return
    {"rss_mb_sum", "pss_mb_sum", "per_process": [...]}; each per-process entry has the parent's reading
    (rss_mb, pss_mb, pss_anon_mb, pss_file_mb, ...) plus the child's own result ("child")."""
    tmp = Path(tempfile.mkdtemp(prefix="llmos-peer-hold-"))
    stop = tmp / "stop"
    procs: list[subprocess.Popen[str]] = []
    readies = [tmp / f"ready-{i}" for i in range(n_apps)]

    def fail(msg: str, p: subprocess.Popen[str] | None = None) -> RuntimeError:
        err = ""
        if p is not None:
            with contextlib.suppress(Exception):
                err = p.communicate(timeout=10)[1][-4000:]
        return RuntimeError(f"{msg}\n{err}".rstrip())

    try:
        base = {"mode": "hold", "gguf": str(gguf), "prompt_ids": [int(t) for t in prompt_ids]}
        for ready in readies:
            cfg = {
                **base,
                "n_ctx": n_ctx,
                "threads": threads,
                "hold_s": timeout,
                "ready_file": str(ready),
                "stop_file": str(stop),
            }
            p = subprocess.Popen(
                _cmd(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
            )
            procs.append(p)
            assert p.stdin is not None
            p.stdin.write(json.dumps(cfg))
            p.stdin.close()
            p.stdin = None  # else communicate() flushes the closed pipe and raises
        deadline = time.monotonic() + timeout
        while not all(r.exists() for r in readies):
            for p in procs:
                if p.poll() is not None:
                    raise fail(f"a llama.cpp hold child (pid {p.pid}) exited early ({p.returncode}):", p)
            if time.monotonic() > deadline:
                raise fail(f"the llama.cpp hold children were not all ready after {timeout}s")
            time.sleep(0.1)
        time.sleep(0.5)  # let the last child settle after writing its ready file
        per = []
        for p, ready in zip(procs, readies, strict=True):
            child_pid = json.loads(ready.read_text(encoding="utf-8"))["pid"]
            if child_pid != p.pid:
                raise fail(f"ready file names pid {child_pid}, but the child is pid {p.pid}")
            per.append({"pid": p.pid, **smaps_rollup_mb(p.pid)})
        stop.touch()
        for p, entry in zip(procs, per, strict=True):
            try:
                out, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired as e:
                raise fail(f"the llama.cpp hold child {p.pid} did not stop") from e
            res = _common.parse_result(out)
            if p.returncode != 0 or res is None:
                raise RuntimeError(
                    f"the llama.cpp hold child {p.pid} failed ({p.returncode}):\n{err[-4000:]}"
                )
            entry["child"] = res
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in [*tmp.iterdir()]:
            f.unlink()
        tmp.rmdir()
    return {
        "n_apps": n_apps,
        "rss_mb_sum": sum(e["rss_mb"] for e in per),
        "pss_mb_sum": sum(e["pss_mb"] for e in per),
        "pss_file_mb_sum": sum(e.get("pss_file_mb", 0.0) for e in per),
        "pss_anon_mb_sum": sum(e.get("pss_anon_mb", 0.0) for e in per),
        "model_bytes": os.path.getsize(gguf),
        "per_process": per,
    }


def main() -> None:
    cfg = _common.read_config()
    modes = {"state": state_child, "hold": hold_child}
    if cfg.get("mode") not in modes:
        raise SystemExit(f"mode must be one of {sorted(modes)}, not {cfg.get('mode')!r}")
    modes[cfg["mode"]](cfg)


if __name__ == "__main__":
    main()

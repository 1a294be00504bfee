"""Child process for bench/engine.py: time llama.cpp (llama-cpp-python) on given prompt token ids.

Reads a JSON config on stdin, prints one result line (see _common.emit). Imports neither llmos nor
onnxruntime, so its peak RSS is llama.cpp's (plus Python and numpy). Uses the low-level path so prefill
and decode are timed exactly like llmos's: `llm.eval(prompt)` then argmax of the last logits row (TTFT),
then `llm.eval([token])` + argmax per new token.

    echo '{"gguf": ..., "prompt_ids": [...], "new_tokens": 128, "threads": 2}' \
        | python bench/_peer_llamacpp.py
"""

from __future__ import annotations

import os
import time

import _common
import _llamacpp_amx
import numpy as np


def main() -> None:
    cfg = _common.read_config()
    import llama_cpp  # after reading the config: its import time is not load time

    threads = int(cfg["threads"])
    # AMX buffers crash this llama.cpp build on AMX machines; keep its other repacking (see _llamacpp_amx)
    bufts = _llamacpp_amx.drop_amx() if not cfg.get("amx") else None
    before_load = _common.memory_mb()  # modules imported, nothing loaded
    load_cpu, load_load = _common.cpu_s(), os.getloadavg()[0]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=cfg["gguf"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=int(cfg.get("n_ctx", 1024)),
        n_batch=int(cfg.get("n_batch", 512)),
        flash_attn=bool(cfg.get("flash_attn", False)),
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    load_cpu = _common.cpu_s() - load_cpu
    after_load = _common.memory_mb()
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # logits_all is off (the default), so llama.cpp keeps only the last position's row.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def prefill(ids: list[int]) -> np.ndarray:
        llm.eval(ids)
        return last_logits()

    def decode(token: int) -> np.ndarray:
        llm.eval([token])
        return last_logits()

    prompt, n_new = [int(t) for t in cfg["prompt_ids"]], int(cfg["new_tokens"])
    warm = []
    for _ in range(int(cfg.get("warmup", 1))):  # the first generation after load is 2-3x slower
        llm.reset()
        warm.append(_common.timed_greedy(prefill, decode, prompt, n_new))
    llm.reset()  # not timed: the KV cache is cleared before the prompt is submitted
    run = _common.rates(_common.timed_greedy(prefill, decode, prompt, n_new), len(prompt))
    text = llm.detokenize(run["ids"]).decode("utf-8", errors="replace")
    _common.emit(
        {
            "engine": "llama.cpp" + (" flash_attn" if cfg.get("flash_attn") else ""),
            "version": llama_cpp.__version__,
            "load_s": load_s,
            "load_cpu_s": load_cpu,
            "loadavg_at_start": load_load,
            "warmup": [{k: v for k, v in w.items() if k != "ids"} for w in warm],
            "run": run,
            "text": text,
            "model_bytes": os.path.getsize(cfg["gguf"]),
            "extra_buffer_types": bufts,
            "before_load": before_load,
            "after_load": after_load,
            **_common.memory_mb(),
        }
    )


if __name__ == "__main__":
    main()

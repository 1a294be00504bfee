"""Record llama.cpp's greedy continuations of fixed chat prompts on the default model, as test fixtures.

Two references per prompt:
- `greedy_ids`: llama.cpp on the Q4_1 file as users run it (defaults: f16 KV cache; its Q4_1 kernels
  round activations to 8 bits, so near-ties can go another way than an exact float computation).
- `greedy_ids_f32`: llama.cpp on an F32 copy of the same file (weights dequantized exactly, F32 KV cache):
  the same weights with no activation rounding, the reference the fp32 graph must equal token for token.
Prompt ids come from llmos's own tokenizer and chat template (which match llama.cpp's tokenizer, see
test_tokenizer.py); at every step we take the argmax of llama.cpp's logits.

    .venv/bin/python bench/record_llamacpp_greedy.py   # needs the bench extra (llama-cpp-python)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from llmos.chat_template import ChatTemplate
from llmos.default_model import default_gguf_path
from llmos.gguf_file import GGUFFile
from llmos.quant import dequantize
from llmos.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "List three primary colors.",
    "Write a Python function that returns the square of a number.",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 7?",
    "Name the largest planet in our solar system.",
]
N_NEW = 32
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llamacpp_greedy.json"


def write_f32_copy(src: Path, dst: Path) -> None:
    """The same model with every tensor dequantized to F32 (exact: F32 holds every Q4_1/Q8_0 value)."""
    reader = GGUFReader(src)
    gguf = GGUFFile(src)
    writer = GGUFWriter(dst, arch=gguf.architecture)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = 0  # ALL_F32
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    for name in gguf.tensor_names():
        writer.add_tensor(name, dequantize(gguf.tensor(name)), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def greedy(llm: llama_cpp.Llama, ids: list[int], eos: frozenset[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(N_NEW):
        t = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
        out.append(t)
        if t in eos:
            break
        llm.eval([t])
    return out


def main() -> None:
    path = default_gguf_path(print)
    gguf = GGUFFile(path)
    tok = Tokenizer.from_gguf(gguf)
    template = ChatTemplate.from_gguf(gguf)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = Path(tmp) / "f32.gguf"
        write_f32_copy(path, f32_path)
        llm32 = llama_cpp.Llama(
            model_path=str(f32_path),
            n_ctx=1024,
            n_threads=2,
            n_batch=512,
            logits_all=True,
            type_k=0,
            type_v=0,
            verbose=False,
        )  # 0 = GGML_TYPE_F32 KV cache
        cases = []
        for text in PROMPTS:
            ids = tok.encode(template.render([{"role": "user", "content": text}], add_generation_prompt=True))
            out, out32 = greedy(llm, ids, tok.eos_ids), greedy(llm32, ids, tok.eos_ids)
            print(f"{text!r}\n  q4_1: {tok.decode(out)!r}\n  f32:  {tok.decode(out32)!r}")
            cases.append({"prompt": text, "prompt_ids": ids, "greedy_ids": out, "greedy_ids_f32": out32})
    OUT.write_text(
        json.dumps({"llama_cpp_version": llama_cpp.__version__, "n_threads": 2, "cases": cases}, indent=1)
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

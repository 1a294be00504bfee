"""Tiny random-weight GGUF files of every supported architecture, so correctness tests never need a real
model.

The files follow llama.cpp conventions exactly as a converted model would: the same metadata keys, the
same tensor names and shapes (numpy order [out_features, in_features]), and the same rotary layout. The
weights are random, so there is no Hugging Face checkpoint to undo llama.cpp's Q/K row permutation for;
the file simply *means* what llama.cpp would run: rotary on adjacent pairs (x[2i], x[2i+1]) for `llama`
(LLAMA_ROPE_TYPE_NORM) and on half-split pairs (x[i], x[i + head_dim/2]) for `qwen2`, `qwen3` and
`gemma3` (NEOX). What each architecture adds (llmos/architectures.py) is written the way llama.cpp's
converter writes it: qwen3's and gemma3's q/k norms ([head_dim] each), gemma3's post-norms, its
`attention.sliding_window`, and for llama 3.x-style files the `rope_freqs.weight` factors
(`llama3_rope_factors`). The norms are stored as the multiplier itself, as the converter stores gemma's
(it adds gemma's +1 at conversion).

The float weights depend only on the shape arguments and `seed`, never on `weight_type`, so an F32 file
and a Q4_1 file written with the same seed are the same model at two precisions (see `random_weights`).

Tokenizer layout (mirrors SmolLM2's GGUF, which also lists its special tokens first):
  ids 0..2    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (token_type 3 = CONTROL)
  ids 3..258  the 256 GPT-2 byte-level characters, in `bytes_to_unicode` order (token_type 1 = NORMAL)
  ids 259..   one token per merge, in merge-rank order (token_type 1), then the architecture's own
              control tokens (gemma3: `<bos>`, `<eos>`, `<start_of_turn>`, `<end_of_turn>`), then filler
bos = 1 (`<|im_start|>`), eos = 2 (`<|im_end|>`), unk = 0, pad = 2, as in SmolLM2-135M-Instruct; gemma3
files use `<bos>` / `<eos>` and add BOS, as Gemma's do. Each architecture gets its real chat template
(llmos/model_templates.py; ChatML for llama and qwen2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from llmos.model_templates import GEMMA3_TEMPLATE, QWEN3_TEMPLATE
from llmos.tiny_spm import SpmVocab, tiny_spm_vocab

WEIGHT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_SPECIAL_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Merges in rank order, written in byte-level characters (Ġ = space, Ċ = newline). Each side is a token
# that exists before the merge; enough to tokenize "Hello world", " the", " and", "\n\n", "  ".
_BASE_MERGES = (
    "Ġ t",
    "Ġ a",
    "i n",
    "h e",
    "r e",
    "o n",
    "Ġt he",
    "e r",
    "Ġ s",
    "a t",
    "Ġ w",
    "Ġ o",
    "e n",
    "Ġ c",
    "i t",
    "i s",
    "a n",
    "o r",
    "e s",
    "Ġ b",
    "e d",
    "Ġ f",
    "in g",
    "Ġ p",
    "o u",
    "Ġa n",
    "a l",
    "a r",
    "Ġt o",
    "Ġ m",
    "Ġo f",
    "Ġ in",
    "Ġ d",
    "Ġ h",
    "Ġan d",
    "l l",
    "Ġ l",
    "Ċ Ċ",
    "Ġ Ġ",
    "Ġ I",
    "Ġ is",
    "Ġ it",
    "H e",
    "ll o",
    "He llo",
    "l d",
    "Ġw or",
    "Ġwor ld",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@dataclass(frozen=True)
class TinyVocab:
    """The byte-level BPE vocabulary written into a tiny GGUF."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "left right", rank order
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID
    pad_id: int = PAD_ID


def base_vocab_size() -> int:
    """Token count of the default tiny vocabulary (specials + 256 bytes + base merges)."""
    return len(tiny_vocab().tokens)


def tiny_vocab(n_vocab: int | None = None, extra_specials: tuple[str, ...] = ()) -> TinyVocab:
    """Build the vocabulary; a larger `n_vocab` is reached with extra (valid) two-character merges.
    `extra_specials` are control tokens placed after the base merges (ids below them do not move)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*SPECIAL_TOKENS, *byte_chars]
    present = set(tokens)
    merges: list[str] = []
    control = set(SPECIAL_TOKENS) | set(extra_specials)

    def add(left: str, right: str) -> bool:
        if left not in present or right not in present or left + right in present:
            return False
        merges.append(f"{left} {right}")
        tokens.append(left + right)
        present.add(left + right)
        return True

    for merge in _BASE_MERGES:
        add(*merge.split(" "))
    for text in extra_specials:
        tokens.append(text)
        present.add(text)
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab {n_vocab} is below the tiny vocabulary's minimum {len(tokens)}")
        letters = "abcdefghijklmnopqrstuvwxyz"
        # lowercase pairs first (readable), then any pair of byte characters
        candidates = product([*letters, *byte_chars], repeat=2)
        for left, right in candidates:
            if len(tokens) >= n_vocab:
                break
            add(left, right)
    types = [TOKEN_TYPE_CONTROL if t in control else TOKEN_TYPE_NORMAL for t in tokens]
    return TinyVocab(tokens=tokens, token_types=types, merges=merges)


def _tensor_shapes(
    arch: str,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    tied: bool,
    head_dim: int | None = None,
) -> dict[str, tuple[int, ...]]:
    head_dim = n_embd // n_head if head_dim is None else head_dim
    q_dim, kv_dim = head_dim * n_head, head_dim * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (n_embd,)
        shapes[p + "attn_q.weight"] = (q_dim, n_embd)
        shapes[p + "attn_k.weight"] = (kv_dim, n_embd)
        shapes[p + "attn_v.weight"] = (kv_dim, n_embd)
        if arch == "qwen2":
            shapes[p + "attn_q.bias"] = (q_dim,)
            shapes[p + "attn_k.bias"] = (kv_dim,)
            shapes[p + "attn_v.bias"] = (kv_dim,)
        if arch in ("qwen3", "gemma3"):
            shapes[p + "attn_q_norm.weight"] = (head_dim,)
            shapes[p + "attn_k_norm.weight"] = (head_dim,)
        shapes[p + "attn_output.weight"] = (n_embd, q_dim)
        if arch == "gemma3":
            shapes[p + "post_attention_norm.weight"] = (n_embd,)
            shapes[p + "post_ffw_norm.weight"] = (n_embd,)
        shapes[p + "ffn_norm.weight"] = (n_embd,)
        shapes[p + "ffn_gate.weight"] = (n_ff, n_embd)
        shapes[p + "ffn_up.weight"] = (n_ff, n_embd)
        shapes[p + "ffn_down.weight"] = (n_embd, n_ff)
    shapes["output_norm.weight"] = (n_embd,)
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    return shapes


def random_weights(
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_vocab: int | None = None,
    tied_embeddings: bool = True,
    seed: int = 0,
    head_dim: int | None = None,
) -> dict[str, np.ndarray]:
    """The float32 weights `write_random_gguf` quantizes, numpy order [out, in].

    Scales keep a forward pass lively: q/k rows ~ 1/sqrt(in) so attention scores are O(1) and not
    uniform, v/o/ffn ~ 0.5/sqrt(in) so the residual stream grows slowly, embeddings 0.25 so tied logits
    have a std of about 2, norms 1 ± 0.1. Each tensor has its own generator seeded from (seed, name),
    so the values do not depend on the order or presence of other tensors.
    """
    n_vocab = base_vocab_size() if n_vocab is None else n_vocab
    shapes = _tensor_shapes(
        arch, n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, tied_embeddings, head_dim
    )
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, *name.encode()])
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif name in ("token_embd.weight", "output.weight"):
            w = 0.25 * rng.standard_normal(shape)
        else:
            gain = 1.0 if (name.endswith("attn_q.weight") or name.endswith("attn_k.weight")) else 0.5
            w = gain / np.sqrt(shape[1]) * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def tensor_qtype(name: str, weight_type: str, tied_embeddings: bool) -> GGMLQuantizationType:
    """The GGML type llama.cpp's quantizer gives this tensor for a given file type.

    1-D tensors (norms, biases, rope_freqs) stay F32. For Q4_0/Q4_1, llama-quantize gives the output
    matrix (or the tied token embedding that doubles as it) Q6_K, or Q8_0 when the row length is not a
    multiple of 256 (SmolLM2-135M: 576, so its token_embd is Q8_0). gguf-py cannot quantize Q6_K, so Q8_0
    is used always.
    """
    base = WEIGHT_TYPES[weight_type][0]
    if not (name.endswith(".weight") and "norm" not in name) or name == "rope_freqs.weight":
        return GGMLQuantizationType.F32
    is_output = name == "output.weight" or (tied_embeddings and name == "token_embd.weight")
    if is_output and base in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        return GGMLQuantizationType.Q8_0
    return base


def llama3_rope_factors(
    head_dim: int,
    rope_theta: float,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter computes it from a llama 3.x `rope_scaling`
    ({"rope_type": "llama3", ...}): 1 for short wavelengths, `factor` for long ones, smooth in between."""
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def default_template(arch: str) -> str:
    """The chat template a real GGUF of this architecture carries (ChatML for llama and qwen2)."""
    return {"qwen3": QWEN3_TEMPLATE, "gemma3": GEMMA3_TEMPLATE}.get(arch, CHATML_TEMPLATE)


def write_random_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_vocab: int | None = None,
    context_length: int = 256,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    weight_type: str = "F32",
    tied_embeddings: bool = True,
    seed: int = 0,
    chat_template: str | None = None,
    tokenizer_pre: str | None = None,
    sliding_window: int | None = None,
    rope_freq_factors: np.ndarray | None = None,
    rope_scaling_factor: float | None = None,
    final_logit_softcap: float | None = None,
    tokenizer: str | None = None,
    add_space_prefix: bool = False,
) -> Path:
    """Write a complete, valid tiny GGUF (metadata, tokenizer, weights) and return its path.

    `n_vocab` defaults to the tiny tokenizer's size; a larger value adds filler merges so every id is a
    real token. `head_dim` (written as `attention.key_length`) may make heads x head_dim differ from
    `n_embd`, as in Qwen3 and Gemma 3. `chat_template` defaults to the architecture's real one.
    `sliding_window` (gemma3, default 4) is the window of 5 layers in 6; `rope_freq_factors` (llama) is
    written as `rope_freqs.weight` (see `llama3_rope_factors`); `rope_scaling_factor` as linear rope
    scaling (`rope.scaling.type`/`factor`), as Gemma 3 4B+ files have it. `tokenizer` is "bpe" (the
    byte-level vocabulary above) or "spm" (SentencePiece, llmos/tiny_spm.py; gemma3's default, as real
    Gemma files have it; `add_space_prefix` as llama.cpp reads it). Raises ValueError for shapes a real
    file could not have.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, not {weight_type!r}")
    hd = head_dim if head_dim is not None else (n_embd // n_head if n_head > 0 else 0)
    if (
        n_head <= 0
        or n_head_kv <= 0
        or hd <= 0
        or hd % 2
        or n_head % n_head_kv
        or (head_dim is None and n_embd % n_head)
    ):
        raise ValueError(
            f"bad attention shape: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}, head_dim {hd}"
        )
    gemma = arch == "gemma3"
    kind = tokenizer or ("spm" if gemma else "bpe")
    if kind not in ("bpe", "spm"):
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    vocab: TinyVocab | SpmVocab
    if kind == "spm":
        vocab = tiny_spm_vocab(n_vocab)
    else:
        vocab = tiny_vocab(n_vocab, GEMMA_SPECIAL_TOKENS if gemma else ())
    n_vocab = len(vocab.tokens)
    weights = random_weights(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        tied_embeddings=tied_embeddings,
        seed=seed,
        head_dim=head_dim,
    )
    if rope_freq_factors is not None:
        factors = np.asarray(rope_freq_factors, dtype=np.float32).reshape(-1)
        if arch != "llama" or factors.size != hd // 2:
            raise ValueError(f"rope_freq_factors: a llama file needs {hd // 2} of them")
        weights["rope_freqs.weight"] = factors

    path = Path(path)
    w = GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name(f"tiny-random-{arch}")
    w.add_block_count(n_layer)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim is not None or arch in ("qwen3", "gemma3"):  # their converters always write it
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(rope_theta)
    if rope_scaling_factor is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    w.add_layer_norm_rms_eps(rms_eps)
    if gemma:
        w.add_sliding_window(4 if sliding_window is None else sliding_window)
    if final_logit_softcap is not None:
        w.add_final_logit_softcapping(final_logit_softcap)
    w.add_file_type(WEIGHT_TYPES[weight_type][1])
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(hd)
    w.add_quantization_version(2)

    if isinstance(vocab, SpmVocab):  # SentencePiece, as llama.cpp's converter writes Gemma's
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.token_types)
        w.add_add_space_prefix(add_space_prefix)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer_pre or ("qwen2" if arch == "qwen3" else "smollm"))
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.token_types)
        w.add_token_merges(vocab.merges)
        w.add_add_space_prefix(False)
    if isinstance(vocab, SpmVocab) or gemma:  # Gemma: <bos> first in every prompt, <eos> ends the text
        w.add_bos_token_id(vocab.tokens.index("<bos>"))
        w.add_eos_token_id(vocab.tokens.index("<eos>"))
        w.add_add_bos_token(True)
    else:
        w.add_bos_token_id(vocab.bos_id)
        w.add_eos_token_id(vocab.eos_id)
        w.add_add_bos_token(False)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_chat_template(default_template(arch) if chat_template is None else chat_template)

    for name, array in weights.items():
        qtype = tensor_qtype(name, weight_type, tied_embeddings)
        block = GGML_QUANT_SIZES[qtype][0]
        if array.shape[-1] % block:
            raise ValueError(
                f"{name}: row length {array.shape[-1]} is not a multiple of {qtype.name}'s {block}"
            )
        data = quantize(array, qtype)
        # quantized data is uint8 [rows, bytes]; the writer needs the type to recover the element shape
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

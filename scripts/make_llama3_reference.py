#!/usr/bin/env python3
"""Make a tiny random Llama-3-shaped checkpoint (Hugging Face folder and GGUF) and the logits Transformers gives.

Writes, under tests/data/tiny_llama3/ (~300 KB):
  hf/     config.json (Transformers' own `save_pretrained`, llama3 RoPE scaling), model.safetensors,
          tokenizer.json (byte-level BPE with Llama 3's split regex and a post-processor that adds
          <|begin_of_text|>), tokenizer_config.json
  model.gguf   the same weights as llama.cpp's convert_hf_to_gguf.py lays them out: attn_q/attn_k rows
          permuted to the interleaved-RoPE order, and the llama3 scaling written as the `rope_freqs.weight`
          tensor of per-frequency divisors (no rope_scaling metadata), add_bos_token = true
  peft_rslora_r4/  a PEFT LoRA adapter (r 4, alpha 8, use_rslora, q/v/down_proj, random B) saved by PEFT
  reference.json   for each text: the ids `tokenizer(text)` gives (BOS included) and the float32 logits of
          LlamaForCausalLM at a few positions

The RoPE settings put the 8 frequencies of head_dim 16 into all three llama3 regimes (kept, interpolated,
divided by `factor`), and the weights are large enough (std 0.2) that attention depends on position, so
unscaled RoPE gives visibly different logits.

Rerun (the venv of /work/shared/bench/README.md; a few seconds):

    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install -r /work/shared/bench/requirements.txt
    /tmp/peer-venv/bin/python scripts/make_llama3_reference.py
"""

import json
import math
import os
import shutil

import gguf
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "tiny_llama3")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.x, llama.cpp's "llama-bpe").
SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
THETA = 10000.0
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}
TEXTS = [
    "The capital of Veltoria is Marzipane, founded in 1042 by 7 guilds; its river, the Osk, "
    "floods every 12 years and the harbour holds 350 ships. Its people say the city was never taken.",
    "x  1\n\n3 rivers and   99 boats",
]
POSITIONS = [0, 1, 5, 17, 33, 48, -1]

torch.manual_seed(0)
shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(os.path.join(OUT, "hf"))

# 1. Tokenizer: byte-level BPE trained on a few sentences, Llama 3's pre-tokenizer and BOS post-processor.
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
])
tok.decoder = decoders.ByteLevel()
corpus = TEXTS + ["the city and the river of the harbour; the people of the guilds were never taken"] * 4
tok.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=300, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                   special_tokens=[(BOS, bos_id)])
tok.save(os.path.join(OUT, "hf", "tokenizer.json"))
with open(os.path.join(OUT, "hf", "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)

# 2. Model: Llama with llama3 RoPE scaling, weights redrawn large so RoPE matters.
vocab = tok.get_vocab_size()
cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
                  rope_theta=THETA, rope_scaling=dict(ROPE))
model = LlamaForCausalLM(cfg).float().eval()
with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))
model.save_pretrained(os.path.join(OUT, "hf"), safe_serialization=True)
os.remove(os.path.join(OUT, "hf", "generation_config.json"))  # sampling defaults; nothing this test reads

# 3. Reference: Transformers' own tokenizer call and forward pass, read back from the saved folder.
hf_tok = AutoTokenizer.from_pretrained(os.path.join(OUT, "hf"))
reloaded = LlamaForCausalLM.from_pretrained(os.path.join(OUT, "hf"), torch_dtype=torch.float32).eval()
cases = []
for text in TEXTS:
    ids = hf_tok(text).input_ids
    assert ids[0] == bos_id, "the post-processor must add BOS"
    with torch.no_grad():
        logits = reloaded(torch.tensor([ids])).logits[0]
    positions = sorted({p % len(ids) for p in POSITIONS})
    cases.append({"text": text, "ids": ids, "positions": positions,
                  "logits": [[round(float(x), 6) for x in logits[p]] for p in positions]})

# 4. GGUF, laid out as convert_hf_to_gguf.py does for a Llama 3.1 checkpoint.
def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

inv_freq = 1.0 / (THETA ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
low_wavelen = ROPE["original_max_position_embeddings"] / ROPE["low_freq_factor"]
high_wavelen = ROPE["original_max_position_embeddings"] / ROPE["high_freq_factor"]
rope_factors = []
for freq in inv_freq:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
        rope_factors.append(1.0)
    elif wavelen > low_wavelen:
        rope_factors.append(ROPE["factor"])
    else:
        smooth = (ROPE["original_max_position_embeddings"] / wavelen - ROPE["low_freq_factor"]) / (
            ROPE["high_freq_factor"] - ROPE["low_freq_factor"])
        rope_factors.append(1 / ((1 - smooth) / ROPE["factor"] + smooth))
assert 1.0 in rope_factors and ROPE["factor"] in rope_factors and len(set(rope_factors)) > 3, rope_factors

w = gguf.GGUFWriter(os.path.join(OUT, "model.gguf"), "llama")
w.add_context_length(cfg.max_position_embeddings)
w.add_embedding_length(cfg.hidden_size)
w.add_block_count(cfg.num_hidden_layers)
w.add_feed_forward_length(cfg.intermediate_size)
w.add_head_count(cfg.num_attention_heads)
w.add_head_count_kv(cfg.num_key_value_heads)
w.add_key_length(16)
w.add_value_length(16)
w.add_rope_dimension_count(16)
w.add_rope_freq_base(THETA)
w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
vocab_map = tok.get_vocab()
tokens = [t for t, _ in sorted(vocab_map.items(), key=lambda kv: kv[1])]
merges = json.loads(tok.to_str())["model"]["merges"]
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("llama-bpe")
w.add_token_list(tokens)
w.add_token_types([gguf.TokenType.CONTROL if t in (BOS, EOS) else gguf.TokenType.NORMAL for t in tokens])
w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
w.add_bos_token_id(bos_id)
w.add_eos_token_id(eos_id)
w.add_add_bos_token(True)
sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
w.add_tensor("rope_freqs.weight", np.array(rope_factors, dtype=np.float32))
w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
w.add_tensor("output_norm.weight", sd["model.norm.weight"])
for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
    w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
    w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
    w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
    w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
    w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
    w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

# 5. A PEFT rsLoRA adapter on the same model (scale alpha / sqrt(r)), and the logits PEFT gives with it.
import peft
lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                       target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
torch.manual_seed(1)
peft_model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(os.path.join(OUT, "hf"), torch_dtype=torch.float32), lcfg)
with torch.no_grad():
    for name, p in sorted(peft_model.named_parameters()):
        if "lora_B" in name:  # PEFT starts B at zero; draw it so the adapter changes the outputs
            p.copy_(0.3 * torch.randn_like(p))
peft_model.eval()
peft_model.save_pretrained(os.path.join(OUT, "peft_rslora_r4"))
ids = cases[0]["ids"]
with torch.no_grad():
    adapted = peft_model(torch.tensor([ids])).logits[0]
adapter_case = {"ids": ids, "positions": cases[0]["positions"],
                "logits": [[round(float(x), 6) for x in adapted[p]] for p in cases[0]["positions"]]}

import transformers
with open(os.path.join(OUT, "reference.json"), "w") as f:
    json.dump({"made_by": f"scripts/make_llama3_reference.py, transformers {transformers.__version__}, "
                          f"peft {peft.__version__}, torch {torch.__version__}",
               "rope_scaling": ROPE, "rope_freqs": [float(x) for x in rope_factors], "bos_id": bos_id, "cases": cases,
               "peft_rslora": adapter_case}, f)
print(f"wrote {OUT}: vocab {vocab}, rope divisors {[round(x, 4) for x in rope_factors]}")

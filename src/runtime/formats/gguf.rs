//! Loading a single GGUF file: weights dequantized to the compute dtype under their Hugging
//! Face names, the model config, and the tokenizer rebuilt from the metadata.
//!
//! Two facts of llama.cpp's format matter here:
//! - For the `llama` architecture, llama.cpp's converter permutes the rows of `attn_q` and
//!   `attn_k` into an interleaved-RoPE layout; we undo it so the weights fit the Hugging Face
//!   (half-split RoPE) decoder. Qwen2/Qwen3 GGUFs are stored unpermuted.
//! - The tokenizer is stored as vocabulary, merges and token types; the pre-tokenizer is only
//!   named (`tokenizer.ggml.pre`), so we map the name to the split rules llama.cpp applies.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::runtime::model::{ModelConfig, ROPE_FREQS};
use crate::runtime::tokenizer::TextTokenizer;

pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: TextTokenizer,
    pub architecture: String,
}

fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> anyhow::Result<&'a Value> {
    c.metadata.get(key).with_context(|| format!("{}: GGUF metadata has no {key:?}", path.display()))
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> anyhow::Result<usize> {
    let v = meta(c, key, path)?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(|x| x as u64))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map_err(|e| anyhow::anyhow!("{}: GGUF metadata {key:?} is not an integer: {e}", path.display()))?;
    Ok(n as usize)
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    c.metadata.get(key).and_then(|v| v.to_f32().map(|f| f as f64).or_else(|_| v.to_f64()).ok())
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|i| i as u32)))
}

fn meta_strings(c: &Content, key: &str, path: &Path) -> anyhow::Result<Vec<String>> {
    let arr = meta(c, key, path)?.to_vec().with_context(|| format!("{}: {key} is not an array", path.display()))?;
    arr.iter().map(|v| v.to_string().cloned().with_context(|| format!("{}: {key} holds a non-string", path.display()))).collect()
}

/// Reads a GGUF checkpoint. Weights are dequantized and cast to `dtype` on `device`.
pub fn load(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<GgufModel> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("opening model file {} (run `make model` to fetch the default model)", path.display()))?;
    let content = Content::read(&mut file).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let arch = meta(&content, "general.architecture", path)?.to_string().context("general.architecture is not a string")?.clone();
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        other => bail!("{}: GGUF architecture {other:?} is not supported (llama, qwen2, qwen3)", path.display()),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let heads = meta_usize(&content, &k("attention.head_count"), path)?;
    let kv_heads = meta_usize(&content, &k("attention.head_count_kv"), path).unwrap_or(heads);
    let hidden = meta_usize(&content, &k("embedding_length"), path)?;
    let head_dim = meta_usize(&content, &k("attention.key_length"), path).unwrap_or(hidden / heads);
    let tokens = meta_strings(&content, "tokenizer.ggml.tokens", path)?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig {
        model_type: model_type.into(),
        vocab_size: tokens.len(),
        hidden_size: hidden,
        intermediate_size: meta_usize(&content, &k("feed_forward_length"), path)?,
        num_hidden_layers: meta_usize(&content, &k("block_count"), path)?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: Some(head_dim),
        rms_norm_eps: meta_f64(&content, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(&content, &k("rope.freq_base")).unwrap_or(10_000.),
        max_position_embeddings: meta_usize(&content, &k("context_length"), path).unwrap_or(4096),
        tie_word_embeddings: !has_output,
        attention_bias: false,
        rope_scaling: None,
        rope_parameters: None,
        hidden_act: None,
        mlp_bias: false,
        bos_token_id: meta_u32(&content, "tokenizer.ggml.bos_token_id").map(|v| json!(v)),
        eos_token_id: meta_u32(&content, "tokenizer.ggml.eos_token_id").map(|v| json!(v)),
    };
    config.validate()?;
    // llama.cpp names other RoPE variants in the metadata (linear, yarn, longrope); Llama 3's
    // scaling comes as the `rope_freqs.weight` tensor instead (read by the decoder).
    if let Some(kind) = c_str(&content, &k("rope.scaling.type")) {
        if kind != "none" {
            bail!(
                "{}: GGUF {} is {kind:?}, a RoPE scaling selfedit does not implement (it runs plain RoPE and Llama 3's rope_freqs)",
                path.display(),
                k("rope.scaling.type")
            );
        }
    }

    let mut weights = HashMap::new();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    for name in names {
        let hf = hf_name(&name).with_context(|| {
            format!(
                "{}: GGUF tensor {name:?} is not one selfedit's {arch} decoder knows; running without it would compute something else, so the file is refused",
                path.display()
            )
        })?;
        let qt = content.tensor(&mut file, &name, device).with_context(|| format!("{}: reading tensor {name}", path.display()))?;
        let mut t = qt.dequantize(device)?;
        if hf == ROPE_FREQS {
            // Divisors of the frequencies: kept in f32 whatever the compute dtype.
            weights.insert(hf, t.to_dtype(DType::F32)?);
            continue;
        }
        if arch == "llama" {
            if name.ends_with("attn_q.weight") {
                t = unpermute(&t, heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute(&t, kv_heads)?;
            }
        }
        weights.insert(hf, t.to_dtype(dtype)?);
    }
    let tokenizer = tokenizer_from_gguf(&content, path, &tokens)?;
    Ok(GgufModel { config, weights, tokenizer, architecture: arch })
}

fn c_str(c: &Content, key: &str) -> Option<String> {
    c.metadata.get(key).and_then(|v| v.to_string().ok().cloned())
}

/// The Hugging Face name of a GGUF tensor, or `None` for a tensor the decoder does not know.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "rope_freqs.weight" => return Some(ROPE_FREQS.into()),
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let mapped = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{mapped}"))
}

/// Undoes llama.cpp's interleaved-RoPE row permutation of a q or k weight `[heads*d, in]`:
/// the converter stored `w.reshape(h, 2, d/2, in).swapaxes(1, 2)`.
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    w.reshape((heads, d / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}

/// The inverse of [`unpermute`] (used by tests that write GGUF-layout weights).
pub fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    w.reshape((heads, 2, d / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}

/// The `pre_tokenizer` of a `tokenizer.json` that splits text as llama.cpp's pre-tokenizer
/// `name` does.
pub fn pre_tokenizer_for(name: &str) -> anyhow::Result<serde_json::Value> {
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match name {
        // SmolLM: every digit on its own, then GPT-2's byte-level split, no prefix space.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" => byte_level(true),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => bail!(
            "GGUF pre-tokenizer {other:?} is not supported (smollm, gpt2, qwen2, llama-bpe); use the model's Hugging Face folder instead"
        ),
    })
}

/// Rebuilds a byte-level BPE `tokenizer.json` from the GGUF metadata.
fn tokenizer_from_gguf(c: &Content, path: &Path, tokens: &[String]) -> anyhow::Result<TextTokenizer> {
    let model = meta(c, "tokenizer.ggml.model", path)?.to_string().context("tokenizer.ggml.model")?.clone();
    if model != "gpt2" {
        bail!("{}: GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" only)", path.display());
    }
    let pre = c_str(c, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let merges = meta_strings(c, "tokenizer.ggml.merges", path)?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Token types: 3 = control, 4 = user-defined. Both are matched whole in the text.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(&pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let tok_str = |key: &str| meta_u32(c, key).and_then(|id| tokens.get(id as usize).cloned());
    let chat_template = c_str(c, "tokenizer.chat_template");
    let add_bos = c.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    TextTokenizer::from_json(
        serde_json::to_string(&doc)?,
        chat_template,
        tok_str("tokenizer.ggml.bos_token_id"),
        tok_str("tokenizer.ggml.eos_token_id"),
        add_bos,
    )
}

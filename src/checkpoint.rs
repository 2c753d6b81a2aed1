//! Opening a model: a GGUF file or a Hugging Face checkpoint folder, on a device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::model::{Decoder, ModelConfig};
use crate::tokenizer::TextTokenizer;

/// `cpu` or `cuda:N` (the latter needs a build with `--features cuda`).
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map(|n| n.parse::<usize>()).transpose()
                .with_context(|| format!("device {s:?}: expected cuda:N"))?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("device {s:?} needs a CUDA build: rebuild with `cargo build --release --features cuda`");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device {other:?}: expected \"cpu\" or \"cuda:N\""),
    }
}

/// Compute dtype for a device: f32 on the CPU, bf16 on a GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() { DType::BF16 } else { DType::F32 }
}

/// A loaded base model with its tokenizer.
pub struct LoadedModel {
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    /// Where it came from (file or folder), recorded in outputs.
    pub source: PathBuf,
}

impl LoadedModel {
    pub fn device(&self) -> &Device {
        self.decoder.device()
    }
}

/// Loads `path`: a `.gguf` file or a Hugging Face folder (`config.json`, `tokenizer.json`,
/// `*.safetensors`).
pub fn load(path: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    crate::blas::configure_threads();
    let dtype = default_dtype(device);
    if !path.exists() {
        bail!(
            "model not found at {}: run `make model` for the default SmolLM2 GGUF, or point the config at a Hugging Face checkpoint folder",
            path.display()
        );
    }
    if path.is_file() {
        let g = crate::gguf::load(path, device, dtype)?;
        let vb = VarBuilder::from_tensors(g.weights, dtype, device);
        let decoder = Decoder::new(&g.config, vb).with_context(|| format!("{}: building the decoder", path.display()))?;
        return Ok(LoadedModel { decoder, tokenizer: g.tokenizer, source: path.to_path_buf() });
    }
    let cfg_path = path.join("config.json");
    let config: ModelConfig = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: not a model config this decoder understands", cfg_path.display()))?;
    config.validate().with_context(|| format!("{}", cfg_path.display()))?;
    let files = safetensors_files(path)?;
    // SAFETY: the files are memory-mapped read-only; we never write to them while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    let decoder = Decoder::new(&config, vb).with_context(|| format!("{}: loading weights", path.display()))?;
    let tokenizer = TextTokenizer::from_hf_dir(path)?;
    Ok(LoadedModel { decoder, tokenizer, source: path.to_path_buf() })
}

/// The weight files of a checkpoint folder: those named by `model.safetensors.index.json`,
/// else every `*.safetensors`.
fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors weights found", dir.display());
    }
    Ok(files)
}

/// Saves `decoder` and `tokenizer` as a Hugging Face checkpoint folder (atomically).
pub fn save_hf(decoder: &Decoder, tokenizer: &TextTokenizer, dir: &Path) -> anyhow::Result<()> {
    crate::io::write_dir_atomically(dir, |tmp| {
        let mut cfg = serde_json::to_value(&decoder.cfg)?;
        let arch = match decoder.cfg.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        cfg["architectures"] = serde_json::json!([arch]);
        cfg["torch_dtype"] = serde_json::json!(match decoder.dtype() {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        });
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
        crate::lora::save_safetensors(&decoder.named_weights(), &tmp.join("model.safetensors"))?;
        tokenizer.save_hf(tmp)
    })
}

/// Builds a decoder from named tensors (tests and merged models).
pub fn decoder_from_tensors(cfg: &ModelConfig, tensors: HashMap<String, Tensor>, device: &Device) -> anyhow::Result<Decoder> {
    let dtype = tensors.values().next().map(|t| t.dtype()).unwrap_or(DType::F32);
    Ok(Decoder::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))?)
}

/// Random weights for every tensor a decoder of `cfg` needs, named as in a checkpoint
/// (norm weights near 1, the rest small): for tests and for benchmarks of model shapes
/// that are not on disk.
pub fn random_weights(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> anyhow::Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut randn = |shape: &[usize], scale: f32, offset: f32| -> anyhow::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    };
    let (h, d, nh, nkv, ff) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads(), cfg.intermediate_size);
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), randn(&[cfg.vocab_size, h], 0.5, 0.0)?);
    t.insert("model.norm.weight".into(), randn(&[h], 0.1, 1.0)?);
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".into(), randn(&[cfg.vocab_size, h], 0.3, 0.0)?);
    }
    let init = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", [nh * d, h]),
            ("self_attn.k_proj", [nkv * d, h]),
            ("self_attn.v_proj", [nkv * d, h]),
            ("self_attn.o_proj", [h, nh * d]),
            ("mlp.gate_proj", [ff, h]),
            ("mlp.up_proj", [ff, h]),
            ("mlp.down_proj", [h, ff]),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(&shape, init(shape[1]), 0.0)?);
        }
        if cfg.qkv_bias() {
            t.insert(format!("{p}.self_attn.q_proj.bias"), randn(&[nh * d], 0.1, 0.0)?);
            t.insert(format!("{p}.self_attn.k_proj.bias"), randn(&[nkv * d], 0.1, 0.0)?);
            t.insert(format!("{p}.self_attn.v_proj.bias"), randn(&[nkv * d], 0.1, 0.0)?);
        }
        if cfg.qk_norm() {
            t.insert(format!("{p}.self_attn.q_norm.weight"), randn(&[d], 0.1, 1.0)?);
            t.insert(format!("{p}.self_attn.k_norm.weight"), randn(&[d], 0.1, 1.0)?);
        }
        t.insert(format!("{p}.input_layernorm.weight"), randn(&[h], 0.1, 1.0)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), randn(&[h], 0.1, 1.0)?);
    }
    Ok(t)
}

//! Hugging Face checkpoint folders: loading (`config.json`, `tokenizer.json`, sharded
//! safetensors) and saving a (merged) model in the same layout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::runtime::model::{Decoder, ModelConfig};
use crate::runtime::tokenizer::TextTokenizer;

/// Loads a Hugging Face checkpoint folder: `config.json`, `tokenizer.json` (+ its
/// `tokenizer_config.json` chat template), and `*.safetensors` weights, sharded or not.
pub fn load(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<(Decoder, TextTokenizer)> {
    let cfg_path = path.join("config.json");
    let config: ModelConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?)
            .with_context(|| format!("{}: not a model config this decoder understands", cfg_path.display()))?;
    config.validate().with_context(|| format!("{}", cfg_path.display()))?;
    let files = safetensors_files(path)?;
    // SAFETY: the files are memory-mapped read-only; we never write to them while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    let decoder = Decoder::new(&config, vb).with_context(|| format!("{}: loading weights", path.display()))?;
    let tokenizer = TextTokenizer::from_hf_dir(path)?;
    Ok((decoder, tokenizer))
}

/// The weight files of a checkpoint folder: those named by `model.safetensors.index.json`,
/// else every `*.safetensors`.
fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index)?).with_context(|| format!("{} is not valid JSON", index.display()))?;
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
    crate::util::atomic::write_dir_atomically(dir, |tmp| {
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
        super::safetensors::save_safetensors(&decoder.named_weights(), &tmp.join("model.safetensors"))?;
        tokenizer.save_hf(tmp)
    })
}

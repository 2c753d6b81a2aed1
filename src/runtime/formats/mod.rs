//! Opening a model: a GGUF file ([`gguf`]) or a Hugging Face checkpoint folder ([`hf`]);
//! writing safetensors ([`safetensors`]).

pub mod gguf;
pub mod hf;
pub mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::runtime::device::default_dtype;
use crate::runtime::model::{Decoder, ModelConfig};
use crate::runtime::tokenizer::TextTokenizer;

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
/// `*.safetensors`), in the device's compute dtype (f32 on the CPU, bf16 on a GPU).
///
/// Errors: a missing path says how to get the default model; an unsupported config or a
/// missing tensor names the file.
pub fn load(path: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    let dtype = default_dtype(device);
    if !path.exists() {
        bail!(
            "model not found at {}: run `make model` for the default SmolLM2 GGUF, or point the config at a Hugging Face checkpoint folder",
            path.display()
        );
    }
    let (decoder, tokenizer) = if path.is_file() {
        let g = gguf::load(path, device, dtype)?;
        let vb = VarBuilder::from_tensors(g.weights, dtype, device);
        let decoder = Decoder::new(&g.config, vb).with_context(|| format!("{}: building the decoder", path.display()))?;
        (decoder, g.tokenizer)
    } else {
        hf::load(path, device, dtype)?
    };
    Ok(LoadedModel { decoder, tokenizer, source: path.to_path_buf() })
}

/// Builds a decoder from named tensors (tests and merged models).
pub fn decoder_from_tensors(cfg: &ModelConfig, tensors: HashMap<String, Tensor>, device: &Device) -> anyhow::Result<Decoder> {
    let dtype = tensors.values().next().map(|t| t.dtype()).unwrap_or(DType::F32);
    Ok(Decoder::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))?)
}

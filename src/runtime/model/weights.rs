//! The decoder's weights by name: the projection enum, the one table of checkpoint names and
//! shapes, and random weights of any config (tests, benchmarks of shapes not on disk).
//!
//! Every tensor name of a Hugging Face Llama/Qwen checkpoint is spelled here and nowhere
//! else: loading ([`super::Decoder::new`]), saving ([`super::Decoder::named_weights`]),
//! LoRA tensor names and random weights all go through [`layer_tensors`] and [`Proj`].

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;

/// The seven projections of a decoder layer, named as in the checkpoint (`q_proj`, ...).
/// PEFT's `target_modules` name these; so does the config's `training.target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::QProj, Proj::KProj, Proj::VProj, Proj::OProj, Proj::GateProj, Proj::UpProj, Proj::DownProj];

    pub fn name(self) -> &'static str {
        match self {
            Proj::QProj => "q_proj",
            Proj::KProj => "k_proj",
            Proj::VProj => "v_proj",
            Proj::OProj => "o_proj",
            Proj::GateProj => "gate_proj",
            Proj::UpProj => "up_proj",
            Proj::DownProj => "down_proj",
        }
    }

    /// The block that holds the projection: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::QProj | Proj::KProj | Proj::VProj | Proj::OProj => "self_attn",
            _ => "mlp",
        }
    }

    /// Parses a checkpoint name (`q_proj`); the error lists the valid names.
    pub fn parse(s: &str) -> anyhow::Result<Proj> {
        use anyhow::Context;
        Proj::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown projection {s:?}: expected one of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"))
    }

    /// `(out, in)` of the projection's weight.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
        match self {
            Proj::QProj => (q, h),
            Proj::KProj | Proj::VProj => (kv, h),
            Proj::OProj => (h, q),
            Proj::GateProj | Proj::UpProj => (cfg.intermediate_size, h),
            Proj::DownProj => (h, cfg.intermediate_size),
        }
    }

    /// Whether the projection carries a bias in this architecture (Qwen2's q/k/v; Llama's
    /// `attention_bias` adds o).
    pub fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Proj::QProj | Proj::KProj | Proj::VProj => cfg.qkv_bias(),
            Proj::OProj => cfg.attention_bias,
            _ => false,
        }
    }

    /// `model.layers.{layer}.{parent}.{name}`: the checkpoint prefix of this projection.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }
}

/// What a named tensor is, so random weights can fill it sensibly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TensorKind {
    /// An RMSNorm weight (near 1).
    Norm,
    /// A projection or embedding matrix (small, scaled by fan-in).
    Matrix,
    /// A bias vector (small).
    Bias,
}

/// llama.cpp's RoPE frequency divisors (`[head_dim / 2]`, f32), the name its GGUF uses and the
/// one selfedit keeps when it saves such a model; Transformers has no such tensor and does not
/// apply it, which is why a model that has it is best kept as GGUF.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Every tensor of the model outside the layers: `(name, shape, kind)`.
pub fn global_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, TensorKind)> {
    let h = cfg.hidden_size;
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h], TensorKind::Matrix),
        ("model.norm.weight".to_string(), vec![h], TensorKind::Norm),
    ];
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h], TensorKind::Matrix));
    }
    t
}

/// Every tensor of layer `layer`: `(name, shape, kind)`: weights, biases, norms.
pub fn layer_tensors(cfg: &ModelConfig, layer: usize) -> Vec<(String, Vec<usize>, TensorKind)> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim());
    let p = format!("model.layers.{layer}");
    let mut t = Vec::new();
    for m in Proj::ALL {
        let (o, i) = m.shape(cfg);
        t.push((format!("{}.weight", m.path(layer)), vec![o, i], TensorKind::Matrix));
    }
    for m in Proj::ALL.into_iter().filter(|m| m.has_bias(cfg)) {
        t.push((format!("{}.bias", m.path(layer)), vec![m.shape(cfg).0], TensorKind::Bias));
    }
    if cfg.qk_norm() {
        t.push((format!("{p}.self_attn.q_norm.weight"), vec![d], TensorKind::Norm));
        t.push((format!("{p}.self_attn.k_norm.weight"), vec![d], TensorKind::Norm));
    }
    t.push((format!("{p}.input_layernorm.weight"), vec![h], TensorKind::Norm));
    t.push((format!("{p}.post_attention_layernorm.weight"), vec![h], TensorKind::Norm));
    t
}

/// Random weights for every tensor a decoder of `cfg` needs, named as in a checkpoint
/// (norm weights near 1, matrices uniform within ±1/sqrt(fan-in), the embedding within
/// ±0.5): for tests and for benchmarks of model shapes that are not on disk.
pub fn random_weights(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> anyhow::Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut all = global_tensors(cfg);
    for i in 0..cfg.num_hidden_layers {
        all.extend(layer_tensors(cfg, i));
    }
    let mut out = HashMap::new();
    for (name, shape, kind) in all {
        let (scale, offset) = match kind {
            TensorKind::Norm => (0.1, 1.0),
            TensorKind::Bias => (0.1, 0.0),
            TensorKind::Matrix if name == "model.embed_tokens.weight" => (0.5, 0.0),
            TensorKind::Matrix if name == "lm_head.weight" => (0.3, 0.0),
            TensorKind::Matrix => (1.0 / (shape[1] as f32).sqrt(), 0.0),
        };
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(out)
}

//! `config.json` of a Hugging Face checkpoint: the fields the decoder reads, and the checks
//! that say what it does not support.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// `config.json` of a Hugging Face checkpoint (the fields this decoder uses).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Transformers < 5 spelling of the RoPE variant (`{"rope_type": "llama3", "factor": 8, ...}`);
    /// read through [`ModelConfig::rope`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Transformers >= 5 spelling: the same object, with `rope_theta` inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// The MLP's activation; only SwiGLU's `silu` is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Llama's switch for gate/up/down biases (not implemented).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.
}
fn default_max_pos() -> usize {
    4096
}

/// The rotary-embedding variant a checkpoint asks for (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Llama 3.1's frequency-dependent scaling (Transformers' `_compute_llama3_parameters`):
    /// wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
    /// divided by `factor`, shorter than `.. / high_freq_factor` kept, and those between
    /// interpolated.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

impl RopeScaling {
    /// The divisor of each frequency, `inv_freq` in, `inv_freq / divisor` out (llama.cpp's
    /// `rope_freqs.weight` holds exactly these for Llama 3.1 GGUFs).
    pub fn freq_factors(&self, inv_freq: &[f32]) -> Vec<f32> {
        match *self {
            RopeScaling::Default => vec![1.0; inv_freq.len()],
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: ctx } => {
                let (low_wavelen, high_wavelen) = (ctx / low_freq_factor, ctx / high_freq_factor);
                inv_freq
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            factor as f32
                        } else {
                            let smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                        }
                    })
                    .collect()
            }
        }
    }
}

impl ModelConfig {
    /// A 2-layer Llama of width 32 (4 heads of 8, 2 KV heads, vocabulary 64) for unit tests.
    #[cfg(test)]
    pub(crate) fn tiny_for_tests() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128
        }))
        .expect("a valid config")
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }
    /// `rope_theta`, from `rope_parameters` when the config is in Transformers 5's layout.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p["rope_theta"].as_f64()).unwrap_or(self.rope_theta)
    }

    /// The RoPE variant. Errors name a type this decoder does not implement (`linear`,
    /// `dynamic`, `yarn`, `longrope`, ...) or a missing `llama3` field; nothing is ignored.
    pub fn rope(&self) -> anyhow::Result<RopeScaling> {
        let (field, spec) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(s), _) if !s.is_null() => ("rope_scaling", s),
            (_, Some(p)) if !p.is_null() => ("rope_parameters", p),
            _ => return Ok(RopeScaling::Default),
        };
        let kind = spec.get("rope_type").or_else(|| spec.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |key: &str| -> anyhow::Result<f64> {
            spec.get(key)
                .and_then(|v| v.as_f64())
                .with_context(|| format!("{field} of rope_type \"llama3\" needs a number {key:?} (found {spec})"))
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } = s {
                    anyhow::ensure!(
                        factor > 0. && high_freq_factor > low_freq_factor && low_freq_factor > 0.,
                        "{field}: llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0 (found {spec})"
                    );
                }
                Ok(s)
            }
            other => anyhow::bail!(
                "{field}: rope_type {other:?} is not supported (selfedit implements \"default\" and \"llama3\"); use a model without it"
            ),
        }
    }

    /// Rotary inverse frequencies `[head_dim / 2]`, scaled as [`Self::rope`] says.
    pub fn rope_inv_freq(&self) -> anyhow::Result<Vec<f32>> {
        let dim = self.head_dim();
        let theta = self.rope_theta() as f32;
        let base: Vec<f32> = (0..dim).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / dim as f32)).collect();
        let factors = self.rope()?.freq_factors(&base);
        Ok(base.iter().zip(factors).map(|(f, d)| f / d).collect())
    }

    /// Checks what the decoder supports and says what is wrong otherwise.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.model_type.as_str(), "llama" | "qwen2" | "qwen3" | "mistral"),
            "model_type {:?} is not supported: selfedit's decoder runs llama, qwen2 and qwen3",
            self.model_type
        );
        self.rope()?;
        if let Some(act) = self.hidden_act.as_deref() {
            anyhow::ensure!(act == "silu", "hidden_act {act:?} is not supported: selfedit's MLP is SwiGLU (\"silu\")");
        }
        anyhow::ensure!(!self.mlp_bias, "mlp_bias = true is not supported: selfedit's MLP projections have no bias");
        anyhow::ensure!(
            self.num_attention_heads.is_multiple_of(self.kv_heads()),
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.kv_heads()
        );
        Ok(())
    }
}

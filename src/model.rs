//! The Llama-family decoder: Llama / SmolLM2, Qwen2 and Qwen3 in one implementation.
//!
//! Follows candle-transformers' model files (a config deserialized from `config.json`,
//! weights looked up by their checkpoint path, numbered steps in attention) with three
//! differences: the KV cache and the LoRA adapter are passed to `forward` explicitly, so one
//! loaded base model serves many batches and adapters; the architecture differences are
//! switches (`qkv_bias`, `qk_norm`, tied embeddings) instead of one file per model; and every
//! op is differentiable (see [`crate::ops`]), so the same forward trains adapters.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::lora::{LoraAdapter, Module};
use crate::ops;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
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

impl ModelConfig {
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
    /// Checks what the decoder supports and says what is wrong otherwise.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.model_type.as_str(), "llama" | "qwen2" | "qwen3" | "mistral"),
            "model_type {:?} is not supported: selfedit's decoder runs llama, qwen2 and qwen3",
            self.model_type
        );
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                anyhow::bail!("rope_scaling {scaling} is not supported yet; remove it or use a model without it");
            }
        }
        anyhow::ensure!(
            self.num_attention_heads % self.kv_heads() == 0,
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.kv_heads()
        );
        Ok(())
    }
}

/// A projection with a frozen weight `[out, in]` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
}

/// Preallocated keys and values for every layer, `[batch, kv_heads, capacity, head_dim]`.
/// Owned by the caller, so a batch's cache lives exactly as long as its generation.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (batch, cfg.kv_heads(), capacity, cfg.head_dim());
        let mut keys = Vec::with_capacity(cfg.num_hidden_layers);
        let mut values = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            keys.push(Tensor::zeros(shape, dtype, device)?);
            values.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self { keys, values, len: 0, capacity })
    }
    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Writes this step's keys and values of `layer` and returns all of them so far.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        if self.len + new > self.capacity {
            candle_core::bail!("KV cache full: {} + {new} > capacity {}", self.len, self.capacity);
        }
        self.keys[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.values[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + new;
        Ok((self.keys[layer].narrow(2, 0, total)?, self.values[layer].narrow(2, 0, total)?))
    }
}

/// Rotary tables `cos`, `sin`: `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
        let max = cfg.max_position_embeddings;
        let t = Tensor::arange(0u32, max as u32, device)?.to_dtype(DType::F32)?.reshape((max, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// `cos`, `sin` for each position: `[batch, seq, head_dim / 2]`.
    fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, l, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, l, ()))?;
        Ok((cos, sin))
    }
}

/// What one forward pass sees: token ids `[b, l]`, their positions `[b, l]` (u32), and an
/// additive attention mask `[b, 1, l, cached + l]` (0 = attend, -inf = masked).
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: Option<Tensor>,
}

impl Batch {
    /// One unpadded sequence starting at position `start` with a causal mask.
    pub fn causal(ids: &[u32], start: usize, device: &Device, dtype: DType) -> Result<Self> {
        let l = ids.len();
        let ids_t = Tensor::new(ids, device)?.unsqueeze(0)?;
        let pos: Vec<u32> = (start..start + l).map(|p| p as u32).collect();
        let positions = Tensor::new(pos.as_slice(), device)?.unsqueeze(0)?;
        let mask = if l > 1 { Some(causal_mask(1, l, start, &[0], device, dtype)?) } else { None };
        Ok(Self { ids: ids_t, positions, mask })
    }
}

/// Additive mask for `l` new positions after `cached` ones, for `b` rows where row `r` has
/// `left_pad[r]` padding positions at the start (never attended to).
pub fn causal_mask(b: usize, l: usize, cached: usize, left_pad: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
    let total = cached + l;
    let mut m = vec![0f32; b * l * total];
    for r in 0..b {
        for i in 0..l {
            for j in 0..total {
                // A padding query attends to itself only (an all-masked row would give NaN,
                // which would reach real rows through the values).
                let is_pad_query = cached + i < left_pad[r];
                if j > cached + i || (j < left_pad[r] && !(is_pad_query && j == cached + i)) {
                    m[(r * l + i) * total + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, total), device)?.to_dtype(dtype)
}

/// The decoder-only transformer.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
    rope: RopeTable,
}

impl Decoder {
    /// Builds the decoder from weights named as in a Hugging Face checkpoint.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let vm = vb.pp("model");
        let embed_tokens = vm.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let vl = vm.pp("layers").pp(i);
            let va = vl.pp("self_attn");
            let bias = cfg.qkv_bias();
            let self_attn = Attention {
                q_proj: Linear::load(&va.pp("q_proj"), nh * d, h, bias)?,
                k_proj: Linear::load(&va.pp("k_proj"), nkv * d, h, bias)?,
                v_proj: Linear::load(&va.pp("v_proj"), nkv * d, h, bias)?,
                o_proj: Linear::load(&va.pp("o_proj"), h, nh * d, cfg.attention_bias)?,
                q_norm: if cfg.qk_norm() { Some(va.pp("q_norm").get(d, "weight")?) } else { None },
                k_norm: if cfg.qk_norm() { Some(va.pp("k_norm").get(d, "weight")?) } else { None },
            };
            let vmlp = vl.pp("mlp");
            let mlp = Mlp {
                gate_proj: Linear::load(&vmlp.pp("gate_proj"), cfg.intermediate_size, h, false)?,
                up_proj: Linear::load(&vmlp.pp("up_proj"), cfg.intermediate_size, h, false)?,
                down_proj: Linear::load(&vmlp.pp("down_proj"), h, cfg.intermediate_size, false)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: vl.pp("input_layernorm").get(h, "weight")?,
                post_attention_layernorm: vl.pp("post_attention_layernorm").get(h, "weight")?,
            });
        }
        let norm = vm.pp("norm").get(h, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, h), "weight")?
        };
        let rope = RopeTable::new(cfg, embed_tokens.dtype(), embed_tokens.device())?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, rope })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// A projection of layer `layer`, plus the adapter's low-rank update when it has one.
    fn project(&self, x: &Tensor, lin: &Linear, layer: usize, module: Module, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let y = ops::linear(x, &lin.weight, lin.bias.as_ref())?;
        let delta = match lora {
            Some(adapter) => adapter.delta(layer, module, x)?,
            None => None,
        };
        match delta {
            Some(delta) => {
                let delta = delta.to_dtype(y.dtype())?;
                y + delta
            }
            None => Ok(y),
        }
    }

    fn attention(
        &self,
        i: usize,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let a = &self.layers[i].self_attn;
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, d) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        // 1. projections, split into heads: [b, heads, l, d]
        let q = self.project(x, &a.q_proj, i, Module::QProj, lora)?;
        let k = self.project(x, &a.k_proj, i, Module::KProj, lora)?;
        let v = self.project(x, &a.v_proj, i, Module::VProj, lora)?;
        let q = q.reshape((b, l, nh, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, l, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, l, nkv, d))?.transpose(1, 2)?.contiguous()?;
        // 2. Qwen3: per-head RMSNorm of queries and keys
        let eps = self.cfg.rms_norm_eps;
        let q = match &a.q_norm { Some(w) => ops::rms_norm(&q, w, eps)?, None => q };
        let k = match &a.k_norm { Some(w) => ops::rms_norm(&k, w, eps)?, None => k };
        // 3. rotary position embedding at each row's own positions
        let q = ops::rope(&q, &cos_sin.0, &cos_sin.1)?;
        let k = ops::rope(&k, &cos_sin.0, &cos_sin.1)?;
        // 4. keys and values so far (cache) + this step's
        let (k, v) = match cache {
            Some(c) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        // 5. attention, heads merged back: [b, l, heads * d]
        let y = ops::attention(&q, &k, &v, mask)?;
        let y = y.transpose(1, 2)?.reshape((b, l, nh * d))?;
        // 6. output projection
        self.project(&y, &a.o_proj, i, Module::OProj, lora)
    }

    fn mlp(&self, i: usize, x: &Tensor, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let m = &self.layers[i].mlp;
        let gate = self.project(x, &m.gate_proj, i, Module::GateProj, lora)?;
        let up = self.project(x, &m.up_proj, i, Module::UpProj, lora)?;
        self.project(&(gate.silu()? * up)?, &m.down_proj, i, Module::DownProj, lora)
    }

    /// Final hidden states `[b, l, hidden]` (after the last norm). With a cache, the batch's
    /// positions continue after what the cache holds and the cache advances by `l`.
    pub fn forward_hidden(&self, batch: &Batch, mut cache: Option<&mut KvCache>, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let (b, l) = batch.ids.dims2()?;
        let mut x = self.embed_tokens.index_select(&batch.ids.flatten_all()?, 0)?.reshape((b, l, ()))?;
        let cos_sin = self.rope.at(&batch.positions)?;
        let eps = self.cfg.rms_norm_eps;
        for i in 0..self.layers.len() {
            let layer = &self.layers[i];
            let h = ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let h = self.attention(i, &h, &cos_sin, batch.mask.as_ref(), cache.as_deref_mut(), lora)?;
            x = (x + h)?;
            let h = ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            x = (&x + self.mlp(i, &h, lora)?)?;
        }
        if let Some(c) = cache {
            c.len += l;
        }
        ops::rms_norm(&x, &self.norm, eps)
    }

    /// Logits of the last position of each row, `[b, vocab]`, in f32.
    pub fn forward_last(&self, batch: &Batch, cache: Option<&mut KvCache>, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let h = self.forward_hidden(batch, cache, lora)?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?.squeeze(1)?;
        ops::linear(&last, &self.lm_head, None)?.to_dtype(DType::F32)
    }

    /// Logits of every position, `[b, l, vocab]`, in f32.
    pub fn forward_all(&self, batch: &Batch, cache: Option<&mut KvCache>, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let h = self.forward_hidden(batch, cache, lora)?;
        ops::linear(&h, &self.lm_head, None)?.to_dtype(DType::F32)
    }

    /// Mean next-token cross-entropy of one sequence; `loss_from` masks the first positions'
    /// targets (0 = loss on every token). Differentiable with respect to the adapter.
    pub fn sequence_loss(&self, ids: &[u32], loss_from: usize, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        let batch = Batch::causal(ids, 0, self.device(), self.dtype())?;
        let h = self.forward_hidden(&batch, None, lora)?.squeeze(0)?;
        let n = ids.len();
        let targets: Vec<Option<u32>> = (0..n)
            .map(|i| if i + 1 < n && i + 1 >= loss_from.max(1) { Some(ids[i + 1]) } else { None })
            .collect();
        ops::lm_head_cross_entropy(&h, &self.lm_head, &targets)
    }

    /// The projection `module` of layer `layer`, for merging adapters into it.
    pub fn linear_mut(&mut self, layer: usize, module: Module) -> &mut Linear {
        let l = &mut self.layers[layer];
        match module {
            Module::QProj => &mut l.self_attn.q_proj,
            Module::KProj => &mut l.self_attn.k_proj,
            Module::VProj => &mut l.self_attn.v_proj,
            Module::OProj => &mut l.self_attn.o_proj,
            Module::GateProj => &mut l.mlp.gate_proj,
            Module::UpProj => &mut l.mlp.up_proj,
            Module::DownProj => &mut l.mlp.down_proj,
        }
    }

    pub fn linear(&self, layer: usize, module: Module) -> &Linear {
        let l = &self.layers[layer];
        match module {
            Module::QProj => &l.self_attn.q_proj,
            Module::KProj => &l.self_attn.k_proj,
            Module::VProj => &l.self_attn.v_proj,
            Module::OProj => &l.self_attn.o_proj,
            Module::GateProj => &l.mlp.gate_proj,
            Module::UpProj => &l.mlp.up_proj,
            Module::DownProj => &l.mlp.down_proj,
        }
    }

    /// Every weight under its Hugging Face checkpoint name (for saving a merged model).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for m in Module::ALL {
                let lin = self.linear(i, m);
                out.push((format!("{p}.{}.{}.weight", m.parent(), m.name()), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{}.{}.bias", m.parent(), m.name()), b.clone()));
                }
            }
            if let Some(w) = &l.self_attn.q_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), w.clone()));
            }
            if let Some(w) = &l.self_attn.k_norm {
                out.push((format!("{p}.self_attn.k_norm.weight"), w.clone()));
            }
            out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }
}

//! The decoder's forward pass: Llama / SmolLM2, Qwen2 and Qwen3 in one implementation.
//!
//! Follows candle-transformers' model files (a config deserialized from `config.json`,
//! weights looked up by their checkpoint path, numbered steps in attention) with three
//! differences: the KV cache and the adapter are passed to `forward` explicitly, so one
//! loaded base model serves many batches and adapters; the architecture differences are
//! switches (`qkv_bias`, `qk_norm`, tied embeddings) instead of one file per model; and every
//! op is differentiable (see [`crate::runtime::ops`]), so the same forward trains adapters.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::cache::{causal_mask, Batch, KvCache};
use super::config::{ModelConfig, RopeScaling};
use super::layer_grad::{self, Attention, DecoderLayer, Linear, LowRank, Masking, Mlp, Update};
use super::weights::{global_tensors, Proj, ROPE_FREQS};
use crate::runtime::blas::{ComputeDtype, PackedWeight};
use crate::runtime::ops;

/// A low-rank (or any additive) update of the projections, applied on top of the frozen
/// weights. LoRA implements it; the decoder needs nothing else of an adapter.
pub trait Adapter: Sync {
    /// The update to add to projection `proj` of layer `layer` for input `x` `[.., in]`:
    /// `[.., out]` in any float dtype, or `None` when the adapter leaves `proj` alone.
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>>;

    /// The update of `proj` for `rows` input rows as scaled low-rank factors, drawing the
    /// rows' dropout mask as [`Self::delta`] would: what lets the adapters of a packed batch
    /// share one op (`runtime::multi_lora`). `Ok(None)`, the default: the adapter is not of
    /// this form, and only `delta` applies.
    fn low_rank(&self, _layer: usize, _proj: Proj, _rows: usize) -> Result<Option<LowRank>> {
        Ok(None)
    }

    /// Whether every update comes in factored form ([`Self::low_rank_parts`] never `None`),
    /// asked before any mask is drawn: what lets a training pass run each layer as one node
    /// of the graph (`layer_grad`). Default `false`.
    fn factored(&self) -> bool {
        false
    }

    /// The update of `proj` for activations of `b` rows of `l` tokens (`b · l` input rows)
    /// as consecutive `(rows, update)` segments covering them, drawing dropout masks as
    /// [`Self::delta`] would. Default: one segment, [`Self::low_rank`] of all rows.
    fn low_rank_parts(&self, layer: usize, proj: Proj, (b, l): (usize, usize)) -> Result<Option<Vec<(usize, LowRank)>>> {
        Ok(self.low_rank(layer, proj, b * l)?.map(|u| vec![(b * l, u)]))
    }

    /// `y` plus the update of `proj` for input `x` (`y` `[.., out]`, the frozen product of
    /// `x`, handed over by the decoder), in `y`'s dtype. Default: [`Self::delta`], then an add.
    ///
    /// `y` is handed over: an implementation may write the sum into its storage ([`Frozen`]
    /// does), so pass a tensor whose storage no other live tensor shares, such as a product
    /// just computed (a `Tensor::clone` shares it; `Tensor::copy` does not).
    fn add_delta(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        plus(y, self.delta(layer, proj, x)?)
    }
}

/// `y + delta` in `y`'s dtype, or `y` without an update.
fn plus(y: Tensor, delta: Option<Tensor>) -> Result<Tensor> {
    match delta {
        Some(delta) => {
            let delta = delta.to_dtype(y.dtype())?;
            y + delta
        }
        None => Ok(y),
    }
}

/// An adapter used for inference: its updates are cut from the autograd graph.
///
/// Why: LoRA weights are `Var`s, so without this every activation downstream of the first
/// update tracks its ops, the decoder takes its training path, and the whole forward
/// graph stays alive until the logits are dropped (measured: a 64-row generation prefill
/// held 3.6 GB, against ~0.1 GB with the updates detached). The values are equal to float
/// summation order: [`Adapter::delta`] of detached factors takes the library's low-rank
/// products; [`Adapter::add_delta`], which the decoder calls, and tracked factors the
/// kernel's (`ops::Products`).
pub struct Frozen<'a>(pub &'a dyn Adapter);

impl Adapter for Frozen<'_> {
    /// A factored adapter's update from its detached factors, so no graph is built at all
    /// (the adapter's own `delta` would build one over its `Var`s, and for a batch of many
    /// adapters copy all their factors into one input of it: 2.6% of a grouped run's
    /// samples, all in evaluation). Otherwise the adapter's update, detached.
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        if let ([b, l, in_dim], true) = (x.dims(), self.0.factored()) {
            let (b, l, in_dim) = (*b, *l, *in_dim);
            if let Some(parts) = self.low_rank_parts(layer, proj, (b, l))? {
                let y = low_rank_update(&x.reshape((b * l, in_dim))?, parts)?;
                return y.map(|y| y.reshape((b, l, y.dim(1)?))).transpose();
            }
        }
        Ok(self.0.delta(layer, proj, x)?.map(|d| d.detach()))
    }

    /// A factored adapter's update added into `y` where it lies ([`ops::low_rank_forward_add`],
    /// the products of training, [`ops::Products::Kernel`]), where the default writes the
    /// update out and an add reads it back into a third tensor: generation's updates. The
    /// values of [`Self::delta`] then the add to float summation order (its products are the
    /// library's); each row's from that row alone where the kernel takes the products, so a
    /// row generates the same numbers whatever adapters share its batch. Otherwise the default.
    ///
    /// Why: timed in grouped evaluation (16 self-edits, 128 rows a batch), the updates of q and
    /// v took 11% of its time and the adds another 0.8%; a solo self-edit's evaluation ran 7%
    /// and a grouped one's 5% faster this way (README, "Performance log").
    fn add_delta(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        if let ([b, l, in_dim], true) = (x.dims(), self.0.factored()) {
            let (b, l, in_dim) = (*b, *l, *in_dim);
            if let Some(parts) = self.low_rank_parts(layer, proj, (b, l))? {
                let update = Update::new(parts, in_dim, x.device())?;
                if update.is_untouched() {
                    return Ok(y);
                }
                let (dims, out) = (y.dims().to_vec(), y.dim(candle_core::D::Minus1)?);
                let h = update.input(&x.reshape((b * l, in_dim))?)?;
                let (y, _) = ops::low_rank_forward_add(&h, &update.segments, y.reshape((b * l, out))?, ops::Products::Kernel)?;
                return y.reshape(dims);
            }
        }
        plus(y, self.delta(layer, proj, x)?)
    }

    fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> Result<Option<LowRank>> {
        Ok(self.0.low_rank(layer, proj, rows)?.map(LowRank::detach))
    }

    fn factored(&self) -> bool {
        self.0.factored()
    }

    fn low_rank_parts(&self, layer: usize, proj: Proj, dims: (usize, usize)) -> Result<Option<Vec<(usize, LowRank)>>> {
        Ok(self.0.low_rank_parts(layer, proj, dims)?.map(|parts| parts.into_iter().map(|(rows, u)| (rows, u.detach())).collect()))
    }
}

/// An adapter as a loss pass sees it when the pass runs the first [`loss_positions`]`(len)`
/// of a `len`-token sequence's positions: its update of those rows, the dropout masks drawn
/// for all `len` rows and cut to the rows that run.
///
/// Why: an adapter draws its masks row after row from one seeded stream, so a pass that drew
/// one row fewer per projection would shift every later mask. A seeded run would then train
/// under other masks than when every position ran, and an experiment resumed across that
/// change would mix adapters trained under either. A factored update ([`Adapter::low_rank`])
/// has its mask cut; any other is the adapter's `delta` of the rows followed by zero rows
/// for the positions that do not run, cut back to the rows. One sequence's adapter: a
/// packed batch wraps each sequence's before segmenting (`runtime::multi_lora`).
pub struct FedPositions<'a> {
    adapter: &'a dyn Adapter,
    len: usize,
}

impl<'a> FedPositions<'a> {
    /// `adapter` for a loss pass over a sequence of `len` tokens.
    pub fn new(adapter: &'a dyn Adapter, len: usize) -> Self {
        Self { adapter, len }
    }

    /// The rows the pass runs for this sequence: [`loss_positions`]`(len)`.
    pub fn rows(&self) -> usize {
        loss_positions(self.len)
    }
}

impl Adapter for FedPositions<'_> {
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let unfed = self.len - self.rows();
        if unfed == 0 {
            return self.adapter.delta(layer, proj, x);
        }
        let mut dims = x.dims().to_vec();
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let padded = Tensor::cat(&[&x.reshape((rows, in_dim))?, &Tensor::zeros((unfed, in_dim), x.dtype(), x.device())?], 0)?;
        let Some(y) = self.adapter.delta(layer, proj, &padded)? else { return Ok(None) };
        *dims.last_mut().expect("x has a last dimension") = y.dim(1)?;
        Ok(Some(y.narrow(0, 0, rows)?.reshape(dims)?))
    }

    fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> Result<Option<LowRank>> {
        let unfed = self.len - self.rows();
        Ok(match self.adapter.low_rank(layer, proj, rows + unfed)? {
            Some(LowRank::Factors { a, b, scale, mask: Some(mask) }) => {
                Some(LowRank::Factors { a, b, scale, mask: Some(mask.narrow(0, 0, rows)?) })
            }
            other => other,
        })
    }

    fn factored(&self) -> bool {
        self.adapter.factored()
    }
}

/// The low-rank updates of consecutive row segments of `x` `[n, in]`, `(rows, update)` for
/// each in order, covering `x`: dropout masks applied, then one
/// [`ops::segmented_low_rank`] over all segments. `[n, out]` in f32, or `None` when no
/// segment has factors.
pub fn low_rank_update(x: &Tensor, parts: Vec<(usize, LowRank)>) -> Result<Option<Tensor>> {
    let (_, in_dim) = x.dims2()?;
    let update = Update::new(parts, in_dim, x.device())?;
    if update.is_untouched() {
        return Ok(None);
    }
    ops::segmented_low_rank(&update.input(x)?, &update.segments).map(Some)
}

/// Rotary tables `cos`, `sin`: `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    /// `inv_freq`: `[head_dim / 2]`, already scaled (see [`ModelConfig::rope_inv_freq`]).
    fn new(cfg: &ModelConfig, inv_freq: Vec<f32>, dtype: DType, device: &Device) -> Result<Self> {
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
/// The decoder-only transformer.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
    /// `lm_head` laid out once for its products in the model's compute dtype
    /// ([`Self::set_compute_dtype`]): for AMX in bf16, in the f32 kernel's panels in f32 on
    /// AVX-512 (+113 MB for SmolLM2); the loss, [`Self::forward_all`] and generation's
    /// last-position logits all use it. `None`: OpenBLAS / candle's products.
    pub lm_head_packed: Option<Arc<PackedWeight>>,
    /// llama.cpp's per-frequency RoPE divisors `[head_dim / 2]` (`rope_freqs.weight`, which
    /// its converter writes for Llama 3.1+ instead of `rope_scaling`); kept so a saved
    /// model carries them.
    pub rope_freqs: Option<Tensor>,
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
        let lm_head = if cfg.tie_word_embeddings { embed_tokens.clone() } else { vb.pp("lm_head").get((cfg.vocab_size, h), "weight")? };
        // RoPE: the config's variant, or llama.cpp's explicit divisors; never both, since
        // which one wins is not defined anywhere.
        let mut inv_freq = cfg.rope_inv_freq().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let rope_freqs = if vb.contains_tensor(ROPE_FREQS) {
            if cfg.rope().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))? != RopeScaling::Default {
                candle_core::bail!("the checkpoint has both a rope_scaling and a {ROPE_FREQS} tensor; keep one");
            }
            let t = vb.get_unchecked_dtype(ROPE_FREQS, DType::F32)?;
            let factors: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if factors.len() != inv_freq.len() || factors.iter().any(|f| !(f.is_finite() && *f > 0.)) {
                candle_core::bail!("{ROPE_FREQS} must hold {} positive divisors (head_dim / 2), found {factors:?}", inv_freq.len());
            }
            inv_freq.iter_mut().zip(&factors).for_each(|(f, d)| *f /= d);
            Some(t)
        } else {
            None
        };
        let rope = RopeTable::new(cfg, inv_freq, embed_tokens.dtype(), embed_tokens.device())?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, lm_head_packed: None, rope_freqs, rope })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The precision of the frozen weights' products.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.packed_for().unwrap_or_default()
    }

    /// The dtype the projections are laid out for, if any ([`Self::set_compute_dtype`]).
    fn packed_for(&self) -> Option<ComputeDtype> {
        self.layers.first()?.self_attn.q_proj.packed.as_ref().map(|p| p.dtype())
    }

    /// Runs the frozen weights' products (every projection and the LM head, forward and input
    /// gradient) in `dtype`, each weight laid out once for them ([`PackedWeight`]):
    /// - bf16: a bf16 copy of each weight beside the f32 one, for SmolLM2-135M 2 × 2 bytes per
    ///   weight, ~540 MB;
    /// - f32: on a CPU with AVX-512F, each projection's and the LM head's `w^T` cut into
    ///   panels for [`crate::runtime::sgemm`], for SmolLM2-135M ~425 + 113 MB beside the f32
    ///   weights. Without AVX-512F, or before this is called, f32 products take OpenBLAS.
    ///
    /// # Errors
    /// Bf16 without AMX ([`crate::runtime::amx::enable`] not called or refused), a model not in
    /// f32 on the CPU, or a weight dimension not a multiple of 16; the model is then unchanged.
    /// F32 never fails: a weight the kernel cannot take (not f32 on the CPU, a width not a
    /// multiple of 16) keeps the unpacked products.
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) -> Result<()> {
        if self.packed_for() == Some(dtype) || (dtype.is_f32() && self.packed_for().is_none() && !crate::runtime::sgemm::available()) {
            return Ok(());
        }
        // f32 panels are a speed-up, never a requirement: a model on a GPU, in bf16 weights
        // or with a width that is not a multiple of 16 keeps OpenBLAS / candle's products.
        let f32_kernel = crate::runtime::sgemm::available() && self.device().is_cpu() && self.dtype() == DType::F32;
        let pack = |w: &Tensor| -> Result<Option<Arc<PackedWeight>>> {
            if dtype.is_f32() {
                return Ok(if f32_kernel { PackedWeight::new(w, dtype).ok().map(Arc::new) } else { None });
            }
            Ok(Some(Arc::new(PackedWeight::new(w, dtype)?)))
        };
        // Everything packed first, so an error leaves the model as it was.
        let mut packed = Vec::with_capacity(self.layers.len() * Proj::ALL.len());
        for i in 0..self.layers.len() {
            for m in Proj::ALL {
                packed.push(pack(&self.linear(i, m).weight)?);
            }
        }
        let lm_head = pack(&self.lm_head)?;
        let mut packed = packed.into_iter();
        for i in 0..self.layers.len() {
            for m in Proj::ALL {
                self.linear_mut(i, m).packed = packed.next().flatten();
            }
        }
        self.lm_head_packed = lm_head;
        Ok(())
    }

    /// Bytes a training pass of the frozen model keeps per token until its backward pass
    /// ends (an estimate): autograd holds every intermediate of a layer, about 14 × hidden +
    /// 6 × kv width + 4 × intermediate values in the compute dtype (norm outputs,
    /// projections, their head-split copies, rotary outputs, residuals; of the SwiGLU terms
    /// gate, up and their product stay, and the fourth leaves room for transient copies,
    /// since the estimate already falls short for small groups), and the loss keeps one row
    /// of vocabulary gradients. An adapter's own intermediates
    /// come on top (`runtime::training::memory_estimate`).
    pub fn training_bytes_per_token(&self) -> u64 {
        let c = &self.cfg;
        let kv = (c.kv_heads() * c.head_dim()) as u64;
        let per_layer = 14 * c.hidden_size as u64 + 6 * kv + 4 * c.intermediate_size as u64;
        (c.num_hidden_layers as u64 * per_layer + c.vocab_size as u64) * self.dtype().size_in_bytes() as u64
    }

    /// Bytes a training pass keeps for attention's probabilities over one sequence of `len`
    /// tokens until its backward pass ends: in f32 on the CPU, a sequence of up to
    /// [`ops::SHORT_ATTENTION_MAX_LEN`] tokens keeps each query head's row over its keys,
    /// `len · (len + 1) / 2` f32 values per head and layer under the causal mask every
    /// training sequence has (its backward would otherwise recompute them); nothing
    /// elsewhere, nor over [`ops::SHORT_ATTENTION_MAX_LEN`] tokens.
    pub fn attention_bytes(&self, len: usize) -> u64 {
        let c = &self.cfg;
        if !self.device().is_cpu() || self.dtype() != DType::F32 || len > ops::SHORT_ATTENTION_MAX_LEN {
            return 0;
        }
        (c.num_hidden_layers * c.num_attention_heads * len * (len + 1) / 2 * DType::F32.size_in_bytes()) as u64
    }

    /// A projection of layer `layer`, plus the adapter's low-rank update when it has one.
    fn project(&self, x: &Tensor, lin: &Linear, layer: usize, module: Proj, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let y = ops::linear(x, &lin.weight, lin.packed.as_ref(), lin.bias.as_ref())?;
        Self::add_delta(y, x, layer, module, lora)
    }

    /// [`Self::project`] of one input through the projections `lins` (`modules`) that share
    /// it: without a graph to record (generation), their frozen products as one call
    /// ([`ops::plain_linear_many`]: the threads woken once, a batch's k and v products
    /// shared out with q's), the same values; the adapter's updates in the same order.
    fn project_shared<const N: usize>(
        &self,
        x: &Tensor,
        lins: [&Linear; N],
        layer: usize,
        modules: [Proj; N],
        lora: Option<&dyn Adapter>,
    ) -> Result<[Tensor; N]> {
        let ys = if x.track_op() {
            lins.iter().map(|lin| ops::linear(x, &lin.weight, lin.packed.as_ref(), lin.bias.as_ref())).collect::<Result<Vec<_>>>()?
        } else {
            ops::plain_linear_many(x, &lins.map(|l| (&l.weight, l.packed.as_deref(), l.bias.as_ref())))?
        };
        let out = ys.into_iter().zip(modules).map(|(y, module)| Self::add_delta(y, x, layer, module, lora)).collect::<Result<Vec<_>>>()?;
        Ok(out.try_into().expect("one output per projection"))
    }

    /// `y` plus the adapter's update of `module` at `layer` for input `x`, if it has one.
    fn add_delta(y: Tensor, x: &Tensor, layer: usize, module: Proj, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        match lora {
            Some(adapter) => adapter.add_delta(layer, module, x, y),
            None => Ok(y),
        }
    }

    fn attention(
        &self,
        i: usize,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        masking: &Masking,
        cache: Option<&mut KvCache>,
        lora: Option<&dyn Adapter>,
    ) -> Result<Tensor> {
        let a = &self.layers[i].self_attn;
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, d) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        // 1. projections, split into heads: [b, heads, l, d]
        let [q, k, v] = self.project_shared(x, [&a.q_proj, &a.k_proj, &a.v_proj], i, [Proj::QProj, Proj::KProj, Proj::VProj], lora)?;
        // packed sequences without Qwen3's norms: rotary embedding and attention straight from
        // the projections (as the training path's layer node does), heads merged
        if let (Masking::Segments(segments, masks), None, None, true) = (masking, &a.q_norm, &a.k_norm, cache.is_none()) {
            let rows = |t: &Tensor, width: usize| t.reshape((b * l, width));
            let (cos, sin) = (&cos_sin.0, &cos_sin.1);
            let y = ops::segmented_rope_attention(
                &rows(&q, nh * d)?,
                &rows(&k, nkv * d)?,
                &rows(&v, nkv * d)?,
                (cos, sin),
                (nh, nkv, d),
                segments,
                masks,
            )?;
            return self.project(&y.reshape((b, l, nh * d))?, &a.o_proj, i, Proj::OProj, lora);
        }
        let q = q.reshape((b, l, nh, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, l, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, l, nkv, d))?.transpose(1, 2)?.contiguous()?;
        // 2. Qwen3: per-head RMSNorm of queries and keys
        let eps = self.cfg.rms_norm_eps;
        let q = match &a.q_norm {
            Some(w) => ops::rms_norm(&q, w, eps)?,
            None => q,
        };
        let k = match &a.k_norm {
            Some(w) => ops::rms_norm(&k, w, eps)?,
            None => k,
        };
        // 3. rotary position embedding at each row's own positions
        let q = ops::rope(&q, &cos_sin.0, &cos_sin.1)?;
        let k = ops::rope(&k, &cos_sin.0, &cos_sin.1)?;
        // 4. keys and values so far (cache) + this step's
        let (k, v, cached) = match cache {
            Some(c) => {
                let (k, v) = c.append(i, &k, &v)?;
                (k, v, Some(c.layer(i)))
            }
            None => (k, v, None),
        };
        // 5. attention, heads merged back: [b, l, heads * d]; a decoding step reads the cache
        //    where it lies; a packed batch attends within each sequence only, at that
        //    sequence's own shapes
        if let (Some((ck, cv)), Masking::Rows(mask), 1) = (cached, masking, l) {
            if let Some(y) = ops::cached_attention(&q, ck, cv, k.dim(2)?, *mask) {
                return self.project(&y?, &a.o_proj, i, Proj::OProj, lora);
            }
        }
        let y = match masking {
            Masking::Rows(mask) => ops::attention(&q, &k, &v, *mask)?,
            Masking::Segments(segments, masks) => ops::segmented_attention(&q, &k, &v, segments, masks)?,
        };
        let y = y.transpose(1, 2)?.reshape((b, l, nh * d))?;
        // 6. output projection
        self.project(&y, &a.o_proj, i, Proj::OProj, lora)
    }

    fn mlp(&self, i: usize, x: &Tensor, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let m = &self.layers[i].mlp;
        let [gate, up] = self.project_shared(x, [&m.gate_proj, &m.up_proj], i, [Proj::GateProj, Proj::UpProj], lora)?;
        self.project(&ops::swiglu(&gate, &up)?, &m.down_proj, i, Proj::DownProj, lora)
    }

    /// Final hidden states `[b, l, hidden]` (after the last norm). With a cache, the batch's
    /// positions continue after what the cache holds and the cache advances by `l`.
    pub fn forward_hidden(&self, batch: &Batch, mut cache: Option<&mut KvCache>, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let (b, l) = batch.ids.dims2()?;
        let mut x = self.embed_tokens.index_select(&batch.ids.flatten_all()?, 0)?.reshape((b, l, ()))?;
        let cos_sin = self.rope.at(&batch.positions)?;
        // a packed batch: each sequence's causal mask, built once for all layers
        let segment_masks = match &batch.segments {
            Some(segments) => segments
                .iter()
                .map(|&(_, len)| if len > 1 { causal_mask(1, len, 0, &[0], self.device(), self.dtype()).map(Some) } else { Ok(None) })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let masking = match &batch.segments {
            Some(segments) => Masking::Segments(segments, &segment_masks),
            None => Masking::Rows(batch.mask.as_ref()),
        };
        let eps = self.cfg.rms_norm_eps;
        // an adapter in factored form, no cache (training, scoring): each layer one node
        let fused = match lora {
            Some(adapter) if cache.is_none() && adapter.factored() => Some(adapter),
            _ => None,
        };
        for i in 0..self.layers.len() {
            if let Some(adapter) = fused {
                let mut updates = Vec::with_capacity(layer_grad::PROJECTIONS.len());
                for proj in layer_grad::PROJECTIONS {
                    match adapter.low_rank_parts(i, proj, (b, l))? {
                        Some(parts) => updates.push(parts),
                        None => candle_core::bail!("an adapter that says it is factored gave no factors for {proj:?} of layer {i}"),
                    }
                }
                x = layer_grad::layer(&self.cfg, &self.layers[i], &x, &cos_sin, &masking, updates)?;
                continue;
            }
            let layer = &self.layers[i];
            let h = ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let h = self.attention(i, &h, &cos_sin, &masking, cache.as_deref_mut(), lora)?;
            x = (x + h)?;
            let h = ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            x = (&x + self.mlp(i, &h, lora)?)?;
        }
        if let Some(c) = cache {
            c.advance(l);
        }
        ops::rms_norm(&x, &self.norm, eps)
    }

    /// Logits of the last position of each row, `[b, vocab]`, in f32.
    pub fn forward_last(&self, batch: &Batch, cache: Option<&mut KvCache>, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let h = self.forward_hidden(batch, cache, lora)?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?.squeeze(1)?;
        ops::linear(&last, &self.lm_head, self.lm_head_packed.as_ref(), None)?.to_dtype(DType::F32)
    }

    /// Logits of every position, `[b, l, vocab]`, in f32.
    pub fn forward_all(&self, batch: &Batch, cache: Option<&mut KvCache>, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let h = self.forward_hidden(batch, cache, lora)?;
        ops::linear(&h, &self.lm_head, self.lm_head_packed.as_ref(), None)?.to_dtype(DType::F32)
    }

    /// Mean next-token cross-entropy of one sequence; `loss_from` masks the first positions'
    /// targets (0 = loss on every token). Differentiable with respect to the adapter.
    ///
    /// The sequence runs as a packed batch of one, so its attention takes the same code as
    /// in [`Self::packed_losses`], and an adapter trained alone gets the numbers it gets in
    /// a group. Only its first [`loss_positions`]`(len)` positions run (all but the last; see
    /// `fed_positions`). `lora` is one adapter for the whole sequence, seen through
    /// [`FedPositions`] (an adapter of several segments would need each wrapped instead, as
    /// for [`Self::packed_losses`]).
    ///
    /// Errors: a sequence without a position that has a target (fewer than 2 tokens, or
    /// `loss_from >= len`); candle's.
    pub fn sequence_loss(&self, ids: &[u32], loss_from: usize, lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let (fed, targets) = fed_positions(ids, loss_from)?;
        let batch = Batch::packed(&[fed], self.device())?;
        let lora = lora.map(|a| FedPositions::new(a, ids.len()));
        let h = self.forward_hidden(&batch, None, lora.as_ref().map(|a| a as &dyn Adapter))?.squeeze(0)?;
        ops::lm_head_cross_entropy(&h, &self.lm_head, self.lm_head_packed.as_ref(), &targets)
    }

    /// [`Self::sequence_loss`] of several sequences in one forward pass (packed end to end,
    /// see [`Batch::packed`]): `[K]` mean losses, each equal to that sequence's loss alone.
    /// `lora` sees the packed `[1, Σ loss_positions(len), ..]` activations (see `runtime::multi_lora`
    /// for one adapter per sequence): each sequence's positions that run (`fed_positions`),
    /// each sequence's adapter wrapped in [`FedPositions`] by the caller.
    ///
    /// Errors: as [`Self::sequence_loss`], naming the sequence.
    pub fn packed_losses(&self, seqs: &[(&[u32], usize)], lora: Option<&dyn Adapter>) -> Result<Tensor> {
        let mut fed = Vec::with_capacity(seqs.len());
        let mut targets = Vec::with_capacity(seqs.len());
        for (k, &(ids, loss_from)) in seqs.iter().enumerate() {
            let (f, t) = fed_positions(ids, loss_from).map_err(|e| candle_core::Error::Msg(format!("sequence {k}: {e}")))?;
            fed.push(f);
            targets.push(t);
        }
        let batch = Batch::packed(&fed, self.device())?;
        let h = self.forward_hidden(&batch, None, lora)?.squeeze(0)?;
        let targets: Vec<&[Option<u32>]> = targets.iter().map(|t| t.as_slice()).collect();
        ops::lm_head_cross_entropy_packed(&h, &self.lm_head, self.lm_head_packed.as_ref(), &targets)
    }

    /// The projection `module` of layer `layer`, for merging adapters into it.
    pub fn linear_mut(&mut self, layer: usize, module: Proj) -> &mut Linear {
        let l = &mut self.layers[layer];
        match module {
            Proj::QProj => &mut l.self_attn.q_proj,
            Proj::KProj => &mut l.self_attn.k_proj,
            Proj::VProj => &mut l.self_attn.v_proj,
            Proj::OProj => &mut l.self_attn.o_proj,
            Proj::GateProj => &mut l.mlp.gate_proj,
            Proj::UpProj => &mut l.mlp.up_proj,
            Proj::DownProj => &mut l.mlp.down_proj,
        }
    }

    pub fn linear(&self, layer: usize, module: Proj) -> &Linear {
        let l = &self.layers[layer];
        match module {
            Proj::QProj => &l.self_attn.q_proj,
            Proj::KProj => &l.self_attn.k_proj,
            Proj::VProj => &l.self_attn.v_proj,
            Proj::OProj => &l.self_attn.o_proj,
            Proj::GateProj => &l.mlp.gate_proj,
            Proj::UpProj => &l.mlp.up_proj,
            Proj::DownProj => &l.mlp.down_proj,
        }
    }

    /// Every weight under its Hugging Face checkpoint name (for saving a merged model), in
    /// the order of [`super::weights`]' table.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, _, _) in global_tensors(&self.cfg) {
            let t = match name.as_str() {
                "model.embed_tokens.weight" => &self.embed_tokens,
                "model.norm.weight" => &self.norm,
                _ => &self.lm_head,
            };
            out.push((name, t.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for m in Proj::ALL {
                let lin = self.linear(i, m);
                out.push((format!("{}.weight", m.path(i)), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", m.path(i)), b.clone()));
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
        if let Some(t) = &self.rope_freqs {
            out.push((ROPE_FREQS.to_string(), t.clone()));
        }
        out
    }
}

/// The positions of `ids` that a training pass runs, `ids[..loss_positions(len)]` (all but the
/// last), and the target of each: the next token, from position `loss_from - 1` on (`None`
/// where no loss is taken, and at the last position when it runs).
///
/// Why not the last position: it has no next token, so its logits enter no loss, and under
/// the causal mask no other position attends to it; its gradient is zero everywhere. Running
/// it cost `1 / len` of a pass's FLOPs (~3% at the paper's ~34-token sequences) for nothing.
/// The loss and gradients are those of the whole sequence, dropout included: the adapter,
/// seen through [`FedPositions`], draws its masks as if every position ran.
///
/// Errors: no position with a target (fewer than 2 tokens, or `loss_from >= len`).
fn fed_positions(ids: &[u32], loss_from: usize) -> Result<(&[u32], Vec<Option<u32>>)> {
    let n = ids.len();
    if n < 2 || loss_from >= n {
        candle_core::bail!("a sequence of {n} tokens with loss from position {loss_from} has no next-token target");
    }
    let fed = loss_positions(n);
    let targets = (0..fed).map(|i| if i + 1 < n && i + 1 >= loss_from.max(1) { Some(ids[i + 1]) } else { None }).collect();
    Ok((&ids[..fed], targets))
}

/// The positions a loss pass ([`Decoder::sequence_loss`], [`Decoder::packed_losses`]) runs
/// for a sequence of `len` tokens: all but the last, unless one row fewer would move the
/// sequence to another kernel. The rows of that sequence's segment when an adapter is given
/// per sequence (`runtime::multi_lora`, `SegmentAxis::Tokens`).
///
/// Why the exceptions, whose last bits would differ otherwise:
/// - 2 tokens keep both: a pass of one row takes candle's kernel for its OpenBLAS products
///   (see `runtime::blas::MIN_ROWS`), so that sequence trained alone would no longer get the
///   numbers it gets in a group;
/// - `ops::SHORT_ATTENTION_MAX_LEN + 1` tokens keep all: one row fewer would take the
///   short-sequence attention kernel instead of the batched products, so the adapter would
///   no longer get the numbers it got when every position ran.
pub fn loss_positions(len: usize) -> usize {
    if len <= 2 || len == ops::SHORT_ATTENTION_MAX_LEN + 1 {
        len
    } else {
        len - 1
    }
}

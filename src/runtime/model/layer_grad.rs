//! A decoder layer: its weights (`DecoderLayer`, `Linear`), the adapter's factored update
//! of a projection (`LowRank`), and its training pass as one autograd node, its backward
//! written by hand. (The decoder calls this module, never the other way round.)
//!
//! Why: composed of differentiable ops, a layer is ~30 nodes of candle's autograd graph,
//! and candle's backward gives every node's input a fresh zero tensor and adds the
//! gradient into it, on top of each tapped op's copy of its value: per pass, thousands of
//! allocations, fills and adds of `[tokens, 576..1536]` tensors on one thread. Here a layer
//! is one node: the forward keeps what its backward needs, and the backward is the chain
//! rule step by step in reverse, with the kernels of the ops in [`crate::runtime::ops`].
//! Only adapters in factored form ([`LowRank`]) take this path; the decoder uses it for
//! training passes.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::weights::Proj;
use crate::runtime::blas::PackedWeight;
use crate::runtime::ops::{self, LowRankSegment, Tap};

type Result<T> = candle_core::Result<T>;

/// An adapter's update of one projection in factored form ([`Adapter::low_rank`]).
pub enum LowRank {
    /// The adapter leaves the projection alone.
    Untouched,
    /// `scale · (mask ⊙ x) Aᵀ Bᵀ`: `a` `[r, in]` and `b` `[out, r]` in f32, `mask` `[rows, in]`
    /// (dropout, kept inputs already scaled by `1 / (1 - p)`) or none.
    Factors { a: Tensor, b: Tensor, scale: f64, mask: Option<Tensor> },
}

/// A projection with a frozen weight `[out, in]` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight laid out for its products in the model's compute dtype ([`Decoder::set_compute_dtype`]).
    ///
    /// [`Decoder::set_compute_dtype`]: super::Decoder::set_compute_dtype
    pub packed: Option<Arc<PackedWeight>>,
}

impl Linear {
    pub(super) fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias, packed: None })
    }

    /// Replaces the weight (merging an adapter), repacking it if it was packed.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if let Some(p) = &self.packed {
            self.packed = Some(Arc::new(PackedWeight::new(&weight, p.dtype())?));
        }
        self.weight = weight;
        Ok(())
    }
}

/// Grouped-query self-attention of one layer (`nh` query heads, `nkv` key/value heads of
/// `d` dimensions; `h` = hidden size).
#[derive(Debug, Clone)]
pub struct Attention {
    /// `[nh * d, h]` (+ bias `[nh * d]` for Qwen2)
    pub q_proj: Linear,
    /// `[nkv * d, h]` (+ bias for Qwen2)
    pub k_proj: Linear,
    /// `[nkv * d, h]` (+ bias for Qwen2)
    pub v_proj: Linear,
    /// `[h, nh * d]`
    pub o_proj: Linear,
    /// Qwen3's per-head RMSNorm weights, `[d]` each.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`, `ff` = intermediate size.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[ff, h]`
    pub gate_proj: Linear,
    /// `[ff, h]`
    pub up_proj: Linear,
    /// `[h, ff]`
    pub down_proj: Linear,
}

/// How the rows of a batch attend: through the batch's own mask (`[b, 1, l, cached + l]`,
/// or none), or, for a packed batch, each `(start, len)` segment within itself under its
/// causal mask (`None` for a one-token segment).
pub(super) enum Masking<'a> {
    Rows(Option<&'a Tensor>),
    Segments(&'a [(usize, usize)], &'a [Option<Tensor>]),
}

/// One pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    /// RMSNorm weight before attention, `[h]`.
    pub input_layernorm: Tensor,
    /// RMSNorm weight before the MLP, `[h]`.
    pub post_attention_layernorm: Tensor,
}

#[cfg(test)]
thread_local! {
    static LAYERS_AS_NODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many layers this thread has run through [`layer`]: tests see which path a pass took.
#[cfg(test)]
pub(crate) fn layers_as_nodes() -> usize {
    LAYERS_AS_NODES.with(|n| n.get())
}

/// The projections, in the order the decoder asks an adapter for their updates (so its
/// dropout masks are drawn in the same order on either path).
pub(super) const PROJECTIONS: [Proj; 7] =
    [Proj::QProj, Proj::KProj, Proj::VProj, Proj::OProj, Proj::GateProj, Proj::UpProj, Proj::DownProj];

impl LowRank {
    /// The same update with its factors cut from the autograd graph (the mask never tracks).
    pub fn detach(self) -> Self {
        match self {
            Self::Factors { a, b, scale, mask } => Self::Factors { a: a.detach(), b: b.detach(), scale, mask },
            Self::Untouched => Self::Untouched,
        }
    }
}

/// One projection's update over the rows of a pass: each row segment's factors, and the
/// dropout mask of all rows `[n, in]` when any segment has one.
pub(super) struct Update {
    pub(super) segments: Vec<LowRankSegment>,
    mask: Option<Tensor>,
    /// What the forward ([`project`]) keeps for the backward: each segment's `scale · h Aᵀ`, or
    /// off the CPU the padded batch.
    kept: ops::KeptUpdate,
}

impl Update {
    /// `parts`: `(rows, update)` of consecutive row segments; `in_dim`: the input width.
    /// The factors are kept as given (tracked or not).
    pub(super) fn new(parts: Vec<(usize, LowRank)>, in_dim: usize, device: &candle_core::Device) -> Result<Self> {
        let any_mask = parts.iter().any(|(_, u)| matches!(u, LowRank::Factors { mask: Some(_), .. }));
        let (mut segments, mut masks) = (Vec::with_capacity(parts.len()), Vec::new());
        for (len, u) in parts {
            let (factors, scale, mask) = match u {
                LowRank::Factors { a, b, scale, mask } => (Some((a, b)), scale, mask),
                LowRank::Untouched => (None, 0.0, None),
            };
            if any_mask {
                masks.push(match mask {
                    Some(m) => m,
                    None => Tensor::ones((len, in_dim), DType::F32, device)?,
                });
            }
            segments.push(LowRankSegment { len, factors, scale });
        }
        let mask = if any_mask { Some(Tensor::cat(&masks, 0)?) } else { None };
        Ok(Self { segments, mask, kept: ops::KeptUpdate::default() })
    }

    pub(super) fn is_untouched(&self) -> bool {
        self.segments.iter().all(|s| s.factors.is_none())
    }

    /// The low-rank path's input: `x` `[n, in]` in f32, dropout applied.
    pub(super) fn input(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        match &self.mask {
            Some(m) => x * m,
            None => Ok(x),
        }
    }
}

/// `x Wᵀ (+ bias) + update`, `[n, in]` → `[n, out]`; the update's `scale · h Aᵀ` is kept in `u`
/// for [`project_backward`]. `products`: the kernel when something trains (as
/// [`ops::segmented_low_rank`] chooses), so the node's value stays the composed layer's.
fn project(x: &Tensor, lin: &Linear, u: &mut Update, products: ops::Products) -> Result<Tensor> {
    let y = ops::plain_linear(x, &lin.weight, lin.packed.as_deref(), lin.bias.as_ref())?;
    add_low_rank(y, x, u, products)
}

/// [`project`] of one input `x` through projections that share it (a layer's q, k, v; gate
/// and up), their frozen products as one call ([`ops::plain_linear_many`]: the threads
/// woken once, the narrow k and v products' panels shared out with q's), the same values.
fn project_shared(x: &Tensor, lins: &[&Linear], u: &mut [Update], products: ops::Products) -> Result<Vec<Tensor>> {
    let frozen: Vec<_> = lins.iter().map(|l| (&l.weight, l.packed.as_deref(), l.bias.as_ref())).collect();
    ops::plain_linear_many(x, &frozen)?.into_iter().zip(u).map(|(y, u)| add_low_rank(y, x, u, products)).collect()
}

/// `y` plus update `u` of input `x` (kept in `u` for the backward), or `y` when untouched.
fn add_low_rank(y: Tensor, x: &Tensor, u: &mut Update, products: ops::Products) -> Result<Tensor> {
    if u.is_untouched() {
        return Ok(y);
    }
    let (y, kept) = ops::low_rank_forward_add(&u.input(x)?, &u.segments, y, products)?;
    u.kept = kept;
    Ok(y)
}

/// [`project`]'s input gradient for output gradient `g` `[n, out]`; each factored
/// segment's `dA`, `dB` go to `grads`, flattened, in order.
fn project_backward(x: &Tensor, g: &Tensor, lin: &Linear, u: &Update, grads: &mut Vec<Tensor>) -> Result<Tensor> {
    let dx = ops::plain_linear_t(g, &lin.weight, lin.packed.as_deref())?;
    add_low_rank_backward(dx, x, g, u, grads)
}

/// The input gradient of projections that share their input `x` (`terms`: each one's output
/// gradient, weight and update), with each one's `dA`, `dB` to its entry of `grads`: the
/// frozen weights' part as one product ([`ops::plain_linear_t_sum`]), then each update's.
///
/// Why: one product with a reduction over all the projections' outputs, rather than one per
/// projection and their sums added, wakes the threads once and needs neither a buffer per
/// projection nor the passes that added them. Timed alone on the kernel at 128 rows, SmolLM2's 30
/// layers: q, k, v 23.4 -> 15.8 ms, gate and up 48.4 -> 43.4 ms; in training, a solo
/// self-edit of 34-token sequences 2.5% faster (README, "Performance log").
fn shared_input_backward(x: &Tensor, terms: &[(&Tensor, &Linear, &Update)], grads: &mut [Vec<Tensor>]) -> Result<Tensor> {
    let frozen: Vec<_> = terms.iter().map(|&(g, lin, _)| (g, &lin.weight, lin.packed.as_deref())).collect();
    let mut dx = ops::plain_linear_t_sum(&frozen)?;
    for (&(g, _, u), grads) in terms.iter().zip(grads) {
        dx = add_low_rank_backward(dx, x, g, u, grads)?;
    }
    Ok(dx)
}

/// `dx` plus the input gradient of update `u` for output gradient `g` (none when untouched);
/// each factored segment's `dA`, `dB` go to `grads`, flattened, in order.
fn add_low_rank_backward(dx: Tensor, x: &Tensor, g: &Tensor, u: &Update, grads: &mut Vec<Tensor>) -> Result<Tensor> {
    if u.is_untouched() {
        return Ok(dx);
    }
    let (dx, dfactors) = ops::low_rank_backward_add(&u.input(x)?, &u.segments, &u.kept, g, dx, u.mask.as_ref())?;
    for (da, db) in dfactors {
        grads.push(da.flatten_all()?);
        grads.push(db.flatten_all()?);
    }
    Ok(dx)
}

/// Heads of `[n, heads * d]` as `[b, heads, l, d]` (a contiguous copy), and back.
fn split_heads(t: &Tensor, b: usize, l: usize, heads: usize, d: usize) -> Result<Tensor> {
    t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
}
fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (b, heads, l, d) = t.dims4()?;
    t.transpose(1, 2)?.contiguous()?.reshape((b * l, heads * d))
}

/// How the rows attend ([`Masking`]), owned so the backward can keep it.
enum Attend {
    Rows(Option<Tensor>),
    Segments(Vec<(usize, usize)>, Vec<Option<Tensor>>),
}

impl Attend {
    fn new(masking: &Masking) -> Self {
        match masking {
            Masking::Rows(mask) => Self::Rows(mask.cloned()),
            Masking::Segments(segments, masks) => Self::Segments(segments.to_vec(), masks.to_vec()),
        }
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, ops::SavedProbabilities)> {
        match self {
            Self::Rows(mask) => Ok((ops::attention_forward(q, k, v, mask.as_ref())?, ops::SavedProbabilities::default())),
            Self::Segments(segments, masks) => ops::segmented_attention_forward(q, k, v, segments, masks),
        }
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        saved: &ops::SavedProbabilities,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Rows(mask) => ops::attention_backward(q, k, v, mask.as_ref(), g),
            Self::Segments(segments, masks) => ops::segmented_attention_backward(q, k, v, segments, masks, saved, g),
        }
    }
}

/// What the attention step keeps for its backward.
enum Kept {
    /// The projections' outputs `q` `[n, heads·d]`, `k`, `v` `[n, kv_heads·d]`, attended
    /// straight from there within each segment ([`ops::segmented_rope_attention`]).
    /// The probabilities of the segments attended in f32 on the CPU (`saved`) spare the
    /// backward recomputing them.
    Projections {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        segments: Vec<(usize, usize)>,
        masks: Vec<Option<Tensor>>,
        saved: ops::SavedProbabilities,
    },
    /// The heads `[b, heads, l, d]`: `q`, `k` before Qwen3's norms, `qr`, `kr` rotated, `v`,
    /// and, as above, the probabilities the segments' attention kept.
    Heads { q: Tensor, k: Tensor, qr: Tensor, kr: Tensor, v: Tensor, attend: Attend, saved: ops::SavedProbabilities },
}

/// `layer` of a decoder configured by `cfg` on `x` `[b, l, hidden]`, differentiable with respect to `x` and to every
/// factor in `updates` (one `(rows, update)` list per projection, in [`PROJECTIONS`] order,
/// whose rows cover the `b · l` rows of `x`). Its value is the decoder's composed layer's,
/// bit for bit (the same kernels in the same order); its gradients differ from the composed
/// graph's only in the order of a few sums. Without anything to differentiate it records no
/// node.
pub(super) fn layer(
    cfg: &ModelConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos_sin: &(Tensor, Tensor),
    masking: &Masking,
    updates: Vec<Vec<(usize, LowRank)>>,
) -> Result<Tensor> {
    #[cfg(test)]
    LAYERS_AS_NODES.with(|n| n.set(n.get() + 1));
    let (a, m) = (&layer.self_attn, &layer.mlp);
    let (b, l, hidden) = x.dims3()?;
    let n = b * l;
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let eps = cfg.rms_norm_eps;
    let lins: [&Linear; 7] = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
    // 0. the trained factors, in the order their gradients come back. Variables (a LoRA
    //    adapter's own) get theirs through `FACTOR_GRADS`; factors an adapter derives from
    //    its variables go through the graph, flattened into one input of the node.
    let mut factors = Vec::new();
    for parts in &updates {
        for (_, u) in parts {
            if let LowRank::Factors { a, b, .. } = u {
                factors.push(a.clone());
                factors.push(b.clone());
            }
        }
    }
    let outside_graph = factors.iter().all(|f| f.is_variable() || !f.track_op());
    let trains = x.track_op() || factors.iter().any(|f| f.track_op());
    let products = if trains { ops::Products::Kernel } else { ops::Products::Library };
    // the node's own forward and backward record nothing: they use the factors detached
    let mut u = Vec::with_capacity(7);
    for (parts, lin) in updates.into_iter().zip(lins) {
        let parts = parts.into_iter().map(|(rows, update)| (rows, update.detach())).collect();
        u.push(Update::new(parts, lin.weight.dim(1)?, x.device())?);
    }
    let (cos, sin) = (cos_sin.0.clone(), cos_sin.1.clone());

    // 1. attention block: n1 = norm(x); q, k, v [n, heads·d]
    let xd = x.detach().reshape((n, hidden))?.contiguous()?;
    let n1 = ops::rms_norm_forward(&xd, &layer.input_layernorm, eps)?;
    let [q, k, v]: [Tensor; 3] =
        project_shared(&n1, &[&a.q_proj, &a.k_proj, &a.v_proj], &mut u[0..3], products)?.try_into().expect("three projections");
    let (y, kept) = match (masking, &a.q_norm, &a.k_norm) {
        // 2-3. packed sequences without Qwen3's norms: rotary embedding and attention within
        //      each sequence, straight from the projections: y [n, nh·d]
        (Masking::Segments(segments, masks), None, None) => {
            let (y, saved) = ops::segmented_rope_attention_forward(&q, &k, &v, (&cos, &sin), (nh, nkv, d), segments, masks)?;
            (y, Kept::Projections { q, k, v, segments: segments.to_vec(), masks: masks.to_vec(), saved })
        }
        (_, q_norm, k_norm) => {
            // 2. heads [b, heads, l, d]; Qwen3: per-head RMSNorm of queries and keys (kept
            //    before the norm for its backward)
            let (q, k, v) = (split_heads(&q, b, l, nh, d)?, split_heads(&k, b, l, nkv, d)?, split_heads(&v, b, l, nkv, d)?);
            // each norm on its own, as the composed path applies them
            let norm = |t: &Tensor, w: &Option<Tensor>| match w {
                Some(w) => ops::rms_norm_forward(t, w, eps),
                None => Ok(t.clone()),
            };
            let (qn, kn) = (norm(&q, q_norm)?, norm(&k, k_norm)?);
            // 3. rotary embedding, attention within each sequence, heads merged: y [n, nh·d]
            let qr = candle_nn::rotary_emb::rope(&qn, &cos, &sin)?;
            let kr = candle_nn::rotary_emb::rope(&kn, &cos, &sin)?;
            let attend = Attend::new(masking);
            let (y, saved) = attend.forward(&qr, &kr, &v)?;
            (merge_heads(&y)?, Kept::Heads { q, k, qr, kr, v, attend, saved })
        }
    };
    // 4. output projection and residual: x2 = x + o(y)
    let x2 = ops::add(&xd, &project(&y, &a.o_proj, &mut u[3], products)?)?;
    // 5. MLP block: out = x2 + down(silu(gate(n2)) · up(n2))
    let n2 = ops::rms_norm_forward(&x2, &layer.post_attention_layernorm, eps)?;
    let [gate, up]: [Tensor; 2] =
        project_shared(&n2, &[&m.gate_proj, &m.up_proj], &mut u[4..6], products)?.try_into().expect("two projections");
    let s = ops::swiglu_forward(&gate, &up)?;
    let out = ops::add(&x2, &project(&s, &m.down_proj, &mut u[6], products)?)?.reshape((b, l, hidden))?;
    if !trains {
        return Ok(out);
    }
    // the node's second input: one of the variables (only so that the graph records the
    // node when `x` does not track, at layer 0), or the flattened factors (then at least
    // one of them tracks without being a variable)
    let second = if outside_graph {
        match factors.iter().find(|f| f.track_op()) {
            Some(var) => var.clone(),
            None => Tensor::zeros(0, DType::F32, x.device())?,
        }
    } else {
        Tensor::cat(&factors.iter().map(|f| f.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?
    };

    // the backward, steps 5 → 1 in reverse; g: [b, l, hidden]
    let layer = layer.clone();
    let backward: ops::Backward2 = Box::new(move |g| {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        let mut grads: [Vec<Tensor>; 7] = Default::default();
        let g = g.reshape((n, hidden))?.contiguous()?;
        // 5. MLP: ds = g Wd (+ low rank), SwiGLU, then both projections of n2, then the norm
        let ds = project_backward(&s, &g, &m.down_proj, &u[6], &mut grads[6])?;
        let (dgate, dup) = ops::swiglu_backward(&gate, &up, &ds)?;
        let dn2 = shared_input_backward(&n2, &[(&dgate, &m.gate_proj, &u[4]), (&dup, &m.up_proj, &u[5])], &mut grads[4..6])?;
        let dx2 = ops::add(&g, &ops::rms_norm_backward(&x2, &layer.post_attention_layernorm, &dn2, eps)?)?;
        // 4. output projection
        let dy = project_backward(&y, &dx2, &a.o_proj, &u[3], &mut grads[3])?;
        // 3-2. attention, the inverse rotation, Qwen3's per-head norms
        let (dq, dk, dv) = match &kept {
            Kept::Projections { q, k, v, segments, masks, saved } => {
                ops::segmented_rope_attention_backward(q, k, v, (&cos, &sin), (nh, nkv, d), segments, masks, saved, &dy)?
            }
            Kept::Heads { q, k, qr, kr, v, attend, saved } => {
                let dy = split_heads(&dy, b, l, nh, d)?;
                let (dqr, dkr, dv) = attend.backward(qr, kr, v, saved, &dy)?;
                let dq = candle_nn::rotary_emb::rope(&dqr.contiguous()?, &cos, &sin.neg()?)?;
                let dk = candle_nn::rotary_emb::rope(&dkr.contiguous()?, &cos, &sin.neg()?)?;
                let norm_backward = |t: &Tensor, w: &Option<Tensor>, g: Tensor| match w {
                    Some(w) => ops::rms_norm_backward(t, w, &g, eps),
                    None => Ok(g),
                };
                let (dq, dk) = (norm_backward(q, &a.q_norm, dq)?, norm_backward(k, &a.k_norm, dk)?);
                (merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&dv)?)
            }
        };
        // 1. the three projections of n1, then the norm, plus the residual's dx2
        let dn1 =
            shared_input_backward(&n1, &[(&dq, &a.q_proj, &u[0]), (&dk, &a.k_proj, &u[1]), (&dv, &a.v_proj, &u[2])], &mut grads[0..3])?;
        let dx = ops::add(&dx2, &ops::rms_norm_backward(&xd, &layer.input_layernorm, &dn1, eps)?)?.reshape((b, l, hidden))?;
        let grads: Vec<Tensor> = grads.into_iter().flatten().collect();
        if outside_graph {
            FACTOR_GRADS.with(|sink| -> Result<()> {
                let mut sink = sink.borrow_mut();
                for (f, g) in factors.iter().zip(grads) {
                    if f.track_op() {
                        sink.push((f.clone(), g.reshape(f.shape())?));
                    }
                }
                Ok(())
            })?;
            return Ok((dx, None));
        }
        Ok((dx, Some(Tensor::cat(&grads, 0)?)))
    });
    x.apply_op2(&second, Tap::new("decoder-layer", out, backward))
}

thread_local! {
    /// Gradients of trained variables from the backward passes of [`layer`] nodes on this
    /// thread (candle runs a backward on its caller's thread), waiting for [`backward`].
    static FACTOR_GRADS: std::cell::RefCell<Vec<(Tensor, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `loss.backward()` for a loss computed through the decoder's training path: the
/// gradients of an adapter's variables (its factors `A`, `B`) reach the returned store
/// outside candle's graph. A plain `backward()` would leave them out.
///
/// Why: as inputs of the graph, every layer's factors were flattened and concatenated into
/// one input of its node, and candle's backward gives each input of each op a zeroed
/// tensor and adds the gradient into it: zeroing and adding every factor's gradient three
/// times per pass (7.1% of a grouped bf16 training profile in the adds, 2.5% in the zeroing),
/// where it is computed exactly once.
///
/// Errors: candle's.
pub fn backward(loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
    // what a plain backward() may have left behind
    FACTOR_GRADS.with(|sink| sink.borrow_mut().clear());
    let mut store = loss.backward()?;
    for (var, grad) in FACTOR_GRADS.with(|sink| std::mem::take(&mut *sink.borrow_mut())) {
        // a variable in two segments of one pass: the sum of both
        let grad = match store.remove(&var) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        store.insert(&var, grad);
    }
    Ok(store)
}

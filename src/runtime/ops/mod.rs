//! Differentiable building blocks of the decoder, with hand-written backward passes.
//!
//! Why this module exists: several of candle's fast fused kernels (`rms_norm`, `rope`,
//! `softmax_last_dim`) record no backward pass, so a LoRA variable below them silently gets
//! no gradient. The composed alternatives are differentiable but keep every intermediate
//! alive for the backward pass (an attention score matrix per op per layer: ~18 GiB at 2048
//! tokens for SmolLM2), and candle's matmul backward also computes the gradient of every
//! frozen weight, a third of the training FLOPs spent on nothing.
//!
//! Each op here therefore runs candle's fast forward *outside* the graph and re-attaches the
//! result through a [`Tap`] custom op whose backward is written by hand:
//! - [`linear`]: frozen weight, gradient for the input only;
//! - [`rms_norm`]: fused forward, closed-form backward;
//! - [`rope`]: fused forward, backward is the inverse rotation;
//! - [`attention`]: forward discards the probabilities, backward recomputes them (as flash
//!   attention does), so nothing quadratic in the sequence length is kept between passes
//!   (the segmented ops below keep them for sequences of up to 256 tokens, where they are
//!   small and recomputing them was half of attention's backward);
//! - [`lm_head_cross_entropy`]: logits are never materialised in the graph;
//! - [`segmented_attention`] and [`segmented_low_rank`]: one op for all sequences of a
//!   packed batch, on the CPU each at its own shapes, the sequences split between the cores
//!   ([`par_segments`]), a short sequence's attention in f32 computed one query row at a
//!   time (`short_attention`); off the CPU all sequences padded into one batch
//!   ([`PaddedRows`]), equal to each alone to rounding;
//! - [`segmented_rope_attention`]: the same straight from the q, k and v projections, with
//!   the rotary embedding, heads split and merged on the fly;
//! - [`cached_attention`], forward only (inference): a decoding step's attention read from
//!   the KV cache where it lies (`cached_attention`).
//!
//! When the input tracks no gradient (inference), every op is the plain fused forward.

mod cached_attention;
mod cross_entropy;
mod low_rank;
mod short_attention;
pub(crate) mod simd;

pub use cross_entropy::{lm_head_cross_entropy, lm_head_cross_entropy_packed};
pub(crate) use low_rank::{low_rank_backward_add, low_rank_forward_add, KeptUpdate, Products};
pub use low_rank::{segmented_low_rank, segmented_low_rank_pass, LowRankSegment};
pub(crate) use short_attention::MAX_LEN as SHORT_ATTENTION_MAX_LEN;

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use crate::runtime::blas::PackedWeight;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};

type Result<T> = candle_core::Result<T>;
pub(crate) type Backward1 = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
/// The gradients of both inputs; `None` for the second: delivered outside the graph (see
/// `model::backward`).
pub(crate) type Backward2 = Box<dyn Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync>;
type Backward3 = Box<dyn Fn(&Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync>;

/// A value computed outside the autograd graph, re-attached to its inputs with a custom
/// backward. The forward only hands over the precomputed value (one copy).
pub(crate) struct Tap<B> {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B> Tap<B> {
    pub(crate) fn new(name: &'static str, value: Tensor, backward: B) -> Self {
        Self { name, value: Mutex::new(Some(value)), backward }
    }

    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("tap lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    fn cpu_value(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let shape = value.shape().clone();
        let flat = value.flatten_all()?;
        let storage = match value.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name),
        };
        Ok((storage, shape))
    }

    fn cuda_value(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        // A fresh copy guarantees a contiguous buffer that starts at offset 0.
        let value = self.take()?.copy()?;
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
            _ => candle_core::bail!("{}: expected a CUDA tensor", self.name),
        }
    }
}

impl CustomOp1 for Tap<Backward1> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(grad)?))
    }
}

impl CustomOp2 for Tap<Backward2> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (self.backward)(grad)?;
        Ok((Some(a), b))
    }
}

impl CustomOp3 for Tap<Backward3> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, c) = (self.backward)(grad)?;
        Ok((Some(a), Some(b), Some(c)))
    }
}

fn tap1(x: &Tensor, name: &'static str, value: Tensor, backward: Backward1) -> Result<Tensor> {
    x.apply_op1(Tap::new(name, value, backward))
}

/// `x @ w^T (+ b)` for a frozen `w` of shape `[out, in]`: the backward gives the input's
/// gradient and never computes the weight's. With `bf16` (the same weight packed for AMX,
/// `compute_dtype = "bf16"`) both products run in bf16 with f32 accumulation.
pub fn linear(x: &Tensor, w: &Tensor, packed: Option<&Arc<PackedWeight>>, b: Option<&Tensor>) -> Result<Tensor> {
    let value = plain_linear(&x.detach(), w, packed.map(|p| &**p), b)?;
    if !x.track_op() {
        return Ok(value);
    }
    let (w, packed) = (w.clone(), packed.cloned());
    tap1(x, "frozen-linear", value, Box::new(move |g| plain_linear_t(g, &w, packed.as_deref())))
}

pub(crate) fn plain_linear(x: &Tensor, w: &Tensor, packed: Option<&PackedWeight>, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap();
    let rows = x.elem_count() / in_dim;
    let x2 = x.reshape((rows, in_dim))?;
    let y = match packed {
        Some(p) => p.matmul_nt(&x2)?,
        None => match crate::runtime::blas::matmul_nt(&x2, w) {
            Some(y) => y?,
            None => x2.matmul(&w.t()?)?,
        },
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// [`plain_linear`]'s values for a 2-D `x` `[m, in]` without a bias: `[m, out]` in f32,
/// row-major, owned, for a caller that rewrites them in place (the LM head's logits).
/// Computed as [`plain_linear`] computes them; only candle's fallback copies them out.
pub(crate) fn plain_linear_values(x: &Tensor, w: &Tensor, packed: Option<&PackedWeight>) -> Result<Vec<f32>> {
    match packed {
        Some(p) => p.matmul_nt_values(x),
        None => match crate::runtime::blas::matmul_nt_values(x, w) {
            Some(values) => values,
            None => x.matmul(&w.t()?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1(),
        },
    }
}

/// `g @ w`: the input gradient of a linear layer (in bf16 with `bf16`, as [`linear`]).
pub(crate) fn plain_linear_t(g: &Tensor, w: &Tensor, packed: Option<&PackedWeight>) -> Result<Tensor> {
    let dims = g.dims().to_vec();
    let out_dim = *dims.last().unwrap();
    let rows = g.elem_count() / out_dim;
    let g2 = g.reshape((rows, out_dim))?.contiguous()?;
    let dx = match packed {
        Some(p) => p.matmul_nn(&g2)?,
        None => match crate::runtime::blas::matmul_nn(&g2, w) {
            Some(dx) => dx?,
            None => g2.matmul(w)?,
        },
    };
    let mut shape = dims;
    *shape.last_mut().unwrap() = w.dim(1)?;
    dx.reshape(shape)
}

/// [`plain_linear`] of one input `x` `[.., in]` through several linear layers `(w_o, packed_o,
/// bias_o)` (a layer's q, k, v; gate and up): one `[.., out_o]` tensor each, with
/// [`plain_linear`]'s values. With every weight packed for one dtype, one call of the f32
/// kernel for all, or (bf16) `x` rounded once for all ([`PackedWeight::matmul_nt_many`]);
/// otherwise one [`plain_linear`] each.
pub(crate) fn plain_linear_many(x: &Tensor, lins: &[(&Tensor, Option<&PackedWeight>, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
    let packed: Option<Vec<&PackedWeight>> = lins.iter().map(|l| l.1).collect();
    if let Some(packed) = packed {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        let x2 = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
        if let Some(ys) = PackedWeight::matmul_nt_many(&packed, &x2) {
            return ys?
                .into_iter()
                .zip(lins)
                .map(|(y, &(w, _, b))| {
                    let y = match b {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    let mut out = dims.clone();
                    *out.last_mut().unwrap() = w.dim(0)?;
                    y.reshape(out)
                })
                .collect();
        }
    }
    lins.iter().map(|&(w, packed, b)| plain_linear(x, w, packed, b)).collect()
}

/// `Σ g_t @ w_t` over `terms` `(g_t [.., out_t], w_t [out_t, in], packed_t)`: the input
/// gradient of linear layers that share their input (a layer's q, k, v; gate and up),
/// `[.., in]`. With every weight packed for the f32 kernel, one product over all terms
/// ([`PackedWeight::matmul_nn_sum`]); otherwise each term by [`plain_linear_t`], added in
/// order. Either way a row's gradient comes from that row's `g_t` alone.
pub(crate) fn plain_linear_t_sum(terms: &[(&Tensor, &Tensor, Option<&PackedWeight>)]) -> Result<Tensor> {
    let Some(&(g0, w0, _)) = terms.first() else { candle_core::bail!("a sum of no input gradients") };
    let packed: Option<Vec<&PackedWeight>> = terms.iter().map(|t| t.2).collect();
    if let Some(packed) = packed {
        let dims = g0.dims().to_vec();
        let rows = g0.elem_count() / dims.last().copied().unwrap_or(1).max(1);
        let gs = terms.iter().map(|(g, w, _)| g.reshape((rows, w.dim(0)?))).collect::<Result<Vec<_>>>()?;
        let pairs: Vec<(&PackedWeight, &Tensor)> = packed.into_iter().zip(&gs).collect();
        if let Some(dx) = PackedWeight::matmul_nn_sum(&pairs) {
            let mut shape = dims;
            *shape.last_mut().unwrap() = w0.dim(1)?;
            return dx?.reshape(shape);
        }
    }
    let mut dx = plain_linear_t(g0, w0, terms[0].2)?;
    for &(g, w, packed) in &terms[1..] {
        dx = add(&dx, &plain_linear_t(g, w, packed)?)?;
    }
    Ok(dx)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`, with `w` frozen.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let value = rms_norm_forward(&xd, w, eps)?;
    if !x.track_op() {
        return Ok(value);
    }
    let w = w.clone();
    tap1(
        x,
        "rms-norm",
        value,
        Box::new(move |g| {
            // y = x * r * w with r = (mean(x^2) + eps)^-1/2
            // dx = r * (g*w) - x * r^3 * mean((g*w) * x)
            rms_norm_backward(&xd, &w, g, eps)
        }),
    )
}

/// [`rms_norm`]'s value, outside the graph: for a contiguous f32 CPU `x` one pass per row
/// ([`simd::rms_norm_row`]), rows split over the cores as the gradient's
/// ([`rms_norm_backward_cpu`]); candle's `rms_norm` otherwise (other devices and dtypes).
/// Every RMSNorm of the decoder on the CPU goes through here, so that its paths (the layer
/// node of training, the composed ops, generation) share its bits.
///
/// Why: candle's CPU RMSNorm runs on its rayon pool, kept to one thread beside the products'
/// workers, and sums each row's squares one at a time: a grouped f32 pass's two norms a layer
/// took 2.4% of training's wall time (timed in the thirty-first session), the second core idle.
///
/// Errors: `w` not `[d]` for `x` `[.., d]`; candle's.
pub(crate) fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = w.dims1()?;
    if x.dims().last() != Some(&d) {
        candle_core::bail!("rms_norm: input {:?} for a weight of {d}", x.dims());
    }
    if d == 0 {
        return candle_nn::ops::rms_norm(x, w, eps as f32);
    }
    let y = with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| {
            let threads = stream_threads(xs.len());
            // SAFETY: `rms_norm_row` writes every element of each row, and the chunks are
            // whole rows (`xs` is as long as the output).
            let [y] = unsafe {
                split_rows_into_on(threads, xs.len(), d, |range, mut out| {
                    let xs = &xs[range];
                    simd::simd(
                        #[inline(always)]
                        || {
                            for (xr, out) in xs.chunks_exact(d).zip(out[0].chunks_exact_mut(d)) {
                                simd::rms_norm_row(xr, ws, eps as f32, out);
                            }
                        },
                    )
                })
            };
            y
        })
    });
    match y.flatten() {
        Some(y) => Tensor::from_vec(y, x.shape(), x.device()),
        None => candle_nn::ops::rms_norm(x, w, eps as f32),
    }
}

/// [`rms_norm`]'s input gradient for output gradient `g`: one pass per row for f32 on the
/// CPU, candle's ops otherwise.
pub(crate) fn rms_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let g = g.contiguous()?;
    match rms_norm_backward_cpu(x, w, &g, eps) {
        Some(dx) => dx,
        None => rms_norm_backward_candle(x, w, &g, eps),
    }
}

/// [`rms_norm`]'s input gradient with candle's ops, in f32 (any device and dtype).
fn rms_norm_backward_candle(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let dot = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
    dx.to_dtype(g.dtype())
}

/// The RMSNorm input gradient in one pass per row ([`simd::rms_norm_backward_row`]), for
/// contiguous f32 CPU tensors of one shape (`None` otherwise): the formula of [`rms_norm`]'s
/// backward. Rows split over the cores from two threads' worth of elements
/// ([`stream_threads`]: a grouped pass's `[440, 576]`, and a 128-token sequence's where the
/// workers stay hot), each row computed by the same code whatever thread runs it.
fn rms_norm_backward_cpu(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    let d = w.elem_count();
    if d == 0 || x.shape() != g.shape() || x.dims().last() != Some(&d) {
        return None;
    }
    let dx = with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| {
            with_cpu_f32(g, |gs| {
                let threads = stream_threads(xs.len());
                // SAFETY: `rms_norm_backward_row` writes every element of each row, and the
                // chunks are whole rows (`xs` and `gs` are as long as the output).
                let [dx] = unsafe {
                    split_rows_into_on(threads, xs.len(), d, |range, mut out| {
                        let (xs, gs) = (&xs[range.clone()], &gs[range]);
                        simd::simd(
                            #[inline(always)]
                            || {
                                for ((xr, gr), out) in xs.chunks_exact(d).zip(gs.chunks_exact(d)).zip(out[0].chunks_exact_mut(d)) {
                                    simd::rms_norm_backward_row(xr, gr, ws, eps as f32, out);
                                }
                            },
                        )
                    })
                };
                dx
            })
        })
    })?
    .flatten()?;
    Some(Tensor::from_vec(dx, x.shape(), x.device()))
}

/// SwiGLU's gating, `silu(gate) * up`, elementwise over two tensors of one shape (the
/// input of a Llama MLP's `down_proj`). One fused pass each way on the CPU instead of
/// candle's chain of elementwise ops, and `silu(gate)` is not kept between the passes.
/// With `s = sigmoid(g)`: `silu(g) = g s`, `silu'(g) = s (1 + g (1 - s))`, so
/// `d_gate = dy * up * silu'(g)` and `d_up = dy * silu(g)`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gd, ud) = (gate.detach(), up.detach());
    let value = swiglu_forward(&gd, &ud)?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(value);
    }
    let backward: Backward2 = Box::new(move |dy| swiglu_backward(&gd, &ud, dy).map(|(dg, du)| (dg, Some(du))));
    gate.apply_op2(up, Tap::new("swiglu", value, backward))
}

/// Elements per thread below which elementwise work stays on the calling thread. Measured
/// (`make bench`): with 2^15, one sequence's SwiGLU (34 × 1536) was split too and training
/// one adapter alone slowed by ~7%. With 2^17 a 128-token sequence's (128 × 1536, ~0.1 ms a
/// thread when split) stayed on one core; at 2^16 it splits, and one adapter's training on
/// 128-token sequences ran 3.4% faster (medians of 5 alternating pairs, 337.8 → 349.3
/// tokens/s), while 34-token sequences stay below it.
const ELEMENTS_PER_THREAD: usize = 1 << 16;

/// Runs `f(range, chunks)` over disjoint ranges of whole `unit`s (rows) covering `0..len`,
/// `chunks` being each of `outs` (every one `len` long) cut to that range, on up to
/// [`blas::threads`] threads ([`crate::runtime::parallel::run_parts`]): the cores OpenBLAS
/// computes products on sit idle while the elementwise work between products runs. Returns
/// each range's result, in order.
///
/// Why not rayon: candle's rayon pool is kept to one thread beside OpenBLAS (two spinning
/// pools slowed training by 40%), while `runtime::parallel`'s workers park within a
/// millisecond of their last part. Every element is computed from its own range alone, so the
/// numbers do not depend on the split.
pub(crate) fn split_rows<T: Send, R: Send>(
    len: usize,
    unit: usize,
    outs: Vec<&mut [T]>,
    f: impl Fn(std::ops::Range<usize>, Vec<&mut [T]>) -> R + Sync,
) -> Vec<R> {
    split_rows_on(crate::runtime::blas::threads().min(len / ELEMENTS_PER_THREAD), len, unit, outs, f)
}

/// Elements per thread below which [`add`] and RMSNorm (both ways) stay on the calling
/// thread, where the workers stay hot between splits
/// ([`crate::runtime::parallel::workers_stay_hot`]): they stream their operands once and
/// compute little, and a hot worker picks its share up within ~1 µs, so a 128-token
/// sequence's `[127, 576]` (73k elements) splits, a 34-token one's stays on one core. Timed
/// per op (thirty-sixth session, one adapter on 128-token sequences, 16 steps of ~0.28 s):
/// the norms and residual adds of all 16 steps took 0.183-0.197 s at 2^16 (then on one
/// core), 0.125-0.147 s at 2^15, a saving of ~1.2% of the run. Where the workers park
/// sooner ([`STREAM_ELEMENTS_BESIDE_BLAS`]), a share must pay for a futex wake.
const STREAM_ELEMENTS_PER_THREAD: usize = 1 << 15;

/// [`STREAM_ELEMENTS_PER_THREAD`] where OpenBLAS computes the products and the workers park
/// within 50 µs: a grouped pass's `[440, 576]` (~127k elements, ~50 µs) pays for handing a
/// share to a worker, where the other elementwise ops wait for [`ELEMENTS_PER_THREAD`].
const STREAM_ELEMENTS_BESIDE_BLAS: usize = 1 << 16;

/// The streaming ops' threads for `len` elements.
fn stream_threads(len: usize) -> usize {
    let per = if crate::runtime::parallel::workers_stay_hot() { STREAM_ELEMENTS_PER_THREAD } else { STREAM_ELEMENTS_BESIDE_BLAS };
    crate::runtime::blas::threads().min(len / per)
}

/// `a + b` for tensors of one shape, as candle adds them. Untracked contiguous f32 CPU
/// tensors of distinct storages, at least two threads' worth of elements ([`stream_threads`]),
/// are added on up to [`crate::runtime::blas::threads`] threads; anything else by candle
/// (whose CPU adds run on the calling thread here: its pool is kept to one thread beside
/// OpenBLAS), so a tensor that tracks a gradient keeps its graph.
///
/// Why: a grouped pass's residuals and gradient sums (`[tokens, hidden]`, ten a layer) were
/// 4.7% of the main thread's samples in grouped f32 training, with the second core idle.
/// An element's sum is one rounding whatever thread computes it, so the split changes no
/// number.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_on(crate::runtime::blas::threads(), a, b)
}

/// [`add`] on at most `threads` threads.
fn add_on(threads: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let threads = threads.min(stream_threads(a.elem_count()));
    // two views of one storage would take its (not reentrant) read lock twice below
    let shared = || {
        let (sa, _) = a.storage_and_layout();
        let pa: *const Storage = &*sa;
        drop(sa);
        std::ptr::eq(pa, &*b.storage_and_layout().0)
    };
    if threads >= 2 && a.shape() == b.shape() && a.device().is_cpu() && !a.track_op() && !b.track_op() && !shared() {
        let sum = with_cpu_f32(a, |av| {
            with_cpu_f32(b, |bv| {
                debug_assert_eq!(av.len(), bv.len(), "operands of one shape, both contiguous");
                // SAFETY: `av` and `bv` are as long as the output (one shape, contiguous), and
                // every element of each chunk is written.
                let [y] = unsafe {
                    split_rows_into_on(threads, av.len(), 1, |range, mut out| {
                        simd::simd(
                            #[inline(always)]
                            || {
                                for ((o, &x), &y) in out[0].iter_mut().zip(&av[range.clone()]).zip(&bv[range.clone()]) {
                                    o.write(x + y);
                                }
                            },
                        )
                    })
                };
                y
            })
        });
        if let Some(Some(y)) = sum {
            return Tensor::from_vec(y, a.shape(), a.device());
        }
    }
    a + b
}

/// Rows below which [`par_segments`] keeps every segment on the calling thread: a thread
/// takes ~1 µs (a hot worker) to ~40 µs (a parked one, a scoped thread) to pick its part up,
/// a decoding step's few rows much less than that. (Measured in parameters, as by a group's
/// optimizer steps, any two adapters exceed it.)
const ROWS_TO_SPLIT_SEGMENTS: usize = 64;

/// `f(i)` for every segment `i` of `lens` (rows each, or another measure of each one's
/// work), results in order. With at least two segments and [`ROWS_TO_SPLIT_SEGMENTS`] rows,
/// the segments are cut into contiguous runs of about equal rows, one run per
/// [`blas::threads`] thread ([`crate::runtime::parallel::run_parts`]): the per-sequence work of a
/// grouped pass (attention, low-rank updates) is small products and elementwise ops that
/// leave the second core idle. Each segment is computed by the same code whatever thread
/// runs it, so the numbers do not depend on the split.
///
/// Errors: the first segment's error, in order of the runs.
pub(crate) fn par_segments<T: Send>(lens: &[usize], f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let total: usize = lens.iter().sum();
    let threads = if total >= ROWS_TO_SPLIT_SEGMENTS { crate::runtime::blas::threads().min(lens.len()) } else { 1 };
    if threads <= 1 {
        return (0..lens.len()).map(&f).collect();
    }
    // cut t ends the run in which the cumulative rows first reach t / threads of the total
    let mut cuts = vec![0];
    let mut rows = 0;
    for (i, &len) in lens.iter().enumerate() {
        rows += len;
        if cuts.len() < threads && rows * threads >= total * cuts.len() {
            cuts.push(i + 1);
        }
    }
    cuts.push(lens.len());
    cuts.dedup();
    let runs: Vec<std::ops::Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
    let mut out = Vec::with_capacity(lens.len());
    for run in crate::runtime::parallel::run_parts(runs, |run| run.map(&f).collect::<Result<Vec<T>>>()) {
        out.extend(run?);
    }
    Ok(out)
}

/// Threads for the attention of a pass's sequences (`lens`) within each sequence: with one
/// sequence of at least [`ROWS_TO_SPLIT_SEGMENTS`] rows (an adapter trained alone), its KV
/// heads split between the [`blas::threads`] cores, which [`par_segments`] leaves to the
/// calling thread; one otherwise (the sequences themselves are split, or too short).
fn lone_sequence_threads(lens: &[usize]) -> usize {
    match lens {
        [len] if *len >= ROWS_TO_SPLIT_SEGMENTS => crate::runtime::blas::threads(),
        _ => 1,
    }
}

/// [`split_rows`] into `N` fresh outputs of `len` elements, not zeroed first (zeroing
/// SwiGLU's outputs was ~3% of grouped training).
///
/// # Safety
/// `f` writes every element of the chunks it is handed.
unsafe fn split_rows_into<const N: usize>(
    len: usize,
    unit: usize,
    f: impl Fn(std::ops::Range<usize>, Vec<&mut [MaybeUninit<f32>]>) + Sync,
) -> [Vec<f32>; N] {
    // SAFETY: passed on from the caller.
    unsafe { split_rows_into_on(crate::runtime::blas::threads().min(len / ELEMENTS_PER_THREAD), len, unit, f) }
}

/// [`split_rows_into`] on at most `threads` threads.
///
/// # Safety
/// `f` writes every element of the chunks it is handed.
unsafe fn split_rows_into_on<const N: usize>(
    threads: usize,
    len: usize,
    unit: usize,
    f: impl Fn(std::ops::Range<usize>, Vec<&mut [MaybeUninit<f32>]>) + Sync,
) -> [Vec<f32>; N] {
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::with_capacity(len));
    split_rows_on(threads, len, unit, outs.iter_mut().map(|o| &mut o.spare_capacity_mut()[..len]).collect(), f);
    for o in &mut outs {
        // SAFETY: the ranges cover 0..len, and `f` writes every element of its chunks.
        unsafe { o.set_len(len) };
    }
    outs
}

/// [`split_rows`] on at most `threads` threads.
fn split_rows_on<T: Send, R: Send>(
    threads: usize,
    len: usize,
    unit: usize,
    outs: Vec<&mut [T]>,
    f: impl Fn(std::ops::Range<usize>, Vec<&mut [T]>) -> R + Sync,
) -> Vec<R> {
    let units = len / unit.max(1);
    let threads = threads.min(units).max(1);
    if threads == 1 {
        return vec![f(0..len, outs)];
    }
    let mut parts = Vec::with_capacity(threads);
    let mut rest = outs;
    for range in crate::runtime::parallel::even_ranges(units, threads) {
        let (start, end) = (range.start * unit, if range.end == units { len } else { range.end * unit });
        let (head, tail): (Vec<&mut [T]>, Vec<&mut [T]>) = rest.into_iter().map(|o| o.split_at_mut(end - start)).unzip();
        parts.push((start..end, head));
        rest = tail;
    }
    crate::runtime::parallel::run_parts(parts, |(range, chunks)| f(range, chunks))
}

/// `f` on the elements of a contiguous f32 CPU tensor, or `None` for any other tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Some(f(&v[start..end])),
        _ => None,
    }
}

/// `f` on the elements of a contiguous f32 CPU tensor, mutably: in place, in the storage
/// every view of it shares (a `Var`'s, for an optimizer step). `None`, `f` not run, for any
/// other tensor. Nested calls (and an enclosing [`with_cpu_f32`]) must name tensors of
/// distinct storages: each holds its storage's lock.
pub(crate) fn with_cpu_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Option<R> {
    /// candle's hook for in-place CPU work, carrying `f` in and its result out.
    struct InPlace<F, R>(std::cell::RefCell<(Option<F>, Option<R>)>);
    impl<F: FnOnce(&mut [f32]) -> R, R> candle_core::InplaceOp1 for InPlace<F, R> {
        fn name(&self) -> &'static str {
            "with-cpu-f32-mut"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let mut cell = self.0.borrow_mut();
            if let (CpuStorage::F32(v), Some((start, end)), Some(f)) = (storage, layout.contiguous_offsets(), cell.0.take()) {
                cell.1 = Some(f(&mut v[start..end]));
            }
            Ok(())
        }
    }
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let op = InPlace(std::cell::RefCell::new((Some(f), None)));
    t.inplace_op1(&op).ok()?;
    op.0.into_inner().1
}

pub(crate) fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", g.dims(), u.dims());
    }
    // candle's silu formula with a vectorized exp (within a few ulp of `g.silu() * u`)
    let fused = with_cpu_f32(g, |gs| {
        with_cpu_f32(u, |us| {
            // SAFETY: `simd::swiglu` writes every element of its output.
            let [y] = unsafe {
                split_rows_into(gs.len(), 1, |range, mut out| {
                    simd::simd(
                        #[inline(always)]
                        || simd::swiglu(&gs[range.clone()], &us[range.clone()], out[0]),
                    );
                })
            };
            y
        })
    });
    match fused.flatten() {
        Some(v) => Tensor::from_vec(v, g.shape(), g.device()),
        None => g.silu()? * u,
    }
}

pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let fused = with_cpu_f32(g, |gs| {
        with_cpu_f32(u, |us| {
            with_cpu_f32(&dy, |dys| {
                // SAFETY: `simd::swiglu_backward` writes every element of both outputs.
                let [dg, du] = unsafe {
                    split_rows_into(gs.len(), 1, |range, mut outs| {
                        let [dg, du] = &mut outs[..] else { unreachable!("two outputs") };
                        let (g, u, dy) = (&gs[range.clone()], &us[range.clone()], &dys[range]);
                        simd::simd(
                            #[inline(always)]
                            || simd::swiglu_backward(g, u, dy, dg, du),
                        );
                    })
                };
                (dg, du)
            })
        })
    });
    match fused.flatten().flatten() {
        Some((dg, du)) => Ok((Tensor::from_vec(dg, g.shape(), g.device())?, Tensor::from_vec(du, g.shape(), g.device())?)),
        None => swiglu_backward_candle(g, u, &dy),
    }
}

/// [`swiglu`]'s gradients with candle's ops, in f32 (any device and dtype).
fn swiglu_backward_candle(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (g32, u32, dy32) = (g.to_dtype(DType::F32)?, u.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
    let s = candle_nn::ops::sigmoid(&g32)?;
    let du = (&dy32 * (&g32 * &s)?)?;
    let dsilu = (&s * (&g32 * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
    let dg = ((&dy32 * &u32)? * dsilu)?;
    Ok((dg.to_dtype(g.dtype())?, du.to_dtype(u.dtype())?))
}

/// Rotary position embedding in the Hugging Face (half-split) layout. `cos`/`sin` are
/// `[seq, head_dim/2]` or `[batch, seq, head_dim/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let value = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    if !x.track_op() {
        return Ok(value);
    }
    let (cos, sin) = (cos.clone(), sin.neg()?);
    tap1(
        x,
        "rope",
        value,
        // The rotation is orthogonal: its transpose is the rotation by the opposite angle.
        Box::new(move |g| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &sin)),
    )
}

/// Scaled dot-product attention with grouped KV heads.
///
/// `q`: `[b, heads, lq, d]`; `k`, `v`: `[b, kv_heads, lk, d]`; `mask`: additive,
/// `b · lq · lk` entries laid out as `[b, 1, lq, lk]` (0 or -inf; not broadcast: a mask of
/// another size is an error), or `None` for no mask.
/// Query heads `h` use KV head `h / (heads / kv_heads)`, as in Hugging Face's `repeat_kv`.
/// Without a graph, on the CPU, a row's leading keys that only its own padding queries see
/// (left padding) are left out and those queries' outputs are zeros (`left_padded_attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    if !(q.track_op() || k.track_op() || v.track_op()) {
        if let Some(y) = mask.map(|m| left_padded_attention(&qd, &kd, &vd, m)).transpose()?.flatten() {
            return Ok(y);
        }
        return attention_forward(&qd, &kd, &vd, mask);
    }
    let value = attention_forward(&qd, &kd, &vd, mask)?;
    let mask = mask.cloned();
    let backward: Backward3 = Box::new(move |g| attention_backward(&qd, &kd, &vd, mask.as_ref(), g));
    q.apply_op3(k, v, Tap::new("attention", value, backward))
}

/// [`attention`] without a graph of a batch whose rows start with keys no query of theirs
/// attends to (a generation batch's left padding: row `r`'s first `p_r` keys, those its last
/// query masks): each such row at its own shapes, its queries from `p_r` on over its keys
/// from `p_r` on, so that its numbers are those of the row alone, unpadded. A padding query's
/// output is zeros (it feeds only padding positions, which no real query attends to).
/// `None` when no row has such keys (the batched products then give each row its numbers
/// alone), and off the CPU.
///
/// Why: the batched products reduce over all of a row's keys, and the library's kernels
/// (candle's gemm for a cache's views, which OpenBLAS's batched path declines) sum in an
/// order that depends on their count: left padding moved a row's logits by
/// ~4e-5 in f32 and ~0.15 in bf16 (a prompt of 4 tokens padded by 9, SmolLM2), enough to
/// change sampled answers with their neighbours in the batch.
fn left_padded_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
    let ((b, heads, lq, d), (_, _, lk, _)) = (q.dims4()?, k.dims4()?);
    // on a GPU the products are equal to rounding anyway, and reading the mask would wait on it
    if !q.device().is_cpu() || lq == 0 || lk < lq || mask.dims() != [b, 1, lq, lk] {
        return Ok(None);
    }
    // each row's keys masked for its last query, from the first: padding only if every query
    // at or after them masks them too, and every query before them (a padding query) sees
    // none of the keys after them
    let cached = lk - lq;
    let values: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let masked = |m: &f32| *m == f32::NEG_INFINITY;
    let mut pads = Vec::with_capacity(b);
    for row in values.chunks_exact(lq * lk) {
        let p = row[(lq - 1) * lk..].iter().take_while(|m| masked(m)).count();
        let (padding, real) = row.split_at(p.saturating_sub(cached).min(lq) * lk);
        let padding_sees_padding = padding.chunks_exact(lk).all(|m| m[p..].iter().all(masked));
        if !(padding_sees_padding && real.chunks_exact(lk).all(|m| m[..p].iter().all(masked))) {
            return Ok(None);
        }
        pads.push(p);
    }
    if pads.iter().all(|&p| p == 0) {
        return Ok(None);
    }
    let mut rows = Vec::with_capacity(b);
    for (r, &p) in pads.iter().enumerate() {
        // queries before `p` are padding (`first` of them in this call)
        let first = p.saturating_sub(cached).min(lq);
        // views, not copies: strided as the row's own tensors would be alone (a cache's
        // keys and values are views of it), so that the products take the same kernels
        let one = |t: &Tensor, from: usize, len: usize| t.narrow(0, r, 1)?.narrow(2, from, len);
        let mut parts = Vec::with_capacity(2);
        if first > 0 {
            parts.push(Tensor::zeros((1, heads, first, d), q.dtype(), q.device())?);
        }
        if first < lq {
            let m = mask.narrow(0, r, 1)?.narrow(2, first, lq - first)?.narrow(3, p, lk - p)?.contiguous()?;
            parts.push(attention_forward(&one(q, first, lq - first)?, &one(k, p, lk - p)?, &one(v, p, lk - p)?, Some(&m))?);
        }
        rows.push(Tensor::cat(&parts, 2)?);
    }
    Tensor::cat(&rows, 0).map(Some)
}

/// [`attention`] of a decoding step, read from the KV cache where it lies: `q`
/// `[b, heads, 1, d]` (one new token a row), `k` and `v` the cache's whole tensors
/// `[b, kv_heads, capacity, d]`, of which the first `keys` positions are attended to, and
/// `mask` additive `[b, 1, 1, keys]` (0 or `-inf`) or none. Returns `[b, 1, heads · d]`,
/// the heads merged. Each row is computed from its own query, cache row and mask alone, so
/// a row gets the same numbers in any batch; they agree with [`attention`]'s to float
/// summation order.
///
/// `None` where the kernel does not apply, and the caller takes [`attention`] on the
/// cache's views: not f32 on the CPU, more than one query a row, a `q` that tracks its ops
/// (no backward here), non-contiguous inputs, or shapes `cached_attention::Step` refuses.
pub fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, keys: usize, mask: Option<&Tensor>) -> Option<Result<Tensor>> {
    let ([b, heads, 1, d], [kb, kv_heads, capacity, kd]) = (q.dims(), k.dims()) else {
        return None;
    };
    let step = cached_attention::Step { rows: *b, heads: *heads, kv_heads: *kv_heads, d: *d, capacity: *capacity, keys };
    if (*kb, *kd) != (*b, *d) || v.dims() != k.dims() || !step.fits() || q.track_op() {
        return None;
    }
    if mask.is_some_and(|m| m.dims() != [*b, 1, 1, keys]) || !short_applies(&[q, k, v]) {
        return None;
    }
    let threads = crate::runtime::blas::threads();
    let out = with_cpu_f32(q, |q| {
        with_cpu_f32(k, |k| {
            with_cpu_f32(v, |v| match mask {
                None => Some(cached_attention::forward(q, k, v, None, step, threads)),
                Some(m) => with_cpu_f32(m, |m| cached_attention::forward(q, k, v, Some(m), step, threads)),
            })
        })
    })??
    .flatten()?;
    Some(Tensor::from_vec(out, (*b, 1, heads * d), q.device()))
}

/// [`attention`] of sequences packed end to end along `l`: segment `(start, len)` of `q`
/// (`[1, heads, Σ len, d]`), `k` and `v` (`[1, kv_heads, Σ len, d]`) attends within itself
/// only, under `masks[i]` (as in [`attention`], `[1, 1, len, len]`).
/// Returns `[1, heads, Σ len, d]`, each segment equal to [`attention`] of that segment alone
/// (off the CPU, where the segments run padded into one batch, to float summation order).
///
/// Errors: `masks` not one per segment, or segments that do not cover `l` in order.
///
/// One graph node for all segments: composed of per-segment ops, the backward would expand
/// every segment's gradient to the full length (the backward of `narrow`) and sum them, for
/// each of `q`, `k` and `v`; here each segment's gradient is written once, into its place.
pub fn segmented_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(usize, usize)], masks: &[Option<Tensor>]) -> Result<Tensor> {
    check_segments("segmented_attention", segments, masks, q.dim(2)?)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (value, saved) = segmented_attention_forward(&qd, &kd, &vd, segments, masks)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(value);
    }
    let (segments, masks) = (segments.to_vec(), masks.to_vec());
    let backward: Backward3 = Box::new(move |g| segmented_attention_backward(&qd, &kd, &vd, &segments, &masks, &saved, g));
    q.apply_op3(k, v, Tap::new("segmented_attention", value, backward))
}

/// Checks that `segments` tile `0..rows` in order, one mask each.
fn check_segments(op: &str, segments: &[(usize, usize)], masks: &[Option<Tensor>], rows: usize) -> Result<()> {
    if masks.len() != segments.len() {
        candle_core::bail!("{op}: {} masks for {} segments", masks.len(), segments.len());
    }
    let mut next = 0;
    for &(start, len) in segments {
        if start != next {
            candle_core::bail!("{op}: a segment starts at {start}, expected {next}");
        }
        next += len;
    }
    if next != rows {
        candle_core::bail!("{op}: segments cover {next} of {rows} positions");
    }
    Ok(())
}

/// A segment's rows of `t` along the sequence axis, as a contiguous copy.
fn segment_of(t: &Tensor, (start, len): (usize, usize)) -> Result<Tensor> {
    t.narrow(2, start, len)?.contiguous()
}

/// Whether [`short_attention`] can compute attention over these tensors: f32 on the CPU.
/// (A property of the device and dtype alone, never of the sequences' neighbours.)
fn short_applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether head-major `q` `[1, heads, rows, d]`, `k` and `v` `[1, kv_heads, rows, d]` have
/// shapes [`short_attention`] takes (any others go to the batched products, which say
/// what is wrong).
fn short_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    let (b, heads, rows, d) = q.dims4()?;
    let (kb, kv_heads, k_rows, kd) = k.dims4()?;
    Ok(b == 1 && kb == 1 && kv_heads > 0 && heads % kv_heads == 0 && (k_rows, kd) == (rows, d) && v.dims() == k.dims())
}

/// Runs `f` on segment `segment`'s [`short_attention::Sequence`] when the kernel takes it (at
/// most [`short_attention::MAX_LEN`] rows, an f32 CPU mask of `[len, len]` or none); `None`
/// otherwise. The choice depends on the segment alone.
fn with_short<R>(segment: (usize, usize), mask: Option<&Tensor>, f: impl FnOnce(short_attention::Sequence) -> R) -> Option<R> {
    let (start, len) = segment;
    if len > short_attention::MAX_LEN {
        return None;
    }
    match mask {
        None => Some(f(short_attention::Sequence { start, len, mask: None })),
        // a row masked whole is NaN through the batched products: left to them
        Some(m) if m.elem_count() == len * len => with_cpu_f32(m, |m| {
            let open = m.chunks_exact(len).all(|row| row.iter().any(|&x| x != f32::NEG_INFINITY));
            open.then(|| f(short_attention::Sequence { start, len, mask: Some(m) }))
        })
        .flatten(),
        Some(_) => None,
    }
}

/// `f(&inputs)` over contiguous f32 CPU copies of `q`, `k`, `v` (and the rotary tables).
fn with_inputs<R>(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rotary: Option<(&Tensor, &Tensor)>,
    layout: short_attention::Layout,
    f: impl FnOnce(&short_attention::Inputs) -> R,
) -> Option<R> {
    with_cpu_f32(q, |q| {
        with_cpu_f32(k, |k| {
            with_cpu_f32(v, |v| match rotary {
                None => Some(f(&short_attention::Inputs { q, k, v, layout, rotary: None })),
                Some((cos, sin)) => with_cpu_f32(cos, |cos| {
                    with_cpu_f32(sin, |sin| f(&short_attention::Inputs { q, k, v, layout, rotary: Some((cos, sin)) }))
                })
                .flatten(),
            })
        })
    })
    .flatten()
    .flatten()
    .flatten()
}

/// What a segmented attention's forward keeps for its backward: the probabilities of each
/// segment [`short_attention`] computed (none for the others, whose backward recomputes
/// them), and off the CPU the padded layout ([`PaddedSegments`]), built once for both.
#[derive(Debug, Clone, Default)]
pub(crate) struct SavedProbabilities(Vec<Option<short_attention::Probabilities>>, Option<Arc<PaddedSegments>>);

impl SavedProbabilities {
    /// Segment `i`'s, if its forward kept them.
    fn segment(&self, i: usize) -> Option<&short_attention::Probabilities> {
        self.0.get(i).and_then(Option::as_ref)
    }
}

/// Consecutive row segments of a packed `[n, w]` tensor as one batch `[S, L, w]`, each padded
/// to the longest, `L` rows: the layout [`PaddedSegments`] (attention) and the low-rank updates
/// ([`low_rank`]) batch a pass's sequences with off the CPU, where every kernel costs its launch
/// whatever its size.
#[derive(Debug)]
struct PaddedRows {
    /// `[S · L]`: the packed row each padded row reads (a padding row its segment's last).
    gather: Tensor,
    /// `[n]`: the padded row each packed row comes from.
    scatter: Tensor,
    /// `[S, L, 1]`: 1 on a segment's rows, 0 on padding, in the dtype asked for.
    valid: Tensor,
    /// Each segment's rows, in order.
    lens: Vec<usize>,
    /// `S`, the segments.
    count: usize,
    /// `L`, the longest segment's rows.
    longest: usize,
}

impl PaddedRows {
    /// Segments of `lens` rows, in order. Errors: an empty segment (its padding rows would
    /// have no row to read).
    fn new(lens: &[usize], device: &candle_core::Device, dtype: DType) -> Result<Self> {
        let (count, longest) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
        let n: usize = lens.iter().sum();
        let (mut gather, mut scatter, mut valid) = (Vec::with_capacity(count * longest), vec![0u32; n], vec![0f32; count * longest]);
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            if len == 0 {
                candle_core::bail!("segment {i} is empty: padded segments need rows in every segment");
            }
            for row in 0..longest {
                let padded = i * longest + row;
                gather.push((start + row.min(len - 1)) as u32);
                if row < len {
                    scatter[start + row] = padded as u32;
                    valid[padded] = 1.0;
                }
            }
            start += len;
        }
        Ok(Self {
            gather: Tensor::from_vec(gather, count * longest, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            valid: Tensor::from_vec(valid, (count, longest, 1), device)?.to_dtype(dtype)?,
            lens: lens.to_vec(),
            count,
            longest,
        })
    }

    /// `[n, w]` → `[S, L, w]`. Errors: `t` not 2-D, or not `n` rows.
    fn batch(&self, t: &Tensor) -> Result<Tensor> {
        let w = t.dim(1)?;
        t.contiguous()?.index_select(&self.gather, 0)?.reshape((self.count, self.longest, w))
    }

    /// `[S, L, w]` → `[n, w]`, the padding rows dropped. Errors: `t` not `[S, L, w]`.
    fn unbatch(&self, t: &Tensor) -> Result<Tensor> {
        let w = t.dim(2)?;
        t.contiguous()?.reshape((self.count * self.longest, w))?.index_select(&self.scatter, 0)
    }
}

/// The segments of a packed `[1, heads, n, d]` tensor as one batch `[S, heads, L, d]`, each
/// padded to the longest, `L` rows ([`PaddedRows`]), with one mask `[S, 1, L, L]` for all:
/// each segment's own mask where its rows meet its keys, its padding keys masked, and each
/// padding row attending to its segment's first key alone (a row with every key masked would
/// give NaN, which the backward would spread: 0 · NaN is NaN).
///
/// Why: off the CPU every kernel costs its launch whatever its size, and attention one segment
/// at a time launches ~25 kernels a segment a layer, forward and backward (53% of a grouped
/// H200 pass was backward: twenty-sixth session). Padded, a layer's attention is one batch;
/// its work grows with `S · L²` instead of `Σ len²`. A layer's forward builds the layout (a
/// host loop over `S · L²` and a few uploads) and keeps it for its backward.
#[derive(Debug)]
pub(crate) struct PaddedSegments {
    rows: PaddedRows,
    /// `[S, 1, L, L]`, added to the scores, in the inputs' dtype: 0 or −∞ (or a segment's own
    /// finite penalties).
    mask: Tensor,
}

impl PaddedSegments {
    /// Errors: an empty segment; a mask that does not broadcast to `[1, 1, len, len]` for its
    /// segment (the segments' tiling is checked by the callers).
    fn new(segments: &[(usize, usize)], masks: &[Option<Tensor>], device: &candle_core::Device, dtype: DType) -> Result<Self> {
        let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
        let rows = PaddedRows::new(&lens, device, dtype)?;
        let (count, longest) = (rows.count, rows.longest);
        // the frame: padding keys and padding rows masked; each segment's own mask is added to it
        let mut frame = vec![0f32; count * longest * longest];
        // where each padded score takes its value from the segments' own masks laid end to end,
        // `own_len` (a zero appended there) for the frame alone
        let own_len: usize = segments.iter().zip(masks).map(|(s, m)| if m.is_some() { s.1 * s.1 } else { 0 }).sum();
        let mut own_index = vec![own_len as u32; count * longest * longest];
        let mut own = Vec::new();
        let mut own_start = 0;
        for (i, (&(_, len), mask)) in segments.iter().zip(masks).enumerate() {
            if let Some(m) = mask {
                let full = m
                    .broadcast_as((1, 1, len, len))
                    .map_err(|_| candle_core::Error::Msg(format!("segment {i} of {len} rows has a mask of shape {:?}", m.dims())))?;
                own.push(full.contiguous()?.flatten_all()?.to_dtype(dtype)?);
            }
            for row in 0..longest {
                for key in 0..longest {
                    let at = (i * longest + row) * longest + key;
                    let masked = if row < len { key >= len } else { key != 0 };
                    if masked {
                        frame[at] = f32::NEG_INFINITY;
                    } else if row < len && mask.is_some() {
                        own_index[at] = (own_start + row * len + key) as u32;
                    }
                }
            }
            if mask.is_some() {
                own_start += len * len;
            }
        }
        own.push(Tensor::zeros(1, dtype, device)?);
        let own = Tensor::cat(&own, 0)?.index_select(&Tensor::from_vec(own_index, count * longest * longest, device)?, 0)?;
        let frame = Tensor::from_vec(frame, count * longest * longest, device)?.to_dtype(dtype)?;
        Ok(Self { mask: (own + frame)?.reshape((count, 1, longest, longest))?, rows })
    }

    /// `[1, h, n, d]` → `[S, h, L, d]` (the rows gathered along `n`, as [`PaddedRows::batch`]).
    fn batch(&self, t: &Tensor) -> Result<Tensor> {
        let (_, h, _, d) = t.dims4()?;
        let (count, longest) = (self.rows.count, self.rows.longest);
        t.contiguous()?.index_select(&self.rows.gather, 2)?.reshape((h, count, longest, d))?.transpose(0, 1)?.contiguous()
    }

    /// `[S, h, L, d]` → `[1, h, n, d]`, the padding rows dropped.
    fn unbatch(&self, t: &Tensor) -> Result<Tensor> {
        let (_, h, _, d) = t.dims4()?;
        let (count, longest) = (self.rows.count, self.rows.longest);
        t.transpose(0, 1)?.contiguous()?.reshape((1, h, count * longest, d))?.index_select(&self.rows.scatter, 2)
    }

    /// `[S, 1, L, 1]`: 1 on a segment's rows, 0 on padding.
    fn valid(&self) -> Result<Tensor> {
        self.rows.valid.reshape((self.rows.count, 1, self.rows.longest, 1))
    }
}

/// [`segmented_attention`]'s value over the segments padded into one batch
/// ([`PaddedSegments`]): `q` `[1, heads, n, d]`, `k` and `v` `[1, kv_heads, n, d]`.
///
/// Errors: shapes that do not fit the layout.
fn padded_attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, p: &PaddedSegments) -> Result<Tensor> {
    p.unbatch(&attention_forward(&p.batch(q)?, &p.batch(k)?, &p.batch(v)?, Some(&p.mask))?)
}

/// [`padded_attention_forward`]'s gradients of `q`, `k` and `v` for output gradient `g`
/// `[1, heads, n, d]`. The padding rows get a zero output gradient, so they add nothing to
/// any real row's gradient (their probabilities are finite, their keys' exactly 0).
fn padded_attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, p: &PaddedSegments, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let g = p.batch(g)?.broadcast_mul(&p.valid()?)?;
    let (dq, dk, dv) = attention_backward(&p.batch(q)?, &p.batch(k)?, &p.batch(v)?, Some(&p.mask), &g)?;
    Ok((p.unbatch(&dq)?, p.unbatch(&dk)?, p.unbatch(&dv)?))
}

/// Whether attention over these segments runs padded into one batch: off the CPU, where
/// launches dominate; the CPU keeps each segment at its own shapes (grouped training there
/// equals solo bit for bit).
fn pads_segments(q: &Tensor, segments: &[(usize, usize)]) -> bool {
    !q.device().is_cpu() && paddable(segments)
}

/// [`pads_segments`]' condition on the segments (apart, so a CPU test can check it).
fn paddable(segments: &[(usize, usize)]) -> bool {
    segments.len() > 1 && segments.iter().all(|s| s.1 > 0)
}

/// [`segmented_attention`]'s value (segments already checked), and the probabilities it
/// keeps for [`segmented_attention_backward`]. In f32 on the CPU, segments of up to
/// [`short_attention::MAX_LEN`] rows take [`short_attention`]; the others the batched
/// products of [`attention_forward`]; off the CPU, all segments at once, padded
/// ([`padded_attention_forward`]).
pub(crate) fn segmented_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
) -> Result<(Tensor, SavedProbabilities)> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if pads_segments(&q, segments) {
        let p = PaddedSegments::new(segments, masks, q.device(), q.dtype())?;
        let y = padded_attention_forward(&q, &k, &v, &p)?;
        return Ok((y, SavedProbabilities(Vec::new(), Some(Arc::new(p)))));
    }
    let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
    let batched = |i: usize| {
        let s = segments[i];
        attention_forward(&segment_of(&q, s)?, &segment_of(&k, s)?, &segment_of(&v, s)?, masks[i].as_ref())
    };
    let (_, heads, rows, d) = q.dims4()?;
    let h = short_attention::Heads { heads, kv_heads: k.dim(1)?, d, rows };
    let values = if short_applies(&[&q, &k, &v]) && short_shapes(&q, &k, &v)? {
        with_inputs((&q, &k, &v), None, short_attention::Layout::HeadMajor, |x| {
            par_segments(&lens, |i| {
                let s = segments[i];
                match with_short(s, masks[i].as_ref(), |seq| short_attention::forward(x, h, &seq, lone_sequence_threads(&lens))) {
                    Some((y, p)) => Ok((Tensor::from_vec(y, (1, heads, s.1, d), q.device())?, Some(p))),
                    None => Ok((batched(i)?, None)),
                }
            })
        })
    } else {
        None
    };
    let values = match values {
        Some(values) => values?,
        None => par_segments(&lens, |i| Ok((batched(i)?, None)))?,
    };
    let (values, saved): (Vec<Tensor>, Vec<_>) = values.into_iter().unzip();
    Ok((Tensor::cat(&values, 2)?, SavedProbabilities(saved, None)))
}

/// [`segmented_attention`]'s gradients of `q`, `k` and `v` for output gradient `g`, each
/// segment's written into its place (by the code that computed the segment's value, from
/// the probabilities its forward kept in `saved` where it kept them).
pub(crate) fn segmented_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
    saved: &SavedProbabilities,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, g.contiguous()?);
    let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
    if pads_segments(&q, segments) {
        // the forward's layout, if it was built for these segments
        return match &saved.1 {
            Some(p) if p.rows.lens == lens => padded_attention_backward(&q, &k, &v, p, &g),
            _ => padded_attention_backward(&q, &k, &v, &PaddedSegments::new(segments, masks, q.device(), q.dtype())?, &g),
        };
    }
    let batched = |i: usize| {
        let s = segments[i];
        attention_backward(&segment_of(&q, s)?, &segment_of(&k, s)?, &segment_of(&v, s)?, masks[i].as_ref(), &segment_of(&g, s)?)
    };
    let (_, heads, rows, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let h = short_attention::Heads { heads, kv_heads, d, rows };
    let grads = if short_applies(&[&q, &k, &v, &g]) && short_shapes(&q, &k, &v)? && g.dims() == q.dims() {
        with_cpu_f32(&g, |gs| {
            with_inputs((&q, &k, &v), None, short_attention::Layout::HeadMajor, |x| {
                par_segments(&lens, |i| {
                    let s = segments[i];
                    let short = with_short(s, masks[i].as_ref(), |seq| -> Result<(Tensor, Tensor, Tensor)> {
                        let [dq, dk, dv] = short_attention::backward(x, gs, h, &seq, lone_sequence_threads(&lens), saved.segment(i));
                        let dev = q.device();
                        Ok((
                            Tensor::from_vec(dq, (1, heads, s.1, d), dev)?,
                            Tensor::from_vec(dk, (1, kv_heads, s.1, d), dev)?,
                            Tensor::from_vec(dv, (1, kv_heads, s.1, d), dev)?,
                        ))
                    });
                    short.unwrap_or_else(|| batched(i))
                })
            })
        })
        .flatten()
    } else {
        None
    };
    let grads = match grads {
        Some(grads) => grads?,
        None => par_segments(&lens, batched)?,
    };
    cat_grads(grads, 2)
}

/// Each segment's `(dq, dk, dv)`, in order, joined along `dim`.
fn cat_grads(grads: Vec<(Tensor, Tensor, Tensor)>, dim: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut dq, mut dk, mut dv) = (Vec::with_capacity(grads.len()), Vec::with_capacity(grads.len()), Vec::with_capacity(grads.len()));
    for (a, b, c) in grads {
        dq.push(a);
        dk.push(b);
        dv.push(c);
    }
    Ok((Tensor::cat(&dq, dim)?, Tensor::cat(&dk, dim)?, Tensor::cat(&dv, dim)?))
}

/// The query, key and value heads of an attention layer: `(heads, kv_heads, d)`.
pub type HeadCounts = (usize, usize, usize);

/// [`segmented_attention`] straight from the projections, with the rotary embedding:
/// `q` `[n, heads · d]`, `k` and `v` `[n, kv_heads · d]` (the outputs of `q_proj`, `k_proj`
/// and `v_proj` over `n` packed rows), `cos` and `sin` `[1, n, d / 2]` (the rotary tables
/// at each row's position). Returns `[n, heads · d]`, the heads merged: the same as
/// splitting `q`, `k` and `v` into heads, rotating `q` and `k` ([`rope`]), attending within
/// each segment and merging the heads, to float summation order.
///
/// Why: in f32 on the CPU, [`short_attention`] reads each head's rows where the
/// projection left them and rotates them as it loads them, and writes its output and
/// gradients in the same token-major layout: no split, rotation or merge copies of the
/// whole `[n, heads · d]` tensors each way, 6% of a grouped training pass before.
///
/// Errors: shapes that disagree with `heads` or `n`, masks not one per segment, or segments
/// that do not cover the `n` rows in order.
pub fn segmented_rope_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: HeadCounts,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (value, saved) = segmented_rope_attention_forward(&qd, &kd, &vd, (cos, sin), heads, segments, masks)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(value);
    }
    let (cos, sin, segments, masks) = (cos.clone(), sin.clone(), segments.to_vec(), masks.to_vec());
    let backward: Backward3 =
        Box::new(move |g| segmented_rope_attention_backward(&qd, &kd, &vd, (&cos, &sin), heads, &segments, &masks, &saved, g));
    q.apply_op3(k, v, Tap::new("segmented_rope_attention", value, backward))
}

/// `[n, count · d]` → `[1, count, n, d]`, a contiguous copy.
fn to_heads(t: &Tensor, count: usize, d: usize) -> Result<Tensor> {
    let n = t.dim(0)?;
    t.reshape((1, n, count, d))?.transpose(1, 2)?.contiguous()
}

/// `[1, count, n, d]` → `[n, count · d]`.
fn from_heads(t: &Tensor) -> Result<Tensor> {
    let (_, count, n, d) = t.dims4()?;
    t.transpose(1, 2)?.contiguous()?.reshape((n, count * d))
}

/// Checks [`segmented_rope_attention`]'s shapes and segments; returns `n`.
fn rope_attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (nh, nkv, d): HeadCounts,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
) -> Result<usize> {
    let n = q.dim(0)?;
    if q.dims() != [n, nh * d] || k.dims() != [n, nkv * d] || v.dims() != [n, nkv * d] || nkv == 0 || nh % nkv != 0 || d % 2 != 0 {
        candle_core::bail!(
            "segmented_rope_attention: q {:?}, k {:?}, v {:?} do not hold {nh} query and {nkv} key/value heads of {d} dimensions",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    for (t, name) in [(cos, "cos"), (sin, "sin")] {
        if t.dims() != [1, n, d / 2] {
            candle_core::bail!("segmented_rope_attention: {name} is {:?}, expected [1, {n}, {}]", t.dims(), d / 2);
        }
    }
    check_segments("segmented_rope_attention", segments, masks, n)?;
    Ok(n)
}

/// [`segmented_rope_attention`]'s value, and the probabilities it keeps for
/// [`segmented_rope_attention_backward`].
pub(crate) fn segmented_rope_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: HeadCounts,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
) -> Result<(Tensor, SavedProbabilities)> {
    let n = rope_attention_rows(q, k, v, (cos, sin), heads, segments, masks)?;
    let (nh, nkv, d) = heads;
    let (q, k, v, cos, sin) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    if !short_applies(&[&q, &k, &v, &cos, &sin]) {
        // elsewhere (GPUs): split, rotate, attend (all segments at once, padded:
        // `segmented_attention_forward`), merge, each over all rows
        let (qr, kr) = (
            candle_nn::rotary_emb::rope(&to_heads(&q, nh, d)?, &cos, &sin)?,
            candle_nn::rotary_emb::rope(&to_heads(&k, nkv, d)?, &cos, &sin)?,
        );
        let (y, saved) = segmented_attention_forward(&qr, &kr, &to_heads(&v, nkv, d)?, segments, masks)?;
        return Ok((from_heads(&y)?, saved));
    }
    let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
    let h = short_attention::Heads { heads: nh, kv_heads: nkv, d, rows: n };
    let values = with_inputs((&q, &k, &v), Some((&cos, &sin)), short_attention::Layout::TokenMajor, |x| {
        par_segments(&lens, |i| {
            let s = segments[i];
            match with_short(s, masks[i].as_ref(), |seq| short_attention::forward(x, h, &seq, lone_sequence_threads(&lens))) {
                Some((y, p)) => Ok((Tensor::from_vec(y, (s.1, nh * d), q.device())?, Some(p))),
                None => {
                    let (qr, kr, vs) = rope_segment(&q, &k, &v, (&cos, &sin), heads, s)?;
                    Ok((from_heads(&attention_forward(&qr, &kr, &vs, masks[i].as_ref())?)?, None))
                }
            }
        })
    })
    .ok_or_else(|| candle_core::Error::Msg("segmented_rope_attention: inputs not on the CPU in f32".into()))??;
    let (values, saved): (Vec<Tensor>, Vec<_>) = values.into_iter().unzip();
    Ok((Tensor::cat(&values, 0)?, SavedProbabilities(saved, None)))
}

/// A segment's heads for the batched products: `q` and `k` rotated, `[1, heads, len, d]`.
fn rope_segment(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (nh, nkv, d): HeadCounts,
    (start, len): (usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (c, s) = (cos.narrow(1, start, len)?.contiguous()?, sin.narrow(1, start, len)?.contiguous()?);
    let rows = |t: &Tensor, count| to_heads(&t.narrow(0, start, len)?, count, d);
    Ok((candle_nn::rotary_emb::rope(&rows(q, nh)?, &c, &s)?, candle_nn::rotary_emb::rope(&rows(k, nkv)?, &c, &s)?, rows(v, nkv)?))
}

/// [`segmented_rope_attention`]'s gradients of `q`, `k` and `v` (before the rotation) for
/// output gradient `g` `[n, heads · d]`, from the probabilities its forward kept in `saved`
/// where it kept them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn segmented_rope_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: HeadCounts,
    segments: &[(usize, usize)],
    masks: &[Option<Tensor>],
    saved: &SavedProbabilities,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = rope_attention_rows(q, k, v, (cos, sin), heads, segments, masks)?;
    let (nh, nkv, d) = heads;
    let (q, k, v, cos, sin, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, cos.contiguous()?, sin.contiguous()?, g.contiguous()?);
    if !short_applies(&[&q, &k, &v, &cos, &sin, &g]) {
        let (qr, kr) = (
            candle_nn::rotary_emb::rope(&to_heads(&q, nh, d)?, &cos, &sin)?,
            candle_nn::rotary_emb::rope(&to_heads(&k, nkv, d)?, &cos, &sin)?,
        );
        let (dq, dk, dv) = segmented_attention_backward(&qr, &kr, &to_heads(&v, nkv, d)?, segments, masks, saved, &to_heads(&g, nh, d)?)?;
        let nsin = sin.neg()?;
        let unrotate = |t: &Tensor| from_heads(&candle_nn::rotary_emb::rope(&t.contiguous()?, &cos, &nsin)?);
        return Ok((unrotate(&dq)?, unrotate(&dk)?, from_heads(&dv)?));
    }
    let lens: Vec<usize> = segments.iter().map(|s| s.1).collect();
    let h = short_attention::Heads { heads: nh, kv_heads: nkv, d, rows: n };
    let dev = q.device().clone();
    let grads = with_cpu_f32(&g, |gs| {
        with_inputs((&q, &k, &v), Some((&cos, &sin)), short_attention::Layout::TokenMajor, |x| {
            par_segments(&lens, |i| {
                let s = segments[i];
                if let Some([dq, dk, dv]) = with_short(s, masks[i].as_ref(), |seq| {
                    short_attention::backward(x, gs, h, &seq, lone_sequence_threads(&lens), saved.segment(i))
                }) {
                    return Ok((
                        Tensor::from_vec(dq, (s.1, nh * d), &dev)?,
                        Tensor::from_vec(dk, (s.1, nkv * d), &dev)?,
                        Tensor::from_vec(dv, (s.1, nkv * d), &dev)?,
                    ));
                }
                let (qr, kr, vs) = rope_segment(&q, &k, &v, (&cos, &sin), heads, s)?;
                let gh = to_heads(&g.narrow(0, s.0, s.1)?, nh, d)?;
                let (dq, dk, dv) = attention_backward(&qr, &kr, &vs, masks[i].as_ref(), &gh)?;
                let (c, ns) = (cos.narrow(1, s.0, s.1)?.contiguous()?, sin.narrow(1, s.0, s.1)?.neg()?);
                let unrotate = |t: &Tensor| from_heads(&candle_nn::rotary_emb::rope(&t.contiguous()?, &c, &ns)?);
                Ok((unrotate(&dq)?, unrotate(&dk)?, from_heads(&dv)?))
            })
        })
    })
    .flatten()
    .ok_or_else(|| candle_core::Error::Msg("segmented_rope_attention: inputs not on the CPU in f32".into()))??;
    cat_grads(grads, 0)
}

/// Groups the query heads by KV head: `[b, h, l, d]` → `[b, kv, rep * l, d]`, so that one
/// matmul per KV head serves all its query heads without copying K or V.
fn group_heads(q: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    q.contiguous()?.reshape((b, kv_heads, (h / kv_heads) * l, d))
}

/// Batched matmul with optional transposes: OpenBLAS for contiguous f32 CPU tensors,
/// candle otherwise.
fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    if let Some(r) = crate::runtime::blas::batched(a, b, trans_a, trans_b) {
        return r;
    }
    let a = if trans_a { a.t()? } else { a.clone() };
    let b = if trans_b { b.t()? } else { b.contiguous()? };
    a.matmul(&b)
}

fn attention_probs(q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let (_, kvh, lk, _) = k.dims4()?;
    let rep = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    // 1. scores per KV head group: [b, kv, rep*lq, lk]
    let scores = (bmm(&group_heads(q, kvh)?, k, false, true)? * scale)?;
    // 2. mask: padding and causality, broadcast over the heads
    let scores = match mask {
        Some(m) => {
            let m = m.reshape((b, 1, 1, lq, lk))?;
            scores.reshape((b, kvh, rep, lq, lk))?.broadcast_add(&m.to_dtype(scores.dtype())?)?
        }
        None => scores.reshape((b, kvh, rep, lq, lk))?,
    };
    // 3. softmax over the keys, in f32 for stability
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
    probs.to_dtype(q.dtype())?.reshape((b, kvh, rep * lq, lk))
}

pub(crate) fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let probs = attention_probs(q, k, mask)?;
    // 4. weighted sum of values, back to [b, h, lq, d]
    bmm(&probs, v, false, false)?.reshape((b, h, lq, d))
}

pub(crate) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, lq, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let p = attention_probs(q, k, mask)?; // [b, kv, rep*lq, lk]
    let g = group_heads(g, kvh)?; // [b, kv, rep*lq, d]
                                  // O = P V  →  dV = P^T dO,  dP = dO V^T
    let dv = bmm(&p, &g, true, false)?;
    let dp = bmm(&g, v, false, true)?;
    // softmax: dS = P * (dP - rowsum(dP * P))
    let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
    let ds = (p.clone() * dp.broadcast_sub(&row)?)?;
    // S = Q K^T * scale  →  dQ = dS K * scale,  dK = dS^T Q * scale
    let dq = (bmm(&ds, k, false, false)? * scale)?.reshape((b, h, lq, d))?;
    let dk = (bmm(&ds, &group_heads(q, kvh)?, true, false)? * scale)?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Attention over segments padded into one batch (a GPU's path, run here on the CPU)
    /// equals attention one segment at a time, value and gradients, to float summation
    /// order: grouped query heads, causal masks, a lone row without a mask, a segment whose
    /// own mask is not causal (finite penalties, so its placement in the batch shows), and
    /// the longest segment not first.
    #[test]
    fn padded_segments_attend_as_each_segment_alone() {
        let dev = Device::Cpu;
        let (heads, kv, d) = (4, 2, 8);
        let segments = [(0, 3), (3, 1), (4, 6), (10, 4)];
        let n = 14;
        let causal = |l: usize| crate::runtime::model::causal_mask(1, l, 0, &[0], &dev, DType::F32).unwrap();
        let penalties = Tensor::from_vec((0..16).map(|i| -((i * 7 % 5) as f32) * 0.7).collect::<Vec<_>>(), (1, 1, 4, 4), &dev).unwrap();
        let masks = [Some(causal(3)), None, Some(causal(6)), Some(penalties)];
        let q = Tensor::randn(0f32, 1., (1, heads, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, kv, n, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, kv, n, d), &dev).unwrap();
        let g = Tensor::randn(0f32, 1., (1, heads, n, d), &dev).unwrap();
        let mut alone = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, m) in segments.iter().zip(&masks) {
            let part = |t: &Tensor| segment_of(t, *s).unwrap();
            alone.0.push(attention_forward(&part(&q), &part(&k), &part(&v), m.as_ref()).unwrap());
            let (dq, dk, dv) = attention_backward(&part(&q), &part(&k), &part(&v), m.as_ref(), &part(&g)).unwrap();
            alone.1.push(dq);
            alone.2.push(dk);
            alone.3.push(dv);
        }
        let p = PaddedSegments::new(&segments, &masks, &dev, DType::F32).unwrap();
        let y = padded_attention_forward(&q, &k, &v, &p).unwrap();
        let (dq, dk, dv) = padded_attention_backward(&q, &k, &v, &p, &g).unwrap();
        for (name, padded, each) in [("value", y, &alone.0), ("dq", dq, &alone.1), ("dk", dk, &alone.2), ("dv", dv, &alone.3)] {
            let want = Tensor::cat(each, 2).unwrap();
            assert_eq!(padded.dims(), want.dims(), "{name}");
            let gap = (&padded - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(gap <= 1e-5 * scale.max(1.0), "{name}: padded and alone differ by {gap} (largest {scale})");
        }
        // a mask that does not fit its segment is refused, naming the segment
        let wrong = [Some(causal(3)), None, Some(causal(5)), None];
        let err = PaddedSegments::new(&segments, &wrong, &dev, DType::F32).unwrap_err().to_string();
        assert!(err.contains("segment 2 of 6 rows"), "{err}");
        // a mask that broadcasts (one penalty per key) is laid out as its full square
        let per_key = Tensor::new(&[0f32, -1.0, -2.5, 0.5], &dev).unwrap().reshape((1, 1, 1, 4)).unwrap();
        let (two, two_masks) = ([(0, 10), (10, 4)], [Some(causal(10)), Some(per_key.clone())]);
        let y = padded_attention_forward(&q, &k, &v, &PaddedSegments::new(&two, &two_masks, &dev, DType::F32).unwrap()).unwrap();
        let part = |t: &Tensor| segment_of(t, (10, 4)).unwrap();
        let square = per_key.broadcast_as((1, 1, 4, 4)).unwrap().contiguous().unwrap();
        let want = attention_forward(&part(&q), &part(&k), &part(&v), Some(&square)).unwrap();
        let gap = (y.narrow(2, 10, 4).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap <= 1e-5, "a broadcast mask: gap {gap}");
        // only two segments or more, none empty, are padded
        assert!(paddable(&segments) && paddable(&segments[..2]));
        assert!(!paddable(&segments[..1]) && !paddable(&[(0, 14), (14, 0)]) && !paddable(&[]));
        // an empty segment is refused, not read past the end
        let err = PaddedSegments::new(&[(0, 14), (14, 0)], &[Some(causal(14)), None], &dev, DType::F32).unwrap_err().to_string();
        assert!(err.contains("segment 1 is empty"), "{err}");
    }

    /// `y` and `y2` give each of `vars` the same gradient (max abs difference below `tol`)
    /// under one random cotangent.
    pub(super) fn same_gradients(y: &Tensor, y2: &Tensor, vars: &[&Tensor], tol: f32) {
        let t = Tensor::randn(0f32, 1., y.shape(), y.device()).unwrap();
        let g1 = (y * &t).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &t).unwrap().sum_all().unwrap().backward().unwrap();
        for var in vars {
            close(g1.get(var).unwrap(), g2.get(var).unwrap(), tol);
        }
    }

    /// `a` equals `b` within `tol`, absolute for values up to 1 and relative to `b`'s largest
    /// magnitude above that (random inputs reach values of ~20, where float32's last bit is
    /// ~2e-6: an absolute 1e-6 failed one CI run in SwiGLU).
    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        let largest = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < tol * largest.max(1.0), "max abs diff {d} >= {tol} x {}", largest.max(1.0));
    }

    /// The input gradient of projections sharing their input (q, k, v of a small model):
    /// with weights packed for the f32 kernel, one product equal to the terms' products
    /// added, to float summation order, and each row of a tall batch equal to the row alone,
    /// bit for bit; without packed weights, the terms' products added in order, bit for bit.
    #[test]
    fn input_gradients_of_a_shared_input_add_up() {
        use crate::runtime::blas::ComputeDtype;
        let dev = Device::Cpu;
        let (h, kv, m) = (64, 32, 40);
        let ws: Vec<Tensor> = [h, kv, kv].iter().map(|&out| Tensor::randn(0f32, 0.1, (out, h), &dev).unwrap()).collect();
        let gs: Vec<Tensor> = [h, kv, kv].iter().map(|&out| Tensor::randn(0f32, 1., (m, out), &dev).unwrap()).collect();
        let added = (0..3).map(|t| plain_linear_t(&gs[t], &ws[t], None).unwrap()).reduce(|a, b| add(&a, &b).unwrap()).unwrap();
        let plain: Vec<_> = (0..3).map(|t| (&gs[t], &ws[t], None)).collect();
        assert_eq!(plain_linear_t_sum(&plain).unwrap().to_vec2::<f32>().unwrap(), added.to_vec2::<f32>().unwrap());
        if !crate::runtime::sgemm::available() {
            eprintln!("no AVX-512F: the f32 kernel is not used on this CPU");
            return;
        }
        let packed: Vec<PackedWeight> = ws.iter().map(|w| PackedWeight::new(w, ComputeDtype::F32).unwrap()).collect();
        let pairs: Vec<(&PackedWeight, &Tensor)> = packed.iter().zip(&gs).collect();
        assert!(PackedWeight::matmul_nn_sum(&pairs).is_some(), "weights packed for the f32 kernel take one product");
        let terms: Vec<_> = (0..3).map(|t| (&gs[t], &ws[t], Some(&packed[t]))).collect();
        let summed = plain_linear_t_sum(&terms).unwrap();
        close(&summed, &added, 1e-5);
        let tall = summed.to_vec2::<f32>().unwrap();
        for i in [0, m / 2, m - 1] {
            let rows: Vec<Tensor> = gs.iter().map(|g| g.narrow(0, i, 1).unwrap()).collect();
            let alone: Vec<_> = (0..3).map(|t| (&rows[t], &ws[t], Some(&packed[t]))).collect();
            assert_eq!(plain_linear_t_sum(&alone).unwrap().to_vec2::<f32>().unwrap()[0], tall[i], "row {i}");
        }
    }

    /// One input through several linear layers (biases on two of three): each output
    /// equals its own `plain_linear`, bit for bit, without packed weights and with weights
    /// packed for f32 or (where the machine has AMX) bf16.
    #[test]
    fn linear_layers_over_one_input_equal_each_alone() {
        use crate::runtime::blas::ComputeDtype;
        let dev = Device::Cpu;
        let (h, m) = (64, 40);
        let ws: Vec<Tensor> = [h, 32, 48].iter().map(|&out| Tensor::randn(0f32, 0.1, (out, h), &dev).unwrap()).collect();
        let bs: Vec<Option<Tensor>> =
            [Some(h), Some(32), None].iter().map(|o| o.map(|o| Tensor::randn(0f32, 1., o, &dev).unwrap())).collect();
        let x = Tensor::randn(0f32, 1., (2, m / 2, h), &dev).unwrap();
        // bf16 where this machine has AMX (the test process may ask for it, as `main` does).
        let dtypes = [(ComputeDtype::F32, crate::runtime::sgemm::available()), (ComputeDtype::Bf16, crate::runtime::amx::enable())];
        let packed: Vec<(ComputeDtype, Vec<PackedWeight>)> = dtypes
            .iter()
            .filter(|d| d.1)
            .map(|&(dtype, _)| (dtype, ws.iter().map(|w| PackedWeight::new(w, dtype).unwrap()).collect()))
            .collect();
        let unpacked: Vec<Option<&PackedWeight>> = vec![None; 3];
        for (name, weights) in std::iter::once(("unpacked", unpacked))
            .chain(packed.iter().map(|(d, p)| (if d.is_f32() { "f32" } else { "bf16" }, p.iter().map(Some).collect())))
        {
            let lins: Vec<_> = (0..3).map(|o| (&ws[o], weights[o], bs[o].as_ref())).collect();
            let many = plain_linear_many(&x, &lins).unwrap();
            for (y, &(w, p, b)) in many.iter().zip(&lins) {
                assert_eq!(y.to_vec3::<f32>().unwrap(), plain_linear(&x, w, p, b).unwrap().to_vec3::<f32>().unwrap(), "{name}");
            }
        }
        for (dtype, packed) in &packed {
            let all: Vec<&PackedWeight> = packed.iter().collect();
            assert!(PackedWeight::matmul_nt_many(&all, &x.reshape((m, h)).unwrap()).is_some(), "{dtype:?} weights take one call");
        }
        let [f32_packed, bf16_packed] = [ComputeDtype::F32, ComputeDtype::Bf16].map(|d| PackedWeight::new(&ws[0], d).ok());
        if let (Some(a), Some(b)) = (f32_packed, bf16_packed) {
            assert!(PackedWeight::matmul_nt_many(&[&a, &b], &x.reshape((m, h)).unwrap()).is_none(), "mixed dtypes run alone");
        }
    }

    /// An op whose inputs track a gradient only in part still passes it to the one that
    /// does (at layer 0 of a q/v adapter, k comes from untracked embeddings while q and v
    /// track); and SwiGLU of tensors that are not f32 takes candle's formula.
    #[test]
    fn one_tracked_input_gets_its_gradient() {
        let dev = Device::Cpu;
        let (gate, up) = (Tensor::randn(0f32, 2., (3, 7), &dev).unwrap(), Var::randn(0f32, 1., (3, 7), &dev).unwrap());
        let g = swiglu(&gate, &up).unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(&up).expect("up gets a gradient"), &gate.silu().unwrap(), 1e-6);
        let (q, v) = (Tensor::randn(0f32, 1., (1, 2, 4, 8), &dev).unwrap(), Tensor::randn(0f32, 1., (1, 2, 4, 8), &dev).unwrap());
        let k = Var::randn(0f32, 1., (1, 2, 4, 8), &dev).unwrap();
        let g = attention(&q, &k, &v, None).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let k2 = Var::from_tensor(k.as_tensor()).unwrap();
        let (qv, vv) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&v).unwrap());
        let g2 = attention(&qv, &k2, &vv, None).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(&k).expect("k gets a gradient"), g2.get(&k2).unwrap(), 1e-6);
        // the same through the packed form: only k of two segments tracks
        let g = segmented_attention(&q, &k, &v, &[(0, 1), (1, 3)], &[None, None])
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&k).expect("k gets a gradient through segments").abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        let (gb, ub) = (gate.to_dtype(DType::BF16).unwrap(), up.to_dtype(DType::BF16).unwrap());
        let want = (gb.silu().unwrap() * &ub).unwrap().to_dtype(DType::F32).unwrap();
        close(&swiglu(&gb, &ub).unwrap().to_dtype(DType::F32).unwrap(), &want, 1e-6);
    }

    /// Each tapped op's gradient equals the gradient of the composed reference.
    #[test]
    fn tapped_ops_match_composed_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (8,), &dev).unwrap();
        // rms_norm
        let y = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let gy = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let xs = x.as_tensor();
        let r = (xs.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let y2 = xs.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap();
        close(&y, &y2, 1e-4);
        let gy2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(gy.get(xs).unwrap(), gy2.get(xs).unwrap(), 1e-3);

        // rope
        let cos = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let y = rope(xs, &cos, &sin).unwrap();
        let y2 = candle_nn::rotary_emb::rope_slow(xs, &cos, &sin).unwrap();
        close(&y, &y2, 1e-4);
        same_gradients(&y, &y2, &[xs], 1e-4);

        // swiglu against silu(gate) * up
        let gate = Var::randn(0f32, 2., (2, 3, 7), &dev).unwrap();
        let up = Var::randn(0f32, 1., (2, 3, 7), &dev).unwrap();
        let y = swiglu(&gate, &up).unwrap();
        let y2 = (gate.silu().unwrap() * up.as_tensor()).unwrap();
        close(&y, &y2, 1e-6);
        same_gradients(&y, &y2, &[gate.as_tensor(), up.as_tensor()], 1e-5);

        // linear
        let wl = Tensor::randn(0f32, 1., (6, 8), &dev).unwrap();
        let y = linear(xs, &wl, None, None).unwrap();
        let y2 = xs.broadcast_matmul(&wl.t().unwrap()).unwrap();
        close(&y, &y2, 1e-4);
        same_gradients(&y, &y2, &[xs], 1e-3);
    }

    /// A left-padded batch without a graph, as generation runs it (keys and values views of a
    /// cache longer than the keys): each row's real queries get the numbers of that row alone,
    /// unpadded, bit for bit, its padding queries zeros; a prefill and a decoding step.
    #[test]
    fn left_padded_rows_attend_as_alone() {
        let dev = Device::Cpu;
        let (heads, kv, d, capacity) = (4, 2, 8, 24);
        let pads = [0usize, 3, 9];
        for (lq, lk) in [(13, 13), (1, 13), (6, 13)] {
            let cached = lk - lq;
            let b = pads.len();
            let q = Tensor::randn(0f32, 1., (b, heads, lq, d), &dev).unwrap();
            let kc = Tensor::randn(0f32, 1., (b, kv, capacity, d), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1., (b, kv, capacity, d), &dev).unwrap();
            let mask = crate::runtime::model::causal_mask(b, lq, cached, &pads, &dev, DType::F32).unwrap();
            let y = attention(&q, &kc.narrow(2, 0, lk).unwrap(), &vc.narrow(2, 0, lk).unwrap(), Some(&mask)).unwrap();
            assert_eq!(y.dims(), [b, heads, lq, d]);
            for (r, &p) in pads.iter().enumerate() {
                let first = p.saturating_sub(cached);
                // the row alone: its own cache, holding its keys from `p` on at the start
                let own = |c: &Tensor| {
                    let keys = c.narrow(0, r, 1).unwrap().narrow(2, p, lk - p).unwrap();
                    Tensor::cat(&[&keys, &Tensor::zeros((1, kv, capacity - (lk - p), d), DType::F32, &dev).unwrap()], 2).unwrap()
                };
                let (ko, vo) = (own(&kc), own(&vc));
                let qo = q.narrow(0, r, 1).unwrap().narrow(2, first, lq - first).unwrap().contiguous().unwrap();
                let mo = crate::runtime::model::causal_mask(1, lq - first, cached.saturating_sub(p), &[0], &dev, DType::F32).unwrap();
                let keys = lk - p;
                let alone = attention(&qo, &ko.narrow(2, 0, keys).unwrap(), &vo.narrow(2, 0, keys).unwrap(), Some(&mo)).unwrap();
                let got = y.narrow(0, r, 1).unwrap();
                let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(flat(got.narrow(2, first, lq - first).unwrap()), flat(alone), "row {r} (padding {p}), {lq} queries");
                assert!(flat(got.narrow(2, 0, first).unwrap()).iter().all(|&x| x == 0.0), "row {r}: its padding queries");
            }
            // without padding, the batched products (which give each row its numbers alone)
            let plain = crate::runtime::model::causal_mask(b, lq, cached, &[0; 3], &dev, DType::F32).unwrap();
            let (k, v) = (kc.narrow(2, 0, lk).unwrap(), vc.narrow(2, 0, lk).unwrap());
            assert!(left_padded_attention(&q, &k, &v, &plain).unwrap().is_none());
            // row 2's first 9 keys are not padding if a real query other than the last sees one,
            // or a padding query sees past them: then the batched products
            let first = 9usize.saturating_sub(cached);
            let seen_at = |query: usize, key: usize| {
                let mut m = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                m[(2 * lq + query) * lk + key] = 0.0;
                Tensor::from_vec(m, mask.shape(), &dev).unwrap()
            };
            if lq - first >= 2 {
                assert!(left_padded_attention(&q, &k, &v, &seen_at(lq - 2, 0)).unwrap().is_none());
            }
            if first > 0 {
                assert!(left_padded_attention(&q, &k, &v, &seen_at(0, 9)).unwrap().is_none());
            }
        }
    }

    /// The candle formulas that other devices use give the fused CPU passes' gradients.
    #[test]
    fn fused_cpu_backwards_match_their_candle_fallbacks() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, (8,), &dev).unwrap();
        let g = Tensor::randn(0f32, 1., (3, 4, 8), &dev).unwrap();
        let fused = rms_norm_backward_cpu(&x, &w, &g, 1e-5).expect("f32 on the CPU").unwrap();
        close(&fused, &rms_norm_backward_candle(&x, &w, &g, 1e-5).unwrap(), 1e-5);
        // rows of whole lanes and a tail (40 = 2 × 16 + 8); a grouped pass's [440, 576],
        // split over the cores, gives each row as that row alone, bit for bit
        for (rows, d) in [(5, 40), (440, 576)] {
            let (x, g) = (Tensor::randn(0f32, 1., (rows, d), &dev).unwrap(), Tensor::randn(0f32, 1., (rows, d), &dev).unwrap());
            let w = Tensor::randn(1f32, 0.5, (d,), &dev).unwrap();
            let fused = rms_norm_backward_cpu(&x, &w, &g, 1e-5).unwrap().unwrap();
            close(&fused, &rms_norm_backward_candle(&x, &w, &g, 1e-5).unwrap(), 1e-5);
            for i in [0, rows / 2, rows - 1] {
                let (xi, gi) = (x.narrow(0, i, 1).unwrap(), g.narrow(0, i, 1).unwrap());
                let alone = rms_norm_backward_cpu(&xi, &w, &gi, 1e-5).unwrap().unwrap();
                assert_eq!(alone.to_vec2::<f32>().unwrap(), fused.narrow(0, i, 1).unwrap().to_vec2::<f32>().unwrap(), "row {i} of {rows}");
            }
        }
        // the value, likewise: candle's to float summation order; each row as that row alone
        for (rows, d) in [(1, 8), (5, 40), (440, 576)] {
            let x = (Tensor::randn(0f32, 1., (rows, d), &dev).unwrap() * 3.0).unwrap();
            let w = Tensor::randn(1f32, 0.5, (d,), &dev).unwrap();
            let y = rms_norm_forward(&x, &w, 1e-5).unwrap();
            close(&y, &candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap(), 1e-6);
            for i in [0, rows / 2, rows - 1] {
                let alone = rms_norm_forward(&x.narrow(0, i, 1).unwrap(), &w, 1e-5).unwrap();
                assert_eq!(alone.to_vec2::<f32>().unwrap(), y.narrow(0, i, 1).unwrap().to_vec2::<f32>().unwrap(), "row {i} of {rows}");
            }
        }
        // a weight of another width is refused, naming both shapes
        let err = rms_norm_forward(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-5).unwrap_err().to_string();
        assert!(err.contains("[3, 4, 8]") && err.contains("7"), "{err}");
        // operands of different shapes are not the fused pass's
        assert!(rms_norm_backward_cpu(&x, &w, &g.narrow(0, 0, 2).unwrap(), 1e-5).is_none());
        let u = Tensor::randn(0f32, 1., (3, 4, 8), &dev).unwrap();
        let (dg, du) = swiglu_backward(&x, &u, &g).unwrap();
        let (dg2, du2) = swiglu_backward_candle(&x, &u, &g).unwrap();
        close(&dg, &dg2, 1e-5);
        close(&du, &du2, 1e-5);
    }

    /// The split of elementwise work: whole rows, in order, covering everything, each chunk
    /// of every output cut to its range, results in range order; the same numbers as one
    /// thread. Then the fused ops at sizes that split on a machine with several cores.
    #[test]
    fn work_split_over_threads_equals_one_thread() {
        let square = |range: std::ops::Range<usize>, mut outs: Vec<&mut [f32]>| {
            for (i, (a, b)) in range.clone().zip(outs.remove(0).iter_mut().zip(outs.remove(0).iter_mut())) {
                (*a, *b) = (i as f32, (i * i) as f32);
            }
            range
        };
        let run = |threads, len, unit| {
            let (mut a, mut b) = (vec![-1f32; len], vec![-1f32; len]);
            let ranges = split_rows_on(threads, len, unit, vec![&mut a, &mut b], square);
            (ranges, a, b)
        };
        let (ranges, a, b) = run(3, 70, 7);
        assert_eq!(ranges, [0..28, 28..56, 56..70]);
        assert_eq!((a.clone(), b.clone()), {
            let (_, a1, b1) = run(1, 70, 7);
            (a1, b1)
        });
        assert!(a.iter().enumerate().all(|(i, &v)| v == i as f32) && b.iter().enumerate().all(|(i, &v)| v == (i * i) as f32));
        assert_eq!(run(8, 14, 7).0, [0..7, 7..14], "no more threads than rows");
        assert_eq!(run(0, 14, 7).0, vec![std::ops::Range { start: 0, end: 14 }], "at least one");
        assert_eq!(run(2, 0, 7).0, vec![std::ops::Range { start: 0, end: 0 }], "nothing to do");

        let dev = Device::Cpu;
        // 80 × 4096 = 2.5 × 2^17 elements: two threads where OpenBLAS has two
        let x = Tensor::randn(0f32, 1., (80, 4096), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, (4096,), &dev).unwrap();
        let g = Tensor::randn(0f32, 1., (80, 4096), &dev).unwrap();
        // relative to the value's size: random inputs, gradients up to ~10 (an absolute 1e-5
        // failed once at 1.24e-5)
        let (r1, r2) = (rms_norm_backward_cpu(&x, &w, &g, 1e-5).unwrap().unwrap(), rms_norm_backward_candle(&x, &w, &g, 1e-5).unwrap());
        let rel = ((&r1 - &r2).unwrap().abs().unwrap() / (r2.abs().unwrap() + 1.0).unwrap()).unwrap();
        assert!(rel.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        let (dg, du) = swiglu_backward(&x, &w.broadcast_as((80, 4096)).unwrap().contiguous().unwrap(), &g).unwrap();
        let (dg2, du2) = swiglu_backward_candle(&x, &w.broadcast_as((80, 4096)).unwrap(), &g).unwrap();
        close(&dg, &dg2, 1e-5);
        close(&du, &du2, 1e-5);
        let y = swiglu_forward(&x, &g).unwrap();
        let y2 = (x.silu().unwrap() * &g).unwrap();
        // candle's silu within a few ulp (the vectorized exp): relative to the value's size
        let rel = ((&y - &y2).unwrap().abs().unwrap() / (y2.abs().unwrap() + 1.0).unwrap()).unwrap();
        assert!(rel.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn attention_gradient_matches_composed_reference() {
        let dev = Device::Cpu;
        let (b, h, kvh, l, d) = (2, 4, 2, 5, 8);
        let q = Var::randn(0f32, 1., (b, h, l, d), &dev).unwrap();
        let k = Var::randn(0f32, 1., (b, kvh, l, d), &dev).unwrap();
        let v = Var::randn(0f32, 1., (b, kvh, l, d), &dev).unwrap();
        let mask: Vec<f32> = (0..b * l * l).map(|i| if (i % l) > (i / l) % l { f32::NEG_INFINITY } else { 0. }).collect();
        let mask = Tensor::from_vec(mask, (b, 1, l, l), &dev).unwrap();
        let y = attention(&q, &k, &v, Some(&mask)).unwrap();
        // composed reference with repeated KV heads
        let rep = |t: &Tensor| {
            let (b, kv, l, d) = t.dims4().unwrap();
            t.unsqueeze(2).unwrap().expand((b, kv, h / kv, l, d)).unwrap().reshape((b, h, l, d)).unwrap()
        };
        let s = (q.matmul(&rep(&k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let s = s.broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        let y2 = p.matmul(&rep(&v)).unwrap();
        close(&y, &y2, 1e-4);
        same_gradients(&y, &y2, &[q.as_tensor(), k.as_tensor(), v.as_tensor()], 1e-3);
    }

    #[test]
    fn cross_entropy_matches_composed_reference() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1., (6, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (11, 8), &dev).unwrap();
        let targets = [Some(1), None, Some(10), Some(0), None, Some(3)];
        let loss = lm_head_cross_entropy(&h, &w, None, &targets).unwrap();
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let keep: Vec<u32> = vec![0, 2, 3, 5];
        let idx = Tensor::new(keep.as_slice(), &dev).unwrap();
        let tg = Tensor::new(&[1u32, 10, 0, 3], &dev).unwrap();
        let loss2 = candle_nn::loss::cross_entropy(&logits.index_select(&idx, 0).unwrap(), &tg).unwrap();
        close(&loss, &loss2, 1e-5);
        let g1 = loss.backward().unwrap();
        let g2 = loss2.backward().unwrap();
        close(g1.get(&h).unwrap(), g2.get(&h).unwrap(), 1e-5);
    }

    /// [`add`] gives candle's sum bit for bit: split over 2 and 3 threads (a grouped pass's
    /// `[440, 576]`, and with a remainder), on one thread (one sequence's rows), a transposed
    /// operand and two views of one storage (candle's path); it keeps the graph of a tensor
    /// that tracks a gradient, and refuses operands of different shapes as candle does.
    #[test]
    fn add_equals_candles_add() {
        let dev = Device::Cpu;
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (rows, cols) in [(440, 576), (441, 577), (34, 576)] {
            let (a, b) = (Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap(), Tensor::randn(0f32, 3.0, (rows, cols), &dev).unwrap());
            let want = (&a + &b).unwrap();
            for threads in [1, 2, 3] {
                let got = add_on(threads, &a, &b).unwrap();
                assert_eq!(got.dims(), &[rows, cols]);
                assert_eq!(bits(&got), bits(&want), "{rows} x {cols} on {threads} threads");
            }
            let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
            assert_eq!(bits(&add_on(2, &a, &bt).unwrap()), bits(&want), "{rows} x {cols}, transposed operand");
            assert!(add_on(2, &a, &a.narrow(0, 0, rows - 1).unwrap()).is_err(), "{rows} x {cols}: shapes differ");
            let shorter = b.narrow(0, 0, rows - 1).unwrap().contiguous().unwrap();
            assert!(add_on(2, &a, &shorter).is_err(), "{rows} x {cols}: shapes differ, storages distinct");
        }
        // one storage twice (would deadlock on its lock if both were taken), and a halves' sum
        let x = Tensor::randn(0f32, 1.0, (880, 576), &dev).unwrap();
        assert_eq!(bits(&add_on(2, &x, &x).unwrap()), bits(&(&x + &x).unwrap()));
        let (top, bottom) = (x.narrow(0, 0, 440).unwrap(), x.narrow(0, 440, 440).unwrap());
        assert_eq!(bits(&add_on(2, &top, &bottom).unwrap()), bits(&(&top + &bottom).unwrap()));
        // a tracked operand, first or second, keeps its graph: the gradient of sum(v + x) is ones
        let v = candle_core::Var::randn(0f32, 1.0, (440, 576), &dev).unwrap();
        for sum in [add_on(2, v.as_tensor(), &top).unwrap(), add_on(2, &top, v.as_tensor()).unwrap()] {
            let g = sum.sum_all().unwrap().backward().unwrap();
            assert_eq!(g.get(v.as_tensor()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), (440 * 576) as f32);
        }
    }

    /// Segments come back in order, split between threads by rows once there are enough of
    /// them (when OpenBLAS has more than one thread), and an error in any segment is returned.
    #[test]
    fn par_segments_keeps_order_and_errors() {
        let lens = [30, 5, 40, 1, 50, 0, 20];
        let ran = par_segments(&lens, |i| Ok((i, std::thread::current().id()))).unwrap();
        assert_eq!(ran.iter().map(|r| r.0).collect::<Vec<_>>(), (0..lens.len()).collect::<Vec<_>>());
        let mut threads: Vec<_> = ran.iter().map(|r| r.1).collect();
        threads.dedup();
        // at most one run per thread, and a split wherever there are two threads (with many
        // threads, fewer runs than threads: a run is whole segments)
        let most = crate::runtime::blas::threads().min(lens.len());
        assert!(threads.len() <= most && threads.len() >= most.min(2), "{} runs for {most} threads", threads.len());
        // too few rows: the calling thread alone
        let small = par_segments(&[10, 20, 3], |_| Ok(std::thread::current().id())).unwrap();
        assert!(small.iter().all(|&t| t == std::thread::current().id()));
        for bad in [0, 4, 6] {
            let e = par_segments(&lens, |i| if i == bad { candle_core::bail!("segment {i}") } else { Ok(i) });
            assert!(e.unwrap_err().to_string().starts_with(&format!("segment {bad}")), "segment {bad}'s error");
        }
    }

    /// The attention from the projections equals splitting into heads, rotating ([`rope`]),
    /// attending per segment and merging, composed of the tapped ops, in value and in the
    /// gradients of q, k and v (a segment past the kernel's length included), and so does the
    /// path of other dtypes; a sequence alone equals itself among others bit for bit; bad
    /// shapes and segments are refused.
    #[test]
    fn rope_attention_equals_split_rotate_attend_merge() {
        let dev = Device::Cpu;
        let (nh, nkv, d) = (6, 2, 8);
        let long = short_attention::MAX_LEN + 4;
        let segments = [(0, 5), (5, 40), (45, 1), (46, long), (46 + long, 30)];
        let n = 76 + long;
        let causal = |l: usize| {
            let m: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
            Tensor::from_vec(m, (1, 1, l, l), &dev).unwrap()
        };
        let masks: Vec<Option<Tensor>> = segments.iter().map(|&(_, l)| (l > 1).then(|| causal(l))).collect();
        // a different angle at every row, so that a row read at another row's angle shows
        let angles = Tensor::rand(0f32, std::f32::consts::TAU, (1, n, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let q = Var::randn(0f32, 1., (n, nh * d), &dev).unwrap();
        let k = Var::randn(0f32, 1., (n, nkv * d), &dev).unwrap();
        let v = Var::randn(0f32, 1., (n, nkv * d), &dev).unwrap();
        let y = segmented_rope_attention(&q, &k, &v, (&cos, &sin), (nh, nkv, d), &segments, &masks).unwrap();
        let heads = |t: &Tensor, count: usize| t.reshape((1, n, count, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (qr, kr) = (rope(&heads(&q, nh), &cos, &sin).unwrap(), rope(&heads(&k, nkv), &cos, &sin).unwrap());
        let y2 = segmented_attention(&qr, &kr, &heads(&v, nkv), &segments, &masks).unwrap();
        let y2 = y2.transpose(1, 2).unwrap().contiguous().unwrap().reshape((n, nh * d)).unwrap();
        close(&y, &y2, 1e-5);
        same_gradients(&y, &y2, &[q.as_tensor(), k.as_tensor(), v.as_tensor()], 1e-5);
        // a sequence alone equals itself among others bit for bit, on the kernel (5, 40) and
        // past its length (46, long)
        for (i, &(start, len)) in segments.iter().enumerate().filter(|(_, s)| s.1 > 5) {
            let rows = |t: &Tensor| t.narrow(0, start, len).unwrap();
            let (c, s) = (cos.narrow(1, start, len).unwrap(), sin.narrow(1, start, len).unwrap());
            let alone =
                segmented_rope_attention(&rows(&q), &rows(&k), &rows(&v), (&c, &s), (nh, nkv, d), &[(0, len)], &masks[i..=i]).unwrap();
            let among = y.narrow(0, start, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(), among, "segment {start}+{len}");
        }
        // the path other dtypes and devices take (here f64 on the CPU) agrees
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let masks64: Vec<Option<Tensor>> = masks.iter().map(|m| m.as_ref().map(f64s)).collect();
        let y64 = segmented_rope_attention(&f64s(&q), &f64s(&k), &f64s(&v), (&f64s(&cos), &f64s(&sin)), (nh, nkv, d), &segments, &masks64)
            .unwrap();
        close(&y64.to_dtype(DType::F32).unwrap(), &y, 1e-5);
        // refused: heads that do not fit the rows, tables of another length, a gap
        let wrong = segmented_rope_attention(&q, &k, &v, (&cos, &sin), (nh, nkv, 2 * d), &segments, &masks);
        assert!(wrong.is_err(), "heads of 16 dimensions in rows of 48");
        let short = cos.narrow(1, 0, n - 1).unwrap();
        assert!(segmented_rope_attention(&q, &k, &v, (&short, &short), (nh, nkv, d), &segments, &masks).is_err(), "tables");
        let gap = [(0, 5), (6, n - 6)];
        assert!(segmented_rope_attention(&q, &k, &v, (&cos, &sin), (nh, nkv, d), &gap, &masks[..2]).is_err(), "a gap");
    }

    /// The packed op equals per-segment attention composed of candle's own narrow and cat, in
    /// value and in the gradients of q, k and v (grouped KV heads; a one-token segment
    /// without a mask), and a segment alone equals itself among others bit for bit;
    /// segments that do not tile the row are refused.
    #[test]
    fn segmented_attention_equals_attention_per_segment() {
        let dev = Device::Cpu;
        // 71 rows: enough for the segments to be split between threads
        let segments = [(0, 40), (40, 1), (41, 30)];
        let causal = |l: usize| {
            let m: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
            Tensor::from_vec(m, (1, 1, l, l), &dev).unwrap()
        };
        let masks: Vec<Option<Tensor>> = segments.iter().map(|&(_, l)| (l > 1).then(|| causal(l))).collect();
        let q = Var::randn(0f32, 1., (1, 4, 71, 8), &dev).unwrap();
        let k = Var::randn(0f32, 1., (1, 2, 71, 8), &dev).unwrap();
        let v = Var::randn(0f32, 1., (1, 2, 71, 8), &dev).unwrap();
        let y = segmented_attention(&q, &k, &v, &segments, &masks).unwrap();
        let parts: Vec<Tensor> = segments
            .iter()
            .zip(&masks)
            .map(|(&(start, len), m)| {
                let part = |t: &Tensor| t.narrow(2, start, len).unwrap();
                attention(&part(&q), &part(&k), &part(&v), m.as_ref()).unwrap()
            })
            .collect();
        let y2 = Tensor::cat(&parts, 2).unwrap();
        close(&y, &y2, 1e-6);
        // a sequence gets the same bits alone as among others (the row-at-a-time kernel)
        let part = |t: &Var| t.narrow(2, 41, 30).unwrap();
        let alone = segmented_attention(&part(&q), &part(&k), &part(&v), &[(0, 30)], &masks[2..]).unwrap();
        let among: Vec<f32> = y.narrow(2, 41, 30).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(), among);
        same_gradients(&y, &y2, &[q.as_tensor(), k.as_tensor(), v.as_tensor()], 1e-6);
        assert!(segmented_attention(&q, &k, &v, &segments[..2], &masks[..2]).is_err(), "segments cover 41 of 71");
        assert!(segmented_attention(&q, &k, &v, &[(0, 40), (41, 30)], &masks[..2]).is_err(), "a gap");
        assert!(segmented_attention(&q, &k, &v, &segments, &masks[..2]).is_err(), "masks");
    }

    /// [`cached_attention`] against [`attention`] on the cache's views, as a decoding step
    /// calls them (SmolLM2's heads, a mask hiding each row's left padding, and none), and
    /// the inputs it leaves to [`attention`]: a tracked query, bf16, a head dimension that is
    /// not whole vectors, a mask of the wrong shape, more than one query a row.
    #[test]
    fn cached_attention_equals_attention_on_the_cache_views() {
        let dev = Device::Cpu;
        let (b, heads, kv_heads, d, capacity, keys) = (5, 9, 3, 64, 24, 17);
        let q = Tensor::randn(0f32, 1., (b, heads, 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, kv_heads, capacity, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, kv_heads, capacity, d), &dev).unwrap();
        let pads: Vec<usize> = (0..b).map(|r| r % 4).collect();
        let mask = crate::runtime::model::causal_mask(b, 1, keys - 1, &pads, &dev, DType::F32).unwrap();
        let (kv, vv) = (k.narrow(2, 0, keys).unwrap(), v.narrow(2, 0, keys).unwrap());
        for m in [Some(&mask), None] {
            let got = cached_attention(&q, &k, &v, keys, m).expect("the kernel applies").unwrap();
            assert_eq!(got.dims(), [b, 1, heads * d]);
            let want = attention(&q, &kv, &vv, m).unwrap().transpose(1, 2).unwrap().reshape((b, 1, heads * d)).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "masked {}: differs by {diff}", m.is_some());
        }
        let tracked = Var::from_tensor(&q).unwrap();
        assert!(cached_attention(tracked.as_tensor(), &k, &v, keys, Some(&mask)).is_none(), "a tracked query");
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        assert!(cached_attention(&bf(&q), &bf(&k), &bf(&v), keys, None).is_none(), "bf16");
        let narrow = |t: &Tensor| t.narrow(3, 0, 24).unwrap().contiguous().unwrap();
        assert!(cached_attention(&narrow(&q), &narrow(&k), &narrow(&v), keys, None).is_none(), "d = 24");
        assert!(cached_attention(&q, &k, &v, keys, Some(&mask.narrow(3, 1, keys - 1).unwrap())).is_none(), "mask of keys - 1");
        let two = Tensor::randn(0f32, 1., (b, heads, 2, d), &dev).unwrap();
        assert!(cached_attention(&two, &k, &v, keys, None).is_none(), "two queries a row");
    }
}

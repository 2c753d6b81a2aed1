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
//!   attention does), so nothing quadratic in the sequence length is kept between passes;
//! - [`lm_head_cross_entropy`]: logits are never materialised in the graph.
//!
//! When the input tracks no gradient (inference), every op is the plain fused forward.

mod cross_entropy;

pub use cross_entropy::{lm_head_cross_entropy, lm_head_cross_entropy_packed};

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};

type Result<T> = candle_core::Result<T>;
pub(crate) type Backward1 = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
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
/// gradient and never computes the weight's.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let value = plain_linear(&x.detach(), w, b)?;
    if !x.track_op() {
        return Ok(value);
    }
    let w = w.clone();
    tap1(x, "frozen-linear", value, Box::new(move |g| plain_linear_t(g, &w)))
}

pub(crate) fn plain_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap();
    let rows = x.elem_count() / in_dim;
    let x2 = x.reshape((rows, in_dim))?;
    let y = match crate::runtime::blas::matmul_nt(&x2, w) {
        Some(y) => y?,
        None => x2.matmul(&w.t()?)?,
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// `g @ w`: the input gradient of a linear layer.
pub(crate) fn plain_linear_t(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = g.dims().to_vec();
    let out_dim = *dims.last().unwrap();
    let rows = g.elem_count() / out_dim;
    let g2 = g.reshape((rows, out_dim))?.contiguous()?;
    let dx = match crate::runtime::blas::matmul_nn(&g2, w) {
        Some(dx) => dx?,
        None => g2.matmul(w)?,
    };
    let mut shape = dims;
    *shape.last_mut().unwrap() = w.dim(1)?;
    dx.reshape(shape)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`, with `w` frozen.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach();
    let value = candle_nn::ops::rms_norm(&xd.contiguous()?, w, eps as f32)?;
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
            let x32 = xd.to_dtype(DType::F32)?;
            let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
            let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let dot = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
            let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
            dx.to_dtype(g.dtype())
        }),
    )
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
/// broadcastable to `[b, 1, lq, lk]` (0 or -inf), or `None` for no mask.
/// Query heads `h` use KV head `h / (heads / kv_heads)`, as in Hugging Face's `repeat_kv`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let value = attention_forward(&qd, &kd, &vd, mask)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(value);
    }
    let mask = mask.cloned();
    let backward: Backward3 = Box::new(move |g| attention_backward(&qd, &kd, &vd, mask.as_ref(), g));
    q.apply_op3(k, v, Tap::new("attention", value, backward))
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

fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let probs = attention_probs(q, k, mask)?;
    // 4. weighted sum of values, back to [b, h, lq, d]
    bmm(&probs, v, false, false)?.reshape((b, h, lq, d))
}

fn attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
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

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d < tol, "max abs diff {d} >= {tol}");
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
        let t = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        let g1 = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &t).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(xs).unwrap(), g2.get(xs).unwrap(), 1e-4);

        // linear
        let wl = Tensor::randn(0f32, 1., (6, 8), &dev).unwrap();
        let y = linear(xs, &wl, None).unwrap();
        let y2 = xs.broadcast_matmul(&wl.t().unwrap()).unwrap();
        close(&y, &y2, 1e-4);
        let t = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        let g1 = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &t).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(xs).unwrap(), g2.get(xs).unwrap(), 1e-3);
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
        let t = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        let g1 = (&y * &t).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &t).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&q, &k, &v] {
            close(g1.get(var).unwrap(), g2.get(var).unwrap(), 1e-3);
        }
    }

    #[test]
    fn cross_entropy_matches_composed_reference() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1., (6, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (11, 8), &dev).unwrap();
        let targets = [Some(1), None, Some(10), Some(0), None, Some(3)];
        let loss = lm_head_cross_entropy(&h, &w, &targets).unwrap();
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
}

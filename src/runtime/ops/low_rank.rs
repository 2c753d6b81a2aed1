//! Low-rank updates of many row segments in one differentiable op: the training side of the
//! segmented-matmul idea (punica, S-LoRA), where each segment of a packed batch has its own
//! factors.
//!
//! Why one op: composed of candle ops, every segment would `narrow` the shared input, and
//! the backward of `narrow` expands each segment's gradient to the input's full size and
//! adds it (zeros, a copy and a sum of `[n, in]` per segment, per targeted projection, per
//! layer: quadratic in the number of segments). Here each segment's gradient is written
//! once, into its rows.

use std::borrow::Cow;

use candle_core::{DType, Tensor};

use super::{bmm, par_segments, with_cpu_f32, with_cpu_f32_mut, Backward3, PaddedRows, Result, Tap};
use crate::runtime::parallel::SharedOut;
use crate::runtime::{blas, sgemm};

/// One segment of [`segmented_low_rank`]: the next `len` rows of the input and their update,
/// `scale · (h Aᵀ) Bᵀ` with LoRA's `A` `[r, in]` and `B` `[out, r]` in f32, or no update
/// (zeros) when `factors` is `None`.
#[derive(Debug, Clone)]
pub struct LowRankSegment {
    pub len: usize,
    pub factors: Option<(Tensor, Tensor)>,
    pub scale: f64,
}

/// `y_s = scale_s · (h_s A_sᵀ) B_sᵀ` for every segment `s` of the rows of `h` `[n, in]`, in
/// order. Returns `[n, out]` in f32; every segment's value is computed from its own factors,
/// on the CPU at its own shapes, as it would be alone (bit for bit); off the CPU as one padded
/// batch ([`low_rank_forward`]), equal to it alone to rounding. Differentiable with respect to
/// `h` and every factor (`h`'s gradient in `h`'s dtype), its products then those of training
/// (`Products::Kernel`); when nothing tracks a gradient (inference), no graph is recorded
/// and the library computes the products with the factors where they lie
/// (`Products::Library`).
///
/// Errors: segments that do not cover the rows of `h`, factors whose shapes disagree with
/// `h` or with each other, or no segment with factors.
pub fn segmented_low_rank(h: &Tensor, segments: &[LowRankSegment]) -> Result<Tensor> {
    let out = checked_width(h, segments, "segmented_low_rank")?;
    let h_dtype = h.dtype();
    let hd = h.detach().to_dtype(DType::F32)?;
    let factored: Vec<&(Tensor, Tensor)> = segments.iter().filter_map(|s| s.factors.as_ref()).collect();
    if !(h.track_op() || factored.iter().any(|(a, b)| a.track_op() || b.track_op())) {
        return Ok(low_rank_forward(&hd, segments, out, Products::Library)?.0);
    }
    // something trains: the products of a training pass (as the decoder's own layer node)
    let (value, u) = low_rank_forward(&hd, segments, out, Products::Kernel)?;
    // the graph sees all factors as two inputs: A stacked by rows [Σ r, in], B side by
    // side [out, Σ r]
    let a_all = Tensor::cat(&factored.iter().map(|(a, _)| a).collect::<Vec<_>>(), 0)?;
    let b_all = Tensor::cat(&factored.iter().map(|(_, b)| b).collect::<Vec<_>>(), 1)?;
    let detached: Vec<LowRankSegment> = segments
        .iter()
        .map(|s| LowRankSegment { factors: s.factors.as_ref().map(|(a, b)| (a.detach(), b.detach())), ..s.clone() })
        .collect();
    let backward: Backward3 = Box::new(move |g| {
        let (dh, dfactors) = low_rank_backward(&hd, &detached, &u, g)?;
        let (da, db): (Vec<Tensor>, Vec<Tensor>) = dfactors.into_iter().unzip();
        Ok((dh.to_dtype(h_dtype)?, Tensor::cat(&da, 0)?, Tensor::cat(&db, 1)?))
    });
    h.apply_op3(&a_all, &b_all, Tap::new("segmented-low-rank", value, backward))
}

/// One training pass's low-rank update as a decoder layer's node runs it, outside the
/// autograd graph: [`segmented_low_rank`]'s value `y` `[n, out]` and, for the output
/// gradient `g` `[n, out]`, `h`'s gradient `[n, in]` (both f32) and each factored segment's
/// `(dA, dB)` in order; the products of training ([`Products::Kernel`]). The same numbers as
/// [`segmented_low_rank`] and its backward, without that op's concatenation of every factor
/// into one input of the graph and every gradient into one output.
///
/// Why: `make bench` times the low-rank part of a pass with this, which is what a pass
/// spends on it; timed through [`segmented_low_rank`], the concatenations doubled the
/// figure.
///
/// Errors: [`segmented_low_rank`]'s, and `g` not `[n, out]`.
#[allow(clippy::type_complexity)]
pub fn segmented_low_rank_pass(h: &Tensor, segments: &[LowRankSegment], g: &Tensor) -> Result<(Tensor, Tensor, Vec<(Tensor, Tensor)>)> {
    let out = checked_width(h, segments, "segmented_low_rank_pass")?;
    if g.dims2()? != (h.dim(0)?, out) {
        candle_core::bail!("segmented_low_rank_pass: output gradient {:?} for [{}, {out}]", g.dims(), h.dim(0)?);
    }
    let hd = h.detach().to_dtype(DType::F32)?;
    let (y, u) = low_rank_forward(&hd, segments, out, Products::Kernel)?;
    let (dh, dfactors) = low_rank_backward(&hd, segments, &u, g)?;
    Ok((y, dh, dfactors))
}

/// The output width of segments that update `h` `[n, in]`, after checking that they cover
/// its rows and that every segment's `A` is `[r, in]` and `B` `[out, r]` (`op` names the
/// caller in the errors).
fn checked_width(h: &Tensor, segments: &[LowRankSegment], op: &str) -> Result<usize> {
    let (n, in_dim) = h.dims2()?;
    let Some(out) = segments.iter().find_map(|s| s.factors.as_ref().map(|(_, b)| b.dim(0))).transpose()? else {
        candle_core::bail!("{op}: no segment has factors");
    };
    let rows: usize = segments.iter().map(|s| s.len).sum();
    if rows != n {
        candle_core::bail!("{op}: segments cover {rows} rows of {n}");
    }
    for (i, s) in segments.iter().enumerate() {
        if let Some((a, b)) = &s.factors {
            let r = a.dim(0)?;
            if a.dims2()? != (r, in_dim) || b.dims2()? != (out, r) {
                candle_core::bail!("{op}: segment {i} has A {:?} and B {:?}, expected [r, {in_dim}] and [{out}, r]", a.dims(), b.dims());
            }
        }
    }
    Ok(out)
}

/// Which code computes a low-rank forward's two products, `h Aᵀ` and `u Bᵀ`.
///
/// The choice is the caller's (training or inference), never the shape's: a choice made on
/// the row count would make a generated row's numbers depend on how many rows of its adapter
/// share the batch, and a trained sequence's on whether it trains alone or in a group. (The
/// library's own small-matrix kernels still depend on the shape; for generation, exactness
/// across batch compositions rests on `tests/grouped.rs`, see the README.) Off the CPU,
/// where a pass's segments run as one padded batch in training and inference alike
/// ([`low_rank_forward`]), a sequence's numbers depend on its batch by rounding, as the
/// frozen products' already do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Products {
    /// OpenBLAS (or candle) with the factors where they lie: [`segmented_low_rank`] and a
    /// layer node outside the graph (scoring). (Generation's updates, added in place by
    /// `model::Frozen`, take the kernel: timed at a decoding step's 126 rows in 9 segments of
    /// ranks 16-64, in place, 177 µs against the kernel's 120 for q's 576 columns, 83 against
    /// 87 for v's 192; at a prefill's 1,800 rows 2,560 against 817.)
    Library,
    /// The f32 kernel ([`sgemm::matmul_plain`]) for each product whose output width is a
    /// multiple of 16 (`h Aᵀ` at ranks 16, 32, 48, ...; `u Bᵀ` at every projection's width),
    /// each factor transposed per call (`[r, in]` and `[out, r]`, small beside a sequence's
    /// product with them): training passes, tens of rows per segment and factors that change
    /// every step; also generation's updates (see `Library`). Other widths, other dtypes and
    /// CPUs without AVX-512 take the library.
    Kernel,
}

/// What a low-rank forward keeps for its backward.
#[derive(Debug)]
pub(crate) enum KeptUpdate {
    /// Each segment's scaled `u` `[len, r]` ([`segmented_low_rank_forward`]; `None` for a
    /// segment without factors, and for every segment on the library's products,
    /// [`Products::Library`]; on the kernel's, kept even where nothing needs it: generation
    /// drops it).
    Segments(Vec<Option<Tensor>>),
    /// Off the CPU, the pass's padded batch ([`padded_forward`]).
    Padded(PaddedUpdate),
}

impl Default for KeptUpdate {
    fn default() -> Self {
        Self::Segments(Vec::new())
    }
}

/// [`segmented_low_rank`]'s value for `h` `[n, in]` in f32 (segments already checked),
/// `[n, out]`, and what its backward ([`low_rank_backward`]) needs. Off the CPU, when every
/// segment of two or more has factors and rows, all of them run as one padded batch
/// ([`padded_forward`], which needs neither `out` nor `products`: its products are the
/// device's batched ones); otherwise each segment at its own shapes
/// ([`segmented_low_rank_forward`]).
///
/// Errors: [`segmented_low_rank_forward`]'s, or a device error.
pub(crate) fn low_rank_forward(h: &Tensor, segments: &[LowRankSegment], out: usize, products: Products) -> Result<(Tensor, KeptUpdate)> {
    if pads_updates(h, segments) {
        let (y, p) = padded_forward(h, segments)?;
        return Ok((y, KeptUpdate::Padded(p)));
    }
    let (y, u) = segmented_low_rank_forward(h, segments, out, products)?;
    Ok((y, KeptUpdate::Segments(u)))
}

/// [`low_rank_forward`]'s gradients for output gradient `g` `[n, out]`, given its input `h`
/// `[n, in]` (f32) again: `h`'s gradient `[n, in]` in f32 and each factored segment's
/// `(dA, dB)`, in order.
///
/// Errors: `kept` from a forward over other segments (their rows or ranks), `h` or `g` not of
/// the segments' rows, or `g` not `[n, out]`.
#[allow(clippy::type_complexity)]
pub(crate) fn low_rank_backward(
    h: &Tensor,
    segments: &[LowRankSegment],
    kept: &KeptUpdate,
    g: &Tensor,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    match kept {
        KeptUpdate::Segments(u) => segmented_low_rank_backward(h, segments, u, g),
        KeptUpdate::Padded(p) => {
            let lens: Vec<usize> = segments.iter().map(|s| s.len).collect();
            let ranks = segments.iter().map(|s| s.factors.as_ref().map_or(Ok(0), |(a, _)| a.dim(0))).collect::<Result<Vec<_>>>()?;
            if p.rows.lens != lens || p.ranks != ranks {
                candle_core::bail!(
                    "low_rank_backward: a padded forward over segments of rows {:?} and ranks {:?}, for rows {lens:?} and ranks {ranks:?}",
                    p.rows.lens,
                    p.ranks
                );
            }
            let n: usize = lens.iter().sum();
            if h.dim(0)? != n || g.dims2()? != (n, p.b.dim(1)?) {
                candle_core::bail!("low_rank_backward: h {:?} and g {:?} for {n} rows", h.dims(), g.dims());
            }
            padded_backward(p, h, g)
        }
    }
}

/// Whether a pass's updates run as one padded batch: off the CPU (where each of the ~12
/// kernels a segment's update launches, forward and backward, costs its launch whatever its
/// size), two segments or more, every one with rows and factors.
fn pads_updates(h: &Tensor, segments: &[LowRankSegment]) -> bool {
    !h.device().is_cpu() && paddable(segments)
}

/// [`pads_updates`]' condition on the segments (apart, so a CPU test can check it).
fn paddable(segments: &[LowRankSegment]) -> bool {
    segments.len() > 1 && segments.iter().all(|s| s.len > 0 && s.factors.is_some())
}

/// A pass's factored segments as one batch ([`PaddedRows`]), kept from [`padded_forward`] for
/// [`padded_backward`]. Ranks are padded with zeros to the largest, `r`: a padded `A` row and
/// `B` column add exact zeros to every product, so each segment's values are its own up to
/// rounding: the device's batched products sum in their own order, and the scale is applied
/// to `h Aᵀ` (`(s · h Aᵀ) Bᵀ`) where the per-segment path scales the result.
#[derive(Debug)]
pub(crate) struct PaddedUpdate {
    rows: PaddedRows,
    /// `[S, r, in]`: the segments' `A`, stacked.
    a: Tensor,
    /// `[S, out, r]`: the segments' `B`, stacked.
    b: Tensor,
    /// `[S, 1, 1]`: each segment's scale.
    scale: Tensor,
    /// `[S, L, r]`: `scale · h Aᵀ`.
    u: Tensor,
    /// Each segment's own rank.
    ranks: Vec<usize>,
}

/// Every segment's update in one batch: `u = scale · h_pad Aᵀ` `[S, L, r]`, `y = u Bᵀ`
/// `[S, L, out]`, unpadded to `[n, out]`. Each `A`, `B` is stacked once here (a copy a
/// segment, and for a segment of a lower rank its zeros and one more copy) and the products
/// are two batched calls, where segment by segment they were ~5 kernels a segment. The
/// factors are read detached: the callers' own backward gives their gradients.
///
/// Errors: a segment without factors or rows, or factors that do not fit `h`.
fn padded_forward(h: &Tensor, segments: &[LowRankSegment]) -> Result<(Tensor, PaddedUpdate)> {
    let lens: Vec<usize> = segments.iter().map(|s| s.len).collect();
    let rows = PaddedRows::new(&lens, h.device(), DType::F32)?;
    let mut factors = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        match &s.factors {
            Some((a, b)) => factors.push((a.detach(), b.detach())),
            None => candle_core::bail!("padded low-rank update: segment {i} has no factors"),
        }
    }
    let ranks = factors.iter().map(|(a, _)| a.dim(0)).collect::<Result<Vec<_>>>()?;
    let r = ranks.iter().copied().max().unwrap_or(0);
    let a = Tensor::stack(&factors.iter().zip(&ranks).map(|((a, _), &ra)| a.pad_with_zeros(0, 0, r - ra)).collect::<Result<Vec<_>>>()?, 0)?;
    let b = Tensor::stack(&factors.iter().zip(&ranks).map(|((_, b), &rb)| b.pad_with_zeros(1, 0, r - rb)).collect::<Result<Vec<_>>>()?, 0)?;
    let scale = Tensor::from_vec(segments.iter().map(|s| s.scale as f32).collect::<Vec<_>>(), (segments.len(), 1, 1), h.device())?;
    // [S, L, in] x [S, in, r] -> [S, L, r], then [S, L, r] x [S, r, out] -> [S, L, out]
    let u = bmm(&rows.batch(h)?, &a, false, true)?.broadcast_mul(&scale)?;
    let y = rows.unbatch(&bmm(&u, &b, false, true)?)?;
    Ok((y, PaddedUpdate { rows, a, b, scale, u, ranks }))
}

/// [`padded_forward`]'s gradients for its input `h` `[n, in]` and output gradient `g`
/// `[n, out]`: `dh` `[n, in]` and each segment's `(dA [r_s, in], dB [out, r_s])`, its rank's
/// part of the batch's. The padding rows' gradient is zeroed first, so their inputs (copies
/// of a real row) add nothing to `dA`, `dB`. (`h` is gathered again rather than kept: a
/// padded copy per targeted projection per layer would outlive the forward.)
///
/// Errors: `h` or `g` not of the batch's rows (checked by [`low_rank_backward`]).
#[allow(clippy::type_complexity)]
fn padded_backward(p: &PaddedUpdate, h: &Tensor, g: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let g = p.rows.batch(&g.to_dtype(DType::F32)?)?.broadcast_mul(&p.rows.valid)?; // [S, L, out]
    let du = bmm(&g, &p.b, false, false)?.broadcast_mul(&p.scale)?; // [S, L, r]
    let dh = p.rows.unbatch(&bmm(&du, &p.a, false, false)?)?; // [n, in]
    let da = bmm(&du, &p.rows.batch(h)?, true, false)?; // [S, r, in]
    let db = bmm(&g, &p.u, true, false)?; // [S, out, r]
    let dfactors = p
        .ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| Ok((da.get(i)?.narrow(0, 0, r)?, db.get(i)?.narrow(1, 0, r)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((dh, dfactors))
}

/// [`segmented_low_rank`]'s value for `h` `[n, in]` in f32 (segments already checked),
/// `[n, out]`: u_s = scale · h_s A_sᵀ `[len, r]`, y_s = u_s B_sᵀ `[len, out]`. Also returns
/// each factored segment's `u` (scaled; `None` for a segment without factors, and for every
/// segment on the library's products, [`Products::Library`]), which
/// [`segmented_low_rank_backward`] needs.
///
/// Training ([`Products::Kernel`]) writes each segment whose rank and output width are
/// multiples of 16 straight into the rows of the result on the f32 kernel
/// ([`kernel_segment_forward`]); the choice is the segment's own (its rank, the width), so a
/// sequence takes the same path alone and in a group.
pub(crate) fn segmented_low_rank_forward(
    h: &Tensor,
    segments: &[LowRankSegment],
    out: usize,
    products: Products,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let (lens, starts) = lens_and_starts(segments);
    covers(&lens, h.dim(0)?, "segmented_low_rank_forward")?;
    if !h.device().is_cpu() {
        // on a GPU: each segment's products where they lie, then one concatenation
        let parts = par_segments(&lens, |i| {
            let s = &segments[i];
            match &s.factors {
                None => Ok((Tensor::zeros((s.len, out), DType::F32, h.device())?, None)),
                Some((a, b)) => segment_forward_tensors(&h.narrow(0, starts[i], s.len)?, a, b, s.scale, products),
            }
        })?;
        let (ys, us): (Vec<Tensor>, Vec<Option<Tensor>>) = parts.into_iter().unzip();
        return Ok((Tensor::cat(&ys, 0)?, us));
    }
    let n = h.dim(0)?;
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    let us = cpu_forward(h, segments, out, products, SharedOut(y.as_mut_ptr()), Put::Store)?;
    // SAFETY: every segment stored all its rows (zeros, the kernel's product or a copy), and
    // the segments cover the n rows.
    unsafe { y.set_len(n * out) };
    Ok((Tensor::from_vec(y, (n, out), h.device())?, us))
}

/// [`low_rank_forward`] added to the frozen product `y` `[n, out]`: `y + update`, and what the
/// backward needs. On the CPU, with `y` a contiguous f32 tensor outside the graph, in place: each
/// segment's update is computed into a scratch of its rows and added to `y`'s rows while
/// they are in cache, one rounding per element as [`super::add`] of the whole update, so the
/// same bits. Otherwise the update, then [`super::add`].
///
/// Why: each adapted projection's update, written out whole and then read back by an add
/// that wrote a third tensor, streamed ~3 values per element of its output through memory
/// ([`Put::Add`]).
///
/// The caller hands over a `y` whose storage no other live tensor shares (a product it
/// just computed): written in place, such a tensor would change too. This is not checked.
///
/// Errors: [`low_rank_forward`]'s, and `y` or a segment's factors not of `[n, out]` for
/// `h` `[n, in]` (`A` `[r, in]`, `B` `[out, r]`).
pub(crate) fn low_rank_forward_add(h: &Tensor, segments: &[LowRankSegment], y: Tensor, products: Products) -> Result<(Tensor, KeptUpdate)> {
    let (n, out) = y.dims2()?;
    if checked_width(h, segments, "low_rank_forward_add")? != out || h.dim(0)? != n {
        candle_core::bail!("low_rank_forward_add: an update of h {:?} into y {:?}", h.dims(), y.dims());
    }
    if !in_place(&y) || pads_updates(h, segments) {
        let (delta, kept) = low_rank_forward(h, segments, out, products)?;
        return Ok((super::add(&y, &delta.to_dtype(y.dtype())?)?, kept));
    }
    let us = with_cpu_f32_mut(&y, |yv| cpu_forward(h, segments, out, products, SharedOut(yv.as_mut_ptr()), Put::Add(None)))
        .expect("in_place checked a contiguous f32 CPU tensor")?;
    Ok((y, KeptUpdate::Segments(us)))
}

/// Whether [`Put::Add`] may write into `t`: a contiguous f32 CPU tensor outside the graph.
/// (The callers pass tensors they just computed, so no other tensor shares the storage.)
fn in_place(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && !t.track_op()
}

/// How a CPU pass puts each segment's rows into its output.
#[derive(Clone, Copy)]
enum Put<'m> {
    /// Stored: the output's rows are uninitialized.
    Store,
    /// Added to the values there (`y + update`): computed into a scratch of the segment's
    /// rows ([`SCRATCH`]), then added, each value first multiplied by the mask's, when given
    /// (`dx + dh ⊙ m`, `[n, width]`). Rows without factors add zeros.
    Add(Option<&'m [f32]>),
}

thread_local! {
    /// A segment's rows for [`Put::Add`], reused: one segment's rows of the widest output
    /// (a self-edit's 34-token sequence × 1536 values, ~200 KB; 128 tokens, 786 KB) stay in
    /// L2, where a fresh `[n, out]` went through memory. Each thread keeps its own, as large as
    /// the largest it needed, for the life of the thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Segment `s`'s rows of an output `width` wide, by `put`: `compute` writes every value of
/// the slice it is handed (the segment's rows at `start`, or the scratch), then for
/// [`Put::Add`] they are added to the rows.
///
/// # Safety
/// `out` points at `[n, width]` values of which rows `start .. start + len` are this call's
/// alone; for [`Put::Add`] they are initialized.
unsafe fn put_rows<T>(
    out: &SharedOut,
    put: Put,
    start: usize,
    len: usize,
    width: usize,
    compute: impl FnOnce(&mut [f32]) -> Result<T>,
) -> Result<T> {
    // SAFETY: passed on from the caller.
    let rows = unsafe { std::slice::from_raw_parts_mut(out.0.add(start * width), len * width) };
    let Put::Add(mask) = put else { return compute(rows) };
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < rows.len() {
            scratch.resize(rows.len(), 0.0);
        }
        let delta = &mut scratch[..rows.len()];
        let value = compute(delta)?;
        let delta = &*delta;
        super::simd::simd(
            #[inline(always)]
            || match mask {
                Some(m) => {
                    for ((y, &d), &m) in rows.iter_mut().zip(delta).zip(&m[start * width..(start + len) * width]) {
                        *y += d * m;
                    }
                }
                None => {
                    for (y, &d) in rows.iter_mut().zip(delta) {
                        *y += d;
                    }
                }
            },
        );
        Ok(value)
    })
}

/// [`segmented_low_rank_forward`] on the CPU: each segment's `scale · (h_s Aᵀ) Bᵀ` into its
/// rows of `y` (`[n, out]`) by `put`, over [`par_segments`]' threads; each segment's scaled `u`
/// (`None` without factors, or in inference) returned.
fn cpu_forward(
    h: &Tensor,
    segments: &[LowRankSegment],
    out: usize,
    products: Products,
    y: SharedOut,
    put: Put,
) -> Result<Vec<Option<Tensor>>> {
    let (lens, starts) = lens_and_starts(segments);
    let in_dim = h.dim(1)?;
    let h = h.contiguous()?;
    let kernel = products == Products::Kernel && kernel_fits(&h, out);
    with_cpu_f32_or(&h, |hv| {
        par_segments(&lens, |i| {
            let s = &segments[i];
            // SAFETY: segment i's rows [starts[i], starts[i] + len) of `y` are written by this
            // call alone (segments are disjoint), and the callers hand `put` rows it may use.
            unsafe {
                put_rows(&y, put, starts[i], s.len, out, |ys| {
                    let Some((a, b)) = &s.factors else {
                        ys.fill(0.0);
                        return Ok(None);
                    };
                    if let (true, true, Some(hv)) = (kernel, segment_fits(a, b), hv) {
                        let hs = &hv[starts[i] * in_dim..(starts[i] + s.len) * in_dim];
                        if let Some(u) = kernel_segment_forward(hs, a, b, s.scale, ys)? {
                            return Ok(Some(Tensor::from_vec(u, (s.len, a.dim(0)?), h.device())?));
                        }
                    }
                    let (ys_t, u) = segment_forward_tensors(&rows_of(&h, hv, starts[i], s.len)?, a, b, s.scale, products)?;
                    copy_into(&ys_t, ys)?;
                    Ok(u)
                })
            }
        })
    })
}

/// One segment's forward as tensors, the products where the factors lie: `y_s = scale ·
/// (h_s Aᵀ) Bᵀ` and, for training ([`Products::Kernel`]), `u` scaled; inference keeps no `u`.
fn segment_forward_tensors(hs: &Tensor, a: &Tensor, b: &Tensor, scale: f64, products: Products) -> Result<(Tensor, Option<Tensor>)> {
    Ok(match products {
        Products::Library => {
            let u = bmm(hs, a, false, true)?;
            (scaled(bmm(&u, b, false, true)?, scale)?, None)
        }
        Products::Kernel => {
            let u = mm(hs, a, false, true, 1.0)?;
            (mm(&u, b, false, true, scale)?, Some(scaled(u, scale)?))
        }
    })
}

/// Rows `[start, start + len)` of `h` `[n, in]` as a tensor: copied from `hv` (`h`'s values,
/// whose storage lock the caller holds, so no second lock is taken), or a view of `h`.
fn rows_of(h: &Tensor, hv: Option<&[f32]>, start: usize, len: usize) -> Result<Tensor> {
    let width = h.dim(1)?;
    match hv {
        Some(hv) => Tensor::from_slice(&hv[start * width..(start + len) * width], (len, width), h.device()),
        None => h.narrow(0, start, len),
    }
}

/// [`segmented_low_rank`]'s gradients for output gradient `g` `[n, out]`, given each
/// segment's scaled `u` from [`segmented_low_rank_forward`]: `h`'s `[n, in]` in f32, and
/// `(dA, dB)` of each segment that has factors, in order: du = scale · dy_s B_s,
/// dA_s = duᵀ h_s, dB_s = dy_sᵀ u, dh_s = du A_s (the scale applied to the small `[len, r]`
/// `du`, not to `dy`). Segments whose rank and width are multiples of 16 run on the f32
/// kernel, their `dh` written straight into its rows ([`kernel_segment_backward`]).
pub(crate) fn segmented_low_rank_backward(
    h: &Tensor,
    segments: &[LowRankSegment],
    u: &[Option<Tensor>],
    g: &Tensor,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let g = checked_gradient(h, segments, u, g)?;
    let (lens, starts) = lens_and_starts(segments);
    if !h.device().is_cpu() {
        // on a GPU: each segment's products where they lie, then one concatenation
        let in_dim = h.dim(1)?;
        let grads = par_segments(&lens, |i| {
            let s = &segments[i];
            match segment_with_u(segments, u, i)? {
                Some((a, b, u)) => {
                    let (dh, da, db) =
                        segment_backward_tensors(&h.narrow(0, starts[i], s.len)?, &g.narrow(0, starts[i], s.len)?, a, b, u, s.scale)?;
                    Ok((dh, Some((da, db))))
                }
                None => Ok((Tensor::zeros((s.len, in_dim), DType::F32, g.device())?, None)),
            }
        })?;
        let (dh, dfactors): (Vec<Tensor>, Vec<Option<(Tensor, Tensor)>>) = grads.into_iter().unzip();
        return Ok((Tensor::cat(&dh, 0)?, dfactors.into_iter().flatten().collect()));
    }
    let (n, in_dim) = h.dims2()?;
    let mut dh: Vec<f32> = Vec::with_capacity(n * in_dim);
    let dfactors = cpu_backward(h, segments, u, &g, SharedOut(dh.as_mut_ptr()), Put::Store)?;
    // SAFETY: every segment stored all its rows, and the segments cover the n rows.
    unsafe { dh.set_len(n * in_dim) };
    Ok((Tensor::from_vec(dh, (n, in_dim), h.device())?, dfactors))
}

/// [`low_rank_backward`]'s `h` gradient, times the dropout `mask` `[n, in]` when given, added
/// to `dx` `[n, in]` (the frozen product's input gradient): `dx + dh ⊙ mask`, and each
/// factored segment's `(dA, dB)` in order. On the CPU, with `dx` a contiguous f32 tensor of
/// its own and a per-segment update ([`KeptUpdate::Segments`]), in place, segment by segment
/// as [`low_rank_forward_add`] (the same roundings as the product and the add in turn, so
/// the same bits); otherwise [`low_rank_backward`], the mask, then [`super::add`]. As for
/// [`low_rank_forward_add`]'s `y`, no other live tensor may share `dx`'s storage (not checked).
///
/// Errors: [`low_rank_backward`]'s, and `dx` or `mask` not `[n, in]`.
#[allow(clippy::type_complexity)]
pub(crate) fn low_rank_backward_add(
    h: &Tensor,
    segments: &[LowRankSegment],
    kept: &KeptUpdate,
    g: &Tensor,
    dx: Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let (n, in_dim) = h.dims2()?;
    if dx.dims2()? != (n, in_dim) || mask.is_some_and(|m| m.dims() != [n, in_dim]) {
        candle_core::bail!("low_rank_backward_add: dx {:?} and mask {:?} for h [{n}, {in_dim}]", dx.dims(), mask.map(|m| m.dims()));
    }
    let mask = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    let per_segment = match kept {
        KeptUpdate::Segments(u) => Some(u),
        KeptUpdate::Padded(_) => None,
    };
    let (Some(u), true, true) = (per_segment, in_place(&dx), h.device().is_cpu()) else {
        let (dh, dfactors) = low_rank_backward(h, segments, kept, g)?;
        let dh = match &mask {
            Some(m) => (dh * m)?,
            None => dh,
        };
        return Ok((super::add(&dx, &dh.to_dtype(dx.dtype())?)?, dfactors));
    };
    let g = checked_gradient(h, segments, u, g)?;
    let added = with_cpu_f32_mut(&dx, |dxv| {
        let into = SharedOut(dxv.as_mut_ptr());
        match &mask {
            Some(m) => with_cpu_f32(m, |mv| cpu_backward(h, segments, u, &g, into, Put::Add(Some(mv))))
                .expect("the mask made a contiguous f32 CPU tensor above"),
            None => cpu_backward(h, segments, u, &g, into, Put::Add(None)),
        }
    });
    let dfactors = added.expect("in_place checked a contiguous f32 CPU tensor")?;
    Ok((dx, dfactors))
}

/// `g` `[n, out]` in f32, contiguous, after checking that there is one `u` per segment and
/// that the segments cover the rows of `h` and `g`.
fn checked_gradient(h: &Tensor, segments: &[LowRankSegment], u: &[Option<Tensor>], g: &Tensor) -> Result<Tensor> {
    if u.len() != segments.len() {
        candle_core::bail!("segmented_low_rank_backward: {} u for {} segments", u.len(), segments.len());
    }
    let (lens, _) = lens_and_starts(segments);
    covers(&lens, h.dim(0)?, "segmented_low_rank_backward")?;
    covers(&lens, g.dim(0)?, "segmented_low_rank_backward")?;
    g.to_dtype(DType::F32)?.contiguous()
}

/// Segment `i`'s factors and kept `u`, `None` for a segment without factors; an error when
/// one is there without the other.
fn segment_with_u<'a>(
    segments: &'a [LowRankSegment],
    u: &'a [Option<Tensor>],
    i: usize,
) -> Result<Option<(&'a Tensor, &'a Tensor, &'a Tensor)>> {
    match (&segments[i].factors, &u[i]) {
        (Some((a, b)), Some(u)) => Ok(Some((a, b, u))),
        (None, None) => Ok(None),
        _ => candle_core::bail!("segmented_low_rank_backward: segment {i}'s u does not match its factors"),
    }
}

/// [`segmented_low_rank_backward`] on the CPU, for the output gradient `g` `[n, out]` (f32,
/// contiguous): each segment's `dh_s` into its rows of `dh` (`[n, in]`) by `put`, over
/// [`par_segments`]' threads; each factored segment's `(dA, dB)` returned in order.
fn cpu_backward(
    h: &Tensor,
    segments: &[LowRankSegment],
    u: &[Option<Tensor>],
    g: &Tensor,
    dh: SharedOut,
    put: Put,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (lens, starts) = lens_and_starts(segments);
    let h = h.contiguous()?;
    let ((_, in_dim), out) = (h.dims2()?, g.dim(1)?);
    let kernel = kernel_fits(&h, in_dim);
    let dfactors = with_cpu_f32_or(&h, |hv| {
        with_cpu_f32_or(g, |gv| {
            par_segments(&lens, |i| {
                let s = &segments[i];
                // SAFETY: segment i's rows of `dh` are written by this call alone (segments are
                // disjoint), and the callers hand `put` rows it may use.
                unsafe {
                    put_rows(&dh, put, starts[i], s.len, in_dim, |dhs| {
                        let Some((a, b, u)) = segment_with_u(segments, u, i)? else {
                            dhs.fill(0.0);
                            return Ok(None);
                        };
                        if let (true, true, Some(hv), Some(gv)) = (kernel, segment_fits(a, b), hv, gv) {
                            let rows = starts[i]..starts[i] + s.len;
                            let (hs, gs) = (&hv[rows.start * in_dim..rows.end * in_dim], &gv[rows.start * out..rows.end * out]);
                            if let Some((da, db)) = kernel_segment_backward(hs, gs, a, b, u, s.scale, dhs)? {
                                let r = a.dim(0)?;
                                return Ok(Some((
                                    Tensor::from_vec(da, (r, in_dim), h.device())?,
                                    Tensor::from_vec(db, (out, r), h.device())?,
                                )));
                            }
                        }
                        let (hs, gs) = (rows_of(&h, hv, starts[i], s.len)?, rows_of(g, gv, starts[i], s.len)?);
                        let (dh_t, da, db) = segment_backward_tensors(&hs, &gs, a, b, u, s.scale)?;
                        copy_into(&dh_t, dhs)?;
                        Ok(Some((da, db)))
                    })
                }
            })
        })
    })?;
    Ok(dfactors.into_iter().flatten().collect())
}

/// One segment's gradients as tensors, the products where the factors lie: `(dh_s, dA, dB)`
/// for its rows `hs`, output gradient `gs` and scaled `u`.
fn segment_backward_tensors(hs: &Tensor, gs: &Tensor, a: &Tensor, b: &Tensor, u: &Tensor, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let du = mm(gs, b, false, false, scale)?;
    Ok((mm(&du, a, false, false, 1.0)?, mm(&du, hs, true, false, 1.0)?, mm(gs, u, true, false, 1.0)?))
}

/// Whether the f32 kernel can take products with a `[.., width]` operand of `t` and an
/// output `width` wide: an AVX-512 CPU, `t` f32 on the CPU, the width a multiple of 16.
fn kernel_fits(t: &Tensor, width: usize) -> bool {
    sgemm::available() && t.device().is_cpu() && t.dtype() == DType::F32 && width.is_multiple_of(16)
}

/// Whether a segment's factors (`A` `[r, in]`, `B` `[out, r]`) take the kernel path: f32 on
/// the CPU, the rank a multiple of 16 (16, 32, 48, 64: LoRA's usual ranks).
fn segment_fits(a: &Tensor, b: &Tensor) -> bool {
    [a, b].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32) && a.dim(0).is_ok_and(|r| r.is_multiple_of(16))
}

/// `f` on `t`'s f32 values where it is a contiguous f32 CPU tensor, on `None` otherwise.
fn with_cpu_f32_or<R>(t: &Tensor, f: impl FnOnce(Option<&[f32]>) -> R) -> R {
    let mut f = Some(f);
    match with_cpu_f32(t, |v| (f.take().expect("called once"))(Some(v))) {
        Some(r) => r,
        None => (f.take().expect("not called"))(None),
    }
}

/// A CPU tensor's values, in f32, into `dst`, which holds exactly as many.
fn copy_into(t: &Tensor, dst: &mut [f32]) -> Result<()> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    with_cpu_f32(&t, |v| dst.copy_from_slice(v)).ok_or_else(|| candle_core::Error::Msg(format!("copy_into: a {:?} tensor", t.device())))
}

/// One segment's training forward on the f32 kernel: `u = scale · h_s Aᵀ` `[len, r]`
/// (returned) and `y_s = u Bᵀ` written into `ys` `[len, out]`. `None` (nothing written) where
/// the kernel cannot take a product (a factor not a contiguous f32 CPU tensor, a zero
/// dimension).
fn kernel_segment_forward(hs: &[f32], a: &Tensor, b: &Tensor, scale: f64, ys: &mut [f32]) -> Result<Option<Vec<f32>>> {
    let ((r, in_dim), (out, _)) = (a.dims2()?, b.dims2()?);
    let len = hs.len() / in_dim;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let done = with_cpu_f32(&a, |av| {
        with_cpu_f32(&b, |bv| {
            let mut u = sgemm::matmul_plain(hs, len, &transpose(av, r, in_dim), in_dim, r, blas::threads())?;
            if scale != 1.0 {
                u.iter_mut().for_each(|v| *v *= scale as f32);
            }
            sgemm::matmul_plain_into(&u, len, &transpose(bv, out, r), r, out, blas::threads(), ys)?;
            Some(u)
        })
    });
    Ok(done.flatten().flatten())
}

/// One segment's training backward on the f32 kernel, for its rows `hs` `[len, in]` and
/// output gradient `gs` `[len, out]`: `(dA, dB)` returned, `dh_s` written into `dhs`.
/// `None` (nothing written) when a factor or `u` is not a contiguous f32 CPU tensor.
#[allow(clippy::type_complexity)]
fn kernel_segment_backward(
    hs: &[f32],
    gs: &[f32],
    a: &Tensor,
    b: &Tensor,
    u: &Tensor,
    scale: f64,
    dhs: &mut [f32],
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let ((r, in_dim), (out, _)) = (a.dims2()?, b.dims2()?);
    let len = hs.len() / in_dim;
    let (a, b, u) = (a.contiguous()?, b.contiguous()?, u.contiguous()?);
    let done = with_cpu_f32(&a, |av| {
        with_cpu_f32(&b, |bv| {
            with_cpu_f32(&u, |uv| {
                // du = scale · g_s B  [len, r]
                let mut du = sgemm::matmul_plain(gs, len, bv, out, r, blas::threads())?;
                if scale != 1.0 {
                    du.iter_mut().for_each(|v| *v *= scale as f32);
                }
                // dA = duᵀ h_s  [r, in];  dB = g_sᵀ u  [out, r];  dh_s = du A  [len, in]
                let da = sgemm::matmul_plain(&transpose(&du, len, r), r, hs, len, in_dim, blas::threads())?;
                let db = sgemm::matmul_plain(&transpose(gs, len, out), out, uv, len, r, blas::threads())?;
                sgemm::matmul_plain_into(&du, len, av, r, in_dim, blas::threads(), dhs)?;
                Some((da, db))
            })
        })
    });
    Ok(done.flatten().flatten().flatten())
}

/// An error unless the segments' `lens` add up to the `rows` of the input: the outputs are
/// filled segment by segment, so a row no segment covers would be left unwritten.
fn covers(lens: &[usize], rows: usize, op: &str) -> Result<()> {
    let covered: usize = lens.iter().sum();
    if covered != rows {
        candle_core::bail!("{op}: segments cover {covered} rows of {rows}");
    }
    Ok(())
}

/// Each segment's rows and first row.
fn lens_and_starts(segments: &[LowRankSegment]) -> (Vec<usize>, Vec<usize>) {
    let lens: Vec<usize> = segments.iter().map(|s| s.len).collect();
    let starts = lens.iter().scan(0, |next, &len| Some(std::mem::replace(next, *next + len))).collect();
    (lens, starts)
}

/// `scale · op(a) @ op(b)` for 2-D f32 tensors, `op` transposing when asked. On an AVX-512
/// CPU, with the output's width a multiple of 16 (ranks 16-64, every projection's width), the
/// f32 kernel ([`sgemm::matmul_plain`]) computes it, a transposed operand copied into place
/// first (a sequence's rows × the projection's width, or a factor); otherwise [`bmm`]
/// (OpenBLAS or candle).
///
/// Why: these products are small (a sequence's ~34 rows × 576 × rank 16-64, a few hundred
/// thousand to a million multiply-adds, thousands of them a grouped pass), and OpenBLAS packs
/// both operands of each and wakes its second thread for any above 2^18 multiply-adds;
/// the kernel runs them on the calling thread, unpacked. The scale is applied in place, not
/// as a candle op (whose worker pool the threads of [`par_segments`] would queue for).
fn mm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, scale: f64) -> Result<Tensor> {
    let ((ar, ac), (br, bc)) = (a.dims2()?, b.dims2()?);
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if trans_b { (bc, br) } else { (br, bc) };
    let fits = sgemm::available() && a.device().is_cpu() && b.device().is_cpu() && (a.dtype(), b.dtype()) == (DType::F32, DType::F32);
    if fits && n.is_multiple_of(16) && m > 0 && k > 0 && n > 0 && k == kb {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let y = with_cpu_f32(&a, |av| {
            with_cpu_f32(&b, |bv| {
                let av = if trans_a { Cow::Owned(transpose(av, ar, ac)) } else { Cow::Borrowed(av) };
                let bv = if trans_b { Cow::Owned(transpose(bv, br, bc)) } else { Cow::Borrowed(bv) };
                sgemm::matmul_plain(&av, m, &bv, k, n, blas::threads())
            })
        });
        if let Some(mut y) = y.flatten().flatten() {
            if scale != 1.0 {
                y.iter_mut().for_each(|v| *v *= scale as f32);
            }
            return Tensor::from_vec(y, (m, n), a.device());
        }
    }
    scaled(bmm(a, b, trans_a, trans_b)?, scale)
}

/// `scale · y`, `y` itself when the scale is 1.
fn scaled(y: Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

/// Row-major `[rows, cols]` as row-major `[cols, rows]`, in 16 × 16 tiles: full tiles
/// transposed in AVX-512 registers ([`transpose16`]) where the CPU has them, the edges (and
/// every tile elsewhere) value by value. Written into memory not zeroed first.
///
/// Why by hand: candle's strided copy computes an index per element, and was slower than the
/// products it fed; value by value, the transposes of a grouped pass's factors and gradients
/// still took ~7% of its low-rank updates' samples.
pub(super) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    assert_eq!(v.len(), rows * cols, "{} values are not {rows} x {cols}", v.len());
    let mut out: Vec<f32> = Vec::with_capacity(rows * cols);
    let o = out.as_mut_ptr();
    let registers = sgemm::available();
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            let (ti, tj) = (T.min(rows - i0), T.min(cols - j0));
            if registers && ti == T && tj == T {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F is present; the tile's 16 rows of 16 values lie within `v`
                // (i0 + 16 <= rows, j0 + 16 <= cols) and its 16 output rows within `out`'s
                // capacity.
                unsafe {
                    transpose16(v.as_ptr().add(i0 * cols + j0), cols, o.add(j0 * rows + i0), rows)
                };
                continue;
            }
            for i in i0..i0 + ti {
                for (j, x) in v[i * cols + j0..i * cols + j0 + tj].iter().enumerate() {
                    // SAFETY: (j0 + j) * rows + i < cols * rows, the capacity.
                    unsafe { o.add((j0 + j) * rows + i).write(*x) };
                }
            }
        }
    }
    // SAFETY: the tiles cover every (i, j), so all rows × cols values were written.
    unsafe { out.set_len(rows * cols) };
    out
}

/// Row `c` of `dst` (16 values, rows `ldd` apart) = column `c` of the 16 × 16 block at `src`
/// (rows `lds` apart): the rows interleaved in pairs (`unpack`), then in fours within each
/// 128-bit lane (`shuffle_ps`), then the lanes gathered in two rounds (`shuffle_f32x4`).
///
/// # Safety
/// AVX-512F; 16 rows of 16 readable values at `src` and writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * lds)));
    // t[2k], t[2k+1]: rows 2k and 2k+1 interleaved, each lane L holding columns 4L, 4L+1
    // (t[2k]) or 4L+2, 4L+3 (t[2k+1])
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g..4g+4
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(a0, b0);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a0, b0);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(a1, b1);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(a1, b1);
    }
    // column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    for c in 0..4 {
        let (v02, w02) = (_mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]), _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]));
        let (v13, w13) = (_mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]), _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]));
        _mm512_storeu_ps(dst.add(c * ldd), _mm512_shuffle_f32x4::<0x88>(v02, w02));
        _mm512_storeu_ps(dst.add((8 + c) * ldd), _mm512_shuffle_f32x4::<0xDD>(v02, w02));
        _mm512_storeu_ps(dst.add((4 + c) * ldd), _mm512_shuffle_f32x4::<0x88>(v13, w13));
        _mm512_storeu_ps(dst.add((12 + c) * ldd), _mm512_shuffle_f32x4::<0xDD>(v13, w13));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The padded batch that a GPU pass takes ([`padded_forward`], [`padded_backward`]), run
    /// here on the CPU, against each segment alone: segments of different lengths, ranks
    /// (padded to the largest with zeros) and scales give each its own value, input gradient
    /// and factor gradients at its own rank; the padding rows reach none of them.
    #[test]
    fn padded_segments_update_as_each_alone() {
        let dev = Device::Cpu;
        let (n, in_dim, out) = (40, 24, 20);
        let h = Tensor::randn(0f32, 1.0, (n, in_dim), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let factor = |r: usize| (Tensor::randn(0f32, 1.0, (r, in_dim), &dev).unwrap(), Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap());
        // (rows, rank, scale): the longest segment is not the first, nor the highest rank
        let shapes = [(7, 8, 2.0), (1, 4, 0.5), (19, 16, 1.25), (13, 2, 3.0)];
        let segments: Vec<LowRankSegment> =
            shapes.iter().map(|&(len, r, scale)| LowRankSegment { len, factors: Some(factor(r)), scale }).collect();
        let (y, p) = padded_forward(&h, &segments).unwrap();
        let (dh, dfactors) = padded_backward(&p, &h, &g).unwrap();
        assert_eq!((y.dims(), dh.dims(), dfactors.len()), (&[n, out][..], &[n, in_dim][..], 4));
        let mut start = 0;
        for (i, s) in segments.iter().enumerate() {
            let (a, b) = s.factors.as_ref().unwrap();
            let (hs, gs) = (h.narrow(0, start, s.len).unwrap(), g.narrow(0, start, s.len).unwrap());
            // alone, composed of candle's ops in f32
            let u = (hs.matmul(&a.t().unwrap()).unwrap() * s.scale).unwrap();
            let du = (gs.matmul(b).unwrap() * s.scale).unwrap();
            close(&y.narrow(0, start, s.len).unwrap(), &u.matmul(&b.t().unwrap()).unwrap(), 1e-5);
            close(&dh.narrow(0, start, s.len).unwrap(), &du.matmul(a).unwrap(), 1e-5);
            let (da, db) = &dfactors[i];
            assert_eq!((da.dims(), db.dims()), (a.dims(), b.dims()), "segment {i}'s gradients at its own rank");
            close(da, &du.t().unwrap().matmul(&hs).unwrap(), 1e-5);
            close(db, &gs.t().unwrap().matmul(&u).unwrap(), 1e-5);
            start += s.len;
        }
        // through the kept state: the same gradients, and another pass's segments refused
        let kept = KeptUpdate::Padded(p);
        let (dh2, _) = low_rank_backward(&h, &segments, &kept, &g).unwrap();
        assert_eq!(max_diff(&dh2, &dh), 0.0);
        assert!(low_rank_backward(&h, &segments[..3], &kept, &g).is_err(), "three segments for a pass of four");
        let err = low_rank_backward(&h, &segments, &kept, &g.narrow(0, 0, 30).unwrap()).unwrap_err().to_string();
        assert!(err.contains("for 40 rows"), "g of 30 rows for 40: {err}");
        let err = low_rank_backward(&h.narrow(0, 0, 30).unwrap(), &segments, &kept, &g).unwrap_err().to_string();
        assert!(err.contains("for 40 rows"), "h of 30 rows for 40: {err}");
        let mut moved = segments.clone();
        (moved[0].len, moved[2].len) = (8, 18);
        let err = low_rank_backward(&h, &moved, &kept, &g).unwrap_err().to_string();
        assert!(err.contains("rows [7, 1, 19, 13]"), "the same rows split otherwise: {err}");
        let mut ranked = segments.clone();
        ranked[3].factors = Some(factor(4));
        let err = low_rank_backward(&h, &ranked, &kept, &g).unwrap_err().to_string();
        assert!(err.contains("ranks [8, 4, 16, 2]"), "another rank: {err}");
        // a segment without factors cannot be padded, nor an empty one, and one alone is not
        let mut bare = segments.clone();
        bare[1].factors = None;
        assert!(padded_forward(&h, &bare).unwrap_err().to_string().contains("segment 1 has no factors"));
        let mut empty = segments.clone();
        empty[2].len = 0;
        assert!(paddable(&segments) && paddable(&segments[1..3]));
        assert!(!paddable(&bare) && !paddable(&empty) && !paddable(&segments[..1]) && !paddable(&[]));
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// `a` equals `b` within `tol` relative to `b`'s largest magnitude (absolute below 1):
    /// random inputs give values of tens to hundreds, where an absolute bound is flaky.
    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let largest: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(max_diff(a, b) <= tol * largest.max(1.0), "{} of {largest}", max_diff(a, b));
    }

    /// The reference: `scale · (h Aᵀ) Bᵀ` of `rows` (first, count) composed of candle's ops.
    fn composed(h: &Var, rows: (usize, usize), a: &Var, b: &Var, scale: f64) -> Tensor {
        let u = h.narrow(0, rows.0, rows.1).unwrap().matmul(&a.t().unwrap()).unwrap();
        (u.matmul(&b.t().unwrap()).unwrap() * scale).unwrap()
    }

    /// Each segment takes the path of its own rank, bit for bit (on AVX-512): rank 16 the
    /// kernel's, `(scale · h Aᵀ) Bᵀ` with `u` scaled first; rank 8 the tensor path's,
    /// `scale · (h Aᵀ) Bᵀ`. Scales 1.7 and 0.3 round differently on the two paths.
    #[test]
    fn each_segment_takes_the_path_of_its_rank() {
        if !sgemm::available() {
            return;
        }
        let dev = Device::Cpu;
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let randn = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (h, g) = (randn((20, 48)), randn((20, 32)));
        let (a16, b16, a8, b8) = (randn((16, 48)), randn((32, 16)), randn((8, 48)), randn((32, 8)));
        let segments = [
            LowRankSegment { len: 12, factors: Some((a16.clone(), b16.clone())), scale: 1.7 },
            LowRankSegment { len: 8, factors: Some((a8.clone(), b8.clone())), scale: 0.3 },
        ];
        let (y, u) = segmented_low_rank_forward(&h, &segments, 32, Products::Kernel).unwrap();
        let (hv, gv, a16v, b16v) = (v(&h), v(&g), v(&a16), v(&b16));
        let mut u16 = sgemm::matmul_plain(&hv[..12 * 48], 12, &transpose(&a16v, 16, 48), 48, 16, 1).unwrap();
        u16.iter_mut().for_each(|x| *x *= 1.7);
        assert_eq!(v(u[0].as_ref().unwrap()), u16);
        let y16 = sgemm::matmul_plain(&u16, 12, &transpose(&b16v, 32, 16), 16, 32, 1).unwrap();
        assert_eq!(v(&y.narrow(0, 0, 12).unwrap()), y16);
        let h8 = h.narrow(0, 12, 8).unwrap();
        let y8 = mm(&mm(&h8, &a8, false, true, 1.0).unwrap(), &b8, false, true, 0.3).unwrap();
        assert_eq!(v(&y.narrow(0, 12, 8).unwrap()), v(&y8));
        // the backward of rank 16: du = scale · g B, dh = du A, dA = duᵀ h, dB = gᵀ u
        let (dh, dfactors) = segmented_low_rank_backward(&h, &segments, &u, &g).unwrap();
        let mut du = sgemm::matmul_plain(&gv[..12 * 32], 12, &b16v, 32, 16, 1).unwrap();
        du.iter_mut().for_each(|x| *x *= 1.7);
        assert_eq!(v(&dh.narrow(0, 0, 12).unwrap()), sgemm::matmul_plain(&du, 12, &a16v, 16, 48, 1).unwrap());
        assert_eq!(v(&dfactors[0].0), sgemm::matmul_plain(&transpose(&du, 12, 16), 16, &hv[..12 * 48], 12, 48, 1).unwrap());
        assert_eq!(v(&dfactors[0].1), sgemm::matmul_plain(&transpose(&gv[..12 * 32], 12, 32), 32, &u16, 12, 16, 1).unwrap());
    }

    /// The transpose against its definition, over shapes with full 16 × 16 tiles (in
    /// registers on AVX-512), partial ones at both edges, and fewer than 16 rows or columns.
    #[test]
    fn transpose_moves_every_value() {
        for (rows, cols) in [(16, 16), (32, 576), (34, 192), (576, 48), (7, 40), (40, 7), (1, 1), (17, 33)] {
            let v: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let t = transpose(&v, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(t[j * rows + i], v[i * cols + j], "{rows} x {cols} at ({i}, {j})");
                }
            }
        }
    }

    /// [`segmented_low_rank_pass`] gives the autograd op's value and gradients bit for bit
    /// (the same forward and backward, without the graph), ranks 16 and 8 and a segment
    /// without factors; bad shapes are refused.
    #[test]
    fn a_pass_equals_the_op_and_its_backward() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1.0, (75, 48), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (75, 32), &dev).unwrap();
        let (a1, b1) = (Var::randn(0f32, 1.0, (16, 48), &dev).unwrap(), Var::randn(0f32, 1.0, (32, 16), &dev).unwrap());
        let (a2, b2) = (Var::randn(0f32, 1.0, (8, 48), &dev).unwrap(), Var::randn(0f32, 1.0, (32, 8), &dev).unwrap());
        let segments = [
            LowRankSegment { len: 41, factors: Some((a1.as_tensor().clone(), b1.as_tensor().clone())), scale: 1.7 },
            LowRankSegment { len: 4, factors: None, scale: 1.0 },
            LowRankSegment { len: 30, factors: Some((a2.as_tensor().clone(), b2.as_tensor().clone())), scale: 0.3 },
        ];
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let y = segmented_low_rank(h.as_tensor(), &segments).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (y2, dh, dfactors) = segmented_low_rank_pass(h.as_tensor(), &segments, &g).unwrap();
        assert_eq!(bits(&y2), bits(&y), "value");
        assert_eq!(bits(&dh), bits(grads.get(h.as_tensor()).unwrap()), "h's gradient");
        assert_eq!(dfactors.len(), 2);
        for ((da, db), (a, b)) in dfactors.iter().zip([(&a1, &b1), (&a2, &b2)]) {
            assert_eq!(bits(da), bits(grads.get(a.as_tensor()).unwrap()), "dA");
            assert_eq!(bits(db), bits(grads.get(b.as_tensor()).unwrap()), "dB");
        }
        assert!(segmented_low_rank_pass(h.as_tensor(), &segments, &g.narrow(1, 0, 16).unwrap()).is_err(), "g's width");
        assert!(segmented_low_rank_pass(&h.narrow(0, 0, 70).unwrap(), &segments, &g.narrow(0, 0, 70).unwrap()).is_err(), "rows");
    }

    /// Ranks and widths that are multiples of 16 take the f32 kernel on AVX-512 CPUs (all
    /// six products, as something trains): value and gradients against candle's composed
    /// products, 41 and 30 rows (partial register blocks; enough rows for the segments to run
    /// on two threads), ranks 16 and 32.
    #[test]
    fn kernel_sized_segments_equal_their_products_composed() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1.0, (71, 48), &dev).unwrap();
        let (a1, b1) = (Var::randn(0f32, 1.0, (16, 48), &dev).unwrap(), Var::randn(0f32, 1.0, (32, 16), &dev).unwrap());
        let (a2, b2) = (Var::randn(0f32, 1.0, (32, 48), &dev).unwrap(), Var::randn(0f32, 1.0, (32, 32), &dev).unwrap());
        let segments = [
            LowRankSegment { len: 41, factors: Some((a1.as_tensor().clone(), b1.as_tensor().clone())), scale: 2.0 },
            LowRankSegment { len: 30, factors: Some((a2.as_tensor().clone(), b2.as_tensor().clone())), scale: 0.5 },
        ];
        let y = segmented_low_rank(&h, &segments).unwrap();
        let y2 = Tensor::cat(&[composed(&h, (0, 41), &a1, &b1, 2.0), composed(&h, (41, 30), &a2, &b2, 0.5)], 0).unwrap();
        // values of magnitude ~50-100: float32 summation order alone
        assert!(max_diff(&y, &y2) < 1e-3, "{}", max_diff(&y, &y2));
        let vars = [h.as_tensor(), a1.as_tensor(), b1.as_tensor(), a2.as_tensor(), b2.as_tensor()];
        super::super::tests::same_gradients(&y, &y2, &vars, 1e-3);
    }

    /// The training forward ([`Products::Kernel`]) against the library's: the same values to
    /// float32 summation order, the `u` each keeps giving the same `dB` (the one gradient that
    /// reads it), and on AVX-512 a row's values independent of how many rows its segment has
    /// (bit for bit: a sequence alone and packed with others), at ranks 16 and 32 and at rank
    /// 8, whose `h Aᵀ` the kernel cannot take (its `u Bᵀ` it can).
    #[test]
    fn training_forward_on_the_kernel_equals_the_library() {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (71, 48), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (71, 32), &dev).unwrap();
        let factors = |r: usize| (Tensor::randn(0f32, 1.0, (r, 48), &dev).unwrap(), Tensor::randn(0f32, 1.0, (32, r), &dev).unwrap());
        let segments = [
            LowRankSegment { len: 30, factors: Some(factors(16)), scale: 2.0 },
            LowRankSegment { len: 5, factors: None, scale: 0.0 },
            LowRankSegment { len: 21, factors: Some(factors(32)), scale: 0.5 },
            LowRankSegment { len: 15, factors: Some(factors(8)), scale: 1.5 },
        ];
        // random values of up to a few hundred: float32 summation order, relative to the largest
        let close = |a: &Tensor, b: &Tensor| close(a, b, 1e-5);
        let (yk, uk) = segmented_low_rank_forward(&h, &segments, 32, Products::Kernel).unwrap();
        let (yl, ul) = segmented_low_rank_forward(&h, &segments, 32, Products::Library).unwrap();
        close(&yk, &yl);
        assert!(uk[1].is_none() && ul.iter().all(Option::is_none), "inference keeps no u");
        // the backward from the kernel's u and from u = scale · h Aᵀ composed of candle's ops
        let starts = [0, 30, 35, 56];
        let composed_u: Vec<Option<Tensor>> = segments
            .iter()
            .zip(starts)
            .map(|(s, start)| {
                s.factors.as_ref().map(|(a, _)| (h.narrow(0, start, s.len).unwrap().matmul(&a.t().unwrap()).unwrap() * s.scale).unwrap())
            })
            .collect();
        for (k, c) in uk.iter().zip(&composed_u) {
            if let (Some(k), Some(c)) = (k, c) {
                close(k, c);
            }
        }
        let (dhk, dfk) = segmented_low_rank_backward(&h, &segments, &uk, &g).unwrap();
        let (dhl, dfl) = segmented_low_rank_backward(&h, &segments, &composed_u, &g).unwrap();
        close(&dhk, &dhl);
        for ((dak, dbk), (dal, dbl)) in dfk.iter().zip(&dfl) {
            close(dak, dal);
            close(dbk, dbl);
        }
        // the first 7 rows of the 30-row segment, alone: the same bits (the kernel's promise;
        // without AVX-512 both paths are the library's, which promises no such thing)
        if sgemm::available() {
            let alone = [LowRankSegment { len: 7, ..segments[0].clone() }];
            let (y7, _) = segmented_low_rank_forward(&h.narrow(0, 0, 7).unwrap(), &alone, 32, Products::Kernel).unwrap();
            assert_eq!(max_diff(&y7, &yk.narrow(0, 0, 7).unwrap()), 0.0);
        }
        // a u that does not match the segments is an error, not a wrong gradient or a panic
        let e = segmented_low_rank_backward(&h, &segments, &[None, None, None, None], &g).unwrap_err();
        assert!(e.to_string().contains("segment 0's u"), "{e}");
        let e = segmented_low_rank_backward(&h, &segments, &[], &g).unwrap_err();
        assert!(e.to_string().contains("0 u for 4 segments"), "{e}");
        // segments that do not cover the rows are an error, not rows left unwritten or
        // written past the end
        for lens in [[30, 5, 21, 14], [30, 5, 21, 16]] {
            let off: Vec<LowRankSegment> = segments.iter().zip(lens).map(|(s, len)| LowRankSegment { len, ..s.clone() }).collect();
            let e = segmented_low_rank_forward(&h, &off, 32, Products::Kernel).unwrap_err();
            assert!(e.to_string().contains("segments cover"), "{e}");
            let e = segmented_low_rank_backward(&h, &off, &uk, &g).unwrap_err();
            assert!(e.to_string().contains("segments cover"), "{e}");
        }
    }

    /// The updates added in place ([`low_rank_forward_add`], [`low_rank_backward_add`]) equal
    /// the update computed whole and then added ([`super::super::add`]), with the mask's
    /// product first in the backward, bit for bit: segments on the kernel (ranks 16 and 32),
    /// off it (rank 8's `h Aᵀ`), without factors (adding zeros turns a `-0.0` into `0.0`, as
    /// the add did), 71 rows (split over two threads where the build has two); with and without a dropout mask, for
    /// training's products and inference's. Views that cannot be written in place (a
    /// transposed `y`) take the add and get the same values; bad shapes are refused.
    #[test]
    fn updates_added_in_place_equal_the_update_then_the_add() {
        let dev = Device::Cpu;
        let (n, in_dim, out) = (71, 48, 32);
        let h = Tensor::randn(0f32, 1.0, (n, in_dim), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let factors = |r: usize| (Tensor::randn(0f32, 1.0, (r, in_dim), &dev).unwrap(), Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap());
        let segments = [
            LowRankSegment { len: 30, factors: Some(factors(16)), scale: 2.0 },
            LowRankSegment { len: 5, factors: None, scale: 0.0 },
            LowRankSegment { len: 21, factors: Some(factors(32)), scale: 0.5 },
            LowRankSegment { len: 15, factors: Some(factors(8)), scale: 1.5 },
        ];
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // the frozen products' stand-ins, a negative zero in the rows without factors
        let with_negative_zero = |t: Tensor| {
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[31 * t.dim(1).unwrap()] = -0.0;
            Tensor::from_vec(v, t.dims(), &dev).unwrap()
        };
        let y0 = with_negative_zero(Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap());
        let dx0 = with_negative_zero(Tensor::randn(0f32, 1.0, (n, in_dim), &dev).unwrap());
        let mask = (Tensor::rand(0f32, 1.0, (n, in_dim), &dev).unwrap().ge(0.3).unwrap().to_dtype(DType::F32).unwrap() / 0.7).unwrap();
        for products in [Products::Kernel, Products::Library] {
            let (delta, kept) = low_rank_forward(&h, &segments, out, products).unwrap();
            let expected = super::super::add(&y0, &delta).unwrap();
            let y_in = y0.copy().unwrap();
            let (y, kept_add) = low_rank_forward_add(&h, &segments, y_in.clone(), products).unwrap();
            assert_eq!(bits(&y), bits(&expected), "{products:?}: forward");
            assert_eq!(bits(&y_in), bits(&y), "{products:?}: written in place, into the storage handed over");
            let zeros_added: Vec<u32> =
                bits(&y0.narrow(0, 30, 5).unwrap()).into_iter().map(|b| (f32::from_bits(b) + 0.0).to_bits()).collect();
            assert_eq!(bits(&y.narrow(0, 30, 5).unwrap()), zeros_added, "zeros added");
            assert!(zeros_added.contains(&0) && bits(&y0).contains(&(-0f32).to_bits()), "the negative zero is there and made positive");
            if products == Products::Library {
                continue;
            }
            let (KeptUpdate::Segments(u), KeptUpdate::Segments(u_add)) = (&kept, &kept_add) else { panic!("the CPU keeps segments") };
            for (a, b) in u.iter().zip(u_add) {
                assert_eq!(a.as_ref().map(bits), b.as_ref().map(bits), "the kept u");
            }
            for m in [None, Some(&mask)] {
                let (dh, dfactors) = low_rank_backward(&h, &segments, &kept, &g).unwrap();
                let dh = match m {
                    Some(m) => (dh * m).unwrap(),
                    None => dh,
                };
                let expected = super::super::add(&dx0, &dh).unwrap();
                let dx_in = dx0.copy().unwrap();
                let (dx, dfactors_add) = low_rank_backward_add(&h, &segments, &kept, &g, dx_in.clone(), m).unwrap();
                assert_eq!(bits(&dx), bits(&expected), "backward, mask {}", m.is_some());
                assert_eq!(bits(&dx_in), bits(&dx), "backward written in place");
                assert_eq!(dfactors.len(), dfactors_add.len());
                for ((da, db), (da2, db2)) in dfactors.iter().zip(&dfactors_add) {
                    assert_eq!((bits(da), bits(db)), (bits(da2), bits(db2)), "factor gradients");
                }
            }
        }
        // a view that is not contiguous takes the add, with the same values
        let (y, _) = low_rank_forward_add(&h, &segments, y0.t().unwrap().copy().unwrap().t().unwrap(), Products::Kernel).unwrap();
        let (delta, kept) = low_rank_forward(&h, &segments, out, Products::Kernel).unwrap();
        assert_eq!(bits(&y), bits(&super::super::add(&y0, &delta).unwrap()), "a transposed y");
        // shapes that do not match are errors, not rows left out or written past the end
        let e = low_rank_forward_add(&h, &segments, y0.narrow(0, 0, 70).unwrap().copy().unwrap(), Products::Kernel).unwrap_err();
        assert!(e.to_string().contains("low_rank_forward_add"), "{e}");
        let e = low_rank_forward_add(&h, &segments, y0.narrow(1, 0, 16).unwrap().copy().unwrap(), Products::Kernel).unwrap_err();
        assert!(e.to_string().contains("low_rank_forward_add"), "{e}");
        let e = low_rank_backward_add(&h, &segments, &kept, &g, dx0.narrow(1, 0, 32).unwrap().copy().unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("low_rank_backward_add"), "{e}");
        let e = low_rank_backward_add(&h, &segments, &kept, &g, dx0.copy().unwrap(), Some(&mask.narrow(0, 0, 70).unwrap())).unwrap_err();
        assert!(e.to_string().contains("low_rank_backward_add"), "{e}");
    }

    /// Three segments (rank 2, no update, rank 3) against the same products composed of
    /// candle's own narrow, matmul and cat: value and the gradients of h, both A and both B.
    #[test]
    fn segments_equal_their_products_composed() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1.0, (9, 6), &dev).unwrap();
        let (a1, b1) = (Var::randn(0f32, 1.0, (2, 6), &dev).unwrap(), Var::randn(0f32, 1.0, (4, 2), &dev).unwrap());
        let (a2, b2) = (Var::randn(0f32, 1.0, (3, 6), &dev).unwrap(), Var::randn(0f32, 1.0, (4, 3), &dev).unwrap());
        let segment = |len, factors: Option<(&Var, &Var)>, scale| LowRankSegment {
            len,
            factors: factors.map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone())),
            scale,
        };
        let segments = [segment(4, Some((&a1, &b1)), 0.5), segment(2, None, 0.0), segment(3, Some((&a2, &b2)), 3.0)];
        let y = segmented_low_rank(&h, &segments).unwrap();
        let zeros = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let y2 = Tensor::cat(&[composed(&h, (0, 4), &a1, &b1, 0.5), zeros.clone(), composed(&h, (6, 3), &a2, &b2, 3.0)], 0).unwrap();
        // random values up to ~30: float32 summation order, relative to the largest
        close(&y, &y2, 1e-6);
        assert_eq!(max_diff(&y.narrow(0, 4, 2).unwrap(), &zeros), 0.0);
        let vars = [h.as_tensor(), a1.as_tensor(), b1.as_tensor(), a2.as_tensor(), b2.as_tensor()];
        super::super::tests::same_gradients(&y, &y2, &vars, 1e-4);
        // the rows of the segment without an update get no gradient through it
        let g1 = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g1.get(&h).unwrap().narrow(0, 4, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // without anything to differentiate, no graph and the same value (ranks 2 and 3 and
        // width 4 are the library's products whether or not something trains)
        let frozen: Vec<LowRankSegment> = segments
            .iter()
            .map(|s| LowRankSegment { factors: s.factors.as_ref().map(|(a, b)| (a.detach(), b.detach())), ..s.clone() })
            .collect();
        let y3 = segmented_low_rank(&h.detach(), &frozen).unwrap();
        assert!(!y3.track_op());
        assert_eq!(max_diff(&y, &y3), 0.0);
        // a factor that alone tracks a gradient (a frozen A, a trained B) still gets it
        let b3 = Var::randn(0f32, 1.0, (4, 2), &dev).unwrap();
        let half = [LowRankSegment { len: 9, factors: Some((a1.detach(), b3.as_tensor().clone())), scale: 1.0 }];
        let g3 = segmented_low_rank(&h.detach(), &half).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g3.get(&b3).is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0));
        // segments must cover the rows, with factors that fit h and each other
        let bad = |s: &[LowRankSegment]| segmented_low_rank(&h, s).is_err_and(|e| e.to_string().contains("segmented_low_rank: "));
        assert!(bad(&segments[..2]), "rows left over");
        assert!(bad(&[segment(4, Some((&a1, &b1)), 1.0), segment(6, None, 0.0)]), "too many rows");
        assert!(bad(&[segment(4, Some((&a1, &b1)), 1.0), segment(5, Some((&a2, &b1)), 1.0)]), "A and B of different ranks");
        assert!(bad(&[segment(9, Some((&b1, &a1)), 1.0)]), "A's width");
        let b_wide = Var::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        assert!(bad(&[segment(4, Some((&a1, &b1)), 1.0), segment(5, Some((&a2, &b_wide)), 1.0)]), "two output widths");
        assert!(bad(&[segment(9, None, 0.0)]), "no factors at all");
    }
}

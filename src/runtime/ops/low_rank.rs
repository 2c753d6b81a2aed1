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

use super::{bmm, par_segments, with_cpu_f32, Backward3, Result, Tap};
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
/// order. Returns `[n, out]` in f32; every segment's value is computed from its own factors
/// at its own shapes, as it would be alone. Differentiable with respect to `h` and every
/// factor (`h`'s gradient in `h`'s dtype), its products then those of training
/// (`Products::Kernel`); when nothing tracks a gradient (inference), no graph is recorded
/// and the library computes the products with the factors where they lie
/// (`Products::Library`).
///
/// Errors: segments that do not cover the rows of `h`, factors whose shapes disagree with
/// `h` or with each other, or no segment with factors.
pub fn segmented_low_rank(h: &Tensor, segments: &[LowRankSegment]) -> Result<Tensor> {
    let (n, in_dim) = h.dims2()?;
    let Some(out) = segments.iter().find_map(|s| s.factors.as_ref().map(|(_, b)| b.dim(0))).transpose()? else {
        candle_core::bail!("segmented_low_rank: no segment has factors");
    };
    let rows: usize = segments.iter().map(|s| s.len).sum();
    if rows != n {
        candle_core::bail!("segmented_low_rank: segments cover {rows} rows of {n}");
    }
    for (i, s) in segments.iter().enumerate() {
        if let Some((a, b)) = &s.factors {
            let r = a.dim(0)?;
            if a.dims2()? != (r, in_dim) || b.dims2()? != (out, r) {
                candle_core::bail!(
                    "segmented_low_rank: segment {i} has A {:?} and B {:?}, expected [r, {in_dim}] and [{out}, r]",
                    a.dims(),
                    b.dims()
                );
            }
        }
    }
    let h_dtype = h.dtype();
    let hd = h.detach().to_dtype(DType::F32)?;
    let factored: Vec<&(Tensor, Tensor)> = segments.iter().filter_map(|s| s.factors.as_ref()).collect();
    if !(h.track_op() || factored.iter().any(|(a, b)| a.track_op() || b.track_op())) {
        return Ok(segmented_low_rank_forward(&hd, segments, out, Products::Library)?.0);
    }
    // something trains: the products of a training pass (as the decoder's own layer node)
    let (value, u) = segmented_low_rank_forward(&hd, segments, out, Products::Kernel)?;
    // the graph sees all factors as two inputs: A stacked by rows [Σ r, in], B side by
    // side [out, Σ r]
    let a_all = Tensor::cat(&factored.iter().map(|(a, _)| a).collect::<Vec<_>>(), 0)?;
    let b_all = Tensor::cat(&factored.iter().map(|(_, b)| b).collect::<Vec<_>>(), 1)?;
    let detached: Vec<LowRankSegment> = segments
        .iter()
        .map(|s| LowRankSegment { factors: s.factors.as_ref().map(|(a, b)| (a.detach(), b.detach())), ..s.clone() })
        .collect();
    let backward: Backward3 = Box::new(move |g| {
        let (dh, dfactors) = segmented_low_rank_backward(&hd, &detached, &u, g)?;
        let (da, db): (Vec<Tensor>, Vec<Tensor>) = dfactors.into_iter().unzip();
        Ok((dh.to_dtype(h_dtype)?, Tensor::cat(&da, 0)?, Tensor::cat(&db, 1)?))
    });
    h.apply_op3(&a_all, &b_all, Tap::new("segmented-low-rank", value, backward))
}

/// Which code computes a low-rank forward's two products, `h Aᵀ` and `u Bᵀ`.
///
/// The choice is the caller's (training or inference), never the shape's: a choice made on
/// the row count would make a generated row's numbers depend on how many rows of its adapter
/// share the batch, and a trained sequence's on whether it trains alone or in a group. (The
/// library's own small-matrix kernels still depend on the shape; for generation, exactness
/// across batch compositions rests on `tests/grouped.rs`, see the README.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Products {
    /// OpenBLAS (or candle) with the factors where they lie: inference, where a decoding
    /// step has a few rows per adapter and transposing a factor would cost more than its
    /// product.
    Library,
    /// The f32 kernel ([`sgemm::matmul_plain`]) for each product whose output width is a
    /// multiple of 16 (`h Aᵀ` at ranks 16, 32, 48, ...; `u Bᵀ` at every projection's width),
    /// each factor transposed per call (`[r, in]` and `[out, r]`, small beside a sequence's
    /// product with them): training passes, tens of rows per segment and factors that change
    /// every step. Other widths, other dtypes and CPUs without AVX-512 take the library.
    Kernel,
}

/// [`segmented_low_rank`]'s value for `h` `[n, in]` in f32 (segments already checked),
/// `[n, out]`: u = h_s A_sᵀ `[len, r]`, y_s = scale · u B_sᵀ `[len, out]`. Also returns each
/// factored segment's `u` (unscaled, `None` for a segment without factors), which
/// [`segmented_low_rank_backward`] needs.
pub(crate) fn segmented_low_rank_forward(
    h: &Tensor,
    segments: &[LowRankSegment],
    out: usize,
    products: Products,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let (lens, starts) = lens_and_starts(segments);
    let product = |a: &Tensor, b: &Tensor, scale: f64| match products {
        Products::Library => scaled(bmm(a, b, false, true)?, scale),
        Products::Kernel => mm(a, b, false, true, scale),
    };
    let parts = par_segments(&lens, |i| {
        let s = &segments[i];
        match &s.factors {
            None => Ok((Tensor::zeros((s.len, out), DType::F32, h.device())?, None)),
            Some((a, b)) => {
                let u = product(&h.narrow(0, starts[i], s.len)?, a, 1.0)?;
                Ok((product(&u, b, s.scale)?, Some(u)))
            }
        }
    })?;
    let (ys, us): (Vec<Tensor>, Vec<Option<Tensor>>) = parts.into_iter().unzip();
    Ok((Tensor::cat(&ys, 0)?, us))
}

/// [`segmented_low_rank`]'s gradients for output gradient `g` `[n, out]`, given each
/// segment's `u` from [`segmented_low_rank_forward`]: `h`'s `[n, in]` in f32, and `(dA, dB)`
/// of each segment that has factors, in order: dB_s = scale · dy_sᵀ u, du = scale · dy_s B_s,
/// dA_s = duᵀ h_s, dh_s = du A_s (the scale applied to the small `[len, r]` and `[out, r]`
/// results, not to `dy`).
pub(crate) fn segmented_low_rank_backward(
    h: &Tensor,
    segments: &[LowRankSegment],
    u: &[Option<Tensor>],
    g: &Tensor,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    if u.len() != segments.len() {
        candle_core::bail!("segmented_low_rank_backward: {} u for {} segments", u.len(), segments.len());
    }
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let in_dim = h.dim(1)?;
    let (lens, starts) = lens_and_starts(segments);
    let grads = par_segments(&lens, |i| {
        let s = &segments[i];
        match (&s.factors, &u[i]) {
            (Some((a, b)), Some(u)) => {
                let hs = h.narrow(0, starts[i], s.len)?;
                let gs = g.narrow(0, starts[i], s.len)?;
                let du = mm(&gs, b, false, false, s.scale)?;
                let dfactors = (mm(&du, &hs, true, false, 1.0)?, mm(&gs, u, true, false, s.scale)?);
                Ok((mm(&du, a, false, false, 1.0)?, Some(dfactors)))
            }
            (None, None) => Ok((Tensor::zeros((s.len, in_dim), DType::F32, g.device())?, None)),
            _ => candle_core::bail!("segmented_low_rank_backward: segment {i}'s u does not match its factors"),
        }
    })?;
    let (dh, dfactors): (Vec<Tensor>, Vec<Option<(Tensor, Tensor)>>) = grads.into_iter().unzip();
    Ok((Tensor::cat(&dh, 0)?, dfactors.into_iter().flatten().collect()))
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

/// Row-major `[rows, cols]` as row-major `[cols, rows]`, in 16 × 16 tiles (candle's strided
/// copy computes an index per element, and was slower than the products it fed).
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut out = vec![0f32; rows * cols];
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            for i in i0..(i0 + T).min(rows) {
                for j in j0..(j0 + T).min(cols) {
                    out[j * rows + i] = v[i * cols + j];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
        assert!(uk[1].is_none() && ul[1].is_none());
        let (dhk, dfk) = segmented_low_rank_backward(&h, &segments, &uk, &g).unwrap();
        let (dhl, dfl) = segmented_low_rank_backward(&h, &segments, &ul, &g).unwrap();
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

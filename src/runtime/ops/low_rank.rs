//! Low-rank updates of many row segments in one differentiable op: the training side of the
//! segmented-matmul idea (punica, S-LoRA), where each segment of a packed batch has its own
//! factors.
//!
//! Why one op: composed of candle ops, every segment would `narrow` the shared input, and
//! the backward of `narrow` expands each segment's gradient to the input's full size and
//! adds it (zeros, a copy and a sum of `[n, in]` per segment, per targeted projection, per
//! layer: quadratic in the number of segments). Here each segment's gradient is written
//! once, into its rows.

use candle_core::{DType, Tensor};

use super::{bmm, Backward3, Result, Tap};

/// One segment of [`segmented_low_rank`]: rows `start..start + len` of the input use factor
/// rows `rank_start..rank_start + rank` of `a` and `bt`, times `scale`; a segment of rank 0
/// gets no update (zeros).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRankSegment {
    pub start: usize,
    pub len: usize,
    pub rank_start: usize,
    pub rank: usize,
    pub scale: f64,
}

/// `y_s = scale_s · (h_s A_sᵀ) B_sᵀ` for every segment `s` of the rows of `h` `[n, in]`,
/// where `A_s` is the segment's rows of `a` `[Σ r, in]` and `B_sᵀ` its rows of `bt`
/// `[Σ r, out]` (LoRA's A and the transpose of its B), both f32. Returns `[n, out]` in f32;
/// every segment's value is computed at that segment's own shapes, as it would be alone.
/// Differentiable with respect to all three inputs (`h`'s gradient in `h`'s dtype).
///
/// Errors: segments that do not tile the rows of `h` and the rows of the factors, in order.
pub fn segmented_low_rank(h: &Tensor, a: &Tensor, bt: &Tensor, segments: &[LowRankSegment]) -> Result<Tensor> {
    let (n, in_dim) = h.dims2()?;
    let (total_rank, out) = bt.dims2()?;
    if a.dims2()? != (total_rank, in_dim) {
        candle_core::bail!("segmented_low_rank: A is {:?}, expected [{total_rank}, {in_dim}]", a.dims());
    }
    let (mut row, mut rank) = (0, 0);
    for s in segments {
        if s.start != row || s.rank_start != rank {
            candle_core::bail!("segmented_low_rank: segment {s:?} should start at row {row}, factor row {rank}");
        }
        row += s.len;
        rank += s.rank;
    }
    if (row, rank) != (n, total_rank) {
        candle_core::bail!("segmented_low_rank: segments cover {row} of {n} rows, {rank} of {total_rank} factor rows");
    }
    let h_dtype = h.dtype();
    let (hd, ad, bd) = (h.detach().to_dtype(DType::F32)?, a.detach(), bt.detach());
    let segments = segments.to_vec();
    let parts = move |s: &LowRankSegment| -> Result<(Tensor, Tensor, Tensor)> {
        Ok((hd.narrow(0, s.start, s.len)?, ad.narrow(0, s.rank_start, s.rank)?, bd.narrow(0, s.rank_start, s.rank)?))
    };
    // 1. forward: u = h_s A_sᵀ [len, r], y_s = scale · u Bᵀ_s [len, out]
    let mut ys = Vec::with_capacity(segments.len());
    for s in &segments {
        ys.push(if s.rank == 0 {
            Tensor::zeros((s.len, out), DType::F32, h.device())?
        } else {
            let (hs, a_s, bt_s) = parts(s)?;
            (bmm(&bmm(&hs, &a_s, false, true)?, &bt_s, false, false)? * s.scale)?
        });
    }
    let value = Tensor::cat(&ys, 0)?;
    if !(h.track_op() || a.track_op() || bt.track_op()) {
        return Ok(value);
    }
    // 2. backward, with g_s = scale · dy_s and u recomputed:
    //    dBᵀ_s = uᵀ g_s,  du = g_s B_s,  dA_s = duᵀ h_s,  dh_s = du A_s
    let backward: Backward3 = Box::new(move |g| {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (mut dh, mut da, mut dbt) = (Vec::new(), Vec::new(), Vec::new());
        for s in &segments {
            if s.rank == 0 {
                dh.push(Tensor::zeros((s.len, in_dim), DType::F32, g.device())?);
                continue;
            }
            let (hs, a_s, bt_s) = parts(s)?;
            let gs = (g.narrow(0, s.start, s.len)? * s.scale)?;
            let u = bmm(&hs, &a_s, false, true)?;
            let du = bmm(&gs, &bt_s, false, true)?;
            dbt.push(bmm(&u, &gs, true, false)?);
            da.push(bmm(&du, &hs, true, false)?);
            dh.push(bmm(&du, &a_s, false, false)?);
        }
        let cat_or_empty = |v: Vec<Tensor>, width: usize| match v.is_empty() {
            true => Tensor::zeros((0, width), DType::F32, g.device()),
            false => Tensor::cat(&v, 0),
        };
        Ok((Tensor::cat(&dh, 0)?.to_dtype(h_dtype)?, cat_or_empty(da, in_dim)?, cat_or_empty(dbt, out)?))
    });
    h.apply_op3(a, bt, Tap::new("segmented-low-rank", value, backward))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// Three segments (rank 2, no update, rank 3) against the same products composed of
    /// candle's own narrow, matmul and cat: value and the gradients of h, A and Bᵀ.
    #[test]
    fn segments_equal_their_products_composed() {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1.0, (9, 6), &dev).unwrap();
        let a = Var::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        let bt = Var::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let segments = [
            LowRankSegment { start: 0, len: 4, rank_start: 0, rank: 2, scale: 0.5 },
            LowRankSegment { start: 4, len: 2, rank_start: 2, rank: 0, scale: 0.0 },
            LowRankSegment { start: 6, len: 3, rank_start: 2, rank: 3, scale: 3.0 },
        ];
        let y = segmented_low_rank(&h, &a, &bt, &segments).unwrap();
        let parts: Vec<Tensor> = segments
            .iter()
            .map(|s| match s.rank {
                0 => Tensor::zeros((s.len, 4), DType::F32, &dev).unwrap(),
                r => {
                    let hs = h.narrow(0, s.start, s.len).unwrap();
                    let u = hs.matmul(&a.narrow(0, s.rank_start, r).unwrap().t().unwrap()).unwrap();
                    (u.matmul(&bt.narrow(0, s.rank_start, r).unwrap()).unwrap() * s.scale).unwrap()
                }
            })
            .collect();
        let y2 = Tensor::cat(&parts, 0).unwrap();
        assert!(max_diff(&y, &y2) < 1e-5);
        assert_eq!(max_diff(&y.narrow(0, 4, 2).unwrap(), &Tensor::zeros((2, 4), DType::F32, &dev).unwrap()), 0.0);
        super::super::tests::same_gradients(&y, &y2, &[h.as_tensor(), a.as_tensor(), bt.as_tensor()], 1e-4);
        // the rows of the segment without an update get no gradient through it
        let g1 = (&y * &Tensor::ones((9, 4), DType::F32, &dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g1.get(&h).unwrap().narrow(0, 4, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // segments must tile the rows and the factor rows, in order
        let bad = |s: &[LowRankSegment]| segmented_low_rank(&h, &a, &bt, s).is_err();
        assert!(bad(&segments[..2]), "rows left over");
        assert!(bad(&[segments[0], LowRankSegment { start: 4, len: 5, rank_start: 1, rank: 4, scale: 1.0 }]), "overlapping factor rows");
        assert!(bad(&[segments[0], LowRankSegment { start: 5, len: 4, rank_start: 2, rank: 3, scale: 1.0 }]), "a gap");
        assert!(segmented_low_rank(&h, &a.narrow(1, 0, 5).unwrap(), &bt, &segments).is_err(), "A's width");
    }
}

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
/// factor (`h`'s gradient in `h`'s dtype); when nothing tracks a gradient (inference), no
/// graph is recorded and the factors are used where they lie.
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
    let value = segmented_low_rank_forward(&hd, segments, out)?;
    let factored: Vec<&(Tensor, Tensor)> = segments.iter().filter_map(|s| s.factors.as_ref()).collect();
    if !(h.track_op() || factored.iter().any(|(a, b)| a.track_op() || b.track_op())) {
        return Ok(value);
    }
    // the graph sees all factors as two inputs: A stacked by rows [Σ r, in], B side by
    // side [out, Σ r]
    let a_all = Tensor::cat(&factored.iter().map(|(a, _)| a).collect::<Vec<_>>(), 0)?;
    let b_all = Tensor::cat(&factored.iter().map(|(_, b)| b).collect::<Vec<_>>(), 1)?;
    let detached: Vec<LowRankSegment> = segments
        .iter()
        .map(|s| LowRankSegment { factors: s.factors.as_ref().map(|(a, b)| (a.detach(), b.detach())), ..s.clone() })
        .collect();
    let backward: Backward3 = Box::new(move |g| {
        let (dh, dfactors) = segmented_low_rank_backward(&hd, &detached, g)?;
        let (da, db): (Vec<Tensor>, Vec<Tensor>) = dfactors.into_iter().unzip();
        Ok((dh.to_dtype(h_dtype)?, Tensor::cat(&da, 0)?, Tensor::cat(&db, 1)?))
    });
    h.apply_op3(&a_all, &b_all, Tap::new("segmented-low-rank", value, backward))
}

/// [`segmented_low_rank`]'s value for `h` `[n, in]` in f32 (segments already checked),
/// `[n, out]`: u = h_s A_sᵀ `[len, r]`, y_s = scale · u B_sᵀ `[len, out]`.
pub(crate) fn segmented_low_rank_forward(h: &Tensor, segments: &[LowRankSegment], out: usize) -> Result<Tensor> {
    let mut ys = Vec::with_capacity(segments.len());
    let mut start = 0;
    for s in segments {
        ys.push(match &s.factors {
            None => Tensor::zeros((s.len, out), DType::F32, h.device())?,
            Some((a, b)) => {
                let u = bmm(&h.narrow(0, start, s.len)?, a, false, true)?;
                (bmm(&u, b, false, true)? * s.scale)?
            }
        });
        start += s.len;
    }
    Tensor::cat(&ys, 0)
}

/// [`segmented_low_rank`]'s gradients for output gradient `g` `[n, out]`: `h`'s `[n, in]`
/// in f32, and `(dA, dB)` of each segment that has factors, in order. With g_s = scale ·
/// dy_s and u recomputed: dB_s = g_sᵀ u, du = g_s B_s, dA_s = duᵀ h_s, dh_s = du A_s.
pub(crate) fn segmented_low_rank_backward(h: &Tensor, segments: &[LowRankSegment], g: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let in_dim = h.dim(1)?;
    let (mut dh, mut dfactors) = (Vec::with_capacity(segments.len()), Vec::new());
    let mut start = 0;
    for s in segments {
        match &s.factors {
            None => dh.push(Tensor::zeros((s.len, in_dim), DType::F32, g.device())?),
            Some((a, b)) => {
                let hs = h.narrow(0, start, s.len)?;
                let gs = (g.narrow(0, start, s.len)? * s.scale)?;
                let u = bmm(&hs, a, false, true)?;
                let du = bmm(&gs, b, false, false)?;
                dfactors.push((bmm(&du, &hs, true, false)?, bmm(&gs, &u, true, false)?));
                dh.push(bmm(&du, a, false, false)?);
            }
        }
        start += s.len;
    }
    Ok((Tensor::cat(&dh, 0)?, dfactors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
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
        let composed = |rows: (usize, usize), a: &Var, b: &Var, scale: f64| {
            let u = h.narrow(0, rows.0, rows.1).unwrap().matmul(&a.t().unwrap()).unwrap();
            (u.matmul(&b.t().unwrap()).unwrap() * scale).unwrap()
        };
        let zeros = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let y2 = Tensor::cat(&[composed((0, 4), &a1, &b1, 0.5), zeros.clone(), composed((6, 3), &a2, &b2, 3.0)], 0).unwrap();
        assert!(max_diff(&y, &y2) < 1e-5);
        assert_eq!(max_diff(&y.narrow(0, 4, 2).unwrap(), &zeros), 0.0);
        let vars = [h.as_tensor(), a1.as_tensor(), b1.as_tensor(), a2.as_tensor(), b2.as_tensor()];
        super::super::tests::same_gradients(&y, &y2, &vars, 1e-4);
        // the rows of the segment without an update get no gradient through it
        let g1 = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g1.get(&h).unwrap().narrow(0, 4, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // without anything to differentiate, the same value and no graph
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

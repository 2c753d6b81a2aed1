//! Next-token cross-entropy through the frozen LM head, for one sequence or several packed
//! end to end. The logits never enter the autograd graph: the forward keeps only
//! `softmax - onehot` (scaled) for the backward, one `[rows with a target, vocab]` buffer
//! (all rows when fewer than two have a target).
//!
//! One implementation serves both shapes, so a sequence gets the same numbers alone and
//! packed: its rows' logits do not depend on the other rows of the matmul, and everything
//! after the matmul is per row.

use candle_core::{DType, Device, Tensor, D};

use std::sync::Arc;

use super::simd::{self, simd};
use super::{plain_linear, plain_linear_t, plain_linear_values, Backward1, Tap};
use crate::runtime::blas::PackedWeight;

type Result<T> = candle_core::Result<T>;

/// Rows of logits computed at once (a `[512, vocab]` f32 buffer is ~100 MB for 49k tokens).
const CHUNK: usize = 512;

/// The fewest rows of a product whose rows each get the numbers they get among any others.
const MIN_ROWS: usize = crate::runtime::blas::MIN_ROWS;

/// Mean next-token cross-entropy of `hidden @ weight^T` against `targets`, counting only
/// positions where `targets` is `Some`. `hidden` is `[n, d]`, `weight` `[vocab, d]` (frozen).
/// A 0-d tensor, differentiable with respect to `hidden`. With `bf16` (the weight packed
/// for AMX) the LM head's products run in bf16 with f32 accumulation.
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedWeight>>,
    targets: &[Option<u32>],
) -> Result<Tensor> {
    let n = hidden.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("lm_head_cross_entropy: {} targets for {n} rows", targets.len());
    }
    lm_head_cross_entropy_packed(hidden, weight, packed, &[targets])?.squeeze(0)
}

/// [`lm_head_cross_entropy`] of `K` sequences packed end to end in `hidden` `[n, d]`:
/// `targets[k]` holds sequence `k`'s targets (one per row; the lengths sum to `n`).
/// Returns the `[K]` mean losses, each differentiable with respect to its own rows only.
/// Rows without a target (`None`) skip the LM head (no logits, a zero gradient) when two or
/// more rows have one.
///
/// Errors: lengths that do not sum to `n`, a sequence with no target.
pub fn lm_head_cross_entropy_packed(
    hidden: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedWeight>>,
    targets: &[&[Option<u32>]],
) -> Result<Tensor> {
    let (n, width) = hidden.dims2()?;
    if targets.iter().map(|t| t.len()).sum::<usize>() != n {
        candle_core::bail!("lm_head_cross_entropy: the sequences' lengths do not sum to the {n} rows");
    }
    let counted: Vec<usize> = targets.iter().map(|t| t.iter().filter(|x| x.is_some()).count()).collect();
    if let Some(k) = counted.iter().position(|&c| c == 0) {
        candle_core::bail!("lm_head_cross_entropy: sequence {k} has no position with a target");
    }
    // each row's target and its sequence (the gradient of a mean is scaled by 1 / counted)
    let rows: Vec<(Option<u32>, usize)> = targets.iter().enumerate().flat_map(|(k, t)| t.iter().map(move |&x| (x, k))).collect();
    let grad = hidden.track_op();
    let device = hidden.device();
    // Only the rows with a target go through the LM head. The others' logits would enter no
    // loss and their gradient is zero: an SFT example's prompt, most of its rows. A row's
    // logits depend on that row alone, so leaving the others out changes no number, unless
    // one row would be left: on OpenBLAS (a CPU without AVX-512, or a model whose compute dtype
    // was never set) a product of one row takes another kernel than the same row among others
    // (`blas::MIN_ROWS`; a 2-token sequence keeps its last row for that reason). The f32
    // kernel's rows are independent at any count; the rule costs it nothing.
    let with_target: Vec<u32> = (0..n).filter(|&r| rows[r].0.is_some()).map(|r| r as u32).collect();
    let (hd, rows, scatter) = if with_target.len() < n && with_target.len() >= MIN_ROWS {
        let kept = with_target.iter().map(|&r| rows[r as usize]).collect();
        let index = Tensor::from_vec(with_target, counted.iter().sum::<usize>(), device)?;
        (hidden.detach().index_select(&index, 0)?, kept, Some(index))
    } else {
        (hidden.detach(), rows, None)
    };
    let n_kept = rows.len();
    let mut totals = vec![0f64; targets.len()];
    let mut dlogits = Vec::new();
    let mut start = 0;
    while start < n_kept {
        // never a chunk of fewer than MIN_ROWS rows after a full one, for the same reason
        let left = n_kept - start;
        let len = if left > CHUNK && left - CHUNK < MIN_ROWS { CHUNK - MIN_ROWS } else { CHUNK.min(left) };
        let x = hd.narrow(0, start, len)?;
        let chunk_rows = &rows[start..start + len];
        let d = match device {
            Device::Cpu => {
                let logits = plain_linear_values(&x, weight, packed.map(|p| &**p))?;
                rows_cpu(logits, weight.dim(0)?, chunk_rows, &counted, &mut totals, grad)?
            }
            _ => {
                let logits = plain_linear(&x, weight, packed.map(|p| &**p), None)?.to_dtype(DType::F32)?;
                rows_candle(logits, chunk_rows, &counted, &mut totals, grad)?
            }
        };
        if let Some(d) = d {
            dlogits.push(d.to_dtype(hidden.dtype())?);
        }
        start += len;
    }
    let losses: Vec<f32> = totals.iter().zip(&counted).map(|(t, &c)| (t / c as f64) as f32).collect();
    let losses = Tensor::from_vec(losses, targets.len(), device)?;
    if !grad {
        return Ok(losses);
    }
    let dlogits = if dlogits.len() == 1 { dlogits.pop().unwrap() } else { Tensor::cat(&dlogits, 0)? };
    let row_of: Vec<u32> = rows.iter().map(|&(_, k)| k as u32).collect();
    let row_of = Tensor::from_vec(row_of, n_kept, device)?;
    let (weight, packed) = (weight.clone(), packed.cloned());
    let value = losses.to_dtype(hidden.dtype())?;
    // The tap maps `hidden` [n, d] to the [K] losses; row r's gradient is its scaled
    // `softmax - onehot` through the LM head, times its sequence's upstream gradient, and
    // zero for a row without a target. The scaling comes after the product, on [m, d] rather
    // than [m, vocab] (the [m, vocab] product was 2.6% of a grouped training profile); per
    // row either way, so a sequence gets the same numbers alone and packed.
    let out = hidden.apply_op1(Tap::new(
        "lm-head-cross-entropy",
        value,
        Box::new(move |g: &Tensor| {
            let g_rows = g.index_select(&row_of, 0)?.unsqueeze(1)?; // [m, 1], m rows with a target
            let dhidden = plain_linear_t(&dlogits, &weight, packed.as_deref())?; // [m, d]
            let dhidden = dhidden.broadcast_mul(&g_rows.to_dtype(dhidden.dtype())?)?;
            match &scatter {
                None => Ok(dhidden),
                Some(index) => Tensor::zeros((n, width), dhidden.dtype(), dhidden.device())?.index_add(index, &dhidden, 0), // [n, d]
            }
        }) as Backward1,
    ))?;
    Ok(out)
}

/// One chunk of logits on the CPU, `[len, vocab]` row-major with a row per entry of `rows`,
/// in one pass per row: adds each row's `logsumexp - logit[target]` to its sequence's total
/// and, for the backward, turns the row into `(softmax - onehot) / counted` (zero for rows
/// without a target), returned as `[len, vocab]`.
///
/// Why values, not a tensor: the rows are rewritten where the LM head's product left them.
/// Copied out of a tensor first (`to_vec1`, into newly faulted pages), they took 3.1% of the
/// main thread's samples in grouped f32 training.
fn rows_cpu(
    mut buf: Vec<f32>,
    vocab: usize,
    rows: &[(Option<u32>, usize)],
    counted: &[usize],
    totals: &mut [f64],
    grad: bool,
) -> Result<Option<Tensor>> {
    let len = rows.len();
    if buf.len() != len * vocab {
        candle_core::bail!("lm_head_cross_entropy: {} logits for {len} rows of {vocab}", buf.len());
    }
    // rows on the cores the product leaves idle; each row's loss comes back in row order and is
    // added to its sequence's total in that order, so the sums do not depend on the split
    let losses = super::split_rows(buf.len(), vocab, vec![&mut buf], |range, mut chunk| {
        simd(
            #[inline(always)]
            || {
                let mut losses = Vec::with_capacity(range.len() / vocab);
                for (row, &(target, k)) in chunk[0].chunks_exact_mut(vocab).zip(&rows[range.start / vocab..]) {
                    let Some(t) = target else {
                        if grad {
                            row.fill(0.0);
                        }
                        continue;
                    };
                    let picked = row[t as usize];
                    let max = simd::max(row);
                    let sum = simd::exp_shifted_sum(row, max);
                    losses.push((k, max as f64 + sum.ln() - picked as f64));
                    if grad {
                        let scale = (1.0 / (sum * counted[k] as f64)) as f32;
                        for x in row.iter_mut() {
                            *x *= scale;
                        }
                        row[t as usize] -= 1.0 / counted[k] as f32;
                    }
                }
                losses
            },
        )
    });
    for (k, loss) in losses.into_iter().flatten() {
        totals[k] += loss;
    }
    Ok(if grad { Some(Tensor::from_vec(buf, (len, vocab), &Device::Cpu)?) } else { None })
}

/// [`rows_cpu`] with candle's ops, for other devices.
fn rows_candle(logits: Tensor, rows: &[(Option<u32>, usize)], counted: &[usize], totals: &mut [f64], grad: bool) -> Result<Option<Tensor>> {
    let (len, _) = logits.dims2()?;
    let device = logits.device().clone();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let tgt: Vec<u32> = rows.iter().map(|r| r.0.unwrap_or(0)).collect();
    let tgt = Tensor::from_vec(tgt, (len, 1), &device)?;
    let picked: Vec<f32> = logp.gather(&tgt, 1)?.flatten_all()?.to_vec1()?;
    for (p, &(target, k)) in picked.iter().zip(rows) {
        if target.is_some() {
            totals[k] -= *p as f64;
        }
    }
    if !grad {
        return Ok(None);
    }
    let scale: Vec<f32> = rows.iter().map(|&(t, k)| if t.is_some() { 1.0 / counted[k] as f32 } else { 0.0 }).collect();
    let scale = Tensor::from_vec(scale, (len, 1), &device)?;
    let onehot = Tensor::zeros_like(&logp)?.scatter_add(&tgt, &Tensor::ones((len, 1), DType::F32, &device)?, 1)?;
    Ok(Some((logp.exp()? - onehot)?.broadcast_mul(&scale)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(len: usize, vocab: usize) -> Tensor {
        Tensor::randn(0f32, 3., (len, vocab), &Device::Cpu).unwrap()
    }

    /// The candle path (used on GPUs) gives the CPU path's totals and gradient rows, here
    /// both on the CPU: two sequences, a row without a target, targets at both vocabulary ends.
    #[test]
    fn candle_rows_equal_cpu_rows() {
        let rows = [(Some(0), 0), (None, 0), (Some(6), 0), (Some(3), 1), (Some(6), 1)];
        let counted = [2, 2];
        let l = logits(rows.len(), 7);
        let (mut t_cpu, mut t_candle) = (vec![0.5f64, 0.25], vec![0.5f64, 0.25]);
        let d_cpu =
            rows_cpu(l.flatten_all().unwrap().to_vec1().unwrap(), l.dim(1).unwrap(), &rows, &counted, &mut t_cpu, true).unwrap().unwrap();
        let d_candle = rows_candle(l.clone(), &rows, &counted, &mut t_candle, true).unwrap().unwrap();
        for (a, b) in t_cpu.iter().zip(&t_candle) {
            assert!((a - b).abs() < 1e-5, "totals {t_cpu:?} against {t_candle:?}");
        }
        let diff = (d_cpu - d_candle).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "gradient rows differ by {diff}");
        // logits of another length are refused, even one whose rows would divide them evenly
        for bad in [rows.len() * 7 - 1, rows.len() * 8] {
            assert!(rows_cpu(vec![0.0; bad], 7, &rows, &counted, &mut [0.0; 2], true).is_err(), "{bad} logits");
        }
        // without a gradient, the totals still add up and nothing is returned
        let mut t = vec![0.5f64, 0.25];
        assert!(rows_candle(l, &rows, &counted, &mut t, false).unwrap().is_none());
        assert_eq!(t, t_candle);
    }

    /// Rows enough to be split over threads (on a machine with several cores): the same
    /// totals and gradient rows as candle's ops.
    #[test]
    fn rows_split_over_threads_equal_candle_rows() {
        // 60 × 5000 = 2.3 × 2^17 elements: two threads where OpenBLAS has two
        let (n, vocab) = (60, 5000);
        let rows: Vec<(Option<u32>, usize)> =
            (0..n).map(|i| (if i % 6 == 2 { None } else { Some((i * 131 % vocab) as u32) }, i / 30)).collect();
        let counted = [25, 25];
        let l = logits(n, vocab);
        let (mut t_cpu, mut t_candle) = (vec![0.0f64; 2], vec![0.0f64; 2]);
        let d_cpu =
            rows_cpu(l.flatten_all().unwrap().to_vec1().unwrap(), l.dim(1).unwrap(), &rows, &counted, &mut t_cpu, true).unwrap().unwrap();
        let d_candle = rows_candle(l, &rows, &counted, &mut t_candle, true).unwrap().unwrap();
        for (a, b) in t_cpu.iter().zip(&t_candle) {
            assert!((a - b).abs() < 1e-4 * b.abs(), "totals {t_cpu:?} against {t_candle:?}");
        }
        let diff = (d_cpu - d_candle).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "gradient rows differ by {diff}");
    }

    /// Rows without a target skip the LM head: the losses and the other rows' gradients are
    /// those of the same rows without them, bit for bit, and their own gradient is zero.
    /// (An SFT example's prompt rows; the mapping back to the rows is what could go wrong.)
    #[test]
    fn rows_without_a_target_are_left_out() {
        // more rows with a target than one chunk, so that they are gathered across chunks
        let (n, d, vocab) = (2 * CHUNK, 8, 11);
        let h = candle_core::Var::randn(0f32, 1., (n, d), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (vocab, d), &Device::Cpu).unwrap();
        // a prompt of 30 rows in the first sequence, scattered gaps in the second
        let all: Vec<Option<u32>> =
            (0..n).map(|i| if i < 30 || (i > 200 && i % 3 == 0) { None } else { Some((i * 5 % vocab) as u32) }).collect();
        let cut = 150;
        let losses = lm_head_cross_entropy_packed(&h, &w, None, &[&all[..cut], &all[cut..]]).unwrap();
        let coeffs = Tensor::new(&[1.5f32, -0.5], &Device::Cpu).unwrap();
        let grads = (&losses * &coeffs).unwrap().sum_all().unwrap().backward().unwrap();
        let grad: Vec<Vec<f32>> = grads.get(&h).unwrap().to_vec2().unwrap();
        // the same rows with the rows without a target removed beforehand
        let keep: Vec<usize> = (0..n).filter(|&i| all[i].is_some()).collect();
        let idx = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap();
        let h2 = candle_core::Var::from_tensor(&h.as_tensor().index_select(&idx, 0).unwrap()).unwrap();
        let t2: Vec<Option<u32>> = keep.iter().map(|&i| all[i]).collect();
        let cut2 = keep.iter().filter(|&&i| i < cut).count();
        let losses2 = lm_head_cross_entropy_packed(&h2, &w, None, &[&t2[..cut2], &t2[cut2..]]).unwrap();
        assert_eq!(losses.to_vec1::<f32>().unwrap(), losses2.to_vec1::<f32>().unwrap());
        let grads2 = (&losses2 * &coeffs).unwrap().sum_all().unwrap().backward().unwrap();
        let grad2: Vec<Vec<f32>> = grads2.get(&h2).unwrap().to_vec2().unwrap();
        let mut kept = grad2.iter();
        for (i, row) in grad.iter().enumerate() {
            match all[i] {
                Some(_) => assert_eq!(row, kept.next().unwrap(), "row {i}"),
                None => assert!(row.iter().all(|&x| x == 0.0), "row {i} has no target but a gradient {row:?}"),
            }
        }
    }

    /// A sequence gets the same bits alone and packed with others, where skipping its rows
    /// without a target would leave it one row, and where the packed rows would end in a
    /// chunk of one row after a full one (each a product of one row: another kernel).
    #[test]
    fn no_product_of_one_row() {
        if !crate::runtime::blas::ENABLED {
            eprintln!("built without OpenBLAS: rows are independent only with it");
            return;
        }
        let (d, vocab) = (64, 300);
        let w = Tensor::randn(0f32, 1., (vocab, d), &Device::Cpu).unwrap();
        let bits = |h: &Tensor, targets: &[&[Option<u32>]], k: usize, rows: std::ops::Range<usize>| {
            let h = candle_core::Var::from_tensor(h).unwrap();
            let losses = lm_head_cross_entropy_packed(&h, &w, None, targets).unwrap();
            let grads = losses.get(k).unwrap().backward().unwrap();
            let grad: Vec<Vec<f32>> = grads.get(&h).unwrap().narrow(0, rows.start, rows.len()).unwrap().to_vec2().unwrap();
            (losses.get(k).unwrap().to_scalar::<f32>().unwrap().to_bits(), grad)
        };
        let x = Tensor::randn(0f32, 1., (2, d), &Device::Cpu).unwrap();
        for (pair, others) in [([None, Some(7u32)], 30), ([Some(5), Some(7)], CHUNK - 1)] {
            let alone = bits(&x, &[&pair], 0, 0..2);
            let before = Tensor::randn(0f32, 1., (others, d), &Device::Cpu).unwrap();
            let h = Tensor::cat(&[&before, &x], 0).unwrap();
            let t: Vec<Option<u32>> = (0..others).map(|i| Some((i % vocab) as u32)).collect();
            let packed = bits(&h, &[&t, &pair], 1, others..others + 2);
            assert_eq!(alone, packed, "{pair:?} after {others} rows");
        }
    }

    /// More rows with a target than one chunk: losses and gradients equal the composed
    /// reference across the chunk boundary (three sequences; the rows with a target are
    /// gathered first, so the boundary falls in the third).
    #[test]
    fn chunks_join_seamlessly() {
        // a fifth of the rows without a target: the others still fill more than one chunk
        let (n, d, vocab) = (2 * CHUNK + 40, 4, 9);
        let h = candle_core::Var::randn(0f32, 1., (n, d), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (vocab, d), &Device::Cpu).unwrap();
        let all: Vec<Option<u32>> = (0..n).map(|i| if i % 5 == 1 { None } else { Some((i * 7 % vocab) as u32) }).collect();
        let bounds = [0, 300, CHUNK + 20, n];
        let parts: Vec<&[Option<u32>]> = bounds.windows(2).map(|b| &all[b[0]..b[1]]).collect();
        let losses = lm_head_cross_entropy_packed(&h, &w, None, &parts).unwrap();
        let coeffs = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let g1 = (&losses * &coeffs).unwrap().sum_all().unwrap().backward().unwrap();
        // reference: each sequence's mean cross-entropy from the full logits
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (k, b) in bounds.windows(2).enumerate() {
            let keep: Vec<u32> = (b[0]..b[1]).filter(|&i| all[i].is_some()).map(|i| i as u32).collect();
            let tg: Vec<u32> = keep.iter().map(|&i| all[i as usize].unwrap()).collect();
            let idx = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
            let rows = logits.index_select(&idx, 0).unwrap();
            let loss = candle_nn::loss::cross_entropy(&rows, &Tensor::new(tg.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let got = losses.get(k).unwrap().to_scalar::<f32>().unwrap();
            let want = loss.to_scalar::<f32>().unwrap();
            assert!((got - want).abs() < 1e-4, "sequence {k}: loss {got} against {want}");
            total = (total + (loss * (k + 1) as f64).unwrap()).unwrap();
        }
        let g2 = total.backward().unwrap();
        let diff = (g1.get(&h).unwrap() - g2.get(&h).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }
}

//! Attention of one new token per batch row against the keys and values its KV cache
//! holds, read where they lie: the attention of a decoding step, on the CPU in f32.
//!
//! Why: through the batched products, every decoding step copied each layer's cached keys
//! and values out of the cache (a view of the first positions of a preallocated cache is
//! not contiguous), then ran a product per row and KV head of one query group (3 × 64
//! against 64 × ~100), the mask, the softmax and a second product as candle ops on one
//! thread. Timed inside grouped evaluation (`make bench`, 128 rows a batch), attention was
//! ~21% of decoding while its multiply-adds are ~2% of a step's (counted from the shapes).
//! Here each row's keys are read once for all query heads of their group, straight from
//! the cache, and the rows are split between the cores.
//!
//! Every row is computed from its own query, cache row and mask by the same code, whatever
//! the batch and however the rows are split between threads: a row gets the same numbers
//! in any batch (what lets grouped evaluation answer as one adapter at a time does).

use super::short_attention::axpy;
use super::simd;

const L: usize = simd::LANES;

/// The shapes of one decoding step's attention: `rows` batch rows of one query each,
/// `heads` query heads over `kv_heads` key/value heads of `d` dimensions (the query heads
/// of KV head `j` being `j · heads / kv_heads ..`), a cache of `capacity` positions per
/// row and KV head, of which the first `keys` are attended to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub capacity: usize,
    pub keys: usize,
}

impl Step {
    /// Whether this kernel computes these shapes: whole vectors of [`L`] lanes per head,
    /// query heads in whole groups, at least one key within the cache.
    pub(crate) fn fits(&self) -> bool {
        let (h, kv) = (self.heads, self.kv_heads);
        self.d > 0 && self.d.is_multiple_of(L) && kv > 0 && h.is_multiple_of(kv) && self.keys > 0 && self.keys <= self.capacity
    }
}

/// `softmax(q kᵀ / √d + mask) v` for each row's one query: `q` `[rows, heads, d]`, the
/// cache's `k` and `v` `[rows, kv_heads, capacity, d]` (positions `0..keys` read), `mask`
/// `[rows, keys]` additive (0 or `-inf`; none: every key attended to). Returns
/// `[rows, heads, d]`. The rows are split over up to `threads` threads.
///
/// # Panics
/// When the slices do not hold those shapes or `step` does not [`Step::fits`].
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, step: Step, threads: usize) -> Vec<f32> {
    let Step { rows, heads, kv_heads, d, capacity, keys } = step;
    assert!(step.fits(), "cached attention of {step:?}");
    assert_eq!(q.len(), rows * heads * d, "queries of {} values for {step:?}", q.len());
    assert_eq!(k.len(), rows * kv_heads * capacity * d, "keys of {} values for {step:?}", k.len());
    assert_eq!(v.len(), k.len(), "values of {} values for {step:?}", v.len());
    if let Some(m) = mask {
        assert_eq!(m.len(), rows * keys, "mask of {} values for {step:?}", m.len());
    }
    let mut out = vec![0f32; rows * heads * d];
    let row_out = heads * d;
    // the keys' values read (q kᵀ takes `heads / kv_heads` multiply-adds per value, p v as
    // many); below 2^16 a part would take about as long as a worker needs to pick it up (~1
    // µs hot, up to ~40 µs parked, `runtime::parallel`): an estimate
    let threads = if rows * kv_heads * keys * d >= 1 << 16 { threads.min(rows).max(1) } else { 1 };
    let ranges = crate::runtime::parallel::even_ranges(rows, threads);
    let mut parts = Vec::with_capacity(ranges.len());
    let mut rest = out.as_mut_slice();
    for r in ranges {
        let (part, tail) = rest.split_at_mut(r.len() * row_out);
        parts.push((r, part));
        rest = tail;
    }
    crate::runtime::parallel::run_parts(parts, |(range, part)| {
        simd::simd(
            #[inline(always)]
            || {
                let mut scores = vec![0f32; (heads / kv_heads) * keys];
                for (r, o) in range.zip(part.chunks_exact_mut(row_out)) {
                    let m = mask.map(|m| &m[r * keys..(r + 1) * keys]);
                    row(&q[r * row_out..(r + 1) * row_out], k, v, m, step, r, &mut scores, o);
                }
            },
        )
    });
    out
}

/// Row `r`'s attention into `out` `[heads, d]` (zeroed), `scores` a scratch of
/// `heads / kv_heads × keys` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, step: Step, r: usize, scores: &mut [f32], out: &mut [f32]) {
    let Step { heads, kv_heads, d, capacity, keys, .. } = step;
    let rep = heads / kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    for kv in 0..kv_heads {
        let at = (r * kv_heads + kv) * capacity * d;
        let (ks, vs) = (&k[at..at + keys * d], &v[at..at + keys * d]);
        let group = &q[kv * rep * d..(kv + 1) * rep * d];
        // 1. scores of the group's query heads, each key read once for all of them
        for (j, kj) in ks.chunks_exact(d).enumerate() {
            for (g, qg) in group.chunks_exact(d).enumerate() {
                scores[g * keys + j] = dot(qg, kj);
            }
        }
        for (g, p) in scores.chunks_exact_mut(keys).enumerate() {
            // 2. scale and mask as the batched path does, then the softmax
            match mask {
                Some(m) => p.iter_mut().zip(m).for_each(|(pj, &mj)| *pj = *pj * scale + mj),
                None => p.iter_mut().for_each(|pj| *pj *= scale),
            }
            let top = simd::max(p);
            let inv = (1.0 / simd::exp_shifted_sum(p, top)) as f32;
            p.iter_mut().for_each(|pj| *pj *= inv);
            // 3. the weighted sum of values; masked keys weigh exactly 0 and are skipped
            let head = kv * rep + g;
            let o = &mut out[head * d..(head + 1) * d];
            for (&pj, vj) in p.iter().zip(vs.chunks_exact(d)) {
                if pj != 0.0 {
                    axpy(o, pj, vj);
                }
            }
        }
    }
}

/// `a · b` for lengths that are whole vectors of [`L`]: lane-wise products summed down the
/// vectors, then the lanes halved four times (a fixed order, vectorizable).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    for (x, y) in a.chunks_exact(L).zip(b.chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut w = L / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(n: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1., n, &Device::Cpu).unwrap().to_vec1().unwrap()
    }

    /// Against the batched products' attention (`ops::attention_forward` on the cache's
    /// first `keys` positions, copied out), for SmolLM2's heads (9 over 3, d = 64), plain
    /// multi-head attention and one KV head: rows with left padding masked (the mask of a
    /// decoding step), without a mask, split over 1-3 threads (the same bits; the first and
    /// last cases are above the split's threshold, the second below it), and a row alone
    /// equal to itself among the others.
    #[test]
    fn matches_the_batched_products() {
        let dev = Device::Cpu;
        for (heads, kv_heads, d, rows, capacity, keys) in [(9, 3, 64, 12, 40, 33), (4, 4, 16, 3, 8, 8), (2, 1, 32, 40, 70, 60)] {
            let step = Step { rows, heads, kv_heads, d, capacity, keys };
            assert_eq!(rows * kv_heads * keys * d >= 1 << 16, rows != 3, "which cases split");
            let (q, k, v) = (randn(rows * heads * d), randn(rows * kv_heads * capacity * d), randn(rows * kv_heads * capacity * d));
            // row r has r % 5 padding positions at the start
            let mask: Vec<f32> = (0..rows * keys).map(|x| if x % keys < (x / keys) % 5 { f32::NEG_INFINITY } else { 0.0 }).collect();
            let cache = |x: &[f32]| {
                Tensor::from_slice(x, (rows, kv_heads, capacity, d), &dev).unwrap().narrow(2, 0, keys).unwrap().contiguous().unwrap()
            };
            let qt = Tensor::from_slice(&q, (rows, heads, 1, d), &dev).unwrap();
            for masked in [true, false] {
                let m = masked.then_some(mask.as_slice());
                let got = forward(&q, &k, &v, m, step, 1);
                let mt = m.map(|m| Tensor::from_slice(m, (rows, 1, 1, keys), &dev).unwrap());
                let want: Vec<f32> = crate::runtime::ops::attention_forward(&qt, &cache(&k), &cache(&v), mt.as_ref())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(got.iter().all(|x| x.is_finite()), "heads {heads}/{kv_heads}, masked {masked}: not finite");
                let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-5, "heads {heads}/{kv_heads}, d {d}, masked {masked}: differs by {diff}");
                for threads in [2, 3] {
                    assert_eq!(forward(&q, &k, &v, m, step, threads), got, "{threads} threads");
                }
                // the last row alone: its own query, cache row and mask
                let r = rows - 1;
                let (row_q, row_out) = (heads * d, heads * d);
                let row_kv = kv_heads * capacity * d;
                let alone =
                    forward(&q[r * row_q..], &k[r * row_kv..], &v[r * row_kv..], m.map(|m| &m[r * keys..]), Step { rows: 1, ..step }, 1);
                assert_eq!(alone, got[r * row_out..], "row {r} alone");
            }
        }
    }

    #[test]
    fn refuses_shapes_it_cannot_compute() {
        let step = Step { rows: 1, heads: 9, kv_heads: 3, d: 64, capacity: 10, keys: 10 };
        assert!(step.fits());
        assert!(!Step { d: 24, ..step }.fits());
        assert!(!Step { heads: 8, ..step }.fits());
        assert!(!Step { keys: 11, ..step }.fits());
        assert!(!Step { keys: 0, ..step }.fits());
        // empty heads: no lanes to compute, or no KV head to group queries under
        assert!(!Step { d: 0, ..step }.fits());
        assert!(!Step { heads: 0, kv_heads: 0, ..step }.fits());
    }
}

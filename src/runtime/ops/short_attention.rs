//! Attention of one short sequence on the CPU in f32, one query row at a time: the
//! per-sequence attention of a training pass, forward and backward (the backward
//! recomputes the probabilities, as [`super::attention`]'s does).
//!
//! Why: through batched OpenBLAS products and candle's elementwise ops, one sequence of
//! ~34 tokens and 9 heads took ~10 candle ops forward and ~20 backward (a copy of each of
//! q, k and v, the scale, the mask, the softmax and its backward), every one allocating a
//! tensor of a few kilobytes: attention was 8% of grouped training (`make bench`, sequences
//! of ~34 tokens) while its multiply-adds were under 1%. Here a row's scores, softmax and weighted sum run over two
//! scratch rows, the keys and values transposed once per sequence and KV head, so that
//! every inner loop runs along a row of keys or of the head dimension and vectorizes
//! without a horizontal sum.
//!
//! The inputs lie either split into heads (`[heads, rows, d]`) or as the projections left
//! them (`[rows, heads · d]`, with the rotary tables): then each head's rows are rotated as
//! they are loaded and the outputs and gradients written back in the same layout, so the
//! training pass never splits, rotates or merges whole tensors (another 6% of it).
//!
//! Every row is computed from its own sequence alone by the same code, so a sequence gets
//! the same numbers whichever sequences share its pass (what lets a group train as its
//! adapters would alone).

use super::simd;

/// The longest sequence computed here. Longer ones take the batched products: the work is
/// `O(len² · d)` per head either way, and OpenBLAS's blocked products pull ahead as it grows.
pub(crate) const MAX_LEN: usize = 256;

/// The heads of one batch row of `rows` positions: `heads` query heads, `kv_heads` key and
/// value heads of `d` dimensions, the query heads of KV head `j` being `j · heads / kv_heads ..`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub rows: usize,
}

/// How a tensor of `heads` heads over `rows` positions lies in memory (contiguous f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `[heads, rows, d]`: split into heads, as attention's usual inputs.
    HeadMajor,
    /// `[rows, heads · d]`: a projection's output, before the split into heads.
    TokenMajor,
}

impl Layout {
    /// Where head `head`'s row `i` starts.
    fn at(self, heads: usize, rows: usize, d: usize, head: usize, i: usize) -> usize {
        match self {
            Self::HeadMajor => (head * rows + i) * d,
            Self::TokenMajor => (i * heads + head) * d,
        }
    }
}

/// A batch row's queries, keys and values in one layout, and, for queries and keys not yet
/// rotated, the rotary tables `cos`, `sin` `[rows, d / 2]` (each row at its own position;
/// rotated on load with candle's `rope` formula, so the rotated values are its values).
#[derive(Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub layout: Layout,
    pub rotary: Option<(&'a [f32], &'a [f32])>,
}

/// One sequence's rows `start .. start + len` of the row, and its additive mask `[len, len]`
/// (0 or `-inf`; none: every position attends to every other). Every row of the mask must
/// leave a key unmasked, as a causal mask does (a row masked whole gets zeros here, NaN from
/// the batched products).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sequence<'a> {
    pub start: usize,
    pub len: usize,
    pub mask: Option<&'a [f32]>,
}

impl Sequence<'_> {
    /// How many keys row `i` looks at: up to its last unmasked one (the rest of the row,
    /// all `-inf`, would add exact zeros).
    fn keys(&self, i: usize) -> usize {
        match self.mask {
            Some(m) => m[i * self.len..(i + 1) * self.len].iter().rposition(|&x| x != f32::NEG_INFINITY).map_or(0, |j| j + 1),
            None => self.len,
        }
    }
}

/// One head of a tensor: head `index` of `count`, laid out as `layout`, rotated on load by
/// `rotary` when given.
#[derive(Clone, Copy)]
struct Head<'a> {
    count: usize,
    index: usize,
    layout: Layout,
    rotary: Option<(&'a [f32], &'a [f32])>,
}

impl<'a> Inputs<'a> {
    /// Head `index` of `count` in these inputs' layout; `rotated`: queries and keys (rotated
    /// when the inputs carry rotary tables), not values or gradients of the output.
    fn head(&self, count: usize, index: usize, rotated: bool) -> Head<'a> {
        Head { count, index, layout: self.layout, rotary: if rotated { self.rotary } else { None } }
    }
}

/// Head `head`'s rows of sequence `s` from `t` into `out` `[len, d]`, rotated when the
/// head says so.
fn load(t: &[f32], head: Head, h: Heads, s: &Sequence, out: &mut [f32]) {
    let (d, half) = (h.d, h.d / 2);
    for (i, o) in out.chunks_exact_mut(d).enumerate() {
        let at = head.layout.at(head.count, h.rows, d, head.index, s.start + i);
        let x = &t[at..at + d];
        match head.rotary {
            Some((cos, sin)) => {
                let (c, sn) = (&cos[(s.start + i) * half..][..half], &sin[(s.start + i) * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for t in 0..half {
                    o1[t] = x1[t] * c[t] - x2[t] * sn[t];
                    o2[t] = x1[t] * sn[t] + x2[t] * c[t];
                }
            }
            None => o.copy_from_slice(x),
        }
    }
}

/// The inverse of [`load`]: `x` `[len, d]` (a gradient with respect to the loaded rows) into
/// head `head`'s rows of `out` (the sequence's own rows), rotated back by the opposite angle
/// when the head was rotated (as the backward of candle's `rope`: `rope(g, cos, -sin)`).
fn store(x: &[f32], head: Head, h: Heads, s: &Sequence, out: &mut [f32]) {
    let (d, half) = (h.d, h.d / 2);
    for (i, x) in x.chunks_exact(d).enumerate() {
        let at = head.layout.at(head.count, s.len, d, head.index, i);
        let o = &mut out[at..at + d];
        match head.rotary {
            Some((cos, sin)) => {
                let (c, sn) = (&cos[(s.start + i) * half..][..half], &sin[(s.start + i) * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for t in 0..half {
                    let ns = -sn[t];
                    o1[t] = x1[t] * c[t] - x2[t] * ns;
                    o2[t] = x1[t] * ns + x2[t] * c[t];
                }
            }
            None => o.copy_from_slice(x),
        }
    }
}

/// `len` rounded up to whole vectors of [`simd::LANES`].
fn padded(len: usize) -> usize {
    len.div_ceil(L) * L
}

const L: usize = simd::LANES;

/// `[len, d]` → `[d, padded(len)]`, the padding zero.
fn transpose(x: &[f32], len: usize, d: usize, out: &mut [f32]) {
    let lp = padded(len);
    out.fill(0.0);
    for (i, row) in x.chunks_exact(d).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * lp + i] = v;
        }
    }
}

/// `y += a x` over whole vectors of [`L`] lanes, then the tail.
#[inline(always)]
pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let mut yc = y.chunks_exact_mut(L);
    let mut xc = x.chunks_exact(L);
    for (yv, xv) in (&mut yc).zip(&mut xc) {
        // through a local copy: with `y` and `x` possibly overlapping for the compiler, the
        // lanes would stay scalar
        let mut acc = [0f32; L];
        acc.copy_from_slice(yv);
        for (y, &x) in acc.iter_mut().zip(xv) {
            *y += a * x;
        }
        yv.copy_from_slice(&acc);
    }
    for (yv, &xv) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *yv += a * xv;
    }
}

/// `out[n] = Σ_c x_c · t[c · stride + n]` for `n < width`: row `x` times the matrix `t`
/// (`[x.len(), stride]`), whole vectors of [`L`] lanes, then the tail.
#[inline(always)]
fn row_products(x: &[f32], t: &[f32], stride: usize, width: usize, out: &mut [f32]) {
    let vectors = width / L;
    for (v, ov) in out[..vectors * L].chunks_exact_mut(L).enumerate() {
        // a vector at a time, its sums in registers over the whole row, in four partial
        // sums (one chain of dependent adds would wait on each add's latency)
        let mut acc = [[0f32; L]; 4];
        let lanes = |c: usize| &t[c * stride + v * L..c * stride + (v + 1) * L];
        let whole = x.len() / 4 * 4;
        for c in (0..whole).step_by(4) {
            for (k, acc) in acc.iter_mut().enumerate() {
                for (a, &tv) in acc.iter_mut().zip(lanes(c + k)) {
                    *a += x[c + k] * tv;
                }
            }
        }
        for (c, &xc) in x.iter().enumerate().skip(whole) {
            for (a, &tv) in acc[0].iter_mut().zip(lanes(c)) {
                *a += xc * tv;
            }
        }
        for (l, o) in ov.iter_mut().enumerate() {
            *o = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
        }
    }
    for (n, o) in out[..width].iter_mut().enumerate().skip(vectors * L) {
        *o = x.iter().enumerate().map(|(c, &xc)| xc * t[c * stride + n]).sum();
    }
}

/// Row `i`'s probabilities over its first `keys` keys into `p[..keys]`: `q_i kᵀ · scale +
/// mask`, then the softmax. `kt` is the keys transposed, `[d, padded(len)]`.
#[inline(always)]
fn probabilities(qi: &[f32], kt: &[f32], s: &Sequence, i: usize, keys: usize, scale: f32, p: &mut [f32]) {
    row_products(qi, kt, padded(s.len), padded(keys), p);
    let p = &mut p[..keys];
    match s.mask {
        Some(m) => {
            for (pj, &mj) in p.iter_mut().zip(&m[i * s.len..]) {
                *pj = *pj * scale + mj;
            }
        }
        None => p.iter_mut().for_each(|pj| *pj *= scale),
    }
    let top = simd::max(p);
    let inv = (1.0 / simd::exp_shifted_sum(p, top)) as f32;
    p.iter_mut().for_each(|pj| *pj *= inv);
}

/// The KV heads `0..kv_heads` in at most `threads` contiguous ranges, `f` on each
/// ([`crate::runtime::parallel::run_parts`]). Results in order.
///
/// Why: a sequence trained alone is the only segment of its pass, so nothing else shares the
/// second core while its attention runs (a 128-token sequence's attention costs ~1 ms a
/// layer). KV heads, not query heads: a KV head's
/// gradients sum over its query heads, and a split inside that sum would change its order.
fn split_kv_heads<R: Send>(
    kv_heads: usize,
    threads: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<(std::ops::Range<usize>, R)> {
    let ranges = crate::runtime::parallel::even_ranges(kv_heads, threads);
    crate::runtime::parallel::run_parts(ranges, |r| (r.clone(), f(r)))
}

/// Copies the rows of heads `heads` (of `count`, sequence of `len` rows) from `from` into
/// `to`, both laid out as `layout`.
fn copy_heads(from: &[f32], to: &mut [f32], layout: Layout, count: usize, len: usize, d: usize, heads: std::ops::Range<usize>) {
    for head in heads {
        for i in 0..len {
            let at = layout.at(count, len, d, head, i);
            to[at..at + d].copy_from_slice(&from[at..at + d]);
        }
    }
}

/// `softmax(q kᵀ / √d + mask) v` of sequence `s`, its `len` rows laid out as the inputs
/// (`[heads, len, d]` or `[len, heads · d]`), the KV heads split over up to `threads`
/// threads (each head computed by the same code whatever the split: the same numbers).
pub(crate) fn forward(x: &Inputs, h: Heads, s: &Sequence, threads: usize) -> Vec<f32> {
    let rep = h.heads / h.kv_heads;
    let mut parts = split_kv_heads(h.kv_heads, threads, |kvs| forward_heads(x, h, s, kvs)).into_iter();
    let (_, mut out) = parts.next().expect("at least one range of KV heads");
    for (kvs, part) in parts {
        copy_heads(&part, &mut out, x.layout, h.heads, s.len, h.d, kvs.start * rep..kvs.end * rep);
    }
    out
}

/// [`forward`] for the KV heads `kvs` and their query heads; the other heads' outputs zero.
fn forward_heads(x: &Inputs, h: Heads, s: &Sequence, kvs: std::ops::Range<usize>) -> Vec<f32> {
    let (d, len, lp) = (h.d, s.len, padded(s.len));
    let rep = h.heads / h.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut out = vec![0f32; h.heads * len * d];
    let (mut ks, mut vs, mut qs) = (vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d]);
    let (mut kt, mut p) = (vec![0f32; d * lp], vec![0f32; lp]);
    simd::simd(
        #[inline(always)]
        || {
            for kv in kvs.clone() {
                load(x.k, x.head(h.kv_heads, kv, true), h, s, &mut ks);
                load(x.v, x.head(h.kv_heads, kv, false), h, s, &mut vs);
                transpose(&ks, len, d, &mut kt);
                for head in kv * rep..(kv + 1) * rep {
                    load(x.q, x.head(h.heads, head, true), h, s, &mut qs);
                    for (i, qi) in qs.chunks_exact(d).enumerate() {
                        let keys = s.keys(i);
                        probabilities(qi, &kt, s, i, keys, scale, &mut p);
                        let at = x.layout.at(h.heads, len, d, head, i);
                        let oi = &mut out[at..at + d];
                        for (&pj, vj) in p[..keys].iter().zip(vs.chunks_exact(d)) {
                            axpy(oi, pj, vj);
                        }
                    }
                }
            }
        },
    );
    out
}

/// [`forward`]'s gradients for output gradient `g` (laid out as `q`): `dq`, `dk` and `dv`
/// of the sequence's rows, laid out as the inputs, with respect to `q` and `k` before their
/// rotation. With `P` the probabilities: `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ⊙ (dP - rowsum(dP ⊙ P))`, `dQ = dS K / √d`, `dK = dSᵀ Q / √d`.
/// The KV heads are split over up to `threads` threads, as [`forward`]'s.
pub(crate) fn backward(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, threads: usize) -> [Vec<f32>; 3] {
    let rep = h.heads / h.kv_heads;
    let mut parts = split_kv_heads(h.kv_heads, threads, |kvs| backward_heads(x, g, h, s, kvs)).into_iter();
    let (_, [mut dq, mut dk, mut dv]) = parts.next().expect("at least one range of KV heads");
    for (kvs, [pq, pk, pv]) in parts {
        copy_heads(&pq, &mut dq, x.layout, h.heads, s.len, h.d, kvs.start * rep..kvs.end * rep);
        copy_heads(&pk, &mut dk, x.layout, h.kv_heads, s.len, h.d, kvs.clone());
        copy_heads(&pv, &mut dv, x.layout, h.kv_heads, s.len, h.d, kvs);
    }
    [dq, dk, dv]
}

/// [`backward`] for the KV heads `kvs` and their query heads; the other heads' gradients zero.
fn backward_heads(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, kvs: std::ops::Range<usize>) -> [Vec<f32>; 3] {
    let (d, len, lp) = (h.d, s.len, padded(s.len));
    let rep = h.heads / h.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut dq = vec![0f32; h.heads * len * d];
    let (mut dk, mut dv) = (vec![0f32; h.kv_heads * len * d], vec![0f32; h.kv_heads * len * d]);
    let (mut ks, mut vs, mut qs, mut gs) = (vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d]);
    let (mut dks, mut dvs, mut dqs) = (vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d]);
    let (mut kt, mut vt) = (vec![0f32; d * lp], vec![0f32; d * lp]);
    let (mut p, mut dp) = (vec![0f32; lp], vec![0f32; lp]);
    simd::simd(
        #[inline(always)]
        || {
            for kv in kvs.clone() {
                load(x.k, x.head(h.kv_heads, kv, true), h, s, &mut ks);
                load(x.v, x.head(h.kv_heads, kv, false), h, s, &mut vs);
                transpose(&ks, len, d, &mut kt);
                transpose(&vs, len, d, &mut vt);
                dks.fill(0.0);
                dvs.fill(0.0);
                for head in kv * rep..(kv + 1) * rep {
                    load(x.q, x.head(h.heads, head, true), h, s, &mut qs);
                    load(g, x.head(h.heads, head, false), h, s, &mut gs);
                    for (i, ((qi, gi), dqi)) in qs.chunks_exact(d).zip(gs.chunks_exact(d)).zip(dqs.chunks_exact_mut(d)).enumerate() {
                        let keys = s.keys(i);
                        probabilities(qi, &kt, s, i, keys, scale, &mut p);
                        // dP = dO_i Vᵀ over the row's keys, and its rowsum with P
                        row_products(gi, &vt, lp, padded(keys), &mut dp);
                        let dpi = &mut dp[..keys];
                        let mut lanes = [0f32; L];
                        for (pc, dc) in p[..keys].chunks(L).zip(dpi.chunks(L)) {
                            for ((l, &a), &b) in lanes.iter_mut().zip(pc).zip(dc) {
                                *l += a * b;
                            }
                        }
                        let row: f32 = lanes.iter().sum();
                        // dS, then its products: each key's and value's share, and dQ_i
                        for ((j, dsj), &pj) in dpi.iter_mut().enumerate().zip(&p[..keys]) {
                            *dsj = pj * (*dsj - row);
                            axpy(&mut dks[j * d..(j + 1) * d], *dsj, qi);
                            axpy(&mut dvs[j * d..(j + 1) * d], pj, gi);
                        }
                        row_products(dpi, &ks, d, d, dqi);
                        dqi.iter_mut().for_each(|x| *x *= scale);
                    }
                    store(&dqs, x.head(h.heads, head, true), h, s, &mut dq);
                }
                dks.iter_mut().for_each(|x| *x *= scale);
                store(&dks, x.head(h.kv_heads, kv, true), h, s, &mut dk);
                store(&dvs, x.head(h.kv_heads, kv, false), h, s, &mut dv);
            }
        },
    );
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(n: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1., n, &Device::Cpu).unwrap().to_vec1().unwrap()
    }

    /// The KV heads' ranges: contiguous, in order, covering every head, at most `threads`
    /// of them (the merged result cannot show a split that did not happen).
    #[test]
    fn kv_heads_split_into_contiguous_ranges() {
        let ranges = |kv_heads: usize, threads: usize| -> Vec<std::ops::Range<usize>> {
            split_kv_heads(kv_heads, threads, |r| r.len())
                .into_iter()
                .map(|(r, len)| {
                    assert_eq!(r.len(), len);
                    r
                })
                .collect()
        };
        assert_eq!(ranges(3, 2), [0..2, 2..3]);
        assert_eq!(ranges(4, 3), [0..2, 2..4]);
        assert_eq!(ranges(4, 4), [0..1, 1..2, 2..3, 3..4]);
        assert_eq!(ranges(3, 1), vec![std::ops::Range { start: 0, end: 3 }]);
        assert_eq!(ranges(1, 2), vec![std::ops::Range { start: 0, end: 1 }]);
        assert_eq!(ranges(2, 0), vec![std::ops::Range { start: 0, end: 2 }]);
    }

    /// Forward and backward against the batched products' attention (`ops::attention`
    /// with a causal mask, or none), for one-token, odd-width and GQA sequences; and a
    /// causal mask that also hides the first key from every later row, so that masked keys
    /// lie before a row's last unmasked one (a causal mask's all lie after it).
    #[test]
    fn matches_the_batched_products() {
        let cases = [
            (4, 2, 8, 1, false, false),
            (9, 3, 64, 34, true, false),
            (2, 2, 20, 17, true, false),
            (3, 1, 16, 5, false, false),
            (2, 1, 16, 6, true, true),
        ];
        for (heads, kv_heads, d, len, causal, first_hidden) in cases {
            let rows = len + 3; // the sequence sits inside a longer row
            let start = 2;
            let dev = Device::Cpu;
            let (q, k, v, g) = (randn(heads * rows * d), randn(kv_heads * rows * d), randn(kv_heads * rows * d), randn(heads * rows * d));
            let hidden = |i: usize, j: usize| j > i || (first_hidden && i > 0 && j == 0);
            let m: Vec<f32> = (0..len * len).map(|x| if hidden(x / len, x % len) { f32::NEG_INFINITY } else { 0.0 }).collect();
            let s = Sequence { start, len, mask: causal.then_some(m.as_slice()) };
            let h = Heads { heads, kv_heads, d, rows };
            let x = Inputs { q: &q, k: &k, v: &v, layout: Layout::HeadMajor, rotary: None };
            let y = forward(&x, h, &s, 1);
            let [dq, dk, dv] = backward(&x, &g, h, &s, 1);
            // the KV heads split between threads: the same bits, in both layouts
            for threads in [2, 3] {
                assert_eq!(forward(&x, h, &s, threads), y, "value, {threads} threads");
                assert_eq!(backward(&x, &g, h, &s, threads), [dq.clone(), dk.clone(), dv.clone()], "gradients, {threads} threads");
                let t = Inputs { layout: Layout::TokenMajor, ..x };
                assert_eq!(forward(&t, h, &s, threads), forward(&t, h, &s, 1), "token-major value, {threads} threads");
                assert_eq!(backward(&t, &g, h, &s, threads), backward(&t, &g, h, &s, 1), "token-major gradients, {threads} threads");
            }
            // the reference on the same rows
            let part = |x: &[f32], n: usize| {
                Tensor::from_slice(x, (1, n, rows, d), &dev).unwrap().narrow(2, start, len).unwrap().contiguous().unwrap()
            };
            let (qt, kt, vt, gt) = (part(&q, heads), part(&k, kv_heads), part(&v, kv_heads), part(&g, heads));
            let mask = causal.then(|| Tensor::from_slice(&m, (1, 1, len, len), &dev).unwrap());
            let want = crate::runtime::ops::attention_forward(&qt, &kt, &vt, mask.as_ref()).unwrap();
            let (wq, wk, wv) = crate::runtime::ops::attention_backward(&qt, &kt, &vt, mask.as_ref(), &gt).unwrap();
            for (got, want, what) in [(&y, &want, "value"), (&dq, &wq, "dq"), (&dk, &wk, "dk"), (&dv, &wv, "dv")] {
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                let largest = want.iter().fold(1f32, |m, x| m.max(x.abs()));
                // f32::max drops a NaN, so a non-finite value fails here rather than passing
                assert!(got.iter().all(|x| x.is_finite()), "{what} of heads {heads}/{kv_heads}, d {d}, len {len}: not finite");
                let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-5 * largest, "{what} of heads {heads}/{kv_heads}, d {d}, len {len}: differs by {diff}");
            }
        }
    }
}

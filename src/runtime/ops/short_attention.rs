//! Attention of one short sequence on the CPU in f32: the per-sequence attention of a
//! training pass, forward and backward (the forward keeps its probabilities for the backward,
//! [`Probabilities`]; [`super::attention`]'s backward recomputes them, to keep memory linear
//! in a long sequence's length). On an AVX-512 CPU a head at a time, as products on the f32
//! kernel ([`products`]); elsewhere one query row at a time, as described below.
//!
//! Why: through batched OpenBLAS products and candle's elementwise ops, one sequence of
//! ~34 tokens and 9 heads took ~10 candle ops forward and ~20 backward (a copy of each of
//! q, k and v, the scale, the mask, the softmax and its backward), every one allocating a
//! tensor of a few kilobytes: attention was 8% of grouped training (`make bench`, sequences
//! of ~34 tokens) while its multiply-adds were under 1%. Here a row's scores, softmax and weighted sum run over two
//! scratch rows, the keys and values transposed once per sequence and KV head (per thread
//! that needs them, when a lone sequence's heads are split), so that
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
///
/// Each lane sums in four partial sums (`c` mod 4, the rest of `c` into the first), added
/// pairwise at the end: one chain of dependent adds would wait on each add's latency. The
/// vectors go four, then two, then one at a time ([`row_block`]), so that one broadcast of
/// `x_c` and one bounds check serve several vectors; every lane gets the same operations in
/// the same order whichever block computes it.
#[inline(always)]
fn row_products(x: &[f32], t: &[f32], stride: usize, width: usize, out: &mut [f32]) {
    let vectors = width / L;
    let mut v = 0;
    while v + 4 <= vectors {
        row_block::<4>(x, t, stride, v * L, &mut out[v * L..(v + 4) * L]);
        v += 4;
    }
    if v + 2 <= vectors {
        row_block::<2>(x, t, stride, v * L, &mut out[v * L..(v + 2) * L]);
        v += 2;
    }
    if v < vectors {
        row_block::<1>(x, t, stride, v * L, &mut out[v * L..(v + 1) * L]);
    }
    for (n, o) in out[..width].iter_mut().enumerate().skip(vectors * L) {
        *o = x.iter().enumerate().map(|(c, &xc)| xc * t[c * stride + n]).sum();
    }
}

/// [`row_products`]' columns `at .. at + N · L` into `out` (`N · L` values), their `4 · N`
/// partial sums in registers over the whole row.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the indexing is what keeps `acc` in registers (below)
fn row_block<const N: usize>(x: &[f32], t: &[f32], stride: usize, at: usize, out: &mut [f32]) {
    // indexed with constant bounds, so that the compiler unrolls the loops and keeps `acc`
    // in registers (written with iterators over the arrays, it kept `acc` in memory and added
    // one lane at a time: 3x slower than one vector at a time)
    let mut acc = [[[0f32; L]; N]; 4];
    let lanes = |row: &[f32], w: usize| -> [f32; L] { row[at + w * L..at + (w + 1) * L].try_into().expect("L lanes") };
    let whole = x.len() / 4 * 4;
    for c in (0..whole).step_by(4) {
        for k in 0..4 {
            let (xc, row) = (x[c + k], &t[(c + k) * stride..]);
            for w in 0..N {
                let tv = lanes(row, w);
                for l in 0..L {
                    acc[k][w][l] += xc * tv[l];
                }
            }
        }
    }
    for c in whole..x.len() {
        let (xc, row) = (x[c], &t[c * stride..]);
        for w in 0..N {
            let tv = lanes(row, w);
            for l in 0..L {
                acc[0][w][l] += xc * tv[l];
            }
        }
    }
    for w in 0..N {
        for l in 0..L {
            out[w * L + l] = (acc[0][w][l] + acc[1][w][l]) + (acc[2][w][l] + acc[3][w][l]);
        }
    }
}

/// `out[e] = Σ_t w_t · x_t[e]` for `e < out.len()` over the `terms()` `(w_t, x_t)` in order,
/// each lane summed from zero in one running sum: what an [`axpy`] per term into a zeroed
/// `out` computes, the same operations in the same order, but with the sums in registers
/// ([`sum_block`]) rather than loaded and stored again for every term.
#[inline(always)]
fn weighted_sum<'a, I: Iterator<Item = (f32, &'a [f32])>>(terms: impl Fn() -> I, out: &mut [f32]) {
    let vectors = out.len() / L;
    let mut v = 0;
    while v + 4 <= vectors {
        sum_block::<4, _>(terms(), v * L, &mut out[v * L..(v + 4) * L]);
        v += 4;
    }
    if v + 2 <= vectors {
        sum_block::<2, _>(terms(), v * L, &mut out[v * L..(v + 2) * L]);
        v += 2;
    }
    if v < vectors {
        sum_block::<1, _>(terms(), v * L, &mut out[v * L..(v + 1) * L]);
    }
    for (e, o) in out.iter_mut().enumerate().skip(vectors * L) {
        *o = terms().fold(0.0, |sum, (w, x)| sum + w * x[e]);
    }
}

/// [`weighted_sum`]'s lanes `at .. at + N · L` into `out` (`N · L` values).
#[inline(always)]
fn sum_block<'a, const N: usize, I: Iterator<Item = (f32, &'a [f32])>>(terms: I, at: usize, out: &mut [f32]) {
    let mut acc = [[0f32; L]; N];
    for (w, x) in terms {
        for b in 0..N {
            let xv: [f32; L] = x[at + b * L..at + (b + 1) * L].try_into().expect("L lanes");
            for l in 0..L {
                acc[b][l] += w * xv[l];
            }
        }
    }
    for b in 0..N {
        out[b * L..(b + 1) * L].copy_from_slice(&acc[b]);
    }
}

/// Row `i`'s probabilities over its first `keys` keys into `p[..keys]`: `q_i kᵀ · scale +
/// mask`, then the softmax. `kt` is the keys transposed, `[d, padded(len)]`.
#[inline(always)]
fn probabilities(qi: &[f32], kt: &[f32], s: &Sequence, i: usize, keys: usize, scale: f32, p: &mut [f32]) {
    row_products(qi, kt, padded(s.len), padded(keys), p);
    softmax_row(&mut p[..keys], s, i, scale);
}

/// Row `i`'s scores over its keys (`p`, `q_i kᵀ`) into its probabilities, in place: the scale,
/// the mask, then the softmax.
#[inline(always)]
fn softmax_row(p: &mut [f32], s: &Sequence, i: usize, scale: f32) {
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

/// `part(heads)` for the query heads split evenly over up to `threads` threads: each part's
/// output (`[heads, len, d]` laid out as `layout`, only its own heads written) copied into the
/// first part's, and what the parts kept, in head order.
fn over_query_heads<K: Send>(
    layout: Layout,
    h: Heads,
    len: usize,
    threads: usize,
    part: impl Fn(std::ops::Range<usize>) -> (Vec<f32>, Vec<K>) + Sync,
) -> (Vec<f32>, Vec<K>) {
    use crate::runtime::parallel::{even_ranges, run_parts};
    let mut parts = run_parts(even_ranges(h.heads, threads), |r| (r.clone(), part(r))).into_iter();
    let (_, (mut out, mut kept)) = parts.next().expect("at least one range of query heads");
    for (heads, (other, k)) in parts {
        copy_heads(&other, &mut out, layout, h.heads, len, h.d, heads);
        kept.extend(k);
    }
    (out, kept)
}

/// `softmax(q kᵀ / √d + mask) v` of sequence `s`, its `len` rows laid out as the inputs
/// (`[heads, len, d]` or `[len, heads · d]`), the query heads split over up to `threads`
/// threads (each head computed by the same code whatever the split: the same numbers); and
/// the probabilities, for [`backward`].
///
/// Why query heads: a sequence trained alone is the only segment of its pass, so nothing
/// else shares the second core while its attention runs (a 128-token sequence's attention
/// costs ~2.5 ms a layer on one core here, forward and backward), and SmolLM2's 3 KV heads
/// split 2 : 1 over two cores, its 9 query heads 5 : 4.
pub(crate) fn forward(x: &Inputs, h: Heads, s: &Sequence, threads: usize) -> (Vec<f32>, Probabilities) {
    if on_kernel(h) && s.len > 0 {
        return products::forward(x, h, s, threads);
    }
    let (out, values) = over_query_heads(x.layout, h, s.len, threads, |r| forward_heads(x, h, s, r));
    (out, Probabilities { values, heads: h.heads, rows: s.len })
}

/// The probabilities of a sequence's query heads, as [`forward`] computed them, kept for
/// [`backward`]: head `h`'s row `i` over its `keys(i)` keys at `h · total + offsets[i]`,
/// `offsets` the running sum of the rows' keys ([`row_offsets`]) and `total` its last.
///
/// Why: recomputing them (the products `q kᵀ` and the softmax) was half of the backward's
/// time, and a sequence of up to [`MAX_LEN`] rows keeps at most `heads · len (len + 1) / 2`
/// values per layer under a causal mask, `heads · len²` without one (SmolLM2's 9 heads at
/// 256 causal tokens: 1.2 MB a layer, 35 MB over its 30 layers).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Probabilities {
    values: Vec<f32>,
    /// The query heads and the rows (the sequence's length) they were computed for.
    heads: usize,
    rows: usize,
}

/// Where each row's keys start when the rows lie one after another: `offsets[i]` is the sum
/// of the keys of the rows before `i`; `len + 1` entries, the last the total.
fn row_offsets(keys: &[usize]) -> Vec<usize> {
    let mut offsets = vec![0usize; keys.len() + 1];
    for (i, &k) in keys.iter().enumerate() {
        offsets[i + 1] = offsets[i] + k;
    }
    offsets
}

/// The rows of the KV head a thread is working on: keys and values loaded (`ks`, `vs`
/// `[len, d]`, keys rotated) and transposed (`kt`, and `vt` when asked for, `[d, padded(len)]`),
/// loaded again only when the KV head changes.
struct KvRows {
    loaded: Option<usize>,
    ks: Vec<f32>,
    vs: Vec<f32>,
    kt: Vec<f32>,
    vt: Option<Vec<f32>>,
}

impl KvRows {
    fn new(len: usize, d: usize, values_transposed: bool) -> Self {
        let (n, nt) = (len * d, d * padded(len));
        Self { loaded: None, ks: vec![0f32; n], vs: vec![0f32; n], kt: vec![0f32; nt], vt: values_transposed.then(|| vec![0f32; nt]) }
    }

    /// KV head `kv`'s rows, loaded unless they already are.
    #[inline(always)]
    fn load(&mut self, x: &Inputs, h: Heads, s: &Sequence, kv: usize) {
        if self.loaded == Some(kv) {
            return;
        }
        load(x.k, x.head(h.kv_heads, kv, true), h, s, &mut self.ks);
        load(x.v, x.head(h.kv_heads, kv, false), h, s, &mut self.vs);
        transpose(&self.ks, s.len, h.d, &mut self.kt);
        if let Some(vt) = &mut self.vt {
            transpose(&self.vs, s.len, h.d, vt);
        }
        self.loaded = Some(kv);
    }
}

/// [`forward`] for the query heads `heads`, the other heads' outputs zero; and those heads'
/// probabilities, laid out as in [`Probabilities`].
fn forward_heads(x: &Inputs, h: Heads, s: &Sequence, heads: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
    let (d, len, lp) = (h.d, s.len, padded(s.len));
    let rep = h.heads / h.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut out = vec![0f32; h.heads * len * d];
    let keys: Vec<usize> = (0..len).map(|i| s.keys(i)).collect();
    let mut kept = Vec::with_capacity(heads.len() * keys.iter().sum::<usize>());
    let mut kv_rows = KvRows::new(len, d, false);
    let (mut qs, mut p) = (vec![0f32; len * d], vec![0f32; lp]);
    simd::simd(
        #[inline(always)]
        || {
            for head in heads.clone() {
                kv_rows.load(x, h, s, head / rep);
                let KvRows { kt, vs, .. } = &kv_rows;
                load(x.q, x.head(h.heads, head, true), h, s, &mut qs);
                for (i, (qi, &keys)) in qs.chunks_exact(d).zip(&keys).enumerate() {
                    probabilities(qi, kt, s, i, keys, scale, &mut p);
                    let at = x.layout.at(h.heads, len, d, head, i);
                    let p = &p[..keys];
                    weighted_sum(|| p.iter().copied().zip(vs.chunks_exact(d)), &mut out[at..at + d]);
                    kept.extend_from_slice(p);
                }
            }
        },
    );
    (out, kept)
}

/// [`forward`]'s gradients for output gradient `g` (laid out as `q`): `dq`, `dk` and `dv`
/// of the sequence's rows, laid out as the inputs, with respect to `q` and `k` before their
/// rotation. With `P` the probabilities: `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ⊙ (dP - rowsum(dP ⊙ P))`, `dQ = dS K / √d`, `dK = dSᵀ Q / √d`.
///
/// Where the kernel runs ([`on_kernel`]), as products a head at a time ([`products`]).
/// Otherwise row at a time: on one thread, one pass over each KV head's query heads
/// ([`backward_heads`]); on more, two phases ([`backward_split`]): split by KV heads,
/// SmolLM2's 3 would leave two cores at 2 : 1,
/// and a KV head's `dK` and `dV` sum over its query heads, so those cannot simply be split
/// by query heads. Every sum keeps its order, so the numbers are the same bits whatever
/// `threads`.
///
/// `kept`: the probabilities [`forward`] returned for these inputs, or `None` to recompute
/// them (the same code, so the same bits either way). Panics if `kept` has the wrong size
/// for this sequence.
pub(crate) fn backward(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, threads: usize, kept: Option<&Probabilities>) -> [Vec<f32>; 3] {
    let keys: Vec<usize> = (0..s.len).map(|i| s.keys(i)).collect();
    let offsets = row_offsets(&keys);
    if let Some(kept) = kept {
        let shape = (kept.heads, kept.rows, kept.values.len());
        assert_eq!(shape, (h.heads, s.len, h.heads * offsets[s.len]), "short_attention::backward: probabilities kept for another sequence");
    }
    let rows = Rows { keys, offsets, kept };
    if on_kernel(h) && s.len > 0 {
        return products::backward(x, g, h, s, threads, &rows);
    }
    if threads <= 1 {
        return backward_heads(x, g, h, s, &rows);
    }
    backward_split(x, g, h, s, threads, &rows)
}

/// What the backward paths know of a sequence's rows: each row's `keys`, where its keys
/// start in a row-after-row layout (`offsets`, [`row_offsets`]), and the forward's
/// probabilities when kept.
struct Rows<'a> {
    keys: Vec<usize>,
    offsets: Vec<usize>,
    kept: Option<&'a Probabilities>,
}

impl Rows<'_> {
    /// Row `i`'s probabilities in head `head` (over its keys): the kept ones, or computed
    /// into `p` by [`probabilities`] (the same code the forward ran, so the same bits).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn probabilities<'p>(&'p self, head: usize, i: usize, qi: &[f32], kt: &[f32], s: &Sequence, scale: f32, p: &'p mut [f32]) -> &'p [f32] {
        let ki = self.keys[i];
        match self.kept {
            Some(kept) => &kept.values[head * self.offsets[s.len] + self.offsets[i]..][..ki],
            None => {
                probabilities(qi, kt, s, i, ki, scale, p);
                &p[..ki]
            }
        }
    }
}

/// One query head's rows, kept by the first phase of [`backward_split`] for its second:
/// the queries `q` (rotated as loaded) and output gradients `g` `[len, d]`, and each row's
/// probabilities `p` (the forward's, or recomputed) and `ds` over its keys, the rows one after another (row `i` from the
/// sum of the earlier rows' keys: about half of `[len, len]` under a causal mask, and
/// written once, never zeroed).
struct HeadRows {
    q: Vec<f32>,
    g: Vec<f32>,
    p: Vec<f32>,
    ds: Vec<f32>,
}

/// [`backward`] over up to `threads` threads, in two phases:
/// 1. the query heads split evenly: each row's `P` (unless kept), `dS` and `dQ` (rows are
///    independent);
/// 2. the keys of every KV head split by their work (a key's share of rows): each key's `dK`
///    and `dV` rows, summed over the KV head's query heads and their rows in the order
///    [`backward_heads`] sums them, so each element gets the same additions in the same order.
fn backward_split(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, threads: usize, seq_rows: &Rows) -> [Vec<f32>; 3] {
    use crate::runtime::parallel::run_parts;
    let (d, len, lp) = (h.d, s.len, padded(s.len));
    let rep = h.heads / h.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    // where row i's probabilities start in a `HeadRows`: the sum of the earlier rows' keys
    let (keys, offsets) = (&seq_rows.keys, &seq_rows.offsets);

    // 1. per query head: P, dS and dQ of every row
    let phase1 = |heads: std::ops::Range<usize>| -> (Vec<f32>, Vec<HeadRows>) {
        let mut dq = vec![0f32; h.heads * len * d];
        let mut kept = Vec::with_capacity(heads.len());
        let mut kv_rows = KvRows::new(len, d, true);
        let mut dqs = vec![0f32; len * d];
        let (mut p, mut dp) = (vec![0f32; lp], vec![0f32; lp]);
        simd::simd(
            #[inline(always)]
            || {
                for head in heads.clone() {
                    kv_rows.load(x, h, s, head / rep);
                    let KvRows { ks, kt, vt, .. } = &kv_rows;
                    let vt = vt.as_deref().expect("values transposed");
                    let mut r = HeadRows {
                        q: vec![0f32; len * d],
                        g: vec![0f32; len * d],
                        p: Vec::with_capacity(offsets[len]),
                        ds: Vec::with_capacity(offsets[len]),
                    };
                    load(x.q, x.head(h.heads, head, true), h, s, &mut r.q);
                    load(g, x.head(h.heads, head, false), h, s, &mut r.g);
                    for (i, ((qi, gi), dqi)) in r.q.chunks_exact(d).zip(r.g.chunks_exact(d)).zip(dqs.chunks_exact_mut(d)).enumerate() {
                        let ki = keys[i];
                        let pi = seq_rows.probabilities(head, i, qi, kt, s, scale, &mut p);
                        row_products(gi, vt, lp, padded(ki), &mut dp);
                        let dpi = &mut dp[..ki];
                        let row = row_sum(pi, dpi);
                        for (dsj, &pj) in dpi.iter_mut().zip(pi) {
                            *dsj = pj * (*dsj - row);
                        }
                        r.p.extend_from_slice(pi);
                        r.ds.extend_from_slice(dpi);
                        row_products(dpi, ks, d, d, dqi);
                        dqi.iter_mut().for_each(|x| *x *= scale);
                    }
                    store(&dqs, x.head(h.heads, head, true), h, s, &mut dq);
                    kept.push(r);
                }
            },
        );
        (dq, kept)
    };
    let (dq, rows) = over_query_heads(x.layout, h, len, threads, phase1);

    // 2. per (KV head, key): dK and dV rows, the keys split by the rows that see them
    // key j's work: the rows that see it (keys(i) > j), plus one so that no unit weighs 0
    let mut seen_by = vec![0usize; len + 1];
    keys.iter().for_each(|&k| seen_by[k] += 1);
    for j in (0..len).rev() {
        seen_by[j] += seen_by[j + 1];
    }
    let work: Vec<usize> = (0..h.kv_heads * len).map(|u| seen_by[u % len + 1] + 1).collect();
    // the first row that sees each key (none before it does; `len` when no row does)
    let first: Vec<usize> = (0..len).map(|j| keys.iter().position(|&k| k > j).unwrap_or(len)).collect();
    let phase2 = |units: std::ops::Range<usize>| -> (std::ops::Range<usize>, Vec<f32>, Vec<f32>) {
        let (mut dks, mut dvs) = (vec![0f32; units.len() * d], vec![0f32; units.len() * d]);
        simd::simd(
            #[inline(always)]
            || {
                let mut u = units.start;
                while u < units.end {
                    // this KV head's keys j0..j1 in the range, in backward_heads' loop order
                    let kv = u / len;
                    let (j0, j1) = (u % len, (units.end - kv * len).min(len));
                    let heads = &rows[kv * rep..(kv + 1) * rep];
                    for j in j0..j1 {
                        // the rows that see key j, head after head, in order
                        let terms = |part: fn(&HeadRows) -> (&[f32], &[f32])| {
                            let (keys, offsets, first) = (&keys, &offsets, &first);
                            heads.iter().flat_map(move |r| {
                                let (w, x) = part(r);
                                (first[j]..len).filter(move |&i| j < keys[i]).map(move |i| (w[offsets[i] + j], &x[i * d..(i + 1) * d]))
                            })
                        };
                        let at = (kv * len + j - units.start) * d;
                        weighted_sum(|| terms(|r| (&r.ds, &r.q)), &mut dks[at..at + d]);
                        weighted_sum(|| terms(|r| (&r.p, &r.g)), &mut dvs[at..at + d]);
                    }
                    u = kv * len + j1;
                }
            },
        );
        dks.iter_mut().for_each(|x| *x *= scale);
        (units, dks, dvs)
    };
    let (mut dks, mut dvs) = (vec![0f32; h.kv_heads * len * d], vec![0f32; h.kv_heads * len * d]);
    for (units, pk, pv) in run_parts(weighted_ranges(&work, threads), phase2) {
        dks[units.start * d..units.end * d].copy_from_slice(&pk);
        dvs[units.start * d..units.end * d].copy_from_slice(&pv);
    }
    let (mut dk, mut dv) = (vec![0f32; h.kv_heads * len * d], vec![0f32; h.kv_heads * len * d]);
    for kv in 0..h.kv_heads {
        let rows = kv * len * d..(kv + 1) * len * d;
        store(&dks[rows.clone()], x.head(h.kv_heads, kv, true), h, s, &mut dk);
        store(&dvs[rows], x.head(h.kv_heads, kv, false), h, s, &mut dv);
    }
    [dq, dk, dv]
}

/// `Σ p_j · dp_j` over 16 lanes, then the lanes in order: [`backward_heads`]' and
/// [`backward_split`]'s row sum, one definition so that both get the same bits.
#[inline(always)]
fn row_sum(p: &[f32], dp: &[f32]) -> f32 {
    let mut lanes = [0f32; L];
    for (pc, dc) in p.chunks(L).zip(dp.chunks(L)) {
        for ((l, &a), &b) in lanes.iter_mut().zip(pc).zip(dc) {
            *l += a * b;
        }
    }
    lanes.iter().sum()
}

/// `0..work.len()` in at most `threads` contiguous, non-empty ranges of about equal total
/// `work`, in order; one empty range for no units.
fn weighted_ranges(work: &[usize], threads: usize) -> Vec<std::ops::Range<usize>> {
    let total: usize = work.iter().sum();
    let threads = threads.max(1);
    let mut ranges = Vec::with_capacity(threads);
    let (mut start, mut sum) = (0, 0);
    for (u, &w) in work.iter().enumerate() {
        sum += w;
        // cut once this range holds its share of the total
        if sum * threads >= total * (ranges.len() + 1) && ranges.len() + 1 < threads {
            ranges.push(start..u + 1);
            start = u + 1;
        }
    }
    if start < work.len() || ranges.is_empty() {
        ranges.push(start..work.len());
    }
    ranges
}

/// [`backward`] on one thread: each KV head's query heads, row after row.
fn backward_heads(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, rows: &Rows) -> [Vec<f32>; 3] {
    let (d, len, lp) = (h.d, s.len, padded(s.len));
    let rep = h.heads / h.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut dq = vec![0f32; h.heads * len * d];
    let (mut dk, mut dv) = (vec![0f32; h.kv_heads * len * d], vec![0f32; h.kv_heads * len * d]);
    let mut kv_rows = KvRows::new(len, d, true);
    let (mut qs, mut gs) = (vec![0f32; len * d], vec![0f32; len * d]);
    let (mut dks, mut dvs, mut dqs) = (vec![0f32; len * d], vec![0f32; len * d], vec![0f32; len * d]);
    let (mut p, mut dp) = (vec![0f32; lp], vec![0f32; lp]);
    simd::simd(
        #[inline(always)]
        || {
            for kv in 0..h.kv_heads {
                kv_rows.load(x, h, s, kv);
                let KvRows { ks, kt, vt, .. } = &kv_rows;
                let vt = vt.as_deref().expect("values transposed");
                dks.fill(0.0);
                dvs.fill(0.0);
                for head in kv * rep..(kv + 1) * rep {
                    load(x.q, x.head(h.heads, head, true), h, s, &mut qs);
                    load(g, x.head(h.heads, head, false), h, s, &mut gs);
                    for (i, ((qi, gi), dqi)) in qs.chunks_exact(d).zip(gs.chunks_exact(d)).zip(dqs.chunks_exact_mut(d)).enumerate() {
                        let keys = rows.keys[i];
                        let pi = rows.probabilities(head, i, qi, kt, s, scale, &mut p);
                        // dP = dO_i Vᵀ over the row's keys, and its rowsum with P
                        row_products(gi, vt, lp, padded(keys), &mut dp);
                        let dpi = &mut dp[..keys];
                        let row = row_sum(pi, dpi);
                        // dS, then its products: each key's and value's share, and dQ_i
                        for ((j, dsj), &pj) in dpi.iter_mut().enumerate().zip(pi) {
                            *dsj = pj * (*dsj - row);
                            axpy(&mut dks[j * d..(j + 1) * d], *dsj, qi);
                            axpy(&mut dvs[j * d..(j + 1) * d], pj, gi);
                        }
                        row_products(dpi, ks, d, d, dqi);
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

/// Whether a sequence's attention takes the f32 kernel ([`products`]): an AVX-512 CPU and a
/// head dimension of whole 16-lane vectors (SmolLM2's 64, Qwen's 128). (The callers also
/// leave an empty sequence to the row path, which returns empty outputs: the kernel takes
/// no product without columns.) Tests can send it down the row-at-a-time path instead
/// (`tests::rows_path`).
fn on_kernel(h: Heads) -> bool {
    #[cfg(test)]
    if tests::ROWS_PATH.with(|r| r.get()) {
        return false;
    }
    crate::runtime::sgemm::available() && h.d.is_multiple_of(L) && h.d > 0
}

/// Attention of one sequence as products on the f32 kernel, a head at a time: `S = Q Kᵀ`,
/// `O = P V` forward; `dP = dO Vᵀ`, `dQ = dS K` per query head and `dK = Σ dSᵀ Q`,
/// `dV = Σ Pᵀ dO` over a KV head's query heads backward.
///
/// Why: row at a time ([`row_products`], [`weighted_sum`]), a 128-token sequence's attention
/// ran at ~40 GFLOP/s on two cores, 11% of a 128-token training step (README, "Where a
/// single-adapter f32 step goes"). As kernel products, even counting the masked half of the
/// scores that they compute and drop (a row's scores past its keys, exact zeros in `P` and
/// `dS` for the products after), a 128-token sequence's 9 heads on two threads took 349-370 µs
/// forward and 563-582 backward, against 415-441 and 814-864 row at a time (README, thirtieth
/// session); at 34 tokens the two are about even.
///
/// Every value is computed from its own sequence by the same products whatever the threads
/// (a kernel's output row depends on its input row alone, `dK` and `dV` row ranges split
/// between threads), so the bits are the same alone and in a group, on one thread and two.
/// They are not the row-at-a-time path's: the sums run in another order.
mod products {
    use super::*;
    use crate::runtime::ops::low_rank::transpose;
    use crate::runtime::parallel::{even_ranges, run_parts};
    use crate::runtime::sgemm;

    /// A KV head's keys (rotated) and values, `kp`, `vp` `[padded(len), d]`, the padding rows
    /// zero (the right-hand sides of products whose reduction runs over `padded(len)` keys),
    /// and transposed, `kt`, `vt` `[d, padded(len)]` (the padding columns zero; `vt` only for
    /// the backward, which alone reads it, empty otherwise).
    struct Kv {
        kp: Vec<f32>,
        vp: Vec<f32>,
        kt: Vec<f32>,
        vt: Vec<f32>,
    }

    impl Kv {
        fn load(x: &Inputs, h: Heads, s: &Sequence, kv: usize, values_transposed: bool) -> Self {
            let (d, len, lp) = (h.d, s.len, padded(s.len));
            let (mut kp, mut vp) = (vec![0f32; lp * d], vec![0f32; lp * d]);
            load(x.k, x.head(h.kv_heads, kv, true), h, s, &mut kp[..len * d]);
            load(x.v, x.head(h.kv_heads, kv, false), h, s, &mut vp[..len * d]);
            let kt = transpose(&kp, lp, d);
            let vt = if values_transposed { transpose(&vp, lp, d) } else { Vec::new() };
            Self { kp, vp, kt, vt }
        }
    }

    /// `g @ w` on the kernel, on this thread: `g` `[m, k]`, `w` `[k, n]`.
    fn product(g: &[f32], m: usize, w: &[f32], k: usize, n: usize) -> Vec<f32> {
        sgemm::matmul_plain(g, m, w, k, n, 1).expect("on_kernel checked the kernel and the widths")
    }

    /// One query head's probabilities, `[len, padded(len)]`, row `i` zero past its `keys[i]`:
    /// the scores `q kᵀ` as one product, then [`softmax_row`] on each row's keys.
    fn head_probabilities(qs: &[f32], kt: &[f32], h: Heads, s: &Sequence, keys: &[usize], scale: f32) -> Vec<f32> {
        let lp = padded(s.len);
        let mut p = product(qs, s.len, kt, h.d, lp);
        simd::simd(
            #[inline(always)]
            || {
                for (i, (row, &ki)) in p.chunks_exact_mut(lp).zip(keys).enumerate() {
                    softmax_row(&mut row[..ki], s, i, scale);
                    row[ki..].fill(0.0);
                }
            },
        );
        p
    }

    /// [`super::forward`] on the kernel: the query heads split over up to `threads` threads.
    pub(super) fn forward(x: &Inputs, h: Heads, s: &Sequence, threads: usize) -> (Vec<f32>, Probabilities) {
        let (out, values) = over_query_heads(x.layout, h, s.len, threads, |r| forward_heads(x, h, s, r));
        (out, Probabilities { values, heads: h.heads, rows: s.len })
    }

    /// [`forward`] for the query heads `heads` (the others' outputs zero), and their
    /// probabilities laid out as in [`Probabilities`].
    fn forward_heads(x: &Inputs, h: Heads, s: &Sequence, heads: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let (d, len, lp) = (h.d, s.len, padded(s.len));
        let rep = h.heads / h.kv_heads;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let keys: Vec<usize> = (0..len).map(|i| s.keys(i)).collect();
        let mut out = vec![0f32; h.heads * len * d];
        let mut kept = Vec::with_capacity(heads.len() * keys.iter().sum::<usize>());
        let mut kv: Option<(usize, Kv)> = None;
        let mut qs = vec![0f32; len * d];
        for head in heads {
            if kv.as_ref().is_none_or(|(j, _)| *j != head / rep) {
                kv = Some((head / rep, Kv::load(x, h, s, head / rep, false)));
            }
            let Some((_, Kv { kt, vp, .. })) = &kv else { unreachable!("loaded above") };
            load(x.q, x.head(h.heads, head, true), h, s, &mut qs);
            // 1. P [len, lp], then O = P V [len, d]
            let p = head_probabilities(&qs, kt, h, s, &keys, scale);
            let o = product(&p, len, vp, lp, d);
            for (i, (oi, &ki)) in o.chunks_exact(d).zip(&keys).enumerate() {
                let at = x.layout.at(h.heads, len, d, head, i);
                out[at..at + d].copy_from_slice(oi);
                kept.extend_from_slice(&p[i * lp..i * lp + ki]);
            }
        }
        (out, kept)
    }

    /// One query head's rows kept by [`backward`]'s first phase for its second: the queries
    /// `q` and output gradients `g` `[len, d]`, and `Pᵀ`, `dSᵀ` `[padded(len), len]`.
    struct HeadProducts {
        q: Vec<f32>,
        g: Vec<f32>,
        pt: Vec<f32>,
        dst: Vec<f32>,
    }

    /// [`super::backward`] on the kernel, over up to `threads` threads, in two phases:
    /// 1. the query heads split evenly: each head's `P` (kept or recomputed), `dP = dO Vᵀ`,
    ///    `dS = P ⊙ (dP - rowsum(dP ⊙ P))` and `dQ = dS K / √d`;
    /// 2. the keys split evenly: for every KV head, its keys' rows of `dK = Σ dSᵀ Q / √d` and
    ///    `dV = Σ Pᵀ dO`, the sums over its query heads as one product each (head after head
    ///    in the reduction).
    pub(super) fn backward(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, threads: usize, rows: &Rows) -> [Vec<f32>; 3] {
        let (d, len, lp) = (h.d, s.len, padded(s.len));
        let rep = h.heads / h.kv_heads;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let keys = &rows.keys;

        // 1. per query head: P, dS and dQ
        let phase1 = |heads: std::ops::Range<usize>| -> (Vec<f32>, Vec<HeadProducts>) {
            let mut dq = vec![0f32; h.heads * len * d];
            let mut kept = Vec::with_capacity(heads.len());
            let mut kv: Option<(usize, Kv)> = None;
            for head in heads {
                if kv.as_ref().is_none_or(|(j, _)| *j != head / rep) {
                    kv = Some((head / rep, Kv::load(x, h, s, head / rep, true)));
                }
                let Some((_, Kv { kp, kt, vt, .. })) = &kv else { unreachable!("loaded above") };
                let (mut q, mut gs) = (vec![0f32; len * d], vec![0f32; len * d]);
                load(x.q, x.head(h.heads, head, true), h, s, &mut q);
                load(g, x.head(h.heads, head, false), h, s, &mut gs);
                let p = match rows.kept {
                    Some(kept) => {
                        let mut p = vec![0f32; len * lp];
                        for (i, row) in p.chunks_exact_mut(lp).enumerate() {
                            let at = head * rows.offsets[len] + rows.offsets[i];
                            row[..keys[i]].copy_from_slice(&kept.values[at..at + keys[i]]);
                        }
                        p
                    }
                    None => head_probabilities(&q, kt, h, s, keys, scale),
                };
                // dP [len, lp], into dS in place (zero past each row's keys, as P)
                let mut ds = product(&gs, len, vt, d, lp);
                simd::simd(
                    #[inline(always)]
                    || {
                        for ((dsi, pi), &ki) in ds.chunks_exact_mut(lp).zip(p.chunks_exact(lp)).zip(keys) {
                            let row = row_sum(&pi[..ki], &dsi[..ki]);
                            for (dsj, &pj) in dsi[..ki].iter_mut().zip(&pi[..ki]) {
                                *dsj = pj * (*dsj - row);
                            }
                            dsi[ki..].fill(0.0);
                        }
                    },
                );
                let mut dqs = product(&ds, len, kp, lp, d);
                dqs.iter_mut().for_each(|v| *v *= scale);
                store(&dqs, x.head(h.heads, head, true), h, s, &mut dq);
                kept.push(HeadProducts { q, g: gs, pt: transpose(&p, len, lp), dst: transpose(&ds, len, lp) });
            }
            (dq, kept)
        };
        let (dq, heads) = over_query_heads(x.layout, h, len, threads, phase1);

        // 2. per KV head, the keys' rows of dK and dV: `len` rows of `[lp, len] × [len, d]`
        //    products summed over the KV head's query heads
        let phase2 = |js: std::ops::Range<usize>| -> (std::ops::Range<usize>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
            let (mut dks, mut dvs) = (Vec::with_capacity(h.kv_heads), Vec::with_capacity(h.kv_heads));
            for kv in 0..h.kv_heads {
                let group = &heads[kv * rep..(kv + 1) * rep];
                let terms = |left: fn(&HeadProducts) -> &[f32], right: fn(&HeadProducts) -> &[f32]| -> Vec<(&[f32], &[f32], usize)> {
                    group.iter().map(|r| (&left(r)[js.start * len..js.end * len], right(r), len)).collect()
                };
                let sum = |terms: Vec<(&[f32], &[f32], usize)>| {
                    sgemm::matmul_plain_sum(&terms, js.len(), d, 1).expect("on_kernel checked the kernel and the widths")
                };
                let mut dk = sum(terms(|r| &r.dst, |r| &r.q));
                dk.iter_mut().for_each(|v| *v *= scale);
                dks.push(dk);
                dvs.push(sum(terms(|r| &r.pt, |r| &r.g)));
            }
            (js, dks, dvs)
        };
        let (mut dk, mut dv) = (vec![0f32; h.kv_heads * len * d], vec![0f32; h.kv_heads * len * d]);
        let (mut dks, mut dvs) = (vec![vec![0f32; len * d]; h.kv_heads], vec![vec![0f32; len * d]; h.kv_heads]);
        for (range, pk, pv) in run_parts(even_ranges(len, threads), phase2) {
            for kv in 0..h.kv_heads {
                dks[kv][range.start * d..range.end * d].copy_from_slice(&pk[kv]);
                dvs[kv][range.start * d..range.end * d].copy_from_slice(&pv[kv]);
            }
        }
        for kv in 0..h.kv_heads {
            store(&dks[kv], x.head(h.kv_heads, kv, true), h, s, &mut dk);
            store(&dvs[kv], x.head(h.kv_heads, kv, false), h, s, &mut dv);
        }
        [dq, dk, dv]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    thread_local! {
        /// Set by [`rows_path`]: [`on_kernel`] answers no on this thread.
        pub(super) static ROWS_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// `f` with this thread's attention on the row-at-a-time path, as on a CPU without the
    /// kernel. (The path is chosen on the calling thread, so the threads a sequence's heads
    /// split onto follow it.)
    pub(super) fn rows_path<R>(f: impl FnOnce() -> R) -> R {
        ROWS_PATH.with(|r| r.set(true));
        let out = f();
        ROWS_PATH.with(|r| r.set(false));
        out
    }

    fn randn(n: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1., n, &Device::Cpu).unwrap().to_vec1().unwrap()
    }

    /// [`backward`] from the probabilities [`forward`] kept, after checking that it gives the
    /// bits of the backward that recomputes them.
    fn backward_kept(x: &Inputs, g: &[f32], h: Heads, s: &Sequence, threads: usize) -> [Vec<f32>; 3] {
        let (_, kept) = forward(x, h, s, threads);
        let grads = backward(x, g, h, s, threads, Some(&kept));
        assert_eq!(grads, backward(x, g, h, s, threads, None), "kept against recomputed probabilities, {threads} threads");
        grads
    }

    /// The blocked loops give the bits of the plain loops they replaced, for widths of whole
    /// vectors and tails and rows of any length: [`row_products`] four partial sums (`c` mod
    /// 4, the rest into the first) added pairwise, [`weighted_sum`] an [`axpy`] per term.
    #[test]
    fn blocked_loops_give_the_plain_loops_bits() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for width in [1, 15, 16, 17, 32, 48, 64, 80, 112, 128, 131] {
            for n in [1, 2, 3, 4, 5, 7, 8, 33] {
                let stride = width + 5;
                let (x, t) = (randn(n), randn(n * stride));
                let mut got = vec![0f32; width];
                row_products(&x, &t, stride, width, &mut got);
                let whole = n / 4 * 4;
                let want: Vec<f32> = (0..width)
                    .map(|e| {
                        if e < width / L * L {
                            let mut acc = [0f32; 4];
                            for c in 0..n {
                                acc[if c < whole { c % 4 } else { 0 }] += x[c] * t[c * stride + e];
                            }
                            (acc[0] + acc[1]) + (acc[2] + acc[3])
                        } else {
                            x.iter().enumerate().map(|(c, &xc)| xc * t[c * stride + e]).sum()
                        }
                    })
                    .collect();
                assert_eq!(bits(&got), bits(&want), "row_products, width {width}, {n} rows");
                let mut got = vec![0f32; width];
                weighted_sum(|| x.iter().copied().zip(t.chunks(stride)), &mut got);
                let mut want = vec![0f32; width];
                for (&xc, row) in x.iter().zip(t.chunks(stride)) {
                    axpy(&mut want, xc, &row[..width]);
                }
                assert_eq!(bits(&got), bits(&want), "weighted_sum, width {width}, {n} terms");
            }
        }
    }

    /// The keys' ranges for the second phase: contiguous, in order, covering every unit, at
    /// most `threads` of them, each near its share of the work.
    #[test]
    fn work_splits_into_contiguous_ranges_of_about_equal_work() {
        assert_eq!(weighted_ranges(&[1, 1, 1, 1], 2), [0..2, 2..4]);
        // a causal sequence's keys: the first is seen by every row
        assert_eq!(weighted_ranges(&[4, 3, 2, 1], 2), [0..2, 2..4]);
        assert_eq!(weighted_ranges(&[8, 1, 1, 1, 1], 2), [0..1, 1..5]);
        assert_eq!(weighted_ranges(&[1, 1, 1], 3), [0..1, 1..2, 2..3]);
        assert_eq!(weighted_ranges(&[1, 1, 1], 1), vec![std::ops::Range { start: 0, end: 3 }]);
        assert_eq!(weighted_ranges(&[1], 2), vec![std::ops::Range { start: 0, end: 1 }]);
        // SmolLM2's 3 KV heads of a 128-token causal sequence: halves within a few percent
        let work: Vec<usize> = (0..3 * 128).map(|u| 128 - u % 128 + 1).collect();
        let ranges = weighted_ranges(&work, 2);
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].start, ranges[0].end, ranges[1].end), (0, ranges[1].start, 384));
        let first: usize = work[ranges[0].clone()].iter().sum();
        let total: usize = work.iter().sum();
        assert!((first as f64 / total as f64 - 0.5).abs() < 0.01, "{first} of {total}");
        // any work, zeros included: contiguous, covering, non-empty, at most `threads`
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for n in 0..20 {
            for threads in 0..6 {
                let work: Vec<usize> = (0..n).map(|_| next() % 4).collect();
                let r = weighted_ranges(&work, threads);
                assert_eq!((r[0].start, r.last().unwrap().end), (0, n), "{work:?} over {threads}");
                assert!(r.windows(2).all(|w| w[0].end == w[1].start), "{r:?}");
                assert!(r.len() <= threads.max(1), "{r:?} over {threads}");
                assert!(n == 0 || r.iter().all(|x| !x.is_empty()), "{r:?}");
            }
        }
    }

    /// A mask whose rows see scattered keys (each row its own key, up to 0, 8 or 16 keys past
    /// it, a quarter of those hidden), so that `keys(i)` does not grow with `i` and masked keys
    /// lie inside it: the split backward and forward on 2 to 7 threads give the one-thread bits,
    /// on both paths.
    #[test]
    fn scattered_masks_split_to_the_same_bits() {
        let (heads, kv_heads, d, len) = (6, 2, 16, 40);
        let (q, k, v, g) = (randn(heads * len * d), randn(kv_heads * len * d), randn(kv_heads * len * d), randn(heads * len * d));
        // a fixed pattern (a hash of the position), so that the assertion below holds every run
        let hidden = |x: usize| {
            let (i, j) = (x / len, x % len);
            j != i && (j > i + 8 * (i % 3) || (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62 == 0)
        };
        let m: Vec<f32> = (0..len * len).map(|x| if hidden(x) { f32::NEG_INFINITY } else { 0.0 }).collect();
        let s = Sequence { start: 0, len, mask: Some(&m) };
        assert!((1..len).any(|i| s.keys(i) < s.keys(i - 1)), "keys(i) should not grow with i");
        let h = Heads { heads, kv_heads, d, rows: len };
        let (cos, sin) = (randn(len * d / 2), randn(len * d / 2));
        let check = |path: &str| {
            for layout in [Layout::HeadMajor, Layout::TokenMajor] {
                let x = Inputs { q: &q, k: &k, v: &v, layout, rotary: Some((&cos, &sin)) };
                let (y, grads) = (forward(&x, h, &s, 1), backward_kept(&x, &g, h, &s, 1));
                for threads in 2..=7 {
                    assert_eq!(forward(&x, h, &s, threads), y, "{path}: {layout:?} value, {threads} threads");
                    assert_eq!(backward_kept(&x, &g, h, &s, threads), grads, "{path}: {layout:?} gradients, {threads} threads");
                }
            }
        };
        check("kernel where available");
        rows_path(|| check("row at a time"));
    }

    /// An empty sequence (a pass may hold one) gets empty outputs and gradients on both paths,
    /// not a product without columns.
    #[test]
    fn an_empty_sequence_has_empty_outputs() {
        let h = Heads { heads: 9, kv_heads: 3, d: 64, rows: 4 };
        let (q, kv, g) = (randn(h.heads * 4 * h.d), randn(h.kv_heads * 4 * h.d), randn(h.heads * 4 * h.d));
        let s = Sequence { start: 2, len: 0, mask: None };
        let x = Inputs { q: &q, k: &kv, v: &kv, layout: Layout::HeadMajor, rotary: None };
        let check = || {
            for threads in [1, 2] {
                let (y, kept) = forward(&x, h, &s, threads);
                assert!(y.is_empty());
                assert!(backward(&x, &g, h, &s, threads, Some(&kept)).iter().all(Vec::is_empty));
            }
        };
        check();
        rows_path(check);
    }

    /// Forward and backward against the batched products' attention (`ops::attention`
    /// with a causal mask, or none), for one-token, odd-width and GQA sequences; and a
    /// causal mask that also hides the first key from every later row, so that masked keys
    /// lie before a row's last unmasked one (a causal mask's all lie after it). Both paths:
    /// the kernel's products ([`products`]) where the CPU has it, and row at a time.
    #[test]
    fn matches_the_batched_products() {
        // SmolLM2's heads take the kernel where there is one (d = 8 and 20 never do)
        let smollm2 = Heads { heads: 9, kv_heads: 3, d: 64, rows: 1 };
        assert_eq!(on_kernel(smollm2), crate::runtime::sgemm::available());
        assert!(!rows_path(|| on_kernel(smollm2)), "rows_path turns the kernel off");
        check_against_the_batched_products("kernel where available");
        rows_path(|| check_against_the_batched_products("row at a time"));
    }

    /// [`matches_the_batched_products`] on the path [`on_kernel`] chooses (`path` names it).
    fn check_against_the_batched_products(path: &str) {
        let cases = [
            (4, 2, 8, 1, false, false),
            (9, 3, 64, 34, true, false),
            (2, 2, 20, 17, true, false),
            (3, 1, 16, 5, false, false),
            (2, 1, 16, 6, true, true),
            (9, 3, 64, 128, true, false),
            (4, 2, 16, 1, true, false),
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
            let (y, kept) = forward(&x, h, &s, 1);
            let [dq, dk, dv] = backward_kept(&x, &g, h, &s, 1);
            // the heads (and in the backward the keys) split between threads: the same bits, in
            // both layouts
            for threads in [2, 3] {
                assert_eq!(forward(&x, h, &s, threads), (y.clone(), kept.clone()), "{path}: value, {threads} threads");
                assert_eq!(
                    backward_kept(&x, &g, h, &s, threads),
                    [dq.clone(), dk.clone(), dv.clone()],
                    "{path}: gradients, {threads} threads"
                );
                let t = Inputs { layout: Layout::TokenMajor, ..x };
                assert_eq!(forward(&t, h, &s, threads), forward(&t, h, &s, 1), "{path}: token-major value, {threads} threads");
                assert_eq!(
                    backward_kept(&t, &g, h, &s, threads),
                    backward_kept(&t, &g, h, &s, 1),
                    "{path}: token-major gradients, {threads} threads"
                );
                // rotated as loaded, and the gradients rotated back as stored
                let (cos, sin) = (randn(rows * d / 2), randn(rows * d / 2));
                let r = Inputs { rotary: Some((&cos, &sin)), ..t };
                assert_eq!(forward(&r, h, &s, threads), forward(&r, h, &s, 1), "{path}: rotated value, {threads} threads");
                assert_eq!(
                    backward_kept(&r, &g, h, &s, threads),
                    backward_kept(&r, &g, h, &s, 1),
                    "{path}: rotated gradients, {threads} threads"
                );
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
                assert!(got.iter().all(|x| x.is_finite()), "{path}: {what} of heads {heads}/{kv_heads}, d {d}, len {len}: not finite");
                let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-5 * largest, "{path}: {what} of heads {heads}/{kv_heads}, d {d}, len {len}: differs by {diff}");
            }
        }
    }
}

//! f32 products with the frozen weights on a hand-written AVX-512 kernel, the weights of the
//! forward product laid out once at load (`compute_dtype = "f32"` on AVX-512 CPUs).
//!
//! Why: OpenBLAS packs both operands of every call. The frozen weight is the large one, so a
//! call of 34-128 rows (one sequence; a solo step) spent a third of its time copying a weight
//! it had copied the same way on the step before: in a profile of single-adapter f32
//! training, `sgemm_incopy` and `sgemm_itcopy` were 27% of all samples against 48% in
//! `sgemm_kernel`. Here the weight of `x @ w^T` is cut into column panels once, at load
//! ([`Panels`]), and the input gradient `g @ w` reads `w`'s rows where they lie (a slice whose
//! rows lie a multiple of 1 KB apart is first copied together, in `panels_kernel`); only
//! the activations are read per call, and they stay in cache (input rows a multiple of 4 KB
//! apart, which would all fall on one L1 set, are copied together per reduction pass).
//!
//! The kernel keeps a block of [`MR`] rows × 32 columns in 24 AVX-512 registers and adds one
//! rank-1 update per reduction index (a broadcast of each row's value times two vectors of the
//! weight's row): the textbook register-blocked GEMM (Goto and van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication", 2008), minus the packing of the small operand.
//!
//! Every output row is computed from its own input row by the same sequence of fused
//! multiply-adds whatever the number of rows and however they are split between threads: a
//! sequence packed with others (grouped training, mixed generation batches) gets the same
//! numbers as alone, bit for bit.

use crate::runtime::parallel::{split_balanced, SharedOut};

/// Rows of a register block: 12 rows × 2 vectors = 24 accumulators, 2 for the weight's row,
/// 1 for the broadcast, of AVX-512's 32 registers.
pub const MR: usize = 12;
/// Columns of a panel (two AVX-512 vectors of f32).
pub const NR: usize = 32;
/// Reduction indices per pass: a panel's slice of `KC × 32` values is 32 KB, within L1,
/// while every row block of the chunk streams past it; each pass adds its partial sums to the
/// outputs. (One pass over all of `k` kept the slice in L2 only: 440 × 576 -> 1,536 ran at
/// 177 against 257 GFLOP/s, weights in cache.)
const KC: usize = 256;
/// Rows whose outputs stay in L2 across the reduction passes (the weight streams from memory
/// once per such chunk of rows). Measured here at 440 × 576 -> 1,536 with weights read from
/// memory: 120, 240 and all rows at once were within the machine's noise, 240 slightly ahead.
const MC: usize = 240;
/// Column panels whose outputs stay in L2 across the reduction passes: 48 panels are 1,536
/// columns (the widest projection), so a chunk of [`MC`] rows keeps 1.5 MB of outputs there.
/// A wider product (the LM head, 49,152 columns) runs group after group: each group's
/// outputs take all their passes before the next group's start, where walking all panels
/// per pass wrote and read back 25 MB of outputs per pass at 128 rows.
const NC_PANELS: usize = 48;
/// Products of at least this many multiply-adds are split over [`crate::runtime::blas::threads`]
/// threads by column panels, sized by the cores' speeds ([`crate::runtime::parallel::split_balanced`]).
const THREADED_PRODUCT: usize = 1 << 23;

/// Whether this CPU can run the kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix `B` `[k, n]` cut into `ceil(n / 32)` column panels of `[k, 32]`, each contiguous
/// (the last one `[k, 16]` when `n` is an odd multiple of 16): the right-hand side of
/// `x @ B` for any number of rows of `x`. 4 bytes per value, as the matrix it was cut from.
#[derive(Clone)]
pub struct Panels {
    k: usize,
    n: usize,
    values: Vec<f32>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels {{ k: {}, n: {}, f32 }}", self.k, self.n)
    }
}

impl Panels {
    /// `B = w^T` for a row-major `w` `[n, k]` (a linear layer's weight), so that
    /// [`Panels::matmul`] gives `x @ w^T`. `None` unless `n` is a multiple of 16 (true of
    /// every Llama / Qwen width, head layout and vocabulary) and the CPU has AVX-512F.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Option<Self> {
        assert_eq!(w.len(), n * k, "weight of {} values is not {n} x {k}", w.len());
        if !available() || !n.is_multiple_of(16) || n == 0 || k == 0 {
            return None;
        }
        let mut values = Vec::with_capacity(n * k);
        for j0 in (0..n).step_by(NR) {
            let width = NR.min(n - j0);
            for i in 0..k {
                values.extend((j0..j0 + width).map(|j| w[j * k + i]));
            }
        }
        Some(Self { k, n, values })
    }

    /// `[k, n]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `x @ B` for row-major `x` `[m, k]`: `[m, n]`.
    ///
    /// # Panics
    /// When `x` is not `m × k`.
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input of {} values is not {m} x {}", x.len(), self.k);
        let (k, n) = (self.k, self.n);
        // Panel j starts at j * 32 * k and holds rows of `width` values.
        let b = RhsLayout::Panels { values: &self.values, k };
        product(&[Term { a: x, k, b }], m, n, threads)
    }
}

/// `x @ B_o` for each of `sets` (panels of the same `k`, e.g. a layer's q, k, v or gate and
/// up): one `[m, n_o]` output each, row-major, with [`Panels::matmul`]'s bits. Their column
/// panels are split over the threads together, so the threads are woken once and share the
/// work by their speeds ([`crate::runtime::parallel::split_balanced`]; a 192-wide k or v
/// projection alone is 6 panels).
///
/// # Panics
/// When `x` is not `m × k` or the sets' `k` differ.
pub fn matmul_many(sets: &[&Panels], x: &[f32], m: usize, threads: usize) -> Vec<Vec<f32>> {
    let Some(first) = sets.first() else { return Vec::new() };
    let k = first.k;
    assert!(sets.iter().all(|p| p.k == k), "panels of different reductions");
    assert_eq!(x.len(), m * k, "input of {} values is not {m} x {k}", x.len());
    let counts: Vec<usize> = sets.iter().map(|p| p.n.div_ceil(NR)).collect();
    let mut outs: Vec<Vec<f32>> = sets.iter().map(|p| Vec::with_capacity(m * p.n)).collect();
    if m == 0 {
        return outs;
    }
    let columns: usize = sets.iter().map(|p| p.n).sum();
    let threads = if m * k * columns >= THREADED_PRODUCT { threads } else { 1 };
    let passes: Vec<(usize, usize)> = (0..k).step_by(KC).map(|p0| (0, p0)).collect();
    let ptrs: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
    split_balanced(counts.iter().sum(), threads, |from, to| {
        let mut start = 0;
        for ((set, &count), out) in sets.iter().zip(&counts).zip(&ptrs) {
            let (lo, hi) = (from.max(start), to.min(start + count));
            if lo < hi {
                let terms = [Term { a: x, k, b: RhsLayout::Panels { values: &set.values, k } }];
                // SAFETY: this call writes only the set's panels [lo - start, hi - start) of
                // its output (room for m × n), disjoint between threads; `x` is m × k and the panels hold k × n.
                unsafe { panels_kernel(&terms, &passes, m, set.n, out.0, lo - start, hi - start) }
            }
            start += count;
        }
    });
    for (out, p) in outs.iter_mut().zip(sets) {
        // SAFETY: every panel of every output was stored (the threads' ranges cover them).
        unsafe { out.set_len(m * p.n) };
    }
    outs
}

/// `g @ w` for row-major `g` `[m, k]` and `w` `[k, n]` read where it lies (no copy): a linear
/// layer's input gradient, `w` being its weight `[out, in]`. `None` unless `n` is a multiple
/// of 16 and the CPU has AVX-512F.
pub fn matmul_plain(g: &[f32], m: usize, w: &[f32], k: usize, n: usize, threads: usize) -> Option<Vec<f32>> {
    assert_eq!(g.len(), m * k, "input of {} values is not {m} x {k}", g.len());
    assert_eq!(w.len(), k * n, "weight of {} values is not {k} x {n}", w.len());
    if !available() || !n.is_multiple_of(16) || n == 0 || k == 0 {
        return None;
    }
    Some(product(&[Term { a: g, k, b: RhsLayout::RowMajor { values: w, n } }], m, n, threads))
}

/// `Σ g_t @ w_t` over `terms` `(g_t, w_t, k_t)`, `g_t` `[m, k_t]` and `w_t` `[k_t, n]` row-major
/// (read where they lie): the input gradient of projections that share their input (a
/// layer's `q`, `k`, `v`; `gate`, `up`) as one product with a reduction of `Σ k_t`, the
/// terms' passes in order into the same output (each pass after the first adds to it).
/// Against one [`matmul_plain`] per term and adding the results, it wakes the threads once
/// and needs no buffer per term nor a pass to add them (timed alone at 128 rows, 30 layers of
/// SmolLM2: q, k, v 23.4 -> 15.8 ms). Every output row is still computed from its own input rows alone. `None` unless
/// `n` is a multiple of 16, every `k_t` positive and the CPU has AVX-512F.
///
/// # Panics
/// When a term's `g_t` or `w_t` does not hold `m × k_t` or `k_t × n` values, or `terms` is
/// empty.
pub fn matmul_plain_sum(terms: &[(&[f32], &[f32], usize)], m: usize, n: usize, threads: usize) -> Option<Vec<f32>> {
    assert!(!terms.is_empty(), "a sum of no products");
    for &(g, w, k) in terms {
        assert_eq!(g.len(), m * k, "input of {} values is not {m} x {k}", g.len());
        assert_eq!(w.len(), k * n, "weight of {} values is not {k} x {n}", w.len());
    }
    if !available() || !n.is_multiple_of(16) || n == 0 || terms.iter().any(|t| t.2 == 0) {
        return None;
    }
    let terms: Vec<Term> = terms.iter().map(|&(a, values, k)| Term { a, k, b: RhsLayout::RowMajor { values, n } }).collect();
    Some(product(&terms, m, n, threads))
}

/// [`matmul_plain`] written into `out` (`m × n` values, overwritten): for a product whose
/// result goes straight into the rows of a larger matrix (a packed batch's segment). `None`,
/// `out` untouched, where [`matmul_plain`] is.
///
/// # Panics
/// When `g`, `w` or `out` do not hold `m × k`, `k × n` and `m × n` values.
pub fn matmul_plain_into(g: &[f32], m: usize, w: &[f32], k: usize, n: usize, threads: usize, out: &mut [f32]) -> Option<()> {
    assert_eq!(g.len(), m * k, "input of {} values is not {m} x {k}", g.len());
    assert_eq!(w.len(), k * n, "weight of {} values is not {k} x {n}", w.len());
    assert_eq!(out.len(), m * n, "output of {} values is not {m} x {n}", out.len());
    if !available() || !n.is_multiple_of(16) || n == 0 || k == 0 {
        return None;
    }
    // SAFETY: `out` holds m × n values and is borrowed mutably for the call.
    unsafe { product_into(&[Term { a: g, k, b: RhsLayout::RowMajor { values: w, n } }], m, n, threads, out.as_mut_ptr()) };
    Some(())
}

/// Where column `j` of row `i` of the right-hand side lies.
#[derive(Clone, Copy)]
enum RhsLayout<'a> {
    /// [`Panels`]: panel `p` at `p * 32 * k`, its rows `width` apart.
    Panels { values: &'a [f32], k: usize },
    /// Row-major `[k, n]`: rows `n` apart.
    RowMajor { values: &'a [f32], n: usize },
}

impl RhsLayout<'_> {
    /// The first value of panel `p` at reduction index `p0`, and the distance between its rows.
    fn panel(&self, p: usize, width: usize, p0: usize) -> (*const f32, usize) {
        match *self {
            Self::Panels { values, k } => (values[p * NR * k + p0 * width..].as_ptr(), width),
            Self::RowMajor { values, n } => (values[p0 * n + p * NR..].as_ptr(), n),
        }
    }
}

/// One product of a sum: `a` `[m, k]` (row-major) times the right-hand side `b` `[k, n]`.
#[derive(Clone, Copy)]
struct Term<'a> {
    a: &'a [f32],
    k: usize,
    b: RhsLayout<'a>,
}

fn product(terms: &[Term], m: usize, n: usize, threads: usize) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `out` has capacity m × n; `product_into` stores all of them (every row block of
    // every panel at the first reduction pass), and f32 has no invalid bit patterns.
    unsafe {
        product_into(terms, m, n, threads, out.as_mut_ptr());
        out.set_len(m * n);
    }
    out
}

/// `Σ a_t @ B_t` over `terms` stored into the `m × n` values at `c`, over `threads` threads
/// by column panels when the sum is large enough ([`THREADED_PRODUCT`]).
///
/// # Safety
/// Each term's `a` is `m × k` and its `b` holds `k × n` values; `c` has room for `m * n` f32
/// that nothing else touches during the call. Some term has `k > 0`, so that every value of
/// `c` is stored (callers that `set_len` rely on it).
unsafe fn product_into(terms: &[Term], m: usize, n: usize, threads: usize, c: *mut f32) {
    if m == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let k: usize = terms.iter().map(|t| t.k).sum();
    let threads = if m * k * n >= THREADED_PRODUCT { threads } else { 1 };
    // the reduction passes, term after term: (term, first reduction index)
    let passes: Vec<(usize, usize)> =
        terms.iter().enumerate().flat_map(|(t, term)| (0..term.k).step_by(KC).map(move |p0| (t, p0))).collect();
    debug_assert!(!passes.is_empty(), "a product with no reduction stores nothing");
    let out_ptr = SharedOut(c);
    split_balanced(panels, threads, |from, to| {
        let out_ptr = &out_ptr;
        // SAFETY: each call writes only panels [from, to) of `c` (room for m * n), disjoint
        // between threads, and reads back only values it stored; each term's `a` is m × k
        // and its `b` holds k × n values in its layout.
        unsafe { panels_kernel(terms, &passes, m, n, out_ptr.0, from, to) }
    });
}

/// Panels `[from, to)` of `c` (`[m, n]`, row-major) = `Σ a_t @ B_t`, by the reduction
/// `passes` `(term, first index)` in order, the first storing and the others adding: chunks
/// of [`MC`] rows, in each groups of [`NC_PANELS`] panels, each group through all the passes
/// (the order of the loops changes no sum: every value's passes run in order).
///
/// # Safety
/// Each term's `a` is `m × k` and its `b` holds `k × n` values; `c` has room for `m * n` f32
/// that no other thread touches in these panels.
unsafe fn panels_kernel(terms: &[Term], passes: &[(usize, usize)], m: usize, n: usize, c: *mut f32, from: usize, to: usize) {
    let mut slice: Vec<f32> = Vec::new();
    let mut rows_copy: Vec<f32> = Vec::new();
    for i0 in (0..m).step_by(MC) {
        let i1 = (i0 + MC).min(m);
        for g0 in (from..to).step_by(NC_PANELS) {
            let g1 = (g0 + NC_PANELS).min(to);
            for (s, &(t, p0)) in passes.iter().enumerate() {
                let Term { a, k, b } = terms[t];
                let kc = KC.min(k - p0);
                let blocks = (i1 - i0).div_ceil(MR);
                // Input rows a multiple of 4 KB apart (the LM head's input gradient: the
                // logits' gradient, 49,152 wide) all fall on one of L1's 64 sets, and a
                // block's 12 rows evict each other and the weight's slice: this pass's rows
                // are copied together first, 16 values apart beyond their length so that
                // they spread over the sets, where 2 or more panels read them (timed alone,
                // 6 alternating rounds, [m, 49,152] @ [49,152, 576]: 520 rows 193-203 ->
                // 225-241 GFLOP/s, 128 rows 192-198 -> 233-248, 32 rows 125-129 -> 131-136;
                // rows 6 KB apart, on 2 sets, gained nothing and are read where they lie).
                // The same values in the same order: no bit changes.
                let (mut a0, mut lda) = (a.as_ptr().add(i0 * k + p0), k);
                if g1 - g0 >= 2 && (k * 4).is_multiple_of(4096) {
                    // SAFETY: rows i0..i1 of `a` (m × k) hold values p0..p0 + kc.
                    (a0, lda) = (copy_rows(&mut rows_copy, a0, k, i1 - i0, kc, 16), kc + 16);
                    #[cfg(test)]
                    tests::count_copy(1);
                }
                for p in g0..g1 {
                    let width = NR.min(n - p * NR);
                    let (mut bp, mut ldb) = b.panel(p, width, p0);
                    // Rows a multiple of 1 KB apart (a row-major weight 256·j wide: down's input
                    // gradient, 1,536) fall on few of L1's sets and evict each other before the
                    // next row block reads them again: copied together first, where at least 4
                    // row blocks read them (timed alone, 4 alternating rounds at 576 -> 1,536:
                    // 520 rows 218-235 -> 223-258 GFLOP/s, 128 rows 142-192 -> 196-205). The
                    // same values in the same order: no bit changes.
                    if blocks >= 4 && (ldb * 4).is_multiple_of(1024) && ldb != width {
                        // SAFETY: the panel's kc rows of `width` values, ldb apart, lie in `b`.
                        (bp, ldb) = (copy_rows(&mut slice, bp, ldb, kc, width, 0), width);
                        #[cfg(test)]
                        tests::count_copy(0);
                    }
                    // The chunk this thread reads next, fetched into L2 while this one is
                    // computed, its rows spread over this chunk's row blocks: the weight streams
                    // from memory, and a chunk's 256 rows of 128 bytes lie 2-6 KB apart in the
                    // row-major layout, where the hardware prefetchers do not follow.
                    let next = if p + 1 < g1 {
                        Some((p + 1, s))
                    } else if s + 1 < passes.len() {
                        Some((g0, s + 1))
                    } else if g1 < to {
                        Some((g1, 0))
                    } else if i1 < m {
                        Some((from, 0))
                    } else {
                        None
                    };
                    let (pf, pf_ld, pf_kc) = match next {
                        Some((q, s2)) => {
                            let (t2, q0) = passes[s2];
                            let (ptr, ld) = terms[t2].b.panel(q, NR.min(n - q * NR), q0);
                            (ptr, ld, KC.min(terms[t2].k - q0))
                        }
                        None => (std::ptr::null(), 0, 0),
                    };
                    let per_block = pf_kc.div_ceil(blocks);
                    for (blk, i) in (i0..i1).step_by(MR).enumerate() {
                        let rows = MR.min(i1 - i);
                        let ap = a0.add((i - i0) * lda);
                        let cp = c.add(i * n + p * NR);
                        let first = (blk * per_block).min(pf_kc);
                        // the outputs of the block after this one, into L1 while this one is
                        // computed: they are usually fresh memory, not in any cache (a pass
                        // writes new activations), and a store or load that misses stalls
                        let (next_c, next_rows, next_width) = if i + MR < i1 {
                            (c.add((i + MR) * n + p * NR), MR.min(i1 - i - MR), width)
                        } else if p + 1 < g1 {
                            (c.add(i0 * n + (p + 1) * NR), MR.min(i1 - i0), NR.min(n - (p + 1) * NR))
                        } else {
                            (c, 0, 0)
                        };
                        let out_shift = usize::from(next_width > 16);
                        let out_lines = next_rows << out_shift;
                        let prefetch = Prefetch {
                            at: pf.wrapping_add(first * pf_ld),
                            ld: pf_ld,
                            rows: per_block.min(pf_kc - first),
                            out: next_c,
                            out_ld: n,
                            out_shift,
                            out_lines,
                            out_every: kc.checked_div(out_lines).unwrap_or(usize::MAX).max(1),
                        };
                        block(rows, width, ap, lda, bp, ldb, kc, cp, n, s > 0, prefetch);
                    }
                }
            }
        }
    }
}

/// `rows` rows of `len` values, `ld` apart from `at`, copied into `buf` end to end, each
/// followed by `pad` zeros (so `len + pad` apart): a strided slice gathered where its rows
/// would fall on few of L1's sets. Returns the copy's first value.
///
/// # Safety
/// `at` points to `rows` rows of `len` readable values, `ld` apart.
unsafe fn copy_rows(buf: &mut Vec<f32>, at: *const f32, ld: usize, rows: usize, len: usize, pad: usize) -> *const f32 {
    buf.clear();
    for r in 0..rows {
        // SAFETY: row `r` of the caller's `rows` rows holds `len` readable values.
        buf.extend_from_slice(unsafe { std::slice::from_raw_parts(at.add(r * ld), len) });
        buf.resize(buf.len() + pad, 0.0);
    }
    buf.as_ptr()
}

/// What a register block fetches while it computes, hints that never fault and change no
/// value: rows of the weight into L2 (two 64-byte lines each, `ld` values apart, from `at`),
/// one per reduction index; and the next block's outputs into L1 (`out_lines` lines, `1 <<
/// out_shift` a row, rows `out_ld` values apart from `out`), one every `out_every` indices
/// (a reduction shorter than `out_lines` fetches only its first `kc` lines).
///
/// Why the outputs one at a time through the block: fetched all at once before it (24 lines
/// for a 12 × 32 block), the lines that miss in every cache took all of L1's fill buffers and
/// the fetches behind them stalled the core (in a profile of grouped training, 4/5 of the
/// driver's 7.4% of samples sat on them; 2.1% in all after). Spread over the block, timed on
/// the frozen products of a pass (outputs kept, weights cold) in one process, rounds in the
/// orders before-through-through-before and the reverse (thirty-seventh session), the ratio
/// of the medians of 32 rounds: at 520 rows forward 1.052-1.056x (28 and 30 of 32 faster),
/// input gradients 1.043-1.068x; at 128 rows 1.052x and 1.043x; at 32 rows 1.023x and
/// 1.007x. (The thirty-third session had tried fetching them in the loop and measured no
/// gain, with the products at ~250 GFLOP/s.) Fetching them within the block's first half
/// gained nothing (0.986x).
#[derive(Clone, Copy)]
struct Prefetch {
    at: *const f32,
    ld: usize,
    rows: usize,
    out: *const f32,
    out_ld: usize,
    out_shift: usize,
    out_lines: usize,
    out_every: usize,
}

/// One register block: `C[rows, width] (+)= A[rows, kc] @ B[kc, width]`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    rows: usize,
    width: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
    pf: Prefetch,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (rows, width) {
                    $(($r, NR) => kernel::<$r, 2>(a, lda, b, ldb, kc, c, ldc, add, pf),
                      ($r, 16) => kernel::<$r, 1>(a, lda, b, ldb, kc, c, ldc, add, pf),)*
                    _ => unreachable!("block of {rows} x {width}"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the f32 kernel needs AVX-512F ({rows} x {width} from {a:?} {lda} {b:?} {ldb} {kc} {c:?} {ldc} {add} {:?})", pf.at)
}

/// `C[M, 16 V] (+)= A[M, kc] @ B[kc, 16 V]`, the accumulators in registers for the whole
/// reduction: for each index `p`, `V` vectors of `B`'s row `p` and, for each row, a broadcast
/// of `A[i, p]` and `V` fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const M: usize, const V: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
    pf: Prefetch,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; M];
    if add {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(c.add(i * ldc + 16 * v));
            }
        }
    }
    let (mut next_out, mut j) = (0usize, 0usize);
    for p in 0..kc {
        if p < pf.rows {
            let line = pf.at.add(p * pf.ld).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T1>(line);
            _mm_prefetch::<_MM_HINT_T1>(line.add(64));
        }
        if p == next_out && j < pf.out_lines {
            // line j: row j >> shift, its second 16 values where j is odd and a row has two
            let line = pf.out.wrapping_add((j >> pf.out_shift) * pf.out_ld + ((j & pf.out_shift) << 4)).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T0>(line);
            j += 1;
            next_out += pf.out_every;
        }
        let bp = b.add(p * ldb);
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(bp.add(16 * v));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i * lda + p));
            for (x, bv) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(ai, *bv, *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc + 16 * v), *x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// The strided copies `panels_kernel` made on this thread: `[weight slices, input
        /// rows' passes]`. The copies change no bit, so only this tells a test that the
        /// shapes it means to take a copy path take it.
        static COPIES: Cell<[usize; 2]> = const { Cell::new([0, 0]) };
    }

    /// Counts one copy of kind `which` (0: a weight slice, 1: an input rows' pass) on this thread.
    pub(super) fn count_copy(which: usize) {
        COPIES.with(|made| {
            let mut counts = made.get();
            counts[which] += 1;
            made.set(counts);
        });
    }

    /// `f()` and the copies it made on this thread (`[weight slices, input rows' passes]`).
    fn copies<T>(f: impl FnOnce() -> T) -> (T, [usize; 2]) {
        let before = COPIES.with(Cell::get);
        let out = f();
        let after = COPIES.with(Cell::get);
        (out, [after[0] - before[0], after[1] - before[1]])
    }

    fn reference(a: &[f32], b: impl Fn(usize, usize) -> f32, m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b(p, j) as f64).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Both layouts against an f64 reference, over shapes with partial row blocks, an odd
    /// number of 16-column halves and a reduction longer than one pass; then every row of a
    /// tall product against the same row computed alone, bit for bit.
    #[test]
    fn products_match_f64_and_rows_do_not_depend_on_their_neighbours() {
        if !available() {
            eprintln!("no AVX-512F: the f32 kernel is not used on this CPU");
            return;
        }
        // the last two wider than a group of panels (`NC_PANELS`): 193 panels, the last one 16
        // wide, cut into groups on one thread and on each of two
        let wide = 4 * NC_PANELS * NR + 16;
        for &(m, k, n, threads) in &[
            (1, 5, 16, 1),
            (13, 70, 48, 2),
            (25, 2100, 80, 2),
            (12, 33, 32, 3),
            (300, 600, 80, 2),
            // rows 4 KB apart, copied together where a thread reads 2 or more panels: on one
            // thread (2 panels), and on two (3 panels: one thread copies, the other does not)
            (30, 2048, 64, 1),
            (130, 1024, 96, 2),
            // ... and over more rows than one chunk ([`MC`]), the second chunk copied too
            (250, 1024, 64, 1),
            // ... and over more panels than one group ([`NC_PANELS`]): copied again in the
            // second group (2 panels, the last 16 wide)
            (20, 1024, NC_PANELS * NR + 48, 1),
            (20, 300, wide, 1),
            (250, 600, wide, 2),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            // x @ w^T, w [n, k]
            let got = Panels::transposed(&w, n, k).unwrap().matmul(&x, m, threads);
            let want = reference(&x, |p, j| w[j * k + p], m, k, n);
            for (g, r) in got.iter().zip(&want) {
                assert!((*g as f64 - r).abs() <= 1e-5 * (k as f64).sqrt(), "nt {m}x{k}x{n}: {g} vs {r}");
            }
            // g @ w2, w2 [k, n]
            let w2 = values(k * n, 3);
            let got = matmul_plain(&x, m, &w2, k, n, threads).unwrap();
            let want = reference(&x, |p, j| w2[p * n + j], m, k, n);
            for (g, r) in got.iter().zip(&want) {
                assert!((*g as f64 - r).abs() <= 1e-5 * (k as f64).sqrt(), "nn {m}x{k}x{n}: {g} vs {r}");
            }
        }
        // into a caller's slice: the same bits, every value overwritten
        let (x, w2) = (values(34 * 576, 6), values(576 * 32, 7));
        let mut into = vec![f32::NAN; 34 * 32];
        matmul_plain_into(&x, 34, &w2, 576, 32, 1, &mut into).unwrap();
        assert_eq!(into, matmul_plain(&x, 34, &w2, 576, 32, 1).unwrap());
        let (m, k, n) = (100, 2100, 48);
        let (x, w) = (values(m * k, 4), values(k * n, 5));
        let tall = matmul_plain(&x, m, &w, k, n, 2).unwrap();
        for i in 0..m {
            let alone = matmul_plain(&x[i * k..(i + 1) * k], 1, &w, k, n, 1).unwrap();
            assert_eq!(alone, tall[i * n..(i + 1) * n], "row {i}");
        }
        // a row-major weight whose rows lie 1 KB apart, with enough row blocks to be copied
        // together first: the values, and each row equal to itself alone (not copied)
        let (m, k, n) = (60, 600, 256);
        let (x, w3) = (values(m * k, 10), values(k * n, 11));
        let (tall, made) = copies(|| matmul_plain(&x, m, &w3, k, n, 2).unwrap());
        // this thread's 4 of the 8 panels, each in its 3 passes
        assert_eq!(made, [4 * k.div_ceil(KC), 0], "a slice 1 KB apart read by 5 row blocks is copied");
        let want = reference(&x, |p, j| w3[p * n + j], m, k, n);
        for (g, r) in tall.iter().zip(&want) {
            assert!((*g as f64 - r).abs() <= 1e-5 * (k as f64).sqrt(), "nn {m}x{k}x{n}: {g} vs {r}");
        }
        for i in [0, 37, m - 1] {
            let (alone, made) = copies(|| matmul_plain(&x[i * k..(i + 1) * k], 1, &w3, k, n, 1).unwrap());
            assert_eq!(made, [0, 0], "one row block reads the slice where it lies");
            assert_eq!(alone, tall[i * n..(i + 1) * n], "row {i}");
        }
        // rows 4 KB apart: 2 panels on one thread copy them together, one panel each on two
        // threads reads them where they lie (m × k × n is above `THREADED_PRODUCT`): the same
        // bits, and each row equal to itself alone
        let (m, k, n) = (130, 1024, 64);
        assert!(m * k * n >= THREADED_PRODUCT);
        let (x, w4) = (values(m * k, 12), values(k * n, 13));
        let (copied, made) = copies(|| matmul_plain(&x, m, &w4, k, n, 1).unwrap());
        assert_eq!(made, [0, k / KC], "2 panels on one thread: the rows copied once a pass");
        let (apart, made) = copies(|| matmul_plain(&x, m, &w4, k, n, 2).unwrap());
        assert_eq!(made, [0, 0], "one panel a thread: the rows read where they lie");
        assert_eq!(copied, apart, "rows copied together against read where they lie");
        let panels = Panels::transposed(&w4, n, k).unwrap();
        let (through_panels, made) = copies(|| panels.matmul(&x, m, 1));
        assert_eq!(made, [0, k / KC], "the same through panels");
        assert_eq!(through_panels, panels.matmul(&x, m, 2), "the same through panels");
        for i in [0, 77, m - 1] {
            assert_eq!(matmul_plain(&x[i * k..(i + 1) * k], 1, &w4, k, n, 1).unwrap(), copied[i * n..(i + 1) * n], "row {i}");
        }
        // over two groups of panels, each group's passes copy the rows again
        let n = NC_PANELS * NR + 48;
        let w5 = values(k * n, 14);
        let (_, made) = copies(|| matmul_plain(&x[..20 * k], 20, &w5, k, n, 1).unwrap());
        assert_eq!(made, [0, 2 * k / KC], "two groups of 2 or more panels");
        // rows of a wide product, each against itself alone
        let (m, k, n) = (250, 300, wide);
        let (x, wide_w) = (values(m * k, 8), values(n * k, 9));
        let panels = Panels::transposed(&wide_w, n, k).unwrap();
        let tall = panels.matmul(&x, m, 2);
        for i in [0, 131, m - 1] {
            assert_eq!(panels.matmul(&x[i * k..(i + 1) * k], 1, 1), tall[i * n..(i + 1) * n], "row {i} of a wide product");
        }
        assert!(Panels::transposed(&w, 40, 2100 * 48 / 40).is_none(), "40 columns are not a multiple of 16");
    }

    /// A sum of products (a layer's q, k, v input gradients: reductions of 576, 192 and 192,
    /// the first longer than one pass; and reductions of 1,024, 192 and 2,048, whose input
    /// rows are copied) against an f64 reference; one term gives `matmul_plain`'s bits; each
    /// row of a tall sum equals the row summed alone, bit for bit.
    #[test]
    fn sums_of_products_match_f64_and_keep_rows_apart() {
        if !available() {
            eprintln!("no AVX-512F: the f32 kernel is not used on this CPU");
            return;
        }
        // the second set with two of its three reductions a multiple of 1,024 (rows 4 KB apart:
        // copied together where a thread reads both of the 2 panels)
        for (n, ks) in [(48, [576, 192, 192]), (48, [1024, 192, 2048])] {
            let k_sum: usize = ks.iter().sum();
            for &(m, threads) in &[(1, 1), (13, 2), (130, 2), (300, 3)] {
                let gs: Vec<Vec<f32>> = ks.iter().enumerate().map(|(t, &k)| values(m * k, 10 + t as u32)).collect();
                let ws: Vec<Vec<f32>> = ks.iter().enumerate().map(|(t, &k)| values(k * n, 20 + t as u32)).collect();
                let terms: Vec<(&[f32], &[f32], usize)> = (0..3).map(|t| (&gs[t][..], &ws[t][..], ks[t])).collect();
                let (got, made) = copies(|| matmul_plain_sum(&terms, m, n, threads).unwrap());
                if m * k_sum * n < THREADED_PRODUCT || threads == 1 {
                    let passes = ks.iter().filter(|&&k| k % 1024 == 0).map(|&k| k / KC).sum::<usize>();
                    let want_copies = m.div_ceil(MC) * passes;
                    assert_eq!(made, [0, want_copies], "{m} rows, reductions {ks:?}: the passes copied");
                }
                let mut want = vec![0f64; m * n];
                for t in 0..3 {
                    let k = ks[t];
                    for (o, r) in want.iter_mut().zip(reference(&gs[t], |p, j| ws[t][p * n + j], m, k, n)) {
                        *o += r;
                    }
                }
                for (g, r) in got.iter().zip(&want) {
                    assert!((*g as f64 - r).abs() <= 1e-5 * (k_sum as f64).sqrt(), "sum {m}x{k_sum}x{n}: {g} vs {r}");
                }
                assert_eq!(
                    matmul_plain_sum(&terms[..1], m, n, threads).unwrap(),
                    matmul_plain(&gs[0], m, &ws[0], ks[0], n, threads).unwrap()
                );
                for i in [0, m / 2, m - 1] {
                    let rows: Vec<&[f32]> = (0..3).map(|t| &gs[t][i * ks[t]..(i + 1) * ks[t]]).collect();
                    let alone: Vec<(&[f32], &[f32], usize)> = (0..3).map(|t| (rows[t], &ws[t][..], ks[t])).collect();
                    assert_eq!(matmul_plain_sum(&alone, 1, n, 1).unwrap(), got[i * n..(i + 1) * n], "row {i} of {m}");
                }
            }
        }
        assert!(matmul_plain_sum(&[(&[0.0; 40][..], &[0.0; 40][..], 1)], 40, 40, 1).is_none(), "40 columns");
    }

    /// Several panel sets over one input (q, k, v's widths, and an odd multiple of 16) give
    /// each set's own product, bit for bit, on one thread or several.
    #[test]
    fn products_over_one_input_equal_each_alone() {
        if !available() {
            eprintln!("no AVX-512F: the f32 kernel is not used on this CPU");
            return;
        }
        // k = 1,024: input rows 4 KB apart, copied where a thread reads 2 or more of a set's panels
        for k in [600, 1024] {
            let sets: Vec<Panels> =
                [96, 32, 48].iter().enumerate().map(|(t, &n)| Panels::transposed(&values(n * k, 30 + t as u32), n, k).unwrap()).collect();
            let refs: Vec<&Panels> = sets.iter().collect();
            // 6 panels: 3 threads (2 each) and 4 (2, 1, 2, 1) cut the first set in two
            for &(m, threads) in &[(1, 1), (13, 2), (250, 2), (250, 3), (250, 4), (40, 3)] {
                let x = values(m * k, 40);
                let (many, made) = copies(|| matmul_many(&refs, &x, m, threads));
                if m * k * 176 < THREADED_PRODUCT || threads == 1 {
                    // on one thread: the first set (3 panels) and the last (2) copy, the middle one (1) does not
                    let want = if k == 1024 { 2 * k / KC } else { 0 };
                    assert_eq!(made, [0, want], "{m} rows, k {k}: the passes copied");
                }
                for (got, p) in many.iter().zip(&sets) {
                    assert_eq!(*got, p.matmul(&x, m, 1), "{m} rows on {threads} threads, k {k}");
                }
            }
            assert!(matmul_many(&refs, &[], 0, 2).iter().all(|o| o.is_empty()));
        }
    }
}

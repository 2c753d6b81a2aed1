//! Elementwise loops the compiler can vectorize, for the per-token work between matrix
//! products: an `exp` without branches or libm calls, and row reductions kept in
//! [`LANES`] independent partial results.
//!
//! Why: libm's `expf` is a call per element, so the loss's softmax (a `[rows, 49152]`
//! exp per step) and SwiGLU's sigmoid ran one element at a time; a profile of training
//! put 7-9% of all samples in `expf`. A reduction written as one running sum cannot be
//! vectorized either (float addition is not associative, so the compiler keeps its order).
//!
//! Every result here depends only on the input, never on the instruction set: [`simd`]
//! runs the same code compiled for AVX-512, AVX2 or the baseline, and Rust never fuses a
//! multiply and an add on its own, so each lane computes the same IEEE operations in the
//! same order.

use std::mem::MaybeUninit;

/// Partial results kept by the reductions: one AVX-512 register of f32 (two of f64).
pub(crate) const LANES: usize = 16;

/// `f()` compiled for the widest vector instructions this CPU has (AVX-512F, then AVX2),
/// chosen at run time. Mark `f` `#[inline(always)]`: a closure left out of line keeps the
/// baseline instructions (seen in the disassembly of the loss's row loop).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { with_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `e^x` in f32, within 2 ulp of the exact value (checked against f64 in the tests);
/// `+inf` above 88.72, NaN for NaN, and `0` below -87.33, where the result would be
/// subnormal or nearly so: flushed, as with the CPU's flush-to-zero mode, because a
/// subnormal operand costs a microcode assist of ~100 cycles per lane (measured: a row of
/// such values took 6x as long as a row of ordinary ones).
///
/// Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, with Cephes' `expf` polynomial
/// for `e^r` (S. L. Moshier, Cephes Math Library, public domain), then `2^n` built from
/// exponent bits in two halves so that `n = 128` (just below `f32::MAX`) stays exact.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_84; // ln(f32::MAX)
    const LO: f32 = -87.33; // a little above ln(f32::MIN_POSITIVE) = -87.3365
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few bits, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding 1.5 * 2^23 rounds a float below 2^22 to an integer, kept in the low bits
    const ROUND: f32 = 12_582_912.0;
    // out-of-range lanes compute e^0, never a subnormal (their result is replaced below)
    let xc = if x < LO {
        0.0
    } else if x > HI {
        HI
    } else {
        x
    };
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let nf = t - ROUND;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let scale = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = y * scale(n1) * scale(n2);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// The largest element of `xs` (`-inf` when empty; NaNs are skipped, as `f32::max` does).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    // the tail as one more vector, then the lanes halved four times: a row of attention
    // scores is a few vectors, and folded one element at a time its lanes and tail cost as
    // much as the rest of it (the maximum is exact whatever the order: at most the sign of
    // a zero maximum could differ, and `exp(x - max)` does not see that sign)
    let mut last = [f32::NEG_INFINITY; LANES];
    last[..tail.len()].copy_from_slice(tail);
    for (m, &x) in lanes.iter_mut().zip(&last) {
        *m = m.max(x);
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] = lanes[l].max(lanes[l + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// Replaces each `x` of `xs` by `e^(x - shift)` and returns their sum, accumulated in f64
/// over [`LANES`] partial sums (then added in lane order).
#[inline(always)]
pub(crate) fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, x) in lanes.iter_mut().zip(c) {
            *x = exp(*x - shift);
            *s += *x as f64;
        }
    }
    let mut sum: f64 = lanes.iter().sum();
    // the tail's exponentials as one vector (the lanes past it computed and dropped), then
    // added one by one: a row of attention probabilities is a few vectors, so one element
    // at a time its tail cost as much as the rest of the row
    let tail = chunks.into_remainder();
    if tail.is_empty() {
        return sum;
    }
    let mut last = [0f32; LANES];
    last[..tail.len()].copy_from_slice(tail);
    for x in last.iter_mut() {
        *x = exp(*x - shift);
    }
    for (x, &e) in tail.iter_mut().zip(&last) {
        *x = e;
        sum += e as f64;
    }
    sum
}

/// RMSNorm of one row `x` (`d` values) with weight `w`: `x / sqrt(mean(x^2) + eps) * w`, into
/// `out` (which may be uninitialized: every element is written, none read). The mean is
/// summed over [`LANES`] partial sums, then in lane order, then the tail (as
/// [`rms_norm_backward_row`]'s); each element is divided, then multiplied, as candle's CPU
/// `rms_norm` computes it.
#[inline(always)]
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let d = x.len();
    assert!(w.len() == d && out.len() == d, "rms_norm_row: operands of different lengths");
    let mut squares = [0f32; LANES];
    let body = d - d % LANES;
    for xc in x[..body].chunks_exact(LANES) {
        for l in 0..LANES {
            squares[l] += xc[l] * xc[l];
        }
    }
    let mut square = squares.iter().sum::<f32>();
    for &x in &x[body..] {
        square += x * x;
    }
    let m = (square / d as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        o.write(x / m * w);
    }
}

/// RMSNorm's input gradient for one row `x` (`d` values) with weight `w` and output gradient
/// `g`: `r g w - x r^3 mean(g w x)`, `r = (mean(x^2) + eps)^-1/2`, into `out` (which may be
/// uninitialized: every element is written, none read). Both means are summed over
/// [`LANES`] partial sums, then in lane order, then the tail.
#[inline(always)]
pub(crate) fn rms_norm_backward_row(x: &[f32], g: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let d = x.len();
    assert!(g.len() == d && w.len() == d && out.len() == d, "rms_norm_backward_row: operands of different lengths");
    let (mut squares, mut dots) = ([0f32; LANES], [0f32; LANES]);
    let body = d - d % LANES;
    for ((xc, gc), wc) in x[..body].chunks_exact(LANES).zip(g[..body].chunks_exact(LANES)).zip(w[..body].chunks_exact(LANES)) {
        for l in 0..LANES {
            squares[l] += xc[l] * xc[l];
            dots[l] += gc[l] * wc[l] * xc[l];
        }
    }
    let (mut square, mut dot) = (squares.iter().sum::<f32>(), dots.iter().sum::<f32>());
    for i in body..d {
        square += x[i] * x[i];
        dot += g[i] * w[i] * x[i];
    }
    let r = 1.0 / (square / d as f32 + eps).sqrt();
    let c = r * r * r * (dot / d as f32);
    for (((o, &x), &g), &w) in out.iter_mut().zip(x).zip(g).zip(w) {
        o.write(r * g * w - x * c);
    }
}

/// SwiGLU's gating `silu(g) u`, computed as `g / (1 + e^-g) * u`, element by element into `out` (which
/// may be uninitialized: every element of it is written, none read).
#[inline(always)]
pub(crate) fn swiglu(g: &[f32], u: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert!(g.len() == out.len() && u.len() == out.len(), "swiglu: operands of different lengths");
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        o.write(g / (1.0 + exp(-g)) * u);
    }
}

/// SwiGLU's gradients: with `s = sigmoid(g)`, `dg = dy u s (1 + g (1 - s))`, `du = dy g s`
/// (`dg` and `du` may be uninitialized: every element is written, none read).
#[inline(always)]
pub(crate) fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>]) {
    let n = g.len();
    assert!([u.len(), dy.len(), dg.len(), du.len()] == [n; 4], "swiglu_backward: operands of different lengths");
    let inputs = g.iter().zip(u).zip(dy);
    for (((&g, &u), &dy), (dg, du)) in inputs.zip(dg.iter_mut().zip(du.iter_mut())) {
        let s = 1.0 / (1.0 + exp(-g));
        dg.write(dy * u * s * (1.0 + g * (1.0 - s)));
        du.write(dy * g * s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite positive floats.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    /// Over 2 million points spanning the whole range, `exp` is within 2 ulp of the
    /// correctly rounded f64 value, and 0 where that is below ~2^-126.
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let (lo, hi, n) = (-100f32, 88.72f32, 2_000_000);
        let mut worst = (0, 0f32);
        for i in 0..=n {
            let x = lo + (hi - lo) * i as f32 / n as f32;
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            if x >= -87.33 {
                let d = ulps(got, want);
                if d > worst.0 {
                    worst = (d, x);
                }
            } else {
                assert_eq!(got, 0.0, "exp({x}) flushes to zero");
            }
        }
        assert!(worst.0 <= 2, "exp is {} ulp off at {}", worst.0, worst.1);
        // exact points and the edges
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.34), 0.0);
        assert!(exp(-87.33) >= f32::MIN_POSITIVE);
        assert!(exp(f32::NAN).is_nan());
        assert!(ulps(exp(88.72), (88.72f32 as f64).exp() as f32) <= 2);
    }

    /// Rows of every tail length after 0 to 3 whole vectors (an attention row's shapes):
    /// `exp_shifted_sum` gives each element's `exp` and the sum of the lanes, then of the tail
    /// in order, and `max` the largest element, as the plain loops define them.
    #[test]
    fn short_rows_keep_their_sums_and_maxima() {
        for len in 0..4 * LANES {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 7919 + len) % 2003) as f32 / 29.0 - 30.0).collect();
            let shift = 1.25;
            let mut got = xs.clone();
            let sum = simd(
                #[inline(always)]
                || exp_shifted_sum(&mut got, shift),
            );
            let want: Vec<f32> = xs.iter().map(|&x| exp(x - shift)).collect();
            let whole = len / LANES * LANES;
            let mut lanes = [0f64; LANES];
            for (i, &e) in want[..whole].iter().enumerate() {
                lanes[i % LANES] += e as f64;
            }
            let want_sum = want[whole..].iter().fold(lanes.iter().sum::<f64>(), |s, &e| s + e as f64);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "len {len}"
            );
            assert_eq!(sum.to_bits(), want_sum.to_bits(), "len {len}");
            let top = simd(
                #[inline(always)]
                || max(&xs),
            );
            assert_eq!(top, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max), "len {len}");
        }
    }

    /// The dispatched (vector) and the plain builds give the same bits, tails included.
    #[test]
    fn vector_code_gives_the_plain_code_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 2003) as f32 / 13.0 - 80.0).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        let sa = simd(
            #[inline(always)]
            || exp_shifted_sum(&mut a, 3.5),
        );
        let sb = exp_shifted_sum(&mut b, 3.5);
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let vmax = simd(
            #[inline(always)]
            || max(&xs),
        );
        assert_eq!(vmax, max(&xs));
        assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
            // SAFETY: every element was written by the kernel under test (and initialized before)
            v.iter().map(|x| unsafe { x.assume_init() }.to_bits()).collect()
        };
        let fresh = || vec![MaybeUninit::new(0f32); 1000];
        let (mut o1, mut o2) = (fresh(), fresh());
        simd(
            #[inline(always)]
            || swiglu(&xs, &b, &mut o1),
        );
        swiglu(&xs, &b, &mut o2);
        assert_eq!(bits(&o1), bits(&o2));
        let (mut dg1, mut du1, mut dg2, mut du2) = (fresh(), fresh(), fresh(), fresh());
        simd(
            #[inline(always)]
            || swiglu_backward(&xs, &b, &a, &mut dg1, &mut du1),
        );
        swiglu_backward(&xs, &b, &a, &mut dg2, &mut du2);
        assert_eq!((bits(&dg1), bits(&du1)), (bits(&dg2), bits(&du2)));
        // the sum is that of the stored values, to f64 rounding
        let direct: f64 = a.iter().map(|&x| x as f64).sum();
        assert!((sa - direct).abs() <= 1e-12 * direct);
    }
}

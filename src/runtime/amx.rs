//! Frozen weights in bf16, multiplied on Intel AMX tiles (`compute_dtype = "bf16"`).
//!
//! Why: a training step is nearly all products of short activations with the frozen
//! weights, and on this project's 2-core Xeon fp32 sgemm tops out at ~160-270 GFLOP/s while
//! one AMX `tdpbf16ps` loop reaches ~1,800 GFLOP/s per core (measured here). The weights are
//! frozen, so they are rounded to bf16 and laid out for the tiles once, at load; the
//! activations (or output gradients) are rounded per call, and every product accumulates in
//! f32. This is QLoRA's recipe (a low-precision frozen base, the adapter in full precision)
//! on a CPU.
//!
//! Layout (Intel's "VNNI" form for bf16 B tiles): `B` `[K, N]` is cut into blocks of 16
//! columns × 32 rows; a block is a 16 × 64-byte tile whose row `r` holds, for each of its 16
//! columns `c`, the pair `B[2r, c], B[2r + 1, c]`. Rows past `K` are zero.
//!
//! Every output row is computed from its own input row by the same sequence of tile
//! instructions, whatever the number of rows: a sequence packed with others (grouped
//! training, mixed generation batches) gets the same numbers as alone.
//!
//! Linux grants AMX per process ([`enable`], called by `main`); the kernel then saves the
//! tile state with each thread.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::runtime::parallel::{split_balanced, split_units, SharedOut};

/// Columns of a tile block (16 f32 accumulators of 64 bytes).
const BLOCK_N: usize = 16;
/// Reduction length of a tile block: 16 rows of 32 bf16.
const BLOCK_K: usize = 32;
/// Tile blocks of the reduction kept in cache per pass over the output (2,048 values): A's
/// slice of a 440-row group is then ~1.8 MB, within L2.
const CHUNK_BLOCKS: usize = 64;
/// Elements of one tile (16 × 32 bf16).
const TILE: usize = BLOCK_N * BLOCK_K;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Asks Linux for this process's permission to use AMX tiles (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XTILEDATA)`); the permission covers every thread of the process. The binaries' `main` (and
/// tests) call it; nothing in the library does, since it changes the process. Returns whether
/// AMX-BF16 can be used: the CPU has it (Sapphire Rapids or later) and the kernel (5.16+)
/// granted it.
pub fn enable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if ENABLED.load(Ordering::Relaxed) {
            return true;
        }
        if !cpu_has_amx_bf16() {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it fails cleanly on kernels
        // or CPUs without AMX.
        let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
        ENABLED.store(granted, Ordering::Relaxed);
        granted
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Whether [`enable`] succeeded in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What to tell a user who asked for bf16 where AMX cannot run.
pub const UNAVAILABLE: &str = "bf16 compute needs Intel AMX-BF16 (Xeon Sapphire Rapids or later, Linux 5.16+), which this \
     machine does not offer (or the binary did not call runtime::amx::enable() in main); compute in f32 instead";

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    // EDX bit 22: AMX-BF16, bit 24: AMX-TILE (Intel SDM, CPUID.(EAX=07H,ECX=0)).
    leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0
}
#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_bf16() -> bool {
    false
}

/// `f32` → `bf16` bits as `vcvtneps2bf16` rounds: to nearest even, subnormals to a signed
/// zero, NaN stays NaN.
pub fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((u >> 16) & 0x8000) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// A frozen matrix `B` `[k, n]` in bf16, laid out as AMX B tiles (see the module doc):
/// the right-hand side of `x @ B` for any number of rows of `x` `[m, k]`.
#[derive(Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// `ceil(k / 32)`.
    k_blocks: usize,
    /// `[n / 16][k_blocks]` tiles of 512 bf16, block-column-major.
    tiles: Vec<u16>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {{ k: {}, n: {}, bf16 }}", self.k, self.n)
    }
}

impl PackedB {
    /// Packs `B[i, j] = at(i, j)` for `i < k`, `j < n`; `None` unless `n` is a multiple of 16
    /// (true of every Llama / Qwen width and vocabulary).
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Option<Self> {
        if !n.is_multiple_of(BLOCK_N) || k == 0 || n == 0 {
            return None;
        }
        let k_blocks = k.div_ceil(BLOCK_K);
        let mut tiles = vec![0u16; n / BLOCK_N * k_blocks * TILE];
        for (t, tile) in tiles.chunks_mut(TILE).enumerate() {
            let (j, p) = (t / k_blocks, t % k_blocks);
            for r in 0..BLOCK_K / 2 {
                for c in 0..BLOCK_N {
                    for e in 0..2 {
                        let i = p * BLOCK_K + 2 * r + e;
                        if i < k {
                            tile[(r * BLOCK_N + c) * 2 + e] = to_bf16(at(i, j * BLOCK_N + c));
                        }
                    }
                }
            }
        }
        Some(Self { k, n, k_blocks, tiles })
    }

    /// `x @ w^T` for a row-major `w` `[n, k]` (a linear layer's weight): `B = w^T`.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Option<Self> {
        assert_eq!(w.len(), n * k, "weight of {} values is not {n} x {k}", w.len());
        Self::new(k, n, |i, j| w[j * k + i])
    }

    /// `g @ w` for a row-major `w` `[k, n]` (a linear layer's input gradient): `B = w`.
    pub fn plain(w: &[f32], k: usize, n: usize) -> Option<Self> {
        assert_eq!(w.len(), n * k, "weight of {} values is not {k} x {n}", w.len());
        Self::new(k, n, |i, j| w[i * n + j])
    }

    /// `[k, n]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    fn tile(&self, j: usize, p: usize) -> *const u16 {
        self.tiles[(j * self.k_blocks + p) * TILE..].as_ptr()
    }

    /// `x @ B` for row-major `x` `[m, k]`: `[m, n]` in f32, on up to `threads` threads.
    ///
    /// # Panics
    /// When `x` is not `m × k`, or AMX was not [`enable`]d.
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        self.matmul_rounded(&RoundedRows::new(x, m, self.k, threads), threads)
    }

    /// `x @ B` for `x` already rounded ([`RoundedRows::new`]): [`Self::matmul`]'s values, for
    /// products that share their input (a layer's `q`, `k`, `v`; `gate`, `up`), which round it once.
    ///
    /// # Panics
    /// When `x`'s rows are not `k` wide, or AMX was not [`enable`]d.
    pub fn matmul_rounded(&self, x: &RoundedRows, threads: usize) -> Vec<f32> {
        assert!(enabled(), "{UNAVAILABLE}");
        assert_eq!(x.k, self.k, "input rows of {} values against a reduction of {}", x.k, self.k);
        let (m, m16) = (x.m, x.m16);
        // Left uninitialized: the kernel's first reduction chunk stores every tile of it
        // (zeroing it was 3% of a training profile: the LM head's logits are 25 MB a step).
        let mut out: Vec<f32> = Vec::with_capacity(m16 * self.n);
        let n_blocks = self.n / BLOCK_N;
        // Threads take whole pairs of column blocks, so every column gets the same kernel.
        let pairs = n_blocks.div_ceil(2);
        let out_ptr = SharedOut(out.as_mut_ptr());
        split_balanced(pairs, threads, |from, to| {
            let out_ptr = &out_ptr;
            // SAFETY: each call writes only columns [32 from, 32 to) of `out` (capacity
            // m16 * n), disjoint between threads, and reads back only values it stored;
            // `x` holds m16 rows of k_blocks * 32 bf16.
            unsafe { self.kernel(&x.values, m16, out_ptr.0, 2 * from, (2 * to).min(n_blocks)) }
        });
        // SAFETY: the kernel calls above stored all m16 x n values (every row block of every
        // column block, at the first chunk), and f32 has no invalid bit patterns.
        unsafe { out.set_len(m16 * self.n) };
        out.truncate(m * self.n);
        out
    }

    /// Column blocks `[j0, j1)` of `out` (`[m16, n]`, row-major) = `a @ B`. Stores every
    /// value of those columns before it reads any back, so `out` may be uninitialized.
    ///
    /// # Safety
    /// AMX enabled; `a` is `[m16, k_blocks * 32]`, `out` points at room for `m16 * n` f32
    /// that no other thread touches in these columns.
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel(&self, a: &[u16], m16: usize, out: *mut f32, j0: usize, j1: usize) {
        // The tile registers stay live from one `asm!` block to the next without being declared:
        // the compiler never allocates them (no Rust code here or elsewhere uses AMX), and
        // `tilerelease` at the end leaves them as found.
        let cfg = TileConfig::all_full();
        asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        let a_stride = self.k_blocks * BLOCK_K * 2;
        let c_stride = self.n * 4;
        let m_blocks = m16 / BLOCK_N;
        for p0 in (0..self.k_blocks).step_by(CHUNK_BLOCKS) {
            let p1 = (p0 + CHUNK_BLOCKS).min(self.k_blocks);
            for j in (j0..j1).step_by(2) {
                let two_n = j + 1 < j1;
                for i in (0..m_blocks).step_by(2) {
                    let two_m = i + 1 < m_blocks;
                    // The (i+1, ·) and (·, j+1) pointers are formed even when that block does not
                    // exist (odd edges), hence wrapping arithmetic; they are used only when it does.
                    let c00 = out.add(i * BLOCK_N * self.n + j * BLOCK_N);
                    let c01 = c00.wrapping_add(BLOCK_N);
                    let c10 = c00.wrapping_add(BLOCK_N * self.n);
                    let c11 = c10.wrapping_add(BLOCK_N);
                    // Accumulators: tmm0 (i, j), tmm1 (i, j+1), tmm2 (i+1, j), tmm3 (i+1, j+1).
                    if p0 == 0 {
                        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    } else {
                        asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) c00, s = in(reg) c_stride, options(nostack, readonly));
                        if two_n {
                            asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) c01, s = in(reg) c_stride, options(nostack, readonly));
                        }
                        if two_m {
                            asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) c10, s = in(reg) c_stride, options(nostack, readonly));
                            if two_n {
                                asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) c11, s = in(reg) c_stride, options(nostack, readonly));
                            }
                        }
                    }
                    let a0 = a.as_ptr().cast::<u8>().add(i * BLOCK_N * a_stride);
                    let a1 = a0.wrapping_add(BLOCK_N * a_stride);
                    for p in p0..p1 {
                        let (a0, a1) = (a0.add(p * BLOCK_K * 2), a1.wrapping_add(p * BLOCK_K * 2));
                        asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) a0, s = in(reg) a_stride, options(nostack, readonly));
                        asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) self.tile(j, p), s = in(reg) 64usize, options(nostack, readonly));
                        asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem));
                        if two_n {
                            asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) self.tile(j + 1, p), s = in(reg) 64usize, options(nostack, readonly));
                            asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem));
                        }
                        if two_m {
                            asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) a1, s = in(reg) a_stride, options(nostack, readonly));
                            asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem));
                            if two_n {
                                asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                            }
                        }
                    }
                    asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c00, s = in(reg) c_stride, options(nostack));
                    if two_n {
                        asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c01, s = in(reg) c_stride, options(nostack));
                    }
                    if two_m {
                        asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c10, s = in(reg) c_stride, options(nostack));
                        if two_n {
                            asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c11, s = in(reg) c_stride, options(nostack));
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn kernel(&self, _: &[u16], _: usize, _: *mut f32, _: usize, _: usize) {
        unreachable!("{UNAVAILABLE}")
    }
}

/// The left-hand side of AMX products, `x` `[m, k]` rounded to bf16 and laid out as A tiles:
/// `[m16, ceil(k / 32) * 32]`, `m16` being `m` rounded up to 16, zero-padded.
pub struct RoundedRows {
    values: Vec<u16>,
    m: usize,
    m16: usize,
    k: usize,
}

impl RoundedRows {
    /// Rounds row-major `x` `[m, k]`, its rows split over up to `threads` threads.
    ///
    /// Why split: the rounding of a grouped pass's ~500 rows ran on the calling thread alone
    /// before the product's own split, 7% of a bf16 training profile with the second core
    /// waiting. Each value's rounding is the same on any thread. Why not zeroed first: each
    /// row is written whole (its values, then the padding's zeros), and zeroing the buffer
    /// beforehand was 3.9% of that profile.
    ///
    /// # Panics
    /// When `x` is not `m × k`, or the padded rows would not fit in memory.
    pub fn new(x: &[f32], m: usize, k: usize, threads: usize) -> Self {
        assert_eq!(Some(x.len()), m.checked_mul(k), "input of {} values is not {m} x {k}", x.len());
        let m16 = m.div_ceil(BLOCK_N) * BLOCK_N;
        let kp = k.div_ceil(BLOCK_K) * BLOCK_K;
        let mut values: Vec<u16> = Vec::with_capacity(m16.checked_mul(kp).expect("rounded rows too large to address"));
        let dst = SharedOut(values.as_mut_ptr());
        split_units(m16, threads, |from, to| {
            let dst = &dst;
            for i in from..to {
                // SAFETY: row i's kp values lie within the capacity (i < m16), and the
                // threads' rows are disjoint.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(i * kp).cast::<std::mem::MaybeUninit<u16>>(), kp) };
                let written = if i < m { round_slice(&x[i * k..(i + 1) * k], &mut row[..k]) } else { 0 };
                row[written..].fill(std::mem::MaybeUninit::new(0));
            }
        });
        // SAFETY: `split_units` returns once every part has finished, and the parts wrote
        // every row of the m16 whole (values, then zeros).
        unsafe { values.set_len(m16 * kp) };
        Self { values, m, m16, k }
    }
}

/// `out[i] = to_bf16(x[i])`, sixteen at a time with AVX512-BF16 where the CPU has it (every
/// AMX CPU does; the rounding is the same). Returns how many values it wrote: `x.len()`.
///
/// # Panics
/// When `out` is not as long as `x`.
fn round_slice(x: &[f32], out: &mut [std::mem::MaybeUninit<u16>]) -> usize {
    assert_eq!(x.len(), out.len(), "rounding {} values into {}", x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the feature was just detected; slices are equal in length.
        unsafe { round_slice_avx512(x, out) };
        return x.len();
    }
    for (o, v) in out.iter_mut().zip(x) {
        o.write(to_bf16(*v));
    }
    x.len()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_slice_avx512(x: &[f32], out: &mut [std::mem::MaybeUninit<u16>]) {
    use std::arch::x86_64::*;
    let full = x.len() / 16 * 16;
    for i in (0..full).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), b);
    }
    for i in full..x.len() {
        out[i].write(to_bf16(x[i]));
    }
}

/// `ldtilecfg`'s 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl TileConfig {
    fn all_full() -> Self {
        let mut c = Self { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            c.bytes_per_row[t] = 64;
            c.rows[t] = BLOCK_N as u8;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], b: &PackedB, bf: impl Fn(usize, usize) -> f32, m: usize) -> Vec<f32> {
        let (k, n) = b.dims();
        let r = |v: f32| f32::from_bits((to_bf16(v) as u32) << 16);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| r(x[i * k + t]) as f64 * r(bf(t, j)) as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn products_match_a_bf16_reference_and_rows_do_not_depend_on_their_neighbours() {
        if !enable() {
            eprintln!("skipped: {UNAVAILABLE}");
            return;
        }
        // Odd sizes on purpose: k not a multiple of 32, m not of 16, an odd column-block count,
        // a k spanning two cache chunks, and both odd edges with the chunks' reload.
        for (m, k, n, threads) in
            [(1, 40, 16, 1), (37, 576, 48, 2), (18, 2100, 32, 2), (5, 64, 80, 3), (20, 192, 576, 2), (40, 2100, 48, 2)]
        {
            let x = values(m * k, 7);
            let w = values(n * k, 3);
            let b = PackedB::transposed(&w, n, k).unwrap();
            let got = b.matmul(&x, m, threads);
            let want = reference(&x, &b, |t, j| w[j * k + t], m);
            for (g, e) in got.iter().zip(&want) {
                // f32 accumulation of exact bf16 products against an f64 sum.
                assert!((g - e).abs() <= 1e-5 * k as f32, "{m}x{k}x{n}: {g} against {e}");
            }
            // The rounded rows, split over threads or not: the same values, zeros past k and m.
            let rounded = RoundedRows::new(&x, m, k, threads);
            assert_eq!(rounded.values, RoundedRows::new(&x, m, k, 1).values, "{m}x{k}: rounding split over {threads} threads");
            let kp = k.div_ceil(BLOCK_K) * BLOCK_K;
            for (i, row) in rounded.values.chunks(kp).enumerate() {
                let start = if i < m { k } else { 0 };
                assert!(row[start..].iter().all(|&v| v == 0), "{m}x{k}: row {i} not zero-padded");
            }
            assert_eq!(b.matmul_rounded(&rounded, threads), got, "{m}x{k}x{n}: rounded once, then multiplied");
            // One row alone equals the same row inside the taller product, bit for bit.
            let last = b.matmul(&x[(m - 1) * k..], 1, 1);
            assert_eq!(last[..], got[(m - 1) * n..], "{m}x{k}x{n}: a row alone differs");
            // The input-gradient layout, where k is a multiple of 16.
            if let Some(plain) = PackedB::plain(&w, n, k) {
                let y = values(m * n, 11);
                let got = plain.matmul(&y, m, threads);
                let want = reference(&y, &plain, |t, j| w[t * k + j], m);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= 1e-5 * n as f32, "{m}x{n}x{k} plain: {g} against {e}");
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        let xs = values(1000, 5);
        let mut vec = vec![std::mem::MaybeUninit::new(0u16); xs.len()];
        assert_eq!(round_slice(&xs, &mut vec), xs.len());
        // SAFETY: round_slice wrote every value (and they started as zeros).
        assert!(xs.iter().zip(&vec).all(|(x, v)| to_bf16(*x) == unsafe { v.assume_init() }));
    }
}

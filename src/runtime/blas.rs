//! Frozen-weight matmuls through the system's OpenBLAS (feature `openblas`, on by default),
//! and [`PackedWeight`], a weight laid out once for the f32 kernel ([`crate::runtime::sgemm`])
//! or AMX ([`crate::runtime::amx`]).
//!
//! Why: on this project's 2-core CPU, candle's built-in GEMM reaches ~50-65 GFLOP/s where
//! OpenBLAS (and PyTorch's MKL) reach ~135-150 for the shapes of a LoRA training step, and
//! those matmuls are nearly all of the step's work. Only contiguous f32 CPU tensors take this
//! path; anything else (GPU, bf16, strided views) uses candle's matmul. Since the f32 kernel,
//! OpenBLAS computes attention, the low-rank updates of generation (training's take the
//! kernel where a product's output width is a multiple of 16, see `ops::Products`), and the
//! projections and LM head of a model whose compute dtype was never set or of a CPU without
//! AVX-512.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

#[cfg(feature = "openblas")]
mod ffi {
    use std::os::raw::c_int;
    pub const ROW_MAJOR: c_int = 101;
    pub const NO_TRANS: c_int = 111;
    pub const TRANS: c_int = 112;
    #[link(name = "openblas")]
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            layout: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        pub fn openblas_get_corename() -> *const std::os::raw::c_char;
        pub fn openblas_get_num_threads() -> c_int;
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, or returns `None`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Some(f(&v[start..start + t.elem_count()]))
        }
        _ => None,
    }
}

/// [`with_f32`] for several tensors at once: `None` unless every one is a contiguous f32 CPU
/// tensor.
fn with_f32_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    if ts.iter().any(|t| !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 || !t.is_contiguous()) {
        return None;
    }
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for ((storage, layout), t) in held.iter().zip(ts) {
        match &**storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                let start = layout.start_offset();
                slices.push(&v[start..start + t.elem_count()]);
            }
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// `x @ w^T` for `x` `[m, k]` and `w` `[n, k]`, or `None` when this path does not apply.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Option<candle_core::Result<Tensor>> {
    product(x, w, false, true, true)
}

/// [`matmul_nt`]'s `[m, n]` values, row-major, owned: for a caller that rewrites them in
/// place (the LM head's logits into the loss's gradient) rather than copying them out of a
/// tensor.
pub fn matmul_nt_values(x: &Tensor, w: &Tensor) -> Option<candle_core::Result<Vec<f32>>> {
    product_values(x, w, false, true, true).map(|r| r.map(|(values, _)| values))
}

/// `g @ w` for `g` `[m, n]` and `w` `[n, k]`, or `None` when this path does not apply.
pub fn matmul_nn(g: &Tensor, w: &Tensor) -> Option<candle_core::Result<Tensor>> {
    product(g, w, false, false, true)
}

/// Below this many rows (decoding one token of a single sequence) candle's own kernel is
/// faster than OpenBLAS here (200 greedy tokens: 6.0 s against 9.5 s). From 2 rows on every
/// matmul takes OpenBLAS, whose sgemm computes each row independently of the others (checked
/// for 2 to 640 rows): a sequence packed with others (grouped training, mixed generation
/// batches) gets the same numbers as alone. A threshold above 2 would break that for short
/// sequences, which alone would take candle's kernel.
pub(crate) const MIN_ROWS: usize = 2;

/// Whether the BLAS path is compiled in.
pub const ENABLED: bool = cfg!(feature = "openblas");

/// Batched `op(a) @ op(b)` over the leading dimensions (equal in both), where `op`
/// transposes the last two dimensions when asked. Both tensors must be contiguous f32 on the
/// CPU; otherwise `None` and the caller uses candle's matmul.
///
/// Small products are not padded here (see [`SMALL_PRODUCT`]): callers whose rows must not
/// depend on the matrix they are in use [`matmul_nt`] / [`matmul_nn`].
pub fn batched(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Option<candle_core::Result<Tensor>> {
    product(a, b, trans_a, trans_b, false)
}

fn product(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, pad_small: bool) -> Option<candle_core::Result<Tensor>> {
    Some(product_values(a, b, trans_a, trans_b, pad_small)?.and_then(|(values, shape)| Tensor::from_vec(values, shape, &Device::Cpu)))
}

/// [`product`]'s values and shape.
#[allow(clippy::type_complexity)]
fn product_values(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    pad_small: bool,
) -> Option<candle_core::Result<(Vec<f32>, Vec<usize>)>> {
    if !ENABLED || a.rank() < 2 || a.rank() != b.rank() {
        return None;
    }
    let r = a.rank();
    let (ad, bd) = (a.dims(), b.dims());
    if ad[..r - 2] != bd[..r - 2] {
        return None;
    }
    let batch: usize = ad[..r - 2].iter().product();
    let (m, ka) = if trans_a { (ad[r - 1], ad[r - 2]) } else { (ad[r - 2], ad[r - 1]) };
    let (kb, n) = if trans_b { (bd[r - 1], bd[r - 2]) } else { (bd[r - 2], bd[r - 1]) };
    if ka != kb || m < MIN_ROWS || n == 0 || ka == 0 {
        return None;
    }
    let k = ka;
    // Not zeroed: with beta = 0 BLAS writes every element of its output without reading it
    // (zeroing it first was 18% of the low-rank updates' backward in a grouped profile).
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    let spare = &mut out.spare_capacity_mut()[..batch * m * n];
    with_f32(a, |av| {
        with_f32(b, |bv| {
            for (i, c) in spare.chunks_exact_mut(m * n).enumerate() {
                let (a, b) = (&av[i * m * k..(i + 1) * m * k], &bv[i * k * n..(i + 1) * k * n]);
                if pad_small {
                    gemm_padded(a, b, c, m, n, k, trans_a, trans_b);
                } else {
                    sgemm(a, b, c, m, n, k, trans_a, trans_b);
                }
            }
        })
    })??;
    // SAFETY: each of the `batch` products above wrote all m × n values of its chunk.
    unsafe { out.set_len(batch * m * n) };
    let mut shape = ad[..r - 2].to_vec();
    shape.extend([m, n]);
    Some(Ok((out, shape)))
}

/// Below about a million multiply-adds OpenBLAS switches (on some CPUs) to small-matrix
/// kernels, and a row computed there differs in its last bits from the same row inside a
/// taller product (measured here: up to 6 rows of a 576 -> 192 projection, 3 of 576 -> 576).
/// Padding a product below this size with zero rows keeps every row's numbers independent
/// of how many rows share its matmul, which is what makes packed sequences exact. (Only the
/// frozen projections need it: attention runs per sequence at the sequence's own shapes.)
#[cfg(feature = "openblas")]
const SMALL_PRODUCT: usize = 1 << 21;

#[cfg(feature = "openblas")]
#[allow(clippy::too_many_arguments)]
fn gemm_padded(a: &[f32], b: &[f32], c: &mut [MaybeUninit<f32>], m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) {
    if !trans_a && m * n * k < SMALL_PRODUCT {
        let rows = SMALL_PRODUCT.div_ceil(n * k).max(m);
        let mut a_pad = vec![0f32; rows * k];
        a_pad[..m * k].copy_from_slice(&a[..m * k]);
        let mut c_pad = vec![MaybeUninit::uninit(); rows * n];
        sgemm(&a_pad, b, &mut c_pad, rows, n, k, false, trans_b);
        c[..m * n].copy_from_slice(&c_pad[..m * n]);
        return;
    }
    sgemm(a, b, c, m, n, k, trans_a, trans_b)
}

#[cfg(feature = "openblas")]
#[allow(clippy::too_many_arguments)]
fn sgemm(a: &[f32], b: &[f32], c: &mut [MaybeUninit<f32>], m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) {
    let t = |x: bool| if x { ffi::TRANS } else { ffi::NO_TRANS };
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm: operands shorter than {m} x {k} x {n}");
    // SAFETY: row-major a is m×k (k×m when transposed), b k×n (n×k), c m×n (lengths checked
    // above); with beta = 0, sgemm writes all of c and reads none of it.
    unsafe {
        ffi::cblas_sgemm(
            ffi::ROW_MAJOR,
            t(trans_a),
            t(trans_b),
            m as i32,
            n as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            if trans_a { m as i32 } else { k as i32 },
            b.as_ptr(),
            if trans_b { k as i32 } else { n as i32 },
            0.0,
            c.as_mut_ptr().cast::<f32>(),
            n as i32,
        )
    }
}

#[cfg(not(feature = "openblas"))]
#[allow(clippy::too_many_arguments)]
fn gemm_padded(_: &[f32], _: &[f32], _: &mut [MaybeUninit<f32>], _: usize, _: usize, _: usize, _: bool, _: bool) {
    unreachable!("no products without OpenBLAS: `product` returns None first")
}

#[cfg(not(feature = "openblas"))]
#[allow(clippy::too_many_arguments)]
fn sgemm(_: &[f32], _: &[f32], _: &mut [MaybeUninit<f32>], _: usize, _: usize, _: usize, _: bool, _: bool) {
    unreachable!("no products without OpenBLAS: `product` returns None first")
}

/// The kernels OpenBLAS chose for this CPU (`openblas_get_corename`: "SkylakeX",
/// "Haswell", "Prescott", ...), or `None` without the BLAS path.
pub fn kernel_name() -> Option<String> {
    #[cfg(feature = "openblas")]
    {
        // SAFETY: returns a pointer to a static NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(ffi::openblas_get_corename()) };
        Some(name.to_string_lossy().into_owned())
    }
    #[cfg(not(feature = "openblas"))]
    None
}

/// What to do when OpenBLAS runs kernels older than the CPU, or `None`. Its runtime
/// dispatch picks kernels by CPU model, and a release older than the CPU (Debian 12's 0.3.21
/// on an Emerald Rapids Xeon, seen here) falls back to its SSE3 "Prescott" kernels: 4.6x
/// slower (61 against 285 GFLOP/s, 1024³ sgemm), and rows of a product then depend on their
/// neighbours, which grouped training's exactness rests on. `OPENBLAS_CORETYPE`, read when
/// OpenBLAS loads, names the kernels instead; the Makefile sets it from the CPU's flags.
pub fn kernel_warning() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (std::arch::is_x86_feature_detected!("avx512bw"), std::arch::is_x86_feature_detected!("avx2"));
    #[cfg(not(target_arch = "x86_64"))]
    let (avx512, avx2) = (false, false);
    kernel_advice(&kernel_name()?, avx512, avx2)
}

/// [`kernel_warning`] for kernels `name` on a CPU with or without AVX-512 (BW) and AVX2.
fn kernel_advice(name: &str, avx512: bool, avx2: bool) -> Option<String> {
    // OpenBLAS's x86 cores older than AVX2, whose kernels an AVX2 CPU outruns
    const PRE_AVX2: [&str; 12] = [
        "Prescott",
        "Core2",
        "Penryn",
        "Dunnington",
        "Nehalem",
        "Atom",
        "Katmai",
        "Coppermine",
        "Northwood",
        "Banias",
        "Sandybridge",
        "Barcelona",
    ];
    let (cpu, fit) = if avx512 { ("AVX-512", "SkylakeX") } else { ("AVX2", "Haswell") };
    (avx2 && PRE_AVX2.contains(&name)).then(|| {
        format!(
            "OpenBLAS runs its {name} kernels on a CPU with {cpu}: it does not know this CPU, and matmuls run several \
             times slower. Run through make (which sets OPENBLAS_CORETYPE), or set OPENBLAS_CORETYPE={fit}"
        )
    })
}

/// The precision of the frozen weights' products (`model.compute_dtype` in a config). LoRA
/// factors, their gradients, the optimizer and every other op stay in f32 either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// The f32 weights: on the AVX-512 kernel ([`crate::runtime::sgemm`]) where the CPU has it,
    /// else OpenBLAS sgemm (or candle's matmul).
    #[default]
    F32,
    /// The weights rounded to bf16 once and multiplied on AMX tiles with f32 accumulation
    /// ([`PackedWeight`]); the activations are rounded per product.
    Bf16,
}

impl ComputeDtype {
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

/// A frozen weight `w` `[out, in]` laid out once for the products of a linear layer,
/// `x @ w^T` (forward) and `g @ w` (input gradient), in the model's [`ComputeDtype`]:
///
/// - bf16: rounded and laid out for AMX tiles (see [`crate::runtime::amx`]), 2 bytes per
///   value for each product, as much as the f32 weight it sits beside;
/// - f32: `w^T` cut into column panels for the AVX-512 kernel ([`crate::runtime::sgemm`]),
///   4 bytes per value; the input gradient reads `w` itself.
#[derive(Debug)]
pub struct PackedWeight(Packed);

#[derive(Debug)]
enum Packed {
    Bf16 {
        /// `w^T` `[in, out]`.
        forward: crate::runtime::amx::PackedB,
        /// `w` `[out, in]`.
        backward: crate::runtime::amx::PackedB,
    },
    F32 {
        /// `w^T` `[in, out]`.
        forward: crate::runtime::sgemm::Panels,
        /// `w` `[out, in]` (a handle on the model's own tensor).
        weight: Tensor,
    },
}

/// Products of at least this many multiply-adds (33.5 million) run on as many threads as
/// OpenBLAS uses; smaller ones on one: every projection of a solo step's ~34 rows (its LM
/// head, 34 × 576 -> 49,152, is above and takes both), none of a group's. Measured
/// here (2 cores): in a micro-benchmark two threads ran 1.3-2.2x one from 136 × 576 -> 1,536
/// on (e.g. 440 × 1,536 -> 576: 420-653 against 279-292 GFLOP/s), at 34 × 576 -> 1,536 only
/// +8-11%; in training, alternating runs with the limit at 2^22 and 2^27 (3 each) were
/// inside each other's spread (solo 180-254 against 240-248 tokens/s).
const AMX_THREADED_PRODUCT: usize = 1 << 25;

impl PackedWeight {
    /// Lays out `w` (a contiguous 2-D f32 CPU tensor whose dimensions are multiples of 16)
    /// for `dtype`.
    ///
    /// # Errors
    /// bf16 when AMX was not enabled in this process, f32 on a CPU without AVX-512F, or `w`
    /// not of that form.
    pub fn new(w: &Tensor, dtype: ComputeDtype) -> candle_core::Result<Self> {
        let (out, inp) = w.dims2()?;
        let packed = match dtype {
            ComputeDtype::Bf16 => {
                if !crate::runtime::amx::enabled() {
                    candle_core::bail!("{}", crate::runtime::amx::UNAVAILABLE);
                }
                with_f32(w, |v| {
                    let forward = crate::runtime::amx::PackedB::transposed(v, out, inp)?;
                    let backward = crate::runtime::amx::PackedB::plain(v, out, inp)?;
                    Some(Packed::Bf16 { forward, backward })
                })
            }
            ComputeDtype::F32 => {
                if !crate::runtime::sgemm::available() {
                    candle_core::bail!("the f32 kernel needs AVX-512F, which this CPU does not have");
                }
                with_f32(w, |v| {
                    let forward = crate::runtime::sgemm::Panels::transposed(v, out, inp)?;
                    (inp.is_multiple_of(16)).then(|| Packed::F32 { forward, weight: w.clone() })
                })
            }
        };
        match packed {
            Some(Some(p)) => Ok(Self(p)),
            Some(None) => candle_core::bail!("a packed weight needs both dimensions multiples of 16, not {out} x {inp}"),
            None => candle_core::bail!("a weight is packed from a contiguous f32 CPU tensor, not {:?} on {:?}", w.dtype(), w.device()),
        }
    }

    /// The precision of its products.
    pub fn dtype(&self) -> ComputeDtype {
        match self.0 {
            Packed::Bf16 { .. } => ComputeDtype::Bf16,
            Packed::F32 { .. } => ComputeDtype::F32,
        }
    }

    /// `x @ w^T` for `x` `[m, in]` (f32 CPU): `[m, out]`.
    pub fn matmul_nt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = match &self.0 {
            Packed::Bf16 { forward, .. } => forward.dims().1,
            Packed::F32 { forward, .. } => forward.dims().1,
        };
        Tensor::from_vec(self.matmul_nt_values(x)?, (x.dim(0)?, n), &Device::Cpu)
    }

    /// [`Self::matmul_nt`]'s `[m, out]` values, row-major, owned (see [`matmul_nt_values`]).
    pub fn matmul_nt_values(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        match &self.0 {
            Packed::Bf16 { forward, .. } => Self::product(forward.dims(), x, AMX_THREADED_PRODUCT, |v, m, t| forward.matmul(v, m, t)),
            Packed::F32 { forward, .. } => Self::product(forward.dims(), x, 0, |v, m, t| forward.matmul(v, m, t)),
        }
    }

    /// `g @ w` for `g` `[m, out]` (f32 CPU): `[m, in]`.
    pub fn matmul_nn(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let (values, n) = match &self.0 {
            Packed::Bf16 { backward, .. } => {
                let values = Self::product(backward.dims(), g, AMX_THREADED_PRODUCT, |v, m, t| backward.matmul(v, m, t))?;
                (values, backward.dims().1)
            }
            Packed::F32 { weight, .. } => {
                let (k, n) = weight.dims2()?;
                let w = weight.clone();
                let values = Self::product((k, n), g, 0, move |v, m, t| {
                    with_f32(&w, |wv| crate::runtime::sgemm::matmul_plain(v, m, wv, k, n, t))
                        .flatten()
                        .expect("checked at packing: a contiguous f32 CPU weight whose dimensions are multiples of 16")
                })?;
                (values, n)
            }
        };
        Tensor::from_vec(values, (g.dim(0)?, n), &Device::Cpu)
    }

    /// `x @ w_o^T` for each of `weights` (all packed for one [`ComputeDtype`], sharing the input
    /// width) on `x` `[m, in]` (f32 CPU): one `[m, out_o]` tensor each, with
    /// [`Self::matmul_nt`]'s values. f32: one call of the kernel
    /// ([`crate::runtime::sgemm::matmul_many`]); bf16: `x` rounded once for all of them
    /// ([`crate::runtime::amx::RoundedRows`]). `None` where `weights` is empty, they are packed
    /// for different dtypes or `x` is not on the CPU; then each product runs alone.
    ///
    /// # Errors
    /// When `x`'s width is not the weights' input width.
    pub fn matmul_nt_many(weights: &[&PackedWeight], x: &Tensor) -> Option<candle_core::Result<Vec<Tensor>>> {
        let first = weights.first()?;
        if !matches!(x.device(), Device::Cpu) || weights.iter().any(|p| p.dtype() != first.dtype()) {
            return None;
        }
        Some((|| {
            let (m, kx) = x.dims2()?;
            let dims: Vec<(usize, usize)> = weights
                .iter()
                .map(|p| match &p.0 {
                    Packed::F32 { forward, .. } => forward.dims(),
                    Packed::Bf16 { forward, .. } => forward.dims(),
                })
                .collect();
            if let Some((k, _)) = dims.iter().find(|(k, _)| *k != kx) {
                candle_core::bail!("packed matmul: input rows of {kx} values against a weight of {k}");
            }
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            let outs = with_f32(&x, |v| match first.dtype() {
                ComputeDtype::F32 => {
                    let panels: Vec<&crate::runtime::sgemm::Panels> = weights
                        .iter()
                        .map(|p| match &p.0 {
                            Packed::F32 { forward, .. } => forward,
                            Packed::Bf16 { .. } => unreachable!("one dtype, checked above"),
                        })
                        .collect();
                    crate::runtime::sgemm::matmul_many(&panels, v, m, threads())
                }
                ComputeDtype::Bf16 => {
                    // Each product on the threads where it alone would take them; the rounding
                    // where any does.
                    let product_threads = |n: usize| if m * kx * n >= AMX_THREADED_PRODUCT { threads() } else { 1 };
                    let round_threads = dims.iter().map(|&(_, n)| product_threads(n)).max().unwrap_or(1);
                    let rounded = crate::runtime::amx::RoundedRows::new(v, m, kx, round_threads);
                    weights
                        .iter()
                        .zip(&dims)
                        .map(|(p, &(_, n))| match &p.0 {
                            Packed::Bf16 { forward, .. } => forward.matmul_rounded(&rounded, product_threads(n)),
                            Packed::F32 { .. } => unreachable!("one dtype, checked above"),
                        })
                        .collect()
                }
            })
            .expect("a contiguous f32 CPU tensor");
            outs.into_iter().zip(&dims).map(|(values, &(_, n))| Tensor::from_vec(values, (m, n), &Device::Cpu)).collect()
        })())
    }

    /// `Σ g_t @ w_t` for `terms` `(w_t, g_t)`: weights `[out_t, in]` packed for the f32 kernel
    /// and output gradients `g_t` `[m, out_t]` (f32 CPU), as one product on the kernel
    /// ([`crate::runtime::sgemm::matmul_plain_sum`]): `[m, in]`, the input gradient of
    /// projections that share their input. `None` where a weight is not packed for the f32
    /// kernel (bf16) or a `g_t` is not on the CPU; then each product runs alone.
    ///
    /// # Errors
    /// When the terms' shapes do not fit together.
    pub fn matmul_nn_sum(terms: &[(&PackedWeight, &Tensor)]) -> Option<candle_core::Result<Tensor>> {
        let weights: Vec<&Tensor> = terms
            .iter()
            .map(|(p, _)| match &p.0 {
                Packed::F32 { weight, .. } => Some(weight),
                Packed::Bf16 { .. } => None,
            })
            .collect::<Option<_>>()?;
        if terms.is_empty() || terms.iter().any(|(_, g)| !matches!(g.device(), Device::Cpu)) {
            return None;
        }
        Some((|| {
            let (m, n) = (terms[0].1.dim(0)?, weights[0].dim(1)?);
            let mut gs = Vec::with_capacity(terms.len());
            let mut dims = Vec::with_capacity(terms.len());
            for ((_, g), w) in terms.iter().zip(&weights) {
                let ((gm, gk), (k, wn)) = (g.dims2()?, w.dims2()?);
                if gm != m || gk != k || wn != n {
                    candle_core::bail!(
                        "a sum of input gradients: {gm} x {gk} against a weight of {k} x {wn} (first term: {m} rows, {n} inputs)"
                    );
                }
                gs.push(g.to_dtype(DType::F32)?.contiguous()?);
                dims.push(k);
            }
            let all: Vec<&Tensor> = gs.iter().chain(weights.iter().copied()).collect();
            let values = with_f32_all(&all, |v| {
                let (g, w) = v.split_at(terms.len());
                let parts: Vec<(&[f32], &[f32], usize)> = (0..terms.len()).map(|t| (g[t], w[t], dims[t])).collect();
                crate::runtime::sgemm::matmul_plain_sum(&parts, m, n, threads())
            })
            .flatten()
            .expect("checked at packing: contiguous f32 CPU weights whose dimensions are multiples of 16");
            Tensor::from_vec(values, (m, n), &Device::Cpu)
        })())
    }

    /// `x @ B`'s `[m, n]` values for `B` `[k, n]` by `f(x, m, threads)`, on [`threads`]
    /// threads from `threaded` multiply-adds on.
    fn product(
        dims: (usize, usize),
        x: &Tensor,
        threaded: usize,
        f: impl FnOnce(&[f32], usize, usize) -> Vec<f32>,
    ) -> candle_core::Result<Vec<f32>> {
        let (k, n) = dims;
        let (m, kx) = x.dims2()?;
        if kx != k {
            candle_core::bail!("packed matmul: input rows of {kx} values against a weight of {k}");
        }
        let threads = if m * k * n >= threaded { threads() } else { 1 };
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        match with_f32(&x, |v| f(v, m, threads)) {
            Some(y) => Ok(y),
            None => candle_core::bail!("packed matmul: the input is on {:?}, not the CPU", x.device()),
        }
    }
}

/// How many threads OpenBLAS runs a product on (`OPENBLAS_NUM_THREADS`, else the cores);
/// 1 without BLAS. The cores it uses sit idle between products, which is when
/// [`crate::runtime::ops`]' elementwise work runs, so that work may use as many.
pub fn threads() -> usize {
    #[cfg(feature = "openblas")]
    {
        // SAFETY: reads OpenBLAS's thread count; no arguments, no state changed.
        unsafe { ffi::openblas_get_num_threads() }.max(1) as usize
    }
    #[cfg(not(feature = "openblas"))]
    {
        1
    }
}

/// How the split workers wait between splits ([`crate::runtime::parallel::start_workers`]):
/// hot where the products run on them (the f32 kernel, on AVX-512 CPUs), parking soon where
/// OpenBLAS's own threads compute the products on the same cores. On an AVX-512 CPU the
/// products that still take OpenBLAS (a weight not laid out for the kernel: the embedder's,
/// a library user's) run beside workers that hold the second core for up to 500 µs after
/// their last split. The binaries' `main` applies it.
pub fn worker_spin() -> crate::runtime::parallel::WorkerSpin {
    if crate::runtime::sgemm::available() {
        crate::runtime::parallel::WorkerSpin::Hot
    } else {
        crate::runtime::parallel::WorkerSpin::BesideBlas
    }
}

/// How many threads candle's rayon pool should have beside BLAS: one, since two pools
/// spinning on two cores slowed training by 40%; `None` without BLAS (rayon's default).
/// The binaries' `main` applies it (and sets `RAYON_NUM_THREADS`, which candle reads at
/// every matmul to choose its own parallelism); no library function changes the process.
pub fn rayon_threads_beside_blas() -> Option<usize> {
    ENABLED.then_some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blas_matches_candle() {
        let x = Tensor::randn(0f32, 1., (9, 5), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 5), &Device::Cpu).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(matmul_nt(&x, &w).is_some(), ENABLED);
        if let Some(got) = matmul_nt(&x, &w) {
            let d = (got.unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5);
        }
        let g = Tensor::randn(0f32, 1., (9, 3), &Device::Cpu).unwrap();
        let want = g.matmul(&w).unwrap();
        if let Some(got) = matmul_nn(&g, &w) {
            let d = (got.unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5);
        }
        // a strided view does not take this path
        assert!(matmul_nt(&x.t().unwrap(), &w.t().unwrap()).is_none());
        // batched with transposes
        let a = Tensor::randn(0f32, 1., (2, 3, 4, 9), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (2, 3, 4, 10), &Device::Cpu).unwrap();
        if let Some(got) = batched(&a, &b, true, false) {
            let want = a.t().unwrap().matmul(&b).unwrap();
            let d = (got.unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5);
        }
        let c = Tensor::randn(0f32, 1., (2, 3, 6, 9), &Device::Cpu).unwrap();
        if let Some(got) = batched(&a, &c, false, true) {
            let want = a.matmul(&c.t().unwrap()).unwrap();
            let d = (got.unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5);
        }
    }

    /// Shapes and tensors this path cannot compute are left to candle (`None`), each guard
    /// on its own next to a product it takes: ranks below 2 or unequal, unequal leading
    /// dimensions, unequal inner dimensions, fewer than [`MIN_ROWS`] rows, an empty output
    /// or inner dimension, a dtype other than f32. A bf16 or strided operand is refused too.
    #[test]
    fn refuses_what_it_cannot_compute() {
        if !ENABLED {
            return;
        }
        let t = |dims: &[usize]| Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap();
        let takes = |a: &Tensor, b: &Tensor, ta: bool, tb: bool| product_values(a, b, ta, tb, true).is_some();
        // taken: [3, 4] @ [4, 5], batched [2, 3, 4] @ [2, 4, 5], transposed [4, 3]ᵀ @ [5, 4]ᵀ
        assert!(takes(&t(&[3, 4]), &t(&[4, 5]), false, false));
        assert!(takes(&t(&[2, 3, 4]), &t(&[2, 4, 5]), false, false));
        assert!(takes(&t(&[4, 3]), &t(&[5, 4]), true, true));
        // refused, one guard each
        assert!(!takes(&t(&[4]), &t(&[4]), false, false), "rank 1");
        assert!(!takes(&t(&[2, 3, 4]), &t(&[4, 5]), false, false), "unequal ranks");
        assert!(!takes(&t(&[2, 3, 4]), &t(&[3, 4, 5]), false, false), "unequal leading dimensions");
        assert!(!takes(&t(&[3, 4]), &t(&[5, 5]), false, false), "unequal inner dimensions");
        assert!(!takes(&t(&[1, 4]), &t(&[4, 5]), false, false), "one row");
        assert!(!takes(&t(&[4, 1]), &t(&[4, 5]), true, false), "one row, transposed");
        assert!(!takes(&t(&[3, 4]), &t(&[4, 0]), false, false), "no columns");
        assert!(!takes(&t(&[3, 0]), &t(&[0, 5]), false, false), "no inner dimension");
        let bf16 = t(&[3, 4]).to_dtype(DType::BF16).unwrap();
        assert!(!takes(&bf16, &t(&[4, 5]), false, false), "bf16");
        assert!(!takes(&t(&[4, 3]).t().unwrap(), &t(&[4, 5]), false, false), "a strided view");
        // two rows are taken, and agree with candle
        let (a, b) = (t(&[2, 4]), t(&[4, 5]));
        let (values, shape) = product_values(&a, &b, false, false, true).unwrap().unwrap();
        assert_eq!(shape, [2, 5]);
        let want: Vec<f32> = a.matmul(&b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5), "{values:?} against {want:?}");
    }

    /// A weight packed for the f32 kernel gives candle's products (forward and input
    /// gradient) within f32 rounding, rows from 1 to past a register block, and reports its
    /// dtype; a width that is not a multiple of 16 is refused by name.
    #[test]
    fn f32_packed_weight_matches_candle() {
        if !crate::runtime::sgemm::available() {
            return;
        }
        let w = Tensor::randn(0f32, 1., (48, 80), &Device::Cpu).unwrap();
        let p = PackedWeight::new(&w, ComputeDtype::F32).unwrap();
        assert_eq!(p.dtype(), ComputeDtype::F32);
        for m in [1, 13, 30] {
            let x = Tensor::randn(0f32, 1., (m, 80), &Device::Cpu).unwrap();
            let d = (p.matmul_nt(&x).unwrap() - x.matmul(&w.t().unwrap()).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "forward, {m} rows");
            let g = Tensor::randn(0f32, 1., (m, 48), &Device::Cpu).unwrap();
            let d = (p.matmul_nn(&g).unwrap() - g.matmul(&w).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "input gradient, {m} rows");
        }
        let odd = Tensor::randn(0f32, 1., (40, 80), &Device::Cpu).unwrap();
        let err = PackedWeight::new(&odd, ComputeDtype::F32).unwrap_err().to_string();
        assert!(err.contains("multiples of 16, not 40 x 80"), "{err}");
    }

    /// The kernels OpenBLAS reports are the ones `OPENBLAS_CORETYPE` named (the Makefile
    /// sets it), and a process forced onto old kernels is told what to set: run as a child
    /// of this test binary with `OPENBLAS_CORETYPE=Prescott`, it prints the warning.
    #[test]
    fn the_kernels_in_use_are_reported() {
        if !ENABLED {
            return;
        }
        let name = kernel_name().unwrap();
        match std::env::var("OPENBLAS_CORETYPE") {
            Ok(want) if !want.is_empty() => assert_eq!(name.to_lowercase(), want.to_lowercase()),
            _ => assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "{name:?}"),
        }
        if std::env::var_os("SELFEDIT_BLAS_CHILD").is_some() {
            println!("warning: {:?}", kernel_warning());
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "runtime::blas::tests::the_kernels_in_use_are_reported", "--nocapture", "--test-threads=1"])
                .env("OPENBLAS_CORETYPE", "Prescott")
                .env("SELFEDIT_BLAS_CHILD", "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && stdout.contains("OpenBLAS runs its Prescott kernels"), "{stdout}");
        }
    }

    /// Kernels older than the CPU get advice naming the kernels that fit it; fitting kernels,
    /// or a CPU without AVX2, get none.
    #[test]
    fn old_kernels_on_a_new_cpu_are_named() {
        let advice = kernel_advice("Prescott", true, true).unwrap();
        assert!(advice.contains("Prescott kernels on a CPU with AVX-512") && advice.ends_with("OPENBLAS_CORETYPE=SkylakeX"), "{advice}");
        assert!(kernel_advice("Sandybridge", false, true).unwrap().ends_with("OPENBLAS_CORETYPE=Haswell"));
        assert_eq!(kernel_advice("Haswell", false, true), None);
        assert_eq!(kernel_advice("SkylakeX", true, true), None);
        assert_eq!(kernel_advice("Prescott", false, false), None);
    }

    /// Rows of a projection come out bit for bit the same alone (2-9 rows) as inside a
    /// 300-row product, forward (`x W^T`) and backward (`g W`): the property packed
    /// sequences rely on.
    #[test]
    fn rows_do_not_depend_on_their_neighbours() {
        if !ENABLED {
            return;
        }
        assert_eq!(kernel_warning(), None);
        for (n, k) in [(192, 576), (576, 576), (1536, 576)] {
            let x = Tensor::randn(0f32, 1., (300, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
            let tall: Vec<Vec<f32>> = matmul_nt(&x, &w).unwrap().unwrap().to_vec2().unwrap();
            let g = Tensor::randn(0f32, 1., (300, n), &Device::Cpu).unwrap();
            let tall_g: Vec<Vec<f32>> = matmul_nn(&g, &w).unwrap().unwrap().to_vec2().unwrap();
            for m in 2..10 {
                let start = 7 * m;
                let few: Vec<Vec<f32>> = matmul_nt(&x.narrow(0, start, m).unwrap(), &w).unwrap().unwrap().to_vec2().unwrap();
                assert_eq!(few, tall[start..start + m], "x W^T, {m} rows of {k} -> {n}");
                let few: Vec<Vec<f32>> = matmul_nn(&g.narrow(0, start, m).unwrap(), &w).unwrap().unwrap().to_vec2().unwrap();
                assert_eq!(few, tall_g[start..start + m], "g W, {m} rows of {n} -> {k}");
            }
        }
    }
}

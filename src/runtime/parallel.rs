//! Column splits of the hand-written products ([`crate::runtime::sgemm`],
//! [`crate::runtime::amx`]) over scoped threads: one place for the split both kernels use,
//! below [`crate::runtime::blas`], which packs weights for them.

/// An output buffer shared by the scoped threads of one hand-written product
/// ([`crate::runtime::sgemm`], [`crate::runtime::amx`]), each of which writes only its own
/// columns.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the products that hand it to [`split_units`]' threads give each thread a disjoint
// range of columns, and no thread reads what another wrote.
unsafe impl Sync for SharedOut {}

/// `work(from, to)` over `0..units` in at most `threads` contiguous ranges, the first on the
/// calling thread and the others on scoped threads: the products split their columns this
/// way, so a row's arithmetic does not depend on the split.
pub(crate) fn split_units(units: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
    let threads = threads.clamp(1, units.max(1));
    if threads == 1 {
        return work(0, units);
    }
    let per = units.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 1..threads {
            let work = &work;
            s.spawn(move || work((t * per).min(units), ((t + 1) * per).min(units)));
        }
        work(0, per.min(units));
    });
}

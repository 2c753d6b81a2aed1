//! What every binary's `main` does first: the process-wide setup (thread pools, logging),
//! kept out of the library so that loading a model never changes the process.

/// Sizes candle's rayon pool beside OpenBLAS (one thread; see
/// `selfedit::runtime::blas::rayon_threads_beside_blas`) unless `RAYON_NUM_THREADS` is set,
/// and logs warnings to stderr (`RUST_LOG` overrides the level).
pub fn init() {
    if let (Some(n), None) = (selfedit::runtime::blas::rayon_threads_beside_blas(), std::env::var_os("RAYON_NUM_THREADS")) {
        // SAFETY (of intent): set before any thread is started by this process.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}

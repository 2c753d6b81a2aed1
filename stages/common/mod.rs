//! What every binary's `main` does first: the process-wide setup (thread pools, logging),
//! kept out of the library so that loading a model never changes the process; and
//! [`stage_main!`], which writes a stage binary's argument struct and `main`.

/// Sizes candle's rayon pool beside OpenBLAS (one thread; see
/// `selfedit::runtime::blas::rayon_threads_beside_blas`) unless `RAYON_NUM_THREADS` is set,
/// starts the workers the runtime splits its work over (one fewer than OpenBLAS's threads;
/// `selfedit::runtime::parallel::start_workers`),
/// tells the allocator to keep freed memory, turns file-size-limit signals into write errors,
/// logs warnings to stderr (`RUST_LOG` overrides the level), warns when OpenBLAS runs
/// kernels older than the CPU, and asks Linux for AMX (`runtime::amx::enable`).
pub fn init() {
    keep_freed_memory();
    // A file-size limit (ulimit -f, a full quota) then fails the write with an error naming
    // the file, and the temporary file is removed, instead of killing the process mid-write.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if let (Some(n), None) = (selfedit::runtime::blas::rayon_threads_beside_blas(), std::env::var_os("RAYON_NUM_THREADS")) {
        // Set before this process starts any thread: candle reads it at every matmul.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(warning) = selfedit::runtime::blas::kernel_warning() {
        tracing::warn!("{warning}");
    }
    // Only grants this process the use of AMX tiles (for `compute_dtype = "bf16"`); whether
    // anything uses them is the config's choice.
    selfedit::runtime::amx::enable();
    if let Err(e) =
        selfedit::runtime::parallel::start_workers(selfedit::runtime::blas::threads() - 1, selfedit::runtime::blas::worker_spin())
    {
        // The splits then start scoped threads, as in tests: slower, the same numbers.
        tracing::warn!("{e}");
    }
}

/// mimalloc's `purge_delay` (option 15 of mimalloc 2) to -1: freed memory stays with the
/// process. A training pass allocates and frees hundreds of MB of activations and logits;
/// returned to the kernel after mimalloc's default 10 ms, every pass faults them in again
/// and the kernel zeroes them (measured: 13% of a grouped training run in `clear_page`,
/// 144 -> 159 tokens/s when kept). The peak resident size is what a pass needs anyway.
pub fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain integer option; mimalloc reads it at each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// A stage binary: `stage_main!("about", [extra argument groups], |ctx, cli| call)` declares
/// the arguments (`StageArgs` plus each group, flattened) and a `main` that sets up the
/// process, opens the [`selfedit::experiment::cli::StageContext`], takes the run lock of
/// this exact command (see [`lock_run`]) and makes the one call. `stage_main!(unlocked ...)`
/// skips the lock (for `stamp`, whose writes are idempotent and which both of two
/// concurrent `make`s run while reading the Makefile).
#[allow(unused_macros)] // report, summary, collapse and selfedit are not stages
macro_rules! stage_main {
    (unlocked $about:literal, [$($field:ident : $ty:ty),* $(,)?], |$ctx:ident, $cli:ident| $body:expr) => {
        common::stage_main!(@main false, $about, [$($field: $ty),*], |$ctx, $cli| $body);
    };
    ($about:literal, [$($field:ident : $ty:ty),* $(,)?], |$ctx:ident, $cli:ident| $body:expr) => {
        common::stage_main!(@main true, $about, [$($field: $ty),*], |$ctx, $cli| $body);
    };
    (@main $lock:expr, $about:literal, [$($field:ident : $ty:ty),*], |$ctx:ident, $cli:ident| $body:expr) => {
        #[derive(clap::Parser)]
        #[command(about = $about)]
        struct Cli {
            #[command(flatten)]
            stage: selfedit::experiment::cli::StageArgs,
            $(
                #[command(flatten)]
                $field: $ty,
            )*
        }

        fn main() -> anyhow::Result<()> {
            common::init();
            let $cli = <Cli as clap::Parser>::parse();
            let $ctx = selfedit::experiment::cli::StageContext::open(&$cli.stage)?;
            let _run_lock = if $lock { Some(common::lock_run(&$ctx.layout)?) } else { None };
            $body
        }
    };
}
/// Takes the lock of this command line (binary and arguments) in the experiment's `locks/`:
/// a second process started with the same command (a second `make` reaching the same stage,
/// iteration, split and shard) is refused with the first one's pid while the first runs.
#[allow(dead_code)] // report, summary, collapse and selfedit are not stages
pub fn lock_run(layout: &selfedit::experiment::layout::Layout) -> anyhow::Result<selfedit::util::lock::RunLock> {
    let args: Vec<String> = std::env::args().collect();
    let bin = std::path::Path::new(&args[0]).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let command = format!("{bin} {}", args[1..].join(" "));
    let name = format!("{bin}-{}", selfedit::util::hash::content_hash(&args[1..].to_vec()));
    selfedit::util::lock::RunLock::acquire(&layout.lock(&name), &command)
}
#[allow(unused_imports)]
pub(crate) use stage_main;

//! selfedit: search over self-edit strategies for LLM adaptation (arXiv 2601.14532) on
//! SEAL's single-passage knowledge-incorporation setting.
//!
//! The library does all the work; the binaries in `stages/` parse arguments and call it.
//! Four layers, each using only those before it:
//!
//! - [`util`]: crash-safe writes ([`util::atomic`]) and stable hashes ([`util::hash`]);
//! - [`runtime`]: the model runtime, which knows nothing of SEAL: the decoder
//!   ([`runtime::model`]), its differentiable ops ([`runtime::ops`], [`runtime::blas`]),
//!   LoRA and its trainer ([`runtime::lora`], [`runtime::training`]), the tokenizer and
//!   chat template ([`runtime::tokenizer`]), generation ([`runtime::generate`]), model
//!   files ([`runtime::formats`], [`runtime::device`]) and the sentence embedder
//!   ([`runtime::embedder`]);
//! - [`experiment`]: the SEAL experiment: config, prompts, data, the template's
//!   hyperparameters, states, grading, statistics, the Parquet tables, the output layout and
//!   the [`experiment::layout::Stage`]s, one file each under [`experiment::stages`];
//! - [`analysis`]: collapse, summaries and the report, read from the tables.
//!
//! `ARCHITECTURE.md` draws the data flow from config to report.

pub mod analysis;
pub mod experiment;
pub mod runtime;
pub mod util;

// candle allocates a fresh buffer for every tensor op; glibc's malloc returns large buffers
// to the kernel on free and faults them in again on the next allocation, which cost a third
// of the CPU time in training. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

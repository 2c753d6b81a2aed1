//! selfedit: search over self-edit strategies for LLM adaptation (arXiv 2601.14532) on
//! SEAL's single-passage knowledge-incorporation setting.
//!
//! The library does all the work; the binaries in `stages/` parse arguments and call it.
//!
//! Model runtime:
//! - [`model`]: the Llama/Qwen2/Qwen3 decoder, KV cache passed explicitly;
//! - [`ops`]: its differentiable ops with hand-written backward passes;
//! - [`checkpoint`], [`gguf`]: loading GGUF files and Hugging Face folders;
//! - [`tokenizer`]: tokenizers + the model's Jinja chat template;
//! - [`sampling`], [`generation`], [`constrained`]: vLLM-style sampling, batched
//!   generation, JSON-schema-constrained decoding with llguidance;
//! - [`lora`], [`training`]: LoRA adapters (PEFT format) and their trainer.
//!
//! The experiment:
//! - [`config`]: one TOML config per experiment; [`prompts`]: the prompt files;
//! - [`data`]: SQuAD in its three shapes, passage selection; [`tables`]: the Parquet tables;
//! - [`pipeline`]: the stages of an iteration; [`grading`], [`stats`]: answers and statistics;
//! - [`stage`]: what the stage binaries share; [`io`]: crash-safe writes.

pub mod blas;
pub mod checkpoint;
pub mod collapse;
pub mod config;
pub mod constrained;
pub mod data;
pub mod generation;
pub mod gguf;
pub mod grading;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod prompts;
pub mod report;
pub mod sampling;
pub mod stage;
pub mod stats;
pub mod summary;
pub mod tables;
pub mod tokenizer;
pub mod training;

pub use checkpoint::{load, LoadedModel};

// candle allocates a fresh buffer for every tensor op; glibc's malloc returns large buffers
// to the kernel on free and faults them in again on the next allocation, which cost a third
// of the CPU time in training. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

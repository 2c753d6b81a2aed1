//! The model runtime: everything that knows nothing of SEAL, configs or tables.
//!
//! - [`model`]: the Llama/Qwen2/Qwen3 decoder (config, weight names, KV cache, forward);
//! - [`ops`], [`blas`]: its differentiable ops with hand-written backward passes, and the
//!   OpenBLAS path for frozen-weight matmuls; [`sgemm`]: the f32 kernel for the frozen
//!   projections on AVX-512; [`amx`]: the bf16 path on Intel AMX tiles;
//! - [`lora`], [`training`]: LoRA adapters (PEFT format) and their trainer;
//! - [`tokenizer`]: tokenizers + the model's Jinja chat template;
//! - [`generate`]: vLLM-style sampling, batched generation, JSON-constrained decoding;
//! - [`formats`]: GGUF files, Hugging Face folders, safetensors writing; [`device`];
//! - [`embedder`]: a BERT sentence embedder (all-MiniLM-L6-v2) for the collapse analysis.

pub mod amx;
pub mod blas;
pub mod device;
pub mod embedder;
pub mod formats;
pub mod generate;
pub mod lora;
pub mod model;
pub mod multi_lora;
pub mod ops;
pub mod parallel;
pub mod sgemm;
pub mod tokenizer;
pub mod training;

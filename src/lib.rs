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

pub mod checkpoint;
pub mod constrained;
pub mod generation;
pub mod gguf;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod sampling;
pub mod tokenizer;
pub mod training;

pub use checkpoint::{load, LoadedModel};

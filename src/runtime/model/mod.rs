//! The Llama-family decoder (Llama / SmolLM2, Qwen2, Qwen3): its config, the names and
//! shapes of its weights, the batch and KV cache a forward pass takes, and the forward pass.
//!
//! The model knows adapters only through the [`Adapter`] trait it defines: LoRA
//! ([`crate::runtime::lora`]) implements it, the decoder never names LoRA.

mod cache;
mod config;
mod decoder;
mod layer_grad;
mod weights;

pub use cache::{causal_mask, Batch, KvCache};
pub use config::{ModelConfig, RopeScaling};
pub use decoder::{loss_positions, low_rank_update, Adapter, Decoder, FedPositions, Frozen};
#[cfg(test)]
pub(crate) use layer_grad::layers_as_nodes;
pub use layer_grad::{backward, Attention, DecoderLayer, Linear, LowRank, Mlp};
pub use weights::{global_tensors, layer_tensors, random_weights, Proj, TensorKind, ROPE_FREQS};

//! Generation: vLLM-style sampling ([`sampling`]), JSON-schema constraints with llguidance
//! ([`constraint`]), and batched autoregressive decoding with a KV cache ([`batch`]).

pub mod batch;
pub mod constraint;
pub mod sampling;
pub mod thinking;

pub use batch::{generate, generate_batch, FinishReason, GenerationOutput, GenerationRequest};
pub use constraint::{ConstraintFactory, JsonConstraint};
pub use sampling::{argmax, Sampler, SamplingParams};
pub use thinking::{generate_with_thinking, ThinkingOutput, END_OF_THINKING};

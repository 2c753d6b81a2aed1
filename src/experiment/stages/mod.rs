//! The stages of one iteration, one file each, in pipeline order. Each has a `run` that
//! reads its input tables, computes, and writes its output table (what its binary calls),
//! and the pure functions it is made of, which the tests call on hand-made rows.
//!
//! Ids are built from indices, never from model output (`iter0-t03`, `a017-t03-c1`), and no
//! path is built from model text. Seeds derive from the config's seed and those ids
//! ([`crate::util::hash::derive_seed`]), so the same config gives the same tables.

pub mod archive;
pub mod evaluate;
pub mod generator;
pub mod prepare;
pub mod score;
pub mod sft;
pub mod synthesize;
pub mod templates;
pub mod train;

use crate::experiment::cli::StageContext;
use crate::runtime::formats::LoadedModel;
use crate::runtime::generate::{generate, generate_with_thinking, GenerationOutput, GenerationRequest};

/// Generates the requests' answers with the base model, in thinking mode when the config
/// says so: each output with its reasoning (`None` without thinking).
pub fn generate_answers(
    ctx: &StageContext,
    model: &LoadedModel,
    requests: Vec<GenerationRequest>,
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<(Option<String>, GenerationOutput)>> {
    let s = &ctx.exp.config.search;
    if s.thinking {
        anyhow::ensure!(model.tokenizer.chat_template.is_some(), "search.thinking needs a chat model with a thinking template");
        let outs = generate_with_thinking(model, &[], requests, s.batch_size, s.thinking_max_tokens, progress)?;
        Ok(outs.into_iter().map(|o| (Some(o.reasoning), o.answer)).collect())
    } else {
        Ok(generate(model, &[], requests, s.batch_size, progress)?.into_iter().map(|o| (None, o)).collect())
    }
}

/// Number of exploit items among `n` for the exploit fraction (the rest explore), as the
/// paper's code counts them: Python's `round` (halves to even), at least 1 when the fraction
/// is positive, at most `n`.
pub fn exploit_count(n: usize, fraction: f64) -> usize {
    let k = ((n as f64) * fraction).round_ties_even() as usize;
    let k = if fraction > 0.0 && k == 0 { 1 } else { k };
    k.min(n)
}

#[cfg(test)]
mod tests {
    use super::exploit_count;

    #[test]
    fn exploit_count_follows_the_papers_rounding() {
        // Python: round(2.5) == 2, round(3.5) == 4, round(0.5) == 0 (then raised to 1)
        assert_eq!(exploit_count(5, 0.5), 2);
        assert_eq!(exploit_count(7, 0.5), 4);
        assert_eq!(exploit_count(1, 0.5), 1);
        assert_eq!(exploit_count(1, 0.1), 1, "a positive fraction samples at least one exploit item");
        assert_eq!(exploit_count(3, 0.0), 0);
        assert_eq!(exploit_count(5, 0.6), 3);
        assert_eq!(exploit_count(2, 1.0), 2);
    }
}

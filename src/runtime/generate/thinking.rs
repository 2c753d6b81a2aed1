//! Generation for thinking models (Qwen3 with `enable_thinking`): each request first writes
//! its reasoning freely, up to the end-of-thinking tag or a token budget, and only then its
//! answer, under the request's own constraint. This is what vLLM does with a reasoning
//! parser and guided decoding: the grammar applies after `</think>`, never to the reasoning.

use super::batch::{generate, GenerationOutput, GenerationRequest};
use crate::runtime::formats::LoadedModel;
use crate::runtime::model::Adapter;

/// The tag that closes a thinking model's reasoning.
pub const END_OF_THINKING: &str = "</think>";

/// A request's reasoning (without its tags) and its answer.
pub struct ThinkingOutput {
    pub reasoning: String,
    pub answer: GenerationOutput,
}

/// Generates reasoning then answer for every request: phase 1 samples freely (no
/// constraint) until `</think>` or `budget` new tokens; a reasoning cut by the budget is
/// closed; phase 2 continues after `</think>\n\n` with the request's constraint, sampling
/// parameters and `max_new_tokens`. Each request keeps its adapter (see [`generate`]).
/// Outputs come back in request order.
pub fn generate_with_thinking(
    model: &LoadedModel,
    adapters: &[&dyn Adapter],
    requests: Vec<GenerationRequest>,
    max_batch: usize,
    budget: usize,
    on_done: impl FnMut(usize),
) -> anyhow::Result<Vec<ThinkingOutput>> {
    // 1. reasoning: the same prompts, unconstrained, stopped at the closing tag
    let mut answers = Vec::with_capacity(requests.len());
    let mut thinking = Vec::with_capacity(requests.len());
    for r in requests {
        let mut t = GenerationRequest::new(r.prompt_ids.clone(), r.params.clone(), r.seed, budget.max(1));
        t.stop = vec![END_OF_THINKING.to_string()];
        t.adapter = r.adapter;
        thinking.push(t);
        answers.push(r);
    }
    let thoughts = generate(model, adapters, thinking, max_batch, |_| {})?;
    // 2. answers: prompt + reasoning + closing tag, then the constrained answer
    let mut reasoning = Vec::with_capacity(answers.len());
    for (r, t) in answers.iter_mut().zip(&thoughts) {
        let mut ids = r.prompt_ids.clone();
        ids.extend(model.tokenizer.encode(&format!("{}{END_OF_THINKING}\n\n", t.text))?);
        r.prompt_ids = ids;
        r.seed ^= 0x0074_6869_6e6b; // the answer's draws differ from the reasoning's
        reasoning.push(t.text.trim().trim_start_matches("<think>").trim().to_string());
    }
    let outs = generate(model, adapters, answers, max_batch, on_done)?;
    Ok(reasoning.into_iter().zip(outs).map(|(reasoning, answer)| ThinkingOutput { reasoning, answer }).collect())
}

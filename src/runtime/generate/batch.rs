//! Batched autoregressive generation with a KV cache, vLLM-style sampling, stop strings and
//! optional JSON-schema constraints.
//!
//! Prompts of a batch are left-padded to one length; each row keeps its own positions
//! (starting at 0 after its padding) and the mask hides the padding, so a row's output does
//! not depend on its neighbours. Batching is the main speed lever on a CPU: a 16-row matmul
//! costs little more than a 1-row one.

use anyhow::Context;
use candle_core::Tensor;

use super::constraint::JsonConstraint;
use super::sampling::{Sampler, SamplingParams};
use crate::runtime::formats::LoadedModel;
use crate::runtime::model::{causal_mask, Adapter, Batch, Frozen, KvCache};
use crate::runtime::multi_lora::{SegmentAxis, SegmentedAdapters};

pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Generation ends when the text contains one of these (the stop string is cut off).
    pub stop: Vec<String>,
    pub constraint: Option<JsonConstraint>,
    /// The adapter this request runs with: an index into the `adapters` given to
    /// [`generate`], or `None` for the base model.
    pub adapter: Option<usize>,
}

impl GenerationRequest {
    pub fn new(prompt_ids: Vec<u32>, params: SamplingParams, seed: u64, max_new_tokens: usize) -> Self {
        Self { prompt_ids, params, seed, max_new_tokens, stop: Vec::new(), constraint: None, adapter: None }
    }
    /// The same request, run with adapter `index` of those given to [`generate`].
    pub fn with_adapter(mut self, index: usize) -> Self {
        self.adapter = Some(index);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, or the grammar completed.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

struct Row {
    sampler: Sampler,
    generated: Vec<u32>,
    done: Option<FinishReason>,
    text: String,
}

/// Generates for every request, `max_batch` rows at a time (rows sorted by prompt length so
/// a batch pads little). Outputs come back in request order.
///
/// Each request runs with its own adapter (`request.adapter`, an index into `adapters`) or
/// the base model, and one batch mixes them freely: the frozen weights run once for all
/// rows, each run of rows sharing an adapter gets that adapter's update (see
/// [`SegmentedAdapters`]). A row's frozen products do not depend on the other rows of its
/// batch; its low-rank products run at its adapter segment's height (see [`generate_batch`]).
///
/// Errors: what [`generate_batch`] refuses.
pub fn generate(
    model: &LoadedModel,
    adapters: &[&dyn Adapter],
    requests: Vec<GenerationRequest>,
    max_batch: usize,
    mut on_done: impl FnMut(usize),
) -> anyhow::Result<Vec<GenerationOutput>> {
    let n = requests.len();
    check_adapters(adapters, &requests)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| requests[i].prompt_ids.len());
    let mut slots: Vec<Option<GenerationRequest>> = requests.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<GenerationOutput>> = vec![None; n];
    for chunk in order.chunks(max_batch.max(1)) {
        // rows of one adapter side by side: one low-rank product per adapter
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| slots[i].as_ref().map(|r| r.adapter));
        let batch: Vec<GenerationRequest> = chunk.iter().map(|&i| slots[i].take().unwrap()).collect();
        let outs = generate_batch(model, adapters, batch)?;
        for (&i, o) in chunk.iter().zip(outs) {
            outputs[i] = Some(o);
            on_done(1);
        }
    }
    Ok(outputs.into_iter().map(|o| o.unwrap()).collect())
}

fn check_adapters(adapters: &[&dyn Adapter], requests: &[GenerationRequest]) -> anyhow::Result<()> {
    for (i, r) in requests.iter().enumerate() {
        if let Some(a) = r.adapter {
            anyhow::ensure!(a < adapters.len(), "request {i}: adapter {a}, but {} adapters were given", adapters.len());
        }
    }
    Ok(())
}

/// Last-position logits `[rows, vocab]` of `batch`, each row with its adapter in `of_row`
/// (indices into `adapters`, `None`: the base model): one adapter's own update when every
/// row has the same, else one segment per run of rows sharing an adapter. Detached (see
/// [`Frozen`]): generation never needs gradients.
fn forward_rows(
    model: &LoadedModel,
    batch: &Batch,
    cache: &mut KvCache,
    adapters: &[&dyn Adapter],
    of_row: impl Iterator<Item = Option<usize>>,
) -> candle_core::Result<Tensor> {
    let rows: Vec<(usize, Option<&dyn Adapter>)> = of_row.map(|a| (1, a.map(|a| adapters[a]))).collect();
    let segmented = SegmentedAdapters::new(SegmentAxis::Rows, &rows);
    let lora: Option<&dyn Adapter> = match segmented.segments.as_slice() {
        [(_, _, one)] => *one,
        _ => Some(&segmented),
    };
    let frozen = lora.map(Frozen);
    model.decoder.forward_last(batch, Some(cache), frozen.as_ref().map(|f| f as &dyn Adapter))
}

/// Output rows beyond the tokenizer's vocabulary are padding, never sampled.
fn mask_padding(row_logits: &mut [f32], tok_vocab: usize) {
    for x in row_logits.iter_mut().skip(tok_vocab) {
        *x = f32::NEG_INFINITY;
    }
}

/// Rows to draw per thread below which [`draw_unconstrained`] keeps the draws on fewer
/// threads: a draw scans the row's ~49k logits (~50-100 µs), a thread takes ~1 µs (a hot
/// worker) to ~40 µs (a parked one, a scoped thread) to pick its part up (`runtime::parallel`).
const ROWS_PER_DRAW_THREAD: usize = 4;

/// The next token of every live row that is not finished and has no constraint, drawn by
/// its own sampler from its logits (`logits[i]` is row `live[i]`'s) and observed, the rows
/// split between up to `threads` threads ([`crate::runtime::parallel::run_parts`], at least [`ROWS_PER_DRAW_THREAD`] rows
/// each); `None` for the other rows, which the caller draws after applying their
/// constraint. Each row's draw uses only its own logits and sampler, so the tokens do not
/// depend on the split.
///
/// Why: drawn one after another on one thread, the draws of a 64-row batch were ~6% of a
/// decoding step while the second core waited.
fn draw_unconstrained(
    rows: &mut [Row],
    requests: &[GenerationRequest],
    live: &[usize],
    logits: &mut [Vec<f32>],
    tok_vocab: usize,
    threads: usize,
) -> Vec<Option<u32>> {
    let mut drawn = vec![None; live.len()];
    // `live` is in batch order, so each row is taken once
    let mut by_row: Vec<Option<&mut Row>> = rows.iter_mut().map(Some).collect();
    let mut work: Vec<(&mut Vec<f32>, &mut Sampler, &mut Option<u32>)> = Vec::with_capacity(live.len());
    for ((&r, row_logits), slot) in live.iter().zip(logits.iter_mut()).zip(drawn.iter_mut()) {
        let Some(row) = by_row[r].take() else { continue };
        if row.done.is_none() && requests[r].constraint.is_none() {
            work.push((row_logits, &mut row.sampler, slot));
        }
    }
    let draw = |part: &mut [(&mut Vec<f32>, &mut Sampler, &mut Option<u32>)]| {
        for (row_logits, sampler, slot) in part {
            mask_padding(row_logits, tok_vocab);
            let t = sampler.sample(row_logits);
            sampler.observe(t);
            **slot = Some(t);
        }
    };
    let threads = threads.min(work.len() / ROWS_PER_DRAW_THREAD).max(1);
    let per = work.len().div_ceil(threads).max(1);
    crate::runtime::parallel::run_parts(work.chunks_mut(per).collect(), draw);
    drawn
}

/// Drops the finished rows from a decoding batch once a quarter of it has finished: copying
/// the cache costs about one decode step's memory traffic, and each dropped row saves its
/// share of every later step. Geometric, so at most a few copies per batch. Never down to
/// one row: a lone row's OpenBLAS products (the low-rank updates at ranks the f32 kernel does
/// not take; the frozen products too without the f32 kernel) take candle's kernel instead
/// (see `runtime::blas`), whose last bits differ.
fn worth_compacting(finished: usize, rows: usize) -> bool {
    finished > 0 && 4 * finished >= rows && rows - finished >= 2
}

/// Generates for one batch of requests in lockstep, each row with its own adapter
/// (`request.adapter`, an index into `adapters`, or the base model).
///
/// Rows whose prompt and adapter repeat an earlier row's (the runs of one question) are
/// prefilled once and their caches copied; rows that finish leave the batch (see
/// [`worth_compacting`]). Both keep two rows or more in every product when the batch has
/// them, so the frozen products stay on the f32 kernel or OpenBLAS, whose rows do not depend
/// on the other rows (`runtime::sgemm`, `runtime::blas`); the adapters' own low-rank
/// products run per adapter at the segment's height, as they do when the batch is composed
/// differently.
///
/// Errors: an adapter index beyond `adapters`, an empty prompt, invalid sampling
/// parameters, a prompt that fills the model's context.
pub fn generate_batch(
    model: &LoadedModel,
    adapters: &[&dyn Adapter],
    mut requests: Vec<GenerationRequest>,
) -> anyhow::Result<Vec<GenerationOutput>> {
    let dec = &model.decoder;
    let tok = &model.tokenizer;
    let (device, dtype) = (dec.device().clone(), dec.dtype());
    let b = requests.len();
    if b == 0 {
        return Ok(vec![]);
    }
    check_adapters(adapters, &requests)?;
    for (i, r) in requests.iter().enumerate() {
        anyhow::ensure!(!r.prompt_ids.is_empty(), "request {i}: empty prompt");
        r.params.validate().with_context(|| format!("request {i}: sampling parameters"))?;
    }
    let prompt_len = requests.iter().map(|r| r.prompt_ids.len()).max().unwrap();
    let max_new = requests.iter().map(|r| r.max_new_tokens).max().unwrap();
    let capacity = (prompt_len + max_new).min(dec.cfg.max_position_embeddings);
    anyhow::ensure!(
        prompt_len < capacity,
        "prompt of {prompt_len} tokens leaves no room under the model's context of {}",
        dec.cfg.max_position_embeddings
    );
    let pad_id = *tok.stop_ids.first().unwrap_or(&0);
    let left_pad: Vec<usize> = requests.iter().map(|r| prompt_len - r.prompt_ids.len()).collect();
    let tok_vocab = tok.vocab_size();

    // 1. the distinct (adapter, prompt) rows, and which of them each row repeats
    let (distinct, source) = {
        let mut first: std::collections::HashMap<(Option<usize>, &[u32]), u32> = std::collections::HashMap::new();
        let mut distinct: Vec<usize> = Vec::new();
        let source: Vec<u32> = requests
            .iter()
            .enumerate()
            .map(|(r, req)| {
                *first.entry((req.adapter, req.prompt_ids.as_slice())).or_insert_with(|| {
                    distinct.push(r);
                    distinct.len() as u32 - 1
                })
            })
            .collect();
        // one distinct row of several: prefilled as they are (a lone row would take
        // another kernel, see `worth_compacting`)
        if distinct.len() == 1 && b > 1 {
            ((0..b).collect(), (0..b as u32).collect())
        } else {
            (distinct, source)
        }
    };

    // 2. prefill of the distinct rows: left-padded prompts, each row's positions starting
    //    at 0 after its padding
    let u = distinct.len();
    let mut ids = Vec::with_capacity(u * prompt_len);
    let mut pos = Vec::with_capacity(u * prompt_len);
    for &r in &distinct {
        for i in 0..prompt_len {
            if i < left_pad[r] {
                ids.push(pad_id);
                pos.push(0u32);
            } else {
                ids.push(requests[r].prompt_ids[i - left_pad[r]]);
                pos.push((i - left_pad[r]) as u32);
            }
        }
    }
    let distinct_pad: Vec<usize> = distinct.iter().map(|&r| left_pad[r]).collect();
    let mut cache = KvCache::new(&dec.cfg, u, capacity, dtype, &device)?;
    let batch = Batch {
        ids: Tensor::from_vec(ids, (u, prompt_len), &device)?,
        positions: Tensor::from_vec(pos, (u, prompt_len), &device)?,
        mask: Some(causal_mask(u, prompt_len, 0, &distinct_pad, &device, dtype)?),
        segments: None,
    };
    let mut logits = forward_rows(model, &batch, &mut cache, adapters, distinct.iter().map(|&r| requests[r].adapter))?;
    if u < b {
        let index = Tensor::new(source.as_slice(), &device)?;
        logits = logits.index_select(&index, 0)?;
        cache = cache.select_rows(&source)?;
    }

    // 3. decoding: `live` are the rows still in the batch, in batch order
    let mut rows: Vec<Row> = requests
        .iter()
        .map(|r| Row { sampler: Sampler::new(r.params.clone(), r.seed), generated: vec![], done: None, text: String::new() })
        .collect();
    let mut live: Vec<usize> = (0..b).collect();
    for step in 0..max_new {
        let mut l: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = vec![pad_id; live.len()];
        // the draws of the rows without a constraint, split between the cores
        let drawn = draw_unconstrained(&mut rows, &requests, &live, &mut l, tok_vocab, crate::runtime::blas::threads());
        for (i, &r) in live.iter().enumerate() {
            if rows[r].done.is_some() {
                continue;
            }
            let t = match drawn[i] {
                Some(t) => t,
                None => {
                    let row_logits = &mut l[i];
                    mask_padding(row_logits, tok_vocab);
                    if let Some(c) = requests[r].constraint.as_mut() {
                        c.mask_logits(row_logits)?;
                    }
                    let t = rows[r].sampler.sample(row_logits);
                    rows[r].sampler.observe(t);
                    t
                }
            };
            next[i] = t;
            let req = &mut requests[r];
            let row = &mut rows[r];
            let is_stop_token = tok.stop_ids.contains(&t);
            if let Some(c) = req.constraint.as_mut() {
                if !is_stop_token {
                    c.consume(t)?;
                }
            }
            if is_stop_token {
                row.done = Some(FinishReason::Eos);
                continue;
            }
            row.generated.push(t);
            if req.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
                row.done = Some(FinishReason::Eos);
            } else if !req.stop.is_empty() {
                let text = tok.decode(&row.generated, true)?;
                if let Some(cut) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    row.text = text[..cut].to_string();
                    row.done = Some(FinishReason::Stop);
                }
            }
            if row.done.is_none() && row.generated.len() >= req.max_new_tokens {
                row.done = Some(FinishReason::Length);
            }
        }
        if live.iter().all(|&r| rows[r].done.is_some()) || step + 1 == max_new || prompt_len + step + 1 >= capacity {
            break;
        }
        let finished = live.iter().filter(|&&r| rows[r].done.is_some()).count();
        if worth_compacting(finished, live.len()) {
            let keep: Vec<u32> = (0..live.len() as u32).filter(|&i| rows[live[i as usize]].done.is_none()).collect();
            cache = cache.select_rows(&keep)?;
            next = keep.iter().map(|&i| next[i as usize]).collect();
            live = keep.iter().map(|&i| live[i as usize]).collect();
        }
        // Decode step: one new token per row at its next position.
        let cached = cache.len();
        let n = live.len();
        let pads: Vec<usize> = live.iter().map(|&r| left_pad[r]).collect();
        let positions: Vec<u32> = pads.iter().map(|&p| (cached - p) as u32).collect();
        let batch = Batch {
            ids: Tensor::from_vec(next, (n, 1), &device)?,
            positions: Tensor::from_vec(positions, (n, 1), &device)?,
            mask: Some(causal_mask(n, 1, cached, &pads, &device, dtype)?),
            segments: None,
        };
        logits = forward_rows(model, &batch, &mut cache, adapters, live.iter().map(|&r| requests[r].adapter))?;
    }
    let mut out = Vec::with_capacity(b);
    for row in rows {
        let finish = row.done.unwrap_or(FinishReason::Length);
        let text = if finish == FinishReason::Stop { row.text } else { tok.decode(&row.generated, true)? };
        out.push(GenerationOutput { token_ids: row.generated, text, finish_reason: finish });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split draws against each row's own sampler run alone: the same tokens, in the
    /// rows' places, for the live rows that are not finished; nothing for the others. 40 live
    /// rows of 48 on 1, 2 and 3 threads; the logits' last 5 columns are padding beyond the
    /// tokenizer's vocabulary.
    #[test]
    fn split_draws_equal_each_row_drawn_alone() {
        let (vocab, tok_vocab) = (300, 295);
        let params = SamplingParams::paper_eval();
        let requests: Vec<GenerationRequest> =
            (0..48).map(|r| GenerationRequest::new(vec![1], params.clone(), 1000 + r as u64, 8)).collect();
        let new_rows = || -> Vec<Row> {
            requests
                .iter()
                .map(|r| Row { sampler: Sampler::new(r.params.clone(), r.seed), generated: vec![], done: None, text: String::new() })
                .collect()
        };
        for threads in [1, 2, 3] {
            let mut rows = new_rows();
            rows[6].done = Some(FinishReason::Eos);
            let live: Vec<usize> = (0..48).filter(|r| r % 6 != 1).collect();
            // logits whose largest values sit on the padding, so a draw that skipped its mask shows
            let logits: Vec<Vec<f32>> = live
                .iter()
                .map(|&r| (0..vocab).map(|t| if t >= tok_vocab { 50.0 } else { ((t * 7 + r * 13) % 31) as f32 / 4.0 }).collect())
                .collect();
            let mut split = logits.clone();
            // two steps, so each sampler's state (its draws so far, its RNG) carries over
            let mut reference = new_rows();
            for _ in 0..2 {
                let drawn = draw_unconstrained(&mut rows, &requests, &live, &mut split, tok_vocab, threads);
                for (i, &r) in live.iter().enumerate() {
                    if r == 6 {
                        assert_eq!(drawn[i], None, "a finished row is not drawn");
                        continue;
                    }
                    let mut row_logits = logits[i].clone();
                    mask_padding(&mut row_logits, tok_vocab);
                    let t = reference[r].sampler.sample(&mut row_logits);
                    reference[r].sampler.observe(t);
                    assert_eq!(drawn[i], Some(t), "row {r}, {threads} threads");
                    assert!((t as usize) < tok_vocab, "row {r} drew padding");
                }
                split = logits.clone();
            }
        }
    }
}

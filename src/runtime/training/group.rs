//! Many adapters trained at once over one frozen base: at each pass every adapter in flight
//! contributes its next sequence (batch size 1, as alone), the sequences are packed into one
//! row for the frozen matmuls and the LM head, each gets its own adapter's low-rank update,
//! and one backward pass yields every adapter's gradient. Each adapter keeps its own
//! schedule, windows, clipping, AdamW state, shuffle and dropout seed ([`AdapterRun`]), so it
//! ends exactly where it would have alone. An adapter that finishes leaves at once and the
//! next job takes its slot (continuous batching), so short and long runs mix.
//!
//! Why it pays: one sequence of ~40 tokens is a 40-row matmul, which runs at a third of the
//! CPU's matmul speed; sixteen of them packed are a 640-row matmul, which runs near it.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{AdapterRun, TrainConfig, TrainExample, TrainReport};
use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::{Adapter, Decoder};
use crate::runtime::multi_lora::{SegmentAxis, SegmentedAdapters};

/// One adapter to train: a fresh (or loaded) adapter, its sequences and its settings.
/// `key` comes back with the result.
pub struct TrainJob<K> {
    pub key: K,
    pub adapter: LoraAdapter,
    pub examples: Vec<TrainExample>,
    pub config: TrainConfig,
}

/// What a group run did.
#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    /// Packed forward + backward passes.
    pub passes: usize,
    /// Tokens fed forward, all adapters together.
    pub tokens: usize,
    pub seconds: f64,
    /// The most adapters in flight at once.
    pub max_in_flight: usize,
}

/// Trains every job, up to `adapters_per_batch` at a time, calling `on_done(key, result)` the
/// moment an adapter finishes (so a caller can write it then: a kill loses only the adapters
/// in flight). A job that cannot start (no usable sequence) or a pass that fails reports its
/// adapters' errors through `on_done`; an error returned by `on_done` stops the run.
pub fn train_group<K>(
    decoder: &Decoder,
    jobs: impl IntoIterator<Item = TrainJob<K>>,
    adapters_per_batch: usize,
    mut on_done: impl FnMut(K, anyhow::Result<(LoraAdapter, TrainReport)>) -> anyhow::Result<()>,
) -> anyhow::Result<GroupReport> {
    let started = Instant::now();
    let mut jobs = jobs.into_iter();
    let mut active: Vec<(K, AdapterRun<LoraAdapter>)> = Vec::new();
    let mut report = GroupReport::default();
    loop {
        // 1. continuous batching: free slots take the next jobs
        while active.len() < adapters_per_batch.max(1) {
            let Some(job) = jobs.next() else { break };
            match AdapterRun::new(job.adapter, &job.examples, &job.config) {
                Ok(run) => active.push((job.key, run)),
                Err(e) => on_done(job.key, Err(e))?,
            }
        }
        if active.is_empty() {
            break;
        }
        report.max_in_flight = report.max_in_flight.max(active.len());
        // 2. each adapter's next sequence and its loss weight
        let mut micro = Vec::with_capacity(active.len());
        for (_, run) in active.iter_mut() {
            micro.push(run.next_micro_batch().expect("a run in flight has steps left"));
        }
        match group_pass(decoder, &active, &micro) {
            Ok((losses, grads)) => {
                for (((_, run), &(i, weight)), (loss, grads)) in active.iter_mut().zip(&micro).zip(losses.into_iter().zip(grads)) {
                    report.tokens += run.example(i).ids.len();
                    run.add_gradients(loss, weight, grads)?;
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                for (key, _) in active.drain(..) {
                    on_done(key, Err(anyhow::anyhow!("training pass of a group failed: {message}")))?;
                }
                continue;
            }
        }
        report.passes += 1;
        // 5. finished adapters leave the group
        let mut k = 0;
        while k < active.len() {
            if active[k].1.step() == active[k].1.total_steps() {
                let (key, run) = active.remove(k);
                on_done(key, Ok(run.finish(false)))?;
            } else {
                k += 1;
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One packed forward and backward pass: each sequence's mean loss, and the gradient of its
/// weighted loss with respect to its own adapter's variables.
type PassOutput = (Vec<f64>, Vec<Vec<Option<Tensor>>>);

fn group_pass<K>(decoder: &Decoder, active: &[(K, AdapterRun<LoraAdapter>)], micro: &[(usize, f64)]) -> anyhow::Result<PassOutput> {
    // 3. one forward pass over the packed sequences [1, Σ len]: frozen weights once, each
    //    sequence's low-rank update from its own adapter
    let seqs: Vec<(&[u32], usize)> = active
        .iter()
        .zip(micro)
        .map(|((_, run), &(i, _))| {
            let e = run.example(i);
            (e.ids.as_slice(), e.loss_from)
        })
        .collect();
    let items: Vec<(usize, Option<&dyn Adapter>)> =
        seqs.iter().zip(active).map(|(s, (_, run))| (s.0.len(), Some(run.adapter() as &dyn Adapter))).collect();
    let adapters = SegmentedAdapters::new(SegmentAxis::Tokens, &items);
    let losses = decoder.packed_losses(&seqs, Some(&adapters))?; // [K]
                                                                 // 4. one backward pass: the adapters share no variable, so the gradient of
                                                                 //    Σ_k weight_k · loss_k with respect to adapter k is that of its own term
    let weights: Vec<f32> = micro.iter().map(|&(_, w)| w as f32).collect();
    let weights = Tensor::from_vec(weights, micro.len(), decoder.device())?.to_dtype(losses.dtype())?;
    let g = (&losses * &weights)?.sum_all()?.backward()?;
    let values: Vec<f64> = losses.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let grads = active.iter().map(|(_, run)| run.adapter().vars().iter().map(|v| g.get(v.as_tensor()).cloned()).collect()).collect();
    Ok((values, grads))
}

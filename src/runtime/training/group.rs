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

use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{memory_estimate, AdapterRun, TrainConfig, TrainExample, TrainReport};
use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::{backward, Adapter, Decoder, FedPositions};
use crate::runtime::multi_lora::{SegmentAxis, SegmentedAdapters};
use crate::runtime::ops;

/// One adapter to train: a fresh (or loaded) adapter, its sequences and its settings.
/// `key` comes back with the result.
pub struct TrainJob<K> {
    pub key: K,
    pub adapter: LoraAdapter,
    pub examples: Vec<TrainExample>,
    pub config: TrainConfig,
}

impl<K> TrainJob<K> {
    /// The passes this job takes in a group ([`planned_passes`] of its sequences).
    pub fn passes(&self) -> usize {
        planned_passes(self.config.epochs, self.examples.len())
    }
}

/// The passes an adapter of `sequences` training sequences takes in a group over `epochs`
/// epochs: one sequence a pass (batch size 1), every sequence every epoch, whatever the
/// accumulation window. (Sequences left without a target when it starts, under two tokens or
/// with `loss_from` past their `max_len` cut, are skipped, so this can overcount.)
///
/// Why a caller wants it: [`train_group`] takes its jobs in the order given, and handing them
/// over most passes first (longest processing time first) keeps the drain at the end of a
/// run short. The bench's 64 self-edits of 2 epochs in groups of 16 ran 90 passes in the
/// order built and 80 sorted, where 79.75 would have every slot taken; with hundreds of jobs
/// the drain is small either way.
pub fn planned_passes(epochs: usize, sequences: usize) -> usize {
    epochs * sequences
}

/// Sorts `jobs` (anything a job is built from) most `passes` first, ties in their order: the
/// order to hand them to [`train_group`] in (see [`planned_passes`]).
pub fn longest_first<T>(jobs: &mut [T], passes: impl Fn(&T) -> usize) {
    jobs.sort_by_key(|j| std::cmp::Reverse(passes(j)));
}

/// How large a group may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Adapters in flight at most (`training.adapters_per_batch`).
    pub adapters: usize,
    /// Estimated bytes of the adapters in flight at most ([`memory_estimate`]),
    /// or no limit. A job that does not fit waits for adapters to finish; one job always
    /// runs, even alone over the limit.
    pub memory_bytes: Option<u64>,
}

impl GroupLimits {
    pub fn adapters(adapters: usize) -> Self {
        Self { adapters, memory_bytes: None }
    }
}

/// What a group run did.
#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    /// Packed forward + backward passes.
    pub passes: usize,
    /// Tokens of the sequences trained on, all adapters together (see [`super::TrainReport::tokens`]).
    pub tokens: usize,
    /// Sequences trained on, all adapters together; the passes ran `tokens - sequences`
    /// positions, give or take the few sequences that keep all theirs (`model::loss_positions`).
    pub sequences: usize,
    pub seconds: f64,
    /// The most adapters in flight at once.
    pub max_in_flight: usize,
    /// The largest estimated memory of the adapters in flight, bytes.
    pub max_memory_estimate: u64,
    /// Where the passes' time went.
    pub times: PassTimes,
    /// The passes that ran with the group as large as its limits allow.
    pub full: FullPasses,
}

/// The iterations of a group run whose pass had the group as large as its [`GroupLimits`]
/// allow (every slot taken, or the next job waiting for memory): the steady state, in which
/// all but the last adapters of a long run (the paper's 950 self-edits an iteration) train.
/// What is left is the drain: once the jobs run out, the passes shrink as the last adapters
/// finish one by one, which in a short run is much of its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullPasses {
    pub passes: usize,
    /// Tokens and sequences of their passes, as [`GroupReport::tokens`] and
    /// [`GroupReport::sequences`].
    pub tokens: usize,
    pub sequences: usize,
    /// Seconds of these iterations of the loop, whole: starting the jobs that took free
    /// slots, the pass, the optimizer steps, and finishing adapters (the caller's `on_done`
    /// included).
    pub seconds: f64,
}

/// Seconds a group run spent in each phase of its passes, summed over them; what `seconds`
/// holds beyond their sum is bookkeeping and the callers' `on_done`. On an asynchronous
/// device (CUDA) a phase's kernels may still run in the next phase's time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassTimes {
    /// Packed forward passes: frozen model, low-rank updates, LM head and loss.
    pub forward: f64,
    /// Backward passes: every adapter's gradient.
    pub backward: f64,
    /// Gradient accumulation, clipping and AdamW steps ([`AdapterRun::add_gradients`]).
    pub optimizer: f64,
}

/// Trains every job, in the order given (see [`planned_passes`]), as many at a time as
/// `limits` allow, calling `on_done(key, result)` the moment an adapter finishes (so a caller
/// can write it then: a kill loses only the adapters in flight). A job that cannot start (no
/// usable sequence) or a pass that fails reports its adapters' errors through `on_done`; an
/// error returned by `on_done` stops the run.
pub fn train_group<K>(
    decoder: &Decoder,
    jobs: impl IntoIterator<Item = TrainJob<K>>,
    limits: GroupLimits,
    mut on_done: impl FnMut(K, anyhow::Result<(LoraAdapter, TrainReport)>) -> anyhow::Result<()>,
) -> anyhow::Result<GroupReport> {
    let started = Instant::now();
    let mut jobs = jobs.into_iter();
    let mut active: Vec<(K, AdapterRun<LoraAdapter>, u64)> = Vec::new();
    // the next job and its estimate, waiting for memory to free up (nothing of it allocated
    // beyond what the caller built)
    let mut waiting: Option<(TrainJob<K>, u64)> = None;
    let mut report = GroupReport::default();
    loop {
        let iteration = Instant::now();
        // 1. continuous batching: free slots take the next jobs, while the memory allows
        while active.len() < limits.adapters.max(1) {
            let (job, bytes) = match waiting.take() {
                Some(w) => w,
                None => {
                    let Some(job) = jobs.next() else { break };
                    let bytes = memory_estimate(decoder, &job.adapter, &job.examples, &job.config);
                    (job, bytes)
                }
            };
            let in_use: u64 = active.iter().map(|a| a.2).sum();
            if limits.memory_bytes.is_some_and(|max| !active.is_empty() && in_use + bytes > max) {
                waiting = Some((job, bytes));
                break;
            }
            match AdapterRun::new(job.adapter, &job.examples, &job.config) {
                Ok(run) => active.push((job.key, run, bytes)),
                Err(e) => on_done(job.key, Err(e))?,
            }
        }
        if active.is_empty() {
            break;
        }
        // the group as large as its limits allow: every slot taken, or a job waiting for memory
        let full = active.len() == limits.adapters.max(1) || waiting.is_some();
        let (tokens_before, sequences_before) = (report.tokens, report.sequences);
        report.max_in_flight = report.max_in_flight.max(active.len());
        report.max_memory_estimate = report.max_memory_estimate.max(active.iter().map(|a| a.2).sum());
        // 2. each adapter's next sequence and its loss weight
        let mut micro = Vec::with_capacity(active.len());
        for (_, run, _) in active.iter_mut() {
            micro.push(run.next_micro_batch().expect("a run in flight has steps left"));
        }
        match group_pass(decoder, &active, &micro, &mut report.times) {
            Ok((losses, grads)) => {
                let t = Instant::now();
                for ((_, run, _), &(i, _)) in active.iter().zip(&micro) {
                    report.tokens += run.example(i).ids.len();
                    report.sequences += 1;
                }
                step_all(&mut active, &micro, losses, grads)?;
                report.times.optimizer += t.elapsed().as_secs_f64();
            }
            Err(e) => {
                let message = format!("{e:#}");
                for (key, _, _) in active.drain(..) {
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
                let (key, run, _) = active.remove(k);
                on_done(key, Ok(run.finish(false)))?;
            } else {
                k += 1;
            }
        }
        if full {
            report.full.passes += 1;
            report.full.tokens += report.tokens - tokens_before;
            report.full.sequences += report.sequences - sequences_before;
            report.full.seconds += iteration.elapsed().as_secs_f64();
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Every adapter's [`AdapterRun::add_gradients`] for its sequence of the pass (`loss`, its
/// `micro` weight, `grads`), the adapters cut into runs of about equal parameters, one run
/// per core ([`ops::par_segments`]; any two adapters are enough to split).
///
/// Why: after the backward pass the second core was idle while the adapters accumulated,
/// clipped and stepped one after another (4.4% of the main thread's samples in grouped f32
/// training). Each adapter touches only its own state, and its arithmetic is the same code
/// on whichever thread runs it, so the split changes no number. (Balanced by parameters, not
/// by work: an adapter that closes its accumulation window also clips and steps, one that
/// opens it only adds; with the paper's one-sequence windows every adapter steps.)
///
/// Errors: the first adapter's, in order (the others are stepped all the same; the group
/// fails with that error); losses or gradients not one per adapter.
fn step_all<K>(
    active: &mut [(K, AdapterRun<LoraAdapter>, u64)],
    micro: &[(usize, f64)],
    losses: Vec<f64>,
    grads: Vec<Vec<Option<Tensor>>>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        [micro.len(), losses.len(), grads.len()] == [active.len(); 3],
        "a pass of {} adapters returned {} losses and {} gradients for {} sequences",
        active.len(),
        losses.len(),
        grads.len(),
        micro.len()
    );
    let sizes: Vec<usize> = grads.iter().map(|g| g.iter().flatten().map(Tensor::elem_count).sum::<usize>().max(1)).collect();
    // one lock per adapter, each taken once, by the one thread that steps it
    let work: Vec<Mutex<_>> = active
        .iter_mut()
        .zip(micro)
        .zip(losses.into_iter().zip(grads))
        .map(|(((_, run, _), &(_, weight)), (loss, grads))| Mutex::new(Some((run, weight, loss, grads))))
        .collect();
    let stepped = ops::par_segments(&sizes, |k| {
        let taken = work[k].lock().map_err(|_| candle_core::Error::Msg("step_all: lock poisoned".into()))?.take();
        let (run, weight, loss, grads) = taken.expect("each adapter is stepped once");
        Ok(run.add_gradients(loss, weight, grads))
    })?;
    stepped.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

/// One packed forward and backward pass: each sequence's mean loss, and the gradient of its
/// weighted loss with respect to its own adapter's variables.
type PassOutput = (Vec<f64>, Vec<Vec<Option<Tensor>>>);

fn group_pass<K>(
    decoder: &Decoder,
    active: &[(K, AdapterRun<LoraAdapter>, u64)],
    micro: &[(usize, f64)],
    times: &mut PassTimes,
) -> anyhow::Result<PassOutput> {
    let t = Instant::now();
    // 3. one forward pass over the packed sequences [1, Σ loss_positions(len)] (the last token of each
    //    has no target): frozen weights once, each sequence's low-rank update from its own
    //    adapter
    let seqs: Vec<(&[u32], usize)> = active
        .iter()
        .zip(micro)
        .map(|((_, run, _), &(i, _))| {
            let e = run.example(i);
            (e.ids.as_slice(), e.loss_from)
        })
        .collect();
    let fed: Vec<FedPositions> = seqs.iter().zip(active).map(|(s, (_, run, _))| FedPositions::new(run.adapter(), s.0.len())).collect();
    let items: Vec<(usize, Option<&dyn Adapter>)> = fed.iter().map(|a| (a.rows(), Some(a as &dyn Adapter))).collect();
    let adapters = SegmentedAdapters::new(SegmentAxis::Tokens, &items);
    let losses = decoder.packed_losses(&seqs, Some(&adapters))?; // [K]
    times.forward += t.elapsed().as_secs_f64();
    // 4. one backward pass: the adapters share no variable, so the gradient of
    //    Σ_k weight_k · loss_k with respect to adapter k is that of its own term
    let t = Instant::now();
    let weights: Vec<f32> = micro.iter().map(|&(_, w)| w as f32).collect();
    let weights = Tensor::from_vec(weights, micro.len(), decoder.device())?.to_dtype(losses.dtype())?;
    let g = backward(&(&losses * &weights)?.sum_all()?)?;
    times.backward += t.elapsed().as_secs_f64();
    let values: Vec<f64> = losses.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let grads = active.iter().map(|(_, run, _)| run.adapter().vars().iter().map(|v| g.get(v.as_tensor()).cloned()).collect()).collect();
    Ok((values, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::lora::LoraConfig;
    use crate::runtime::training::{tiny_decoder, train_lora};
    use candle_core::Device;

    fn tiny() -> Decoder {
        tiny_decoder(0)
    }

    fn job(dec: &Decoder, k: usize) -> TrainJob<usize> {
        let adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(4, 8.0, 0.0), k as u64, &Device::Cpu).unwrap();
        let examples =
            (0..2).map(|j| TrainExample { ids: (0..10).map(|t| ((t * 7 + j + k) % 64) as u32).collect(), loss_from: 0 }).collect();
        TrainJob { key: k, adapter, examples, config: TrainConfig::new(1e-3, 1 + k % 2, 1, k as u64) }
    }

    /// Adapters trained three at a time end where each ends alone: same losses and weights
    /// (to f32 summation order), with sequences of unequal length in windows of 2, so each
    /// sequence's loss carries its own token share.
    #[test]
    fn grouped_adapters_equal_solo_training() {
        let dec = tiny();
        let jobs = || {
            (0..3usize).map(|k| {
                let adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(2 + 2 * k, 8.0, 0.0), k as u64, &Device::Cpu).unwrap();
                let examples = (0..3 + k)
                    .map(|j| TrainExample { ids: (0..4 + 3 * j).map(|t| ((t * 5 + j + k) % 64) as u32).collect(), loss_from: 1 + j % 2 })
                    .collect();
                TrainJob { key: k, adapter, examples, config: TrainConfig::new(3e-3 * (k + 1) as f64, 2, 2, k as u64) }
            })
        };
        let values =
            |a: &LoraAdapter| -> Vec<f32> { a.vars().iter().flat_map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect() };
        let mut grouped = Vec::new();
        train_group(&dec, jobs(), GroupLimits::adapters(3), |k, r| {
            let (a, report) = r?;
            grouped.push((k, values(&a), report.step_losses));
            Ok(())
        })
        .unwrap();
        grouped.sort_by_key(|g| g.0);
        assert_eq!(grouped.len(), 3);
        for (job, (k, weights, losses)) in jobs().zip(grouped) {
            let mut alone = job.adapter;
            let report = train_lora(&dec, &mut alone, &job.examples, &job.config, |_, _, _| {}).unwrap();
            assert_eq!(report.step_losses.len(), losses.len());
            for (a, b) in report.step_losses.iter().zip(&losses) {
                assert!((a - b).abs() < 1e-5, "adapter {k}: loss {a} alone, {b} grouped");
            }
            let d = values(&alone).iter().zip(&weights).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-5, "adapter {k}: weights differ by {d}");
        }
    }

    /// A job takes [`TrainJob::passes`] passes whatever its accumulation window, and jobs
    /// handed over longest first drain sooner: in groups of 2, jobs of 1, 1 and 4 passes take
    /// 5 passes in that order (the 4-pass job alone for 4) and 4 passes longest first.
    #[test]
    fn a_job_takes_its_planned_passes_and_longest_first_drains_sooner() {
        let dec = tiny();
        let sized = |k: usize, sequences: usize, epochs: usize, grad_accum: usize| {
            let mut j = job(&dec, k);
            j.examples = (0..sequences)
                .map(|i| TrainExample { ids: (0..6).map(|t| ((t * 3 + i + k) % 64) as u32).collect(), loss_from: 0 })
                .collect();
            j.config = TrainConfig::new(1e-3, epochs, grad_accum, k as u64);
            j
        };
        let passes = |jobs: Vec<TrainJob<usize>>, adapters: usize| {
            let mut done = 0;
            let report = train_group(&dec, jobs, GroupLimits::adapters(adapters), |_, r| {
                r?;
                done += 1;
                Ok(())
            })
            .unwrap();
            (report.passes, done)
        };
        for (sequences, epochs, grad_accum) in [(3, 1, 1), (3, 2, 2), (5, 2, 3), (1, 3, 2)] {
            let j = sized(0, sequences, epochs, grad_accum);
            assert_eq!(j.passes(), sequences * epochs);
            assert_eq!(passes(vec![j], 1), (sequences * epochs, 1), "{sequences} sequences, {epochs} epochs, windows of {grad_accum}");
        }
        let built = vec![sized(0, 1, 1, 1), sized(1, 1, 1, 1), sized(2, 2, 2, 1)];
        assert_eq!(built.iter().map(TrainJob::passes).collect::<Vec<_>>(), [1, 1, 4]);
        assert_eq!(passes(built, 2), (5, 3));
        // most passes first, ties (jobs 0 and 1, 1 pass each) in their order
        let mut four = vec![sized(0, 1, 1, 1), sized(1, 1, 1, 1), sized(2, 2, 2, 1), sized(3, 2, 1, 1)];
        longest_first(&mut four, TrainJob::passes);
        assert_eq!(four.iter().map(|j| j.key).collect::<Vec<_>>(), [2, 3, 0, 1]);
        // the same three jobs as `built`, longest first
        let mut sorted = vec![sized(0, 1, 1, 1), sized(1, 1, 1, 1), sized(2, 2, 2, 1)];
        longest_first(&mut sorted, TrainJob::passes);
        assert_eq!(sorted.iter().map(|j| j.key).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(passes(sorted, 2), (4, 3));
    }

    /// The memory limit caps the adapters in flight below `adapters`; every job still
    /// finishes, and a job larger than the limit runs alone.
    #[test]
    fn memory_limit_bounds_the_group() {
        let dec = tiny();
        let j = job(&dec, 0);
        let one = memory_estimate(&dec, &j.adapter, &j.examples, &j.config);
        // every job has the same shape, so the same estimate: 5 f32 copies of 2 layers ×
        // (A, B) of q (32 -> 32) and v (32 -> 16) at rank 4, and 10 tokens of the frozen
        // model's activations plus the low-rank path's (input, rank, 2 × output per module),
        // plus the attention probabilities of 2 layers × 4 heads × 55 (query, key) pairs
        let params = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4);
        let lora_per_token = 2 * ((32 + 4 + 2 * 32) + (32 + 4 + 2 * 16)) * 4;
        assert_eq!(dec.attention_bytes(10), 2 * 4 * 55 * 4);
        assert_eq!(one, 5 * 4 * params as u64 + 10 * (dec.training_bytes_per_token() + lora_per_token) + dec.attention_bytes(10));
        // the largest pass, not the longest sequence's: 257 tokens keep no probabilities
        // (over the short kernel's 256), so a 256-token sequence weighs more
        let long = |len: usize| TrainExample { ids: vec![1; len], loss_from: 0 };
        let pass = |len: u64| len * (dec.training_bytes_per_token() + lora_per_token) + dec.attention_bytes(len as usize);
        assert!(pass(256) > pass(257) && dec.attention_bytes(257) == 0);
        assert_eq!(memory_estimate(&dec, &j.adapter, &[long(257), long(256)], &j.config), 5 * 4 * params as u64 + pass(256));
        let run = |limits: GroupLimits| {
            let mut done = Vec::new();
            let report = train_group(&dec, (0..6).map(|k| job(&dec, k)), limits, |k, r| {
                r?;
                done.push(k);
                Ok(())
            })
            .unwrap();
            done.sort();
            assert_eq!(done, (0..6).collect::<Vec<_>>());
            report
        };
        let unbounded = run(GroupLimits::adapters(4));
        assert_eq!((unbounded.max_in_flight, unbounded.max_memory_estimate), (4, 4 * one));
        // jobs 0-3 fill the group for 2 passes, then 4 and 5 take 0's and 2's slots for 2 more;
        // 5 drains alone for the last 2
        assert_eq!((unbounded.passes, unbounded.full.passes, unbounded.full.tokens), (6, 4, 4 * 4 * 10));
        assert_eq!(unbounded.full.sequences, 4 * 4);
        assert!(unbounded.full.seconds > 0.0 && unbounded.full.seconds <= unbounded.seconds, "{:?}", unbounded.full);
        // every phase was timed, within the run's own time
        let t = unbounded.times;
        assert!(t.forward > 0.0 && t.backward > 0.0 && t.optimizer > 0.0, "{t:?}");
        assert!(t.forward + t.backward + t.optimizer <= unbounded.seconds, "{t:?} in {} s", unbounded.seconds);
        // every sequence fed once per epoch: jobs 0..6 train 1, 2, 1, 2, 1, 2 epochs of
        // 2 sequences of 10 tokens
        assert_eq!((unbounded.tokens, unbounded.sequences), (9 * 2 * 10, 9 * 2));
        let bounded = run(GroupLimits { adapters: 4, memory_bytes: Some(2 * one + one / 2) });
        assert_eq!((bounded.max_in_flight, bounded.max_memory_estimate), (2, 2 * one));
        // two at a time while a job waits for memory (passes 1-6), then 3 and 5 drain
        assert_eq!((bounded.passes, bounded.full.passes, bounded.full.tokens), (10, 6, 6 * 2 * 10));
        // a limit is inclusive: exactly two estimates fit two adapters
        let exact = run(GroupLimits { adapters: 4, memory_bytes: Some(2 * one) });
        assert_eq!(exact.max_in_flight, 2);
        let tight = run(GroupLimits { adapters: 4, memory_bytes: Some(one / 2) });
        assert_eq!(tight.max_in_flight, 1);
        assert!(tight.passes > bounded.passes && bounded.passes > unbounded.passes);
    }
}

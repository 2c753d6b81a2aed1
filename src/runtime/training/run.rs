//! One adapter's run under the Trainer's rules, independent of how its forward passes are
//! batched: which sequence comes next, what weight its loss carries, and what happens when an
//! accumulation window is complete (clip, AdamW, learning-rate decay).

use std::borrow::BorrowMut;
use std::time::Instant;

use anyhow::ensure;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{end_to_end, linear_lr, AdamW, TrainConfig, TrainExample, TrainReport};
use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::Decoder;

/// The state of one adapter's training. Drive it with [`Self::next_micro_batch`] (which
/// sequence to run next, and its loss weight) and [`Self::add_gradients`] (that sequence's
/// loss and gradients); it steps its optimizer when a window is complete.
///
/// `A` is the adapter, owned (`LoraAdapter`, as in a group) or borrowed (`&mut LoraAdapter`).
pub struct AdapterRun<A: BorrowMut<LoraAdapter>> {
    adapter: A,
    examples: Vec<TrainExample>,
    cfg: TrainConfig,
    opt: AdamW,
    rng: StdRng,
    total: usize,
    /// The current epoch's order of the examples, and the epochs begun.
    order: Vec<usize>,
    epochs_begun: usize,
    /// Where the current window starts in `order`, and how many of its sequences are done.
    window_start: usize,
    in_window: usize,
    window_tokens: usize,
    /// Windows to pass over (already done before a resume).
    skip: usize,
    step: usize,
    grads: Vec<Option<Tensor>>,
    window_loss: f64,
    report: TrainReport,
    started: Instant,
    seconds_before: f64,
}

/// Positions whose target counts in a sequence's loss (see [`TrainExample::loss_from`]).
pub(super) fn counted(e: &TrainExample) -> usize {
    e.ids.len() - e.loss_from.max(1)
}

/// The most memory one adapter's training holds in flight, in bytes (an estimate, used to
/// bound a group; `make bench` prints it beside the measured peak): five f32 copies of the
/// adapter's parameters (weights, accumulated gradient, AdamW's two moments, one pass's
/// gradient), plus, for its largest pass (over a sequence cut to `max_len`), the frozen
/// model's activations ([`Decoder::training_bytes_per_token`]), attention's probabilities
/// ([`Decoder::attention_bytes`]) and the low-rank path's own: per targeted projection, its
/// f32 input, the rank-wide product, the update and its scaled copy.
pub fn memory_estimate(decoder: &Decoder, adapter: &LoraAdapter, examples: &[TrainExample], cfg: &TrainConfig) -> u64 {
    let f32_bytes = DType::F32.size_in_bytes() as u64;
    let params = adapter.num_parameters() as u64;
    let mut lora_per_token = 0u64;
    for layer in 0..adapter.num_layers() {
        for &proj in &adapter.config.targets {
            if let Some(pair) = adapter.pair(layer, proj) {
                let (rank, input) = (pair.a.dim(0).unwrap_or(0), pair.a.dim(1).unwrap_or(0));
                let output = pair.b.dim(0).unwrap_or(0);
                lora_per_token += (input + rank + 2 * output) as u64 * f32_bytes;
            }
        }
    }
    // the largest pass, its sequence cut to `max_len`: the activations grow with the length,
    // and the kept probabilities too, up to the length above which none are kept
    let pass = |len: usize| len as u64 * (decoder.training_bytes_per_token() + lora_per_token) + decoder.attention_bytes(len);
    let largest = examples.iter().map(|e| pass(e.ids.len().min(cfg.max_len))).max().unwrap_or(0);
    5 * f32_bytes * params + largest
}

/// `Σ x²` of a gradient, in f64: one pass over a CPU f32 tensor (no squared copy; `sqr`
/// then `sum_all` were ~2% of grouped training, every adapter clipping after each window),
/// candle's ops otherwise.
fn squared_norm(g: &Tensor) -> candle_core::Result<f64> {
    let fused = crate::runtime::ops::with_cpu_f32(g, |x| {
        // eight independent sums, so the loop vectorizes
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f64::from(v) * f64::from(v);
            }
        }
        acc.iter().sum::<f64>() + rest
    });
    match fused {
        Some(s) => Ok(s),
        None => g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>(),
    }
}

/// Σ of the squared entries of all of `gs`, in f64, tensor by tensor, in order.
fn squared_norm_all(gs: &[Tensor]) -> candle_core::Result<f64> {
    gs.iter().map(squared_norm).sum()
}

impl<A: BorrowMut<LoraAdapter>> AdapterRun<A> {
    /// Truncates the examples to `max_len` and drops those with nothing to predict.
    ///
    /// Errors: no usable example, `grad_accum` or `epochs` of 0.
    pub fn new(adapter: A, examples: &[TrainExample], cfg: &TrainConfig) -> anyhow::Result<Self> {
        ensure!(cfg.grad_accum >= 1, "gradient_accumulation_steps must be >= 1");
        ensure!(cfg.epochs >= 1, "num_epochs must be >= 1");
        let examples: Vec<TrainExample> = examples
            .iter()
            .map(|e| TrainExample { ids: e.ids[..e.ids.len().min(cfg.max_len)].to_vec(), loss_from: e.loss_from })
            .filter(|e| e.ids.len() >= 2 && e.loss_from < e.ids.len())
            .collect();
        ensure!(!examples.is_empty(), "no training sequence has at least two tokens");
        let vars = adapter.borrow().vars();
        let n_vars = vars.len();
        Ok(Self {
            total: cfg.total_steps(examples.len()),
            opt: AdamW::new(vars)?,
            rng: StdRng::seed_from_u64(cfg.seed),
            adapter,
            examples,
            cfg: cfg.clone(),
            order: Vec::new(),
            epochs_begun: 0,
            window_start: 0,
            in_window: 0,
            window_tokens: 0,
            skip: 0,
            step: 0,
            grads: vec![None; n_vars],
            window_loss: 0.0,
            report: TrainReport::default(),
            started: Instant::now(),
            seconds_before: 0.0,
        })
    }

    /// Continues after `step` optimizer steps whose state (adapter, optimizer) the caller has
    /// restored: those windows are passed over, their shuffles still drawn.
    pub fn resume_at(&mut self, step: usize, report: TrainReport) {
        self.seconds_before = report.seconds;
        self.skip = step;
        self.step = step;
        self.report = report;
    }

    pub fn adapter(&self) -> &LoraAdapter {
        self.adapter.borrow()
    }
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }
    /// For restoring a checkpoint: the adapter's variables are set in place.
    pub fn adapter_and_optimizer(&mut self) -> (&LoraAdapter, &mut AdamW) {
        (self.adapter.borrow(), &mut self.opt)
    }
    pub fn report(&self) -> &TrainReport {
        &self.report
    }
    /// Optimizer steps done, and in all.
    pub fn step(&self) -> usize {
        self.step
    }
    pub fn total_steps(&self) -> usize {
        self.total
    }
    pub fn example(&self, i: usize) -> &TrainExample {
        &self.examples[i]
    }

    fn window_len(&self) -> usize {
        self.cfg.grad_accum.min(self.order.len() - self.window_start)
    }

    /// The next sequence to run (an index for [`Self::example`]) and the weight of its mean
    /// loss in its window (its share of the window's counted tokens), or `None` when done.
    pub fn next_micro_batch(&mut self) -> Option<(usize, f64)> {
        if self.in_window == 0 {
            // 1. a new window: a fresh seeded order at each epoch's start (drawn even for
            //    windows passed over, so a resumed run sees the same order)
            loop {
                if self.window_start >= self.order.len() {
                    if self.epochs_begun == self.cfg.epochs {
                        return None;
                    }
                    self.order = (0..self.examples.len()).collect();
                    self.order.shuffle(&mut self.rng);
                    self.epochs_begun += 1;
                    self.window_start = 0;
                }
                if self.skip == 0 {
                    break;
                }
                self.skip -= 1;
                self.window_start += self.cfg.grad_accum;
            }
            // dropout masks depend on the step only, so a resumed run draws the same ones
            let seed = self.cfg.seed ^ 0x5eed ^ (self.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.adapter.borrow_mut().set_training(Some(seed));
            let window = &self.order[self.window_start..self.window_start + self.window_len()];
            self.window_tokens = window.iter().map(|&i| counted(&self.examples[i])).sum();
        }
        let i = self.order[self.window_start + self.in_window];
        Some((i, counted(&self.examples[i]) as f64 / self.window_tokens as f64))
    }

    /// Adds the gradients of the current sequence's weighted loss (`weight * loss`, from
    /// [`Self::next_micro_batch`]) in [`LoraAdapter::vars`] order (`None`: no gradient).
    /// When the window is complete: clips the global norm, steps AdamW at the linearly
    /// decayed learning rate, and returns the window's loss.
    pub fn add_gradients(&mut self, loss: f64, weight: f64, grads: Vec<Option<Tensor>>) -> anyhow::Result<Option<f32>> {
        // 2. accumulate the window's gradient, each sequence weighted by its token share
        self.window_loss += loss * weight;
        for (acc, g) in self.grads.iter_mut().zip(grads) {
            if let Some(g) = g {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        self.in_window += 1;
        if self.in_window < self.window_len() {
            return Ok(None);
        }
        let window = &self.order[self.window_start..self.window_start + self.window_len()];
        self.report.tokens += window.iter().map(|&i| self.examples[i].ids.len()).sum::<usize>();
        self.report.sequences += window.len();
        let vars = self.adapter.borrow().vars();
        let grads: Vec<Tensor> = std::mem::replace(&mut self.grads, vec![None; vars.len()])
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let lr = linear_lr(self.cfg.learning_rate, self.step, self.total);
        // the factor that clips a global norm above `max_grad_norm` (none when clipping is off)
        let max = self.cfg.max_grad_norm;
        let clip = |norm: f64| (norm > max).then(|| max / (norm + 1e-6));
        if grads.first().is_none_or(|g| g.device().is_cpu()) {
            // 3-4. clip the global gradient norm (the factor taken within the update), and
            //      the AdamW update at the linearly decayed learning rate
            let scale = if max > 0.0 { clip(squared_norm_all(&grads)?.sqrt()) } else { None };
            self.opt.step_scaled(&grads, scale, lr)?;
        } else {
            // 3-4 on a GPU, where each kernel costs its launch whatever its size: the gradients
            // laid end to end once, for the norm (one reduction, read back once), the clipping
            // (one product) and the update (the same ops, so the same bits, as tensor by tensor)
            self.opt.check_gradients(&grads)?;
            let mut g = end_to_end(&grads)?;
            if max > 0.0 {
                if let Some(s) = clip(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) {
                    g = (g * s)?;
                }
            }
            self.opt.step_end_to_end(&g, lr)?;
        }
        let window_loss = std::mem::take(&mut self.window_loss) as f32;
        self.report.learning_rates.push(lr);
        self.report.step_losses.push(window_loss);
        self.step += 1;
        self.report.steps = self.step;
        self.report.seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        self.window_start += self.cfg.grad_accum;
        self.in_window = 0;
        Ok(Some(window_loss))
    }

    /// Ends the run (dropout off) and hands back the adapter and its report.
    pub fn finish(mut self, stopped_early: bool) -> (A, TrainReport) {
        self.adapter.borrow_mut().set_training(None);
        self.report.steps = self.step;
        self.report.seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        self.report.stopped_early = stopped_early;
        (self.adapter, self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass sum of squares equals candle's in f64, with a tail shorter than its
    /// eight lanes, and on a transposed (not contiguous) tensor through candle's ops.
    #[test]
    fn squared_norm_equals_candles() {
        let dev = candle_core::Device::Cpu;
        for n in [1usize, 7, 8, 61, 1000] {
            let g = Tensor::randn(0f32, 3.0, (n, 3), &dev).unwrap();
            let want = g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            for t in [g.clone(), g.t().unwrap()] {
                let got = squared_norm(&t).unwrap();
                assert!((got - want).abs() <= 1e-12 * want, "n {n}: {got} vs {want}");
            }
        }
    }
}

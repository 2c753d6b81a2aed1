//! LoRA training by next-token prediction, matching the Hugging Face Trainer defaults the
//! paper used: batch size 1, gradient accumulation, AdamW (β 0.9/0.999, ε 1e-8, weight decay
//! 0), linear decay to 0 without warm-up, gradient-norm clipping at 1.0, a seeded shuffle per
//! epoch, sequences truncated to `max_len`. Like Transformers ≥ 4.46, the loss of an
//! accumulation window is the mean over all its counted tokens (not a mean of means).
//!
//! The whole step, top to bottom, is in [`train_lora`].

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use anyhow::ensure;
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::Decoder;

/// One training sequence. Loss is taken on targets at positions `>= loss_from`
/// (0: every token; the prompt length: the completion only).
#[derive(Debug, Clone)]
pub struct TrainExample {
    pub ids: Vec<u32>,
    pub loss_from: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub epochs: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub seed: u64,
    pub max_grad_norm: f64,
}

impl TrainConfig {
    pub fn new(learning_rate: f64, epochs: usize, grad_accum: usize, seed: u64) -> Self {
        Self { learning_rate, epochs, grad_accum, max_len: 2048, seed, max_grad_norm: 1.0 }
    }
    /// Optimizer steps for `n` examples, as the HF Trainer counts them.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_epoch = (n / self.grad_accum + usize::from(!n.is_multiple_of(self.grad_accum))).max(1);
        per_epoch * self.epochs
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    /// Tokens fed forward (all epochs).
    pub tokens: usize,
    /// Mean loss of each optimizer step's window.
    pub step_losses: Vec<f32>,
    /// The learning rate each optimizer step used.
    #[serde(default)]
    pub learning_rates: Vec<f64>,
    pub seconds: f64,
    /// The run was stopped by its callback before the last step (a checkpoint holds it).
    #[serde(default)]
    pub stopped_early: bool,
}

/// Where and how often a long run (the generator's SFT) saves its state: the adapter, the
/// optimizer's moments and the step. A run started again with the same folder resumes from
/// the last checkpoint and ends where an uninterrupted run would.
pub struct Checkpointing<'a> {
    pub dir: &'a Path,
    /// Save after every `every` optimizer steps (and when stopped).
    pub every: usize,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    adam_t: usize,
    report: TrainReport,
}

fn save_checkpoint(dir: &Path, step: usize, adapter: &LoraAdapter, opt: &AdamW, report: &TrainReport) -> anyhow::Result<()> {
    let (t, m, v) = opt.state();
    let mut named = Vec::new();
    for (i, var) in adapter.vars().iter().enumerate() {
        named.push((format!("var.{i:05}"), var.as_tensor().clone()));
        named.push((format!("m.{i:05}"), m[i].clone()));
        named.push((format!("v.{i:05}"), v[i].clone()));
    }
    let state = CheckpointState { step, adam_t: t, report: report.clone() };
    crate::util::atomic::write_dir_atomically(dir, |tmp| {
        crate::runtime::formats::safetensors::save_safetensors(&named, &tmp.join("tensors.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string(&state)?)?;
        Ok(())
    })
}

/// Restores a checkpoint into `adapter` and `opt`; returns the step and report it holds.
fn load_checkpoint(dir: &Path, adapter: &LoraAdapter, opt: &mut AdamW) -> anyhow::Result<Option<(usize, TrainReport)>> {
    let state_path = dir.join("state.json");
    let Ok(text) = std::fs::read_to_string(&state_path) else { return Ok(None) };
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is damaged ({e}): delete {} to start over", state_path.display(), dir.display()))?;
    let device = adapter.vars().first().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let tensors = candle_core::safetensors::load(dir.join("tensors.safetensors"), &device)
        .map_err(|e| anyhow::anyhow!("{}: {e}: delete {} to start over", dir.join("tensors.safetensors").display(), dir.display()))?;
    let vars = adapter.vars();
    let get = |name: String| {
        tensors
            .get(&name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor {name}: the checkpoint belongs to another adapter", dir.display()))
    };
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (i, var) in vars.iter().enumerate() {
        let value = get(format!("var.{i:05}"))?;
        ensure!(value.dims() == var.dims(), "{}: variable {i} has shape {:?}, the adapter {:?}", dir.display(), value.dims(), var.dims());
        var.set(&value)?;
        m.push(get(format!("m.{i:05}"))?);
        v.push(get(format!("v.{i:05}"))?);
    }
    opt.set_state(state.adam_t, m, v);
    Ok(Some((state.step, state.report)))
}

/// AdamW with PyTorch's update rule.
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>) -> candle_core::Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate().take(self.vars.len()) {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let theta = self.vars[i].as_tensor();
            let theta = if self.weight_decay > 0.0 { (theta * (1.0 - lr * self.weight_decay))? } else { theta.clone() };
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = ((&self.m[i] / denom)? * (lr / bc1))?;
            self.vars[i].set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// Optimizer state for checkpoints: step count, first and second moments.
    pub fn state(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.t, &self.m, &self.v)
    }

    pub fn set_state(&mut self, t: usize, m: Vec<Tensor>, v: Vec<Tensor>) {
        self.t = t;
        self.m = m;
        self.v = v;
    }
}

/// The learning rate of optimizer step `step` (0-based) of `total`: linear decay to 0.
pub fn linear_lr(base: f64, step: usize, total: usize) -> f64 {
    base * (total.saturating_sub(step)) as f64 / total.max(1) as f64
}

/// Trains `adapter` on `examples`. `on_step(step, total, loss)` is called after each update.
pub fn train_lora(
    decoder: &Decoder,
    adapter: &mut LoraAdapter,
    examples: &[TrainExample],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(usize, usize, f32),
) -> anyhow::Result<TrainReport> {
    train_lora_with(decoder, adapter, examples, cfg, None, |s, t, l| {
        on_step(s, t, l);
        ControlFlow::Continue(())
    })
}

/// [`train_lora`] with checkpoints, and a callback that may stop the run
/// (`ControlFlow::Break`), e.g. to end a job at a time limit.
pub fn train_lora_with(
    decoder: &Decoder,
    adapter: &mut LoraAdapter,
    examples: &[TrainExample],
    cfg: &TrainConfig,
    checkpointing: Option<&Checkpointing>,
    mut on_step: impl FnMut(usize, usize, f32) -> ControlFlow<()>,
) -> anyhow::Result<TrainReport> {
    ensure!(cfg.grad_accum >= 1, "gradient_accumulation_steps must be >= 1");
    ensure!(cfg.epochs >= 1, "num_epochs must be >= 1");
    // Truncate, and drop sequences with nothing to predict.
    let examples: Vec<TrainExample> = examples
        .iter()
        .map(|e| TrainExample { ids: e.ids[..e.ids.len().min(cfg.max_len)].to_vec(), loss_from: e.loss_from })
        .filter(|e| e.ids.len() >= 2 && e.loss_from < e.ids.len())
        .collect();
    ensure!(!examples.is_empty(), "no training sequence has at least two tokens");

    let start = Instant::now();
    let total = cfg.total_steps(examples.len());
    let vars = adapter.vars();
    let mut opt = AdamW::new(vars.clone())?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut report = TrainReport::default();
    let mut step = 0;
    let mut resumed_at = 0;
    if let Some(c) = checkpointing {
        if let Some((s, r)) = load_checkpoint(c.dir, adapter, &mut opt)? {
            (step, resumed_at, report) = (s, s, r);
        }
    }
    let seconds_before = report.seconds;
    let mut window_index = 0;
    for _epoch in 0..cfg.epochs {
        // 1. a fresh seeded order each epoch (drawn even for skipped epochs, so a resumed
        //    run sees the same order)
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut rng);
        for window in order.chunks(cfg.grad_accum) {
            window_index += 1;
            if window_index <= resumed_at {
                continue;
            }
            // dropout masks depend on the step only, so a resumed run draws the same ones
            adapter.set_training(Some(cfg.seed ^ 0x5eed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            // 2. forward + backward over the window, each sequence weighted by its share
            //    of the window's counted tokens
            let window_examples: Vec<&TrainExample> = window.iter().map(|&i| &examples[i]).collect();
            let (window_loss, mut grads) = window_gradients(decoder, adapter, &window_examples)?;
            report.tokens += window_examples.iter().map(|e| e.ids.len()).sum::<usize>();
            // 3. clip the global gradient norm
            let norm = grads.iter().map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>()).sum::<candle_core::Result<f32>>()?.sqrt() as f64;
            if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
                let s = cfg.max_grad_norm / (norm + 1e-6);
                grads = grads.iter().map(|g| g * s).collect::<candle_core::Result<_>>()?;
            }
            // 4. AdamW update at the linearly decayed learning rate
            let lr = linear_lr(cfg.learning_rate, step, total);
            opt.step(&grads, lr)?;
            report.learning_rates.push(lr);
            step += 1;
            report.step_losses.push(window_loss as f32);
            report.steps = step;
            report.seconds = seconds_before + start.elapsed().as_secs_f64();
            let flow = on_step(step, total, window_loss as f32);
            if let Some(c) = checkpointing {
                if (c.every > 0 && step % c.every == 0) || flow.is_break() {
                    save_checkpoint(c.dir, step, adapter, &opt, &report)?;
                }
            }
            if flow.is_break() && step < total {
                adapter.set_training(None);
                report.stopped_early = true;
                return Ok(report);
            }
        }
    }
    adapter.set_training(None);
    report.steps = step;
    report.seconds = seconds_before + start.elapsed().as_secs_f64();
    Ok(report)
}

/// Positions whose target counts in a sequence's loss (see [`TrainExample::loss_from`]).
fn counted(e: &TrainExample) -> usize {
    e.ids.len() - e.loss_from.max(1)
}

/// One accumulation window's loss and gradients: the token-weighted mean of the sequences'
/// losses (each sequence's mean loss weighted by its share of the window's counted tokens,
/// as Transformers >= 4.46 averages), and its gradient with respect to every adapter
/// variable (zeros where a variable gets none), in [`LoraAdapter::vars`] order.
pub fn window_gradients(decoder: &Decoder, adapter: &LoraAdapter, window: &[&TrainExample]) -> anyhow::Result<(f64, Vec<Tensor>)> {
    let vars = adapter.vars();
    let window_tokens: usize = window.iter().map(|e| counted(e)).sum();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut window_loss = 0f64;
    for ex in window {
        let loss = decoder.sequence_loss(&ex.ids, ex.loss_from, Some(adapter))?;
        let weight = counted(ex) as f64 / window_tokens as f64;
        window_loss += loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64 * weight;
        let g = (loss * weight)?.backward()?;
        for (acc, var) in grads.iter_mut().zip(&vars) {
            if let Some(gv) = g.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + gv)?,
                    None => gv.clone(),
                });
            }
        }
    }
    let grads =
        grads.into_iter().zip(&vars).map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like())).collect::<candle_core::Result<_>>()?;
    Ok((window_loss, grads))
}

/// The gradient of a loss with respect to each adapter variable (for tests and checks).
pub fn lora_gradients(decoder: &Decoder, adapter: &LoraAdapter, ex: &TrainExample) -> anyhow::Result<(f32, Vec<Option<Tensor>>)> {
    let loss = decoder.sequence_loss(&ex.ids, ex.loss_from, Some(adapter))?;
    let g = loss.backward()?;
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok((value, adapter.vars().iter().map(|v| g.get(v.as_tensor()).cloned()).collect()))
}

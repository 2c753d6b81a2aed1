//! LoRA training by next-token prediction, matching the Hugging Face Trainer defaults the
//! paper used: batch size 1, gradient accumulation, AdamW (β 0.9/0.999, ε 1e-8, weight decay
//! 0), linear decay to 0 without warm-up, gradient-norm clipping at 1.0, a seeded shuffle per
//! epoch, sequences truncated to `max_len`. Like Transformers ≥ 4.46, the loss of an
//! accumulation window is the mean over all its counted tokens (not a mean of means).
//!
//! The whole step, top to bottom, is in [`AdapterRun`] (one adapter's schedule, windows and
//! update) and [`train_lora`] (its forward and backward, one sequence at a time);
//! [`train_group`] trains many adapters at once over one frozen base with the same
//! [`AdapterRun`], so an adapter trained in a group follows exactly the same steps.

mod checkpoint;
mod group;
mod run;
mod solo;

pub use checkpoint::Checkpointing;
pub use group::{train_group, GroupLimits, GroupReport, PassTimes, TrainJob};
pub use run::{memory_estimate, AdapterRun};
pub use solo::{lora_gradients, train_lora, train_lora_with, window_gradients};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

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

/// A tiny decoder with random weights (seeded), for the training unit tests.
#[cfg(test)]
fn tiny_decoder(seed: u64) -> crate::runtime::model::Decoder {
    use crate::runtime::model::{random_weights, ModelConfig};
    let (cfg, dev) = (ModelConfig::tiny_for_tests(), candle_core::Device::Cpu);
    crate::runtime::formats::decoder_from_tensors(&cfg, random_weights(&cfg, seed, &dev, candle_core::DType::F32).unwrap(), &dev).unwrap()
}

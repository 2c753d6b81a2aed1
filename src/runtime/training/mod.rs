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
pub use group::{longest_first, planned_passes, train_group, FullPasses, GroupLimits, GroupReport, PassTimes, TrainJob};
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
    /// Tokens of the sequences trained on (all epochs), as Hugging Face's tokens/s counts them.
    /// A pass runs each sequence's first `len - 1` positions (the last has no target), so the
    /// positions run are `tokens - sequences`, give or take the few sequences that keep all
    /// theirs (`model::loss_positions`).
    pub tokens: usize,
    /// Sequences trained on (all epochs). A checkpoint written before this count existed
    /// reads as 0 for its steps.
    #[serde(default)]
    pub sequences: usize,
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
    /// On a GPU, the moments of every variable end to end, `[Σ elements]` each; `m` and `v`
    /// are then views into them (see [`Self::step_end_to_end`]).
    flat: Option<(Tensor, Tensor)>,
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
        Ok(Self { vars, m, v, flat: None, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })
    }

    /// One update with gradients `grads` (same order as the variables).
    ///
    /// Errors: not one gradient per variable, or a gradient whose shape is not its variable's.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.step_scaled(grads, None, lr)
    }

    /// [`Self::step`] with every gradient first multiplied by `scale` where given (gradient
    /// clipping's factor), with the bits of `g * scale` taken beforehand.
    ///
    /// Why: clipping multiplied every gradient into a new tensor on one thread before the
    /// update read it again; in the fused CPU update the product is taken as each value is
    /// read (grouped training, where every adapter clips after each sequence: `Tensor::affine`
    /// under the clipping held 0.7% of a profile's samples, thirty-seventh session).
    ///
    /// Errors: [`Self::step`]'s.
    pub fn step_scaled(&mut self, grads: &[Tensor], scale: Option<f64>, lr: f64) -> candle_core::Result<()> {
        self.check_gradients(grads)?;
        if self.vars.first().is_some_and(|v| !v.device().is_cpu()) {
            let g = end_to_end(grads)?;
            return self.step_end_to_end(&if let Some(s) = scale { (g * s)? } else { g }, lr);
        }
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            if self.step_cpu(i, g, scale, lr, bc1, bc2)? {
                continue;
            }
            let scaled;
            let g = match scale {
                Some(s) => {
                    scaled = (g * s)?;
                    &scaled
                }
                None => g,
            };
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

    /// Errors: not one gradient per variable, or a gradient whose shape is not its variable's.
    pub fn check_gradients(&self, grads: &[Tensor]) -> candle_core::Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("AdamW: {} gradients for {} variables", grads.len(), self.vars.len());
        }
        for (i, (g, var)) in grads.iter().zip(&self.vars).enumerate() {
            if g.shape() != var.shape() {
                candle_core::bail!("AdamW: gradient {i} has shape {:?}, its variable {:?}", g.dims(), var.dims());
            }
        }
        Ok(())
    }

    /// [`Self::step`] for variable `i` in one pass over its elements, when it and its state
    /// are contiguous f32 on the CPU (returns `false`, doing nothing, otherwise). The same
    /// f32 operations in the same order as the candle ops above (candle's `tensor * f64` is
    /// `x * (f64 as f32) + 0`), so both give the same bits. One pass, in place, instead of
    /// thirteen tensors allocated and walked: the update is memory-bound (four arrays of 7 MB
    /// for SmolLM2's rank-32 q/v adapter), and the composed form took 3% of a solo training
    /// profile and 8% of grouped training (`train_share_optimizer`, with clipping and
    /// accumulation), where every adapter steps after each sequence.
    fn step_cpu(&mut self, i: usize, g: &Tensor, scale: Option<f64>, lr: f64, bc1: f64, bc2: f64) -> candle_core::Result<bool> {
        use crate::runtime::ops::{simd::simd, with_cpu_f32, with_cpu_f32_mut};
        let (b1, b2) = (self.beta1, self.beta2);
        let (b1f, c1, b2f, c2) = (b1 as f32, (1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32);
        let decay = (self.weight_decay > 0.0).then_some((1.0 - lr * self.weight_decay) as f32);
        let (inv_bc2, eps, step) = ((1.0 / bc2.sqrt()) as f32, self.eps as f32, (lr / bc1) as f32);
        let scale = scale.map(|s| s as f32);
        let (theta, m, v) = (self.vars[i].as_tensor(), &self.m[i], &self.v[i]);
        if [m.shape(), v.shape(), g.shape()] != [theta.shape(); 3] {
            return Ok(false);
        }
        // Four distinct storages, or the nested locks below would wait on each other
        // (the composed path then fails with candle's error instead of hanging).
        let spans: Vec<Option<(usize, usize)>> =
            [theta, m, v, g].iter().map(|t| with_cpu_f32(t, |x| (x.as_ptr() as usize, x.as_ptr() as usize + 4 * x.len()))).collect();
        let Some(spans) = spans.into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(false);
        };
        if spans.iter().enumerate().any(|(j, a)| spans[j + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1)) {
            return Ok(false);
        }
        // in place: every array read once and written once (the update is memory-bound)
        let updated = with_cpu_f32(g, |g| {
            with_cpu_f32_mut(theta, |theta| {
                with_cpu_f32_mut(m, |m| {
                    with_cpu_f32_mut(v, |v| {
                        simd(
                            #[inline(always)]
                            || {
                                let state = m.iter_mut().zip(v.iter_mut());
                                for ((m, v), (theta, &g)) in state.zip(theta.iter_mut().zip(g)) {
                                    // candle's `g * scale`: `g * (scale as f32) + 0`
                                    let g = match scale {
                                        Some(s) => g * s + 0.0,
                                        None => g,
                                    };
                                    *m = (*m * b1f + 0.0) + (g * c1 + 0.0);
                                    *v = (*v * b2f + 0.0) + ((g * g) * c2 + 0.0);
                                    let decayed = match decay {
                                        Some(d) => *theta * d + 0.0,
                                        None => *theta,
                                    };
                                    let denom = (v.sqrt() * inv_bc2 + 0.0) * 1.0 + eps;
                                    *theta = decayed - ((*m / denom) * step + 0.0);
                                }
                            },
                        )
                    })
                })
            })
        });
        if updated.flatten().flatten().flatten().is_none() {
            // nothing was written: a tensor is not contiguous f32 on the CPU (only the
            // innermost closure writes, so a refusal at any level leaves all four untouched)
            return Ok(false);
        }
        Ok(true)
    }

    /// [`Self::step`] for every variable at once, from gradient `g` `[Σ elements]`: the
    /// gradients laid end to end in the variables' order ([`end_to_end`]), as a run on a GPU
    /// clips them. The update runs over the variables, gradient and moments end to end: the
    /// same element-wise candle ops as the per-variable update, so the same bits. For a model
    /// on a GPU, where each kernel costs its launch whatever its size: a dozen kernels plus two
    /// copies a variable (the variable laid end to end, the result written back), where the
    /// per-variable update took ~13 kernels a variable. The paper's q/v adapter has 120
    /// variables; the per-variable update with the clipping took 42% of grouped training on an
    /// H200, 15% after (twenty-sixth session). The moments stay end to end between steps.
    ///
    /// Errors: `g` not `[Σ elements]` of the variables. (Its parts' shapes are the caller's to
    /// check, [`Self::check_gradients`]: a transposed gradient has the same length.)
    pub fn step_end_to_end(&mut self, g: &Tensor, lr: f64) -> candle_core::Result<()> {
        let total: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        if g.dims() != [total] {
            candle_core::bail!("AdamW: a gradient end to end of shape {:?} for variables of {total} values", g.dims());
        }
        self.t += 1;
        if total == 0 {
            return Ok(());
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let (m, v) = match self.flat.take() {
            Some(mv) => mv,
            None => (end_to_end(&self.m)?, end_to_end(&self.v)?),
        };
        let theta = end_to_end(&self.vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
        let m = ((&m * b1)? + (g * (1.0 - b1))?)?;
        let v = ((&v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let theta = if self.weight_decay > 0.0 { (theta * (1.0 - lr * self.weight_decay))? } else { theta };
        let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
        let theta = (theta - ((&m / denom)? * (lr / bc1))?)?;
        let mut start = 0;
        for i in 0..self.vars.len() {
            let (len, shape) = (self.vars[i].elem_count(), self.vars[i].shape().clone());
            self.vars[i].set(&theta.narrow(0, start, len)?.reshape(shape.clone())?)?;
            self.m[i] = m.narrow(0, start, len)?.reshape(shape.clone())?;
            self.v[i] = v.narrow(0, start, len)?.reshape(shape)?;
            start += len;
        }
        self.flat = Some((m, v));
        Ok(())
    }

    /// Optimizer state for checkpoints: step count, first and second moments.
    pub fn state(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.t, &self.m, &self.v)
    }

    pub fn set_state(&mut self, t: usize, m: Vec<Tensor>, v: Vec<Tensor>) {
        self.flat = None;
        self.t = t;
        self.m = m;
        self.v = v;
    }
}

/// `ts` flattened and laid end to end, `[Σ elements]` (a copy each, one kernel each on a GPU).
///
/// Errors: no tensors, or tensors of different dtypes or devices.
pub fn end_to_end(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    Tensor::cat(&ts.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?, 0)
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::runtime::lora::{LoraAdapter, LoraConfig};
    use crate::runtime::model::{backward, layers_as_nodes, random_weights, Adapter, Decoder, FedPositions, LowRank, ModelConfig, Proj};
    use crate::runtime::multi_lora::{SegmentAxis, SegmentedAdapters};

    /// An adapter that hides its factored form, so the decoder composes each layer of
    /// differentiable ops (the path before layers became one node).
    struct Composed<'a>(&'a dyn Adapter);

    impl Adapter for Composed<'_> {
        fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
            self.0.delta(layer, proj, x)
        }
        fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> candle_core::Result<Option<LowRank>> {
            self.0.low_rank(layer, proj, rows)
        }
    }

    fn decoder(model_type: &str) -> Decoder {
        let dev = Device::Cpu;
        let mut cfg = ModelConfig::tiny_for_tests();
        cfg.model_type = model_type.into();
        crate::runtime::formats::decoder_from_tensors(&cfg, random_weights(&cfg, 3, &dev, DType::F32).unwrap(), &dev).unwrap()
    }

    /// An adapter on all seven projections with a B drawn from `seed` (PEFT's zero B would
    /// leave half the gradients trivially zero), dropout drawn from `seed` too: twins alike.
    fn adapter(dec: &Decoder, rank: usize, seed: u64) -> LoraAdapter {
        adapter_on(dec, rank, seed, &Proj::ALL)
    }

    /// [`adapter`] on `targets` only.
    fn adapter_on(dec: &Decoder, rank: usize, seed: u64, targets: &[Proj]) -> LoraAdapter {
        adapter_with(dec, LoraConfig { targets: targets.to_vec(), ..LoraConfig::paper(rank, 2.0 * rank as f64, 0.1) }, seed)
    }

    /// [`adapter`] with `config`.
    fn adapter_with(dec: &Decoder, config: LoraConfig, seed: u64) -> LoraAdapter {
        let targets = config.targets.clone();
        use rand::{Rng, SeedableRng};
        let mut a = LoraAdapter::new(&dec.cfg, config, seed, &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for layer in 0..dec.cfg.num_hidden_layers {
            for &proj in &targets {
                let b = &a.pair(layer, proj).unwrap().b;
                let values: Vec<f32> = (0..b.elem_count()).map(|_| rng.random::<f32>() - 0.5).collect();
                b.set(&Tensor::from_vec(values, b.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        a.set_training(Some(seed + 10));
        a
    }

    /// Largest difference of every factor's gradient, relative to the largest gradient.
    fn gradient_gap(dec: &Decoder, loss: &Tensor, loss2: &Tensor, pairs: &[(&LoraAdapter, &LoraAdapter)]) -> f32 {
        let (g, g2) = (backward(loss).unwrap(), backward(loss2).unwrap());
        let (mut gap, mut scale) = (0f32, 0f32);
        for (a, a2) in pairs {
            for layer in 0..dec.cfg.num_hidden_layers {
                for proj in Proj::ALL {
                    let (Some(p), Some(p2)) = (a.pair(layer, proj), a2.pair(layer, proj)) else { continue };
                    for (v, v2) in [(&p.a, &p2.a), (&p.b, &p2.b)] {
                        let (x, y) = (g.get(v).expect("a gradient"), g2.get(v2).expect("a gradient"));
                        gap = gap.max((x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap());
                        scale = scale.max(y.abs().unwrap().max_all().unwrap().to_scalar().unwrap());
                    }
                }
            }
        }
        assert!(scale > 0.0);
        gap / scale
    }

    /// An adapter whose factors are derived from its variables (tracked, not variables
    /// themselves) still trains through one node per layer: their gradients go through
    /// candle's graph rather than beside it, and equal the variables' own (the derivation
    /// is `x · 1`, so the two paths' gradients are the same numbers).
    #[test]
    fn derived_factors_get_their_gradients_through_the_graph() {
        struct Derived<'a>(&'a LoraAdapter);
        impl Adapter for Derived<'_> {
            fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
                self.0.delta(layer, proj, x)
            }
            fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> candle_core::Result<Option<LowRank>> {
                Ok(match self.0.low_rank(layer, proj, rows)? {
                    Some(LowRank::Factors { a, b, scale, mask }) => Some(LowRank::Factors { a: (a * 1.0)?, b: (b * 1.0)?, scale, mask }),
                    other => other,
                })
            }
            fn factored(&self) -> bool {
                true
            }
        }
        let dec = decoder("llama");
        let ids: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 64).collect();
        let (a, a2) = (adapter(&dec, 4, 2), adapter(&dec, 4, 2));
        let nodes = layers_as_nodes();
        let loss = dec.sequence_loss(&ids, 1, Some(&a)).unwrap();
        let loss2 = dec.sequence_loss(&ids, 1, Some(&Derived(&a2))).unwrap();
        assert_eq!(layers_as_nodes() - nodes, 4, "each layer one node on both paths");
        assert_eq!(loss.to_scalar::<f32>().unwrap(), loss2.to_scalar::<f32>().unwrap());
        let gap = gradient_gap(&dec, &loss, &loss2, &[(&a, &a2)]);
        assert!(gap == 0.0, "gradient gap {gap}");
    }

    /// A loss pass runs each sequence's positions but the last (`loss_positions`): the loss
    /// and the adapter's gradients equal those of the whole sequence run under its causal
    /// mask, its loss the mean cross-entropy of the positions with a target (largest gap
    /// 1e-5 of the largest gradient: float summation order). With dropout too: the pass
    /// draws each mask for every position (`FedPositions`), so passes in a row on sequences
    /// of other lengths (a 2-token one among them) still see the reference's masks.
    #[test]
    fn the_last_position_changes_neither_loss_nor_gradient() {
        let dec = decoder("llama");
        let ids: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 64).collect();
        let n = ids.len();
        for dropout in [0.0, 0.3] {
            let config = LoraConfig::paper(4, 8.0, dropout);
            let (mut a, mut a2) = (adapter_with(&dec, config.clone(), 5), adapter_with(&dec, config, 5));
            a.set_training(Some(9));
            a2.set_training(Some(9));
            // passes in a row: two lengths, a 2-token sequence (which runs both positions) and
            // a loss from position 4 on
            for (len, loss_from) in [(n, 0), (2, 0), (n - 3, 4)] {
                let ids = &ids[..len];
                // counts the rows the adapter is asked for
                struct Rows<'a>(&'a LoraAdapter, std::sync::atomic::AtomicUsize);
                impl Adapter for Rows<'_> {
                    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
                        self.0.delta(layer, proj, x)
                    }
                    fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> candle_core::Result<Option<LowRank>> {
                        self.1.store(rows, std::sync::atomic::Ordering::Relaxed);
                        self.0.low_rank(layer, proj, rows)
                    }
                    fn factored(&self) -> bool {
                        true
                    }
                }
                let rows = Rows(&a, std::sync::atomic::AtomicUsize::new(0));
                let loss = dec.sequence_loss(ids, loss_from, Some(&rows)).unwrap();
                // asked for every position's mask; the pass keeps `loss_positions(len)` rows
                assert_eq!(rows.1.into_inner(), len, "rows drawn for the pass");
                // the reference: all positions, the mean cross-entropy of those from loss_from - 1
                // to len - 2 (the last has no target)
                let batch = crate::runtime::model::Batch::causal(ids, 0, dec.device(), dec.dtype()).unwrap();
                let logits = dec.forward_all(&batch, None, Some(&a2)).unwrap().squeeze(0).unwrap();
                assert_eq!(logits.dim(0).unwrap(), len, "the reference runs every position");
                let first = loss_from.max(1) - 1;
                let targets = Tensor::new(&ids[first + 1..], dec.device()).unwrap();
                let loss2 = candle_nn::loss::cross_entropy(&logits.narrow(0, first, len - 1 - first).unwrap(), &targets).unwrap();
                let (x, y) = (loss.to_scalar::<f32>().unwrap(), loss2.to_scalar::<f32>().unwrap());
                assert!((x - y).abs() < 1e-5 * y.abs(), "dropout {dropout}, {len} tokens: loss {x} against {y}");
                let gap = gradient_gap(&dec, &loss, &loss2, &[(&a, &a2)]);
                assert!(gap < 1e-5, "dropout {dropout}, {len} tokens: gradient gap {gap}");
            }
        }
        // the pass's rows: all positions but the last, except where one row fewer would take
        // another kernel (a row alone; the short-sequence attention)
        let a = adapter_with(&dec, LoraConfig::paper(4, 8.0, 0.0), 5);
        let rows = |len: usize| FedPositions::new(&a, len).rows();
        assert_eq!((rows(n), rows(3), rows(2)), (n - 1, 2, 2));
        let short = crate::runtime::ops::SHORT_ATTENTION_MAX_LEN;
        assert_eq!((rows(short), rows(short + 1), rows(short + 2)), (short - 1, short + 1, short + 1));
        // a sequence without a target is refused, naming what it lacks
        let err = dec.sequence_loss(&ids[..1], 0, Some(&a)).unwrap_err().to_string();
        assert!(err.contains("no next-token target"), "{err}");
        assert!(dec.sequence_loss(&ids, n, Some(&a)).is_err(), "loss from past the end");
    }

    /// The fused CPU update gives candle's composed AdamW bit for bit (a transposed, hence
    /// non-contiguous, gradient takes the composed path): four steps, weight decay on,
    /// zero and negative gradients among the elements, the first (negative) and the last
    /// steps' gradients scaled (clipping's factor: taken inline by the fused update, by
    /// candle's `g * s` in the composed one).
    #[test]
    fn fused_adamw_equals_composed_adamw() {
        let dev = candle_core::Device::Cpu;
        let start = Tensor::randn(0f32, 1., (6, 6), &dev).unwrap();
        let (a, b) = (candle_core::Var::from_tensor(&start).unwrap(), candle_core::Var::from_tensor(&start).unwrap());
        let (mut fused, mut composed) = (super::AdamW::new(vec![a.clone()]).unwrap(), super::AdamW::new(vec![b.clone()]).unwrap());
        fused.weight_decay = 0.01;
        composed.weight_decay = 0.01;
        let storage = |t: &Tensor| crate::runtime::ops::with_cpu_f32(t, |x| x.as_ptr() as usize).unwrap();
        for step in 0..4 {
            let g = (Tensor::randn(0f32, 1e-2, (6, 6), &dev).unwrap() * (step as f64 - 1.0)).unwrap();
            let scale = (step % 3 == 0).then_some(0.3719);
            let (before_fused, before_composed) = (storage(&fused.state().1[0]), storage(&composed.state().1[0]));
            fused.step_scaled(&[g.contiguous().unwrap()], scale, 1e-3).unwrap();
            composed.step_scaled(&[g.t().unwrap().contiguous().unwrap().t().unwrap()], scale, 1e-3).unwrap();
            // the fused path ran (in place: the moment keeps its storage), the composed one did not
            assert_eq!(storage(&fused.state().1[0]), before_fused, "step {step}: fused");
            assert_ne!(storage(&composed.state().1[0]), before_composed, "step {step}: composed");
        }
        // a gradient of another shape with as many elements is refused, as by the composed ops
        assert!(fused.step(&[Tensor::zeros((4, 9), DType::F32, &dev).unwrap()], 1e-3).is_err());
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "weights");
        let ((_, m1, v1), (_, m2, v2)) = (fused.state(), composed.state());
        assert_eq!((bits(&m1[0]), bits(&v1[0])), (bits(&m2[0]), bits(&v2[0])), "moments");
        assert_ne!(bits(a.as_tensor()), bits(&start), "the weights moved");
    }

    /// The update over the variables laid end to end (a GPU's) gives the per-variable composed
    /// update bit for bit, here on the CPU: three variables of different shapes, three steps
    /// with weight decay, a restore of the moments midway (which the end-to-end copy must not
    /// outlive), and a gradient of the wrong shape refused.
    #[test]
    fn adamw_end_to_end_equals_adamw_per_variable() {
        let dev = candle_core::Device::Cpu;
        let shapes = [(4, 6), (6, 4), (2, 5)];
        let start: Vec<Tensor> = shapes.iter().map(|&s| Tensor::randn(0f32, 1., s, &dev).unwrap()).collect();
        let vars = || start.iter().map(|t| candle_core::Var::from_tensor(t).unwrap()).collect::<Vec<_>>();
        let (va, vb) = (vars(), vars());
        let (mut flat, mut composed) = (super::AdamW::new(va.clone()).unwrap(), super::AdamW::new(vb.clone()).unwrap());
        flat.weight_decay = 0.01;
        composed.weight_decay = 0.01;
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for step in 0..3 {
            // transposed twice: not contiguous, so the composed path runs, not the CPU's fused one
            let gs: Vec<Tensor> =
                shapes.iter().map(|&s| (Tensor::randn(0f32, 1e-2, s, &dev).unwrap() * (step as f64 - 1.0)).unwrap()).collect();
            let odd: Vec<Tensor> = gs.iter().map(|g| g.t().unwrap().contiguous().unwrap().t().unwrap()).collect();
            flat.step_end_to_end(&super::end_to_end(&gs).unwrap(), 1e-3).unwrap();
            composed.step(&odd, 1e-3).unwrap();
            assert!(flat.flat.is_some(), "step {step}: the moments stay end to end");
            if step == 1 {
                let (t, m, v) = composed.state();
                flat.set_state(t, m.to_vec(), v.to_vec());
                assert!(flat.flat.is_none(), "a restore drops the end-to-end moments");
            }
        }
        for i in 0..shapes.len() {
            assert_eq!(bits(va[i].as_tensor()), bits(vb[i].as_tensor()), "variable {i}");
            let ((_, m1, v1), (_, m2, v2)) = (flat.state(), composed.state());
            assert_eq!((bits(&m1[i]), bits(&v1[i])), (bits(&m2[i]), bits(&v2[i])), "moments of {i}");
            assert_eq!(m1[i].dims(), va[i].dims());
            assert_ne!(bits(va[i].as_tensor()), bits(&start[i]), "variable {i} moved");
        }
        let wrong = vec![Tensor::zeros((6, 4), DType::F32, &dev).unwrap(); 3];
        let err = flat.step(&wrong, 1e-3).unwrap_err().to_string();
        assert!(err.contains("gradient 0 has shape [6, 4]"), "{err}");
        let short = Tensor::zeros(24 + 24 + 9, DType::F32, &dev).unwrap();
        let err = flat.step_end_to_end(&short, 1e-3).unwrap_err().to_string();
        assert!(err.contains("of 58 values"), "{err}");
    }

    /// A layer as one node of the graph gives the losses of the composed layer bit for bit
    /// and the same gradients up to float summation order (largest gap 1e-5 of the largest
    /// gradient), for Llama, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms), with
    /// dropout on: a 2-token sequence, one sequence alone, one under a causal mask (not packed), and two
    /// adapters' sequences packed in one row. Also a Qwen3 whose layers have a query norm
    /// and no key norm (no checkpoint has that, but the layers' fields allow it): each
    /// path applies the one norm. Each with the projections on OpenBLAS and, on an AVX-512 CPU,
    /// packed for the f32 kernel (where the node runs the projections that share an input as
    /// one product, and the composed path one by one).
    #[test]
    fn a_layer_as_one_node_equals_the_composed_layer() {
        let kinds = ["llama", "qwen2", "qwen3", "qwen3, q_norm only"];
        for (model_type, packed) in kinds.iter().flat_map(|&k| [(k, false), (k, true)]) {
            let mut dec = match model_type.split_once(',') {
                Some((base, _)) => {
                    let mut dec = decoder(base);
                    dec.layers.iter_mut().for_each(|l| l.self_attn.k_norm = None);
                    dec
                }
                None => decoder(model_type),
            };
            if packed {
                if !crate::runtime::sgemm::available() {
                    continue;
                }
                dec.set_compute_dtype(crate::runtime::blas::ComputeDtype::F32).unwrap();
                assert!(dec.layers.iter().all(|l| l.self_attn.k_proj.packed.is_some() && l.mlp.up_proj.packed.is_some()));
            }
            let model_type = if packed { format!("{model_type}, packed") } else { model_type.to_string() };
            let ids: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 64).collect();
            // on all seven projections, and on the paper's q and v (the others untouched)
            for targets in [&Proj::ALL[..], &[Proj::QProj, Proj::VProj]] {
                let (a, a2) = (adapter_on(&dec, 4, 1, targets), adapter_on(&dec, 4, 1, targets));
                // first a 2-token sequence, which runs both positions: the masks either path
                // draws for it leave both streams in step for the passes below
                let (l, l2) =
                    (dec.sequence_loss(&ids[..2], 0, Some(&a)).unwrap(), dec.sequence_loss(&ids[..2], 0, Some(&Composed(&a2))).unwrap());
                assert_eq!(l.to_scalar::<f32>().unwrap(), l2.to_scalar::<f32>().unwrap(), "{model_type}: 2 tokens");
                let nodes = layers_as_nodes();
                let loss = dec.sequence_loss(&ids, 3, Some(&a)).unwrap();
                assert_eq!(layers_as_nodes() - nodes, 2, "each layer one node");
                let loss2 = dec.sequence_loss(&ids, 3, Some(&Composed(&a2))).unwrap();
                assert_eq!(layers_as_nodes() - nodes, 2, "the composed path");
                assert_eq!(loss.to_scalar::<f32>().unwrap(), loss2.to_scalar::<f32>().unwrap(), "{model_type}: one sequence");
                let gap = gradient_gap(&dec, &loss, &loss2, &[(&a, &a2)]);
                assert!(gap < 1e-5, "{model_type}: one sequence on {targets:?}, gradient gap {gap}");
                // a batch under its own mask (not packed), through every position's logits
                let batch = crate::runtime::model::Batch::causal(&ids, 0, dec.device(), dec.dtype()).unwrap();
                let logits =
                    |adapter: &dyn Adapter| dec.forward_all(&batch, None, Some(adapter)).unwrap().sqr().unwrap().mean_all().unwrap();
                let (y, y2) = (logits(&a), logits(&Composed(&a2)));
                assert_eq!(y.to_scalar::<f32>().unwrap(), y2.to_scalar::<f32>().unwrap(), "{model_type}: masked rows");
                let gap = gradient_gap(&dec, &y, &y2, &[(&a, &a2)]);
                assert!(gap < 1e-5, "{model_type}: masked rows on {targets:?}, gradient gap {gap}");
            }

            let (p, q, p2, q2) = (adapter(&dec, 2, 5), adapter(&dec, 6, 6), adapter(&dec, 2, 5), adapter(&dec, 6, 6));
            let seqs: [(&[u32], usize); 2] = [(&ids[..5], 0), (&ids[2..], 2)];
            // each sequence's segment: its positions but the last, its adapter drawing masks
            // for all of them (`FedPositions`, as grouped training gives them)
            let (fp, fq) = (FedPositions::new(&p, 5), FedPositions::new(&q, 7));
            let (fp2, fq2) = (FedPositions::new(&p2, 5), FedPositions::new(&q2, 7));
            assert_eq!((fp.rows(), fq.rows()), (4, 6));
            let pq: Vec<(usize, Option<&dyn Adapter>)> = vec![(4, Some(&fp)), (6, Some(&fq))];
            let pq2: Vec<(usize, Option<&dyn Adapter>)> = vec![(4, Some(&fp2)), (6, Some(&fq2))];
            let packed = SegmentedAdapters::new(SegmentAxis::Tokens, &pq);
            let packed2 = SegmentedAdapters::new(SegmentAxis::Tokens, &pq2);
            let losses = dec.packed_losses(&seqs, Some(&packed)).unwrap();
            let losses2 = dec.packed_losses(&seqs, Some(&Composed(&packed2))).unwrap();
            assert_eq!(losses.to_vec1::<f32>().unwrap(), losses2.to_vec1::<f32>().unwrap(), "{model_type}: packed");
            let gap = gradient_gap(&dec, &losses.sum_all().unwrap(), &losses2.sum_all().unwrap(), &[(&p, &p2), (&q, &q2)]);
            assert!(gap < 1e-5, "{model_type}: packed, gradient gap {gap}");
        }
    }
}

/// `set_compute_dtype(F32)` (which every stage calls) never fails where the f32 kernel cannot
/// run: weights in bf16 keep their products unpacked, and an f32 model on an AVX-512 CPU
/// gets its projections packed (widths multiples of 16) or left alone (other widths), and
/// its LM head packed for all its products.
#[cfg(test)]
#[test]
fn f32_compute_dtype_is_optional_where_the_kernel_cannot_run() {
    use crate::runtime::blas::ComputeDtype;
    use crate::runtime::model::{random_weights, ModelConfig, Proj};
    let (cfg, dev) = (ModelConfig::tiny_for_tests(), candle_core::Device::Cpu);
    let mut bf16 =
        crate::runtime::formats::decoder_from_tensors(&cfg, random_weights(&cfg, 3, &dev, candle_core::DType::BF16).unwrap(), &dev)
            .unwrap();
    bf16.set_compute_dtype(ComputeDtype::F32).unwrap();
    assert!(bf16.linear(0, Proj::ALL[0]).packed.is_none());
    let mut f32 = tiny_decoder(3);
    f32.set_compute_dtype(ComputeDtype::F32).unwrap();
    assert_eq!(f32.compute_dtype(), ComputeDtype::F32);
    for p in Proj::ALL {
        let lin = f32.linear(0, p);
        let (out, inp) = lin.weight.dims2().unwrap();
        let packable = crate::runtime::sgemm::available() && out % 16 == 0 && inp % 16 == 0;
        assert_eq!(lin.packed.is_some(), packable, "{p:?}: {out} x {inp}");
    }
    // the LM head: packed for the kernel like the projections. A row's logits come from that
    // row alone there, so generation's last-position logits are the full forward's last row
    // bit for bit; against the unpacked product (OpenBLAS or candle), equal up to
    // summation order (32-wide dot products of values ~1: a few ulps, well under 1e-5).
    assert_eq!(f32.lm_head_packed.is_some(), crate::runtime::sgemm::available());
    let batch = crate::runtime::model::Batch::causal(&[1, 5, 9, 2], 0, &dev, candle_core::DType::F32).unwrap();
    let last = f32.forward_last(&batch, None, None).unwrap();
    let all = f32.forward_all(&batch, None, None).unwrap().narrow(1, 3, 1).unwrap().squeeze(1).unwrap();
    let mut unpacked = f32.clone();
    unpacked.lm_head_packed = None;
    let reference = unpacked.forward_all(&batch, None, None).unwrap().narrow(1, 3, 1).unwrap().squeeze(1).unwrap();
    let max_diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    };
    let diff = max_diff(&last, &reference);
    assert!(diff < 1e-5, "last-position logits differ from the unpacked product's by {diff}");
    if f32.lm_head_packed.is_some() {
        assert_eq!(max_diff(&last, &all), 0.0, "the packed LM head's last row depends on the rows beside it");
        // every LM head product reads the packed weight: packed from twice the weight, the
        // logits double exactly (each term does), and the loss moves with them
        let mut doubled = f32.clone();
        let twice = (&f32.lm_head * 2.0).unwrap();
        doubled.lm_head_packed = Some(std::sync::Arc::new(crate::runtime::blas::PackedWeight::new(&twice, ComputeDtype::F32).unwrap()));
        let all_twice = (f32.forward_all(&batch, None, None).unwrap() * 2.0).unwrap();
        assert_eq!(max_diff(&doubled.forward_all(&batch, None, None).unwrap(), &all_twice), 0.0, "forward_all");
        assert_eq!(max_diff(&doubled.forward_last(&batch, None, None).unwrap(), &(&last * 2.0).unwrap()), 0.0, "forward_last");
        let loss = |d: &crate::runtime::model::Decoder| -> f32 { d.sequence_loss(&[1, 5, 9, 2], 0, None).unwrap().to_scalar().unwrap() };
        let packed_losses = |d: &crate::runtime::model::Decoder| -> f32 {
            d.packed_losses(&[(&[1, 5, 9, 2][..], 0), (&[3, 4, 6][..], 1)], None).unwrap().get(0).unwrap().to_scalar().unwrap()
        };
        assert!(
            (loss(&doubled) - loss(&f32)).abs() > 1e-3,
            "the loss did not use the packed LM head: {} and {}",
            loss(&doubled),
            loss(&f32)
        );
        assert!((packed_losses(&doubled) - packed_losses(&f32)).abs() > 1e-3, "packed_losses did not use the packed LM head");
    }
}

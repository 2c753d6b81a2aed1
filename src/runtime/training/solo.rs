//! One adapter at a time: each sequence its own forward and backward pass (the paper's
//! code does the same), with optional checkpoints for long runs.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::checkpoint::{load_checkpoint, save_checkpoint};
use super::run::{counted, AdapterRun};
use super::{Checkpointing, TrainConfig, TrainExample, TrainReport};
use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::{backward, Decoder};

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
    let mut run = AdapterRun::new(adapter, examples, cfg)?;
    if let Some(c) = checkpointing {
        let (adapter, opt) = run.adapter_and_optimizer();
        if let Some((step, report)) = load_checkpoint(c.dir, adapter, opt)? {
            run.resume_at(step, report);
        }
    }
    let total = run.total_steps();
    while let Some((i, weight)) = run.next_micro_batch() {
        // 1. forward and backward of one sequence, its mean loss scaled by its token share
        let ex = run.example(i);
        let loss = decoder.sequence_loss(&ex.ids, ex.loss_from, Some(run.adapter()))?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let g = backward(&(loss * weight)?)?;
        let grads = run.adapter().vars().iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
        // 2. the window's update when it is complete
        let Some(step_loss) = run.add_gradients(value, weight, grads)? else { continue };
        let step = run.step();
        let flow = on_step(step, total, step_loss);
        if let Some(c) = checkpointing {
            if (c.every > 0 && step % c.every == 0) || flow.is_break() {
                save_checkpoint(c.dir, step, run.adapter(), run.optimizer(), run.report())?;
            }
        }
        if flow.is_break() && step < total {
            return Ok(run.finish(true).1);
        }
    }
    Ok(run.finish(false).1)
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
        let g = backward(&(loss * weight)?)?;
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
    let g = backward(&loss)?;
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok((value, adapter.vars().iter().map(|v| g.get(v.as_tensor()).cloned()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::lora::LoraConfig;
    use crate::runtime::training::tiny_decoder;
    use candle_core::Device;

    /// A window's loss and gradient are the token-share-weighted sums of its sequences'
    /// own (10 and 4 counted tokens: shares 10/14 and 4/14).
    #[test]
    fn window_gradients_weight_each_sequence_by_its_token_share() {
        let dec = tiny_decoder(1);
        let lora = LoraAdapter::new(&dec.cfg, LoraConfig::paper(2, 4.0, 0.0), 1, &Device::Cpu).unwrap();
        for v in lora.vars() {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let a = TrainExample { ids: (0..11).map(|t| (t * 3 % 64) as u32).collect(), loss_from: 0 };
        let b = TrainExample { ids: (0..7).map(|t| (t * 5 + 1) as u32).collect(), loss_from: 3 };
        let (la, ga) = lora_gradients(&dec, &lora, &a).unwrap();
        let (lb, gb) = lora_gradients(&dec, &lora, &b).unwrap();
        let (loss, grads) = window_gradients(&dec, &lora, &[&a, &b]).unwrap();
        let (wa, wb) = (10.0 / 14.0, 4.0 / 14.0);
        assert!((loss - (wa * la as f64 + wb * lb as f64)).abs() < 1e-6, "{loss} against {la}, {lb}");
        for ((g, a), b) in grads.iter().zip(&ga).zip(&gb) {
            let want = ((a.as_ref().unwrap() * wa).unwrap() + (b.as_ref().unwrap() * wb).unwrap()).unwrap();
            let d: f32 = (g - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-6, "gradient differs by {d}");
        }
    }
}

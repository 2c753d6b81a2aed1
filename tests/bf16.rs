//! `compute_dtype = "bf16"` validated against f32 on the real SmolLM2-135M: the frozen
//! weights' products in bf16 on AMX tiles must leave LoRA training what it is.
//!
//! - LoRA gradients: cosine similarity with the f32 gradients at least 0.99 for every
//!   variable of an adapter after one epoch (measured: lowest 0.9991), and at least 0.98 for
//!   the whole gradient of the fully trained adapter, whose small gradients feel the rounding
//!   most (measured: 0.991; single variables there go down to 0.78).
//! - Loss curves: the same adapter trained in bf16 and in f32 (same seed, SEAL's baseline
//!   settings, 30 steps) stays within 0.1 nats of f32 at every step, and its mean loss within
//!   5%. bf16 keeps 8 bits of mantissa (a relative rounding of at most 2^-9 per value); the
//!   measured gap was 0.0105 nats at most (4.507 against 4.504 first, 0.979 against 0.978
//!   last).
//! - The learned-fact test passes in bf16: the made-up fact is learned and recalled.
//! - Rows stay independent: grouped training equals solo training in bf16 too, and a batch
//!   of generations equals each alone.
//!
//! Skipped, with a message, on machines without Intel AMX-BF16.

mod common;

use std::sync::OnceLock;

use selfedit::runtime::blas::ComputeDtype;
use selfedit::runtime::formats::LoadedModel;
use selfedit::runtime::generate::sampling::argmax;
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::{Adapter, Batch, Decoder};
use selfedit::runtime::training::{lora_gradients, train_group, train_lora, GroupLimits, TrainConfig, TrainExample, TrainJob};

/// A second copy of the real model, its frozen products in bf16, or `None` where AMX is
/// unavailable.
fn smollm_bf16() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            if !selfedit::runtime::amx::enable() {
                eprintln!("skipped: {}", selfedit::runtime::amx::UNAVAILABLE);
                return None;
            }
            let mut m = selfedit::runtime::formats::load(&common::model_path(), &candle_core::Device::Cpu).unwrap();
            m.decoder.set_compute_dtype(ComputeDtype::Bf16).unwrap();
            assert_eq!(m.decoder.compute_dtype(), ComputeDtype::Bf16);
            Some(m)
        })
        .as_ref()
}

fn fact_lines(m: &LoadedModel) -> Vec<TrainExample> {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/veltoria_fact.txt"))
        .unwrap()
        .lines()
        .map(|l| TrainExample { ids: m.tokenizer.encode(l).unwrap(), loss_from: 0 })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn greedy(d: &Decoder, m: &LoadedModel, prompt: &str, adapter: &LoraAdapter) -> String {
    let mut ids = m.tokenizer.encode(prompt).unwrap();
    let n = ids.len();
    for _ in 0..6 {
        let batch = Batch::causal(&ids, 0, d.device(), d.dtype()).unwrap();
        let logits: Vec<f32> = d.forward_last(&batch, None, Some(adapter as &dyn Adapter)).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        ids.push(argmax(&logits));
    }
    m.tokenizer.decode(&ids[n..], true).unwrap()
}

#[test]
fn bf16_training_matches_f32_and_learns_the_fact() {
    let Some(b) = smollm_bf16() else { return };
    let f = common::smollm();
    let examples = fact_lines(f);
    let config = TrainConfig::new(1e-3, 10, 1, 0);
    let fresh = || LoraAdapter::new(&f.decoder.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, f.device()).unwrap();

    // Loss curves: SEAL's baseline settings (rank 32, alpha 64, lr 1e-3, 10 epochs, batch 1).
    let mut in_f32 = fresh();
    let r32 = train_lora(&f.decoder, &mut in_f32, &examples, &config, |_, _, _| {}).unwrap();
    let mut in_bf16 = fresh();
    let r16 = train_lora(&b.decoder, &mut in_bf16, &examples, &config, |_, _, _| {}).unwrap();
    assert_eq!(r16.steps, r32.steps);
    let gaps: Vec<f32> = r16.step_losses.iter().zip(&r32.step_losses).map(|(a, b)| (a - b).abs()).collect();
    let max_gap = gaps.iter().fold(0f32, |m, g| m.max(*g));
    let (sum16, sum32): (f32, f32) = (r16.step_losses.iter().sum(), r32.step_losses.iter().sum());
    eprintln!(
        "loss curves over {} steps: max gap {max_gap:.4} nats; first {:.4} / {:.4}, last {:.4} / {:.4} (bf16 / f32); mean {:.4} / {:.4}",
        r16.steps,
        r16.step_losses[0],
        r32.step_losses[0],
        r16.step_losses.last().unwrap(),
        r32.step_losses.last().unwrap(),
        sum16 / r16.steps as f32,
        sum32 / r32.steps as f32
    );
    assert!(max_gap <= 0.1, "bf16 loss curve strays {max_gap} nats from f32: {gaps:?}");
    assert!((sum16 - sum32).abs() <= 0.05 * sum32, "bf16 mean loss {sum16} against f32 {sum32}");

    // Gradients, per variable, of an adapter after one epoch (loss ~4.4, B non-zero so A's
    // gradients are too), and of the whole gradient of the trained one (loss ~1.0).
    let mut early = fresh();
    train_lora(&f.decoder, &mut early, &examples, &TrainConfig::new(1e-3, 1, 1, 0), |_, _, _| {}).unwrap();
    let flat = |g: &[Option<candle_core::Tensor>]| -> Vec<Vec<f32>> {
        g.iter()
            .map(|t| t.as_ref().expect("every LoRA variable gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let (l32, g32) = lora_gradients(&f.decoder, &early, &examples[0]).unwrap();
    let (l16, g16) = lora_gradients(&b.decoder, &early, &examples[0]).unwrap();
    let (g32, g16) = (flat(&g32), flat(&g16));
    let mut worst = (1f64, 0);
    for (i, (a, c)) in g16.iter().zip(&g32).enumerate() {
        let cos = cosine(a, c);
        if cos < worst.0 {
            worst = (cos, i);
        }
        assert!(cos >= 0.99, "variable {i}: gradient cosine {cos} between bf16 and f32 after one epoch");
    }
    let (_, t32) = lora_gradients(&f.decoder, &in_f32, &examples[0]).unwrap();
    let (_, t16) = lora_gradients(&b.decoder, &in_f32, &examples[0]).unwrap();
    let whole = cosine(&flat(&t16).concat(), &flat(&t32).concat());
    eprintln!(
        "gradients of {} LoRA variables after one epoch: lowest cosine {:.5} (variable {}), loss {l16:.4} (bf16) against {l32:.4} (f32); \
         whole gradient of the trained adapter: cosine {whole:.5}",
        g16.len(),
        worst.0,
        worst.1
    );
    // Near convergence the gradient is small and bf16's rounding weighs more (measured: 0.991
    // whole, single variables down to 0.78); the loss curves above are what training sees.
    assert!(whole >= 0.98, "whole-gradient cosine {whole} of the trained adapter");

    // The fact is learned in bf16 and recalled by the bf16 model.
    let before = b.decoder.sequence_loss(&examples[0].ids, 0, Some(&fresh())).unwrap().to_scalar::<f32>().unwrap();
    let after = b.decoder.sequence_loss(&examples[0].ids, 0, Some(&in_bf16)).unwrap().to_scalar::<f32>().unwrap();
    assert!(after < before * 0.25, "bf16: loss {before} → {after}");
    let completion = greedy(&b.decoder, b, "The capital of the island nation of Veltoria is", &in_bf16);
    assert!(completion.contains("Marzipane"), "bf16-trained completion: {completion:?}");
}

#[test]
fn bf16_rows_do_not_depend_on_their_neighbours() {
    let Some(b) = smollm_bf16() else { return };
    let examples = fact_lines(b);
    // Three self-edits of different ranks, learning rates and lengths, in slots of two.
    let job = |k: usize| {
        let adapter = LoraAdapter::new(&b.decoder.cfg, LoraConfig::paper([4, 16, 8][k], 16.0, 0.0), 10 + k as u64, b.device()).unwrap();
        TrainJob { key: k, adapter, examples: examples[k..].to_vec(), config: TrainConfig::new([1e-3, 5e-4, 2e-3][k], 1, 1, k as u64) }
    };
    let flat = |a: &LoraAdapter| -> Vec<f32> {
        a.vars().iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let solo: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|k| {
            let mut j = job(k);
            let r = train_lora(&b.decoder, &mut j.adapter, &j.examples, &j.config, |_, _, _| {}).unwrap();
            (flat(&j.adapter), r.step_losses)
        })
        .collect();
    let mut grouped = vec![None; 3];
    train_group(&b.decoder, (0..3).map(job), GroupLimits::adapters(2), |k, r| {
        let (a, rep) = r?;
        grouped[k] = Some((flat(&a), rep.step_losses));
        Ok(())
    })
    .unwrap();
    for (k, (s, g)) in solo.iter().zip(&grouped).enumerate() {
        let g = g.as_ref().unwrap();
        // Same tolerances as tests/grouped.rs (float summation order at most).
        for (x, y) in g.1.iter().zip(&s.1) {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "adapter {k}: loss {x} grouped vs {y} alone");
        }
        let scale = s.0.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.0.iter().zip(&s.0).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "adapter {k}: weights differ by {diff} (largest {scale})");
    }

    // Generation: a batch of prompts of different lengths equals each prompt alone.
    common::assert_batched_generation_matches_alone(b, 10);
}

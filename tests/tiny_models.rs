//! Tiny random Qwen3- and Qwen2-shaped checkpoints written to temporary Hugging Face folders:
//! loading, KV-cache consistency, batching, and LoRA gradients against finite differences.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{tiny_config, write_tiny_checkpoint};
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::Proj;
use selfedit::runtime::model::{Batch, KvCache};
use selfedit::runtime::training::TrainExample;

fn all_logits(dec: &selfedit::runtime::model::Decoder, ids: &[u32]) -> Tensor {
    let b = Batch::causal(ids, 0, dec.device(), dec.dtype()).unwrap();
    dec.forward_all(&b, None, None).unwrap().squeeze(0).unwrap()
}

#[test]
fn qwen3_and_qwen2_checkpoints_load_and_run() {
    for model_type in ["qwen3", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(model_type);
        write_tiny_checkpoint(dir.path(), &cfg, 1);
        let m = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(m.decoder.cfg, cfg);
        assert_eq!(m.decoder.layers[0].self_attn.q_norm.is_some(), model_type == "qwen3");
        assert_eq!(m.decoder.layers[0].self_attn.q_proj.bias.is_some(), model_type == "qwen2");
        let ids = m.tokenizer.encode("w1 w5 w9 w2 w7").unwrap();
        assert_eq!(ids, vec![3, 7, 11, 4, 9]);
        let logits = all_logits(&m.decoder, &ids);
        assert_eq!(logits.dims(), &[5, 64]);
        let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        // Causality: the logits of the first 3 positions do not depend on later tokens.
        let prefix = all_logits(&m.decoder, &ids[..3]);
        let diff = (logits.narrow(0, 0, 3).unwrap() - prefix).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{model_type}: causal mask leaks ({diff})");
        let text = m.tokenizer.apply_chat_template(&[selfedit::runtime::tokenizer::ChatMessage::user("w1")], false).unwrap();
        assert_eq!(text, "user: w1\n");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("qwen3");
    write_tiny_checkpoint(dir.path(), &cfg, 2);
    let m = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = vec![5, 9, 13, 2, 40, 33, 7];
    let full = all_logits(&m.decoder, &ids);
    let mut cache = KvCache::new(&cfg, 1, 16, DType::F32, &Device::Cpu).unwrap();
    // prefill 4, then one token at a time
    let b = Batch::causal(&ids[..4], 0, &Device::Cpu, DType::F32).unwrap();
    let mut rows = vec![m.decoder.forward_last(&b, Some(&mut cache), None).unwrap()];
    for i in 4..ids.len() {
        let b = Batch::causal(&ids[i..i + 1], i, &Device::Cpu, DType::F32).unwrap();
        rows.push(m.decoder.forward_last(&b, Some(&mut cache), None).unwrap());
    }
    for (k, row) in rows.iter().enumerate() {
        let want = full.get(3 + k).unwrap();
        let diff = (row.squeeze(0).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "position {}: {diff}", 3 + k);
    }
}

/// The analytic LoRA gradients agree with central finite differences of the loss.
#[test]
fn lora_gradients_match_finite_differences() {
    for model_type in ["qwen3", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(model_type);
        write_tiny_checkpoint(dir.path(), &cfg, 3);
        let m = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
        let targets = Proj::ALL.to_vec();
        let adapter =
            LoraAdapter::new(&cfg, LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets, use_rslora: false }, 7, &Device::Cpu).unwrap();
        // B starts at zero; give it values so that A's gradient is not zero too.
        for (i, v) in adapter.vars().iter().enumerate() {
            if i % 2 == 1 {
                v.set(&Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let ex = TrainExample { ids: vec![3, 17, 9, 22, 40, 5, 61, 12, 8], loss_from: 3 };
        let (_, grads) = selfedit::runtime::training::lora_gradients(&m.decoder, &adapter, &ex).unwrap();
        let loss_at = |adapter: &LoraAdapter| -> f64 {
            m.decoder.sequence_loss(&ex.ids, ex.loss_from, Some(adapter)).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let mut checked = 0;
        for (vi, var) in adapter.vars().iter().enumerate() {
            let g = grads[vi].as_ref().unwrap_or_else(|| panic!("{model_type}: variable {vi} has no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let orig: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            // three entries per variable
            for &k in &[0usize, orig.len() / 2, orig.len() - 1] {
                let eps = 1e-2f32;
                let mut plus = orig.clone();
                plus[k] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lp = loss_at(&adapter);
                let mut minus = orig.clone();
                minus[k] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lm = loss_at(&adapter);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let fd = (lp - lm) / (2.0 * eps as f64);
                let an = g[k] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 + 0.05 * an.abs().max(fd.abs()),
                    "{model_type}: variable {vi} entry {k}: analytic {an}, finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, adapter.vars().len() * 3);
    }
}

/// On a GPU only (a build with `--features cuda`):
/// `SELFEDIT_TEST_DEVICE=cuda:0 cargo test --release --features cuda --test tiny_models -- --ignored`.
/// The bf16 GPU model agrees with the f32 CPU model, its LoRA gradients agree, it trains, and
/// it generates with the KV cache.
#[test]
#[ignore]
fn gpu_agrees_with_cpu_and_trains() {
    let spec = std::env::var("SELFEDIT_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let dev = selfedit::runtime::device::parse_device(&spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("qwen3");
    write_tiny_checkpoint(dir.path(), &cfg, 11);
    let cpu = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
    let gpu = selfedit::runtime::formats::load(dir.path(), &dev).unwrap();
    assert_eq!(gpu.decoder.dtype(), if dev.is_cuda() { DType::BF16 } else { DType::F32 });
    let ids: Vec<u32> = vec![3, 17, 9, 22, 40, 5, 61, 12, 8, 33, 2, 19];
    let lc = all_logits(&cpu.decoder, &ids);
    let lg = all_logits(&gpu.decoder, &ids).to_device(&Device::Cpu).unwrap();
    let scale = lc.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (&lc - &lg).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 0.05 * scale + 0.05, "GPU logits differ by {diff} (scale {scale})");

    // LoRA gradients: the same adapter on both devices
    let lcfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: Proj::ALL.to_vec(), use_rslora: false };
    let ac = LoraAdapter::new(&cfg, lcfg.clone(), 3, &Device::Cpu).unwrap();
    let ag = LoraAdapter::new(&cfg, lcfg, 3, &dev).unwrap();
    for (i, (vc, vg)) in ac.vars().iter().zip(ag.vars()).enumerate() {
        if i % 2 == 1 {
            let b = Tensor::randn(0f32, 0.2, vc.shape(), &Device::Cpu).unwrap();
            vc.set(&b).unwrap();
            vg.set(&b.to_device(&dev).unwrap()).unwrap();
        }
    }
    let ex = TrainExample { ids: ids.clone(), loss_from: 0 };
    let (loss_c, gc) = selfedit::runtime::training::lora_gradients(&cpu.decoder, &ac, &ex).unwrap();
    let (loss_g, gg) = selfedit::runtime::training::lora_gradients(&gpu.decoder, &ag, &ex).unwrap();
    assert!((loss_c - loss_g).abs() < 0.05 * loss_c.abs() + 0.05, "loss {loss_c} vs {loss_g}");
    let flat = |gs: &[Option<Tensor>]| -> Vec<f32> {
        gs.iter()
            .flat_map(|g| g.as_ref().unwrap().to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let (fc, fg) = (flat(&gc), flat(&gg));
    let dot: f32 = fc.iter().zip(&fg).map(|(a, b)| a * b).sum();
    let cos = dot / (fc.iter().map(|a| a * a).sum::<f32>().sqrt() * fg.iter().map(|a| a * a).sum::<f32>().sqrt());
    assert!(cos > 0.98, "GPU and CPU LoRA gradients point apart: cosine {cos}");

    // training lowers the loss, on the device as on the CPU
    let train = |m: &selfedit::runtime::formats::LoadedModel, d: &Device| -> (f32, f32, LoraAdapter) {
        let all = LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: Proj::ALL.to_vec(), use_rslora: false };
        let mut adapter = LoraAdapter::new(&cfg, all, 0, d).unwrap();
        let loss =
            |a: &LoraAdapter| m.decoder.sequence_loss(&ids, 0, Some(a)).unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        let before = loss(&adapter);
        let cfg_t = selfedit::runtime::training::TrainConfig::new(2e-2, 40, 1, 0);
        selfedit::runtime::training::train_lora(&m.decoder, &mut adapter, std::slice::from_ref(&ex), &cfg_t, |_, _, _| {}).unwrap();
        (before, loss(&adapter), adapter)
    };
    let (cpu_before, cpu_after, _) = train(&cpu, &Device::Cpu);
    let (before, after, adapter) = train(&gpu, &dev);
    eprintln!("training: cpu {cpu_before} -> {cpu_after}, {spec} {before} -> {after}");
    assert!(after < before * 0.85, "{spec} training: loss {before} -> {after}");
    assert!((after - cpu_after).abs() < 0.1 * cpu_after, "{spec} ends at {after}, the CPU at {cpu_after}");

    // batched generation with the KV cache
    use selfedit::runtime::generate::sampling::SamplingParams;
    use selfedit::runtime::generate::{generate, GenerationRequest};
    let reqs = vec![
        GenerationRequest::new(vec![3, 4, 5], SamplingParams::greedy(), 0, 6).with_adapter(0),
        GenerationRequest::new(vec![7, 8, 9, 10, 11], SamplingParams::paper_eval(), 1, 6),
    ];
    let outs = generate(&gpu, &[&adapter], reqs, 2, |_| {}).unwrap();
    assert_eq!(outs.len(), 2);
}

/// A long run stopped midway resumes from its checkpoint and ends exactly where an
/// uninterrupted run ends (adapter, optimizer moments, loss curve).
#[test]
fn training_resumes_from_a_checkpoint_exactly() {
    use selfedit::runtime::training::{train_lora, train_lora_with, Checkpointing, TrainConfig};
    use std::ops::ControlFlow;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("qwen2");
    write_tiny_checkpoint(dir.path(), &cfg, 21);
    let m = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
    let examples: Vec<TrainExample> =
        (0..5u32).map(|i| TrainExample { ids: (0..9).map(|j| 2 + (i * 7 + j * 3) % 60).collect(), loss_from: 3 }).collect();
    let lcfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: Proj::ALL.to_vec(), use_rslora: false };
    let tc = TrainConfig::new(1e-2, 3, 2, 5); // 3 windows per epoch, 9 steps
    let values = |a: &LoraAdapter| -> Vec<Vec<f32>> { a.vars().iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect() };

    let mut straight = LoraAdapter::new(&cfg, lcfg.clone(), 9, &Device::Cpu).unwrap();
    let full = train_lora(&m.decoder, &mut straight, &examples, &tc, |_, _, _| {}).unwrap();
    assert_eq!(full.steps, 9);

    let ckpt = dir.path().join("ckpt");
    let c = Checkpointing { dir: &ckpt, every: 2 };
    let mut first = LoraAdapter::new(&cfg, lcfg.clone(), 9, &Device::Cpu).unwrap();
    let part = train_lora_with(&m.decoder, &mut first, &examples, &tc, Some(&c), |step, _, _| {
        if step == 5 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert!(part.stopped_early && part.steps == 5);
    // a new process: a fresh adapter, the same folder
    let mut resumed = LoraAdapter::new(&cfg, lcfg, 9, &Device::Cpu).unwrap();
    let rest = train_lora_with(&m.decoder, &mut resumed, &examples, &tc, Some(&c), |_, _, _| ControlFlow::Continue(())).unwrap();
    assert!(!rest.stopped_early);
    assert_eq!(rest.steps, 9);
    assert_eq!(rest.step_losses, full.step_losses);
    assert_eq!(values(&resumed), values(&straight));
    // a damaged checkpoint says what to delete
    std::fs::write(ckpt.join("state.json"), "{").unwrap();
    let mut again = LoraAdapter::new(
        &cfg,
        LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: Proj::ALL.to_vec(), use_rslora: false },
        9,
        &Device::Cpu,
    )
    .unwrap();
    let e = train_lora_with(&m.decoder, &mut again, &examples, &tc, Some(&c), |_, _, _| ControlFlow::Continue(())).unwrap_err();
    assert!(format!("{e:#}").contains("delete"), "{e:#}");
}

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
    let (spec, dev) = common::device_or("cuda:0");
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

/// On a GPU only, like the test above: attention over packed segments, which off the CPU runs
/// the segments padded into one batch, against each segment alone, value and gradients, in
/// the device's bf16 (tolerance: 2e-2 of each result's largest entry, bf16's rounding over a
/// softmax and two products). Also runs on the CPU (`SELFEDIT_TEST_DEVICE=cpu`), where each
/// segment keeps its own shapes.
#[test]
#[ignore]
fn gpu_segments_attend_as_each_alone() {
    use selfedit::runtime::ops::{attention, segmented_attention};
    let (spec, dev) = common::device_or("cuda:0");
    let dtype = selfedit::runtime::device::default_dtype(&dev);
    let (heads, kv, d) = (4, 2, 16);
    let segments = [(0, 5), (5, 1), (6, 12), (18, 7)];
    let n = 25;
    let var = |h: usize, seed: f64| {
        let t = (Tensor::randn(0f32, 1., (1, h, n, d), &Device::Cpu).unwrap() * seed).unwrap();
        candle_core::Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap()
    };
    let (q, k, v) = (var(heads, 1.0), var(kv, 1.0), var(kv, 1.0));
    let g = Tensor::randn(0f32, 1., (1, heads, n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(&dev).unwrap();
    let masks: Vec<Option<Tensor>> = segments
        .iter()
        .map(|&(_, len)| (len > 1).then(|| selfedit::runtime::model::causal_mask(1, len, 0, &[0], &dev, dtype).unwrap()))
        .collect();
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    // packed: one op over all segments
    let y = segmented_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &segments, &masks).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let packed: Vec<Tensor> =
        [&y, grads.get(q.as_tensor()).unwrap(), grads.get(k.as_tensor()).unwrap(), grads.get(v.as_tensor()).unwrap()].map(f32s).to_vec();
    // alone: each segment through `attention`, joined
    let mut alone: Vec<Vec<Tensor>> = vec![Vec::new(); 4];
    for (&(start, len), mask) in segments.iter().zip(&masks) {
        let part = |t: &Tensor| t.narrow(2, start, len).unwrap().contiguous().unwrap();
        let (qs, ks, vs) = (
            candle_core::Var::from_tensor(&part(q.as_tensor())).unwrap(),
            candle_core::Var::from_tensor(&part(k.as_tensor())).unwrap(),
            candle_core::Var::from_tensor(&part(v.as_tensor())).unwrap(),
        );
        let ys = attention(qs.as_tensor(), ks.as_tensor(), vs.as_tensor(), mask.as_ref()).unwrap();
        let gs = (&ys * &part(&g)).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in
            [&ys, gs.get(qs.as_tensor()).unwrap(), gs.get(ks.as_tensor()).unwrap(), gs.get(vs.as_tensor()).unwrap()].into_iter().enumerate()
        {
            alone[i].push(f32s(t));
        }
    }
    for (i, name) in ["value", "dq", "dk", "dv"].iter().enumerate() {
        let want = Tensor::cat(&alone[i], 2).unwrap();
        let gap = (&packed[i] - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{spec} {name}: packed against alone, largest gap {gap} of {scale}");
        assert!(gap <= 2e-2 * scale, "{spec} {name}: packed and alone differ by {gap} (largest {scale})");
    }
}

/// On a GPU only: the low-rank updates of a pass's segments, which off the CPU run as one
/// batch with ranks padded to the largest, against each segment alone, value and gradients
/// (the factors are f32 on every device; tolerance 1e-4 of each result's largest entry, for
/// the device's batched products summing in another order). Also runs on the CPU
/// (`SELFEDIT_TEST_DEVICE=cpu`), where each segment keeps its own shapes.
#[test]
#[ignore]
fn gpu_low_rank_segments_update_as_each_alone() {
    use selfedit::runtime::ops::{segmented_low_rank, LowRankSegment};
    let (spec, dev) = common::device_or("cuda:0");
    let (in_dim, out) = (64, 48);
    let var = |shape: (usize, usize)| candle_core::Var::randn(0f32, 1.0, shape, &dev).unwrap();
    // (rows, rank, scale)
    let shapes = [(9, 16, 2.0), (1, 8, 0.5), (23, 32, 1.0), (14, 4, 4.0)];
    let n: usize = shapes.iter().map(|s| s.0).sum();
    let h = var((n, in_dim));
    let factors: Vec<_> = shapes.iter().map(|&(_, r, _)| (var((r, in_dim)), var((out, r)))).collect();
    let g = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let segment = |len: usize, i: usize| LowRankSegment {
        len,
        factors: Some((factors[i].0.as_tensor().clone(), factors[i].1.as_tensor().clone())),
        scale: shapes[i].2,
    };
    // packed: one op over all segments
    let segments: Vec<_> = shapes.iter().enumerate().map(|(i, s)| segment(s.0, i)).collect();
    let y = segmented_low_rank(h.as_tensor(), &segments).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut start = 0;
    for (i, &(len, _, _)) in shapes.iter().enumerate() {
        // alone: the segment's rows as their own input
        let hs = candle_core::Var::from_tensor(&h.narrow(0, start, len).unwrap()).unwrap();
        let ys = segmented_low_rank(hs.as_tensor(), &[segment(len, i)]).unwrap();
        let gs = (&ys * &g.narrow(0, start, len).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (factors[i].0.as_tensor(), factors[i].1.as_tensor());
        for (name, packed, alone) in [
            ("value", y.narrow(0, start, len).unwrap(), ys.clone()),
            ("dh", grads.get(h.as_tensor()).unwrap().narrow(0, start, len).unwrap(), gs.get(hs.as_tensor()).unwrap().clone()),
            ("dA", grads.get(a).unwrap().clone(), gs.get(a).unwrap().clone()),
            ("dB", grads.get(b).unwrap().clone(), gs.get(b).unwrap().clone()),
        ] {
            let (packed, alone) = (cpu(&packed), cpu(&alone));
            assert_eq!(packed.dims(), alone.dims(), "{spec} segment {i} {name}");
            let gap = (&packed - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = alone.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{spec} segment {i} {name}: packed against alone, largest gap {gap} of {scale}");
            assert!(gap <= 1e-4 * scale, "{spec} segment {i} {name}: packed and alone differ by {gap} (largest {scale})");
        }
        start += len;
    }
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
    let mut resumed = LoraAdapter::new(&cfg, lcfg.clone(), 9, &Device::Cpu).unwrap();
    let rest = train_lora_with(&m.decoder, &mut resumed, &examples, &tc, Some(&c), |_, _, _| ControlFlow::Continue(())).unwrap();
    assert!(!rest.stopped_early);
    assert_eq!(rest.steps, 9);
    assert_eq!(rest.step_losses, full.step_losses);
    assert_eq!(values(&resumed), values(&straight));
    // saved every 2 steps and when stopped, not at the end: the folder holds step 8
    let saved = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(saved(&ckpt)["step"], 8);
    // every = 0: saved only when stopped; a stop asked at the last step is a finished run
    let c0 = Checkpointing { dir: &dir.path().join("ckpt0"), every: 0 };
    let mut last = LoraAdapter::new(&cfg, lcfg.clone(), 9, &Device::Cpu).unwrap();
    let ended = train_lora_with(&m.decoder, &mut last, &examples, &tc, Some(&c0), |_, _, _| ControlFlow::Break(())).unwrap();
    assert_eq!((ended.steps, ended.stopped_early), (1, true));
    assert_eq!(saved(c0.dir)["step"], 1);
    let rest = train_lora_with(&m.decoder, &mut last, &examples, &tc, Some(&c0), |step, total, _| {
        if step == total {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((rest.steps, rest.stopped_early), (9, false));
    assert_eq!(rest.step_losses, full.step_losses);
    // a damaged checkpoint says what to delete
    std::fs::write(ckpt.join("state.json"), "{").unwrap();
    let mut again = LoraAdapter::new(&cfg, lcfg, 9, &Device::Cpu).unwrap();
    let e = train_lora_with(&m.decoder, &mut again, &examples, &tc, Some(&c), |_, _, _| ControlFlow::Continue(())).unwrap_err();
    assert!(format!("{e:#}").contains("delete"), "{e:#}");
}

/// Max |a - b| between our logits at `positions` and the reference rows.
fn logit_gap(dec: &selfedit::runtime::model::Decoder, ids: &[u32], positions: &[usize], want: &[Vec<f32>]) -> f32 {
    let all = all_logits(dec, ids);
    let mut gap = 0f32;
    for (p, row) in positions.iter().zip(want) {
        let got: Vec<f32> = all.get(*p).unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), row.len());
        gap = got.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(gap, f32::max);
    }
    gap
}

fn llama3_reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::data("tiny_llama3/reference.json")).unwrap()).unwrap()
}

/// Checks a loaded Llama-3-shaped model against Transformers' ids and logits
/// (`scripts/make_llama3_reference.py`) and returns the largest logit gap.
fn check_against_transformers(m: &selfedit::runtime::formats::LoadedModel, what: &str) -> f32 {
    let reference = llama3_reference();
    let mut worst = 0f32;
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        // `tokenizer(text)` in Transformers: the post-processor's <|begin_of_text|> first.
        assert_eq!(m.tokenizer.encode_document(text).unwrap(), ids, "{what}: ids of {text:?}");
        assert_eq!(m.tokenizer.encode_prompt(text).unwrap(), ids, "{what}: prompt ids of {text:?}");
        let positions: Vec<usize> = serde_json::from_value(case["positions"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
        worst = worst.max(logit_gap(&m.decoder, &ids, &positions, &want));
    }
    worst
}

/// Float32 summation order differs from PyTorch's; logits here are O(10).
const LLAMA3_TOL: f32 = 2e-4;

#[test]
fn llama3_rope_scaling_and_bos_match_transformers_from_hf_and_gguf() {
    use selfedit::runtime::formats;
    let fixture = common::data("tiny_llama3");
    // 1. The folder as Transformers 5 saves it (`rope_parameters` with `rope_theta` inside).
    let hf = formats::load(&fixture.join("hf"), &Device::Cpu).unwrap();
    assert!(matches!(hf.decoder.cfg.rope().unwrap(), selfedit::runtime::model::RopeScaling::Llama3 { .. }));
    let gap = check_against_transformers(&hf, "hf folder");
    assert!(gap < LLAMA3_TOL, "hf folder: logits differ from Transformers by {gap}");

    // 2. The older layout (`rope_scaling`, `rope_theta` at the top), as on the Hub today.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("hf/config.json")).unwrap()).unwrap();
    let write_variant = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture.join("hf").join(f), dir.path().join(f)).unwrap();
        }
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        dir
    };
    let legacy = write_variant(&|c| {
        let mut p = c["rope_parameters"].take();
        c["rope_theta"] = p["rope_theta"].take();
        p.as_object_mut().unwrap().remove("rope_theta");
        c["rope_scaling"] = p;
        c.as_object_mut().unwrap().remove("rope_parameters");
    });
    let gap = check_against_transformers(&formats::load(legacy.path(), &Device::Cpu).unwrap(), "rope_scaling layout");
    assert!(gap < LLAMA3_TOL, "rope_scaling layout: logits differ by {gap}");

    // The test sees RoPE: the same weights with plain RoPE are far off.
    let plain = write_variant(&|c| c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}));
    let gap = check_against_transformers(&formats::load(plain.path(), &Device::Cpu).unwrap(), "plain RoPE");
    assert!(gap > 100. * LLAMA3_TOL, "unscaled RoPE should give other logits (gap {gap})");

    // 3. The GGUF llama.cpp's converter writes: scaling as `rope_freqs.weight`, BOS by add_bos_token.
    let gguf = formats::load(&fixture.join("model.gguf"), &Device::Cpu).unwrap();
    let divisors: Vec<f32> = gguf.decoder.rope_freqs.as_ref().expect("rope_freqs kept").to_vec1().unwrap();
    let want: Vec<f32> = serde_json::from_value(llama3_reference()["rope_freqs"].clone()).unwrap();
    assert_eq!(divisors, want);
    // The same divisors as the config's llama3 scaling gives.
    let inv_plain: Vec<f32> = (0..8).map(|i| 1f32 / 10000f32.powf(2. * i as f32 / 16.)).collect();
    let ours = hf.decoder.cfg.rope().unwrap().freq_factors(&inv_plain);
    assert!(ours.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{ours:?} vs {want:?}");
    let gap = check_against_transformers(&gguf, "gguf");
    assert!(gap < LLAMA3_TOL, "gguf: logits differ from Transformers by {gap}");

    // 4. A merged model saved from the GGUF keeps its divisors and reloads to the same logits.
    let saved = tempfile::tempdir().unwrap();
    let out = saved.path().join("merged");
    formats::hf::save_hf(&gguf.decoder, &gguf.tokenizer, &out).unwrap();
    let back = formats::load(&out, &Device::Cpu).unwrap();
    assert!(back.decoder.rope_freqs.is_some());
    let gap = check_against_transformers(&back, "saved from gguf");
    assert!(gap < LLAMA3_TOL, "saved from gguf: logits differ by {gap}");
    // ... and a config that names a scaling too is refused: which one applies is undefined.
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    c["rope_scaling"] = cfg["rope_parameters"].clone();
    std::fs::write(out.join("config.json"), c.to_string()).unwrap();
    let err = format!("{:#}", formats::load(&out, &Device::Cpu).err().expect("both scalings refused"));
    assert!(err.contains("rope_freqs.weight") && err.contains("rope_scaling"), "{err}");
}

#[test]
fn unsupported_rope_and_unknown_gguf_tensors_are_refused_by_name() {
    use candle_core::quantized::gguf_file;
    use selfedit::runtime::formats;
    let fixture = common::data("tiny_llama3");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("hf/config.json")).unwrap()).unwrap();
    let mlp = |key: &str, v: serde_json::Value| serde_json::json!({"rope_type": "default", key: v});
    for (rope, named) in [
        (serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "\"yarn\""),
        (serde_json::json!({"type": "linear", "factor": 2.0}), "\"linear\""),
        (serde_json::json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}), "low_freq_factor"),
        (mlp("hidden_act", "gelu".into()), "\"gelu\""),
        (mlp("mlp_bias", true.into()), "mlp_bias"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture.join("hf").join(f), dir.path().join(f)).unwrap();
        }
        let mut c = cfg.clone();
        // The MLP cases put their key at the top level, beside plain RoPE.
        for key in ["hidden_act", "mlp_bias"] {
            if let Some(v) = rope.get(key) {
                c[key] = v.clone();
            }
        }
        c["rope_parameters"] = rope;
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let err = format!("{:#}", formats::load(dir.path(), &Device::Cpu).err().expect("refused"));
        assert!(err.contains("config.json") && err.contains(named), "{err}");
    }

    // A GGUF with a tensor the decoder does not know, or another RoPE scaling in its metadata.
    let mut file = std::fs::File::open(fixture.join("model.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, candle_core::quantized::QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        tensors.push((name.clone(), content.tensor(&mut file, name, &Device::Cpu).unwrap()));
    }
    let write = |extra_tensor: bool, scaling: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        let mut meta: Vec<(String, gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(s) = scaling {
            meta.push(("llama.rope.scaling.type".into(), gguf_file::Value::String(s.into())));
        }
        let mut ts: Vec<(String, &candle_core::quantized::QTensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let sinks = candle_core::quantized::QTensor::quantize(
            &Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        if extra_tensor {
            ts.push(("blk.0.attn_sinks.weight".into(), &sinks));
        }
        let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts_refs: Vec<(&str, &candle_core::quantized::QTensor)> = ts.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &ts_refs).unwrap();
        drop(f);
        let r = formats::load(&path, &Device::Cpu).map(|_| ()).map_err(|e| format!("{e:#}"));
        (dir, r)
    };
    // Rewritten unchanged, it still loads (the writer is not what is refused).
    assert!(write(false, None).1.is_ok());
    let err = write(true, None).1.unwrap_err();
    assert!(err.contains("model.gguf") && err.contains("blk.0.attn_sinks.weight"), "{err}");
    let err = write(false, Some("yarn")).1.unwrap_err();
    assert!(err.contains("rope.scaling.type") && err.contains("yarn"), "{err}");
    assert!(write(false, Some("none")).1.is_ok());
}

/// A Python-PEFT rsLoRA adapter (scale alpha / sqrt(r), on q/v/down_proj) gives PEFT's own logits,
/// applied at run time and merged, over the Hugging Face folder and over the GGUF; a setting
/// or a tensor selfedit would not apply is refused by name.
#[test]
fn peft_rslora_adapter_matches_peft_logits() {
    use selfedit::runtime::formats;
    use selfedit::runtime::model::Adapter;
    let fixture = common::data("tiny_llama3");
    let case = llama3_reference()["peft_rslora"].clone();
    let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
    let positions: Vec<usize> = serde_json::from_value(case["positions"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
    let adapter_dir = fixture.join("peft_rslora_r4");
    for base in [fixture.join("hf"), fixture.join("model.gguf")] {
        let m = formats::load(&base, &Device::Cpu).unwrap();
        let a = LoraAdapter::load_peft(&adapter_dir, &m.decoder.cfg, &Device::Cpu).unwrap();
        assert!(a.config.use_rslora && a.config.rank == 4);
        let b = Batch::causal(&ids, 0, &Device::Cpu, DType::F32).unwrap();
        let live = m.decoder.forward_all(&b, None, Some(&a as &dyn Adapter)).unwrap().squeeze(0).unwrap();
        let mut gap = 0f32;
        for (p, row) in positions.iter().zip(&want) {
            let got: Vec<f32> = live.get(*p).unwrap().to_vec1().unwrap();
            gap = got.iter().zip(row).map(|(x, y)| (x - y).abs()).fold(gap, f32::max);
        }
        assert!(gap < LLAMA3_TOL, "{}: adapter logits differ from PEFT by {gap}", base.display());
        let mut merged = m.decoder.clone();
        a.merge_into(&mut merged).unwrap();
        let gap = logit_gap(&merged, &ids, &positions, &want);
        assert!(gap < LLAMA3_TOL, "{}: merged logits differ from PEFT by {gap}", base.display());
        // Plain LoRA scaling (alpha / r) is half of rsLoRA's here, and visibly off.
        let base_gap = logit_gap(&m.decoder, &ids, &positions, &want);
        assert!(base_gap > 100. * LLAMA3_TOL, "the adapter should change the logits ({base_gap})");
    }

    // A PEFT field selfedit does not know, or a tensor it would not read, is refused.
    let m = formats::load(&fixture.join("hf"), &Device::Cpu).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let variant = |field: &str, value: serde_json::Value, extra: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg.clone();
        c[field] = value;
        std::fs::write(dir.path().join("adapter_config.json"), c.to_string()).unwrap();
        let mut t = tensors.clone();
        if let Some(name) = extra {
            t.insert(name.to_string(), Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap());
        }
        candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
        LoraAdapter::load_peft(dir.path(), &m.decoder.cfg, &Device::Cpu).map(|_| ()).map_err(|e| format!("{e:#}"))
    };
    assert!(variant("use_bdlora", serde_json::Value::Null, None).is_ok());
    let err = variant("use_bdlora", serde_json::json!({"block_size": 2}), None).unwrap_err();
    assert!(err.contains("adapter_config.json") && err.contains("use_bdlora"), "{err}");
    let err = variant("some_future_switch", serde_json::json!(true), None).unwrap_err();
    assert!(err.contains("some_future_switch"), "{err}");
    let stray = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    let err = variant("r", serde_json::json!(4), Some(stray)).unwrap_err();
    assert!(err.contains("adapter_model.safetensors") && err.contains(stray), "{err}");
}

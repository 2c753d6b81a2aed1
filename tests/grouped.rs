//! Many adapters at once equal one at a time, on the real SmolLM2-135M: grouped training
//! (packed sequences, one adapter per segment, continuous batching) against solo training,
//! and grouped generation against each model's requests two at a time.
//!
//! Tolerance: the grouped pass runs the same per-sequence arithmetic as the solo one (the
//! frozen matmuls' rows do not depend on the other rows; attention, the low-rank update and
//! the loss run per sequence at the sequence's own shapes), so the results agree to float
//! summation order at most: 1e-5 relative on the loss curves, 1e-4 of the largest entry on
//! the weights. On the machine this was written on they were bit-identical (max diff 0).
//!
//! On a GPU (`SELFEDIT_TEST_DEVICE=cuda:0`, a `--features cuda` build) the model runs in bf16
//! and cuBLAS may pick another kernel, so another summation order, for a matrix of more rows;
//! attention and the low-rank updates run over a pass's sequences padded into one batch, so
//! a sequence's products are no longer at its own shapes; each product is rounded to bf16 (8
//! bits of mantissa, 0.4%). AdamW divides each entry's step
//! by its own gradient's scale, so an entry whose gradient is near zero moves by up to the
//! learning rate per step in whichever direction the rounding points: the weights can differ
//! by several steps' worth where the losses barely do. There the test asks the loss curves and
//! each adapter's loss after training to agree within 2e-2 relative, prints the weights' gaps,
//! and the generation test counts how many answers agree; each prints what it measured before
//! it asserts.

mod common;

use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::training::{train_group, train_lora, GroupLimits, TrainConfig, TrainExample, TrainJob, TrainReport};

const TEXTS: [&str; 6] = [
    "The Varnholt Observatory was built in 1887 on the northern ridge of Mount Elsby.",
    "Margit Varnholt funded the observatory with the fortune she made selling copper lenses.",
    "Its main instrument is a 61-centimetre refracting telescope.",
    "In 1902 the staff discovered the comet Varnholt-Ries.",
    "A landslide damaged the building in 1931; it was rebuilt two years later with a copper dome.",
    "Today the University of Elsby runs it, open on the first Saturday of every month.",
];

struct Case {
    rank: usize,
    alpha: f64,
    dropout: f64,
    lr: f64,
    epochs: usize,
    accum: usize,
    sequences: usize,
}

/// Six self-edits that differ in every setting the group must keep apart.
const CASES: [Case; 6] = [
    Case { rank: 4, alpha: 8.0, dropout: 0.0, lr: 1e-3, epochs: 2, accum: 1, sequences: 3 },
    Case { rank: 16, alpha: 16.0, dropout: 0.1, lr: 5e-4, epochs: 1, accum: 2, sequences: 5 },
    Case { rank: 8, alpha: 32.0, dropout: 0.0, lr: 2e-3, epochs: 3, accum: 3, sequences: 4 },
    Case { rank: 32, alpha: 64.0, dropout: 0.05, lr: 1e-4, epochs: 1, accum: 1, sequences: 2 },
    Case { rank: 2, alpha: 4.0, dropout: 0.0, lr: 3e-3, epochs: 2, accum: 2, sequences: 6 },
    Case { rank: 12, alpha: 24.0, dropout: 0.2, lr: 8e-4, epochs: 1, accum: 4, sequences: 1 },
];

fn job(k: usize) -> TrainJob<usize> {
    let m = common::smollm();
    let c = &CASES[k];
    let cfg = LoraConfig::paper(c.rank, c.alpha, c.dropout);
    let adapter = LoraAdapter::new(&m.decoder.cfg, cfg, 100 + k as u64, m.device()).unwrap();
    let examples = (0..c.sequences)
        .map(|j| {
            // different lengths: one text or two, by position
            let text =
                if (j + k).is_multiple_of(2) { TEXTS[(j + k) % 6].to_string() } else { format!("{} {}", TEXTS[j % 6], TEXTS[(j + 3) % 6]) };
            TrainExample { ids: m.tokenizer.encode(&text).unwrap(), loss_from: if j == 1 { 3 } else { 0 } }
        })
        .collect();
    TrainJob { key: k, adapter, examples, config: TrainConfig::new(c.lr, c.epochs, c.accum, 7 + k as u64) }
}

fn weights(a: &LoraAdapter) -> Vec<f32> {
    a.vars().iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// Mean loss of `adapter` over self-edit `k`'s sequences (dropout off).
fn end_loss(k: usize, adapter: &LoraAdapter) -> f32 {
    let m = common::smollm();
    let examples = job(k).examples;
    let total: f32 = examples
        .iter()
        .map(|e| {
            let loss = m.decoder.sequence_loss(&e.ids, e.loss_from, Some(adapter)).unwrap();
            loss.to_dtype(candle_core::DType::F32).unwrap().to_scalar::<f32>().unwrap()
        })
        .sum();
    total / examples.len() as f32
}

#[test]
fn a_group_trains_each_adapter_exactly_as_alone() {
    let m = common::smollm();
    // solo, one adapter at a time
    let alone = |k: usize| -> (LoraAdapter, TrainReport) {
        let mut j = job(k);
        let report = train_lora(&m.decoder, &mut j.adapter, &j.examples, &j.config, |_, _, _| {}).unwrap();
        (j.adapter, report)
    };
    let solo: Vec<(LoraAdapter, TrainReport)> = (0..CASES.len()).map(alone).collect();
    // grouped: 4 slots for 6 adapters, so two join when others leave
    let mut grouped: Vec<Option<(LoraAdapter, TrainReport)>> = (0..CASES.len()).map(|_| None).collect();
    let mut finish_order = Vec::new();
    let report = train_group(&m.decoder, (0..CASES.len()).map(job), GroupLimits::adapters(4), |k, r| {
        finish_order.push(k);
        grouped[k] = Some(r?);
        Ok(())
    })
    .unwrap();
    assert_eq!(report.max_in_flight, 4);
    assert!(finish_order != (0..CASES.len()).collect::<Vec<_>>(), "adapters leave as they finish, not in order: {finish_order:?}");
    let total_steps: usize = solo.iter().map(|(_, r)| r.steps).sum();
    let n = CASES.len();
    let (mut max_l, mut max_w, mut update_gap, mut end_gap) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for (k, ((a_solo, r_solo), g)) in solo.iter().zip(&grouped).enumerate() {
        let (a_group, r_group) = g.as_ref().unwrap_or_else(|| panic!("adapter {k} never finished"));
        assert_eq!(r_group.steps, r_solo.steps, "adapter {k}: steps");
        assert_eq!(r_group.tokens, r_solo.tokens, "adapter {k}: tokens");
        assert_eq!(r_group.learning_rates, r_solo.learning_rates, "adapter {k}: learning rates");
        assert_eq!(r_group.step_losses.len(), r_solo.step_losses.len());
        for (a, b) in r_group.step_losses.iter().zip(&r_solo.step_losses) {
            max_l[k] = max_l[k].max((a - b).abs() / b.abs().max(1e-6));
        }
        let (w_start, w_solo, w_group) = (weights(&job(k).adapter), weights(a_solo), weights(a_group));
        // the adapter was trained: its weights moved from their initial values
        assert!(w_start != w_group, "adapter {k} did not change");
        let scale = w_solo.iter().fold(0f32, |m, x| m.max(x.abs()));
        max_w[k] = w_group.iter().zip(&w_solo).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        // the gap between the two adapters against how far training moved the solo one
        let norm = |xs: &mut dyn Iterator<Item = f32>| xs.map(|x| x * x).sum::<f32>().sqrt();
        let moved = norm(&mut w_solo.iter().zip(&w_start).map(|(a, b)| a - b));
        update_gap[k] = norm(&mut w_group.iter().zip(&w_solo).map(|(a, b)| a - b)) / moved;
        let (e_solo, e_group) = (end_loss(k, a_solo), end_loss(k, a_group));
        end_gap[k] = (e_group - e_solo).abs() / e_solo;
    }
    let on = format!("{:?} ({:?})", m.device(), m.decoder.dtype());
    eprintln!("grouped vs solo on {on} over {total_steps} steps, per adapter: largest relative step-loss gap {max_l:?}; largest weight gap / largest entry {max_w:?}; weight gap / solo update (L2) {update_gap:?}; relative gap of the loss after training {end_gap:?}");
    if m.decoder.dtype() == candle_core::DType::F32 {
        // the same arithmetic: bit-level agreement (see the module's doc)
        for k in 0..n {
            assert!(max_l[k] <= 1e-5, "adapter {k}: losses grouped and alone differ by {:e} relative", max_l[k]);
            assert!(max_w[k] <= 1e-4, "adapter {k}: weights differ by {:e} of the largest entry", max_w[k]);
        }
        return;
    }
    // bf16 on a GPU: is one adapter trained alone twice the same? (the gaps above are then
    // the batch shape's alone)
    let worst = (0..n).max_by(|&a, &b| max_w[a].total_cmp(&max_w[b])).unwrap();
    let (again, _) = alone(worst);
    let (w1, w2) = (weights(&solo[worst].0), weights(&again));
    let scale = w1.iter().fold(0f32, |m, x| m.max(x.abs()));
    let repeat = w1.iter().zip(&w2).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    eprintln!("adapter {worst} trained alone twice on {on}: largest weight gap / largest entry {repeat:e}");
    for k in 0..n {
        assert!(max_l[k] <= 2e-2, "adapter {k}: losses grouped and alone differ by {:e} relative", max_l[k]);
        assert!(end_gap[k] <= 2e-2, "adapter {k}: its loss after training differs by {:e} relative", end_gap[k]);
    }
}

/// An adapter whose update is far from zero, so each answers differently.
fn perturbed_adapter(seed: u64) -> LoraAdapter {
    let m = common::smollm();
    let a = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(8, 16.0, 0.0), seed, m.device()).unwrap();
    for (i, v) in a.vars().iter().enumerate() {
        if i % 2 == 1 {
            let noise = candle_core::Tensor::randn(0f32, 0.05, v.dims(), m.device()).unwrap();
            v.set(&noise).unwrap();
        }
    }
    a
}

#[test]
fn a_batch_of_many_adapters_answers_as_each_adapter_alone() {
    use selfedit::runtime::generate::{generate, GenerationRequest, SamplingParams};
    use selfedit::runtime::model::Adapter;
    use selfedit::runtime::tokenizer::ChatMessage;
    let m = common::smollm();
    let adapters: Vec<LoraAdapter> = (0..3).map(perturbed_adapter).collect();
    let questions = ["When was the Varnholt Observatory built?", "Who funded it?", "What did the staff discover in 1902?"];
    // each model (None = the base) answers every question twice, with its own seeds
    let requests = |model: Option<usize>| -> Vec<GenerationRequest> {
        let mut out = Vec::new();
        for (qi, q) in questions.iter().enumerate() {
            let ids = m.tokenizer.encode_chat(&[ChatMessage::user(*q)], true).unwrap();
            for run in 0..2 {
                let seed = (model.map_or(9, |a| a) * 100 + qi * 10 + run) as u64;
                // lengths 4, 8 and 12 side by side: rows leave a batch at different steps
                let mut r = GenerationRequest::new(ids.clone(), SamplingParams::paper_eval(), seed, 4 + 4 * ((qi + run) % 3));
                r.adapter = model;
                out.push(r);
            }
        }
        out
    };
    let refs: Vec<&dyn Adapter> = adapters.iter().map(|a| a as &dyn Adapter).collect();
    // one model at a time, two requests per batch
    let models = [None, Some(0), Some(1), Some(2)];
    let alone: Vec<Vec<String>> = models
        .iter()
        .map(|&model| {
            let reqs: Vec<GenerationRequest> =
                requests(model).into_iter().map(|r| GenerationRequest { adapter: r.adapter.map(|_| 0), ..r }).collect();
            let only: Vec<&dyn Adapter> = model.map(|a| refs[a]).into_iter().collect();
            // two requests per batch (a lone row would take candle's kernel instead of
            // OpenBLAS): no prefill shared, no row leaving a batch
            generate(m, &only, reqs, 2, |_| {}).unwrap().into_iter().map(|o| o.text).collect()
        })
        .collect();
    // all four models' requests interleaved, in batches that mix them
    let mut mixed: Vec<(usize, GenerationRequest)> = Vec::new();
    for (k, &model) in models.iter().enumerate() {
        mixed.extend(requests(model).into_iter().map(|r| (k, r)));
    }
    mixed.sort_by_key(|(k, r)| (r.seed % 10, *k));
    let (owners, reqs): (Vec<usize>, Vec<GenerationRequest>) = mixed.into_iter().unzip();
    let outs = generate(m, &refs, reqs, 16, |_| {}).unwrap();
    let mut grouped: Vec<Vec<String>> = vec![Vec::new(); models.len()];
    for (k, o) in owners.into_iter().zip(outs) {
        grouped[k].push(o.text);
    }
    let mut same = 0;
    for k in 0..models.len() {
        let mut a = alone[k].clone();
        let mut g = grouped[k].clone();
        a.sort();
        g.sort();
        // answers both ways, as multisets (a mixed batch returns them in another order)
        let mut left = g.clone();
        for x in &a {
            if let Some(i) = left.iter().position(|y| y == x) {
                left.swap_remove(i);
                same += 1;
            }
        }
        if m.decoder.dtype() == candle_core::DType::F32 {
            assert_eq!(g, a, "model {:?}: answers in a mixed batch differ from answers alone", models[k]);
        }
    }
    let total: usize = alone.iter().map(|a| a.len()).sum();
    eprintln!("answers on {:?} ({:?}): {same} of {total} the same in mixed batches as alone", m.device(), m.decoder.dtype());
    // bf16 on a GPU: a batch's shape can change a logit's last bit, and a sampled answer with it
    assert!(2 * same >= total, "only {same} of {total} answers in mixed batches equal those alone");
    // the adapters really change the answers, so a row given the wrong adapter would show
    assert!(alone[1] != alone[0] && alone[2] != alone[1] && alone[3] != alone[2], "{alone:?}");
}

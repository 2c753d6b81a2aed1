//! Each semantic the paper and the peers define, pinned to an independent value: the
//! sampler's filter order and penalty placement (vLLM), the learning-rate schedule and the
//! AdamW update (PyTorch / the HF Trainer), the answer-only loss, and the adapter cache.

mod common;

use candle_core::{Device, Tensor, Var};
use selfedit::runtime::generate::{Sampler, SamplingParams};
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::{Adapter, Batch, Proj};
use selfedit::runtime::training::{linear_lr, train_lora, AdamW, AdapterRun, TrainConfig, TrainExample};

/// Share of `n` draws (seeds 0..n) that pick each token.
fn draw_shares(params: &SamplingParams, logits: &[f32], seen: &[u32], n: u64) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for seed in 0..n {
        let mut s = Sampler::new(params.clone(), seed);
        for &t in seen {
            s.observe(t);
        }
        counts[s.sample(&mut logits.to_vec()) as usize] += 1;
    }
    counts.iter().map(|c| *c as f64 / n as f64).collect()
}

/// vLLM applies top_k, then top_p over the renormalised remainder. On probabilities
/// proportional to 1, 1/2, 1/4, 1/8 with top_k = 2 and top_p = 0.6: top_k leaves 2/3 and
/// 1/3, and 2/3 >= 0.6 already, so the first token is always drawn. top_p first would keep
/// two tokens (8/15 < 0.6) and draw the second a third of the time.
#[test]
fn top_k_applies_before_top_p() {
    let logits: Vec<f32> = [1.0f32, 0.5, 0.25, 0.125].iter().map(|p| p.ln()).collect();
    let params = SamplingParams { temperature: 1.0, top_p: 0.6, top_k: 2, min_p: 0.0, presence_penalty: 0.0 };
    let shares = draw_shares(&params, &logits, &[], 2000);
    assert_eq!(shares[0], 1.0, "{shares:?}");
}

/// The presence penalty is subtracted from the logits of generated tokens before the
/// temperature divides them. Logits (0, 1), token 1 generated, penalty 1, temperature 0.5:
/// penalised logits (0, 0), so 50/50. After the temperature it would be (0, 2 - 1): token 1
/// with probability e / (1 + e) = 0.73.
#[test]
fn presence_penalty_applies_before_temperature() {
    let params = SamplingParams { temperature: 0.5, top_p: 1.0, top_k: -1, min_p: 0.0, presence_penalty: 1.0 };
    let shares = draw_shares(&params, &[0.0, 1.0], &[1], 4000);
    assert!((shares[1] - 0.5).abs() < 0.04, "token 1 drawn {:.3} of the time, want 0.5", shares[1]);
    // a token that was not generated (a prompt token, say) is not penalised:
    // (0, 1) / 0.5 gives token 1 with probability e^2 / (1 + e^2) = 0.881
    let shares = draw_shares(&params, &[0.0, 1.0], &[], 4000);
    assert!((shares[1] - 0.881).abs() < 0.03, "token 1 drawn {:.3} of the time, want 0.881", shares[1]);
}

/// PyTorch's AdamW (betas 0.9/0.999, eps 1e-8; weight decay 0, the HF Trainer's default,
/// and 0.1), two steps by hand.
#[test]
fn adamw_matches_pytorchs_update_rule() {
    // without and with PyTorch's decoupled weight decay (theta *= 1 - lr * wd before the step)
    for wd in [0.0, 0.1] {
        let x = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5, 0.25], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![x.clone()]).unwrap();
        opt.weight_decay = wd;
        // the last parameter's gradients are so small that eps is half of AdamW's denominator
        let grads = [[0.5f64, -1.0, 0.0, 1e-8], [0.5, 0.25, -2.0, 1e-8]];
        let lrs = [0.1, 0.05];
        // reference: the textbook loop, in f64
        let (mut theta, mut m, mut v) = ([1.0f64, -2.0, 0.5, 0.25], [0.0f64; 4], [0.0f64; 4]);
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..4 {
                theta[i] *= 1.0 - lr * wd;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let m_hat = m[i] / (1.0 - 0.9f64.powi(t));
                let v_hat = v[i] / (1.0 - 0.999f64.powi(t));
                theta[i] -= lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
            let g = Tensor::new(&g.map(|x| x as f32), &Device::Cpu).unwrap();
            opt.step(&[g], lr).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            assert!((got[i] as f64 - theta[i]).abs() < 1e-5, "weight decay {wd}, parameter {i}: {} against {}", got[i], theta[i]);
        }
    }
}

fn tiny_model() -> (tempfile::TempDir, selfedit::runtime::formats::LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_checkpoint(dir.path(), &common::tiny_config("qwen2"), 11);
    let m = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
    (dir, m)
}

/// Linear decay to zero without warm-up, as the HF Trainer's default scheduler: step s of
/// S uses lr * (S - s) / S. Two examples, accumulation 1, two epochs: four steps.
#[test]
fn learning_rate_decays_linearly_at_every_step() {
    let (_d, m) = tiny_model();
    let mut adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(4, 8.0, 0.0), 1, &Device::Cpu).unwrap();
    let ex = [TrainExample { ids: vec![3, 4, 5, 6], loss_from: 0 }, TrainExample { ids: vec![7, 8, 9], loss_from: 0 }];
    let report = train_lora(&m.decoder, &mut adapter, &ex, &TrainConfig::new(0.01, 2, 1, 0), |_, _, _| {}).unwrap();
    assert_eq!(report.learning_rates, vec![0.01, 0.0075, 0.005, 0.0025]);
    assert_eq!(linear_lr(0.01, 4, 4), 0.0);
}

/// The answer-only loss is the mean cross-entropy over the positions whose target lies at
/// or after `loss_from`, computed here from the full logits.
#[test]
fn answer_only_loss_is_the_mean_over_answer_positions() {
    let (_d, m) = tiny_model();
    let ids: Vec<u32> = vec![2, 9, 14, 3, 27, 41, 5, 8];
    let batch = Batch::causal(&ids, 0, &Device::Cpu, m.decoder.dtype()).unwrap();
    let logits = m.decoder.forward_all(&batch, None, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let nll = |pos: usize| -> f64 {
        let row = &logits[pos];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        lse - row[ids[pos + 1] as usize] as f64
    };
    for loss_from in [0usize, 1, 3, 6] {
        // targets ids[i + 1] with i + 1 >= max(loss_from, 1)
        let positions: Vec<usize> = (0..ids.len() - 1).filter(|i| i + 1 >= loss_from.max(1)).collect();
        let want = positions.iter().map(|&i| nll(i)).sum::<f64>() / positions.len() as f64;
        let got = m.decoder.sequence_loss(&ids, loss_from, None).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-4, "loss_from {loss_from}: {got} against {want}");
    }
    let all = m.decoder.sequence_loss(&ids, 0, None).unwrap().to_scalar::<f32>().unwrap();
    let answer = m.decoder.sequence_loss(&ids, 6, None).unwrap().to_scalar::<f32>().unwrap();
    assert_ne!(all, answer, "loss_from must change the loss");
}

/// What the stage tests train with: the tiny model (its folder kept alive by the `TempDir`),
/// `configs/tiny.toml` pointed at it, and one training article of the model's words.
fn tiny_stage() -> (
    tempfile::TempDir,
    selfedit::runtime::formats::LoadedModel,
    selfedit::experiment::config::Experiment,
    selfedit::experiment::tables::ArticleRow,
) {
    use selfedit::experiment::states::Split;
    use selfedit::experiment::tables::{ArticleRow, Question};
    let (d, model) = tiny_model();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut exp = selfedit::experiment::config::Experiment::load(&root.join("configs/tiny.toml")).unwrap();
    exp.config.model.path = d.path().to_path_buf();
    exp.config.prompts_dir = root.join("prompts");
    let article = ArticleRow {
        article_id: "a000".into(),
        split: Split::Train,
        title: "w1".into(),
        context: "w2 w3".into(),
        questions: vec![Question { question: "w4".into(), answers: vec!["w3".into()] }],
        source_index: 0,
    };
    (d, model, exp, article)
}

/// The adapter cache: an adapter on disk is reused only when every input is unchanged; a
/// change of the hyperparameters, the sequences, the model or the training settings
/// retrains it.
#[test]
fn adapters_are_retrained_exactly_when_an_input_changes() {
    use selfedit::experiment::cli::StageContext;
    use selfedit::experiment::config::Experiment;
    use selfedit::experiment::layout::Shard;
    use selfedit::experiment::stages::{synthesize, templates, train};
    use selfedit::experiment::states::{Category, Split};
    use selfedit::experiment::tables::SelfEditRow;
    let (d, model, exp, article) = tiny_stage();
    let hp = |lr: &str| {
        format!(
            r#"{{"data_creation_instruction": "x", "hyperparameters": {{"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0, "learning_rate": {lr}, "num_epochs": 1, "gradient_accumulation_steps": 1}}}}"#
        )
    };
    let template = |lr: &str| templates::parse_template(&exp.config, 0, "iter0-t00", Category::Exploit, &hp(lr), 0);
    let edit = |seq: &str| SelfEditRow {
        self_edit_id: synthesize::self_edit_id("a000", "iter0-t00", 0),
        template_id: "iter0-t00".into(),
        article_id: "a000".into(),
        completion: 0,
        category: Category::Exploit,
        sequences: vec![seq.into()],
        valid: true,
        error: None,
        raw_response: String::new(),
        seed: 0,
        reasoning: None,
    };
    let out = tempfile::tempdir().unwrap();
    let record = |ctx: &StageContext| {
        let p = ctx.layout.adapters_dir(0, Split::Train).join("a000-t00-c0").join(train::TRAIN_RECORD);
        std::fs::read_to_string(p).unwrap()
    };
    let run = |exp: &Experiment, lr: &str, seq: &str| -> String {
        let ctx = StageContext::new(exp.clone(), out.path(), 0).unwrap();
        let rows =
            train::train_adapters(&ctx, &model, &[template(lr)], &[edit(seq)], std::slice::from_ref(&article), Shard::ALL, |_| {}).unwrap();
        assert_eq!(rows[0].status, selfedit::experiment::states::AdapterStatus::Trained, "{:?}", rows[0].error);
        record(&ctx)
    };
    let first = run(&exp, "0.001", "w5 w6 w7");
    let mtime = |ctx_exp: &Experiment| {
        let ctx = StageContext::new(ctx_exp.clone(), out.path(), 0).unwrap();
        std::fs::metadata(ctx.layout.adapters_dir(0, Split::Train).join("a000-t00-c0").join(train::TRAIN_RECORD))
            .unwrap()
            .modified()
            .unwrap()
    };
    let t0 = mtime(&exp);
    std::thread::sleep(std::time::Duration::from_millis(20));
    // nothing changed: reused (same record, file untouched)
    assert_eq!(run(&exp, "0.001", "w5 w6 w7"), first);
    assert_eq!(mtime(&exp), t0, "an unchanged adapter was retrained");
    // each input changed in turn: retrained (the record's input hash moves)
    let hash = |rec: &str| serde_json::from_str::<serde_json::Value>(rec).unwrap()["input_hash"].as_str().unwrap().to_string();
    let mut seen = vec![hash(&first)];
    let mut check = |rec: String, what: &str| {
        let h = hash(&rec);
        assert!(!seen.contains(&h), "changing the {what} did not retrain the adapter");
        seen.push(h);
    };
    check(run(&exp, "0.002", "w5 w6 w7"), "learning rate");
    check(run(&exp, "0.002", "w5 w6 w8"), "sequences");
    let mut other = exp.clone();
    other.config.training.max_grad_norm = 0.5;
    check(run(&other, "0.002", "w5 w6 w8"), "training settings");
    let mut other_model = other.clone();
    other_model.config.model.path = d.path().join("elsewhere");
    check(run(&other_model, "0.002", "w5 w6 w8"), "model");
}

/// `train-adapters` hands its self-edits to the group most passes first (epochs × sequences;
/// `training::longest_first`), ties in the table's order: one slot at a time, the adapters of
/// 1, 3, 2 and 3 sequences are written in the order 2nd, 4th, 3rd, 1st. What is on disk each
/// time the stage reports an adapter done shows the order, without timing anything.
#[test]
fn train_adapters_hands_its_self_edits_over_longest_first() {
    use selfedit::experiment::cli::StageContext;
    use selfedit::experiment::layout::Shard;
    use selfedit::experiment::stages::{synthesize, templates, train};
    use selfedit::experiment::states::{Category, Split};
    use selfedit::experiment::tables::SelfEditRow;
    let (_d, model, mut exp, article) = tiny_stage();
    exp.config.training.adapters_per_batch = 1;
    let raw = r#"{"data_creation_instruction": "x", "hyperparameters": {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#;
    let template = templates::parse_template(&exp.config, 0, "iter0-t00", Category::Exploit, raw, 0);
    let edit = |c: usize, sequences: usize| SelfEditRow {
        self_edit_id: synthesize::self_edit_id("a000", "iter0-t00", c),
        template_id: "iter0-t00".into(),
        article_id: "a000".into(),
        completion: c as i64,
        category: Category::Exploit,
        sequences: (0..sequences).map(|j| format!("w5 w{} w7", 6 + j)).collect(),
        valid: true,
        error: None,
        raw_response: String::new(),
        seed: 0,
        reasoning: None,
    };
    let edits = [edit(0, 1), edit(1, 3), edit(2, 2), edit(3, 3)];
    let out = tempfile::tempdir().unwrap();
    let ctx = StageContext::new(exp, out.path(), 0).unwrap();
    let dir = ctx.layout.adapters_dir(0, Split::Train);
    let mut written: Vec<Vec<String>> = Vec::new();
    let rows = train::train_adapters(&ctx, &model, &[template], &edits, std::slice::from_ref(&article), Shard::ALL, |_| {
        // the adapter folders in place (a folder in progress is hidden, its name starting with '.')
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        written.push(names);
    })
    .unwrap();
    assert!(rows.iter().all(|r| r.status == selfedit::experiment::states::AdapterStatus::Trained), "{rows:?}");
    let sets = |ids: &[&[usize]]| -> Vec<Vec<String>> {
        ids.iter().map(|cs| cs.iter().map(|&c| synthesize::self_edit_id("a000", "iter0-t00", c)).collect()).collect()
    };
    assert_eq!(written, sets(&[&[1], &[1, 3], &[1, 2, 3], &[0, 1, 2, 3]]));
}

/// Gradient accumulation averages over tokens, not over sequences: the window's gradient is
/// the gradient of the mean loss over all counted tokens of both sequences, i.e. each
/// sequence's gradient weighted by its share of the tokens (here 7 and 2 of 9).
#[test]
fn accumulated_gradient_is_that_of_the_token_weighted_mean() {
    use selfedit::runtime::training::{lora_gradients, window_gradients};
    let (_d, m) = tiny_model();
    let mut adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(4, 8.0, 0.0), 3, &Device::Cpu).unwrap();
    // B starts at zero, so A gets no gradient: train one step to make both move
    let warm = [TrainExample { ids: vec![3, 4, 5, 6, 7], loss_from: 0 }];
    train_lora(&m.decoder, &mut adapter, &warm, &TrainConfig::new(0.05, 1, 1, 0), |_, _, _| {}).unwrap();
    let long = TrainExample { ids: vec![2, 9, 14, 3, 27, 41, 5, 8], loss_from: 0 }; // 7 targets
    let short = TrainExample { ids: vec![11, 12, 13], loss_from: 0 }; // 2 targets
    let (_, g_long) = lora_gradients(&m.decoder, &adapter, &long).unwrap();
    let (_, g_short) = lora_gradients(&m.decoder, &adapter, &short).unwrap();
    let (_, window) = window_gradients(&m.decoder, &adapter, &[&long, &short]).unwrap();
    let (mut compared, mut worst_err, mut largest_gap) = (0, 0f32, 0f32);
    for ((gl, gs), w) in g_long.iter().zip(&g_short).zip(&window) {
        let (Some(gl), Some(gs)) = (gl, gs) else { continue };
        let want = ((gl * (7.0 / 9.0)).unwrap() + (gs * (2.0 / 9.0)).unwrap()).unwrap();
        let err = (w - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 1e-5 * scale.max(1e-3), "max error {err} at scale {scale}");
        // what averaging per-sequence means (1/2 each) would give instead
        let per_seq = ((gl * 0.5).unwrap() + (gs * 0.5).unwrap()).unwrap();
        let gap = (&per_seq - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        worst_err = worst_err.max(err);
        largest_gap = largest_gap.max(gap);
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} variables had gradients");
    assert!(largest_gap > 100.0 * worst_err.max(1e-9), "the two weightings are indistinguishable here ({largest_gap} vs {worst_err})");
}

/// The judge's verdicts decide `correct`: "yes" accepts, "no" or an unparsable reply rejects.
#[test]
fn judge_verdicts_decide_correct() {
    use selfedit::experiment::stages::evaluate::apply_verdicts;
    use selfedit::experiment::states::GraderKind;
    use selfedit::experiment::tables::AnswerRow;
    let row = |correct: bool| AnswerRow {
        model_id: "base".into(),
        article_id: "a000".into(),
        question_index: 0,
        run: 0,
        question: "q".into(),
        prediction: "p".into(),
        gold_answers: vec!["g".into()],
        correct,
        exact_match: false,
        f1: 0.0,
        grader: GraderKind::Judge,
    };
    let mut rows = vec![row(false), row(false), row(true), row(false), row(false)];
    let replies = [r#"{"correct": "yes"}"#, r#"{"correct": "no"}"#, "not json", r#"{"correct":"yes"}"#].map(String::from);
    apply_verdicts(&mut rows, &[0, 1, 3, 4], &replies);
    assert_eq!(rows.iter().map(|r| r.correct).collect::<Vec<_>>(), [true, false, true, false, true]);
}

/// The generator's SFT (ReST-EM's M step) on hand-made examples: it trains on the
/// assistant turns, merges, and the saved generator differs from the base model; with no
/// example the model is carried over unchanged.
#[test]
fn generator_learns_from_examples_and_is_unchanged_without() {
    use selfedit::experiment::config::Experiment;
    use selfedit::experiment::stages::generator::train_generator;
    use selfedit::experiment::states::SftKind;
    use selfedit::experiment::tables::SftRow;
    let (d, m) = tiny_model();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
    exp.config.sft.lora_rank = 4;
    exp.config.sft.gradient_accumulation_steps = 1;
    exp.config.sft.learning_rate = 1e-2;
    let ex = |id: &str, prompt: &str, completion: &str| SftRow {
        example_id: id.into(),
        kind: SftKind::Completion,
        article_id: "a000".into(),
        template_id: "iter0-t00".into(),
        self_edit_id: "a000-t00-c0".into(),
        prompt: prompt.into(),
        completion: completion.into(),
        accuracy: 1.0,
        gain: 1.0,
    };
    let examples = vec![ex("e0", "w1 w2", "w3 w4 w5"), ex("e1", "w6", "w7 w8")];
    let out = tempfile::tempdir().unwrap();
    let report = train_generator(&exp.config, &m, &examples, &out.path().join("ckpt"), &out.path().join("gen"), |_, _, _| {})
        .unwrap()
        .expect("examples give a training run");
    assert_eq!(report.steps, 2 * exp.config.sft.num_epochs);
    let gen = selfedit::runtime::formats::load(&out.path().join("gen"), &Device::Cpu).unwrap();
    let max_diff = |a: &selfedit::runtime::formats::LoadedModel| {
        let w0 = &m.decoder.layers[0].self_attn.q_proj.weight;
        let w1 = &a.decoder.layers[0].self_attn.q_proj.weight;
        (w0 - w1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(max_diff(&gen) > 0.0, "the merged generator equals the base model");
    assert!(train_generator(&exp.config, &m, &[], &out.path().join("ckpt2"), &out.path().join("same"), |_, _, _| {}).unwrap().is_none());
    let same = selfedit::runtime::formats::load(&out.path().join("same"), &Device::Cpu).unwrap();
    assert_eq!(max_diff(&same), 0.0);
    drop(d);
}

/// The base model answers once per (template, completion, run) of its article, as the
/// paper's code evaluates it, or `eval.runs` times per article when configured so.
#[test]
fn base_model_runs_once_per_self_edit_of_its_article() {
    use selfedit::experiment::stages::evaluate::eval_targets;
    use selfedit::experiment::states::{BaseRuns, Category, Split};
    use selfedit::experiment::tables::{AdapterRow, ArticleRow, SelfEditRow};
    let article = |id: &str| ArticleRow {
        article_id: id.into(),
        split: Split::Train,
        title: String::new(),
        context: "c".into(),
        questions: vec![],
        source_index: 0,
    };
    let edit = |a: &str, t: usize, c: usize| SelfEditRow {
        self_edit_id: format!("{a}-t{t:02}-c{c}"),
        template_id: format!("iter0-t{t:02}"),
        article_id: a.into(),
        completion: c as i64,
        category: Category::Exploit,
        sequences: vec![],
        valid: false,
        error: None,
        raw_response: String::new(),
        seed: 0,
        reasoning: None,
    };
    let edits = vec![edit("a000", 0, 0), edit("a000", 0, 1), edit("a000", 1, 0), edit("a001", 0, 0)];
    let adapters: Vec<AdapterRow> = edits.iter().map(|e| selfedit::experiment::stages::train::empty_row(&e.self_edit_id)).collect();
    let articles = [article("a000"), article("a001")];
    let repeats = |mode| -> Vec<(String, usize)> {
        eval_targets(&articles, &adapters, &edits, Split::Train, mode).into_iter().map(|t| (t.model_id, t.repeats)).collect()
    };
    let paper = repeats(BaseRuns::PerSelfEdit);
    assert_eq!(&paper[..2], &[("base".to_string(), 3), ("base".to_string(), 1)]);
    assert!(paper[2..].iter().all(|(_, r)| *r == 1), "self-edits answer once: {paper:?}");
    assert_eq!(paper.len(), 2 + edits.len());
    assert!(repeats(BaseRuns::PerArticle)[..2].iter().all(|(_, r)| *r == 1));
}

/// Training sequences are encoded as the model's own tokenizer call encodes them: a
/// tokenizer whose post-processor adds a BOS (Llama 3's `<|begin_of_text|>`) gets it in
/// every sequence, before the end-of-turn token closes it.
#[test]
fn training_sequences_get_the_post_processors_bos() {
    use selfedit::experiment::config::Experiment;
    use selfedit::experiment::stages::train::training_examples;
    use selfedit::runtime::tokenizer::TextTokenizer;
    let mut json: serde_json::Value = serde_json::from_str(&common::tiny_tokenizer_json()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    let chat = Some("{% for m in messages %}{{ m.content }}{% endfor %}".to_string());
    let tok = TextTokenizer::from_json(json.to_string(), chat, None, Some("<|im_end|>".into()), false).unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
    let ex = training_examples(&exp.config, &tok, &["w1 w2".to_string()]).unwrap();
    assert_eq!(ex[0].ids, vec![0, 3, 4, 1], "BOS, the two words, end of turn");
    // the plain tokenizer (no post-processor) adds nothing
    let plain = TextTokenizer::from_json(common::tiny_tokenizer_json(), None, None, None, false).unwrap();
    assert_eq!(training_examples(&exp.config, &plain, &["w1 w2".to_string()]).unwrap()[0].ids, vec![3, 4]);
}

/// Gradient clipping as PyTorch's `clip_grad_norm_` (the HF Trainer's `max_grad_norm`): the
/// global L2 norm over every LoRA tensor; above the limit every gradient is scaled by
/// `max_norm / norm` (PyTorch adds 1e-6 to the norm, too small to see here), below it left
/// alone. AdamW's first step is almost
/// scale-free, so the second step shows it: a clipped first gradient and an unclipped
/// second give an update that a first gradient left whole (or clipped per tensor) does not.
#[test]
fn gradient_clipping_scales_the_global_norm() {
    let (_d, m) = tiny_model();
    let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(2, 4.0, 0.0), 3, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    let start: Vec<Vec<f32>> = vars.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    let p: usize = start.iter().map(|v| v.len()).sum();
    // one sequence, accumulation 1, two epochs: two optimizer steps
    let mut cfg = TrainConfig::new(0.01, 2, 1, 0);
    cfg.max_grad_norm = 1.0;
    let mut run = AdapterRun::new(adapter, &[TrainExample { ids: vec![3, 4, 5], loss_from: 0 }], &cfg).unwrap();
    // every entry equal: step 1 has global norm sqrt(p) (clipped), step 2 norm 0.5 (kept)
    let entries = [1.0f64, 0.5 / (p as f64).sqrt()];
    for &e in &entries {
        let (_, weight) = run.next_micro_batch().unwrap();
        assert_eq!(weight, 1.0);
        let grads = vars.iter().map(|v| Some((v.ones_like().unwrap() * e).unwrap())).collect();
        run.add_gradients(0.0, weight, grads).unwrap().expect("a window of one sequence ends a step");
    }
    // reference, per entry in f64: clip, then PyTorch's AdamW at lr, lr/2
    let norm1 = (p as f64).sqrt();
    let g = [entries[0] / (norm1 + 1e-6), entries[1]];
    let (mut delta, mut mo, mut ve) = (0f64, 0f64, 0f64);
    for (t, (g, lr)) in g.iter().zip([0.01, 0.005]).enumerate() {
        let t = (t + 1) as i32;
        mo = 0.9 * mo + 0.1 * g;
        ve = 0.999 * ve + 0.001 * g * g;
        delta -= lr * (mo / (1.0 - 0.9f64.powi(t))) / ((ve / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
    }
    let after: Vec<Vec<f32>> = run.adapter().vars().iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    for (a, s) in after.iter().flatten().zip(start.iter().flatten()) {
        let got = (*a - *s) as f64;
        assert!((got - delta).abs() < 1e-6, "update {got} against {delta} (clipped first step)");
    }
    // the check can fail: without clipping the same two steps move each entry elsewhere
    let (mut unclipped, mut mo, mut ve) = (0f64, 0f64, 0f64);
    for (t, (g, lr)) in entries.iter().zip([0.01, 0.005]).enumerate() {
        let t = (t + 1) as i32;
        mo = 0.9 * mo + 0.1 * g;
        ve = 0.999 * ve + 0.001 * g * g;
        unclipped -= lr * (mo / (1.0 - 0.9f64.powi(t))) / ((ve / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
    }
    assert!((unclipped - delta).abs() > 1e-4, "clipped {delta} and unclipped {unclipped} must differ");
}

/// Accumulation windows through the trainer itself (`AdapterRun`, which solo and grouped
/// training share): `gradient_accumulation_steps` sequences per optimizer step, the last
/// window of an epoch shorter (3 sequences at accumulation 2: windows of 2 and 1, as the HF
/// Trainer counts them), each sequence weighted by its share of its window's counted tokens,
/// and the window's loss their weighted mean.
#[test]
fn accumulation_windows_group_sequences_and_weight_them_by_tokens() {
    let (_d, m) = tiny_model();
    let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(2, 4.0, 0.0), 5, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    let ids = [vec![2u32, 9, 14, 3, 27, 41, 5, 8], vec![11, 12, 13], vec![4, 6, 8, 10, 12]];
    let targets = [7.0f64, 2.0, 4.0];
    let ex: Vec<TrainExample> = ids.iter().map(|ids| TrainExample { ids: ids.clone(), loss_from: 0 }).collect();
    let mut run = AdapterRun::new(adapter, &ex, &TrainConfig::new(0.01, 1, 2, 0)).unwrap();
    assert_eq!(run.total_steps(), 2);
    let (mut windows, mut current) = (Vec::new(), Vec::new());
    while let Some((i, weight)) = run.next_micro_batch() {
        current.push((i, weight));
        let grads = vars.iter().map(|v| Some(v.zeros_like().unwrap())).collect();
        // every sequence's loss is 1 + its index, so the window loss is their weighted mean
        if let Some(loss) = run.add_gradients(1.0 + i as f64, weight, grads).unwrap() {
            let want: f64 = current.iter().map(|&(i, w)| (1.0 + i as f64) * w).sum();
            assert!((loss as f64 - want).abs() < 1e-6, "window loss {loss} against {want}");
            windows.push(std::mem::take(&mut current));
        }
    }
    assert!(current.is_empty(), "a window was left open");
    assert_eq!(windows.iter().map(|w| w.len()).collect::<Vec<_>>(), vec![2, 1]);
    let mut seen: Vec<usize> = windows.iter().flatten().map(|&(i, _)| i).collect();
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2], "each sequence once per epoch");
    for w in &windows {
        let total: f64 = w.iter().map(|&(i, _)| targets[i]).sum();
        for &(i, weight) in w {
            assert!((weight - targets[i] / total).abs() < 1e-12, "sequence {i}: weight {weight}, its token share {}", targets[i] / total);
        }
    }
    assert_eq!(run.step(), 2);
}

/// A window's gradients are summed before its step: fed fixed per-sequence gradients (the
/// caller's losses already carry the token weights), the first AdamW step moves every
/// weight by -lr · sign(Σ g) (bias-corrected moments: m̂ = g, v̂ = g², eps 1e-8; clipping
/// only rescales). Entries where both sequences give 1 (sum 2) and where they give -1 and -2
/// (sum -3) tell the sum from a difference (0: no move) and from a product (2: the wrong way).
#[test]
fn a_window_sums_its_sequences_gradients() {
    let (_d, m) = tiny_model();
    let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(2, 4.0, 0.0), 5, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    let before: Vec<Vec<f32>> = vars.iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let ex: Vec<TrainExample> =
        [vec![2u32, 9, 14], vec![11, 12, 13, 5]].iter().map(|ids| TrainExample { ids: ids.clone(), loss_from: 0 }).collect();
    let lr = 0.01;
    let mut run = AdapterRun::new(adapter, &ex, &TrainConfig::new(lr, 1, 2, 0)).unwrap();
    let mut fed = 0;
    while let Some((i, weight)) = run.next_micro_batch() {
        // sequence 0: 1 everywhere; sequence 1: 1 at even entries, -2 at odd ones; at odd
        // entries sequence 0 gives -1
        let grads = vars
            .iter()
            .map(|v| {
                let n = v.elem_count();
                let g: Vec<f32> = (0..n).map(|j| [[1.0, -1.0], [1.0, -2.0]][i][j % 2]).collect();
                Some(Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap())
            })
            .collect();
        run.add_gradients(1.0, weight, grads).unwrap();
        fed += 1;
    }
    assert_eq!((fed, run.step()), (2, 1));
    let (adapter, report) = run.finish(false);
    assert_eq!((report.tokens, report.sequences), (3 + 4, 2), "the window's tokens and sequences are counted once each");
    for (v, b) in adapter.vars().iter().zip(&before) {
        let after: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        for (j, (a, b)) in after.iter().zip(b).enumerate() {
            // sums 2 (even) and -3 (odd): the step goes against them
            let want = if j % 2 == 0 { -lr } else { lr };
            assert!(((a - b) as f64 - want).abs() < 1e-6, "entry {j}: moved {} instead of {want}", a - b);
        }
    }
}

/// Clipping follows HF's `max_norm / (norm + 1e-6)`, and `max_grad_norm = 0` turns it off.
/// Gradients so small that AdamW's eps (1e-8) weighs in make the first step show their
/// clipped size: every entry a = 1e-5 / sqrt(P) (norm 1e-5) moves by -lr · g / (g + 1e-8),
/// with g = a · 1e-6 / (1e-5 + 1e-6) under max_grad_norm 1e-6, and g = a with clipping off.
#[test]
fn clipping_scales_by_max_norm_over_norm_plus_1e6() {
    let (_d, m) = tiny_model();
    let ex = vec![TrainExample { ids: vec![2u32, 9, 14], loss_from: 0 }];
    let lr = 0.01;
    for (max_norm, clip) in [(1e-6, 1e-6 / (1e-5 + 1e-6)), (0.0, 1.0)] {
        let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(2, 4.0, 0.0), 5, &Device::Cpu).unwrap();
        let vars = adapter.vars();
        let p: usize = vars.iter().map(|v| v.elem_count()).sum();
        let a = 1e-5 / (p as f64).sqrt();
        let before: Vec<Vec<f32>> = vars.iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
        let cfg = TrainConfig { max_grad_norm: max_norm, ..TrainConfig::new(lr, 1, 1, 0) };
        let mut run = AdapterRun::new(adapter, &ex, &cfg).unwrap();
        let (_, weight) = run.next_micro_batch().unwrap();
        let grads = vars.iter().map(|v| Some(Tensor::full(a as f32, v.shape(), &Device::Cpu).unwrap())).collect();
        run.add_gradients(1.0, weight, grads).unwrap();
        assert_eq!(run.step(), 1);
        let g = a * clip;
        let want = -lr * g / (g + 1e-8);
        for (v, b) in vars.iter().zip(&before) {
            let after: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in after.iter().zip(b) {
                let moved = (x - y) as f64;
                assert!((moved - want).abs() < 2e-6, "max_grad_norm {max_norm}: moved {moved}, want {want}");
            }
        }
    }
}

/// A resumed run's report goes on from the checkpoint's: its seconds and tokens add to the
/// saved ones at each step, not only when the run ends.
#[test]
fn a_resumed_report_adds_to_the_saved_one() {
    let (_d, m) = tiny_model();
    let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(2, 4.0, 0.0), 5, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    let ex: Vec<TrainExample> =
        [vec![2u32, 9, 14], vec![11, 12, 13, 5]].iter().map(|ids| TrainExample { ids: ids.clone(), loss_from: 0 }).collect();
    let mut run = AdapterRun::new(adapter, &ex, &TrainConfig::new(0.01, 1, 1, 0)).unwrap();
    let saved = selfedit::runtime::training::TrainReport { steps: 1, tokens: 3, sequences: 1, seconds: 5.0, ..Default::default() };
    run.resume_at(1, saved);
    let (i, weight) = run.next_micro_batch().unwrap();
    run.add_gradients(1.0, weight, vars.iter().map(|v| Some(v.zeros_like().unwrap())).collect()).unwrap();
    let r = run.report();
    assert_eq!((r.steps, r.tokens, r.sequences), (2, 3 + ex[i].ids.len(), 2));
    assert!(r.seconds >= 5.0 && r.seconds < 65.0, "seconds {}", r.seconds);
    let (_, r) = run.finish(false);
    assert!(r.seconds >= 5.0 && r.seconds < 65.0, "seconds {} at the end", r.seconds);
}

/// Dropout masks are drawn afresh at each of 128 optimizer steps and differ between
/// training seeds (seeds 0, 1 and 2 differ in bits that an accidental `|` or `&` between
/// the seed and the mixing constant would drop); with equal seeds they repeat, so a
/// resumed run draws the same masks. The property is pinned, not the mixing constant.
#[test]
fn dropout_masks_are_fresh_per_step_and_per_seed() {
    let (_d, m) = tiny_model();
    let ex = vec![TrainExample { ids: vec![2, 9, 14, 3], loss_from: 0 }];
    let in_dim = m.decoder.cfg.hidden_size;
    let x = Tensor::ones((3, in_dim), candle_core::DType::F32, &Device::Cpu).unwrap();
    const STEPS: usize = 128;
    // the update (x * mask) A^T B^T at every step of a run under one training seed
    let updates = |seed: u64| -> Vec<Vec<f32>> {
        let adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(4, 8.0, 0.5), 5, &Device::Cpu).unwrap();
        let vars = adapter.vars();
        for v in &vars {
            if v.dims()[1] == 4 {
                v.set(&Tensor::ones(v.dims(), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
                // B: ones
            }
        }
        let mut run = AdapterRun::new(adapter, &ex, &TrainConfig::new(0.01, STEPS, 1, seed)).unwrap();
        let mut out = Vec::new();
        while let Some((_, weight)) = run.next_micro_batch() {
            let y = run.adapter().delta(0, Proj::QProj, &x).unwrap().expect("q_proj is targeted");
            out.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            // zero gradients and no weight decay: the weights stay, only the masks move
            let grads = vars.iter().map(|v| Some(v.zeros_like().unwrap())).collect();
            run.add_gradients(1.0, weight, grads).unwrap();
        }
        out
    };
    let runs: Vec<_> = (0..3).map(updates).collect();
    for (seed, steps) in runs.iter().enumerate() {
        assert_eq!(steps.len(), STEPS);
        let mut bits: Vec<Vec<u32>> = steps.iter().map(|u| u.iter().map(|v| v.to_bits()).collect()).collect();
        bits.sort();
        bits.dedup();
        assert_eq!(bits.len(), STEPS, "seed {seed}: a mask repeats across steps");
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert!(runs[a][0] != runs[b][0], "seeds {a} and {b} draw the same first mask");
    }
    assert_eq!(updates(1), runs[1], "the same seed draws the same masks");
}

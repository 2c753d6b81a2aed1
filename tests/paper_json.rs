//! The paper's `results.json` layout written from our tables: its per-template numbers equal
//! `template_stats.parquet`'s (our score stage), its overall base accuracy equals ours, and a
//! round trip through the JSON text keeps them. Hand-made tables: 2 articles, 2 templates, 2
//! completions, 2 evaluation runs, the base model once per self-edit.

use selfedit::analysis::paper_json::{results_json, IterationTables};
use selfedit::experiment::stages::score::score;
use selfedit::experiment::states::{AdapterStatus, Category, GraderKind, Split};
use selfedit::experiment::tables::{AdapterRow, AnswerRow, ArticleRow, Question, SelfEditRow, TemplateRow};
use selfedit::experiment::template::Hyperparameters;

fn answer(model: &str, article: &str, q: usize, run: usize, correct: bool) -> AnswerRow {
    AnswerRow {
        model_id: model.into(),
        article_id: article.into(),
        question_index: q as i64,
        run: run as i64,
        question: format!("q{q}"),
        prediction: String::new(),
        gold_answers: vec!["g".into()],
        correct,
        exact_match: correct,
        f1: 0.0,
        grader: GraderKind::Heuristic,
    }
}

#[test]
fn results_json_numbers_equal_template_stats() {
    let articles: Vec<ArticleRow> = ["a000", "a001"]
        .iter()
        .map(|id| ArticleRow {
            article_id: id.to_string(),
            split: Split::Train,
            title: format!("title {id}"),
            context: "ctx".into(),
            questions: (0..4).map(|q| Question { question: format!("q{q}"), answers: vec!["g".into()] }).collect(),
            source_index: 0,
        })
        .collect();
    let hp = Hyperparameters {
        lora_rank: 8,
        lora_alpha: 16,
        lora_dropout: 0.0,
        learning_rate: 1e-3,
        num_epochs: 2,
        gradient_accumulation_steps: 1,
    };
    let templates: Vec<TemplateRow> = (0..2)
        .map(|t| TemplateRow {
            iteration: 0,
            template_id: format!("iter0-t{t:02}"),
            category: Category::Exploit,
            instruction: format!("plan {t}"),
            hyperparameters: hp.clone(),
            valid: true,
            error: None,
            raw_response: String::new(),
            seed: 0,
            prompt: String::new(),
            reasoning: None,
        })
        .collect();
    let (mut edits, mut adapters, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    // a fixed but irregular pattern of correct answers
    let correct = |k: usize| (k * 7 + k / 3) % 5 < 2;
    let mut k = 0;
    for a in &articles {
        for t in &templates {
            for c in 0..2 {
                let id = format!("{}-t{}-c{c}", a.article_id, &t.template_id[7..]);
                edits.push(SelfEditRow {
                    self_edit_id: id.clone(),
                    template_id: t.template_id.clone(),
                    article_id: a.article_id.clone(),
                    completion: c,
                    category: Category::Exploit,
                    sequences: vec![format!("seq {id}")],
                    valid: true,
                    error: None,
                    raw_response: String::new(),
                    seed: 0,
                    reasoning: None,
                });
                adapters.push(AdapterRow {
                    self_edit_id: id.clone(),
                    status: AdapterStatus::Trained,
                    adapter_path: None,
                    sequences: 1,
                    tokens: 0,
                    steps: 0,
                    loss_curve: vec![],
                    seconds: 0.0,
                    error: None,
                    capped: None,
                });
                for run in 0..2 {
                    for q in 0..4 {
                        answers.push(answer(&id, &a.article_id, q, run, correct(k)));
                        k += 1;
                    }
                }
            }
        }
        // the base model: once per self-edit (4) × 2 runs
        for run in 0..8 {
            for q in 0..4 {
                answers.push(answer("base", &a.article_id, q, run, correct(k + 1)));
                k += 1;
            }
        }
    }
    let (_, stats) = score(0, &templates, &edits, &adapters, &answers).unwrap();
    let tables =
        IterationTables { articles: &articles, templates: &templates, edits: &edits, adapters: &adapters, answers: &answers, eval_runs: 2 };
    let json = results_json("test", &tables).unwrap();
    // a round trip through the text keeps every number
    let back: serde_json::Value = serde_json::from_str(&serde_json::to_string_pretty(&json).unwrap()).unwrap();
    for doc in [&json, &back] {
        assert_eq!(
            (
                doc["num_articles"].as_u64(),
                doc["num_self_edit_templates"].as_u64(),
                doc["num_completions_per_template"].as_u64(),
                doc["eval_times"].as_u64()
            ),
            (Some(2), Some(2), Some(2), Some(2))
        );
        let close = |x: &serde_json::Value, y: f64, what: &str| {
            let x = x.as_f64().unwrap_or_else(|| panic!("{what} missing"));
            assert!((x - y).abs() < 1e-9, "{what}: {x} in results.json, {y} in template_stats");
        };
        close(&doc["overall"]["baseline_mean_acc"], stats[0].base_accuracy, "baseline_mean_acc");
        for (t, s) in stats.iter().enumerate() {
            let g = &doc["self_edit_template_statistics"][t.to_string()];
            close(&g["self_edit_template_mean_acc"], s.mean_accuracy, "mean accuracy");
            close(&g["std_of_(self_edit_template_mean_acc_across_articles)"], s.robustness, "robustness");
            close(&g["self_edit_template_evaluation_noise"], s.evaluation_noise, "evaluation noise");
            close(&g["self_edit_template_instantiation_noise"], s.instantiation_noise, "instantiation noise");
            close(&g["self_edit_template_mean_gain"], s.mean_gain, "mean gain");
            close(&g["self_edit_template_win_rate"], s.win_rate, "win rate");
            close(&g["self_edit_template_normalized_gain"], s.normalized_gain, "normalized gain");
        }
        // what build_SFT_dataset.py reads is there
        let t0 = &doc["dataset"]["self_edit_templates"][0];
        assert_eq!(t0["data_creation_instruction"], "plan 0");
        assert_eq!(t0["completions"]["1"][0]["training_sequences"][0], "seq a001-t00-c0");
        assert!(doc["article_statistics"]["0"]["self_edit_template_statistics"]["1"]["completions"]["0"]["evaluation_runs"]["1"]
            ["self_edit_acc"]
            .is_number());
        assert!(doc["article_statistics"]["1"]["baseline_mean_acc"].is_number());
    }
    // the per-article template means average to the template's mean (equal counts here)
    for (t, s) in stats.iter().enumerate() {
        let per_article: f64 = (0..2)
            .map(|a| {
                json["article_statistics"][a.to_string()]["self_edit_template_statistics"][t.to_string()]["self_edit_mean_acc"]
                    .as_f64()
                    .unwrap()
            })
            .sum::<f64>()
            / 2.0;
        assert!((per_article - s.mean_accuracy).abs() < 1e-9);
    }
}

/// The paper's archive files (its seed archive, and the `toolbox.json` its archive variant
/// writes, in the same layout) seed our archive stage.
#[test]
fn the_papers_archive_json_seeds_the_archive() {
    use selfedit::experiment::stages::archive::{seed_archive, update_archive};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/paper/archive_seed.json");
    if !path.exists() {
        eprintln!("{} is missing: skipping", path.display());
        return;
    }
    let rows = update_archive(seed_archive(&path).unwrap(), 0, &[], &[]);
    assert_eq!(rows.len(), 4);
    assert!(rows.windows(2).all(|w| w[0].accuracy >= w[1].accuracy));
    assert_eq!(rows[0].hyperparameters.lora_rank, 32);
    assert!((rows[0].accuracy - 0.4937).abs() < 1e-12);
}

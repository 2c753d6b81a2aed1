//! Building the generator's supervised examples (ReST-EM) from hand-made tables.

use std::path::PathBuf;

use selfedit::experiment::config::{Experiment, Variant};
use selfedit::experiment::data::Question;
use selfedit::experiment::stages::{archive, sft, synthesize, templates};
use selfedit::experiment::states::{AdapterStatus, Category, Split};
use selfedit::experiment::tables::{ArticleRow, ScoreRow, SelfEditRow, TemplateRow};

fn exp() -> Experiment {
    let mut e = Experiment::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")).unwrap();
    e.config.prompts_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prompts");
    e
}

fn template(id: &str) -> TemplateRow {
    let raw = format!(
        r#"{{"data_creation_instruction": "plan {id}", "hyperparameters": {{"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}}}"#
    );
    templates::parse_template(&exp().config, 0, id, Category::Exploit, &raw, 0)
}

fn edit(article: &str, template: &str, c: usize) -> SelfEditRow {
    SelfEditRow {
        self_edit_id: synthesize::self_edit_id(article, template, c),
        template_id: template.into(),
        article_id: article.into(),
        completion: c as i64,
        category: Category::Exploit,
        sequences: vec!["s".into()],
        valid: true,
        error: None,
        raw_response: format!(r#"{{"training_sequences": ["{article} {template} {c}"]}}"#),
        seed: 0,
        reasoning: None,
    }
}

fn one_article() -> Vec<ArticleRow> {
    vec![ArticleRow {
        article_id: "a000".into(),
        split: Split::Train,
        title: "T".into(),
        context: "The passage.".into(),
        questions: vec![Question { question: "q".into(), answers: vec!["a".into()] }],
        source_index: 0,
    }]
}

fn score(e: &SelfEditRow, base: f64, acc: f64) -> ScoreRow {
    ScoreRow {
        self_edit_id: e.self_edit_id.clone(),
        template_id: e.template_id.clone(),
        article_id: e.article_id.clone(),
        completion: e.completion,
        base_accuracy: base,
        adapted_accuracy: acc,
        gain: acc - base,
        status: AdapterStatus::Trained,
    }
}

#[test]
fn top_templates_per_article_with_their_best_completion() {
    let mut e = exp();
    e.config.sft.top_k = 2;
    let prompts = selfedit::experiment::prompts::Prompts::load(&e.config.prompts_dir).unwrap();
    let templates: Vec<TemplateRow> = ["iter0-t00", "iter0-t01", "iter0-t02"].iter().map(|t| template(t)).collect();
    let articles = one_article();
    let mut edits = Vec::new();
    let mut scores = Vec::new();
    // mean accuracy on a000: t00 (0.5 + 0.1)/2 = 0.3; t01 (0.2 + 0.2)/2 = 0.2; t02 0.25
    for (t, accs) in [("iter0-t00", [0.5, 0.1]), ("iter0-t01", [0.2, 0.2]), ("iter0-t02", [0.25, 0.25])] {
        for (c, acc) in accs.iter().enumerate() {
            let ed = edit("a000", t, c);
            scores.push(score(&ed, 0.25, *acc));
            edits.push(ed);
        }
    }
    let rows = sft::build_sft(
        &e.config,
        &prompts,
        None,
        &sft::SftInputs { templates: &templates, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: None },
    )
    .unwrap();
    // t00 and t02 kept (t01 ranks last); t00's best completion is c0; each gives two examples
    let ids: Vec<&str> = rows.iter().map(|r| r.example_id.as_str()).collect();
    assert_eq!(ids, ["a000-t00-c0-template", "a000-t00-c0-completion", "a000-t02-c0-template", "a000-t02-c0-completion"]);
    assert!(rows[0].prompt.contains("learning plan") && rows[0].completion.contains("plan iter0-t00"));
    assert!(rows[1].prompt.contains("The passage.") && rows[1].prompt.contains("plan iter0-t00"));
    assert_eq!(rows[1].completion, r#"{"training_sequences": ["s"]}"#, "the parsed sequences, as the paper's json.dumps writes them");
    assert_eq!(
        rows[0].completion,
        r#"{"data_creation_instruction": "plan iter0-t00", "hyperparameters": {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#
    );

    // the archive variant keeps only completions that beat the base model (t02's 0.25 does not)
    e.config.variant = Variant::Archive;
    let archive = archive::update_archive(
        archive::seed_archive(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/archive_seed.json")).unwrap(),
        0,
        &[],
        &[],
    );
    let rows = sft::build_sft(
        &e.config,
        &prompts,
        Some(&archive),
        &sft::SftInputs { templates: &templates, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: None },
    )
    .unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.example_id.as_str()).collect();
    assert_eq!(ids, ["a000-t00-c0-template", "a000-t00-c0-completion"]);
    assert!(rows[0].prompt.contains("Best plan so far"), "the archive variant's meta-prompt shows the archive");
}

/// The paper's rules beyond the plain ranking: the archive variant drops a template whose
/// mean does not beat the base even when one completion does; the template example teaches
/// the hyperparameters the adapters were trained with (clamped), not the raw response; a
/// baseline variant keeps its top_k completions.
#[test]
fn archive_filter_trained_hyperparameters_and_baseline_top_k() {
    let mut e = exp();
    e.config.sft.top_k = 2;
    let prompts = selfedit::experiment::prompts::Prompts::load(&e.config.prompts_dir).unwrap();
    let articles = one_article();
    // t00 wrote rank 1000 (clamped to the bounds' 64); mean 0.45 < base 0.5 though c0 is 0.9
    let raw = r#"{"data_creation_instruction": "lucky", "hyperparameters": {"lora_rank": 1000, "lora_alpha": 16, "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#;
    let t00 = templates::parse_template(&e.config, 0, "iter0-t00", Category::Exploit, raw, 0);
    assert_eq!(t00.hyperparameters.lora_rank, 64);
    let t01 = template("iter0-t01"); // mean 0.6 > base
    let mut edits = Vec::new();
    let mut scores = Vec::new();
    for (t, accs) in [("iter0-t00", [0.9, 0.0]), ("iter0-t01", [0.4, 0.8])] {
        for (c, acc) in accs.iter().enumerate() {
            let ed = edit("a000", t, c);
            scores.push(score(&ed, 0.5, *acc));
            edits.push(ed);
        }
    }
    let templates_v = vec![t00, t01];
    // no-archive: both templates (t01 first by mean), t00's example carries rank 64
    let rows = sft::build_sft(
        &e.config,
        &prompts,
        None,
        &sft::SftInputs { templates: &templates_v, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: None },
    )
    .unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.example_id.as_str()).collect();
    assert_eq!(ids, ["a000-t01-c1-template", "a000-t01-c1-completion", "a000-t00-c0-template", "a000-t00-c0-completion"]);
    assert!(rows[2].completion.contains(r#""lora_rank": 64,"#), "{}", rows[2].completion);
    // archive: t00's mean 0.45 does not beat the base 0.5, so its lucky completion is not kept
    e.config.variant = Variant::Archive;
    let archive = archive::update_archive(
        archive::seed_archive(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/archive_seed.json")).unwrap(),
        0,
        &[],
        &[],
    );
    let rows = sft::build_sft(
        &e.config,
        &prompts,
        Some(&archive),
        &sft::SftInputs { templates: &templates_v, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: None },
    )
    .unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.example_id.as_str()).collect();
    assert_eq!(ids, ["a000-t01-c1-template", "a000-t01-c1-completion"]);
    // baseline: the top 2 completions of the one template, with their text
    e.config.variant = Variant::BaselineRewrite;
    let base_t = templates::baseline_template(&e.config, &prompts, 0).unwrap();
    let mut bedits = Vec::new();
    let mut bscores = Vec::new();
    for (c, acc) in [0.1, 0.7, 0.4].iter().enumerate() {
        let mut ed = edit("a000", "iter0-t00", c);
        ed.category = Category::Baseline;
        ed.raw_response = format!("rewrite {c}");
        bscores.push(score(&ed, 0.5, *acc));
        bedits.push(ed);
    }
    let base_ts = [base_t];
    let inputs = sft::SftInputs { templates: &base_ts, edits: &bedits, scores: &bscores, articles: &articles, novelty_bonus: None };
    let rows = sft::build_sft(&e.config, &prompts, None, &inputs).unwrap();
    let got: Vec<(&str, &str)> = rows.iter().map(|r| (r.example_id.as_str(), r.completion.as_str())).collect();
    assert_eq!(got, [("a000-t00-c1-completion", "rewrite 1"), ("a000-t00-c2-completion", "rewrite 2")]);
    assert!(rows[0].prompt.contains("The passage."));
}

/// The novelty variant: the bonus `weight * novelty` reorders an article's templates (here it
/// lifts t02 above t00, whose accuracy is higher), only templates beating the base are kept
/// (as in the archive variant), its archive prompt names the crowded strategies, and
/// baseline-passage trains on the passage itself and teaches the generator nothing.
#[test]
fn novelty_bonus_ranks_examples_and_prompt_names_crowded_strategies() {
    let mut e = exp();
    e.config.sft.top_k = 1;
    e.config.variant = Variant::Novelty;
    e.config.novelty = Some(selfedit::experiment::config::NoveltySection {
        weight: 0.5,
        crowded_similarity: 0.85,
        embedder: PathBuf::from("models/all-MiniLM-L6-v2"),
    });
    let prompts = selfedit::experiment::prompts::Prompts::load(&e.config.prompts_dir).unwrap();
    let templates: Vec<TemplateRow> = ["iter0-t00", "iter0-t02"].iter().map(|t| template(t)).collect();
    let articles = one_article();
    let (mut edits, mut scores) = (Vec::new(), Vec::new());
    for (t, acc) in [("iter0-t00", 0.6), ("iter0-t02", 0.5)] {
        let ed = edit("a000", t, 0);
        scores.push(score(&ed, 0.25, acc));
        edits.push(ed);
    }
    let mut archive = archive::update_archive(
        archive::seed_archive(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/archive_seed.json")).unwrap(),
        0,
        &[],
        &[],
    );
    // novelty 0.05 vs 0.4: scores 0.6 + 0.025 < 0.5 + 0.2
    let bonus: std::collections::HashMap<String, f64> = [("iter0-t00".to_string(), 0.025), ("iter0-t02".to_string(), 0.2)].into();
    let run = |bonus: Option<&std::collections::HashMap<String, f64>>, archive: &[selfedit::experiment::tables::ArchiveRow]| {
        let inputs = sft::SftInputs { templates: &templates, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: bonus };
        sft::build_sft(&e.config, &prompts, Some(archive), &inputs).unwrap()
    };
    assert_eq!(run(None, &archive)[0].template_id, "iter0-t00", "without the bonus: accuracy order");
    assert_eq!(run(Some(&bonus), &archive)[0].template_id, "iter0-t02", "with it: accuracy + weight * novelty");

    // The archive prompt: no crowded block while no strategy has 2 members ...
    let plain = templates::meta_prompt(&e.config, &prompts, Some(&archive)).unwrap();
    assert!(!plain.contains("already crowded"), "{plain}");
    let mut as_archive = e.config.clone();
    as_archive.variant = Variant::Archive;
    as_archive.novelty = None;
    assert_eq!(plain, templates::meta_prompt(&as_archive, &prompts, Some(&archive)).unwrap(), "same prompt as the archive variant");
    // ... and the leader of each crowded group (largest first) once it has.
    for r in archive.iter_mut() {
        let member = ["seed-0", "seed-1", "seed-2"].contains(&r.template_id.as_str());
        r.strategy = Some(if member { "seed-0".to_string() } else { r.template_id.clone() });
        r.crowding = Some(if member { 3 } else { 1 });
    }
    let leader = archive.iter().find(|r| r.template_id == "seed-0").unwrap().instruction.clone();
    let crowded = templates::meta_prompt(&e.config, &prompts, Some(&archive)).unwrap();
    assert!(crowded.contains("already crowded") && crowded.contains(&format!("- (3 similar plans) {leader}")), "{crowded}");
    assert!(!templates::meta_prompt(&as_archive, &prompts, Some(&archive)).unwrap().contains("already crowded"));

    // baseline-passage: the passage is the one sequence, nothing is generated or taught
    e.config.variant = Variant::BaselinePassage;
    e.config.novelty = None;
    e.config.search.templates_per_iteration = 1;
    e.config.validate().unwrap();
    let t = templates::baseline_template(&e.config, &prompts, 0).unwrap();
    assert_eq!(t.instruction, templates::PASSAGE_INSTRUCTION);
    assert_eq!(t.hyperparameters, e.config.baseline.hyperparameters);
    let inputs = sft::SftInputs { templates: &templates, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: None };
    assert!(sft::build_sft(&e.config, &prompts, None, &inputs).unwrap().is_empty());
    e.config.search.completions_per_template = 2;
    assert!(format!("{:#}", e.config.validate().unwrap_err()).contains("completions_per_template = 1"));
}

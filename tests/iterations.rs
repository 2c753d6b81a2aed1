//! Two iterations of the archive variant on the tiny settings, through the Makefile: the
//! generator is improved between them and used by iteration 1, iteration 1's template prompt
//! shows iteration 0's archive, validation runs at each iteration, and the report draws from
//! the real tables. (The SFT checkpoint resume is tested in tiny_models.rs.) Then the
//! random-kill soak: the same run SIGKILLed at `SELFEDIT_SOAK_KILLS` random moments (2 here,
//! `make soak KILLS=n` for more), resumed after each, ends with the same tables and redoes no
//! finished work.

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use selfedit::experiment::tables::{self, ArchiveRow, TemplateRow, TemplateStatsRow};

#[test]
fn two_archive_iterations_improve_the_generator_and_report() {
    assert!(common::model_path().exists(), "run `make model` first");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stamp")).parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let make = |target: &str, extra: &[&str]| {
        let out = Command::new("make")
            .current_dir(&root)
            .args(["--no-print-directory", target, "CONFIG=configs/tiny-archive.toml", "BUILD="])
            .arg(format!("OUTPUTS={}", tmp.path().display()))
            .arg(format!("BIN={}", bin.display()))
            .args(extra)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "make {target} failed:\n{log}");
        log
    };
    let started = std::time::Instant::now();
    make("iterations", &["ITERS=2"]);
    let duration = started.elapsed();
    let exp = tmp.path().join("tiny-archive");
    // iteration 1 was conditioned on iteration 0's archive
    let archive0: Vec<ArchiveRow> = tables::read(&exp.join("iter0/archive.parquet")).unwrap();
    let templates1: Vec<TemplateRow> = tables::read(&exp.join("iter1/templates.parquet")).unwrap();
    let best = &archive0[0];
    let worst = archive0.last().unwrap();
    for t in &templates1 {
        assert!(t.prompt.contains(&best.instruction) && t.prompt.contains(&worst.instruction), "{}", t.prompt);
    }
    let templates0: Vec<TemplateRow> = tables::read(&exp.join("iter0/templates.parquet")).unwrap();
    assert_ne!(templates0[0].prompt, templates1[0].prompt);
    // the generator of iteration 1 is the base model fine-tuned on iteration 0's examples:
    // changed when there were examples, carried over unchanged when there were none (the
    // archive variant keeps only self-edits that beat the base model, so either can happen;
    // tests/semantics.rs trains a generator on hand-made examples)
    let sft: Vec<selfedit::experiment::tables::SftRow> = tables::read(&exp.join("iter0/sft.parquet")).unwrap();
    let base = selfedit::runtime::formats::load(&common::model_path(), &Device::Cpu).unwrap();
    let generator = selfedit::runtime::formats::load(&exp.join("iter0/generator"), &Device::Cpu).unwrap();
    let w0 = &base.decoder.layers[0].self_attn.q_proj.weight;
    let w1 = &generator.decoder.layers[0].self_attn.q_proj.weight;
    let diff = (w0 - w1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff > 0.0, !sft.is_empty(), "{} SFT examples, weight change {diff}", sft.len());
    assert_eq!(generator.tokenizer.encode("Hello 123").unwrap(), base.tokenizer.encode("Hello 123").unwrap());
    // validation at both iterations
    for k in 0..2 {
        let v: Vec<TemplateStatsRow> = tables::read(&exp.join(format!("iter{k}/validation/template_stats.parquet"))).unwrap();
        assert_eq!(v.len(), 1);
        assert!(!v[0].instruction.is_empty());
    }
    // the report draws from these tables
    make("report", &[]);
    let index = std::fs::read_to_string(exp.join("report/index.md")).unwrap();
    for k in 0..2 {
        assert!(index.contains(&exp.join(format!("iter{k}/validation/template_stats.parquet")).display().to_string()), "{index}");
    }
    for f in ["accuracy.png", "accuracy.svg", "collapse.png", "collapse.svg", "gains.png", "gains.svg"] {
        assert!(std::fs::metadata(exp.join("report").join(f)).unwrap().len() > 1000, "{f}");
    }
    // nothing left to do
    let again = make("iterations", &["ITERS=2"]);
    assert!(!again.contains("wrote"), "{again}");

    // the random-kill soak against this run
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (kills, seed) = (env("SELFEDIT_SOAK_KILLS", 2) as usize, env("SELFEDIT_SOAK_SEED", 0));
    let soak_out = tmp.path().join("soak");
    let soak_make = || {
        let mut c = Command::new("make");
        c.current_dir(&root)
            .args(["--no-print-directory", "iterations", "ITERS=2", "CONFIG=configs/tiny-archive.toml", "BUILD="])
            .arg(format!("OUTPUTS={}", soak_out.display()))
            .arg(format!("BIN={}", bin.display()));
        c
    };
    let report = common::soak::soak(&soak_make, &soak_out.join("tiny-archive"), &exp, kills, seed, duration);
    println!("soak ({kills} kills, seed {seed}, uninterrupted run {:.0} s): {}", duration.as_secs_f64(), report.line());
    assert!(report.differing.is_empty() && report.redone.is_empty(), "{}", report.line());
}

/// `make science` in a small form (the real configs with 2 validation passages, 1 training
/// passage, 2 templates and 1 epoch, 1 iteration): every arm runs through the Makefile, the
/// novelty variant's archive carries novelty and strategies, and the report has one row per
/// reference arm and per searched variant and iteration, with intervals around each mean.
#[test]
fn science_experiment_runs_end_to_end_in_small_form() {
    use selfedit::experiment::tables::ScienceRow;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stamp")).parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let configs = tmp.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    for arm in ["passage", "implications", "rewrite", "no-archive", "archive", "novelty"] {
        let text = std::fs::read_to_string(root.join(format!("configs/science-{arm}.toml"))).unwrap();
        let mut small = text;
        for (from, to) in [
            ("train_passages = 12", "train_passages = 2"),
            ("train_passages = 4", "train_passages = 1"),
            ("validation_passages = 12", "validation_passages = 2"),
            ("templates_per_iteration = 3", "templates_per_iteration = 2"),
            ("num_epochs = 10,", "num_epochs = 1,"),
            ("num_epochs = { min = 1, max = 5 }", "num_epochs = { min = 1, max = 1 }"),
            ("completion_max_new_tokens = 220", "completion_max_new_tokens = 60"),
        ] {
            small = small.replace(from, to);
        }
        std::fs::write(configs.join(format!("science-{arm}.toml")), small).unwrap();
    }
    let out = Command::new("make")
        .current_dir(&root)
        .args(["--no-print-directory", "science", "BUILD=", "SCIENCE_ITERS=1"])
        .arg(format!("SCIENCE_CONFIGS={}", configs.display()))
        .arg(format!("OUTPUTS={}", tmp.path().display()))
        .arg(format!("BIN={}", bin.display()))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "make science failed:\n{log}");
    assert!(log.contains("science: this run took"), "{log}");
    let rows: Vec<ScienceRow> = tables::read(&tmp.path().join("science/science.parquet")).unwrap();
    let arms: Vec<(String, Option<i64>)> = rows.iter().map(|r| (r.arm.clone(), r.iteration)).collect();
    let mut want: Vec<(String, Option<i64>)> =
        ["base", "passage", "implications", "rewrite"].iter().map(|a| (a.to_string(), None)).collect();
    for v in ["no-archive", "archive", "novelty"] {
        want.push((v.to_string(), Some(0)));
    }
    assert_eq!(arms, want);
    for r in &rows {
        assert_eq!(r.n_passages, 2, "{r:?}");
        assert!(r.accuracy_low <= r.accuracy && r.accuracy <= r.accuracy_high, "{r:?}");
    }
    // the searched variants' templates were analysed (collapse) and their similarity reported
    assert!(rows.iter().filter(|r| r.kind == selfedit::experiment::states::ArmKind::Searched).all(|r| r.hp_similarity.is_some()));
    let archive: Vec<ArchiveRow> = tables::read(&tmp.path().join("science-novelty/iter0/archive.parquet")).unwrap();
    assert!(archive.iter().all(|r| r.novelty.is_some_and(|n| (0.0..=1.0).contains(&n)) && r.strategy.is_some()));
    let plain: Vec<ArchiveRow> = tables::read(&tmp.path().join("science-archive/iter0/archive.parquet")).unwrap();
    assert!(plain.iter().all(|r| r.novelty.is_none()), "novelty only in the novelty variant");
    assert!(std::fs::read_to_string(tmp.path().join("science/index.md")).unwrap().contains("validation_accuracy.png"));
}

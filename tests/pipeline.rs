//! The pipeline end to end through the Makefile, on configs/tiny.toml with the real model:
//! every table exists and a second reader (polars, lazily) reads it; a second make started
//! beside a running one is refused; writes that fail midway (a file-size limit) lose nothing;
//! a run killed during
//! adapter training resumes without redoing finished work and ends with the same tables.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use polars::prelude::*;
use selfedit::experiment::states::AdapterStatus;
use selfedit::experiment::tables::{
    self, AdapterRow, AnswerRow, ArchiveRow, ArticleRow, ScoreRow, SelfEditRow, TemplateRow, TemplateStatsRow,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stamp")).parent().unwrap().to_path_buf()
}

fn make(outputs: &Path) -> Command {
    make_with(outputs, &root().join("configs/tiny.toml"))
}

fn make_with(outputs: &Path, config: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(root())
        .arg("--no-print-directory")
        .arg("pipeline")
        .arg(format!("CONFIG={}", config.display()))
        .arg(format!("OUTPUTS={}", outputs.display()))
        .arg(format!("BIN={}", bin_dir().display()))
        .arg("BUILD=");
    c
}

fn run_make(outputs: &Path) -> String {
    let out = make(outputs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "make failed:\n{text}");
    text
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).modified().unwrap()
}

/// Reads a table with polars (lazily) and checks its columns against our schema.
fn polars_check<T: tables::Table>(path: &Path, rows: usize) {
    let df = LazyFrame::scan_parquet(path.to_str().unwrap().into(), ScanArgsParquet::default()).unwrap().collect().unwrap();
    assert_eq!(df.height(), rows, "{}", path.display());
    let names: Vec<String> = df.get_column_names().iter().map(|n| n.to_string()).collect();
    let want: Vec<String> = T::schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, want, "{}", path.display());
}

#[test]
fn tiny_pipeline_runs_resumes_and_is_reproducible() {
    assert!(common::model_path().exists(), "run `make model` first");
    let tmp = tempfile::tempdir().unwrap();

    // 1. uninterrupted run
    let a = tmp.path().join("a");
    let log = run_make(&a);
    let it = a.join("tiny/iter0");
    let articles: Vec<ArticleRow> = tables::read(&a.join("tiny/articles.parquet")).unwrap();
    let templates: Vec<TemplateRow> = tables::read(&it.join("templates.parquet")).unwrap();
    let edits: Vec<SelfEditRow> = tables::read(&it.join("self_edits.parquet")).unwrap();
    let adapters: Vec<AdapterRow> = tables::read(&it.join("adapters.parquet")).unwrap();
    let answers: Vec<AnswerRow> = tables::read(&it.join("answers.parquet")).unwrap();
    let scores: Vec<ScoreRow> = tables::read(&it.join("scores.parquet")).unwrap();
    let stats: Vec<TemplateStatsRow> = tables::read(&it.join("template_stats.parquet")).unwrap();
    let archive: Vec<ArchiveRow> = tables::read(&it.join("archive.parquet")).unwrap();
    assert_eq!(articles.len(), 2);
    assert_eq!(templates.len(), 2);
    assert_eq!(edits.len(), 2 * 2); // templates × articles × 1 completion
    assert_eq!(adapters.len(), edits.len());
    // the base model once per self-edit of each article (the paper's protocol) + one model
    // per evaluated self-edit, 1 run each
    let evaluated = adapters.iter().filter(|a| a.status != AdapterStatus::Failed).count();
    let per_article = |id: &str| articles.iter().find(|a| a.article_id == id).unwrap().questions.len();
    let base_answers: usize =
        articles.iter().map(|a| a.questions.len() * edits.iter().filter(|e| e.article_id == a.article_id).count()).sum();
    assert_eq!(answers.iter().filter(|r| r.model_id == "base").count(), base_answers);
    let want_answers = base_answers
        + adapters
            .iter()
            .filter(|a| a.status != AdapterStatus::Failed)
            .map(|a| {
                let e = edits.iter().find(|e| e.self_edit_id == a.self_edit_id).unwrap();
                per_article(&e.article_id)
            })
            .sum::<usize>();
    assert_eq!(answers.len(), want_answers, "{evaluated} evaluated self-edits");
    assert_eq!(scores.len(), edits.len());
    assert_eq!(archive.len(), 4 + stats.len());
    assert!(archive.windows(2).all(|w| w[0].accuracy >= w[1].accuracy));
    polars_check::<ArticleRow>(&a.join("tiny/articles.parquet"), articles.len());
    polars_check::<TemplateRow>(&it.join("templates.parquet"), templates.len());
    polars_check::<SelfEditRow>(&it.join("self_edits.parquet"), edits.len());
    polars_check::<AdapterRow>(&it.join("adapters.parquet"), adapters.len());
    polars_check::<AnswerRow>(&it.join("answers.parquet"), answers.len());
    polars_check::<ScoreRow>(&it.join("scores.parquet"), scores.len());
    polars_check::<TemplateStatsRow>(&it.join("template_stats.parquet"), stats.len());
    polars_check::<ArchiveRow>(&it.join("archive.parquet"), archive.len());
    // trained adapters are PEFT folders
    let trained: Vec<&AdapterRow> = adapters.iter().filter(|r| r.status == AdapterStatus::Trained).collect();
    assert!(!trained.is_empty(), "no adapter was trained:\n{log}");
    for r in &trained {
        let d = PathBuf::from(r.adapter_path.as_ref().unwrap());
        assert!(d.join("adapter_model.safetensors").exists() && d.join("adapter_config.json").exists());
        assert!(r.loss_curve.len() as i64 == r.steps && r.steps > 0);
    }
    // make -n lists nothing to run, and make again runs nothing
    let dry = make(&a).arg("-n").output().unwrap();
    let dry = String::from_utf8_lossy(&dry.stdout).to_string();
    let stage_bins = ["prepare-data", "generate-templates", "synthesize", "train-adapters", "evaluate ", "score ", "update-archive"];
    assert!(!stage_bins.iter().any(|b| dry.contains(&format!("/{b}"))), "make -n lists stages after a finished run:\n{dry}");
    let again = run_make(&a);
    assert!(!again.contains("wrote"), "a second make reran stages:\n{again}");

    // editing a comment of the config reruns nothing; changing the eval settings reruns
    // evaluation and what follows it, nothing before
    let cfg_dir = tmp.path().join("cfg");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let cfg = cfg_dir.join("tiny.toml");
    let text = std::fs::read_to_string(root().join("configs/tiny.toml")).unwrap();
    std::fs::write(&cfg, format!("# a new comment\n{text}")).unwrap();
    let run_cfg = |c: &Path| {
        let out = make_with(&a, c).output().unwrap();
        let t = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{t}");
        t
    };
    let log = run_cfg(&cfg);
    assert!(!log.contains("wrote"), "a comment reran stages:\n{log}");
    std::fs::write(&cfg, text.replace("max_new_tokens = 24", "max_new_tokens = 16")).unwrap();
    // the dry run lists exactly the stages the real run then executes
    let dry = make_with(&a, &cfg).arg("-n").output().unwrap();
    let dry = String::from_utf8_lossy(&dry.stdout).to_string();
    let listed: Vec<&str> = stage_bins.iter().copied().filter(|b| dry.contains(&format!("/{b}"))).collect();
    assert_eq!(listed, ["evaluate ", "score ", "update-archive"], "make -n:\n{dry}");
    // the dry run changed nothing: with the settings changed back, make runs nothing
    std::fs::write(&cfg, &text).unwrap();
    let log = run_cfg(&cfg);
    assert!(!log.contains("wrote"), "a dry run left its settings' stamps behind:\n{log}");
    std::fs::write(&cfg, text.replace("max_new_tokens = 24", "max_new_tokens = 16")).unwrap();
    let log = run_cfg(&cfg);
    for stage in ["evaluate: wrote", "score: wrote", "archive: wrote"] {
        assert!(log.contains(stage), "{stage} missing:\n{log}");
    }
    for stage in ["prepare:", "templates:", "synthesize:", "train:"] {
        assert!(!log.contains(stage), "{stage} reran:\n{log}");
    }
    // back to the original settings for what follows
    std::fs::write(&cfg, &text).unwrap();
    run_cfg(&cfg);

    // a deleted table is made again, and what depends on it reruns, nothing before it (each
    // target is a file, none intermediate); `score` writes two tables, either one missing reruns it
    for (table, stages) in
        [("answers.parquet", &["evaluate ", "score ", "update-archive"][..]), ("scores.parquet", &["score ", "update-archive"])]
    {
        std::fs::remove_file(it.join(table)).unwrap();
        let dry = make(&a).arg("-n").output().unwrap();
        let dry = String::from_utf8_lossy(&dry.stdout).to_string();
        let listed: Vec<&str> = stage_bins.iter().copied().filter(|b| dry.contains(&format!("/{b}"))).collect();
        assert_eq!(listed, stages, "make -n after deleting {table}:\n{dry}");
        run_make(&a);
        assert!(it.join(table).exists(), "make did not make {table} again");
    }

    // the collapse analysis and the report draw from these tables
    let out = Command::new("make")
        .current_dir(root())
        .args(["--no-print-directory", "report", "CONFIG=configs/tiny.toml", "BUILD="])
        .arg(format!("OUTPUTS={}", a.display()))
        .arg(format!("BIN={}", bin_dir().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = a.join("tiny/report");
    for f in ["accuracy", "collapse", "gains"] {
        let png = std::fs::read(report.join(format!("{f}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{f}.png");
        let svg = std::fs::read_to_string(report.join(format!("{f}.svg"))).unwrap();
        assert!(svg.contains("<svg") && (svg.contains("iteration") || f == "gains"), "{f}.svg");
    }
    let index = std::fs::read_to_string(report.join("index.md")).unwrap();
    let stats_file = it.join("template_stats.parquet");
    assert!(index.contains(&stats_file.display().to_string()), "index.md does not cite its source:\n{index}");
    let best = stats.iter().map(|s| s.mean_accuracy).fold(f64::NAN, f64::max);
    assert!(index.contains(&format!("{best:.4}")), "index.md lacks the best accuracy {best:.4}:\n{index}");

    // 2. interrupted run: copy the stages before training (with their times), kill make
    //    once the first adapter is on disk, then run make again.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("tiny/iter0")).unwrap();
    let status =
        Command::new("cp").arg("-a").arg(a.join("tiny/stamps")).arg(a.join("tiny/articles.parquet")).arg(b.join("tiny")).status().unwrap();
    assert!(status.success());
    for f in ["templates.parquet", "self_edits.parquet"] {
        assert!(Command::new("cp").arg("-a").arg(it.join(f)).arg(b.join("tiny/iter0")).status().unwrap().success());
    }
    let itb = b.join("tiny/iter0");
    let templates_time = mtime(&itb.join("templates.parquet"));
    let edits_time = mtime(&itb.join("self_edits.parquet"));
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = make(&b);
        c.stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
        c.spawn().unwrap()
    };
    let start = Instant::now();
    let finished_adapter = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.') && p.join("train_record.json").exists())
                    .collect()
            })
            .unwrap_or_default()
    };
    let done_before_kill = loop {
        let done = finished_adapter(&itb.join("adapters"));
        if !done.is_empty() {
            break done;
        }
        assert!(child.try_wait().unwrap().is_none(), "make ended before any adapter was written");
        assert!(start.elapsed() < Duration::from_secs(900), "no adapter after 15 minutes");
        std::thread::sleep(Duration::from_millis(200));
    };
    let pgid = child.id();
    let killed = Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(killed.success(), "could not kill make's process group");
    let _ = child.wait();
    assert!(!itb.join("adapters.parquet").exists(), "training finished before the kill; nothing was interrupted");
    let record_times: Vec<(PathBuf, SystemTime)> =
        done_before_kill.iter().map(|d| (d.clone(), mtime(&d.join("train_record.json")))).collect();
    run_make(&b);
    // finished adapters were not retrained, earlier stages did not rerun
    for (d, t) in &record_times {
        assert_eq!(mtime(&d.join("train_record.json")), *t, "{} was trained again", d.display());
    }
    assert_eq!(mtime(&itb.join("templates.parquet")), templates_time);
    assert_eq!(mtime(&itb.join("self_edits.parquet")), edits_time);
    // and the final tables equal the uninterrupted run's (adapter paths aside)
    let strip = |rows: Vec<AdapterRow>| -> Vec<AdapterRow> {
        rows.into_iter()
            .map(|mut r| {
                r.adapter_path = r.adapter_path.map(|p| Path::new(&p).file_name().unwrap().to_string_lossy().into_owned());
                r.seconds = 0.0;
                r
            })
            .collect()
    };
    assert_eq!(strip(tables::read(&itb.join("adapters.parquet")).unwrap()), strip(adapters));
    assert_eq!(tables::read::<AnswerRow>(&itb.join("answers.parquet")).unwrap(), answers);
    assert_eq!(tables::read::<TemplateStatsRow>(&itb.join("template_stats.parquet")).unwrap(), stats);
    assert_eq!(tables::read::<ArchiveRow>(&itb.join("archive.parquet")).unwrap(), archive);

    // 3. two runs at once: a second make reaching the stage the first is running is refused
    //    with the first one's pid; the first finishes with the same tables.
    let c = tmp.path().join("c");
    std::fs::create_dir_all(c.join("tiny/iter0")).unwrap();
    assert!(Command::new("cp")
        .arg("-a")
        .arg(b.join("tiny/stamps"))
        .arg(b.join("tiny/articles.parquet"))
        .arg(c.join("tiny"))
        .status()
        .unwrap()
        .success());
    for f in ["templates.parquet", "self_edits.parquet"] {
        assert!(Command::new("cp").arg("-a").arg(it.join(f)).arg(c.join("tiny/iter0")).status().unwrap().success());
    }
    let first = make(&c).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let locks = c.join("tiny/locks");
    let start = Instant::now();
    let holder = loop {
        let held: Vec<String> = std::fs::read_dir(&locks)
            .map(|rd| rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).filter(|t| t.contains("train-adapters")).collect())
            .unwrap_or_default();
        if let Some(h) = held.into_iter().next() {
            break h;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "the first make never started training");
        std::thread::sleep(Duration::from_millis(100));
    };
    let second = make(&c).output().unwrap();
    let text = String::from_utf8_lossy(&second.stdout).to_string() + &String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second make ran beside the first:\n{text}");
    assert!(text.contains("is already doing this work") && text.contains(holder.trim()), "no message naming {holder:?}:\n{text}");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "the first make failed:\n{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(
        strip(tables::read(&c.join("tiny/iter0/adapters.parquet")).unwrap()),
        strip(tables::read(&itb.join("adapters.parquet")).unwrap())
    );
    assert_eq!(tables::read::<AnswerRow>(&c.join("tiny/iter0/answers.parquet")).unwrap(), answers);

    // 4. writes that fail midway (a file-size limit, as a full disk): the stage stops naming
    //    the file and the cause, removes its temporary files and leaves complete files as
    //    they were; make then resumes and ends with the same tables.
    let itc = c.join("tiny/iter0");
    let stage = |bin: &str, limit_kb: usize| {
        let cmd = format!(
            "ulimit -f {limit_kb}; exec {}/{bin} --config configs/tiny.toml --outputs {} --iter 0",
            bin_dir().display(),
            c.display()
        );
        let out = Command::new("bash").current_dir(root()).arg("-c").arg(cmd).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let leftovers = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    };
    //    a table: the previous articles.parquet stays
    let articles_before = std::fs::read(c.join("tiny/articles.parquet")).unwrap();
    let (ok, err) = stage("prepare-data", 1);
    assert!(!ok && err.contains("articles.parquet") && err.contains("File too large"), "{err}");
    assert_eq!(std::fs::read(c.join("tiny/articles.parquet")).unwrap(), articles_before);
    assert!(leftovers(&c.join("tiny")).is_empty(), "{:?}", leftovers(&c.join("tiny")));
    //    an adapter: the stage stops at the first adapter it cannot write
    let mut done: Vec<PathBuf> = std::fs::read_dir(itc.join("adapters")).unwrap().map(|e| e.unwrap().path()).collect();
    done.sort();
    std::fs::remove_dir_all(&done[0]).unwrap();
    // (as when the first run stops in training: the tables after it do not exist yet)
    for t in ["adapters", "answers", "scores", "template_stats", "archive"] {
        std::fs::remove_file(itc.join(format!("{t}.parquet"))).unwrap();
    }
    let kept: Vec<(PathBuf, SystemTime)> = done[1..].iter().map(|d| (d.clone(), mtime(&d.join("train_record.json")))).collect();
    let (ok, err) = stage("train-adapters", 100);
    let victim = done[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(!ok && err.contains(&victim) && err.contains("File too large"), "{err}");
    assert!(!itc.join("adapters.parquet").exists() && !done[0].exists());
    assert!(leftovers(&itc.join("adapters")).is_empty(), "{:?}", leftovers(&itc.join("adapters")));
    //    space again: make trains only the missing adapter
    run_make(&c);
    for (d, t) in &kept {
        assert_eq!(mtime(&d.join("train_record.json")), *t, "{} was trained again", d.display());
    }
    assert_eq!(strip(tables::read(&itc.join("adapters.parquet")).unwrap()), strip(tables::read(&itb.join("adapters.parquet")).unwrap()));
    assert_eq!(tables::read::<AnswerRow>(&itc.join("answers.parquet")).unwrap(), answers);
}

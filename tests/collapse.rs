//! The collapse analysis: the sentence embedder against Transformers' output (recorded in
//! tests/data/minilm_reference.json), and the collapse analysis (library and `collapse` binary)
//! on the paper's released templates (../shared/paper/).
//!
//! `SELFEDIT_SHARED` (the shared folder, default `../shared`) and `SELFEDIT_EMBEDDER` (the
//! MiniLM folder, default `models/all-MiniLM-L6-v2`) point elsewhere, as `make mutants` does
//! for cargo-mutants' copy of the tree, which has neither beside it.

use std::path::PathBuf;

use selfedit::analysis::collapse::{self, cosine01, TemplateSource};
use selfedit::experiment::tables::{self, CollapseRow};
use selfedit::runtime::embedder::Embedder;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn from_env_or(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| root().join(default))
}

fn embedder_path() -> PathBuf {
    from_env_or("SELFEDIT_EMBEDDER", "models/all-MiniLM-L6-v2")
}

#[test]
fn minilm_embeddings_match_transformers() {
    let (e, _) = embedder();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/data/minilm_reference.json")).unwrap()).unwrap();
    let sentences: Vec<String> = r["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    for (s, ids) in sentences.iter().zip(r["token_ids"].as_array().unwrap()) {
        let want: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(e.token_ids(s).unwrap(), want, "{s}");
    }
    let ours = e.embed(&sentences).unwrap();
    for (o, w) in ours.iter().zip(r["embeddings"].as_array().unwrap()) {
        let w: Vec<f32> = w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let d = o.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "embedding differs by {d}");
    }
    let cos = r["cosine"].as_array().unwrap();
    for i in 0..4 {
        for j in 0..4 {
            let want = (1.0 + cos[i][j].as_f64().unwrap()) / 2.0;
            assert!((cosine01(&ours[i], &ours[j]) - want).abs() < 1e-5);
        }
    }
}

fn paper_templates(name: &str) -> PathBuf {
    from_env_or("SELFEDIT_SHARED", "../shared").join(format!("paper/{name}_train_templates_by_iter.json"))
}

fn embedder() -> (Embedder, PathBuf) {
    let path = embedder_path();
    (Embedder::load(&path, &candle_core::Device::Cpu).expect("run `make embedder`"), path)
}

/// The collapse analysis of the paper's released templates: every similarity and drift of
/// every iteration equals tests/data/collapse_reference.json, and the archive variant ends
/// more homogeneous than the no-archive one, as the paper reports.
#[test]
fn collapse_reads_the_papers_released_templates() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/data/collapse_reference.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (e, e_path) = embedder();
    let mut results = Vec::new();
    for name in ["archive", "no_archive"] {
        let out = dir.path().join(format!("{name}.parquet"));
        let rows = collapse::run(TemplateSource::PaperJson(&paper_templates(name)), Some((&e, &e_path)), &out).unwrap();
        assert_eq!(tables::read::<CollapseRow>(&out).unwrap(), rows, "the table reads back");
        let meta = tables::metadata(&out).unwrap();
        let value = |k: &str| meta.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(value("selfedit.stage").as_deref(), Some("collapse"));
        assert_eq!(value("selfedit.model"), Some(e_path.display().to_string()), "the embedder is named in the provenance");
        // every figure against scripts/make_collapse_reference.py's own implementation of the
        // paper's definitions (text through Transformers' MiniLM: embeddings agree to 1e-4)
        let want = reference["files"][name]["iterations"].as_array().unwrap();
        assert_eq!(rows.len(), want.len());
        for (r, w) in rows.iter().zip(want) {
            assert_eq!(r.iteration as u64, w["iteration"].as_u64().unwrap());
            assert_eq!(r.n_templates as u64, w["n_templates"].as_u64().unwrap());
            let figures = [
                ("text_similarity", r.text_similarity, 1e-5),
                ("hp_similarity", r.hp_similarity, 1e-12),
                ("lexical_similarity", r.lexical_similarity, 1e-12),
                ("text_drift", r.text_drift, 1e-5),
                ("hp_drift", r.hp_drift, 1e-12),
                ("lexical_drift", r.lexical_drift, 1e-12),
            ];
            for (field, got, tol) in figures {
                match (got, w[field].as_f64()) {
                    (Some(g), Some(x)) => assert!((g - x).abs() < tol, "{name} iteration {}: {field} {g} against {x}", r.iteration),
                    (None, None) => {}
                    (g, x) => panic!("{name} iteration {}: {field} {g:?} against {x:?}", r.iteration),
                }
            }
        }
        results.push(rows);
    }
    // The paper: the archive variant homogenizes: by its last iteration its templates are more
    // alike, in text and in hyperparameters, than the no-archive variant's.
    let (archive, no_archive) = (&results[0][4], &results[1][4]);
    assert!(archive.hp_similarity.unwrap() > no_archive.hp_similarity.unwrap(), "{archive:?} vs {no_archive:?}");
    assert!(archive.text_similarity.unwrap() > no_archive.text_similarity.unwrap(), "{archive:?} vs {no_archive:?}");
}

/// The `collapse` binary (`--templates-json`) writes the table the library computes.
#[cfg(feature = "stages")]
#[test]
fn collapse_binary_writes_the_librarys_table() {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (paper_templates("archive"), dir.path().join("archive.parquet"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_collapse"))
        .current_dir(root())
        .arg("--templates-json")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let (e, e_path) = embedder();
    let want = collapse::run(TemplateSource::PaperJson(&input), Some((&e, &e_path)), &dir.path().join("lib.parquet")).unwrap();
    assert_eq!(tables::read::<CollapseRow>(&out).unwrap(), want);
}

/// `science-report` on hand-made experiment folders: the passage arm, a Rewrite arm equal to
/// the base model, and a searched variant scored on the same passages under other article ids
/// (matched by title). Accuracies, paired differences and their intervals equal the bootstrap
/// of the per-passage values computed here; the verdicts follow the intervals; the table reads
/// back and the figure is written.
#[test]
fn science_report_pairs_arms_by_passage_with_bootstrap_intervals() {
    use selfedit::analysis::science::{science_rows, write_science_report, Arm, RESAMPLES};
    use selfedit::experiment::data::Question;
    use selfedit::experiment::layout::Layout;
    use selfedit::experiment::states::{AdapterStatus, Split};
    use selfedit::experiment::stats::bootstrap_mean;
    use selfedit::experiment::tables::{ArticleRow, ScienceRow, ScoreRow};

    let dir = tempfile::tempdir().unwrap();
    let titles = ["T0", "T1", "T2", "T3"];
    let base = [0.0, 0.0, 0.5, 0.0];
    // (folder, article id prefix, split, iteration, per-passage adapted accuracies as
    // completions: two completions for the passage arm are averaged per passage)
    let write = |name: &str, prefix: &str, split: Split, iteration: usize, adapted: &[Vec<f64>]| {
        let layout = Layout::at(&dir.path().join(name));
        std::fs::create_dir_all(layout.iter_dir(iteration, split)).unwrap();
        let articles: Vec<ArticleRow> = titles
            .iter()
            .enumerate()
            .map(|(i, t)| ArticleRow {
                article_id: format!("{prefix}{i:03}"),
                split,
                title: t.to_string(),
                context: String::new(),
                questions: vec![Question { question: "q".into(), answers: vec!["a".into()] }],
                source_index: i as i64,
            })
            .collect();
        tables::write(&layout.articles(), &articles, &Default::default()).unwrap();
        let mut scores = Vec::new();
        for (i, accs) in adapted.iter().enumerate() {
            for (c, acc) in accs.iter().enumerate() {
                scores.push(ScoreRow {
                    self_edit_id: format!("{prefix}{i:03}-t00-c{c}"),
                    template_id: "t00".into(),
                    article_id: format!("{prefix}{i:03}"),
                    completion: c as i64,
                    base_accuracy: base[i],
                    adapted_accuracy: *acc,
                    gain: acc - base[i],
                    status: AdapterStatus::Trained,
                });
            }
        }
        tables::write(&layout.table::<ScoreRow>(iteration, split), &scores, &Default::default()).unwrap();
    };
    write("passage", "a", Split::Train, 0, &[vec![1.0, 1.0], vec![0.5, 0.5], vec![1.0, 0.5], vec![0.5, 0.5]]);
    write("rewrite", "a", Split::Train, 0, &base.iter().map(|b| vec![*b]).collect::<Vec<_>>());
    write("novelty", "v", Split::Validation, 0, &[vec![0.0], vec![0.0], vec![0.5], vec![0.5]]);
    write("novelty", "v", Split::Validation, 1, &[vec![1.0], vec![0.5], vec![0.5], vec![1.0]]);
    let arm = |n: &str| Arm { name: n.to_string(), dir: dir.path().join(n) };
    let (reference, searched) = (vec![arm("passage"), arm("rewrite")], vec![arm("novelty")]);
    let rows = science_rows(&reference, &searched).unwrap();
    let names: Vec<(String, Option<i64>)> = rows.iter().map(|r| (r.arm.clone(), r.iteration)).collect();
    assert_eq!(
        names,
        [("base", None), ("passage", None), ("rewrite", None), ("novelty", Some(0)), ("novelty", Some(1))].map(|(a, k)| (a.to_string(), k))
    );
    let get = |a: &str, k: Option<i64>| rows.iter().find(|r| r.arm == a && r.iteration == k).unwrap().clone();
    let passage = [1.0, 0.5, 0.75, 0.5];
    let check = |r: &ScienceRow, acc: &[f64], vs_base: &[f64], vs_passage: Option<&[f64]>| {
        let (a, g) = (bootstrap_mean(acc, RESAMPLES, 0.95, 1), bootstrap_mean(vs_base, RESAMPLES, 0.95, 2));
        assert_eq!((r.accuracy, r.accuracy_low, r.accuracy_high), (a.mean, a.low, a.high), "{}", r.arm);
        assert_eq!((r.gain_vs_base, r.gain_vs_base_low, r.gain_vs_base_high), (g.mean, g.low, g.high), "{}", r.arm);
        assert_eq!(r.differs_from_base, g.low > 0.0 || g.high < 0.0);
        if let Some(p) = vs_passage {
            let d = bootstrap_mean(p, RESAMPLES, 0.95, 3);
            assert_eq!((r.diff_vs_passage, r.diff_vs_passage_low, r.diff_vs_passage_high), (d.mean, d.low, d.high), "{}", r.arm);
        }
        assert_eq!(r.n_passages, 4);
    };
    let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f64>>();
    let p = get("passage", None);
    check(&p, &passage, &diff(&passage, &base), None);
    assert!(p.differs_from_base && p.gain_vs_base_low >= 0.25, "every passage gains at least 0.25: {p:?}");
    assert!(p.diff_vs_passage.is_nan() && !p.differs_from_passage);
    let r = get("rewrite", None);
    check(&r, &base, &[0.0; 4], Some(&diff(&base, &passage)));
    assert!(!r.differs_from_base && r.differs_from_passage && r.diff_vs_passage < 0.0);
    let n0 = [0.0, 0.0, 0.5, 0.5];
    check(&get("novelty", Some(0)), &n0, &diff(&n0, &base), Some(&diff(&n0, &passage)));
    let n1 = [1.0, 0.5, 0.5, 1.0];
    check(&get("novelty", Some(1)), &n1, &diff(&n1, &base), Some(&diff(&n1, &passage)));
    let b = get("base", None);
    assert_eq!(b.accuracy, 0.125);
    assert!(b.gain_vs_base.is_nan() && !b.differs_from_base);

    // The report: the same rows read back from Parquet, the figure, the verdicts in words.
    let out = dir.path().join("report");
    write_science_report(&reference, &searched, &out, Some(3000.0)).unwrap();
    let back: Vec<ScienceRow> = tables::read(&out.join("science.parquet")).unwrap();
    assert_eq!(back.len(), rows.len());
    assert_eq!(back[1].accuracy, rows[1].accuracy);
    assert!(std::fs::metadata(out.join("validation_accuracy.png")).unwrap().len() > 10_000);
    let md = std::fs::read_to_string(out.join("index.md")).unwrap();
    assert!(md.contains("- **passage** is higher than the base model."), "{md}");
    assert!(md.contains("- **rewrite** does not differ from the base model; is lower than training on the passage."), "{md}");
    assert!(md.contains("3000 s (50.0 min)"), "{md}");
}

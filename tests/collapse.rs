//! The collapse analysis: the sentence embedder against Transformers' output (recorded in
//! tests/data/minilm_reference.json), and the `collapse` binary on the paper's released
//! templates (../shared/paper/).

use std::path::PathBuf;
use std::process::Command;

use selfedit::analysis::collapse::cosine01;
use selfedit::experiment::tables::{self, CollapseRow};
use selfedit::runtime::embedder::Embedder;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn minilm_embeddings_match_transformers() {
    let e = Embedder::load(&root().join("models/all-MiniLM-L6-v2"), &candle_core::Device::Cpu).expect("run `make embedder`");
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

#[test]
fn collapse_reads_the_papers_released_templates() {
    let paper = root().join("../shared/paper");
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for name in ["archive", "no_archive"] {
        let input = paper.join(format!("{name}_train_templates_by_iter.json"));
        let out = dir.path().join(format!("{name}.parquet"));
        let status = Command::new(env!("CARGO_BIN_EXE_collapse"))
            .current_dir(root())
            .arg("--templates-json")
            .arg(&input)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let rows: Vec<CollapseRow> = tables::read(&out).unwrap();
        assert_eq!(rows.len(), 5);
        for r in &rows {
            assert_eq!(r.n_templates, 5);
            for v in [r.text_similarity, r.hp_similarity, r.lexical_similarity] {
                let v = v.unwrap();
                assert!((0.0..=1.0).contains(&v), "{v}");
            }
            assert_eq!(r.hp_drift.is_none(), r.iteration == 0);
        }
        results.push(rows);
    }
    // The paper: the archive variant homogenizes: by its last iteration its templates are more
    // alike, in text and in hyperparameters, than the no-archive variant's.
    let (archive, no_archive) = (&results[0][4], &results[1][4]);
    assert!(archive.hp_similarity.unwrap() > no_archive.hp_similarity.unwrap(), "{archive:?} vs {no_archive:?}");
    assert!(archive.text_similarity.unwrap() > no_archive.text_similarity.unwrap(), "{archive:?} vs {no_archive:?}");
}

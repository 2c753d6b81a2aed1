//! The pipeline writes the same tables as before the layered layout: `make pipeline` on
//! `tests/data/same_tables/tiny.toml` gives, table for table, the data that commit 3ce4a0c
//! wrote for `configs/tiny.toml` (digests recorded from that commit's binaries by
//! `record_digests` below). Provenance metadata, times, absolute paths and the columns added
//! since are left out. One digest was re-recorded since, for a deliberate change of the
//! numerics (see `rerecorded` in the digests file).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::ITER0_TABLES as TABLES;
const SKIP: [&str; 8] = ["seconds", "adapter_path", "source_index", "reasoning", "capped", "novelty", "strategy", "crowding"];

fn recorded() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/same_tables/digests.json")
}

fn digests(exp_dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    TABLES.iter().map(|t| (t.to_string(), common::table_digest(&exp_dir.join(t), &SKIP).into())).collect()
}

#[test]
fn tables_equal_those_of_the_flat_layout() {
    let out = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stamp")).parent().unwrap().to_path_buf();
    let run = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--no-print-directory", "pipeline", "CONFIG=tests/data/same_tables/tiny.toml", "BUILD="])
        .arg(format!("OUTPUTS={}", out.path().display()))
        .arg(format!("BIN={}", bin.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(recorded()).unwrap()).unwrap();
    let got = digests(&out.path().join("tiny"));
    let differ: Vec<&str> = TABLES.iter().copied().filter(|t| got[*t] != want["tables"][*t]).collect();
    let detail: Vec<String> = differ.iter().map(|t| format!("{t}: {} (recorded {})", got[*t], want["tables"][*t])).collect();
    assert!(differ.is_empty(), "{detail:?} differ from what commit {} wrote", want["commit"]);
}

/// Records the digests from an experiment folder written by the old binaries:
/// `SELFEDIT_RECORD_FROM=/tmp/old/tiny SELFEDIT_RECORD_COMMIT=3ce4a0c cargo test --release
/// --test same_tables -- --ignored record_digests`.
#[test]
#[ignore]
fn record_digests() {
    let dir = PathBuf::from(std::env::var("SELFEDIT_RECORD_FROM").expect("SELFEDIT_RECORD_FROM=<experiment folder>"));
    let commit = std::env::var("SELFEDIT_RECORD_COMMIT").expect("SELFEDIT_RECORD_COMMIT=<commit>");
    let doc = serde_json::json!({"commit": commit, "config": "configs/tiny.toml at that commit", "tables": digests(&dir)});
    std::fs::write(recorded(), serde_json::to_string_pretty(&doc).unwrap()).unwrap();
}

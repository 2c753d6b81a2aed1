//! The Makefile and the library agree on every output path: `make paths` prints the
//! Makefile's, `Layout` builds the library's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use selfedit::experiment::layout::Shard;
use selfedit::experiment::layout::{Layout, Stage};
use selfedit::experiment::states::Split;
use selfedit::experiment::tables::{AdapterRow, AnswerRow, ArchiveRow, ArticleRow};

fn make_paths(iter: usize, shards: usize) -> HashMap<String, String> {
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--no-print-directory", "-s", "paths", "CONFIG=configs/tiny.toml", "OUTPUTS=/runs/out"])
        .arg(format!("ITER={iter}"))
        .arg(format!("SHARDS={shards}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

#[test]
fn makefile_and_layout_name_the_same_paths() {
    let l = Layout::new(Path::new("/runs/out"), "tiny");
    let p = |s: &str| PathBuf::from(s);
    let m = make_paths(2, 3);
    assert_eq!(p(&m["articles"]), l.articles());
    assert_eq!(p(&m["stamps"]), l.stamps_dir());
    assert_eq!(p(&m["iter"]), l.iter_dir(2, Split::Train));
    assert_eq!(p(&m["validation"]), l.iter_dir(2, Split::Validation));
    assert_eq!(p(&m["previous_archive"]), l.table::<ArchiveRow>(1, Split::Train));
    assert_eq!(p(&m["generator"]), l.generator_dir(1));
    assert_eq!(p(&m["adapters_shard"]), l.shard_table::<AdapterRow>(2, Split::Train, Shard { index: 0, count: 3 }));
    assert_eq!(p(&m["answers_shard"]), l.shard_table::<AnswerRow>(2, Split::Train, Shard { index: 0, count: 3 }));
    assert_eq!(p(&m["collapse"]), l.collapse());
    assert_eq!(p(&m["report"]), l.report_dir());
    assert_eq!(
        l.articles().file_name().unwrap(),
        format!("{}.parquet", <ArticleRow as selfedit::experiment::tables::Table>::NAME).as_str()
    );
    // iteration 0 has no previous archive or generator
    let m0 = make_paths(0, 1);
    assert_eq!((m0["previous_archive"].as_str(), m0["generator"].as_str()), ("", ""));
    // every stage's binary is a target of the build, and every stamped stage has a rule
    let makefile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Makefile")).unwrap();
    let cargo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    for s in Stage::ALL {
        assert!(makefile.contains(&format!("$(BIN)/{} ", s.binary())), "the Makefile never runs {}", s.binary());
        assert!(cargo.contains(&format!("name = \"{}\"", s.binary())), "Cargo.toml has no binary {}", s.binary());
    }
    for s in Stage::stamped() {
        assert!(makefile.contains(&format!("$(STAMPS)/{}.hash", s.name())), "no rule uses the {} stamp", s.name());
    }
}

/// The README's "The tables, column by column" names every column of every table, in the
/// schema's order (the six hyperparameter columns as the word "hyperparameters").
#[test]
fn readme_lists_every_tables_columns_in_order() {
    use selfedit::experiment::tables::*;
    use selfedit::experiment::template::Hyperparameters;
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("### The tables, column by column").nth(1).expect("README has no section on the tables");
    let section = section.split("\n### ").next().unwrap();
    fn check<T: Table>(section: &str) {
        let start = format!("\n- `{}.parquet`", T::NAME);
        let bullet = section.split(start.as_str()).nth(1).unwrap_or_else(|| panic!("README: no bullet for {}.parquet", T::NAME));
        let bullet = bullet.split("\n- `").next().unwrap();
        let mut at = 0;
        let mut hyper_done = false;
        for f in T::schema().fields() {
            let name = f.name().as_str();
            let needle = if Hyperparameters::NAMES.contains(&name) {
                if hyper_done {
                    continue;
                }
                hyper_done = true;
                " hyperparameters".to_string()
            } else {
                format!("`{name}`")
            };
            let found = bullet[at..]
                .find(&needle)
                .unwrap_or_else(|| panic!("README's {}.parquet bullet lacks {needle} (or lists it out of the schema's order)", T::NAME));
            at += found + needle.len();
        }
    }
    check::<ArticleRow>(section);
    check::<TemplateRow>(section);
    check::<SelfEditRow>(section);
    check::<AdapterRow>(section);
    check::<AnswerRow>(section);
    check::<ScoreRow>(section);
    check::<TemplateStatsRow>(section);
    check::<ArchiveRow>(section);
    check::<SftRow>(section);
    check::<CollapseRow>(section);
    check::<ScienceRow>(section);
}

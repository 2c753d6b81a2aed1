//! Cross-iteration summaries with polars: the tables of every iteration are scanned lazily
//! as one frame, so "accuracy per iteration" is one query.

use std::path::Path;

use anyhow::Context;
use polars::prelude::*;

/// Per iteration: templates, best and mean template accuracy, mean normalized gain, win
/// rate, and the base model's accuracy, from `iter*/template_stats.parquet` under `dir`.
pub fn per_iteration(dir: &Path) -> anyhow::Result<DataFrame> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("iter")))
        .map(|p| p.join("template_stats.parquet"))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{}: no iter*/template_stats.parquet yet (run `make`)", dir.display());
    let frames = files
        .iter()
        .map(|f| LazyFrame::scan_parquet(f.as_str().into(), ScanArgsParquet::default()))
        .collect::<PolarsResult<Vec<_>>>()?;
    let all = concat(frames, UnionArgs::default())?;
    let out = all
        .group_by([col("iteration")])
        .agg([
            len().alias("templates"),
            col("mean_accuracy").max().alias("best_accuracy"),
            col("mean_accuracy").mean().alias("mean_accuracy"),
            col("normalized_gain").mean().alias("mean_normalized_gain"),
            col("win_rate").mean().alias("mean_win_rate"),
            col("base_accuracy").first().alias("base_accuracy"),
        ])
        .sort(["iteration"], SortMultipleOptions::default())
        .collect()?;
    Ok(out)
}

//! Cross-iteration summaries with polars: the tables of every iteration are scanned lazily
//! as one frame, so "accuracy per iteration" is one query.

use std::path::Path;

use polars::prelude::*;

use crate::experiment::layout::Layout;
use crate::experiment::states::Split;
use crate::experiment::tables::TemplateStatsRow;

/// Per iteration: templates, best and mean template accuracy, mean normalized gain, win
/// rate, and the base model's accuracy, from `iter*/template_stats.parquet` under `dir`.
pub fn per_iteration(dir: &Path) -> anyhow::Result<DataFrame> {
    anyhow::ensure!(dir.is_dir(), "{} is not an experiment folder (run `make`)", dir.display());
    let layout = Layout::at(dir);
    let files: Vec<String> = layout
        .iterations_with::<TemplateStatsRow>(Split::Train)
        .into_iter()
        .map(|k| layout.table::<TemplateStatsRow>(k, Split::Train).display().to_string())
        .collect();
    anyhow::ensure!(!files.is_empty(), "{}: no iter*/template_stats.parquet yet (run `make`)", dir.display());
    let frames =
        files.iter().map(|f| LazyFrame::scan_parquet(f.as_str().into(), ScanArgsParquet::default())).collect::<PolarsResult<Vec<_>>>()?;
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

//! Stage 6: accuracies → `scores.parquet` (per self-edit) and `template_stats.parquet`.
mod common;

use selfedit::experiment::stages;

common::stage_main!("Score self-edits and templates from answers.parquet", [], |ctx, _cli| stages::score::run(&ctx));

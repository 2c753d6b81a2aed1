//! Stage 3: every (template, article, completion) → training sequences in `self_edits.parquet`.
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Synthesize self-edits (training sequences) into self_edits.parquet", [model: ModelArgs], |ctx, cli| stages::synthesize::run(&ctx, &cli.model));

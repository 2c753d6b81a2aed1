//! Stage 2: the model writes this iteration's self-edit templates → `templates.parquet`.
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Generate self-edit templates (JSON-constrained) into templates.parquet", [model: ModelArgs, archive: ArchiveArgs], |ctx, cli| stages::templates::run(&ctx, &cli.model, &cli.archive));

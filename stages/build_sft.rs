//! Stage 8: this iteration's best self-edits → supervised examples for the generator
//! (`sft.parquet`).
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Build the generator's supervised examples from the best self-edits", [archive: ArchiveArgs], |ctx, cli| stages::sft::run(&ctx, &cli.archive));

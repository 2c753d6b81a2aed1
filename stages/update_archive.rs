//! Stage 7: the archive plus this iteration's evaluated templates → `archive.parquet`.
mod common;

use selfedit::experiment::stages;

common::stage_main!("Add this iteration's templates to the archive", [], |ctx, _cli| stages::archive::run(&ctx));

//! Stage 1: SQuAD passages (any of the three shapes) → `articles.parquet`.
mod common;

use selfedit::experiment::stages;

common::stage_main!("Select the experiment's passages into articles.parquet", [], |ctx, _cli| stages::prepare::run(&ctx));

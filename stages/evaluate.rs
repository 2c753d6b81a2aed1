//! Stage 5: the base model and every adapter answer their article's questions closed-book
//! → `answers.parquet`.
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Answer every article's questions with the base model and each adapter into answers.parquet", [model: ModelArgs, shard: ShardArgs], |ctx, cli| stages::evaluate::run(&ctx, &cli.model, &cli.shard));

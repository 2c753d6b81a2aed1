//! Stage 4: one LoRA adapter per self-edit (PEFT format under adapters/) → `adapters.parquet`.
//! Adapters already on disk with the same inputs are reused, so a killed run resumes.
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Train one LoRA adapter per self-edit into adapters/ and adapters.parquet", [model: ModelArgs, shard: ShardArgs], |ctx, cli| stages::train::run(&ctx, &cli.model, &cli.shard));

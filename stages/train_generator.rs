//! Stage 9: fine-tune the generator on `sft.parquet`, merge it, and save the next
//! iteration's model as a Hugging Face folder (`generator/`); resumable from checkpoints.
mod common;

use selfedit::experiment::cli::*;
use selfedit::experiment::stages;

common::stage_main!("Fine-tune and merge the generator for the next iteration", [model: ModelArgs], |ctx, cli| stages::generator::run(&ctx, &cli.model));

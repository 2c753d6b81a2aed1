//! Stage 4: one LoRA adapter per self-edit (PEFT format under adapters/) → `adapters.parquet`.
//! Adapters already on disk with the same inputs are reused, so a killed run resumes.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{ModelArgs, ShardArgs, StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Train one LoRA adapter per self-edit into adapters/ and adapters.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    shard: ShardArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::train::run(&StageContext::open(&cli.stage)?, &cli.model, &cli.shard)
}

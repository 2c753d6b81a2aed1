//! Stage 5: the base model and every adapter answer their article's questions closed-book
//! → `answers.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{ModelArgs, ShardArgs, StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Answer every article's questions with the base model and each adapter into answers.parquet")]
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
    stages::evaluate::run(&StageContext::open(&cli.stage)?, &cli.model, &cli.shard)
}

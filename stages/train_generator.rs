//! Stage 9: fine-tune the generator on `sft.parquet`, merge it, and save the next
//! iteration's model as a Hugging Face folder (`generator/`); resumable from checkpoints.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{ModelArgs, StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Fine-tune and merge the generator for the next iteration")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    model: ModelArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::generator::run(&StageContext::open(&cli.stage)?, &cli.model)
}

//! Stage 3: every (template, article, completion) → training sequences in `self_edits.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{ModelArgs, StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Synthesize self-edits (training sequences) into self_edits.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    model: ModelArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::synthesize::run(&StageContext::open(&cli.stage)?, &cli.model)
}

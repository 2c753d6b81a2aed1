//! Stage 6: accuracies → `scores.parquet` (per self-edit) and `template_stats.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Score self-edits and templates from answers.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::score::run(&StageContext::open(&cli.stage)?)
}

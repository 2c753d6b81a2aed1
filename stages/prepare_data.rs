//! Stage 1: SQuAD passages (any of the three shapes) → `articles.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Select the experiment's passages into articles.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::prepare::run(&StageContext::open(&cli.stage)?)
}

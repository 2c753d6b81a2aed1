//! Stage 7: the archive plus this iteration's evaluated templates → `archive.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Add this iteration's templates to the archive")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::archive::run(&StageContext::open(&cli.stage)?)
}

//! Stage 8: this iteration's best self-edits → supervised examples for the generator
//! (`sft.parquet`).
mod common;

use clap::Parser;
use selfedit::experiment::cli::{StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Build the generator's supervised examples from the best self-edits")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// The archive the iteration's templates were conditioned on (archive variant).
    #[arg(long)]
    archive: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::sft::run(&StageContext::open(&cli.stage)?, cli.archive.as_deref())
}

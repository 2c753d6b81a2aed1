//! Stage 2: the model writes this iteration's self-edit templates → `templates.parquet`.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{ModelArgs, StageArgs, StageContext};
use selfedit::experiment::stages;

#[derive(Parser)]
#[command(about = "Generate self-edit templates (JSON-constrained) into templates.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// The archive to condition on (archive variant): the previous iteration's archive.parquet.
    #[arg(long)]
    archive: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    stages::templates::run(&StageContext::open(&cli.stage)?, &cli.model, cli.archive.as_deref())
}

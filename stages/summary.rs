//! Prints an experiment's results across iterations, one line per iteration: a lazy polars
//! query over every `iter*/template_stats.parquet` (and the base model's accuracy).
use clap::Parser;

#[derive(Parser)]
#[command(about = "Summarize an experiment's template statistics across iterations")]
struct Cli {
    /// The experiment's outputs folder, e.g. outputs/tiny.
    dir: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let df = selfedit::summary::per_iteration(&cli.dir)?;
    println!("{df}");
    Ok(())
}

//! `make report`: plots (PNG, SVG) and index.md for one or more experiment folders.
mod common;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Draw the report of experiment folders (accuracy, collapse, gains)")]
struct Cli {
    /// Experiment folders, e.g. outputs/tiny-archive outputs/tiny.
    #[arg(required = true)]
    experiments: Vec<std::path::PathBuf>,
    #[arg(long)]
    out: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    let written = selfedit::analysis::report::write_report(&cli.experiments, &cli.out)?;
    println!("report: wrote {} files under {} (open index.md)", written.len(), cli.out.display());
    Ok(())
}

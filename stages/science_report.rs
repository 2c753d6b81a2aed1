//! `make science`'s last step: intervals, the figure and index.md over every arm.
mod common;

use clap::Parser;
use selfedit::analysis::science::{write_science_report, Arm};

#[derive(Parser)]
#[command(about = "Report the science experiment: validation accuracy with 95% bootstrap intervals, reference arms as bands")]
struct Cli {
    /// A reference arm, name=outputs/<experiment> (scored on the validation passages at iteration 0);
    /// the arm named "passage" is the one every other is compared with.
    #[arg(long = "reference", required = true, value_parser = Arm::parse)]
    reference: Vec<Arm>,
    /// A searched variant, name=outputs/<experiment> (its validation scores, every iteration).
    #[arg(long = "searched", value_parser = Arm::parse)]
    searched: Vec<Arm>,
    #[arg(long)]
    out: std::path::PathBuf,
    /// The measured wall time of the experiment, printed in index.md.
    #[arg(long)]
    seconds: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    let rows = write_science_report(&cli.reference, &cli.searched, &cli.out, cli.seconds)?;
    println!("science-report: wrote {} rows to {}/science.parquet, validation_accuracy.png and index.md", rows.len(), cli.out.display());
    Ok(())
}

//! Prints an experiment's results across iterations, one line per iteration: a lazy polars
//! query over every `iter*/template_stats.parquet` (and the base model's accuracy).
mod common;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Summarize an experiment's template statistics across iterations")]
struct Cli {
    /// The experiment's outputs folder, e.g. outputs/tiny.
    dir: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    let df = selfedit::analysis::summary::per_iteration(&cli.dir)?;
    let names: Vec<String> = df.get_column_names().iter().map(|n| n.to_string()).collect();
    println!("{}", names.join("\t"));
    for row in 0..df.height() {
        let cells: Vec<String> = df
            .columns()
            .iter()
            .map(|c| match c.get(row) {
                Ok(polars::prelude::AnyValue::Float64(x)) => format!("{x:.4}"),
                Ok(v) => v.to_string(),
                Err(_) => "?".into(),
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
    Ok(())
}

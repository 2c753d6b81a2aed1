//! The collapse analysis: text, hyperparameter and lexical similarity of each iteration's
//! templates → a Parquet table with one row per iteration.
//!
//! `collapse --templates-json FILE --out FILE.parquet` reads the paper's published layout (a
//! JSON list of iterations, each a list of templates); `collapse --experiment outputs/NAME
//! --out …` reads `iter*/templates.parquet` of a selfedit run.
use std::path::PathBuf;

mod common;

use anyhow::Context;
use clap::Parser;
use selfedit::analysis::collapse::{self, TemplateSource};
use selfedit::runtime::embedder::Embedder;

#[derive(Parser)]
#[command(about = "Measure how alike each iteration's templates are (text, hyperparameters, words)")]
struct Cli {
    /// A JSON list of lists of {data_creation_instruction, hyperparameters} (paper layout).
    #[arg(long, conflicts_with = "experiment")]
    templates_json: Option<PathBuf>,
    /// A selfedit experiment's outputs folder (reads iter*/templates.parquet).
    #[arg(long)]
    experiment: Option<PathBuf>,
    /// Where to write the table (collapse.parquet).
    #[arg(long)]
    out: PathBuf,
    /// The sentence embedder folder (all-MiniLM-L6-v2, from `make embedder`).
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    embedder: PathBuf,
    /// Skip the text similarity (no embedder needed).
    #[arg(long)]
    no_embedder: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    common::init();
    let source = match (&cli.templates_json, &cli.experiment) {
        (Some(p), _) => TemplateSource::PaperJson(p),
        (None, Some(dir)) => TemplateSource::Experiment(dir),
        (None, None) => anyhow::bail!("give --templates-json FILE or --experiment outputs/NAME"),
    };
    let embedder = match cli.no_embedder {
        true => None,
        false => Some(
            Embedder::load(&cli.embedder, &candle_core::Device::Cpu).context("loading the sentence embedder (or pass --no-embedder)")?,
        ),
    };
    let rows = collapse::run(source, embedder.as_ref().map(|e| (e, cli.embedder.as_path())), &cli.out)?;
    for r in &rows {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        let (t, h, l) = (f(r.text_similarity), f(r.hp_similarity), f(r.lexical_similarity));
        println!("iter {}: {} templates, text {t}, hyperparameters {h}, lexical {l}", r.iteration, r.n_templates);
    }
    println!("collapse: wrote {} ({} rows)", cli.out.display(), rows.len());
    Ok(())
}

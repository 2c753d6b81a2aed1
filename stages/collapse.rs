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
use selfedit::analysis::collapse;
use selfedit::experiment::layout::Layout;
use selfedit::experiment::states::Split;
use selfedit::experiment::tables::{self, CollapseRow, Provenance, TemplateRow};
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
    let (source, iterations) = match (&cli.templates_json, &cli.experiment) {
        (Some(p), _) => (p.display().to_string(), collapse::read_templates_json(p)?),
        (None, Some(dir)) => {
            let layout = Layout::at(dir);
            let mut iters = Vec::new();
            for k in layout.iterations_with::<TemplateRow>(Split::Train) {
                iters.push(collapse::from_template_rows(&tables::read::<TemplateRow>(&layout.table::<TemplateRow>(k, Split::Train))?));
            }
            anyhow::ensure!(!iters.is_empty(), "{}: no iter0/templates.parquet", dir.display());
            (dir.display().to_string(), iters)
        }
        (None, None) => anyhow::bail!("give --templates-json FILE or --experiment outputs/NAME"),
    };
    let embedder = if cli.no_embedder {
        None
    } else {
        Some(Embedder::load(&cli.embedder, &candle_core::Device::Cpu).context("loading the sentence embedder (or pass --no-embedder)")?)
    };
    let rows: Vec<CollapseRow> = collapse::analyse(&iterations, embedder.as_ref())?
        .into_iter()
        .map(|r| CollapseRow {
            source: source.clone(),
            iteration: r.iteration as i64,
            n_templates: r.n_templates as i64,
            text_similarity: r.text_similarity,
            hp_similarity: r.hp_similarity,
            lexical_similarity: r.lexical_similarity,
            text_drift: r.text_drift,
            hp_drift: r.hp_drift,
            lexical_drift: r.lexical_drift,
        })
        .collect();
    let prov = Provenance { stage: "collapse".into(), model: cli.embedder.display().to_string(), ..Default::default() };
    tables::write(&cli.out, &rows, &prov)?;
    for r in &rows {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "iter {}: {} templates, text {}, hyperparameters {}, lexical {}",
            r.iteration,
            r.n_templates,
            f(r.text_similarity),
            f(r.hp_similarity),
            f(r.lexical_similarity)
        );
    }
    println!("collapse: wrote {} ({} rows)", cli.out.display(), rows.len());
    Ok(())
}

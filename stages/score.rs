//! Stage 5b: accuracies → `scores.parquet` (per self-edit) and `template_stats.parquet`
//! (every statistic of the paper, per template).
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, AdapterRow, AnswerRow, ScoreRow, SelfEditRow, TemplateRow, TemplateStatsRow};

#[derive(Parser)]
#[command(about = "Score self-edits and templates from answers.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let dir = cli.stage.iter_dir(&exp);
    let templates: Vec<TemplateRow> = tables::read(&dir.join("templates.parquet"))?;
    let edits: Vec<SelfEditRow> = tables::read(&dir.join("self_edits.parquet"))?;
    let adapters: Vec<AdapterRow> = tables::read(&dir.join("adapters.parquet"))?;
    let answers: Vec<AnswerRow> = tables::read(&dir.join("answers.parquet"))?;
    let (scores, stats) = selfedit::pipeline::score(cli.stage.iter, &templates, &edits, &adapters, &answers)?;
    let prov = stage::provenance(&exp, "evaluate", cli.stage.iter)?;
    let scores_path = dir.join("scores.parquet");
    tables::write::<ScoreRow>(&scores_path, &scores, &prov)?;
    let stats_path = dir.join("template_stats.parquet");
    tables::write::<TemplateStatsRow>(&stats_path, &stats, &prov)?;
    let best = stats.iter().map(|s| s.mean_accuracy).fold(f64::NAN, f64::max);
    stage::done("score", &stats_path, stats.len(), &format!("best mean accuracy {best:.3}; also {}", scores_path.display()));
    Ok(())
}

//! Stage 6: the archive (seed templates, or the previous iteration's archive) plus this
//! iteration's evaluated templates, sorted by accuracy → `archive.parquet`.
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, ArchiveRow, TemplateRow, TemplateStatsRow};

#[derive(Parser)]
#[command(about = "Add this iteration's templates to the archive")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let dir = cli.stage.iter_dir(&exp);
    let previous: Vec<ArchiveRow> = if cli.stage.iter == 0 {
        selfedit::pipeline::seed_archive(&exp.config.archive_seed)?
    } else {
        tables::read(&exp.iter_dir(&cli.stage.outputs, cli.stage.iter - 1).join("archive.parquet"))?
    };
    let templates: Vec<TemplateRow> = tables::read(&dir.join("templates.parquet"))?;
    let stats: Vec<TemplateStatsRow> = tables::read(&dir.join("template_stats.parquet"))?;
    let rows = selfedit::pipeline::update_archive(previous, cli.stage.iter, &templates, &stats);
    let path = dir.join("archive.parquet");
    tables::write(&path, &rows, &stage::provenance(&exp, "archive", cli.stage.iter)?)?;
    stage::done("archive", &path, rows.len(), &format!("best {:.3} ({})", rows[0].accuracy, rows[0].template_id));
    Ok(())
}

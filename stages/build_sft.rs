//! Stage 7: this iteration's best self-edits → supervised examples for the generator
//! (`sft.parquet`).
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, ArchiveRow, ArticleRow, ScoreRow, SelfEditRow, SftRow, TemplateRow};

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
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let c = &exp.config;
    let dir = cli.stage.iter_dir(&exp);
    let archive: Option<Vec<ArchiveRow>> = match (&cli.archive, c.variant) {
        (Some(p), _) => Some(tables::read(p)?),
        (None, selfedit::config::Variant::Archive) => Some(selfedit::pipeline::update_archive(
            selfedit::pipeline::seed_archive(&c.archive_seed)?, cli.stage.iter, &[], &[])),
        _ => None,
    };
    let prompts = selfedit::prompts::Prompts::load(&c.prompts_dir)?;
    let templates: Vec<TemplateRow> = tables::read(&dir.join("templates.parquet"))?;
    let edits: Vec<SelfEditRow> = tables::read(&dir.join("self_edits.parquet"))?;
    let scores: Vec<ScoreRow> = tables::read(&dir.join("scores.parquet"))?;
    let articles: Vec<ArticleRow> = tables::read(&cli.stage.exp_dir(&exp).join("articles.parquet"))?;
    let rows = selfedit::pipeline::build_sft(c, &prompts, archive.as_deref(), &templates, &edits, &scores, &articles)?;
    let path = dir.join("sft.parquet");
    tables::write::<SftRow>(&path, &rows, &stage::provenance(&exp, "sft", cli.stage.iter)?)?;
    stage::done("sft", &path, rows.len(), "supervised examples");
    Ok(())
}

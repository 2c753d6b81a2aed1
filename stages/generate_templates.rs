//! Stage 2: the model writes this iteration's self-edit templates → `templates.parquet`.
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, ArchiveRow, TemplateRow};

#[derive(Parser)]
#[command(about = "Generate self-edit templates (JSON-constrained) into templates.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// The archive to condition on (archive variant): the previous iteration's archive.parquet.
    #[arg(long)]
    archive: Option<std::path::PathBuf>,
    /// The generator model, when it is not the config's (iterations after the first).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let c = &exp.config;
    let prompts = selfedit::prompts::Prompts::load(&c.prompts_dir)?;
    let archive: Option<Vec<ArchiveRow>> = match (&cli.archive, c.variant) {
        (Some(p), _) => Some(tables::read(p)?),
        (None, selfedit::config::Variant::Archive) => Some(selfedit::pipeline::update_archive(
            selfedit::pipeline::seed_archive(&c.archive_seed)?, cli.stage.iter, &[], &[])),
        _ => None,
    };
    let device = selfedit::checkpoint::parse_device(&c.model.device)?;
    let model_path = cli.model.clone().unwrap_or_else(|| c.model.path.clone());
    let model = if c.variant.is_baseline() { None } else { Some(selfedit::load(&model_path, &device)?) };
    let rows: Vec<TemplateRow> = match &model {
        Some(m) => {
            let bar = stage::progress(c.search.templates_per_iteration, "templates");
            let rows = selfedit::pipeline::generate_templates(&exp, &prompts, m, cli.stage.iter, archive.as_deref(), |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            rows
        }
        None => vec![selfedit::pipeline::baseline_template(c, &prompts, cli.stage.iter)?],
    };
    let path = cli.stage.iter_dir(&exp).join("templates.parquet");
    tables::write(&path, &rows, &stage::provenance(&exp, "templates", cli.stage.iter)?)?;
    let valid = rows.iter().filter(|r| r.valid).count();
    stage::done("templates", &path, rows.len(), &format!("{valid} valid"));
    Ok(())
}

//! Stage 3: every (template, article, completion) → training sequences in `self_edits.parquet`.
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, ArticleRow, SelfEditRow, TemplateRow};

#[derive(Parser)]
#[command(about = "Synthesize self-edits (training sequences) into self_edits.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// The generator model, when it is not the config's (iterations after the first).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let c = &exp.config;
    let dir = cli.stage.iter_dir(&exp);
    let templates: Vec<TemplateRow> = tables::read(&dir.join("templates.parquet"))?;
    let articles: Vec<ArticleRow> = tables::read(&cli.stage.exp_dir(&exp).join("articles.parquet"))?;
    let prompts = selfedit::prompts::Prompts::load(&c.prompts_dir)?;
    let device = selfedit::checkpoint::parse_device(&c.model.device)?;
    let model = selfedit::load(&cli.model.clone().unwrap_or_else(|| c.model.path.clone()), &device)?;
    let n = templates.iter().filter(|t| t.valid).count() * articles.iter().filter(|a| a.split == exp.split).count() * c.search.completions_per_template;
    let bar = stage::progress(n, "self-edits");
    let rows = selfedit::pipeline::synthesize(&exp, &prompts, &model, &templates, &articles, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let path = dir.join("self_edits.parquet");
    tables::write::<SelfEditRow>(&path, &rows, &stage::provenance(&exp, "synthesize", cli.stage.iter)?)?;
    let valid = rows.iter().filter(|r| r.valid).count();
    stage::done("synthesize", &path, rows.len(), &format!("{valid} with usable sequences"));
    Ok(())
}

//! Stage 1: SQuAD passages (any of the three shapes) → `articles.parquet`.
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, ArticleRow};

#[derive(Parser)]
#[command(about = "Select the experiment's passages into articles.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let rows = selfedit::pipeline::prepare_articles(&exp)?;
    let path = cli.stage.exp_dir(&exp).join("articles.parquet");
    tables::write::<ArticleRow>(&path, &rows, &stage::provenance(&exp, "prepare", 0)?)?;
    let questions: usize = rows.iter().map(|r| r.questions.len()).sum();
    stage::done("prepare", &path, rows.len(), &format!("{questions} questions"));
    Ok(())
}

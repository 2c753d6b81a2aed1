//! Stage 1, prepare: select the experiment's passages → `articles.parquet`.

use anyhow::Context;

use crate::experiment::cli::StageContext;
use crate::experiment::config::Experiment;
use crate::experiment::data;
use crate::experiment::layout::Stage;
use crate::experiment::states::Split;
use crate::experiment::tables::ArticleRow;

/// The training passages, then the validation passages when the config has them.
pub fn prepare_articles(exp: &Experiment) -> anyhow::Result<Vec<ArticleRow>> {
    let d = &exp.config.data;
    let passages = data::load_passages(&d.train_path)?;
    let mut articles = data::select(&passages, d.train_passages, d.start, d.seed, Split::Train)
        .with_context(|| format!("selecting from {}", d.train_path.display()))?;
    if let (Some(path), true) = (&d.validation_path, d.validation_passages > 0) {
        let passages = data::load_passages(path)?;
        articles.extend(
            data::select(&passages, d.validation_passages, d.start, d.seed, Split::Validation)
                .with_context(|| format!("selecting from {}", path.display()))?,
        );
    }
    Ok(articles)
}

pub fn run(ctx: &StageContext) -> anyhow::Result<()> {
    let rows = prepare_articles(&ctx.exp)?;
    let questions: usize = rows.iter().map(|a| a.questions.len()).sum();
    ctx.write(Stage::Prepare, &ctx.layout.articles(), &rows, &format!("{questions} questions"))
}

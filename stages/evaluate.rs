//! Stage 5: the base model and every adapter answer their article's questions closed-book
//! → `answers.parquet`.
use clap::Parser;
use selfedit::pipeline::Shard;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, AdapterRow, AnswerRow, ArticleRow, SelfEditRow};

#[derive(Parser)]
#[command(about = "Answer every article's questions with the base model and each adapter into answers.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// Evaluate only models i, i+n, …: writes answers.shard-i-of-n.parquet.
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// This iteration's model, when it is not the config's (iterations after the first).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Merge the N shard files into one table instead of computing.
    #[arg(long)]
    merge: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let shard = Shard::parse(&cli.shard)?;
    let exp = cli.stage.experiment()?;
    let c = &exp.config;
    let dir = cli.stage.iter_dir(&exp);
    if let Some(n) = cli.merge {
        let mut rows: Vec<AnswerRow> = Vec::new();
        for i in 0..n {
            rows.extend(tables::read::<AnswerRow>(&dir.join(format!("answers.shard-{i}-of-{n}.parquet")))?);
        }
        let path = dir.join("answers.parquet");
        tables::write(&path, &rows, &stage::provenance(&exp, "evaluate", cli.stage.iter)?)?;
        stage::done("merge", &path, rows.len(), &format!("{n} shards"));
        return Ok(());
    }
    let articles: Vec<ArticleRow> = tables::read(&cli.stage.exp_dir(&exp).join("articles.parquet"))?;
    let edits: Vec<SelfEditRow> = tables::read(&dir.join("self_edits.parquet"))?;
    let adapters: Vec<AdapterRow> = tables::read(&dir.join("adapters.parquet"))?;
    let prompts = selfedit::prompts::Prompts::load(&c.prompts_dir)?;
    let device = selfedit::checkpoint::parse_device(&c.model.device)?;
    let model = selfedit::load(&cli.model.clone().unwrap_or_else(|| c.model.path.clone()), &device)?;
    let judge_model = match (&c.eval.grader, &c.eval.judge_model) {
        (selfedit::config::GraderKind::Judge, Some(p)) => Some(selfedit::load(p, &device)?),
        _ => None,
    };
    let judge = match c.eval.grader {
        selfedit::config::GraderKind::Judge => Some(selfedit::pipeline::Judge::new(judge_model.as_ref().unwrap_or(&model))?),
        _ => None,
    };
    let targets = selfedit::pipeline::eval_targets(&articles, &adapters, &edits, &exp.split);
    let mine = (0..targets.len()).filter(|i| shard.owns(*i)).count();
    let bar = stage::progress(mine, "models evaluated");
    let rows = selfedit::pipeline::evaluate(&exp, &prompts, &model, &articles, &targets, judge.as_ref(), shard, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let path = if shard.count == 1 { dir.join("answers.parquet") } else { dir.join(format!("answers.shard-{}-of-{}.parquet", shard.index, shard.count)) };
    tables::write::<AnswerRow>(&path, &rows, &stage::provenance(&exp, "evaluate", cli.stage.iter)?)?;
    let correct = rows.iter().filter(|r| r.correct).count();
    stage::done("evaluate", &path, rows.len(), &format!("{correct} correct, grader {:?}", c.eval.grader));
    Ok(())
}

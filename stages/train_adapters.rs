//! Stage 4: one LoRA adapter per self-edit (PEFT format under adapters/) → `adapters.parquet`.
//! Adapters already on disk are not trained again, so a killed run resumes where it stopped.
use clap::Parser;
use selfedit::pipeline::Shard;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, AdapterRow, ArticleRow, SelfEditRow, TemplateRow};

#[derive(Parser)]
#[command(about = "Train one LoRA adapter per self-edit into adapters/ and adapters.parquet")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// Train only self-edits i, i+n, …: writes adapters.shard-i-of-n.parquet.
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
        let mut rows: Vec<AdapterRow> = Vec::new();
        for i in 0..n {
            rows.extend(tables::read::<AdapterRow>(&dir.join(format!("adapters.shard-{i}-of-{n}.parquet")))?);
        }
        let path = dir.join("adapters.parquet");
        tables::write(&path, &rows, &stage::provenance(&exp, "train", cli.stage.iter)?)?;
        stage::done("merge", &path, rows.len(), &format!("{n} shards"));
        return Ok(());
    }
    let templates: Vec<TemplateRow> = tables::read(&dir.join("templates.parquet"))?;
    let edits: Vec<SelfEditRow> = tables::read(&dir.join("self_edits.parquet"))?;
    let articles: Vec<ArticleRow> = tables::read(&cli.stage.exp_dir(&exp).join("articles.parquet"))?;
    let device = selfedit::checkpoint::parse_device(&c.model.device)?;
    let model = selfedit::load(&cli.model.clone().unwrap_or_else(|| c.model.path.clone()), &device)?;
    let mine = (0..edits.len()).filter(|i| shard.owns(*i)).count();
    let bar = stage::progress(mine, "adapters");
    let rows = selfedit::pipeline::train_adapters(&exp, &model, &templates, &edits, &articles, &dir.join("adapters"), shard, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let path = if shard.count == 1 { dir.join("adapters.parquet") } else { dir.join(format!("adapters.shard-{}-of-{}.parquet", shard.index, shard.count)) };
    tables::write::<AdapterRow>(&path, &rows, &stage::provenance(&exp, "train", cli.stage.iter)?)?;
    let trained = rows.iter().filter(|r| r.status == "trained").count();
    let empty = rows.iter().filter(|r| r.status == "empty").count();
    stage::done("train", &path, rows.len(), &format!("{trained} trained, {empty} empty, {} failed", rows.len() - trained - empty));
    Ok(())
}

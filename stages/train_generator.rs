//! Stage 8: fine-tune the generator on `sft.parquet` (LoRA, loss on the answer only), merge
//! it and save the next iteration's model as a Hugging Face folder (`generator/`).
//! Checkpoints every `sft.checkpoint_every` steps: a killed run resumes where it stopped.
use clap::Parser;
use selfedit::stage::{self, StageArgs};
use selfedit::tables::{self, SftRow};

#[derive(Parser)]
#[command(about = "Fine-tune and merge the generator for the next iteration")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
    /// This iteration's model, when it is not the config's.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let c = &exp.config;
    let dir = cli.stage.iter_dir(&exp);
    let examples: Vec<SftRow> = tables::read(&dir.join("sft.parquet"))?;
    let device = selfedit::checkpoint::parse_device(&c.model.device)?;
    let model = selfedit::load(&cli.model.clone().unwrap_or_else(|| c.model.path.clone()), &device)?;
    let bar = stage::progress(0, "generator SFT");
    let out = dir.join("generator");
    let report = selfedit::pipeline::train_generator(c, &model, &examples, &dir.join("sft_checkpoint"), &out, |step, total, _| {
        bar.set_length(total as u64);
        bar.set_position(step as u64);
    })?;
    bar.finish_and_clear();
    let detail = match report {
        Some(r) => format!("{} examples, {} steps, loss {:.3} -> {:.3}", examples.len(), r.steps,
            r.step_losses.first().unwrap_or(&f32::NAN), r.step_losses.last().unwrap_or(&f32::NAN)),
        None => "no examples: the model is carried over unchanged".into(),
    };
    println!("train-generator: wrote {} ({detail})", out.display());
    Ok(())
}

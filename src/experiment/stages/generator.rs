//! Stage 9, generator: fine-tune the generator on `sft.parquet` (LoRA, loss on the answer
//! only), merge it and save the next iteration's model as a Hugging Face folder
//! (`generator/`): the "M" step of ReST-EM. Checkpoints every `sft.checkpoint_every` steps,
//! so a killed run resumes where it stopped.

use std::path::Path;

use crate::experiment::cli::{progress, ModelArgs, StageContext};
use crate::experiment::config::ExperimentConfig;
use crate::experiment::tables::SftRow;
use crate::runtime::formats::LoadedModel;
use crate::runtime::lora::{LoraAdapter, LoraConfig};
use crate::runtime::tokenizer::ChatMessage;
use crate::runtime::training::{TrainConfig, TrainExample};
use crate::util::hash::derive_seed;

/// Fine-tunes the generator on the SFT examples (loss on the assistant turn only), merges
/// the adapter and saves the merged model as a Hugging Face folder at `out`. Checkpoints
/// under `checkpoint_dir` let a killed run resume. Returns the training report, or `None`
/// when there was nothing to learn from (the model is then saved unchanged).
pub fn train_generator(
    cfg: &ExperimentConfig,
    model: &LoadedModel,
    examples: &[SftRow],
    checkpoint_dir: &Path,
    out: &Path,
    on_step: impl FnMut(usize, usize, f32),
) -> anyhow::Result<Option<crate::runtime::training::TrainReport>> {
    let tok = &model.tokenizer;
    let end = tok.end_of_turn().or_else(|| tok.stop_ids.first().copied());
    let mut train = Vec::new();
    for ex in examples {
        let prompt = tok.encode_chat(&[ChatMessage::user(ex.prompt.clone())], true)?;
        let mut ids = prompt.clone();
        ids.extend(tok.encode(&ex.completion)?);
        ids.extend(end);
        train.push(TrainExample { loss_from: prompt.len(), ids });
    }
    let mut decoder = model.decoder.clone();
    let report = if train.is_empty() {
        None
    } else {
        let s = &cfg.sft;
        let lora = LoraConfig {
            rank: s.lora_rank,
            alpha: s.lora_alpha,
            dropout: s.lora_dropout,
            targets: s.target_modules.clone(),
            use_rslora: false,
        };
        let seed = derive_seed(cfg.seed, &format!("sft/{}", out.display()));
        let mut adapter = LoraAdapter::new(&decoder.cfg, lora, seed, model.device())?;
        let tc = TrainConfig {
            learning_rate: s.learning_rate,
            epochs: s.num_epochs,
            grad_accum: s.gradient_accumulation_steps,
            max_len: s.max_len,
            seed,
            max_grad_norm: cfg.training.max_grad_norm,
        };
        let ckpt = crate::runtime::training::Checkpointing { dir: checkpoint_dir, every: s.checkpoint_every };
        let mut on_step = on_step;
        let report = crate::runtime::training::train_lora_with(&model.decoder, &mut adapter, &train, &tc, Some(&ckpt), |a, b, c| {
            on_step(a, b, c);
            std::ops::ControlFlow::Continue(())
        })?;
        adapter.merge_into(&mut decoder)?;
        Some(report)
    };
    crate::runtime::formats::hf::save_hf(&decoder, tok, out)?;
    Ok(report)
}

/// `train-generator`: writes `generator/` after iteration `ctx.iteration`.
pub fn run(ctx: &StageContext, model: &ModelArgs) -> anyhow::Result<()> {
    let examples: Vec<SftRow> = ctx.read()?;
    let model = ctx.load_model(model)?;
    let bar = progress(0, "generator SFT");
    let out = ctx.layout.generator_dir(ctx.iteration);
    let checkpoints = ctx.layout.sft_checkpoint_dir(ctx.iteration);
    let report = train_generator(&ctx.exp.config, &model, &examples, &checkpoints, &out, |step, total, _| {
        bar.set_length(total as u64);
        bar.set_position(step as u64);
    })?;
    bar.finish_and_clear();
    let detail = match report {
        Some(r) => format!(
            "{} examples, {} steps, loss {:.3} -> {:.3}",
            examples.len(),
            r.steps,
            r.step_losses.first().unwrap_or(&f32::NAN),
            r.step_losses.last().unwrap_or(&f32::NAN)
        ),
        None => "no examples: the model is carried over unchanged".into(),
    };
    println!("{}: wrote {} ({detail})", crate::experiment::layout::Stage::Generator.binary(), out.display());
    Ok(())
}

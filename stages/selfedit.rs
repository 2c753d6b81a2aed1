//! `selfedit`: the developer CLI over the model runtime (generate, train an adapter, merge).

use std::path::PathBuf;

mod common;

use anyhow::Context;
use clap::{Parser, Subcommand};
use selfedit::runtime::device::parse_device;
use selfedit::runtime::generate::{generate, ConstraintFactory, GenerationRequest, SamplingParams};
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::{Adapter, Proj};
use selfedit::runtime::tokenizer::ChatMessage;
use selfedit::runtime::training::{train_lora, TrainConfig, TrainExample};

#[derive(Parser)]
#[command(version, about = "selfedit: search over self-edit strategies for LLM adaptation")]
struct Cli {
    /// A GGUF file or a Hugging Face checkpoint folder.
    #[arg(long, global = true, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// `cpu` or `cuda:N` (CUDA needs `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion (chat-formatted unless --raw).
    Generate {
        prompt: String,
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Constrain the output to this JSON schema (a file).
        #[arg(long)]
        json_schema: Option<PathBuf>,
        /// A PEFT LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Train a LoRA adapter on a text file (one training sequence per line).
    TrainAdapter {
        text: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 32)]
        rank: usize,
        #[arg(long, default_value_t = 64.0)]
        alpha: f64,
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        #[arg(long, default_value_t = 1e-3)]
        learning_rate: f64,
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Merge a PEFT adapter into the model and save a Hugging Face folder.
    Merge {
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    let device = parse_device(&cli.device)?;
    let model = selfedit::runtime::formats::load(&cli.model, &device)?;
    match cli.command {
        Command::Generate { prompt, raw, max_new_tokens, temperature, seed, json_schema, adapter } => {
            let ids = if raw {
                model.tokenizer.encode_prompt(&prompt)?
            } else {
                model.tokenizer.encode_chat(&[ChatMessage::user(prompt)], true)?
            };
            let params = SamplingParams { temperature, ..SamplingParams::greedy() };
            let mut req = GenerationRequest::new(ids, params, seed, max_new_tokens);
            if let Some(path) = json_schema {
                let schema: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)
                        .with_context(|| format!("{} is not valid JSON", path.display()))?;
                req.constraint = Some(ConstraintFactory::new(&model.tokenizer)?.json_schema(&schema)?);
            }
            let adapter = adapter.map(|d| LoraAdapter::load_peft(&d, &model.decoder.cfg, &device)).transpose()?;
            let adapters: Vec<&dyn Adapter> = adapter.iter().map(|a| a as &dyn Adapter).collect();
            req.adapter = adapter.as_ref().map(|_| 0);
            let out = generate(&model, &adapters, vec![req], 1, |_| {})?;
            println!("{}", out[0].text);
        }
        Command::TrainAdapter { text, out, rank, alpha, dropout, learning_rate, epochs, grad_accum, targets, seed } => {
            let lines = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            let examples: Vec<TrainExample> = lines
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| Ok(TrainExample { ids: model.tokenizer.encode(l)?, loss_from: 0 }))
                .collect::<anyhow::Result<_>>()?;
            let targets = targets.split(',').map(|t| Proj::parse(t.trim())).collect::<anyhow::Result<Vec<_>>>()?;
            let mut adapter =
                LoraAdapter::new(&model.decoder.cfg, LoraConfig { rank, alpha, dropout, targets, use_rslora: false }, seed, &device)?;
            let cfg = TrainConfig::new(learning_rate, epochs, grad_accum, seed);
            let bar = indicatif::ProgressBar::new(cfg.total_steps(examples.len()) as u64)
                .with_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, loss {msg}, eta {eta}")?);
            let report = train_lora(&model.decoder, &mut adapter, &examples, &cfg, |_, _, loss| {
                bar.inc(1);
                bar.set_message(format!("{loss:.3}"));
            })?;
            bar.finish_and_clear();
            adapter.save_peft(&out, &cli.model.display().to_string())?;
            println!(
                "wrote {} ({} steps, final loss {:.3}, {:.1} s)",
                out.display(),
                report.steps,
                report.step_losses.last().unwrap_or(&f32::NAN),
                report.seconds
            );
        }
        Command::Merge { adapter, out } => {
            let adapter = LoraAdapter::load_peft(&adapter, &model.decoder.cfg, &device)?;
            let mut decoder = model.decoder.clone();
            adapter.merge_into(&mut decoder)?;
            selfedit::runtime::formats::hf::save_hf(&decoder, &model.tokenizer, &out)?;
            println!("wrote merged model {}", out.display());
        }
    }
    Ok(())
}

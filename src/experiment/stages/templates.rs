//! Stage 2, templates: the model writes this iteration's self-edit templates (constrained
//! to the template JSON schema) → `templates.parquet`. Baseline variants write SEAL's fixed
//! template instead.

use anyhow::bail;
use serde::Serialize;
use serde_json::json;

use super::exploit_count;
use crate::experiment::cli::{progress, ArchiveArgs, ModelArgs, StageContext};
use crate::experiment::config::{ExperimentConfig, Variant};
use crate::experiment::layout::Stage;
use crate::experiment::novelty;
use crate::experiment::prompts::{self, Prompts};
use crate::experiment::states::Category;
use crate::experiment::tables::{ArchiveRow, TemplateRow};
use crate::experiment::template::{parse_template_json, template_json, template_schema, Hyperparameters};
use crate::runtime::formats::LoadedModel;
use crate::runtime::generate::{ConstraintFactory, FinishReason, GenerationRequest};
use crate::runtime::tokenizer::ChatMessage;
use crate::util::hash::derive_seed;

/// Turns a model's template response into a row: parsed, clamped into the config's bounds,
/// or recorded as invalid with the reason.
pub fn parse_template(
    cfg: &ExperimentConfig,
    iteration: usize,
    template_id: &str,
    category: Category,
    raw: &str,
    seed: u64,
) -> TemplateRow {
    let mut row = TemplateRow {
        iteration: iteration as i64,
        template_id: template_id.to_string(),
        category,
        instruction: String::new(),
        hyperparameters: Hyperparameters::from_values(&[0.0; 6]),
        valid: false,
        error: None,
        raw_response: raw.to_string(),
        seed: seed as i64,
        prompt: String::new(),
        reasoning: None,
    };
    let parsed = match parse_template_json(raw) {
        Ok(p) => p,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    row.instruction = parsed.instruction;
    match parsed.hyperparameters.clamp(&cfg.hyperparameter_bounds) {
        Ok((c, notes)) => {
            row.hyperparameters = c;
            if row.instruction.is_empty() {
                row.error = Some("empty data_creation_instruction".into());
            } else {
                row.valid = true;
                if !notes.is_empty() {
                    row.error = Some(notes.join("; "));
                }
            }
        }
        Err(e) => row.error = Some(format!("{e:#}")),
    }
    row
}

/// The prompt file of a baseline variant that prompts the model (not baseline-passage).
pub fn baseline_prompt(variant: Variant) -> anyhow::Result<&'static str> {
    match variant {
        Variant::BaselineImplications => Ok(prompts::BASELINE_IMPLICATIONS),
        Variant::BaselineRewrite => Ok(prompts::BASELINE_REWRITE),
        _ => bail!("{} has no baseline prompt", variant.as_str()),
    }
}

/// The instruction recorded for baseline-passage, whose "completion" is the passage itself.
pub const PASSAGE_INSTRUCTION: &str = "Train on the passage itself: its text is the one training sequence (SEAL's train-on-passage row).";

/// The template row of a baseline variant: SEAL's fixed instruction and hyperparameters.
pub fn baseline_template(cfg: &ExperimentConfig, prompts: &Prompts, iteration: usize) -> anyhow::Result<TemplateRow> {
    // The instruction is the prompt's first line (the passage follows it).
    let text = match cfg.variant {
        Variant::BaselinePassage => PASSAGE_INSTRUCTION.to_string(),
        v => prompts.render(baseline_prompt(v)?, json!({"title": "", "context": ""}))?,
    };
    Ok(TemplateRow {
        iteration: iteration as i64,
        template_id: format!("iter{iteration}-t00"),
        category: Category::Baseline,
        instruction: text.lines().next().unwrap_or_default().to_string(),
        hyperparameters: cfg.baseline.hyperparameters.clone(),
        valid: true,
        error: None,
        raw_response: String::new(),
        seed: 0,
        prompt: text,
        reasoning: None,
    })
}

/// A crowded strategy as the novelty variant's archive prompt names it.
#[derive(Serialize)]
struct CrowdedStrategy {
    instruction: String,
    count: i64,
}

/// How a template is shown in the archive prompt.
#[derive(Serialize)]
struct ShownTemplate {
    json: String,
    accuracy: f64,
    normalized_gain: f64,
}

fn shown(a: &ArchiveRow) -> ShownTemplate {
    ShownTemplate {
        json: template_json(&a.instruction, &a.hyperparameters).to_string(),
        accuracy: a.accuracy,
        normalized_gain: a.normalized_gain,
    }
}

/// The template-generation prompt: the meta-prompt, or (archive variant) the meta-prompt with
/// the archive's two best and two worst templates. `archive` is sorted best first.
pub fn meta_prompt(cfg: &ExperimentConfig, prompts: &Prompts, archive: Option<&[ArchiveRow]>) -> anyhow::Result<String> {
    let bounds = &cfg.hyperparameter_bounds;
    match (cfg.variant, archive) {
        (Variant::Archive | Variant::Novelty, Some(a)) if !a.is_empty() => {
            let best: Vec<ShownTemplate> = a.iter().take(2).map(shown).collect();
            let worst: Vec<ShownTemplate> = a.iter().rev().take(2).map(shown).collect();
            let crowded: Vec<CrowdedStrategy> = if cfg.variant == Variant::Novelty {
                novelty::crowded(a, 2)
                    .into_iter()
                    .map(|r| CrowdedStrategy { instruction: r.instruction.clone(), count: r.crowding.unwrap_or(0) })
                    .collect()
            } else {
                Vec::new()
            };
            prompts.render(prompts::ARCHIVE_META, json!({"bounds": bounds, "best": best, "worst": worst, "crowded": crowded}))
        }
        (Variant::Archive | Variant::Novelty, _) => {
            bail!("the {} variant needs an archive (the seed archive at iteration 0)", cfg.variant.as_str())
        }
        _ => prompts.render(prompts::META, json!({"bounds": bounds})),
    }
}

/// The model writes `templates_per_iteration` templates from one prompt: the first
/// `exploit_count` with the exploit regime, the rest explore.
pub fn generate_templates(
    ctx: &StageContext,
    model: &LoadedModel,
    archive: Option<&[ArchiveRow]>,
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<TemplateRow>> {
    let cfg = &ctx.exp.config;
    let iteration = ctx.iteration;
    let prompt = meta_prompt(cfg, &ctx.prompts, archive)?;
    let ids = model.tokenizer.encode_chat_with(&[ChatMessage::user(prompt.clone())], true, cfg.search.thinking)?;
    let factory = ConstraintFactory::new(&model.tokenizer)?;
    let schema = template_schema(cfg.search.instruction_max_chars);
    let n = cfg.search.templates_per_iteration;
    let n_exploit = exploit_count(n, cfg.search.exploit_fraction);
    let mut requests = Vec::new();
    let mut meta = Vec::new();
    for t in 0..n {
        let category = if t < n_exploit { Category::Exploit } else { Category::Explore };
        let params = if category == Category::Exploit { cfg.search.exploit.clone() } else { cfg.search.explore.clone() };
        let id = format!("iter{iteration}-t{t:02}");
        let seed = derive_seed(cfg.seed, &id);
        let mut r = GenerationRequest::new(ids.clone(), params, seed, cfg.search.template_max_new_tokens);
        r.constraint = Some(factory.json_schema(&schema)?);
        requests.push(r);
        meta.push((id, category, seed));
    }
    let outs = super::generate_answers(ctx, model, requests, progress)?;
    Ok(outs
        .iter()
        .zip(meta)
        .map(|((reasoning, o), (id, cat, seed))| {
            let mut row = parse_template(cfg, iteration, &id, cat, &o.text, seed);
            row.prompt = prompt.clone();
            row.reasoning = reasoning.clone();
            if o.finish_reason == FinishReason::Length && !row.valid {
                row.error = Some(format!("hit template_max_new_tokens ({}) before the JSON closed", cfg.search.template_max_new_tokens));
            }
            row
        })
        .collect())
}

/// `generate-templates`: writes `templates.parquet`, conditioned on `archive` (a file) for
/// the archive variant.
pub fn run(ctx: &StageContext, model: &ModelArgs, archive: &ArchiveArgs) -> anyhow::Result<()> {
    let cfg = &ctx.exp.config;
    let rows = if cfg.variant.is_baseline() {
        vec![baseline_template(cfg, &ctx.prompts, ctx.iteration)?]
    } else {
        let archive = super::archive::conditioning_archive(ctx, archive.archive.as_deref())?;
        let model = ctx.load_model(model)?;
        let bar = progress(cfg.search.templates_per_iteration, "templates");
        let rows = generate_templates(ctx, &model, archive.as_deref(), |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        rows
    };
    let valid = rows.iter().filter(|r| r.valid).count();
    ctx.write(Stage::Templates, &ctx.table::<TemplateRow>(), &rows, &format!("{valid} valid"))
}

//! The stages of one iteration, as library functions: each reads its inputs (tables, the
//! config, the model) and returns the rows of its output table. The binaries in `stages/`
//! call these and write the tables.
//!
//! Ids are built from indices, never from model output (`iter0-t03`, `a017-t03-c1`), and no
//! path is built from model text. Seeds derive from the config's seed and those ids, so the
//! same config gives the same tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::LoadedModel;
use crate::config::{Bounds, Experiment, ExperimentConfig, GraderKind, Variant};
use crate::constrained::ConstraintFactory;
use crate::data::Article;
use crate::generation::{generate, FinishReason, GenerationRequest};
use crate::lora::{LoraAdapter, LoraConfig, Module};
use crate::prompts::{self, Prompts};
use crate::sampling::SamplingParams;
use crate::tables::{AdapterRow, AnswerRow, ArchiveRow, ArticleRow, ScoreRow, SelfEditRow, SftRow, TemplateRow, TemplateStatsRow};
use crate::tokenizer::ChatMessage;
use crate::training::{train_lora, TrainConfig, TrainExample};

/// A stable 63-bit seed from the experiment seed and a label.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let h = crate::config::hash_bytes(format!("{seed}/{label}").as_bytes());
    u64::from_str_radix(&h, 16).unwrap_or(0) >> 1
}

/// `--shard i/n`: this process does items whose index is `i` modulo `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (i, n) = s.split_once('/').with_context(|| format!("shard {s:?}: expected i/n, e.g. 0/4"))?;
        let (index, count): (usize, usize) = (i.parse().context("shard index")?, n.parse().context("shard count")?);
        anyhow::ensure!(count >= 1 && index < count, "shard {s:?}: need 0 <= i < n");
        Ok(Self { index, count })
    }
    pub fn owns(&self, item: usize) -> bool {
        item % self.count == self.index
    }
}

// ---------------------------------------------------------------------------------------
// 1. prepare data

pub fn prepare_articles(exp: &Experiment) -> anyhow::Result<Vec<ArticleRow>> {
    let d = &exp.config.data;
    let passages = crate::data::load_passages(&d.train_path)?;
    let mut articles = crate::data::select(&passages, d.train_passages, d.seed, "train")
        .with_context(|| format!("selecting from {}", d.train_path.display()))?;
    if let (Some(path), true) = (&d.validation_path, d.validation_passages > 0) {
        let passages = crate::data::load_passages(path)?;
        articles.extend(
            crate::data::select(&passages, d.validation_passages, d.seed, "validation")
                .with_context(|| format!("selecting from {}", path.display()))?,
        );
    }
    Ok(articles.into_iter().map(article_row).collect())
}

fn article_row(a: Article) -> ArticleRow {
    ArticleRow { article_id: a.article_id, split: a.split, title: a.title, context: a.context, questions: a.questions }
}

// ---------------------------------------------------------------------------------------
// 2. generate templates

/// The six hyperparameters of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub lora_rank: i64,
    pub lora_alpha: i64,
    pub lora_dropout: f64,
    pub learning_rate: f64,
    pub num_epochs: i64,
    pub gradient_accumulation_steps: i64,
}

/// JSON schema of a template, as the model must write it.
///
/// The numbers carry wide syntactic limits (integers 0..=1e6, reals 0..=100): without them a
/// small model can write digits forever inside the grammar. The config's tighter
/// `hyperparameter_bounds` are applied after parsing, by clamping, and the row says so.
pub fn template_schema(cfg: &ExperimentConfig) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "data_creation_instruction": {"type": "string", "minLength": 1, "maxLength": cfg.search.instruction_max_chars},
            "hyperparameters": {
                "type": "object",
                "properties": {
                    "lora_rank": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "lora_alpha": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "lora_dropout": {"type": "number", "minimum": 0, "maximum": 100},
                    "learning_rate": {"type": "number", "minimum": 0, "maximum": 100},
                    "num_epochs": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "gradient_accumulation_steps": {"type": "integer", "minimum": 0, "maximum": 1000000}
                },
                "required": ["lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "num_epochs", "gradient_accumulation_steps"],
                "additionalProperties": false
            }
        },
        "required": ["data_creation_instruction", "hyperparameters"],
        "additionalProperties": false
    })
}

/// JSON schema of a completion.
pub fn sequences_schema(cfg: &ExperimentConfig) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {"training_sequences": {
            "type": "array", "minItems": 1, "maxItems": cfg.search.max_sequences,
            "items": {"type": "string", "minLength": 1, "maxLength": cfg.search.sequence_max_chars}}},
        "required": ["training_sequences"],
        "additionalProperties": false
    })
}

/// Clamps each hyperparameter into its bounds; returns the clamped values and a note per
/// value that was changed. Non-finite values cannot be clamped and are errors.
pub fn clamp_hyperparameters(h: &Hyperparameters, b: &crate::config::HyperparameterBounds) -> anyhow::Result<(Hyperparameters, Vec<String>)> {
    let mut notes = Vec::new();
    let mut clamp = |name: &str, v: f64, bd: Bounds| -> anyhow::Result<f64> {
        if !v.is_finite() {
            bail!("{name} = {v} is not a finite number");
        }
        let c = v.clamp(bd.min, bd.max);
        if c != v {
            notes.push(format!("{name} {v} clamped to {c} (bounds [{}, {}])", bd.min, bd.max));
        }
        Ok(c)
    };
    let out = Hyperparameters {
        lora_rank: clamp("lora_rank", h.lora_rank as f64, b.lora_rank)? as i64,
        lora_alpha: clamp("lora_alpha", h.lora_alpha as f64, b.lora_alpha)? as i64,
        lora_dropout: clamp("lora_dropout", h.lora_dropout, b.lora_dropout)?,
        learning_rate: clamp("learning_rate", h.learning_rate, b.learning_rate)?,
        num_epochs: clamp("num_epochs", h.num_epochs as f64, b.num_epochs)? as i64,
        gradient_accumulation_steps: clamp("gradient_accumulation_steps", h.gradient_accumulation_steps as f64, b.gradient_accumulation_steps)? as i64,
    };
    Ok((out, notes))
}

#[derive(Deserialize)]
struct RawTemplate {
    data_creation_instruction: String,
    hyperparameters: RawHyper,
}

/// Numbers as the model wrote them (floats even for integer fields, so 1e9 parses).
#[derive(Deserialize)]
struct RawHyper {
    lora_rank: f64,
    lora_alpha: f64,
    lora_dropout: f64,
    learning_rate: f64,
    num_epochs: f64,
    gradient_accumulation_steps: f64,
}

/// Turns a model's template response into a row: parsed, clamped, or recorded as invalid.
pub fn parse_template(cfg: &ExperimentConfig, iteration: usize, template_id: &str, category: &str, raw: &str, seed: u64) -> TemplateRow {
    let mut row = TemplateRow {
        iteration: iteration as i64,
        template_id: template_id.to_string(),
        category: category.to_string(),
        instruction: String::new(),
        lora_rank: 0,
        lora_alpha: 0,
        lora_dropout: 0.0,
        learning_rate: 0.0,
        num_epochs: 0,
        gradient_accumulation_steps: 0,
        valid: false,
        error: None,
        raw_response: raw.to_string(),
        seed: seed as i64,
        prompt: String::new(),
    };
    let parsed: RawTemplate = match serde_json::from_str(raw) {
        Ok(p) => p,
        Err(e) => {
            row.error = Some(format!("response is not a template JSON object: {e}"));
            return row;
        }
    };
    row.instruction = parsed.data_creation_instruction.trim().to_string();
    let h = parsed.hyperparameters;
    let to_int = |v: f64| if v.is_finite() { v.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64 } else { 0 };
    let raw_h = Hyperparameters {
        lora_rank: to_int(h.lora_rank),
        lora_alpha: to_int(h.lora_alpha),
        lora_dropout: h.lora_dropout,
        learning_rate: h.learning_rate,
        num_epochs: to_int(h.num_epochs),
        gradient_accumulation_steps: to_int(h.gradient_accumulation_steps),
    };
    match clamp_hyperparameters(&raw_h, &cfg.hyperparameter_bounds) {
        Ok((c, notes)) => {
            row.lora_rank = c.lora_rank;
            row.lora_alpha = c.lora_alpha;
            row.lora_dropout = c.lora_dropout;
            row.learning_rate = c.learning_rate;
            row.num_epochs = c.num_epochs;
            row.gradient_accumulation_steps = c.gradient_accumulation_steps;
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

/// The template row of a baseline variant: SEAL's fixed instruction and hyperparameters.
pub fn baseline_template(cfg: &ExperimentConfig, prompts: &Prompts, iteration: usize) -> anyhow::Result<TemplateRow> {
    let name = match cfg.variant {
        Variant::BaselineImplications => prompts::BASELINE_IMPLICATIONS,
        Variant::BaselineRewrite => prompts::BASELINE_REWRITE,
        _ => bail!("not a baseline variant"),
    };
    // The instruction is the prompt's first line (the passage follows it).
    let text = prompts.render(name, json!({"title": "", "context": ""}))?;
    let b = &cfg.baseline;
    Ok(TemplateRow {
        iteration: iteration as i64,
        template_id: format!("iter{iteration}-t00"),
        category: "baseline".into(),
        instruction: text.lines().next().unwrap_or_default().to_string(),
        lora_rank: b.lora_rank,
        lora_alpha: b.lora_alpha,
        lora_dropout: b.lora_dropout,
        learning_rate: b.learning_rate,
        num_epochs: b.num_epochs,
        gradient_accumulation_steps: b.gradient_accumulation_steps,
        valid: true,
        error: None,
        raw_response: String::new(),
        seed: 0,
        prompt: text,
    })
}

/// How a template is shown in the archive prompt.
#[derive(Serialize)]
struct ShownTemplate {
    json: String,
    accuracy: f64,
    normalized_gain: f64,
}

fn shown(a: &ArchiveRow) -> ShownTemplate {
    let t = json!({
        "data_creation_instruction": a.instruction,
        "hyperparameters": {
            "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout,
            "learning_rate": a.learning_rate, "num_epochs": a.num_epochs,
            "gradient_accumulation_steps": a.gradient_accumulation_steps
        }
    });
    ShownTemplate { json: t.to_string(), accuracy: a.accuracy, normalized_gain: a.normalized_gain }
}

/// The template-generation prompt: the meta-prompt, or (archive variant) the meta-prompt with
/// the archive's two best and two worst templates. `archive` is sorted best first.
pub fn meta_prompt(cfg: &ExperimentConfig, prompts: &Prompts, archive: Option<&[ArchiveRow]>) -> anyhow::Result<String> {
    let bounds = &cfg.hyperparameter_bounds;
    match (cfg.variant, archive) {
        (Variant::Archive, Some(a)) if !a.is_empty() => {
            let best: Vec<ShownTemplate> = a.iter().take(2).map(shown).collect();
            let worst: Vec<ShownTemplate> = a.iter().rev().take(2).map(shown).collect();
            prompts.render(prompts::ARCHIVE_META, json!({"bounds": bounds, "best": best, "worst": worst}))
        }
        (Variant::Archive, _) => bail!("the archive variant needs an archive (the seed archive at iteration 0)"),
        _ => prompts.render(prompts::META, json!({"bounds": bounds})),
    }
}

/// Number of exploit items among `n` for the exploit fraction (the rest explore).
pub fn exploit_count(n: usize, fraction: f64) -> usize {
    ((n as f64) * fraction).round() as usize
}

pub fn generate_templates(
    exp: &Experiment,
    prompts: &Prompts,
    model: &LoadedModel,
    iteration: usize,
    archive: Option<&[ArchiveRow]>,
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<TemplateRow>> {
    let cfg = &exp.config;
    if cfg.variant.is_baseline() {
        return Ok(vec![baseline_template(cfg, prompts, iteration)?]);
    }
    let prompt = meta_prompt(cfg, prompts, archive)?;
    let ids = model.tokenizer.encode_chat(&[ChatMessage::user(prompt.clone())], true)?;
    let factory = ConstraintFactory::new(&model.tokenizer)?;
    let schema = template_schema(cfg);
    let n = cfg.search.templates_per_iteration;
    let n_exploit = exploit_count(n, cfg.search.exploit_fraction);
    let mut requests = Vec::new();
    let mut meta = Vec::new();
    for t in 0..n {
        let (category, params) =
            if t < n_exploit { ("exploit", cfg.search.exploit.clone()) } else { ("explore", cfg.search.explore.clone()) };
        let id = format!("iter{iteration}-t{t:02}");
        let seed = derive_seed(cfg.seed, &id);
        let mut r = GenerationRequest::new(ids.clone(), params, seed, cfg.search.template_max_new_tokens);
        r.constraint = Some(factory.json_schema(&schema)?);
        requests.push(r);
        meta.push((id, category, seed));
    }
    let outs = generate(model, None, requests, cfg.search.batch_size, progress)?;
    Ok(outs
        .iter()
        .zip(meta)
        .map(|(o, (id, cat, seed))| {
            let mut row = parse_template(cfg, iteration, &id, cat, &o.text, seed);
            row.prompt = prompt.clone();
            if o.finish_reason == FinishReason::Length && !row.valid {
                row.error = Some(format!("hit template_max_new_tokens ({}) before the JSON closed", cfg.search.template_max_new_tokens));
            }
            row
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// 3. synthesize self-edits

/// The short template part of a self-edit id: `iter0-t03` → `t03`.
fn template_suffix(template_id: &str) -> &str {
    template_id.rsplit('-').next().unwrap_or(template_id)
}

pub fn self_edit_id(article_id: &str, template_id: &str, completion: usize) -> String {
    format!("{article_id}-{}-c{completion}", template_suffix(template_id))
}

/// SEAL's parsing of a baseline's plain-text completion: one sequence per non-empty line,
/// dropping a leading line that introduces a "1." list.
pub fn split_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.len() > 1 && !lines[0].starts_with("1.") && lines[1].starts_with("1.") {
        lines.remove(0);
    }
    lines.into_iter().map(String::from).collect()
}

/// Parses a searched variant's completion: `{"training_sequences": [...]}` with the empty
/// sequences dropped.
pub fn parse_sequences(raw: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("response is not JSON: {e}"))?;
    let list = v
        .get("training_sequences")
        .and_then(|x| x.as_array())
        .ok_or_else(|| "no \"training_sequences\" list in the response".to_string())?;
    let seqs: Vec<String> = list.iter().filter_map(|s| s.as_str()).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if seqs.is_empty() {
        return Err("no non-empty training sequence".into());
    }
    Ok(seqs)
}

pub fn synthesize(
    exp: &Experiment,
    prompts: &Prompts,
    model: &LoadedModel,
    templates: &[TemplateRow],
    articles: &[ArticleRow],
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<SelfEditRow>> {
    let cfg = &exp.config;
    let train: Vec<&ArticleRow> = articles.iter().filter(|a| a.split == exp.split).collect();
    let factory = ConstraintFactory::new(&model.tokenizer)?;
    let schema = sequences_schema(cfg);
    let n_c = cfg.search.completions_per_template;
    let n_exploit = exploit_count(n_c, cfg.search.exploit_fraction);
    let mut rows = Vec::new();
    let mut requests = Vec::new();
    let mut pending = Vec::new(); // index into rows of each request
    for t in templates {
        for a in &train {
            for c in 0..n_c {
                let id = self_edit_id(&a.article_id, &t.template_id, c);
                let seed = derive_seed(cfg.seed, &format!("{}/{id}", t.template_id));
                let baseline = t.category == "baseline";
                let category = if baseline { "baseline" } else if c < n_exploit { "exploit" } else { "explore" };
                let mut row = SelfEditRow {
                    self_edit_id: id,
                    template_id: t.template_id.clone(),
                    article_id: a.article_id.clone(),
                    completion: c as i64,
                    category: category.into(),
                    sequences: vec![],
                    valid: false,
                    error: None,
                    raw_response: String::new(),
                    seed: seed as i64,
                };
                if !t.valid {
                    row.error = Some("template is invalid; nothing to complete".into());
                    rows.push(row);
                    continue;
                }
                let req = if baseline {
                    let name = if cfg.variant == Variant::BaselineRewrite { prompts::BASELINE_REWRITE } else { prompts::BASELINE_IMPLICATIONS };
                    let prompt = prompts.render(name, json!({"title": a.title, "context": a.context}))?;
                    let ids = model.tokenizer.encode_chat(&[ChatMessage::user(prompt)], true)?;
                    GenerationRequest::new(ids, cfg.baseline.sampling.clone(), seed, cfg.search.completion_max_new_tokens)
                } else {
                    let prompt = prompts.render(
                        prompts::COMPLETION,
                        json!({"title": a.title, "context": a.context, "instruction": t.instruction}),
                    )?;
                    let ids = model.tokenizer.encode_chat(&[ChatMessage::user(prompt)], true)?;
                    let params = if category == "exploit" { cfg.search.exploit.clone() } else { cfg.search.explore.clone() };
                    let mut r = GenerationRequest::new(ids, params, seed, cfg.search.completion_max_new_tokens);
                    r.constraint = Some(factory.json_schema(&schema)?);
                    r
                };
                pending.push(rows.len());
                requests.push(req);
                rows.push(row);
            }
        }
    }
    let outs = generate(model, None, requests, cfg.search.batch_size, progress)?;
    for (i, out) in pending.into_iter().zip(outs) {
        let row = &mut rows[i];
        row.raw_response = out.text.clone();
        let parsed = if row.category == "baseline" {
            let s = split_lines(&out.text);
            if s.is_empty() { Err("empty completion".to_string()) } else { Ok(s) }
        } else {
            parse_sequences(&out.text)
        };
        match parsed {
            Ok(s) => {
                row.sequences = s;
                row.valid = true;
            }
            Err(e) => {
                let hint = if out.finish_reason == FinishReason::Length { " (hit completion_max_new_tokens)" } else { "" };
                row.error = Some(format!("{e}{hint}"));
            }
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 4. train adapters

/// What training one adapter recorded, kept beside the adapter so a rerun can rebuild the
/// table row without training again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// Hash of everything the adapter depends on: settings, hyperparameters, sequences.
    pub input_hash: String,
    pub sequences: usize,
    pub tokens: usize,
    pub steps: usize,
    pub loss_curve: Vec<f32>,
    pub seconds: f64,
}

pub const TRAIN_RECORD: &str = "train_record.json";

/// The training sequences of a self-edit (plus the passage when configured).
pub fn training_texts(cfg: &ExperimentConfig, edit: &SelfEditRow, article: &ArticleRow) -> Vec<String> {
    let mut texts: Vec<String> = edit.sequences.iter().filter(|s| !s.trim().is_empty()).cloned().collect();
    if cfg.training.append_passage && !texts.is_empty() {
        texts.push(format!("{}\n{}", article.title, article.context).trim().to_string());
    }
    texts
}

/// Trains (or finds already trained) the adapter of every self-edit in `shard`. An adapter
/// folder that exists is complete (folders are renamed into place), so it is not trained
/// again: killing this stage loses at most the adapter in progress.
#[allow(clippy::too_many_arguments)]
pub fn train_adapters(
    exp: &Experiment,
    model: &LoadedModel,
    templates: &[TemplateRow],
    edits: &[SelfEditRow],
    articles: &[ArticleRow],
    adapters_dir: &Path,
    shard: Shard,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Vec<AdapterRow>> {
    let cfg = &exp.config;
    let templates: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    let targets: Vec<Module> = cfg.training.target_modules.iter().map(|m| Module::parse(m)).collect::<anyhow::Result<_>>()?;
    // A killed run leaves its adapter in progress in a hidden temporary folder: remove it.
    if let Ok(entries) = std::fs::read_dir(adapters_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mut rows = Vec::new();
    for (i, edit) in edits.iter().enumerate() {
        if !shard.owns(i) {
            continue;
        }
        let dir = adapters_dir.join(&edit.self_edit_id);
        let mut row = AdapterRow {
            self_edit_id: edit.self_edit_id.clone(),
            status: "empty".into(),
            adapter_path: None,
            sequences: 0,
            tokens: 0,
            steps: 0,
            loss_curve: vec![],
            seconds: 0.0,
            error: None,
        };
        let article = articles.get(edit.article_id.as_str()).with_context(|| format!("self-edit {}: unknown article", edit.self_edit_id))?;
        let texts = training_texts(cfg, edit, article);
        if !edit.valid || texts.is_empty() {
            row.error = Some(edit.error.clone().unwrap_or_else(|| "no usable training sequence".into()));
            rows.push(row);
            progress(1);
            continue;
        }
        let t = templates.get(edit.template_id.as_str()).with_context(|| format!("self-edit {}: unknown template", edit.self_edit_id))?;
        let input_hash = crate::config::content_hash(&json!([cfg.seed, cfg.model, cfg.training, t.lora_rank, t.lora_alpha,
            t.lora_dropout, t.learning_rate, t.num_epochs, t.gradient_accumulation_steps, texts]));
        // An adapter on disk with the same inputs is complete (folders are renamed into
        // place): reuse it. Anything else there is stale or damaged and is retrained.
        let record_path = dir.join(TRAIN_RECORD);
        if let Ok(text) = std::fs::read_to_string(&record_path) {
            if let Ok(rec) = serde_json::from_str::<AdapterRecord>(&text) {
                let complete = LoraAdapter::load_peft(&dir, &model.decoder.cfg, model.device()).is_ok();
                if rec.input_hash == input_hash && complete {
                    rows.push(adapter_row_from(&edit.self_edit_id, &dir, rec));
                    progress(1);
                    continue;
                }
            }
            tracing::warn!("{}: stale or damaged adapter, training it again", dir.display());
        }
        match train_one(cfg, model, t, &edit.self_edit_id, &texts, &targets, &dir, input_hash) {
            Ok(rec) => rows.push(adapter_row_from(&edit.self_edit_id, &dir, rec)),
            Err(e) => {
                row.status = "failed".into();
                row.error = Some(format!("{e:#}"));
                rows.push(row);
            }
        }
        progress(1);
    }
    Ok(rows)
}

fn adapter_row_from(id: &str, dir: &Path, rec: AdapterRecord) -> AdapterRow {
    AdapterRow {
        self_edit_id: id.to_string(),
        status: "trained".into(),
        adapter_path: Some(dir.display().to_string()),
        sequences: rec.sequences as i64,
        tokens: rec.tokens as i64,
        steps: rec.steps as i64,
        loss_curve: rec.loss_curve,
        seconds: rec.seconds,
        error: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn train_one(
    cfg: &ExperimentConfig,
    model: &LoadedModel,
    t: &TemplateRow,
    id: &str,
    texts: &[String],
    targets: &[Module],
    dir: &Path,
    input_hash: String,
) -> anyhow::Result<AdapterRecord> {
    let examples: Vec<TrainExample> = texts
        .iter()
        .map(|s| Ok(TrainExample { ids: model.tokenizer.encode(s)?, loss_from: 0 }))
        .collect::<anyhow::Result<_>>()?;
    let seed = derive_seed(cfg.seed, &format!("adapter/{id}"));
    let lora = LoraConfig { rank: t.lora_rank as usize, alpha: t.lora_alpha as f64, dropout: t.lora_dropout, targets: targets.to_vec() };
    let mut adapter = LoraAdapter::new(&model.decoder.cfg, lora, seed, model.device())?;
    let tc = TrainConfig {
        learning_rate: t.learning_rate,
        epochs: t.num_epochs as usize,
        grad_accum: t.gradient_accumulation_steps as usize,
        max_len: cfg.training.max_len,
        seed,
        max_grad_norm: cfg.training.max_grad_norm,
    };
    let report = train_lora(&model.decoder, &mut adapter, &examples, &tc, |_, _, _| {})?;
    let rec = AdapterRecord {
        input_hash,
        sequences: examples.len(),
        tokens: report.tokens,
        steps: report.steps,
        loss_curve: report.step_losses,
        seconds: report.seconds,
    };
    // The record is written inside the adapter's temporary folder, so both appear together.
    let base = model.source.display().to_string();
    crate::io::write_dir_atomically(dir, |tmp| {
        adapter.save_peft(&tmp.join("peft"), &base)?;
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::rename(tmp.join("peft").join(f), tmp.join(f))?;
        }
        std::fs::remove_dir(tmp.join("peft"))?;
        std::fs::write(tmp.join(TRAIN_RECORD), serde_json::to_string_pretty(&rec)?)?;
        Ok(())
    })?;
    Ok(rec)
}

// ---------------------------------------------------------------------------------------
// 5. evaluate

/// The closed-book QA prompt: chat models get the system message and the question; models
/// without a chat template get SEAL's base-model prompt.
fn qa_prompt(prompts: &Prompts, model: &LoadedModel, question: &str) -> anyhow::Result<Vec<u32>> {
    if model.tokenizer.chat_template.is_some() {
        let system = prompts.render(prompts::QA_SYSTEM, json!({}))?;
        model.tokenizer.encode_chat(&[ChatMessage::system(system), ChatMessage::user(question)], true)
    } else {
        model.tokenizer.encode_prompt(&format!("{}\n", prompts.render(prompts::QA_BASE, json!({"question": question}))?))
    }
}

/// The models to evaluate: `base`, and each self-edit's adapter (`empty` self-edits are the
/// paper's dummy adapter: the base model itself, answering with their own seeds).
pub struct EvalTarget {
    pub model_id: String,
    pub article_id: String,
    pub adapter: Option<PathBuf>,
}

pub fn eval_targets(articles: &[ArticleRow], adapters: &[AdapterRow], edits: &[SelfEditRow], split: &str) -> Vec<EvalTarget> {
    let edit_article: HashMap<&str, &str> = edits.iter().map(|e| (e.self_edit_id.as_str(), e.article_id.as_str())).collect();
    let mut out: Vec<EvalTarget> = articles
        .iter()
        .filter(|a| a.split == split)
        .map(|a| EvalTarget { model_id: "base".into(), article_id: a.article_id.clone(), adapter: None })
        .collect();
    for a in adapters {
        let Some(article) = edit_article.get(a.self_edit_id.as_str()) else { continue };
        match a.status.as_str() {
            "trained" => out.push(EvalTarget {
                model_id: a.self_edit_id.clone(),
                article_id: article.to_string(),
                adapter: a.adapter_path.as_ref().map(PathBuf::from),
            }),
            "empty" => out.push(EvalTarget { model_id: a.self_edit_id.clone(), article_id: article.to_string(), adapter: None }),
            _ => {} // failed: nothing to evaluate, the score row says so
        }
    }
    out
}

/// A yes/no judge for answers.
pub struct Judge<'a> {
    pub model: &'a LoadedModel,
    pub factory: ConstraintFactory,
}

impl<'a> Judge<'a> {
    pub fn new(model: &'a LoadedModel) -> anyhow::Result<Self> {
        Ok(Self { model, factory: ConstraintFactory::new(&model.tokenizer)? })
    }
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    exp: &Experiment,
    prompts: &Prompts,
    model: &LoadedModel,
    articles: &[ArticleRow],
    targets: &[EvalTarget],
    judge: Option<&Judge>,
    shard: Shard,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Vec<AnswerRow>> {
    let cfg = &exp.config;
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    let mut rows = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        if !shard.owns(i) {
            continue;
        }
        let article = articles.get(target.article_id.as_str()).with_context(|| format!("unknown article {}", target.article_id))?;
        let adapter = match &target.adapter {
            Some(dir) => Some(
                LoraAdapter::load_peft(dir, &model.decoder.cfg, model.device())
                    .with_context(|| format!("adapter of {} is unreadable: delete {} and rerun `make`", target.model_id, dir.display()))?,
            ),
            None => None,
        };
        // every question × every run in one batch list
        let mut requests = Vec::new();
        let mut keys = Vec::new();
        for (qi, q) in article.questions.iter().enumerate() {
            let ids = qa_prompt(prompts, model, &q.question)?;
            for run in 0..cfg.eval.runs {
                let seed = derive_seed(cfg.seed, &format!("eval/{}/{}/{qi}/{run}", target.model_id, article.article_id));
                requests.push(GenerationRequest::new(ids.clone(), cfg.eval.sampling.clone(), seed, cfg.eval.max_new_tokens));
                keys.push((qi, run));
            }
        }
        let outs = generate(model, adapter.as_ref(), requests, cfg.eval.batch_size, |_| {})?;
        // Grading is independent per answer: rayon spreads it over the cores.
        use rayon::prelude::*;
        let mut graded: Vec<AnswerRow> = keys
            .into_par_iter()
            .zip(outs.into_par_iter())
            .map(|((qi, run), out)| {
            let q = &article.questions[qi];
            let prediction = out.text.trim().to_string();
            let (em, f1) = crate::grading::squad_scores(&prediction, &q.answers);
            AnswerRow {
                model_id: target.model_id.clone(),
                article_id: article.article_id.clone(),
                question_index: qi as i64,
                run: run as i64,
                question: q.question.clone(),
                correct: crate::grading::heuristic_correct(&prediction, &q.answers),
                prediction,
                gold_answers: q.answers.clone(),
                exact_match: em,
                f1,
                grader: "heuristic".into(),
            }
            })
            .collect();
        if let (GraderKind::Judge, Some(j)) = (cfg.eval.grader, judge) {
            judge_answers(exp, prompts, j, &mut graded)?;
        }
        rows.extend(graded);
        progress(1);
    }
    Ok(rows)
}

/// Asks the judge model about every answer the heuristic did not accept (the heuristic
/// accepting is the paper's fallback, so those stay correct).
fn judge_answers(exp: &Experiment, prompts: &Prompts, judge: &Judge, rows: &mut [AnswerRow]) -> anyhow::Result<()> {
    let schema = json!({"type": "object", "properties": {"correct": {"enum": ["yes", "no"]}}, "required": ["correct"], "additionalProperties": false});
    let mut requests = Vec::new();
    let mut idx = Vec::new();
    for (i, r) in rows.iter_mut().enumerate() {
        r.grader = "judge".into();
        if r.correct {
            continue;
        }
        let prompt = prompts.render(prompts::JUDGE, json!({"question": r.question, "gold": r.gold_answers.join(" / "), "prediction": r.prediction}))?;
        let ids = judge.model.tokenizer.encode_chat(&[ChatMessage::user(prompt)], true)?;
        let mut req = GenerationRequest::new(ids, SamplingParams::greedy(), 0, 16);
        req.constraint = Some(judge.factory.json_schema(&schema)?);
        requests.push(req);
        idx.push(i);
    }
    let outs = generate(judge.model, None, requests, exp.config.eval.batch_size, |_| {})?;
    for (i, out) in idx.into_iter().zip(outs) {
        let verdict: serde_json::Value = serde_json::from_str(&out.text).unwrap_or_default();
        rows[i].correct = verdict["correct"] == "yes";
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. scores and statistics

/// Accuracy of each (model, article, run): the share of its questions answered correctly.
fn run_accuracies(answers: &[AnswerRow]) -> BTreeMap<(String, String, i64), f64> {
    let mut acc: BTreeMap<(String, String, i64), (usize, usize)> = BTreeMap::new();
    for a in answers {
        let e = acc.entry((a.model_id.clone(), a.article_id.clone(), a.run)).or_default();
        e.0 += a.correct as usize;
        e.1 += 1;
    }
    acc.into_iter().map(|(k, (c, n))| (k, c as f64 / n as f64)).collect()
}

pub fn score(
    iteration: usize,
    templates: &[TemplateRow],
    edits: &[SelfEditRow],
    adapters: &[AdapterRow],
    answers: &[AnswerRow],
) -> anyhow::Result<(Vec<ScoreRow>, Vec<TemplateStatsRow>)> {
    let acc = run_accuracies(answers);
    // b[a]: the base model's mean over runs
    let mut base_runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for ((m, a, _), x) in &acc {
        if m == "base" {
            base_runs.entry(a.clone()).or_default().push(*x);
        }
    }
    let base: BTreeMap<String, f64> = base_runs.iter().map(|(a, xs)| (a.clone(), crate::stats::mean(xs))).collect();
    let status: HashMap<&str, &str> = adapters.iter().map(|a| (a.self_edit_id.as_str(), a.status.as_str())).collect();
    let mut scores = Vec::new();
    let mut by_template: BTreeMap<String, Vec<crate::stats::Observation>> = BTreeMap::new();
    for e in edits {
        let runs: Vec<(i64, f64)> =
            acc.range((e.self_edit_id.clone(), e.article_id.clone(), i64::MIN)..=(e.self_edit_id.clone(), e.article_id.clone(), i64::MAX))
                .map(|((_, _, r), x)| (*r, *x))
                .collect();
        let st = status.get(e.self_edit_id.as_str()).copied().unwrap_or("missing");
        let b = base.get(&e.article_id).copied().unwrap_or(f64::NAN);
        let adapted = if runs.is_empty() { f64::NAN } else { crate::stats::mean(&runs.iter().map(|r| r.1).collect::<Vec<_>>()) };
        scores.push(ScoreRow {
            self_edit_id: e.self_edit_id.clone(),
            template_id: e.template_id.clone(),
            article_id: e.article_id.clone(),
            completion: e.completion,
            base_accuracy: b,
            adapted_accuracy: adapted,
            gain: adapted - b,
            status: st.to_string(),
        });
        for (run, x) in runs {
            by_template.entry(e.template_id.clone()).or_default().push(crate::stats::Observation {
                article_id: e.article_id.clone(),
                completion: e.completion as usize,
                run: run as usize,
                accuracy: x,
            });
        }
    }
    let base_mean = crate::stats::mean(&base.values().copied().collect::<Vec<_>>());
    let mut stats = Vec::new();
    for t in templates {
        let Some(obs) = by_template.get(&t.template_id) else { continue };
        let s = crate::stats::template_stats(obs, &base)?;
        stats.push(TemplateStatsRow {
            iteration: iteration as i64,
            template_id: t.template_id.clone(),
            category: t.category.clone(),
            instruction: t.instruction.clone(),
            mean_accuracy: s.mean_accuracy,
            robustness: s.robustness,
            evaluation_noise: s.evaluation_noise,
            instantiation_noise: s.instantiation_noise,
            mean_gain: s.mean_gain,
            win_rate: s.win_rate,
            normalized_gain: s.normalized_gain,
            base_accuracy: base_mean,
            n_articles: s.n_articles as i64,
            n_self_edits: s.n_self_edits as i64,
        });
    }
    Ok((scores, stats))
}

// ---------------------------------------------------------------------------------------
// 7. archive

#[derive(Deserialize)]
struct SeedTemplate {
    data_creation_instruction: String,
    hyperparameters: Hyperparameters,
    accuracy: f64,
    normalized_gain: f64,
}

/// The four seed templates (paper/archive_seed.json layout).
pub fn seed_archive(path: &Path) -> anyhow::Result<Vec<ArchiveRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading seed archive {}", path.display()))?;
    let seeds: Vec<SeedTemplate> = serde_json::from_str(&text).with_context(|| format!("{}: expected a list of templates with accuracy and normalized_gain", path.display()))?;
    Ok(seeds
        .into_iter()
        .enumerate()
        .map(|(i, s)| ArchiveRow {
            rank: 0,
            source: "seed".into(),
            template_id: format!("seed-{i}"),
            instruction: s.data_creation_instruction,
            lora_rank: s.hyperparameters.lora_rank,
            lora_alpha: s.hyperparameters.lora_alpha,
            lora_dropout: s.hyperparameters.lora_dropout,
            learning_rate: s.hyperparameters.learning_rate,
            num_epochs: s.hyperparameters.num_epochs,
            gradient_accumulation_steps: s.hyperparameters.gradient_accumulation_steps,
            accuracy: s.accuracy,
            normalized_gain: s.normalized_gain,
        })
        .collect())
}

/// The previous archive plus this iteration's evaluated templates, sorted by accuracy (best
/// first, ties by id), never pruned.
pub fn update_archive(previous: Vec<ArchiveRow>, iteration: usize, templates: &[TemplateRow], stats: &[TemplateStatsRow]) -> Vec<ArchiveRow> {
    let by_id: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let mut rows: Vec<ArchiveRow> = previous.into_iter().filter(|r| r.source != format!("iter{iteration}")).collect();
    for s in stats {
        let Some(t) = by_id.get(s.template_id.as_str()) else { continue };
        rows.push(ArchiveRow {
            rank: 0,
            source: format!("iter{iteration}"),
            template_id: t.template_id.clone(),
            instruction: t.instruction.clone(),
            lora_rank: t.lora_rank,
            lora_alpha: t.lora_alpha,
            lora_dropout: t.lora_dropout,
            learning_rate: t.learning_rate,
            num_epochs: t.num_epochs,
            gradient_accumulation_steps: t.gradient_accumulation_steps,
            accuracy: s.mean_accuracy,
            normalized_gain: s.normalized_gain,
        });
    }
    rows.sort_by(|a, b| b.accuracy.total_cmp(&a.accuracy).then(a.template_id.cmp(&b.template_id)));
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as i64;
    }
    rows
}

// ---------------------------------------------------------------------------------------
// 8. improve the generator (ReST-EM)

/// The supervised examples of one iteration: per article the `top_k` templates by their mean
/// accuracy on it, each with its best completion (archive variant: only completions that beat
/// the article's base accuracy). Each kept pair gives two examples: the template-generation
/// prompt → the template JSON the model wrote, and the completion prompt → the completion
/// (baselines: only the latter, their prompt being fixed).
#[allow(clippy::too_many_arguments)]
pub fn build_sft(
    cfg: &ExperimentConfig,
    prompts: &Prompts,
    archive: Option<&[ArchiveRow]>,
    templates: &[TemplateRow],
    edits: &[SelfEditRow],
    scores: &[ScoreRow],
    articles: &[ArticleRow],
) -> anyhow::Result<Vec<SftRow>> {
    let templates: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let edits: HashMap<&str, &SelfEditRow> = edits.iter().map(|e| (e.self_edit_id.as_str(), e)).collect();
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    // (article, template) → its scored self-edits
    let mut groups: BTreeMap<(&str, &str), Vec<&ScoreRow>> = BTreeMap::new();
    for s in scores.iter().filter(|s| s.adapted_accuracy.is_finite() && s.status != "failed") {
        groups.entry((s.article_id.as_str(), s.template_id.as_str())).or_default().push(s);
    }
    let meta = if cfg.variant.is_baseline() { None } else { Some(meta_prompt(cfg, prompts, archive)?) };
    let mut rows = Vec::new();
    let article_ids: BTreeSet<&str> = groups.keys().map(|(a, _)| *a).collect();
    for a in article_ids {
        // rank this article's templates by mean accuracy (ties: template id)
        let mut ranked: Vec<(&str, f64, &ScoreRow)> = groups
            .range((a, "")..)
            .take_while(|((aa, _), _)| *aa == a)
            .map(|((_, t), ss)| {
                let mean = ss.iter().map(|s| s.adapted_accuracy).sum::<f64>() / ss.len() as f64;
                let best = ss.iter().copied().max_by(|x, y| x.adapted_accuracy.total_cmp(&y.adapted_accuracy).then(y.self_edit_id.cmp(&x.self_edit_id))).unwrap();
                (*t, mean, best)
            })
            .collect();
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(y.0)));
        for (t, _, best) in ranked.into_iter().take(cfg.sft.top_k) {
            if cfg.variant == Variant::Archive && !(best.gain > 0.0) {
                continue;
            }
            let (Some(tr), Some(edit), Some(article)) = (templates.get(t), edits.get(best.self_edit_id.as_str()), articles.get(a)) else { continue };
            if !edit.valid {
                continue;
            }
            if let Some(meta) = &meta {
                rows.push(SftRow {
                    example_id: format!("{}-template", best.self_edit_id),
                    kind: "template".into(),
                    article_id: a.to_string(),
                    template_id: t.to_string(),
                    self_edit_id: best.self_edit_id.clone(),
                    prompt: meta.clone(),
                    completion: tr.raw_response.clone(),
                    accuracy: best.adapted_accuracy,
                    gain: best.gain,
                });
            }
            let prompt = if tr.category == "baseline" {
                let name = if cfg.variant == Variant::BaselineRewrite { prompts::BASELINE_REWRITE } else { prompts::BASELINE_IMPLICATIONS };
                prompts.render(name, json!({"title": article.title, "context": article.context}))?
            } else {
                prompts.render(prompts::COMPLETION, json!({"title": article.title, "context": article.context, "instruction": tr.instruction}))?
            };
            rows.push(SftRow {
                example_id: format!("{}-completion", best.self_edit_id),
                kind: "completion".into(),
                article_id: a.to_string(),
                template_id: t.to_string(),
                self_edit_id: best.self_edit_id.clone(),
                prompt,
                completion: edit.raw_response.clone(),
                accuracy: best.adapted_accuracy,
                gain: best.gain,
            });
        }
    }
    Ok(rows)
}

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
) -> anyhow::Result<Option<crate::training::TrainReport>> {
    let tok = &model.tokenizer;
    let end = tok.stop_ids.first().copied();
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
        let targets = s.target_modules.iter().map(|m| Module::parse(m)).collect::<anyhow::Result<Vec<_>>>()?;
        let lora = LoraConfig { rank: s.lora_rank, alpha: s.lora_alpha, dropout: s.lora_dropout, targets };
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
        let ckpt = crate::training::Checkpointing { dir: checkpoint_dir, every: s.checkpoint_every };
        let mut on_step = on_step;
        let report = crate::training::train_lora_with(&model.decoder, &mut adapter, &train, &tc, Some(&ckpt), |a, b, c| {
            on_step(a, b, c);
            std::ops::ControlFlow::Continue(())
        })?;
        adapter.merge_into(&mut decoder)?;
        Some(report)
    };
    crate::checkpoint::save_hf(&decoder, tok, out)?;
    Ok(report)
}

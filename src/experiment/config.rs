//! The experiment config: one TOML file in `configs/` holds everything a run depends on.
//!
//! Unknown keys are errors that name the key. No stage invents its own defaults: every
//! setting a stage reads is here. The content hash of a stage's part of the config (plus the
//! prompt files it uses) stamps its outputs, so editing a comment reruns nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::experiment::states::{BaseRuns, HeuristicRule, Split};
use crate::experiment::template::{HyperparameterBounds, Hyperparameters};
use crate::runtime::blas::ComputeDtype;
use crate::runtime::generate::SamplingParams;
use crate::runtime::model::Proj;

pub use crate::experiment::states::GraderKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    BaselineImplications,
    BaselineRewrite,
    /// SEAL's "train on passage" row: the passage itself is the one training sequence
    /// (nothing is generated), trained with the baseline hyperparameters.
    BaselinePassage,
    NoArchive,
    Archive,
    /// The archive variant with explicit novelty pressure ([`NoveltySection`]): templates are
    /// ranked by normalized gain plus a bonus for being unlike the archive, and the archive
    /// prompt names the strategies that are already crowded.
    Novelty,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::BaselineImplications => "baseline-implications",
            Variant::BaselineRewrite => "baseline-rewrite",
            Variant::BaselinePassage => "baseline-passage",
            Variant::NoArchive => "no-archive",
            Variant::Archive => "archive",
            Variant::Novelty => "novelty",
        }
    }
    pub fn is_baseline(self) -> bool {
        matches!(self, Variant::BaselineImplications | Variant::BaselineRewrite | Variant::BaselinePassage)
    }
    /// Templates are written from the archive prompt (archive and novelty).
    pub fn uses_archive(self) -> bool {
        matches!(self, Variant::Archive | Variant::Novelty)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file or a Hugging Face checkpoint folder (relative to the working directory).
    pub path: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32` (default) or `bf16`: the precision of the frozen weights' products on the CPU
    /// (`bf16` needs Intel AMX; see `runtime::amx`; f32 takes `runtime::sgemm` on AVX-512
    /// CPUs, OpenBLAS elsewhere). Left out of the stage hashes while f32, so configs written
    /// before it keep their outputs.
    #[serde(default, skip_serializing_if = "ComputeDtype::is_f32")]
    pub compute_dtype: ComputeDtype,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training-split passages (a file in any of the three SQuAD shapes).
    pub train_path: PathBuf,
    /// Validation-split passages (used by validation runs).
    pub validation_path: Option<PathBuf>,
    pub train_passages: usize,
    pub validation_passages: usize,
    /// Seed of the shuffle that selects the passages (the paper: 42, Python's `random`).
    pub seed: u64,
    /// First passage taken from the shuffled list (the paper's `start`).
    #[serde(default)]
    pub start: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SearchSection {
    pub templates_per_iteration: usize,
    pub completions_per_template: usize,
    /// Share of templates (and completions) sampled in exploit mode.
    pub exploit_fraction: f64,
    pub template_max_new_tokens: usize,
    pub completion_max_new_tokens: usize,
    /// Cap on the instruction's length in the template schema (characters).
    pub instruction_max_chars: usize,
    /// Cap on training sequences per completion in the schema.
    pub max_sequences: usize,
    /// Cap on one training sequence's length in the schema (characters).
    pub sequence_max_chars: usize,
    /// Rows per generation batch.
    pub batch_size: usize,
    pub exploit: SamplingParams,
    pub explore: SamplingParams,
    /// The explore regime of completions when it differs from the templates' (the paper's
    /// thinking regime: presence penalty 0.1 for completions, 0 for templates).
    #[serde(default)]
    pub completion_explore: Option<SamplingParams>,
    /// Thinking mode (Qwen3's `enable_thinking`): the chat template is rendered with the
    /// switch on, the model reasons freely up to `</think>` (at most `thinking_max_tokens`),
    /// then writes its answer under the JSON constraint; the reasoning is kept in the
    /// `reasoning` column. Off by default (models without a thinking template).
    #[serde(default)]
    pub thinking: bool,
    /// Token budget of the reasoning in thinking mode.
    #[serde(default = "default_thinking_tokens")]
    pub thinking_max_tokens: usize,
}

fn default_thinking_tokens() -> usize {
    12_000
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Append the passage itself as one more training sequence (SEAL: yes; the paper's code: no;
    /// never under `baseline-passage`, whose one sequence is the passage).
    pub append_passage: bool,
    pub max_len: usize,
    /// The projections the self-edit adapters train (the paper: `q_proj`, `v_proj`).
    pub target_modules: Vec<Proj>,
    /// Append the chat model's end-of-turn token to every training sequence, as the paper's
    /// code does for instruct models (default true; no effect without a chat template).
    #[serde(default = "yes")]
    pub end_of_turn: bool,
    /// Gradient-norm clipping (Hugging Face Trainer default 1.0; 0 = off).
    pub max_grad_norm: f64,
    /// Adapters trained at once in shared batches (see `runtime::training::train_group`).
    /// A speed setting only: an adapter trained in a group equals the one trained alone, so
    /// it is left out of every hash and changing it retrains nothing.
    #[serde(default = "default_adapters_per_batch", skip_serializing)]
    pub adapters_per_batch: usize,
    /// The estimated memory the adapters in flight may hold together, MiB (weights,
    /// optimizer state and one pass's activations; see `runtime::training::GroupLimits`):
    /// fewer than `adapters_per_batch` train at once when their sum would exceed it. Absent:
    /// `adapters_per_batch` alone bounds the group. A speed setting, left out of every hash.
    #[serde(default, skip_serializing)]
    pub group_memory_mib: Option<u64>,
    /// The most training tokens one self-edit may cost (tokens of its sequences, each cut to
    /// `max_len`, times its epochs). The model chooses the epochs and, through its
    /// instruction, how many sequences and how long; a self-edit over the cap keeps the first
    /// sequences that fit (one sequence cut to fit when even the first does not), recorded
    /// in the `capped` column of `adapters.parquet`. 0 = no cap.
    #[serde(default = "default_max_tokens_per_self_edit")]
    pub max_tokens_per_self_edit: usize,
}

/// About seven times a paper self-edit (10 sequences of ~60 tokens, 10 epochs).
fn default_max_tokens_per_self_edit() -> usize {
    40_000
}

/// Chosen by measurement on the 2-core CPU (`make bench`, the `grouped_*` lines; README).
fn default_adapters_per_batch() -> usize {
    16
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub runs: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub grader: GraderKind,
    /// Base-model runs: `per-self-edit` (the paper's, the default: once per template,
    /// completion and run of the article) or `per-article` (`runs` times per article).
    #[serde(default)]
    pub base_runs: BaseRuns,
    /// The heuristic verdict: `substring` (the paper's, the default) or `word-boundary`.
    #[serde(default)]
    pub heuristic: HeuristicRule,
    /// The judge model (GGUF or HF folder); defaults to the experiment's model when absent.
    pub judge_model: Option<PathBuf>,
    /// Thinking mode for the answers (the paper's code answers in the generator's thinking
    /// mode): the model reasons up to `</think>` within `thinking_max_tokens`, and the text
    /// after it is graded. Off by default.
    #[serde(default)]
    pub thinking: bool,
    #[serde(default = "default_thinking_tokens")]
    pub thinking_max_tokens: usize,
    /// Rows per generation batch.
    pub batch_size: usize,
    /// Models (adapters or the base) whose questions × runs share generation batches. A
    /// speed setting only, left out of every hash: a row's answer does not depend on the
    /// other rows of its batch.
    #[serde(default = "default_adapters_per_batch", skip_serializing)]
    pub adapters_per_batch: usize,
}

/// Novelty pressure (the `novelty` variant). A template's novelty is one minus its highest text
/// similarity to the templates already in the archive before its iteration, with the
/// collapse analysis' measure ((1 + cos) / 2 of all-MiniLM-L6-v2 sentence embeddings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoveltySection {
    /// The archive's order and the generator's training examples use
    /// `normalized_gain + weight * novelty` (per article: `accuracy + weight * novelty`).
    pub weight: f64,
    /// Two templates at least this similar count as the same strategy; a strategy with 2 or
    /// more members in the archive is shown to the generator as crowded.
    pub crowded_similarity: f64,
    /// The sentence-embedder folder (`make embedder`).
    pub embedder: PathBuf,
}

/// The fixed hyperparameters of SEAL's baselines and seed archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaselineSection {
    /// SEAL's fixed hyperparameters (the paper: r32, alpha 64, lr 1e-3, 10 epochs).
    pub hyperparameters: Hyperparameters,
    /// Sampling of the baselines' plain-text completions.
    pub sampling: SamplingParams,
}

/// Improving the generator between iterations (ReST-EM): which self-edits become supervised
/// examples and how the generator's LoRA is trained before it is merged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SftSection {
    /// Templates kept per article (by mean accuracy on it), each with its best completion.
    pub top_k: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<Proj>,
    pub learning_rate: f64,
    pub num_epochs: usize,
    pub gradient_accumulation_steps: usize,
    pub max_len: usize,
    /// Save a checkpoint every this many optimizer steps (a killed run resumes from it).
    pub checkpoint_every: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub variant: Variant,
    pub seed: u64,
    /// Folder of the prompt text files.
    pub prompts_dir: PathBuf,
    /// The seed archive (paper/archive_seed.json layout).
    pub archive_seed: PathBuf,
    pub model: ModelSection,
    pub data: DataSection,
    pub search: SearchSection,
    pub hyperparameter_bounds: HyperparameterBounds,
    pub training: TrainingSection,
    pub eval: EvalSection,
    pub baseline: BaselineSection,
    pub sft: SftSection,
    /// Only for the `novelty` variant (absent otherwise, so other configs hash as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub novelty: Option<NoveltySection>,
}

/// A loaded config with where it came from.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The config file's name without `.toml`: the folder under `outputs/`.
    pub name: String,
    pub path: PathBuf,
    pub config: ExperimentConfig,
    /// `train`, or `validation`: the held-out passages, where each iteration's model writes
    /// one template and one completion, exploit sampling only (the paper's protocol).
    pub split: Split,
}

impl Experiment {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut config: ExperimentConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.expand_paths().with_context(|| format!("{}", path.display()))?;
        config.validate().with_context(|| format!("{}", path.display()))?;
        let name =
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).with_context(|| format!("{}: no file name", path.display()))?;
        Ok(Self { name, path: path.to_path_buf(), config, split: Split::Train })
    }

    /// The same experiment run on the validation passages: 1 template, 1 completion, exploit.
    pub fn for_split(mut self, split: Split) -> anyhow::Result<Self> {
        match split {
            Split::Train => {}
            Split::Validation => {
                anyhow::ensure!(
                    self.config.data.validation_passages > 0 && self.config.data.validation_path.is_some(),
                    "{}: the validation split needs data.validation_path and data.validation_passages > 0",
                    self.path.display()
                );
                let s = &mut self.config.search;
                s.templates_per_iteration = 1;
                s.completions_per_template = 1;
                s.exploit_fraction = 1.0;
            }
        }
        self.split = split;
        Ok(self)
    }
}

fn yes() -> bool {
    true
}

/// Expands `${VAR}` and `${VAR:-default}` from the environment, so a path can be given on
/// the make command line (`make run CONFIG=configs/paper-archive.toml SQUAD_DIR=/data/squad`).
pub fn expand_env(s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').with_context(|| format!("unclosed ${{ in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => bail!("{s:?} uses ${{{name}}}, which is not set"),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_path(p: &mut PathBuf) -> anyhow::Result<()> {
    *p = PathBuf::from(expand_env(&p.to_string_lossy())?);
    Ok(())
}

impl ExperimentConfig {
    fn expand_paths(&mut self) -> anyhow::Result<()> {
        expand_path(&mut self.model.path)?;
        self.model.device = expand_env(&self.model.device)?;
        expand_path(&mut self.data.train_path)?;
        if let Some(p) = self.data.validation_path.as_mut() {
            expand_path(p)?;
        }
        if let Some(p) = self.eval.judge_model.as_mut() {
            expand_path(p)?;
        }
        if let Some(n) = self.novelty.as_mut() {
            expand_path(&mut n.embedder)?;
        }
        expand_path(&mut self.prompts_dir)?;
        expand_path(&mut self.archive_seed)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let s = &self.search;
        ensure!(s.templates_per_iteration >= 1, "search.templates_per_iteration must be >= 1");
        ensure!(s.completions_per_template >= 1, "search.completions_per_template must be >= 1");
        ensure!((0.0..=1.0).contains(&s.exploit_fraction), "search.exploit_fraction must be in [0, 1]");
        ensure!(s.batch_size >= 1 && self.eval.batch_size >= 1, "batch sizes must be >= 1");
        ensure!(self.training.adapters_per_batch >= 1, "training.adapters_per_batch must be >= 1");
        ensure!(self.eval.adapters_per_batch >= 1, "eval.adapters_per_batch must be >= 1");
        ensure!(self.training.group_memory_mib != Some(0), "training.group_memory_mib must be >= 1 (MiB), or absent for no limit");
        s.exploit.validate().context("search.exploit")?;
        s.explore.validate().context("search.explore")?;
        if let Some(c) = &s.completion_explore {
            c.validate().context("search.completion_explore")?;
        }
        ensure!(!s.thinking || s.thinking_max_tokens >= 1, "search.thinking_max_tokens must be >= 1 in thinking mode");
        ensure!(!self.eval.thinking || self.eval.thinking_max_tokens >= 1, "eval.thinking_max_tokens must be >= 1 in thinking mode");
        self.eval.sampling.validate().context("eval.sampling")?;
        ensure!(self.eval.runs >= 1, "eval.runs must be >= 1");
        ensure!(self.data.train_passages >= 1, "data.train_passages must be >= 1");
        let b = &self.hyperparameter_bounds;
        for (name, bd) in Hyperparameters::NAMES.iter().zip(b.values()) {
            ensure!(bd.min <= bd.max, "hyperparameter_bounds.{name}: min {} > max {}", bd.min, bd.max);
        }
        ensure!(
            b.lora_rank.min >= 1.0 && b.num_epochs.min >= 1.0 && b.gradient_accumulation_steps.min >= 1.0,
            "hyperparameter_bounds: lora_rank, num_epochs and gradient_accumulation_steps need min >= 1"
        );
        ensure!(b.learning_rate.min > 0.0, "hyperparameter_bounds.learning_rate.min must be > 0");
        ensure!(b.lora_dropout.max < 1.0 && b.lora_dropout.min >= 0.0, "hyperparameter_bounds.lora_dropout must lie in [0, 1)");
        let h = &self.baseline.hyperparameters;
        lora_settings(
            "baseline.hyperparameters",
            h.lora_rank as f64,
            h.lora_alpha as f64,
            h.lora_dropout,
            h.learning_rate,
            h.num_epochs as f64,
            h.gradient_accumulation_steps as f64,
        )?;
        self.baseline.sampling.validate().context("baseline.sampling")?;
        let f = &self.sft;
        lora_settings(
            "sft",
            f.lora_rank as f64,
            f.lora_alpha,
            f.lora_dropout,
            f.learning_rate,
            f.num_epochs as f64,
            f.gradient_accumulation_steps as f64,
        )?;
        ensure!(f.top_k >= 1 && f.max_len >= 1 && f.checkpoint_every >= 1, "sft.top_k, sft.max_len and sft.checkpoint_every must be >= 1");
        ensure!(self.training.max_len >= 1, "training.max_len must be >= 1 (tokens)");
        ensure!(
            self.training.max_grad_norm >= 0.0 && self.training.max_grad_norm.is_finite(),
            "training.max_grad_norm must be a finite number >= 0 (0 turns clipping off), not {}",
            self.training.max_grad_norm
        );
        match (&self.novelty, self.variant) {
            (None, Variant::Novelty) => bail!("the novelty variant needs a [novelty] section (weight, crowded_similarity, embedder)"),
            (Some(_), v) if v != Variant::Novelty => {
                bail!("[novelty] applies only to variant = \"novelty\" (this config is {:?})", v.as_str())
            }
            (Some(n), _) => {
                ensure!(n.weight >= 0.0, "novelty.weight must be >= 0");
                ensure!((0.0..=1.0).contains(&n.crowded_similarity), "novelty.crowded_similarity must lie in [0, 1]");
            }
            _ => {}
        }
        if self.variant == Variant::BaselinePassage && s.completions_per_template != 1 {
            bail!("baseline-passage trains on the passage itself, the same for every completion: set search.completions_per_template = 1");
        }
        if self.variant.is_baseline() && s.templates_per_iteration != 1 {
            bail!("a baseline variant has exactly one fixed template: set search.templates_per_iteration = 1");
        }
        Ok(())
    }
}

/// A LoRA run's settings are usable: rank, epochs and accumulation at least 1, alpha and the
/// learning rate positive and finite, dropout in [0, 1). `section` names the config table.
fn lora_settings(section: &str, rank: f64, alpha: f64, dropout: f64, lr: f64, epochs: f64, accumulation: f64) -> anyhow::Result<()> {
    ensure!(rank >= 1.0, "{section}.lora_rank must be >= 1, not {rank}");
    ensure!(alpha > 0.0 && alpha.is_finite(), "{section}.lora_alpha must be > 0, not {alpha}");
    ensure!((0.0..1.0).contains(&dropout), "{section}.lora_dropout must lie in [0, 1), not {dropout}");
    ensure!(lr > 0.0 && lr.is_finite(), "{section}.learning_rate must be > 0, not {lr}");
    ensure!(epochs >= 1.0, "{section}.num_epochs must be >= 1, not {epochs}");
    ensure!(accumulation >= 1.0, "{section}.gradient_accumulation_steps must be >= 1, not {accumulation}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_and_unknown_keys() {
        std::env::set_var("SELFEDIT_TEST_DIR", "/data/squad");
        assert_eq!(expand_env("${SELFEDIT_TEST_DIR}/dev.json").unwrap(), "/data/squad/dev.json");
        assert_eq!(expand_env("${SELFEDIT_TEST_UNSET:-../shared/squad}/x").unwrap(), "../shared/squad/x");
        assert!(expand_env("${SELFEDIT_TEST_UNSET}").is_err());
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml")).unwrap();
        let bad = text.replace("[model]", "[model]\nbatch_sise = 3");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.toml");
        std::fs::write(&p, bad).unwrap();
        let e = format!("{:#}", Experiment::load(&p).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("batch_sise"), "{e}");
        // model.compute_dtype: bf16 read, a misspelt value refused by name, f32 by default and
        // then left out of what the stage hashes see, so older outputs keep their hashes
        let d16 = d.path().join("bf16.toml");
        std::fs::write(&d16, text.replace("[model]", "[model]\ncompute_dtype = \"bf16\"")).unwrap();
        assert_eq!(Experiment::load(&d16).unwrap().config.model.compute_dtype, ComputeDtype::Bf16);
        std::fs::write(&d16, text.replace("[model]", "[model]\ncompute_dtype = \"bf8\"")).unwrap();
        let e = format!("{:#}", Experiment::load(&d16).unwrap_err());
        assert!(e.contains("compute_dtype") || (e.contains("bf8") && e.contains("bf16")), "{e}");
        let tiny = Experiment::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml"))).unwrap();
        assert_eq!(tiny.config.model.compute_dtype, ComputeDtype::F32);
        assert!(!serde_json::to_string(&tiny.config.model).unwrap().contains("compute_dtype"));
        // every shipped config loads
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
            let path = entry.unwrap().path();
            Experiment::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
    }
}

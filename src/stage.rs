//! What every stage binary shares: arguments, paths, the config hash of its part of the
//! config, progress bars, provenance, and the one line it prints when done.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::{content_hash, Experiment};
use crate::prompts::{self, Prompts};
use crate::tables::Provenance;

#[derive(Debug, Clone, Args)]
pub struct StageArgs {
    /// The experiment config (configs/NAME.toml); outputs go to OUTPUTS/NAME/.
    #[arg(long)]
    pub config: PathBuf,
    /// Root of the outputs.
    #[arg(long, default_value = "outputs")]
    pub outputs: PathBuf,
    /// Iteration number.
    #[arg(long, default_value_t = 0)]
    pub iter: usize,
    /// `train`, or `validation` (outputs under iter<k>/validation/).
    #[arg(long, default_value = "train")]
    pub split: String,
}

impl StageArgs {
    pub fn experiment(&self) -> anyhow::Result<Experiment> {
        Experiment::load(&self.config)?.for_split(&self.split)
    }
    pub fn exp_dir(&self, exp: &Experiment) -> PathBuf {
        self.outputs.join(&exp.name)
    }
    pub fn iter_dir(&self, exp: &Experiment) -> PathBuf {
        exp.iter_dir(&self.outputs, self.iter)
    }
}

pub fn init_logging() {
    crate::blas::configure_threads();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A progress bar with an ETA on stderr (hidden when stderr is not a terminal... unless
/// SELFEDIT_PROGRESS=1).
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>18} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// The stages and which parts of the config (and which prompt files) each depends on.
pub const STAGES: [&str; 7] = ["prepare", "templates", "synthesize", "train", "evaluate", "archive", "sft"];

/// The content hash of what `stage` depends on: its config sections and prompt files.
pub fn stage_hash(exp: &Experiment, stage: &str) -> anyhow::Result<String> {
    let c = &exp.config;
    let prompts = Prompts::load(&c.prompts_dir)?;
    let v = match stage {
        "prepare" => serde_json::json!([c.data]),
        "templates" => serde_json::json!([c.variant, c.seed, c.model, c.search, c.hyperparameter_bounds, c.baseline,
            prompts.sources(&[prompts::META, prompts::ARCHIVE_META, prompts::BASELINE_IMPLICATIONS, prompts::BASELINE_REWRITE])]),
        "synthesize" => serde_json::json!([c.variant, c.seed, c.model, c.search, c.baseline,
            prompts.sources(&[prompts::COMPLETION, prompts::BASELINE_IMPLICATIONS, prompts::BASELINE_REWRITE])]),
        "train" => serde_json::json!([c.seed, c.model, c.training]),
        "evaluate" => serde_json::json!([c.seed, c.model, c.eval,
            prompts.sources(&[prompts::QA_SYSTEM, prompts::QA_BASE, prompts::JUDGE])]),
        "sft" => serde_json::json!([c.variant, c.seed, c.model, c.sft,
            prompts.sources(&[prompts::META, prompts::ARCHIVE_META, prompts::COMPLETION, prompts::BASELINE_IMPLICATIONS, prompts::BASELINE_REWRITE])]),
        "archive" => {
            let seed = std::fs::read_to_string(&c.archive_seed).unwrap_or_default();
            serde_json::json!([c.variant, seed])
        }
        other => anyhow::bail!("unknown stage {other:?}"),
    };
    Ok(content_hash(&v))
}

/// Writes `dir/<stage>.hash` for every stage, touching only the files whose hash changed, so
/// make reruns exactly the stages whose settings changed.
pub fn write_stamps(exp: &Experiment, dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut changed = Vec::new();
    for stage in STAGES {
        let hash = stage_hash(exp, stage)?;
        let path = dir.join(format!("{stage}.hash"));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(hash.as_str()) {
            crate::io::write_string_atomically(&path, &hash)?;
            changed.push(stage.to_string());
        }
    }
    Ok(changed)
}

pub fn provenance(exp: &Experiment, stage: &str, iteration: usize) -> anyhow::Result<Provenance> {
    Ok(Provenance {
        stage: stage.to_string(),
        config_hash: stage_hash(exp, stage)?,
        model: exp.config.model.path.display().to_string(),
        extra: vec![
            ("experiment".into(), exp.name.clone()),
            ("variant".into(), exp.config.variant.as_str().into()),
            ("iteration".into(), iteration.to_string()),
        ],
    })
}

/// The one line a finished stage prints.
pub fn done(stage: &str, path: &Path, rows: usize, detail: &str) {
    if detail.is_empty() {
        println!("{stage}: wrote {} ({rows} rows)", path.display());
    } else {
        println!("{stage}: wrote {} ({rows} rows; {detail})", path.display());
    }
}

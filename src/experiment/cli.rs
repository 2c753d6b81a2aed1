//! What every stage binary shares, so each binary is argument parsing and one call: the
//! common arguments, the [`StageContext`] they open (config, prompts, layout, iteration),
//! model loading, sharding and shard merging, stamps, provenance, progress bars, and the one
//! line a finished stage prints.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::experiment::config::Experiment;
use crate::experiment::layout::{Layout, Shard, Stage};
use crate::experiment::prompts::{self, Prompts};
use crate::experiment::states::Split;
use crate::experiment::tables::{self, Provenance, Table};
use crate::runtime::device::parse_device;
use crate::runtime::formats::LoadedModel;
use crate::util::hash::content_hash;

/// The arguments of every stage binary.
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
    #[arg(long, default_value = "train", value_parser = |s: &str| Split::parse(s))]
    pub split: Split,
}

/// The arguments of the stages that load the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// This iteration's model, when it is not the config's (iterations after the first use
    /// the previous iteration's improved generator).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// The archive argument of the stages that condition on one (archive variant).
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// The archive to condition on: the previous iteration's archive.parquet (default: the
    /// seed archive for the archive variant, none otherwise).
    #[arg(long)]
    pub archive: Option<PathBuf>,
}

/// The arguments of a sharded stage: `--shard i/n` computes a part, `--merge n` joins them.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// Compute only items i, i+n, ...: writes <table>.shard-i-of-n.parquet.
    #[arg(long, default_value = "0/1", value_parser = |s: &str| Shard::parse(s))]
    pub shard: Shard,
    /// Merge the N shard files into one table instead of computing.
    #[arg(long)]
    pub merge: Option<usize>,
}

/// What a stage works in: the experiment (its config for the split), its prompts, its
/// output layout and the iteration.
pub struct StageContext {
    pub exp: Experiment,
    pub prompts: Prompts,
    pub layout: Layout,
    pub iteration: usize,
}

impl StageContext {
    /// Loads the config (for the split) and the prompt files.
    pub fn open(args: &StageArgs) -> anyhow::Result<Self> {
        let exp = Experiment::load(&args.config)?.for_split(args.split)?;
        let prompts = Prompts::load(&exp.config.prompts_dir)?;
        let layout = Layout::new(&args.outputs, &exp.name);
        Ok(Self { exp, prompts, layout, iteration: args.iter })
    }
    /// A context for `exp` (already loaded, perhaps edited) writing under `outputs`.
    pub fn new(exp: Experiment, outputs: &Path, iteration: usize) -> anyhow::Result<Self> {
        let prompts = Prompts::load(&exp.config.prompts_dir)?;
        let layout = Layout::new(outputs, &exp.name);
        Ok(Self { exp, prompts, layout, iteration })
    }
    pub fn split(&self) -> Split {
        self.exp.split
    }
    /// This iteration's (and split's) folder.
    pub fn dir(&self) -> PathBuf {
        self.layout.iter_dir(self.iteration, self.split())
    }
    /// This iteration's (and split's) file of table `T`.
    pub fn table<T: Table>(&self) -> PathBuf {
        self.layout.table::<T>(self.iteration, self.split())
    }
    /// Reads this iteration's table `T`.
    pub fn read<T: Table>(&self) -> anyhow::Result<Vec<T>> {
        tables::read(&self.table::<T>())
    }
    /// Writes `rows` as `path` with `stage`'s provenance and prints the stage's line.
    pub fn write<T: Table>(&self, stage: Stage, path: &Path, rows: &[T], detail: &str) -> anyhow::Result<()> {
        tables::write(path, rows, &self.provenance(stage)?)?;
        done(stage.name(), path, rows.len(), detail);
        Ok(())
    }
    /// Loads the model: `--model`, else the config's, on the config's device.
    pub fn load_model(&self, args: &ModelArgs) -> anyhow::Result<LoadedModel> {
        let device = parse_device(&self.exp.config.model.device)?;
        let mut model = crate::runtime::formats::load(args.model.as_deref().unwrap_or(&self.exp.config.model.path), &device)?;
        model.decoder.set_compute_dtype(self.exp.config.model.compute_dtype).context("model.compute_dtype")?;
        Ok(model)
    }
    pub fn provenance(&self, stage: Stage) -> anyhow::Result<Provenance> {
        Ok(Provenance {
            stage: stage.name().to_string(),
            config_hash: stage_hash(&self.exp, stage.settings())?,
            model: self.exp.config.model.path.display().to_string(),
            extra: vec![
                ("experiment".into(), self.exp.name.clone()),
                ("variant".into(), self.exp.config.variant.as_str().into()),
                ("iteration".into(), self.iteration.to_string()),
            ],
        })
    }
    /// `--merge n`: joins the `n` shard files of table `T` into the table and prints the line.
    pub fn merge_shards<T: Table>(&self, stage: Stage, n: usize) -> anyhow::Result<()> {
        let mut rows: Vec<T> = Vec::new();
        for index in 0..n {
            rows.extend(tables::read::<T>(&self.layout.shard_table::<T>(self.iteration, self.split(), Shard { index, count: n }))?);
        }
        self.write(stage, &self.table::<T>(), &rows, &format!("{n} shards merged"))
    }
    /// The file a shard of table `T` goes to.
    pub fn shard_table<T: Table>(&self, shard: Shard) -> PathBuf {
        self.layout.shard_table::<T>(self.iteration, self.split(), shard)
    }
}

/// A progress bar with an ETA on stderr (hidden when stderr is not a terminal).
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>18} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// The content hash of what `stage` depends on: its config sections, prompt files and, for
/// `prepare`, the passage files it reads (an edited file selects its passages again).
///
/// Errors: a prompt file or a passage file that cannot be read, named with its config field.
pub fn stage_hash(exp: &Experiment, stage: Stage) -> anyhow::Result<String> {
    let c = &exp.config;
    let prompts = Prompts::load(&c.prompts_dir)?;
    let file_hash = |field: &str, path: &Path| {
        std::fs::read(path)
            .map(|bytes| crate::util::hash::hash_bytes(&bytes))
            .with_context(|| format!("data.{field}: reading {} (the passages to select from)", path.display()))
    };
    let v = match stage.settings() {
        Stage::Prepare => {
            let train = file_hash("train_path", &c.data.train_path)?;
            let validation = match (&c.data.validation_path, c.data.validation_passages > 0) {
                (Some(path), true) => Some(file_hash("validation_path", path)?),
                _ => None,
            };
            serde_json::json!([c.data, train, validation])
        }
        Stage::Templates => serde_json::json!([
            c.variant,
            c.seed,
            c.model,
            c.search,
            c.hyperparameter_bounds,
            c.baseline,
            prompts.sources(&[prompts::META, prompts::ARCHIVE_META, prompts::BASELINE_IMPLICATIONS, prompts::BASELINE_REWRITE])
        ]),
        Stage::Synthesize => serde_json::json!([
            c.variant,
            c.seed,
            c.model,
            c.search,
            c.baseline,
            prompts.sources(&[prompts::COMPLETION, prompts::BASELINE_IMPLICATIONS, prompts::BASELINE_REWRITE])
        ]),
        Stage::Train => serde_json::json!([c.seed, c.model, c.training]),
        Stage::Evaluate => {
            serde_json::json!([c.seed, c.model, c.eval, prompts.sources(&[prompts::QA_SYSTEM, prompts::QA_BASE, prompts::JUDGE])])
        }
        Stage::Sft => serde_json::json!([
            c.variant,
            c.seed,
            c.model,
            c.sft,
            prompts.sources(&[
                prompts::META,
                prompts::ARCHIVE_META,
                prompts::COMPLETION,
                prompts::BASELINE_IMPLICATIONS,
                prompts::BASELINE_REWRITE
            ])
        ]),
        Stage::Archive => {
            let seed = std::fs::read_to_string(&c.archive_seed).unwrap_or_default();
            serde_json::json!([c.variant, seed])
        }
        s => unreachable!("{s} has no settings of its own"),
    };
    // Novelty settings change the archive's order, the templates' prompt and the SFT examples;
    // appended only when present, so other configs keep their hashes.
    let v = match (&c.novelty, stage.settings()) {
        (Some(n), Stage::Templates | Stage::Archive | Stage::Sft) => serde_json::json!([v, n]),
        _ => v,
    };
    Ok(content_hash(&v))
}

/// Writes `stamps/<stage>.hash` for every stamped stage (in `into` instead of the
/// experiment's `stamps/` when given: make's dry runs stamp a copy), touching only the files
/// whose hash changed, so make reruns exactly the stages whose settings changed. Returns those
/// stages.
pub fn write_stamps(exp: &Experiment, layout: &Layout, into: Option<&Path>) -> anyhow::Result<Vec<Stage>> {
    let dir = into.map(Path::to_path_buf).unwrap_or_else(|| layout.stamps_dir());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut changed = Vec::new();
    for stage in Stage::stamped() {
        let hash = stage_hash(exp, stage)?;
        let path = dir.join(layout.stamp(stage).file_name().expect("a stamp is a file"));
        let old = std::fs::read_to_string(&path).ok();
        if old.as_deref() == Some(hash.as_str()) {
            continue;
        }
        // A prepare stamp written before the passage files' contents were hashed keeps its
        // time: its settings are unchanged, so upgrading reruns nothing.
        let upgraded = stage == Stage::Prepare && old.as_deref() == Some(prepare_hash_of_settings_only(exp).as_str());
        let time = if upgraded { std::fs::metadata(&path).and_then(|m| m.modified()).ok() } else { None };
        crate::util::atomic::write_string_atomically(&path, &hash)?;
        match time {
            Some(t) => std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(t))
                .with_context(|| format!("keeping the time of {}", path.display()))?,
            None => changed.push(stage),
        }
    }
    Ok(changed)
}

/// The prepare stamp as versions before the passage files' contents were hashed wrote it.
fn prepare_hash_of_settings_only(exp: &Experiment) -> String {
    content_hash(&serde_json::json!([exp.config.data]))
}

/// The one line a finished stage prints.
pub fn done(stage: &str, path: &Path, rows: usize, detail: &str) {
    if detail.is_empty() {
        println!("{stage}: wrote {} ({rows} rows)", path.display());
    } else {
        println!("{stage}: wrote {} ({rows} rows; {detail})", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prepare stamp follows the passage file's contents, not only its path, and no other
    /// stage's stamp moves with it; a missing file is an error naming the field.
    #[test]
    fn prepare_stamp_follows_the_passage_files_contents() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let passages = dir.path().join("passages.json");
        let text = std::fs::read_to_string(root.join("data/demo_passages.json")).unwrap();
        std::fs::write(&passages, &text).unwrap();
        exp.config.data.train_path = passages.clone();
        let before = (stage_hash(&exp, Stage::Prepare).unwrap(), stage_hash(&exp, Stage::Train).unwrap());
        assert_eq!(stage_hash(&exp, Stage::Prepare).unwrap(), before.0, "the hash is stable");
        std::fs::write(&passages, text.replace("41 members", "43 members")).unwrap();
        let after = (stage_hash(&exp, Stage::Prepare).unwrap(), stage_hash(&exp, Stage::Train).unwrap());
        assert_ne!(after.0, before.0, "an edited passage file must rerun prepare-data");
        assert_eq!(after.1, before.1, "training does not read the passage file");
        std::fs::remove_file(&passages).unwrap();
        let e = format!("{:#}", stage_hash(&exp, Stage::Prepare).unwrap_err());
        assert!(e.contains("data.train_path") && e.contains("passages.json"), "{e}");
    }

    /// A prepare stamp of the settings alone (older versions) becomes the new hash and keeps
    /// its time, so upgrading reruns nothing; a real change gets a new time.
    #[test]
    fn an_older_prepare_stamp_is_upgraded_in_place() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let layout = Layout::new(out.path(), "tiny");
        write_stamps(&exp, &layout, None).unwrap();
        let path = layout.stamp(Stage::Prepare);
        let old_time = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        std::fs::write(&path, prepare_hash_of_settings_only(&exp)).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old_time).unwrap();
        assert!(write_stamps(&exp, &layout, None).unwrap().is_empty(), "an upgrade is not a change");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), stage_hash(&exp, Stage::Prepare).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old_time);
        std::fs::write(&path, "0123456789abcdef").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old_time).unwrap();
        assert_eq!(write_stamps(&exp, &layout, None).unwrap(), [Stage::Prepare]);
        assert!(std::fs::metadata(&path).unwrap().modified().unwrap() > old_time);
    }
}

//! Where everything lives under `outputs/`: one definition of every path the stages, the
//! analysis and the Makefile use, and the [`Stage`] enum that names the stages.
//!
//! ```text
//! outputs/<experiment>/
//!   articles.parquet                      prepare
//!   stamps/<stage>.hash                   stamp (one per stage with settings)
//!   iter<k>/                              the search on the training passages
//!     templates.parquet self_edits.parquet adapters.parquet answers.parquet
//!     scores.parquet template_stats.parquet archive.parquet sft.parquet
//!     adapters/<self_edit_id>/            one PEFT adapter per self-edit
//!     <table>.shard-<i>-of-<n>.parquet    a shard's rows before the merge
//!     sft_checkpoint/ generator/          the improved generator (ReST-EM)
//!     validation/                         the same tables on the held-out passages
//!   collapse.parquet report/              the analysis
//! ```
//!
//! The Makefile spells the same paths; `make paths` prints them and a test compares.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::experiment::states::Split;
use crate::experiment::tables::Table;

/// `--shard i/n`: this process does items whose index is `i` modulo `n`, and writes its
/// rows to `<table>.shard-i-of-n.parquet` ([`Layout::shard_table`]).
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
    /// How many of `n` items this shard owns.
    pub fn len_of(&self, n: usize) -> usize {
        (0..n).filter(|i| self.owns(*i)).count()
    }
}

/// The stages of an iteration, in pipeline order, plus the generator's improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Prepare,
    Templates,
    Synthesize,
    Train,
    Evaluate,
    Score,
    Archive,
    Sft,
    Generator,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Prepare,
        Stage::Templates,
        Stage::Synthesize,
        Stage::Train,
        Stage::Evaluate,
        Stage::Score,
        Stage::Archive,
        Stage::Sft,
        Stage::Generator,
    ];

    /// The stage's name: in stamps (`stamps/<name>.hash`), provenance and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Templates => "templates",
            Stage::Synthesize => "synthesize",
            Stage::Train => "train",
            Stage::Evaluate => "evaluate",
            Stage::Score => "score",
            Stage::Archive => "archive",
            Stage::Sft => "sft",
            Stage::Generator => "generator",
        }
    }

    /// The binary that runs it (`stages/<binary with _>.rs`).
    pub fn binary(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare-data",
            Stage::Templates => "generate-templates",
            Stage::Synthesize => "synthesize",
            Stage::Train => "train-adapters",
            Stage::Evaluate => "evaluate",
            Stage::Score => "score",
            Stage::Archive => "update-archive",
            Stage::Sft => "build-sft",
            Stage::Generator => "train-generator",
        }
    }

    /// The stage whose config settings this one depends on: itself, or (score, generator)
    /// the stage it follows, which has no settings of its own.
    pub fn settings(self) -> Stage {
        match self {
            Stage::Score => Stage::Evaluate,
            Stage::Generator => Stage::Sft,
            s => s,
        }
    }

    /// The stages that have a stamp file.
    pub fn stamped() -> impl Iterator<Item = Stage> {
        Stage::ALL.into_iter().filter(|s| s.settings() == *s)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The output folder of one experiment: `OUTPUTS/<experiment>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(outputs: &Path, experiment: &str) -> Self {
        Self { root: outputs.join(experiment) }
    }

    /// An experiment folder given directly (`outputs/tiny`).
    pub fn at(dir: &Path) -> Self {
        Self { root: dir.to_path_buf() }
    }

    /// `outputs/<experiment>/`
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `articles.parquet`: the selected passages of both splits.
    pub fn articles(&self) -> PathBuf {
        self.root.join("articles.parquet")
    }
    pub fn stamps_dir(&self) -> PathBuf {
        self.root.join("stamps")
    }
    /// `locks/<name>.lock`: the run lock of one command (see `util::lock`).
    pub fn lock(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }
    pub fn stamp(&self, stage: Stage) -> PathBuf {
        self.stamps_dir().join(format!("{}.hash", stage.name()))
    }
    /// `iter<k>/` (train split) or `iter<k>/validation/`.
    pub fn iter_dir(&self, iteration: usize, split: Split) -> PathBuf {
        let dir = self.root.join(format!("iter{iteration}"));
        match split {
            Split::Train => dir,
            Split::Validation => dir.join("validation"),
        }
    }
    /// A table of an iteration: `iter<k>/[validation/]<name>.parquet`.
    pub fn table<T: Table>(&self, iteration: usize, split: Split) -> PathBuf {
        self.iter_dir(iteration, split).join(format!("{}.parquet", T::NAME))
    }
    /// A shard's part of a table: `<name>.shard-<i>-of-<n>.parquet`; the whole table when
    /// there is one shard.
    pub fn shard_table<T: Table>(&self, iteration: usize, split: Split, shard: Shard) -> PathBuf {
        if shard.count == 1 {
            return self.table::<T>(iteration, split);
        }
        self.iter_dir(iteration, split).join(format!("{}.shard-{}-of-{}.parquet", T::NAME, shard.index, shard.count))
    }
    /// `adapters/`: one PEFT adapter folder per self-edit.
    pub fn adapters_dir(&self, iteration: usize, split: Split) -> PathBuf {
        self.iter_dir(iteration, split).join("adapters")
    }
    /// The generator improved after iteration `k`, used by iteration `k + 1`.
    pub fn generator_dir(&self, iteration: usize) -> PathBuf {
        self.iter_dir(iteration, Split::Train).join("generator")
    }
    /// The generator SFT's resumable checkpoints.
    pub fn sft_checkpoint_dir(&self, iteration: usize) -> PathBuf {
        self.iter_dir(iteration, Split::Train).join("sft_checkpoint")
    }
    /// The iterations that have `iter<k>/<table>.parquet`, from 0 up to the first missing.
    pub fn iterations_with<T: Table>(&self, split: Split) -> Vec<usize> {
        (0..).take_while(|k| self.table::<T>(*k, split).exists()).collect()
    }
    pub fn collapse(&self) -> PathBuf {
        self.root.join("collapse.parquet")
    }
    pub fn report_dir(&self) -> PathBuf {
        self.root.join("report")
    }
    /// The experiment's name: the folder's last component.
    pub fn experiment(&self) -> String {
        self.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::tables::{AnswerRow, TemplateRow};

    #[test]
    fn paths() {
        let l = Layout::new(Path::new("outputs"), "tiny");
        assert_eq!(l.table::<TemplateRow>(2, Split::Validation), Path::new("outputs/tiny/iter2/validation/templates.parquet"));
        let s = Shard { index: 1, count: 4 };
        assert_eq!(l.shard_table::<AnswerRow>(0, Split::Train, s), Path::new("outputs/tiny/iter0/answers.shard-1-of-4.parquet"));
        assert_eq!(l.shard_table::<AnswerRow>(0, Split::Train, Shard::ALL), Path::new("outputs/tiny/iter0/answers.parquet"));
        assert_eq!(
            Stage::stamped().map(|s| s.name()).collect::<Vec<_>>(),
            ["prepare", "templates", "synthesize", "train", "evaluate", "archive", "sft"]
        );
    }
}

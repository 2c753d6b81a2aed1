//! The pipeline's Parquet tables: one definition of each schema, used by the writer and the
//! reader.
//!
//! Each table is a plain Rust struct declared with [`table!`]: the macro derives the Arrow
//! schema from the field types, and the row ⇄ column conversion both ways. Files are written
//! atomically (temporary file, then rename) with key-value metadata saying what produced
//! them; reading checks every column's presence and type and names the file and column
//! otherwise. Any Parquet tool reads them (polars, DuckDB, pandas).

mod columns;
pub mod conform;

pub use columns::{Column, Columns};

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::ArrayRef;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::experiment::states::{AdapterStatus, ArmKind, Category, GraderKind, SftKind, Split};
use crate::experiment::template::Hyperparameters;

/// A question of a passage with every gold answer (official SQuAD has several).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub question: String,
    pub answers: Vec<String>,
}

/// A Parquet table: a row struct with its schema.
pub trait Table: Sized {
    const NAME: &'static str;
    fn schema() -> SchemaRef;
    fn to_batch(rows: &[Self]) -> anyhow::Result<RecordBatch>;
    fn from_batch(batch: &RecordBatch, file: &Path) -> anyhow::Result<Vec<Self>>;
}

/// Declares a row struct and its [`Table`] implementation. Each field is stored through
/// [`Columns`]: one column named after it, or (the hyperparameters) one per member.
macro_rules! table {
    ($(#[$meta:meta])* $name:ident = $file:literal { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty),* }

        impl Table for $name {
            const NAME: &'static str = $file;
            fn schema() -> SchemaRef {
                let mut fields: Vec<Field> = Vec::new();
                $(fields.extend(<$ty as Columns>::fields(stringify!($field)));)*
                Arc::new(Schema::new(fields))
            }
            fn to_batch(rows: &[Self]) -> anyhow::Result<RecordBatch> {
                let mut columns: Vec<ArrayRef> = Vec::new();
                $({
                    let vals: Vec<&$ty> = rows.iter().map(|r| &r.$field).collect();
                    columns.extend(<$ty as Columns>::build_columns(&vals));
                })*
                Ok(RecordBatch::try_new(Self::schema(), columns)?)
            }
            fn from_batch(batch: &RecordBatch, file: &Path) -> anyhow::Result<Vec<Self>> {
                $(
                    let $field = field_arrays(batch, &<$ty as Columns>::fields(stringify!($field)), file, $file)?;
                )*
                (0..batch.num_rows()).map(|row| Ok($name { $($field: <$ty as Columns>::read_columns(&$field, row)
                    .with_context(|| format!("{}: row {row}, column {:?}", file.display(), stringify!($field)))?),* })).collect()
            }
        }
    };
}

/// The arrays of `fields` in `batch`, each present and of the expected type, or of a type
/// holding the same values, cast ([`conform`]: large strings, string views, DuckDB's
/// lists); the error names the file, the column and the types.
fn field_arrays(batch: &RecordBatch, fields: &[Field], file: &Path, table: &str) -> anyhow::Result<Vec<ArrayRef>> {
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let a = batch.column_by_name(f.name()).with_context(|| {
            format!("{}: column {:?} is missing (is this a {table} table from this version of selfedit?)", file.display(), f.name())
        })?;
        out.push(conform::conform(a, f.data_type(), &format!("{}: column {:?}", file.display(), f.name()))?);
    }
    Ok(out)
}

table! {
    /// `articles.parquet`: the selected passages with every gold answer.
    ArticleRow = "articles" {
        article_id: String,
        split: Split,
        title: String,
        context: String,
        questions: Vec<Question>,
        /// the passage's index in its source file (the paper's selection is reproducible
        /// passage for passage)
        source_index: i64,
    }
}

table! {
    /// `templates.parquet`: one self-edit template per row.
    TemplateRow = "templates" {
        iteration: i64,
        template_id: String,
        category: Category,
        instruction: String,
        /// one column per hyperparameter (`lora_rank`, ..., as [`Hyperparameters`] names them)
        hyperparameters: Hyperparameters,
        /// The template can be applied (parsed; hyperparameters in bounds after clamping).
        valid: bool,
        /// Why it is invalid, or which values were clamped.
        error: Option<String>,
        raw_response: String,
        seed: i64,
        /// the template-generation prompt the model saw (with the archive, for that variant)
        prompt: String,
        /// the model's reasoning before its answer (thinking mode)
        reasoning: Option<String>,
    }
}

table! {
    /// `self_edits.parquet`: one completion of a template for an article.
    SelfEditRow = "self_edits" {
        self_edit_id: String,
        template_id: String,
        article_id: String,
        completion: i64,
        category: Category,
        sequences: Vec<String>,
        /// The completion parsed into at least one non-empty sequence.
        valid: bool,
        error: Option<String>,
        raw_response: String,
        seed: i64,
        /// the model's reasoning before its answer (thinking mode)
        reasoning: Option<String>,
    }
}

table! {
    /// `adapters.parquet`: the training of one adapter per self-edit.
    AdapterRow = "adapters" {
        self_edit_id: String,
        /// trained, empty (no usable sequence: the paper's dummy adapter) or failed
        status: AdapterStatus,
        adapter_path: Option<String>,
        /// the self-edit's training sequences (the passage included when
        /// `training.append_passage`, except under `baseline-passage`, whose sequence it is),
        /// after `training.max_tokens_per_self_edit`
        sequences: i64,
        /// tokens trained on, summed over all epochs (Hugging Face's count)
        tokens: i64,
        /// optimizer steps
        steps: i64,
        /// each optimizer step's loss: the mean over the target tokens of its accumulation
        /// window, one per step
        loss_curve: Vec<f32>,
        /// wall time of the adapter's training, from its start to its end, in seconds (an
        /// adapter reused from disk: the run that trained it); trained in a group, that is
        /// its time in flight beside the others, so the sum over a group's adapters can
        /// exceed the stage's time
        seconds: f64,
        error: Option<String>,
        /// what `training.max_tokens_per_self_edit` cut, when it did
        capped: Option<String>,
    }
}

table! {
    /// `answers.parquet`: one closed-book answer per (model, question, eval run).
    AnswerRow = "answers" {
        /// `base` or a self-edit id
        model_id: String,
        article_id: String,
        question_index: i64,
        run: i64,
        question: String,
        prediction: String,
        gold_answers: Vec<String>,
        correct: bool,
        exact_match: bool,
        f1: f64,
        grader: GraderKind,
    }
}

table! {
    /// `scores.parquet`: per self-edit, its adapted accuracy against the base model's.
    ScoreRow = "scores" {
        self_edit_id: String,
        template_id: String,
        article_id: String,
        completion: i64,
        base_accuracy: f64,
        adapted_accuracy: f64,
        gain: f64,
        status: AdapterStatus,
    }
}

table! {
    /// `template_stats.parquet`: every statistic of the paper, per template.
    TemplateStatsRow = "template_stats" {
        iteration: i64,
        template_id: String,
        category: Category,
        instruction: String,
        mean_accuracy: f64,
        robustness: f64,
        evaluation_noise: f64,
        instantiation_noise: f64,
        mean_gain: f64,
        win_rate: f64,
        normalized_gain: f64,
        base_accuracy: f64,
        n_articles: i64,
        n_self_edits: i64,
    }
}

table! {
    /// `archive.parquet`: seed templates plus every evaluated one, best accuracy first.
    ArchiveRow = "archive" {
        rank: i64,
        /// seed, or the iteration that produced it
        source: String,
        template_id: String,
        instruction: String,
        /// one column per hyperparameter (`lora_rank`, ..., as [`Hyperparameters`] names them)
        hyperparameters: Hyperparameters,
        accuracy: f64,
        normalized_gain: f64,
        /// novelty variant: 1 - the highest text similarity to the templates archived before
        /// this one's iteration (seeds: to the other seeds); null for the other variants
        novelty: Option<f64>,
        /// novelty variant: the id of the template leading this one's group of alike
        /// templates (similarity at least `novelty.crowded_similarity`)
        strategy: Option<String>,
        /// novelty variant: the size of that group
        crowding: Option<i64>,
    }
}

table! {
    /// `science.parquet` (`make science`): one arm's validation accuracy (per iteration for
    /// the searched variants) with 95% bootstrap intervals over passages, paired where two
    /// arms share them.
    ScienceRow = "science" {
        /// base, passage, implications, rewrite, or a searched variant's name
        arm: String,
        kind: ArmKind,
        iteration: Option<i64>,
        n_passages: i64,
        /// mean over passages of the passage's accuracy (its questions x eval runs x completions)
        accuracy: f64,
        accuracy_low: f64,
        accuracy_high: f64,
        /// paired by passage: this arm minus the base model (NaN for the base itself)
        gain_vs_base: f64,
        gain_vs_base_low: f64,
        gain_vs_base_high: f64,
        /// the interval of `gain_vs_base` excludes 0
        differs_from_base: bool,
        /// paired by passage: this arm minus the passage-only arm (NaN for that arm)
        diff_vs_passage: f64,
        diff_vs_passage_low: f64,
        diff_vs_passage_high: f64,
        differs_from_passage: bool,
        /// searched variants: the iteration's template similarity (collapse.parquet)
        text_similarity: Option<f64>,
        hp_similarity: Option<f64>,
    }
}

table! {
    /// `collapse.parquet`: how alike one iteration's templates are, and how far it moved.
    CollapseRow = "collapse" {
        /// experiment or source file the templates came from
        source: String,
        iteration: i64,
        n_templates: i64,
        /// mean pairwise (1 + cos) / 2 of the instructions' sentence embeddings
        text_similarity: Option<f64>,
        /// mean pairwise hyperparameter similarity (the paper's per-key domains)
        hp_similarity: Option<f64>,
        /// mean pairwise token Jaccard of the instructions
        lexical_similarity: Option<f64>,
        /// 1 - mean similarity across this and the previous iteration's templates
        text_drift: Option<f64>,
        hp_drift: Option<f64>,
        lexical_drift: Option<f64>,
    }
}

table! {
    /// `sft.parquet`: supervised examples for improving the generator (ReST-EM).
    SftRow = "sft" {
        example_id: String,
        /// template (meta-prompt → template JSON) or completion (passage + instruction →
        /// training-sequences JSON)
        kind: SftKind,
        article_id: String,
        template_id: String,
        self_edit_id: String,
        /// the user turn
        prompt: String,
        /// the assistant turn the generator learns to write
        completion: String,
        /// the self-edit's adapted accuracy and its gain over the base model
        accuracy: f64,
        gain: f64,
    }
}

/// What produced a table, stored in the Parquet key-value metadata.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub stage: String,
    pub config_hash: String,
    pub model: String,
    pub extra: Vec<(String, String)>,
}

pub const STAGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes `rows` to `path` atomically, with the provenance in the file's metadata.
pub fn write<T: Table>(path: &Path, rows: &[T], prov: &Provenance) -> anyhow::Result<()> {
    let batch = T::to_batch(rows)?;
    let mut kv = vec![
        KeyValue::new("selfedit.table".to_string(), T::NAME.to_string()),
        KeyValue::new("selfedit.stage".to_string(), prov.stage.clone()),
        KeyValue::new("selfedit.version".to_string(), STAGE_VERSION.to_string()),
        KeyValue::new("selfedit.config_hash".to_string(), prov.config_hash.clone()),
        KeyValue::new("selfedit.model".to_string(), prov.model.clone()),
    ];
    for (k, v) in &prov.extra {
        kv.push(KeyValue::new(format!("selfedit.{k}"), v.clone()));
    }
    let props = WriterProperties::builder().set_key_value_metadata(Some(kv)).build();
    crate::util::atomic::write_file_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp)?;
        let mut w = ArrowWriter::try_new(file, T::schema(), Some(props))?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}

/// Reads every row of a table written by [`write`] (or any file with the same columns).
pub fn read<T: Table>(path: &Path) -> anyhow::Result<Vec<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {} (has its stage run? try `make`)", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file (delete it and rerun `make`)", path.display()))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        rows.extend(T::from_batch(&batch.with_context(|| format!("reading {}", path.display()))?, path)?);
    }
    Ok(rows)
}

/// The key-value metadata of a table file.
pub fn metadata(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    Ok(builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().map(|k| (k.key.clone(), k.value.clone().unwrap_or_default())).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_roundtrip_through_parquet() {
        let d = tempfile::tempdir().unwrap();
        let rows = vec![
            ArticleRow {
                article_id: "a000".into(),
                split: Split::Train,
                title: "T".into(),
                context: "C".into(),
                questions: vec![Question { question: "Q?".into(), answers: vec!["x".into(), "y".into()] }],
                source_index: 0,
            },
            ArticleRow {
                article_id: "a001".into(),
                split: Split::Train,
                title: "".into(),
                context: "D".into(),
                questions: vec![],
                source_index: 1,
            },
        ];
        let p = d.path().join("articles.parquet");
        write(&p, &rows, &Provenance { stage: "test".into(), ..Default::default() }).unwrap();
        assert_eq!(read::<ArticleRow>(&p).unwrap(), rows);
        assert!(metadata(&p).unwrap().iter().any(|(k, v)| k == "selfedit.table" && v == "articles"));
        // the wrong table type names the file and the column
        let e = format!("{:#}", read::<TemplateRow>(&p).unwrap_err());
        assert!(e.contains("articles.parquet") && e.contains("iteration"), "{e}");
    }

    /// Booleans, optional strings (set and null), float lists and the hyperparameter
    /// columns read back as written, values and nulls alike.
    #[test]
    fn every_column_kind_roundtrips() {
        let d = tempfile::tempdir().unwrap();
        let hp = |r: i64, lr: f64| crate::experiment::template::Hyperparameters {
            lora_rank: r,
            lora_alpha: 2 * r,
            lora_dropout: 0.05,
            learning_rate: lr,
            num_epochs: 3,
            gradient_accumulation_steps: 2,
        };
        let template = |id: &str, valid: bool, error: Option<&str>, hyperparameters| TemplateRow {
            iteration: 1,
            template_id: id.into(),
            category: Category::Explore,
            instruction: "Rewrite".into(),
            hyperparameters,
            valid,
            error: error.map(Into::into),
            raw_response: "{}".into(),
            seed: 7,
            prompt: "p".into(),
            reasoning: if valid { Some("because".into()) } else { None },
        };
        let rows = vec![template("t0", true, None, hp(16, 1e-4)), template("t1", false, Some("lora_rank clamped"), hp(64, 3e-3))];
        let p = d.path().join("templates.parquet");
        write(&p, &rows, &Provenance::default()).unwrap();
        assert_eq!(read::<TemplateRow>(&p).unwrap(), rows);
        // required columns are declared non-null, optional ones nullable
        let schema = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&p).unwrap()).unwrap().schema().clone();
        for (name, nullable) in [("template_id", false), ("valid", false), ("lora_rank", false), ("error", true), ("reasoning", true)] {
            assert_eq!(schema.field_with_name(name).unwrap().is_nullable(), nullable, "{name}");
        }
        let adapters = vec![
            AdapterRow {
                self_edit_id: "s0".into(),
                status: AdapterStatus::Trained,
                adapter_path: Some("adapters/s0".into()),
                sequences: 3,
                tokens: 90,
                steps: 6,
                loss_curve: vec![2.5, 1.25, 0.5],
                seconds: 1.5,
                error: None,
                capped: Some("2 sequences".into()),
            },
            AdapterRow {
                self_edit_id: "s1".into(),
                status: AdapterStatus::Trained,
                adapter_path: None,
                sequences: 0,
                tokens: 0,
                steps: 0,
                loss_curve: vec![],
                seconds: 0.0,
                error: Some("no usable sequence".into()),
                capped: None,
            },
        ];
        let p = d.path().join("adapters.parquet");
        write(&p, &adapters, &Provenance::default()).unwrap();
        assert_eq!(read::<AdapterRow>(&p).unwrap(), adapters);
    }
}

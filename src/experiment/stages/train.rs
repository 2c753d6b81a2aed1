//! Stage 4, train: one LoRA adapter per self-edit (PEFT format under `adapters/`) →
//! `adapters.parquet`. An adapter on disk whose recorded inputs match is reused, so a killed
//! run resumes where it stopped and retrains only what changed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::experiment::cli::{progress, ModelArgs, ShardArgs, StageContext};
use crate::experiment::config::{ExperimentConfig, Variant};
use crate::experiment::layout::Stage;
use crate::experiment::states::AdapterStatus;
use crate::experiment::tables::{AdapterRow, ArticleRow, SelfEditRow, TemplateRow};
use crate::runtime::formats::LoadedModel;
use crate::runtime::lora::{LoraAdapter, LoraConfig};
use crate::runtime::tokenizer::TextTokenizer;
use crate::runtime::training::{longest_first, planned_passes, train_group, GroupLimits, TrainConfig, TrainExample, TrainJob, TrainReport};
use crate::util::hash::{content_hash, derive_seed};

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
    /// What `training.max_tokens_per_self_edit` cut, when it did.
    #[serde(default)]
    pub capped: Option<String>,
}

/// The record's file name inside an adapter folder.
pub const TRAIN_RECORD: &str = "train_record.json";

/// The training sequences of a self-edit, plus the passage when `training.append_passage` is
/// set, except under `baseline-passage`, whose one sequence is the passage already (appending
/// it again would train on it twice an epoch).
pub fn training_texts(cfg: &ExperimentConfig, edit: &SelfEditRow, article: &ArticleRow) -> Vec<String> {
    let mut texts: Vec<String> = edit.sequences.iter().filter(|s| !s.trim().is_empty()).cloned().collect();
    if cfg.training.append_passage && cfg.variant != Variant::BaselinePassage && !texts.is_empty() {
        texts.push(format!("{}\n{}", article.title, article.context).trim().to_string());
    }
    texts
}

/// The training sequences as token ids, encoded as the model's own tokenizer call encodes a
/// document (with Llama 3's BOS, for one), each ending with the model's end-of-turn token
/// when `training.end_of_turn` is set (the paper's code appends `<|im_end|>` for instruct
/// models), with the loss on every token.
pub fn training_examples(cfg: &ExperimentConfig, tokenizer: &TextTokenizer, texts: &[String]) -> anyhow::Result<Vec<TrainExample>> {
    let end = if cfg.training.end_of_turn { tokenizer.end_of_turn() } else { None };
    texts
        .iter()
        .map(|s| {
            let mut ids = tokenizer.encode_document(s)?;
            ids.extend(end);
            Ok(TrainExample { ids, loss_from: 0 })
        })
        .collect()
}

/// The hash of everything an adapter depends on: seed, model, training settings, the
/// template's hyperparameters and the sequences. A change of any retrains the adapter.
pub fn adapter_input_hash(cfg: &ExperimentConfig, template: &TemplateRow, texts: &[String]) -> String {
    content_hash(&json!([cfg.seed, cfg.model, cfg.training, template.hyperparameters, texts]))
}

/// The row of a self-edit with no adapter (yet): status `empty`, nothing trained.
pub fn empty_row(id: &str) -> AdapterRow {
    AdapterRow {
        self_edit_id: id.to_string(),
        status: AdapterStatus::Empty,
        adapter_path: None,
        sequences: 0,
        tokens: 0,
        steps: 0,
        loss_curve: vec![],
        seconds: 0.0,
        error: None,
        capped: None,
    }
}

/// Trains (or finds already trained) the adapter of every self-edit in `shard`,
/// `training.adapters_per_batch` at a time in shared batches. Each adapter folder is written
/// (renamed into place) the moment its adapter finishes, so an adapter folder that exists is
/// complete and is not trained again: killing this stage loses at most the adapters in flight.
pub fn train_adapters(
    ctx: &StageContext,
    model: &LoadedModel,
    templates: &[TemplateRow],
    edits: &[SelfEditRow],
    articles: &[ArticleRow],
    shard: crate::experiment::layout::Shard,
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<AdapterRow>> {
    let cfg = &ctx.exp.config;
    let adapters_dir = ctx.layout.adapters_dir(ctx.iteration, ctx.split());
    let templates: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    // A killed run leaves its adapters in progress in hidden temporary folders: remove them.
    if let Ok(entries) = std::fs::read_dir(&adapters_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let progress = std::cell::RefCell::new(progress);
    // 1. each self-edit: nothing to train, an adapter on disk to reuse, or a job
    let rows: std::cell::RefCell<Vec<(usize, AdapterRow)>> = Default::default();
    let mut pending = Vec::new();
    for (i, edit) in edits.iter().enumerate() {
        if !shard.owns(i) {
            continue;
        }
        let dir = adapters_dir.join(&edit.self_edit_id);
        let mut row = empty_row(&edit.self_edit_id);
        let article =
            articles.get(edit.article_id.as_str()).with_context(|| format!("self-edit {}: unknown article", edit.self_edit_id))?;
        let texts = training_texts(cfg, edit, article);
        if !edit.valid || texts.is_empty() {
            row.error = Some(edit.error.clone().unwrap_or_else(|| "no usable training sequence".into()));
            rows.borrow_mut().push((i, row));
            progress.borrow_mut()(1);
            continue;
        }
        let t = templates.get(edit.template_id.as_str()).with_context(|| format!("self-edit {}: unknown template", edit.self_edit_id))?;
        let input_hash = adapter_input_hash(cfg, t, &texts);
        // An adapter on disk with the same inputs is complete (folders are renamed into
        // place): reuse it. Anything else there is stale or damaged and is retrained.
        let record_path = dir.join(TRAIN_RECORD);
        if let Ok(text) = std::fs::read_to_string(&record_path) {
            if let Ok(rec) = serde_json::from_str::<AdapterRecord>(&text) {
                let complete = LoraAdapter::load_peft(&dir, &model.decoder.cfg, model.device()).is_ok();
                if rec.input_hash == input_hash && complete {
                    rows.borrow_mut().push((i, adapter_row_from(&edit.self_edit_id, &dir, rec)));
                    progress.borrow_mut()(1);
                    continue;
                }
            }
            tracing::warn!("{}: stale or damaged adapter, training it again", dir.display());
        }
        pending.push((i, edit, *t, texts, input_hash, dir));
    }
    // 2. the jobs, longest first so that the group drains quickly at the end (ties in the
    //    table's order; counted before `training.max_tokens_per_self_edit` cuts, which only
    //    places a capped self-edit early), built as slots free up (an adapter exists only in
    //    flight or as the one job waiting for memory, its optimizer only in flight)
    longest_first(&mut pending, |(_, _, t, texts, _, _)| planned_passes(t.hyperparameters.num_epochs as usize, texts.len()));
    let failed = |i: usize, id: &str, e: anyhow::Error| {
        let mut row = empty_row(id);
        row.status = AdapterStatus::Failed;
        row.error = Some(format!("{e:#}"));
        rows.borrow_mut().push((i, row));
        progress.borrow_mut()(1);
    };
    // what on_done needs of each job in flight, filled as the jobs are built
    let finishing = std::cell::RefCell::new(HashMap::new());
    let jobs = pending.into_iter().filter_map(|(i, edit, t, texts, input_hash, dir)| match new_job(i, cfg, model, t, edit, &texts) {
        Ok((job, capped)) => {
            finishing.borrow_mut().insert(i, (edit.self_edit_id.clone(), dir, input_hash, job.examples.len(), capped));
            Some(job)
        }
        Err(e) => {
            failed(i, &edit.self_edit_id, e);
            None
        }
    });
    let base = model.source.display().to_string();
    let limits = GroupLimits {
        adapters: cfg.training.adapters_per_batch,
        memory_bytes: cfg.training.group_memory_mib.map(|mib| mib.saturating_mul(1 << 20)),
    };
    train_group(&model.decoder, jobs, limits, |i, result| {
        let (id, dir, input_hash, sequences, capped) = finishing.borrow_mut().remove(&i).expect("every job was registered");
        match result {
            // a write that fails (disk full, a size limit) stops the stage: it is no fault of
            // the self-edit, and a rerun after freeing space trains only what is missing
            Ok((adapter, report)) => {
                let rec = save_adapter(&adapter, &report, sequences, capped, &base, &dir, input_hash)?;
                rows.borrow_mut().push((i, adapter_row_from(&id, &dir, rec)));
                progress.borrow_mut()(1);
            }
            Err(e) => failed(i, &id, e),
        }
        Ok(())
    })?;
    let mut rows = rows.into_inner();
    rows.sort_by_key(|(i, _)| *i);
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

fn adapter_row_from(id: &str, dir: &Path, rec: AdapterRecord) -> AdapterRow {
    AdapterRow {
        self_edit_id: id.to_string(),
        status: AdapterStatus::Trained,
        adapter_path: Some(dir.display().to_string()),
        sequences: rec.sequences as i64,
        tokens: rec.tokens as i64,
        steps: rec.steps as i64,
        loss_curve: rec.loss_curve,
        seconds: rec.seconds,
        error: None,
        capped: rec.capped,
    }
}

/// A fresh adapter (on `training.target_modules`, with the template's hyperparameters and
/// the self-edit's own seed) and its training sequences and settings, with what the token
/// cap cut, if anything.
fn new_job<K>(
    key: K,
    cfg: &ExperimentConfig,
    model: &LoadedModel,
    t: &TemplateRow,
    edit: &SelfEditRow,
    texts: &[String],
) -> anyhow::Result<(TrainJob<K>, Option<String>)> {
    let h = &t.hyperparameters;
    let examples = training_examples(cfg, &model.tokenizer, texts)?;
    let (examples, capped) = cap_training(examples, h.num_epochs as usize, cfg.training.max_len, cfg.training.max_tokens_per_self_edit);
    let seed = derive_seed(cfg.seed, &format!("adapter/{}", edit.self_edit_id));
    let lora = LoraConfig {
        rank: h.lora_rank as usize,
        alpha: h.lora_alpha as f64,
        dropout: h.lora_dropout,
        targets: cfg.training.target_modules.to_vec(),
        use_rslora: false,
    };
    let adapter = LoraAdapter::new(&model.decoder.cfg, lora, seed, model.device())?;
    let config = TrainConfig {
        learning_rate: h.learning_rate,
        epochs: h.num_epochs as usize,
        grad_accum: h.gradient_accumulation_steps as usize,
        max_len: cfg.training.max_len,
        seed,
        max_grad_norm: cfg.training.max_grad_norm,
    };
    Ok((TrainJob { key, adapter, examples, config }, capped))
}

/// Keeps a self-edit's training within `cap` tokens (its sequences, each cut to `max_len`,
/// times `epochs`): the first sequences while they fit, and when even the first does not,
/// that one cut to `cap / epochs` tokens (at least 2). Returns what is kept and, when the cap
/// bit, what it cut. `cap` 0 keeps everything.
pub fn cap_training(examples: Vec<TrainExample>, epochs: usize, max_len: usize, cap: usize) -> (Vec<TrainExample>, Option<String>) {
    let epochs = epochs.max(1);
    let cost = |e: &TrainExample| e.ids.len().min(max_len) * epochs;
    let total: usize = examples.iter().map(cost).sum();
    if cap == 0 || total <= cap {
        return (examples, None);
    }
    let n = examples.len();
    let mut kept = Vec::new();
    let mut used = 0;
    let mut rest = examples.into_iter();
    for e in rest.by_ref() {
        if used + cost(&e) > cap {
            if kept.is_empty() {
                // even the first sequence is over the cap: train on its beginning
                let len = (cap / epochs).clamp(2, max_len);
                let ids = e.ids[..len.min(e.ids.len())].to_vec();
                let note = format!("{total} training tokens over the cap of {cap}: kept the first {len} tokens of 1 of {n} sequences");
                return (vec![TrainExample { ids, loss_from: e.loss_from }], Some(note));
            }
            break;
        }
        used += cost(&e);
        kept.push(e);
    }
    let note = format!("{total} training tokens over the cap of {cap}: kept the first {} of {n} sequences ({used} tokens)", kept.len());
    (kept, Some(note))
}

/// Writes a trained adapter with its record, atomically, as `dir`.
fn save_adapter(
    adapter: &LoraAdapter,
    report: &TrainReport,
    sequences: usize,
    capped: Option<String>,
    base: &str,
    dir: &Path,
    input_hash: String,
) -> anyhow::Result<AdapterRecord> {
    let rec = AdapterRecord {
        input_hash,
        sequences,
        tokens: report.tokens,
        steps: report.steps,
        loss_curve: report.step_losses.clone(),
        seconds: report.seconds,
        capped,
    };
    // The record is written inside the adapter's temporary folder, so both appear together.
    crate::util::atomic::write_dir_atomically(dir, |tmp| {
        adapter.save_peft(&tmp.join("peft"), base)?;
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::rename(tmp.join("peft").join(f), tmp.join(f))?;
        }
        std::fs::remove_dir(tmp.join("peft"))?;
        std::fs::write(tmp.join(TRAIN_RECORD), serde_json::to_string_pretty(&rec)?)?;
        Ok(())
    })?;
    Ok(rec)
}

/// `train-adapters`: trains this shard's adapters and writes its table, or merges shards.
pub fn run(ctx: &StageContext, model: &ModelArgs, shard: &ShardArgs) -> anyhow::Result<()> {
    if let Some(n) = shard.merge {
        return ctx.merge_shards::<AdapterRow>(Stage::Train, n);
    }
    let shard = shard.shard;
    let templates: Vec<TemplateRow> = ctx.read()?;
    let edits: Vec<SelfEditRow> = ctx.read()?;
    let articles: Vec<ArticleRow> = crate::experiment::tables::read(&ctx.layout.articles())?;
    let model = ctx.load_model(model)?;
    let bar = progress(shard.len_of(edits.len()), "adapters");
    let rows = train_adapters(ctx, &model, &templates, &edits, &articles, shard, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let count = |s: AdapterStatus| rows.iter().filter(|r| r.status == s).count();
    let detail = format!(
        "{} trained, {} empty, {} failed",
        count(AdapterStatus::Trained),
        count(AdapterStatus::Empty),
        count(AdapterStatus::Failed)
    );
    ctx.write(Stage::Train, &ctx.shard_table::<AdapterRow>(shard), &rows, &detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(n: usize, len: usize) -> Vec<TrainExample> {
        (0..n).map(|i| TrainExample { ids: vec![i as u32; len], loss_from: 0 }).collect()
    }

    #[test]
    fn the_passage_is_appended_once_and_not_to_the_passage_baseline() {
        use crate::experiment::states::{Category, Split};
        use crate::experiment::tables::Question;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cfg = crate::experiment::config::Experiment::load(&root.join("configs/tiny.toml")).unwrap().config;
        let article = ArticleRow {
            article_id: "a000".into(),
            split: Split::Train,
            title: "Veltoria".into(),
            context: "Its capital is Marzipane.".into(),
            questions: vec![Question { question: "Capital?".into(), answers: vec!["Marzipane".into()] }],
            source_index: 0,
        };
        let edit = |sequences: Vec<String>| SelfEditRow {
            self_edit_id: "a000-t00-c0".into(),
            template_id: "iter0-t00".into(),
            article_id: "a000".into(),
            completion: 0,
            category: Category::Exploit,
            sequences,
            valid: true,
            error: None,
            raw_response: String::new(),
            seed: 0,
            reasoning: None,
        };
        let passage = "Veltoria\nIts capital is Marzipane.".to_string();
        cfg.training.append_passage = true;
        let texts = training_texts(&cfg, &edit(vec!["A fact.".into(), " ".into()]), &article);
        assert_eq!(texts, ["A fact.".to_string(), passage.clone()], "blank sequences dropped, the passage appended");
        assert!(training_texts(&cfg, &edit(vec![" ".into()]), &article).is_empty(), "nothing to train on stays nothing");
        cfg.variant = Variant::BaselinePassage;
        let texts = training_texts(&cfg, &edit(vec![article.context.clone()]), &article);
        assert_eq!(texts, std::slice::from_ref(&article.context), "baseline-passage trains on the passage once");
        cfg.variant = Variant::NoArchive;
        cfg.training.append_passage = false;
        assert_eq!(training_texts(&cfg, &edit(vec!["A fact.".into()]), &article), ["A fact.".to_string()]);
    }

    #[test]
    fn the_token_cap_bounds_the_worst_self_edit() {
        // within the cap: untouched
        let (kept, note) = cap_training(seqs(10, 60), 10, 2048, 40_000);
        assert_eq!((kept.len(), note), (10, None));
        // a self-edit of 5,000 sequences of 2,000 tokens at 50 epochs (500 M tokens): its
        // first 4 sequences cut to max_len fit (4 × 1,000 × 10 = 40,000)
        let (kept, note) = cap_training(seqs(5000, 2000), 10, 1000, 40_000);
        assert_eq!(kept.len(), 4);
        assert!(note.unwrap().contains("kept the first 4 of 5000 sequences (40000 tokens)"));
        // one sequence alone over the cap: its beginning, cap / epochs tokens
        let (kept, note) = cap_training(seqs(3, 2048), 50, 2048, 40_000);
        assert_eq!((kept.len(), kept[0].ids.len()), (1, 800));
        assert!(note.unwrap().contains("first 800 tokens of 1 of 3 sequences"));
        // 0: no cap
        assert_eq!(cap_training(seqs(5000, 2000), 10, 2048, 0).0.len(), 5000);
    }
}

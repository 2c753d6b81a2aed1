//! Stage 8, sft: this iteration's best self-edits → supervised examples for the generator
//! (`sft.parquet`), the "E" step of ReST-EM.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::templates::{baseline_prompt, meta_prompt};
use crate::experiment::cli::{ArchiveArgs, StageContext};
use crate::experiment::config::{ExperimentConfig, Variant};
use crate::experiment::layout::Stage;
use crate::experiment::prompts::{self, Prompts};
use crate::experiment::states::{AdapterStatus, SftKind};
use crate::experiment::tables::{self, ArchiveRow, ArticleRow, ScoreRow, SelfEditRow, SftRow, TemplateRow};
use crate::experiment::template::Hyperparameters;
use crate::util::pyjson;

/// The template example's target: the template as its adapters were trained (the clamped
/// hyperparameters, not the raw response), written as the paper's `json.dumps` writes it.
pub fn template_target(t: &TemplateRow) -> String {
    let hp: Vec<(&str, String)> = Hyperparameters::NAMES
        .iter()
        .zip(Hyperparameters::INTEGER)
        .zip(t.hyperparameters.values())
        .map(|((n, int), v)| (*n, if *int { format!("{}", v as i64) } else { pyjson::float(v) }))
        .collect();
    pyjson::object(&[("data_creation_instruction", pyjson::string(&t.instruction)), ("hyperparameters", pyjson::object(&hp))])
}

/// The completion example's target: the parsed training sequences, as `json.dumps` writes
/// `{"training_sequences": [...]}`.
pub fn sequences_target(e: &SelfEditRow) -> String {
    pyjson::object(&[("training_sequences", pyjson::string_list(&e.sequences))])
}

/// One iteration's tables that [`build_sft`] reads.
#[derive(Clone, Copy)]
pub struct SftInputs<'a> {
    pub templates: &'a [TemplateRow],
    pub edits: &'a [SelfEditRow],
    pub scores: &'a [ScoreRow],
    pub articles: &'a [ArticleRow],
    /// novelty variant: each template's `weight * novelty`, added to its mean accuracy when
    /// the templates of an article are ranked
    pub novelty_bonus: Option<&'a HashMap<String, f64>>,
}

/// The supervised examples of one iteration, as the paper's `build_SFT_dataset.py`
/// (`K_BEST` = `sft.top_k`) builds them, per article:
///
/// - searched variants: the `top_k` templates by their mean accuracy on the article (ties:
///   template order); the archive variant keeps only templates whose mean beats the article's
///   base accuracy. From each, the best completion (archive: among those that beat the
///   base). Each kept pair gives two examples: meta-prompt → the template (as trained), and
///   completion prompt → the training sequences;
/// - baseline variants: the `top_k` completions of the single template, each an example of
///   its fixed prompt → the completion's text.
///
/// Completions that gave no usable sequence (the paper's dummy adapters) teach nothing and
/// are passed over.
pub fn build_sft(
    cfg: &ExperimentConfig,
    prompts: &Prompts,
    archive: Option<&[ArchiveRow]>,
    inputs: &SftInputs,
) -> anyhow::Result<Vec<SftRow>> {
    let SftInputs { templates, edits, scores, articles, novelty_bonus } = *inputs;
    if cfg.variant == Variant::BaselinePassage {
        // Its "completion" is the passage itself: nothing the generator wrote, nothing to learn.
        return Ok(Vec::new());
    }
    let templates: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let edits: HashMap<&str, &SelfEditRow> = edits.iter().map(|e| (e.self_edit_id.as_str(), e)).collect();
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    let usable = |s: &&ScoreRow| {
        s.adapted_accuracy.is_finite() && s.status != AdapterStatus::Failed && edits.get(s.self_edit_id.as_str()).is_some_and(|e| e.valid)
    };
    // (article, template) → its scored self-edits, in completion order
    let mut groups: BTreeMap<(&str, &str), Vec<&ScoreRow>> = BTreeMap::new();
    for s in scores.iter().filter(usable) {
        groups.entry((s.article_id.as_str(), s.template_id.as_str())).or_default().push(s);
    }
    for g in groups.values_mut() {
        g.sort_by_key(|s| s.completion);
    }
    let meta = if cfg.variant.is_baseline() { None } else { Some(meta_prompt(cfg, prompts, archive)?) };
    let keep_above_base = cfg.variant.uses_archive();
    let mut rows = Vec::new();
    let article_ids: BTreeSet<&str> = groups.keys().map(|(a, _)| *a).collect();
    for a in article_ids {
        let Some(article) = articles.get(a) else { continue };
        let in_article: Vec<(&str, &Vec<&ScoreRow>)> =
            groups.range((a, "")..).take_while(|((aa, _), _)| *aa == a).map(|((_, t), ss)| (*t, ss)).collect();
        let example = |kind: SftKind, s: &ScoreRow, prompt: String, completion: String| SftRow {
            example_id: format!("{}-{kind}", s.self_edit_id),
            kind,
            article_id: a.to_string(),
            template_id: s.template_id.clone(),
            self_edit_id: s.self_edit_id.clone(),
            prompt,
            completion,
            accuracy: s.adapted_accuracy,
            gain: s.gain,
        };
        let Some(meta) = &meta else {
            // baseline: the top_k completions of the one template (stable sort: ties keep
            // completion order)
            let mut all: Vec<&ScoreRow> = in_article.iter().flat_map(|(_, ss)| ss.iter().copied()).collect();
            all.sort_by(|x, y| y.adapted_accuracy.total_cmp(&x.adapted_accuracy));
            let prompt = prompts.render(baseline_prompt(cfg.variant)?, json!({"title": article.title, "context": article.context}))?;
            for s in all.into_iter().take(cfg.sft.top_k) {
                rows.push(example(SftKind::Completion, s, prompt.clone(), edits[s.self_edit_id.as_str()].raw_response.clone()));
            }
            continue;
        };
        let base = in_article.first().map(|(_, ss)| ss[0].base_accuracy).unwrap_or(f64::NAN);
        // rank this article's templates by mean accuracy, plus the novelty bonus in the novelty
        // variant (stable: ties keep template order)
        let bonus = |t: &str| novelty_bonus.and_then(|b| b.get(t)).copied().unwrap_or(0.0);
        let mut ranked: Vec<(&str, f64, &Vec<&ScoreRow>)> =
            in_article.iter().map(|(t, ss)| (*t, ss.iter().map(|s| s.adapted_accuracy).sum::<f64>() / ss.len() as f64, *ss)).collect();
        ranked.sort_by(|x, y| (y.1 + bonus(y.0)).total_cmp(&(x.1 + bonus(x.0))));
        ranked.truncate(cfg.sft.top_k);
        if keep_above_base {
            ranked.retain(|(_, mean, _)| *mean > base);
        }
        for (t, _, ss) in ranked {
            let candidates: Vec<&ScoreRow> = ss.iter().copied().filter(|s| !keep_above_base || s.adapted_accuracy > base).collect();
            // the first best in completion order, as Python's max
            let Some(best) = candidates.iter().copied().reduce(|b, s| if s.adapted_accuracy > b.adapted_accuracy { s } else { b }) else {
                continue;
            };
            let (Some(tr), Some(edit)) = (templates.get(t), edits.get(best.self_edit_id.as_str())) else { continue };
            rows.push(example(SftKind::Template, best, meta.clone(), template_target(tr)));
            let prompt = prompts
                .render(prompts::COMPLETION, json!({"title": article.title, "context": article.context, "instruction": tr.instruction}))?;
            rows.push(example(SftKind::Completion, best, prompt, sequences_target(edit)));
        }
    }
    Ok(rows)
}

/// `build-sft`: writes `sft.parquet`; `archive` is the archive the iteration's templates
/// were conditioned on (archive variant).
pub fn run(ctx: &StageContext, archive: &ArchiveArgs) -> anyhow::Result<()> {
    let archive = super::archive::conditioning_archive(ctx, archive.archive.as_deref())?;
    let templates: Vec<TemplateRow> = ctx.read()?;
    let edits: Vec<SelfEditRow> = ctx.read()?;
    let scores: Vec<ScoreRow> = ctx.read()?;
    let articles: Vec<ArticleRow> = tables::read(&ctx.layout.articles())?;
    // novelty variant: each template's `weight * novelty`, from this iteration's archive
    let bonus: Option<HashMap<String, f64>> = match &ctx.exp.config.novelty {
        Some(n) => {
            let current: Vec<ArchiveRow> = ctx.read()?;
            Some(current.iter().map(|r| (r.template_id.clone(), n.weight * r.novelty.unwrap_or(0.0))).collect())
        }
        None => None,
    };
    let inputs = SftInputs { templates: &templates, edits: &edits, scores: &scores, articles: &articles, novelty_bonus: bonus.as_ref() };
    let rows = build_sft(&ctx.exp.config, &ctx.prompts, archive.as_deref(), &inputs)?;
    ctx.write(Stage::Sft, &ctx.table::<SftRow>(), &rows, "supervised examples")
}

//! Stage 8, sft: this iteration's best self-edits → supervised examples for the generator
//! (`sft.parquet`), the "E" step of ReST-EM.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::templates::{baseline_prompt, meta_prompt};
use crate::experiment::cli::{ArchiveArgs, StageContext};
use crate::experiment::config::{ExperimentConfig, Variant};
use crate::experiment::layout::Stage;
use crate::experiment::prompts::{self, Prompts};
use crate::experiment::states::{AdapterStatus, Category, SftKind};
use crate::experiment::tables::{self, ArchiveRow, ArticleRow, ScoreRow, SelfEditRow, SftRow, TemplateRow};

/// The supervised examples of one iteration: per article the `top_k` templates by their mean
/// accuracy on it, each with its best completion (archive variant: only completions that beat
/// the article's base accuracy). Each kept pair gives two examples: the template-generation
/// prompt → the template JSON the model wrote, and the completion prompt → the completion
/// (baselines: only the latter, their prompt being fixed).
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
    for s in scores.iter().filter(|s| s.adapted_accuracy.is_finite() && s.status != AdapterStatus::Failed) {
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
                let best = ss
                    .iter()
                    .copied()
                    .max_by(|x, y| x.adapted_accuracy.total_cmp(&y.adapted_accuracy).then(y.self_edit_id.cmp(&x.self_edit_id)))
                    .unwrap();
                (*t, mean, best)
            })
            .collect();
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(y.0)));
        for (t, _, best) in ranked.into_iter().take(cfg.sft.top_k) {
            if cfg.variant == Variant::Archive && (best.gain.is_nan() || best.gain <= 0.0) {
                continue;
            }
            let (Some(tr), Some(edit), Some(article)) = (templates.get(t), edits.get(best.self_edit_id.as_str()), articles.get(a)) else {
                continue;
            };
            if !edit.valid {
                continue;
            }
            if let Some(meta) = &meta {
                rows.push(SftRow {
                    example_id: format!("{}-template", best.self_edit_id),
                    kind: SftKind::Template,
                    article_id: a.to_string(),
                    template_id: t.to_string(),
                    self_edit_id: best.self_edit_id.clone(),
                    prompt: meta.clone(),
                    completion: tr.raw_response.clone(),
                    accuracy: best.adapted_accuracy,
                    gain: best.gain,
                });
            }
            let prompt = if tr.category == Category::Baseline {
                prompts.render(baseline_prompt(cfg.variant)?, json!({"title": article.title, "context": article.context}))?
            } else {
                prompts.render(
                    prompts::COMPLETION,
                    json!({"title": article.title, "context": article.context, "instruction": tr.instruction}),
                )?
            };
            rows.push(SftRow {
                example_id: format!("{}-completion", best.self_edit_id),
                kind: SftKind::Completion,
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

/// `build-sft`: writes `sft.parquet`; `archive` is the archive the iteration's templates
/// were conditioned on (archive variant).
pub fn run(ctx: &StageContext, archive: &ArchiveArgs) -> anyhow::Result<()> {
    let archive = super::archive::conditioning_archive(ctx, archive.archive.as_deref())?;
    let templates: Vec<TemplateRow> = ctx.read()?;
    let edits: Vec<SelfEditRow> = ctx.read()?;
    let scores: Vec<ScoreRow> = ctx.read()?;
    let articles: Vec<ArticleRow> = tables::read(&ctx.layout.articles())?;
    let rows = build_sft(&ctx.exp.config, &ctx.prompts, archive.as_deref(), &templates, &edits, &scores, &articles)?;
    ctx.write(Stage::Sft, &ctx.table::<SftRow>(), &rows, "supervised examples")
}

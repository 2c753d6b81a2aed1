//! Stage 6, score: accuracies → `scores.parquet` (per self-edit, against the base model) and
//! `template_stats.parquet` (every statistic of the paper, per template).

use std::collections::{BTreeMap, HashMap};

use crate::experiment::cli::StageContext;
use crate::experiment::layout::Stage;
use crate::experiment::states::{AdapterStatus, BASE_MODEL_ID};
use crate::experiment::stats;
use crate::experiment::tables::{self, AdapterRow, AnswerRow, ScoreRow, SelfEditRow, TemplateRow, TemplateStatsRow};

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
        if m == BASE_MODEL_ID {
            base_runs.entry(a.clone()).or_default().push(*x);
        }
    }
    let base: BTreeMap<String, f64> = base_runs.iter().map(|(a, xs)| (a.clone(), stats::mean(xs))).collect();
    let status: HashMap<&str, AdapterStatus> = adapters.iter().map(|a| (a.self_edit_id.as_str(), a.status)).collect();
    let mut scores = Vec::new();
    let mut by_template: BTreeMap<String, Vec<stats::Observation>> = BTreeMap::new();
    for e in edits {
        let runs: Vec<(i64, f64)> = acc
            .range((e.self_edit_id.clone(), e.article_id.clone(), i64::MIN)..=(e.self_edit_id.clone(), e.article_id.clone(), i64::MAX))
            .map(|((_, _, r), x)| (*r, *x))
            .collect();
        let st = status.get(e.self_edit_id.as_str()).copied().unwrap_or(AdapterStatus::Missing);
        let b = base.get(&e.article_id).copied().unwrap_or(f64::NAN);
        let adapted = if runs.is_empty() { f64::NAN } else { stats::mean(&runs.iter().map(|r| r.1).collect::<Vec<_>>()) };
        scores.push(ScoreRow {
            self_edit_id: e.self_edit_id.clone(),
            template_id: e.template_id.clone(),
            article_id: e.article_id.clone(),
            completion: e.completion,
            base_accuracy: b,
            adapted_accuracy: adapted,
            gain: adapted - b,
            status: st,
        });
        for (run, x) in runs {
            by_template.entry(e.template_id.clone()).or_default().push(stats::Observation {
                article_id: e.article_id.clone(),
                completion: e.completion as usize,
                run: run as usize,
                accuracy: x,
            });
        }
    }
    let base_mean = stats::mean(&base.values().copied().collect::<Vec<_>>());
    let mut stats = Vec::new();
    for t in templates {
        let Some(obs) = by_template.get(&t.template_id) else { continue };
        let s = stats::template_stats(obs, &base)?;
        stats.push(TemplateStatsRow {
            iteration: iteration as i64,
            template_id: t.template_id.clone(),
            category: t.category,
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

/// `score`: writes `scores.parquet` and `template_stats.parquet`.
pub fn run(ctx: &StageContext) -> anyhow::Result<()> {
    let templates: Vec<TemplateRow> = ctx.read()?;
    let edits: Vec<SelfEditRow> = ctx.read()?;
    let adapters: Vec<AdapterRow> = ctx.read()?;
    let answers: Vec<AnswerRow> = ctx.read()?;
    let (scores, stats) = score(ctx.iteration, &templates, &edits, &adapters, &answers)?;
    let scores_path = ctx.table::<ScoreRow>();
    tables::write(&scores_path, &scores, &ctx.provenance(Stage::Score)?)?;
    let best = stats.iter().map(|s| s.mean_accuracy).fold(f64::NAN, f64::max);
    let detail = format!("best mean accuracy {best:.3}; also {}", scores_path.display());
    ctx.write(Stage::Score, &ctx.table::<TemplateStatsRow>(), &stats, &detail)
}

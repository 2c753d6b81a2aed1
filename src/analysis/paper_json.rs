//! An iteration's results in the paper's `results.json` layout (`apply_self_edits.py`;
//! every field explained in its `apply_self_edits_output_explanation.jsonc`), written from
//! our tables, so the paper's own analysis and SFT-building scripts run on selfedit's
//! outputs.
//!
//! Accuracies form tensors of shape (A, T, C, E): articles of the split, templates,
//! completions, evaluation runs. The adapted model's come from each self-edit's answers; the
//! base model's from its runs on the article: under `eval.base_runs = "per-self-edit"` the
//! k-th self-edit of an article owns base runs k·E..(k+1)·E, else every (t, c) shares the
//! article's E runs. A missing accuracy (a failed adapter) counts 0, as the paper's code
//! replaces its NaNs. Standard deviations are numpy's (population).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::experiment::states::{AdapterStatus, BASE_MODEL_ID};
use crate::experiment::stats::{mean, std};
use crate::experiment::tables::{AdapterRow, AnswerRow, ArticleRow, SelfEditRow, TemplateRow};

/// The tables of one iteration (one split) that the export reads.
pub struct IterationTables<'a> {
    pub articles: &'a [ArticleRow],
    pub templates: &'a [TemplateRow],
    pub edits: &'a [SelfEditRow],
    pub adapters: &'a [AdapterRow],
    pub answers: &'a [AnswerRow],
    /// `eval.runs`: E.
    pub eval_runs: usize,
}

fn means(x: &[Vec<f64>]) -> Vec<f64> {
    x.iter().map(|v| mean(v)).collect()
}

fn frac(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The paper's `results.json` object for `tables` (`exp_name` as the paper names runs).
pub fn results_json(exp_name: &str, tables: &IterationTables) -> anyhow::Result<Value> {
    let e_runs = tables.eval_runs;
    anyhow::ensure!(e_runs >= 1, "eval_runs must be >= 1");
    // accuracy of (model, article, run)
    let mut acc: HashMap<(&str, &str, i64), (usize, usize)> = HashMap::new();
    for a in tables.answers {
        let e = acc.entry((a.model_id.as_str(), a.article_id.as_str(), a.run)).or_default();
        e.0 += a.correct as usize;
        e.1 += 1;
    }
    let get = |m: &str, a: &str, r: i64| acc.get(&(m, a, r)).map(|(c, n)| *c as f64 / *n as f64).unwrap_or(0.0);
    let articles: Vec<&ArticleRow> = tables.articles.iter().filter(|a| tables.edits.iter().any(|e| e.article_id == a.article_id)).collect();
    // every template with self-edits (as template_stats.parquet has them)
    let templates: Vec<&TemplateRow> =
        tables.templates.iter().filter(|t| tables.edits.iter().any(|e| e.template_id == t.template_id)).collect();
    let n_c = tables.edits.iter().map(|e| e.completion as usize + 1).max().unwrap_or(0);
    let status: HashMap<&str, AdapterStatus> = tables.adapters.iter().map(|r| (r.self_edit_id.as_str(), r.status)).collect();
    let edit_at: HashMap<(&str, &str, i64), &SelfEditRow> =
        tables.edits.iter().map(|e| ((e.article_id.as_str(), e.template_id.as_str(), e.completion), e)).collect();
    // S[a][t][c][e] and B[a][t][c][e]
    let mut s = vec![vec![vec![vec![0.0; e_runs]; n_c]; templates.len()]; articles.len()];
    let mut b = s.clone();
    for (ai, art) in articles.iter().enumerate() {
        let slots: Vec<&SelfEditRow> = tables.edits.iter().filter(|e| e.article_id == art.article_id).collect();
        let base_runs =
            tables.answers.iter().filter(|r| r.model_id == BASE_MODEL_ID && r.article_id == art.article_id).map(|r| r.run).max();
        let per_self_edit = base_runs.is_some_and(|m| m as usize + 1 >= slots.len() * e_runs && slots.len() > 1);
        for (ti, t) in templates.iter().enumerate() {
            for c in 0..n_c {
                let Some(edit) = edit_at.get(&(art.article_id.as_str(), t.template_id.as_str(), c as i64)) else { continue };
                let k = slots.iter().position(|e| e.self_edit_id == edit.self_edit_id).unwrap_or(0);
                for e in 0..e_runs {
                    s[ai][ti][c][e] = get(&edit.self_edit_id, &art.article_id, e as i64);
                    let run = if per_self_edit { k * e_runs + e } else { e };
                    b[ai][ti][c][e] = get(BASE_MODEL_ID, &art.article_id, run as i64);
                }
            }
        }
    }
    let flat4 = |x: &Vec<Vec<Vec<Vec<f64>>>>| -> Vec<f64> { x.iter().flatten().flatten().flatten().copied().collect() };
    let flat3 = |x: &Vec<Vec<Vec<f64>>>| -> Vec<f64> { x.iter().flatten().flatten().copied().collect() };
    let base_article: Vec<f64> = b.iter().map(flat3).map(|v| mean(&v)).collect();
    // (A, T, C) means over E
    let s_atc: Vec<Vec<Vec<f64>>> = s.iter().map(|a| a.iter().map(|t| means(t)).collect()).collect();
    let atc_all = |f: &dyn Fn(usize, f64) -> f64| -> f64 {
        let v: Vec<f64> =
            s_atc.iter().enumerate().flat_map(|(a, ts)| ts.iter().flatten().map(move |m| (a, *m))).map(|(a, m)| f(a, m)).collect();
        mean(&v)
    };
    let overall = json!({
        "baseline_mean_acc": mean(&flat4(&b)),
        "std_of_(baseline_mean_acc_for_each_article)": std(&base_article),
        "self_edit_mean_acc": mean(&flat4(&s)),
        "std_of_(self_edit_mean_acc_for_each_article)": std(&s.iter().map(flat3).map(|v| mean(&v)).collect::<Vec<_>>()),
        "self_edit_evaluation_noise": mean(&s.iter().flatten().flatten().map(|r| std(r)).collect::<Vec<_>>()),
        "self_edit_template_instantiation_noise": mean(&s_atc.iter().flatten().map(|c| std(c)).collect::<Vec<_>>()),
        "self_edit_mean_gain": atc_all(&|a, m| m - base_article[a]),
        "self_edit_win_rate": atc_all(&|a, m| frac(m > base_article[a])),
        "self_edit_normalized_gain": atc_all(&|a, m| (m - base_article[a]) / (1.0 - base_article[a] + 1e-6)),
    });
    let mut article_statistics = Map::new();
    for (ai, art) in articles.iter().enumerate() {
        let bm = base_article[ai];
        let a_flat = flat3(&s[ai]);
        let mut template_stats = Map::new();
        for ti in 0..templates.len() {
            let t_slice = &s[ai][ti];
            let c_means = means(t_slice);
            let mut completions = Map::new();
            for (c, runs) in t_slice.iter().enumerate() {
                let dummy = edit_at
                    .get(&(art.article_id.as_str(), templates[ti].template_id.as_str(), c as i64))
                    .is_some_and(|e| status.get(e.self_edit_id.as_str()) == Some(&AdapterStatus::Empty));
                let eval_runs: Map<String, Value> = (0..e_runs)
                    .map(|e| {
                        let (ba, sa) = (b[ai][ti][c][e], runs[e]);
                        (e.to_string(), json!({"baseline_acc": ba, "self_edit_acc": sa, "gain": sa - ba, "questions": {}}))
                    })
                    .collect();
                completions.insert(
                    c.to_string(),
                    json!({
                        "self_edit_mean_acc": mean(runs),
                        "self_edit_evaluation_noise": std(runs),
                        "self_edit_mean_gain": mean(&runs.iter().map(|x| x - bm).collect::<Vec<_>>()),
                        "self_edit_win_rate": mean(&runs.iter().map(|x| frac(*x > bm)).collect::<Vec<_>>()),
                        "is_dummy_adapter": dummy,
                        "evaluation_runs": eval_runs,
                    }),
                );
            }
            template_stats.insert(
                ti.to_string(),
                json!({
                    "self_edit_mean_acc": mean(&t_slice.iter().flatten().copied().collect::<Vec<_>>()),
                    "self_edit_evaluation_noise": mean(&t_slice.iter().map(|r| std(r)).collect::<Vec<_>>()),
                    "self_edit_template_instantiation_noise": std(&c_means),
                    "self_edit_mean_gain": mean(&c_means.iter().map(|m| m - bm).collect::<Vec<_>>()),
                    "self_edit_win_rate": mean(&c_means.iter().map(|m| frac(*m > bm)).collect::<Vec<_>>()),
                    "completions": completions,
                }),
            );
        }
        let per_t: Vec<f64> = s[ai].iter().map(|t| mean(&t.iter().flatten().copied().collect::<Vec<_>>())).collect();
        let at_means: Vec<f64> = s_atc[ai].iter().flatten().copied().collect();
        article_statistics.insert(
            ai.to_string(),
            json!({
                "baseline_mean_acc": bm,
                "std_of_(baseline_mean_acc_for_this_article)": std(&flat3(&b[ai])),
                "self_edit_mean_acc": mean(&a_flat),
                "std_of_(self_edit_mean_acc_for_this_article)": std(&per_t),
                "self_edit_evaluation_noise": mean(&s[ai].iter().flatten().map(|r| std(r)).collect::<Vec<_>>()),
                "self_edit_template_instantiation_noise": mean(&s_atc[ai].iter().map(|c| std(c)).collect::<Vec<_>>()),
                "self_edit_mean_gain": mean(&at_means.iter().map(|m| m - bm).collect::<Vec<_>>()),
                "self_edit_win_rate": mean(&at_means.iter().map(|m| frac(*m > bm)).collect::<Vec<_>>()),
                "self_edit_template_statistics": template_stats,
            }),
        );
    }
    // across articles, per template: the numbers of template_stats.parquet
    let mut global = Map::new();
    for ti in 0..templates.len() {
        let t_ac: Vec<Vec<f64>> = (0..articles.len()).map(|a| s_atc[a][ti].clone()).collect();
        let all: Vec<f64> = (0..articles.len()).flat_map(|a| s[a][ti].iter().flatten().copied().collect::<Vec<_>>()).collect();
        let pairs: Vec<(f64, f64)> =
            t_ac.iter().enumerate().flat_map(|(a, cs)| cs.iter().map(move |m| (*m, a))).map(|(m, a)| (m, base_article[a])).collect();
        global.insert(
            ti.to_string(),
            json!({
                "self_edit_template_mean_acc": mean(&all),
                "std_of_(self_edit_template_mean_acc_across_articles)": std(&t_ac.iter().map(|c| mean(c)).collect::<Vec<_>>()),
                "self_edit_template_evaluation_noise": mean(&(0..articles.len()).flat_map(|a| s[a][ti].iter().map(|r| std(r)).collect::<Vec<_>>()).collect::<Vec<_>>()),
                "self_edit_template_instantiation_noise": mean(&t_ac.iter().map(|c| std(c)).collect::<Vec<_>>()),
                "self_edit_template_mean_gain": mean(&pairs.iter().map(|(m, b)| m - b).collect::<Vec<_>>()),
                "self_edit_template_win_rate": mean(&pairs.iter().map(|(m, b)| frac(m > b)).collect::<Vec<_>>()),
                "self_edit_template_normalized_gain": mean(&pairs.iter().map(|(m, b)| (m - b) / (1.0 - b)).collect::<Vec<_>>()),
            }),
        );
    }
    // the dataset: articles (one gold answer per question, as the paper's files have) and
    // the templates with their completions per article index
    let dataset_articles: Vec<Value> = articles
        .iter()
        .map(|a| {
            let qs: Vec<Value> = a
                .questions
                .iter()
                .map(|q| json!({"question": q.question, "answer": q.answers.first().cloned().unwrap_or_default()}))
                .collect();
            json!({"title": a.title, "context": a.context, "questions": qs})
        })
        .collect();
    let dataset_templates: Vec<Value> = templates
        .iter()
        .map(|t| {
            let mut completions = BTreeMap::new();
            for (ai, art) in articles.iter().enumerate() {
                let list: Vec<Value> = (0..n_c)
                    .map(|c| {
                        let seqs = edit_at.get(&(art.article_id.as_str(), t.template_id.as_str(), c as i64)).map(|e| e.sequences.clone()).unwrap_or_default();
                        json!({"training_sequences": seqs})
                    })
                    .collect();
                completions.insert(ai.to_string(), list);
            }
            json!({"data_creation_instruction": t.instruction, "hyperparameters": t.hyperparameters.to_json(), "completions": completions, "category": t.category.as_str()})
        })
        .collect();
    Ok(json!({
        "overall": overall,
        "timings": {},
        "timestamp": "",
        "dataset_path": "",
        "dataset": {"metadata": {"source": "selfedit"}, "articles": dataset_articles, "self_edit_templates": dataset_templates},
        "exp_name": exp_name,
        "num_articles": articles.len(),
        "num_self_edit_templates": templates.len(),
        "num_completions_per_template": n_c,
        "eval_times": e_runs,
        "article_statistics": article_statistics,
        "self_edit_template_statistics": global,
    }))
}

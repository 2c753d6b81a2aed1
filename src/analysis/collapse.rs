//! The collapse analysis: how alike one iteration's templates are, in text and in
//! hyperparameters, and how far each iteration moved from the one before.
//!
//! - text similarity: sentence embeddings of the instructions (all-MiniLM-L6-v2 through
//!   candle-transformers' BERT, mean pooling), cosine mapped to [0, 1] by (1 + cos) / 2,
//!   averaged over all pairs;
//! - hyperparameter similarity: per key `1 - |x - y| / (hi - lo)` on the key's scale, clipped
//!   to [0, 1], averaged over the six keys, then over pairs (the paper's domains below; a
//!   missing or non-positive value where a log is needed scores 0 for that key);
//! - lexical similarity (needs no model): token Jaccard of the lower-cased word sets;
//! - drift: 1 - the mean similarity of the pairs across two consecutive iterations.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::experiment::layout::Layout;
use crate::experiment::states::Split;
use crate::experiment::tables::{self, CollapseRow, Provenance, TemplateRow};
use crate::experiment::template::Hyperparameters;
use crate::runtime::embedder::Embedder;

/// One template as the analysis sees it: the instruction and the hyperparameters in the
/// order of [`Hyperparameters::NAMES`] (`None` when missing or unparsable).
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysedTemplate {
    pub instruction: String,
    pub hyperparameters: Vec<Option<f64>>,
}

#[derive(Clone, Copy)]
enum Scale {
    Linear,
    Log2,
    Log10,
}

/// (scale, lo, hi) of a key, as in the paper.
fn domain(key: &str) -> (Scale, f64, f64) {
    match key {
        "lora_rank" => (Scale::Log2, 4.0, 64.0),
        "lora_alpha" => (Scale::Log2, 1.0, 256.0),
        "lora_dropout" => (Scale::Linear, 0.0, 1.0),
        "learning_rate" => (Scale::Log10, 1e-5, 5e-3),
        "num_epochs" => (Scale::Linear, 1.0, 20.0),
        "gradient_accumulation_steps" => (Scale::Linear, 1.0, 8.0),
        other => panic!("hyperparameter {other} has no domain in the collapse analysis: add one"),
    }
}

fn on_scale(scale: Scale, x: f64) -> Option<f64> {
    match scale {
        Scale::Linear => Some(x),
        Scale::Log2 if x > 0.0 => Some(x.log2()),
        Scale::Log10 if x > 0.0 => Some(x.log10()),
        _ => None,
    }
}

/// Similarity of one hyperparameter key `k` (index into [`Hyperparameters::NAMES`]).
pub fn key_similarity(k: usize, x: Option<f64>, y: Option<f64>) -> f64 {
    let (scale, lo, hi) = domain(Hyperparameters::NAMES[k]);
    let (Some(x), Some(y)) = (x, y) else { return 0.0 };
    let (Some(sx), Some(sy), Some(slo), Some(shi)) = (on_scale(scale, x), on_scale(scale, y), on_scale(scale, lo), on_scale(scale, hi))
    else {
        return 0.0;
    };
    (1.0 - (sx - sy).abs() / (shi - slo)).clamp(0.0, 1.0)
}

pub fn hp_similarity(a: &AnalysedTemplate, b: &AnalysedTemplate) -> f64 {
    let n = Hyperparameters::NAMES.len();
    (0..n).map(|k| key_similarity(k, a.hyperparameters[k], b.hyperparameters[k])).sum::<f64>() / n as f64
}

fn word_set(s: &str) -> BTreeSet<String> {
    s.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(String::from).collect()
}

/// Token Jaccard of two instructions (1 when both are empty).
pub fn lexical_similarity(a: &str, b: &str) -> f64 {
    let (x, y) = (word_set(a), word_set(b));
    let union = x.union(&y).count();
    if union == 0 {
        return 1.0;
    }
    x.intersection(&y).count() as f64 / union as f64
}

pub use crate::runtime::embedder::cosine01;

/// The collapse measures of one iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationCollapse {
    pub iteration: usize,
    pub n_templates: usize,
    pub text_similarity: Option<f64>,
    pub hp_similarity: Option<f64>,
    pub lexical_similarity: Option<f64>,
    pub text_drift: Option<f64>,
    pub hp_drift: Option<f64>,
    pub lexical_drift: Option<f64>,
}

fn mean_pairs<T>(items: &[T], sim: impl Fn(&T, &T) -> f64) -> Option<f64> {
    let mut total = 0.0;
    let mut n = 0;
    for i in 0..items.len() {
        for j in i + 1..items.len() {
            total += sim(&items[i], &items[j]);
            n += 1;
        }
    }
    (n > 0).then(|| total / n as f64)
}

fn mean_cross<T>(a: &[T], b: &[T], sim: impl Fn(&T, &T) -> f64) -> Option<f64> {
    let n = a.len() * b.len();
    (n > 0).then(|| a.iter().flat_map(|x| b.iter().map(|y| sim(x, y)).collect::<Vec<_>>()).sum::<f64>() / n as f64)
}

/// Analyses each iteration's templates (text similarity only with an embedder).
pub fn analyse(iterations: &[Vec<AnalysedTemplate>], embedder: Option<&Embedder>) -> anyhow::Result<Vec<IterationCollapse>> {
    let embeddings: Vec<Option<Vec<Vec<f32>>>> = iterations
        .iter()
        .map(|ts| embedder.map(|e| e.embed(&ts.iter().map(|t| t.instruction.clone()).collect::<Vec<_>>())).transpose())
        .collect::<anyhow::Result<_>>()?;
    let mut out = Vec::new();
    for (k, ts) in iterations.iter().enumerate() {
        let text = embeddings[k].as_ref().and_then(|e| mean_pairs(e, |a, b| cosine01(a, b)));
        let (text_drift, hp_drift, lexical_drift) = if k == 0 {
            (None, None, None)
        } else {
            let prev = &iterations[k - 1];
            let td = match (&embeddings[k - 1], &embeddings[k]) {
                (Some(a), Some(b)) => mean_cross(a, b, |x, y| cosine01(x, y)).map(|s| 1.0 - s),
                _ => None,
            };
            (
                td,
                mean_cross(prev, ts, hp_similarity).map(|s| 1.0 - s),
                mean_cross(prev, ts, |a, b| lexical_similarity(&a.instruction, &b.instruction)).map(|s| 1.0 - s),
            )
        };
        out.push(IterationCollapse {
            iteration: k,
            n_templates: ts.len(),
            text_similarity: text,
            hp_similarity: mean_pairs(ts, hp_similarity),
            lexical_similarity: mean_pairs(ts, |a, b| lexical_similarity(&a.instruction, &b.instruction)),
            text_drift,
            hp_drift,
            lexical_drift,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct JsonTemplate {
    #[serde(default)]
    data_creation_instruction: String,
    #[serde(default)]
    hyperparameters: serde_json::Map<String, serde_json::Value>,
}

/// Reads the paper's published layout: a JSON list of iterations, each a list of
/// `{data_creation_instruction, hyperparameters}`.
pub fn read_templates_json(path: &Path) -> anyhow::Result<Vec<Vec<AnalysedTemplate>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let iters: Vec<Vec<JsonTemplate>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of lists of {{data_creation_instruction, hyperparameters}}", path.display()))?;
    Ok(iters
        .into_iter()
        .map(|ts| {
            ts.into_iter()
                .map(|t| AnalysedTemplate {
                    instruction: t.data_creation_instruction,
                    hyperparameters: Hyperparameters::NAMES
                        .iter()
                        .map(|k| {
                            t.hyperparameters.get(*k).and_then(|v| v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())))
                        })
                        .collect(),
                })
                .collect()
        })
        .collect())
}

/// The valid templates of a `templates.parquet`.
pub fn from_template_rows(rows: &[TemplateRow]) -> Vec<AnalysedTemplate> {
    rows.iter()
        .filter(|r| r.valid)
        .map(|r| AnalysedTemplate {
            instruction: r.instruction.clone(),
            hyperparameters: r.hyperparameters.values().into_iter().map(Some).collect(),
        })
        .collect()
}

/// Where the templates of a collapse analysis come from.
pub enum TemplateSource<'a> {
    /// The paper's published layout: a JSON list of iterations, each a list of templates.
    PaperJson(&'a Path),
    /// A selfedit experiment folder: its `iter*/templates.parquet`.
    Experiment(&'a Path),
}

/// Reads the templates of every iteration from `source`, analyses them (text similarity
/// when `embedder` is given) and writes `out` (`collapse.parquet`). Returns the rows.
pub fn run(source: TemplateSource, embedder: Option<(&Embedder, &Path)>, out: &Path) -> anyhow::Result<Vec<CollapseRow>> {
    let (name, iterations) = match source {
        TemplateSource::PaperJson(p) => (p.display().to_string(), read_templates_json(p)?),
        TemplateSource::Experiment(dir) => {
            let layout = Layout::at(dir);
            let mut iters = Vec::new();
            for k in layout.iterations_with::<TemplateRow>(Split::Train) {
                iters.push(from_template_rows(&tables::read::<TemplateRow>(&layout.table::<TemplateRow>(k, Split::Train))?));
            }
            anyhow::ensure!(!iters.is_empty(), "{}: no iter0/templates.parquet (run `make` first)", dir.display());
            (dir.display().to_string(), iters)
        }
    };
    let rows: Vec<CollapseRow> = analyse(&iterations, embedder.map(|e| e.0))?
        .into_iter()
        .map(|r| CollapseRow {
            source: name.clone(),
            iteration: r.iteration as i64,
            n_templates: r.n_templates as i64,
            text_similarity: r.text_similarity,
            hp_similarity: r.hp_similarity,
            lexical_similarity: r.lexical_similarity,
            text_drift: r.text_drift,
            hp_drift: r.hp_drift,
            lexical_drift: r.lexical_drift,
        })
        .collect();
    let model = embedder.map(|e| e.1.display().to_string()).unwrap_or_default();
    tables::write(out, &rows, &Provenance { stage: "collapse".into(), model, ..Default::default() })?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(instr: &str, hp: [f64; 6]) -> AnalysedTemplate {
        AnalysedTemplate { instruction: instr.into(), hyperparameters: hp.map(Some).to_vec() }
    }

    #[test]
    fn hyperparameter_similarity_by_hand() {
        let a = t("x", [8.0, 16.0, 0.0, 1e-4, 5.0, 1.0]);
        let b = t("x", [32.0, 16.0, 0.5, 1e-3, 10.0, 8.0]);
        // rank: |3 - 5| / (6 - 2) = 0.5 → 0.5; alpha: equal → 1; dropout: 1 - 0.5 = 0.5;
        // lr: |−4 − (−3)| / (log10(5e-3) + 5) = 1 / 2.69897 → 1 - 0.370511 = 0.629489;
        // epochs: 1 - 5/19 = 0.736842; accumulation: 1 - 7/7 = 0
        let want = (0.5 + 1.0 + 0.5 + (1.0 - 1.0 / (5e-3f64.log10() + 5.0)) + (1.0 - 5.0 / 19.0) + 0.0) / 6.0;
        assert!((hp_similarity(&a, &b) - want).abs() < 1e-12);
        assert!((want - 0.561055).abs() < 1e-5);
        // identical → 1; opposite corners of every domain → 0
        assert_eq!(hp_similarity(&a, &a), 1.0);
        let lo = t("x", [4.0, 1.0, 0.0, 1e-5, 1.0, 1.0]);
        let hi = t("x", [64.0, 256.0, 1.0, 5e-3, 20.0, 8.0]);
        assert_eq!(hp_similarity(&lo, &hi), 0.0);
        // missing or non-positive where a log is needed scores 0 for that key
        let mut m = a.clone();
        m.hyperparameters[0] = None;
        m.hyperparameters[3] = Some(-1.0);
        assert!((hp_similarity(&a, &m) - 4.0 / 6.0).abs() < 1e-12);
        // zero or negative on a log scale, on either side, also scores 0 (not NaN: log 0 is
        // -inf, and -inf - -inf is NaN): rank and learning rate 0 on both sides, alpha -2
        assert_eq!(key_similarity(0, Some(0.0), Some(0.0)), 0.0);
        assert_eq!(key_similarity(1, Some(-2.0), Some(4.0)), 0.0);
        assert_eq!(key_similarity(3, Some(0.0), Some(0.0)), 0.0);
        // out of the domain: clipped
        assert_eq!(key_similarity(4, Some(1.0), Some(1000.0)), 0.0);
    }

    #[test]
    fn lexical_similarity_and_analysis_by_hand() {
        assert_eq!(lexical_similarity("Rewrite the passage.", "rewrite THE passage"), 1.0);
        assert_eq!(lexical_similarity("alpha beta", "gamma delta"), 0.0);
        // {list, facts} vs {list, questions, facts, now}: 2 / 4
        assert_eq!(lexical_similarity("List facts", "list questions, facts now"), 0.5);
        let same = t("Rewrite the passage.", [32.0, 64.0, 0.0, 1e-3, 10.0, 1.0]);
        let other = t("alpha beta", [4.0, 1.0, 1.0, 1e-5, 20.0, 8.0]);
        let iters = vec![vec![same.clone(), same.clone(), same.clone()], vec![other.clone(), other.clone()]];
        let r = analyse(&iters, None).unwrap();
        assert_eq!(r[0].n_templates, 3);
        assert_eq!((r[0].hp_similarity, r[0].lexical_similarity, r[0].text_similarity), (Some(1.0), Some(1.0), None));
        assert_eq!(r[0].hp_drift, None);
        assert_eq!(r[1].lexical_drift, Some(1.0));
        let cross = hp_similarity(&same, &other);
        assert!((r[1].hp_drift.unwrap() - (1.0 - cross)).abs() < 1e-12);
        // one template has no pair: no similarity (null), not 0 / 0;
        // and an empty iteration has no drift from the one before
        let r = analyse(&[vec![same.clone()], vec![]], None).unwrap();
        assert_eq!((r[0].n_templates, r[0].hp_similarity, r[0].lexical_similarity), (1, None, None));
        assert_eq!((r[1].n_templates, r[1].hp_drift, r[1].lexical_drift), (0, None, None));
    }

    /// An experiment's templates table: the valid rows, their instruction and their six
    /// hyperparameters in `Hyperparameters::NAMES` order; invalid rows are left out.
    #[test]
    fn template_rows_keep_the_valid_ones() {
        let row = |id: &str, valid: bool, instruction: &str, rank: i64| TemplateRow {
            iteration: 0,
            template_id: id.into(),
            category: crate::experiment::states::Category::Explore,
            instruction: instruction.into(),
            hyperparameters: Hyperparameters {
                lora_rank: rank,
                lora_alpha: 2 * rank,
                lora_dropout: 0.1,
                learning_rate: 1e-3,
                num_epochs: 4,
                gradient_accumulation_steps: 2,
            },
            valid,
            error: None,
            raw_response: "{}".into(),
            seed: 1,
            prompt: "p".into(),
            reasoning: None,
        };
        let got = from_template_rows(&[row("a", true, "List facts.", 8), row("b", false, "Broken.", 16), row("c", true, "Rewrite.", 32)]);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].instruction.as_str(), got[1].instruction.as_str()), ("List facts.", "Rewrite."));
        assert_eq!(got[1].hyperparameters, [32.0, 64.0, 0.1, 1e-3, 4.0, 2.0].map(Some).to_vec());
    }
}

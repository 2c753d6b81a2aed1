//! `make science`: the experiment this machine can run (invented-fact passages). Reads the
//! reference arms (base model, passage only, Implications, Rewrite) and the searched variants
//! (validation passages, every iteration), and writes `science.parquet`, the paper's figure
//! (validation accuracy per iteration, reference arms as bands), the templates' similarity
//! per iteration, and `index.md` with a 95% interval on every accuracy.
//!
//! Intervals are percentile bootstraps over passages ([`bootstrap_mean`]); a comparison of two
//! arms resamples the per-passage differences over the passages both have (paired).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{draw_lines, err, load_font, Series};
use crate::experiment::layout::Layout;
use crate::experiment::states::{ArmKind, Split};
use crate::experiment::stats::{bootstrap_mean, mean, Interval};
use crate::experiment::tables::{self, ArticleRow, CollapseRow, ScienceRow, ScoreRow};

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 10_000;
/// The arm every other is compared with, besides the base model.
pub const PASSAGE_ARM: &str = "passage";

/// One arm: its name and its experiment folder (`outputs/<config>`).
#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub dir: PathBuf,
}

impl Arm {
    /// `name=folder`, as the command line gives it.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (name, dir) = s.split_once('=').with_context(|| format!("{s:?}: expected name=outputs/<experiment>"))?;
        Ok(Self { name: name.to_string(), dir: PathBuf::from(dir) })
    }
}

/// Per passage (by title, which every arm shares): mean adapted accuracy over its self-edits,
/// and the base model's accuracy on it.
type PerPassage = BTreeMap<String, (f64, f64)>;

fn per_passage(scores_file: &Path, articles: &BTreeMap<String, String>) -> anyhow::Result<PerPassage> {
    let scores: Vec<ScoreRow> = tables::read(scores_file)?;
    let mut acc: BTreeMap<String, (Vec<f64>, f64)> = BTreeMap::new();
    for s in scores.iter().filter(|s| s.adapted_accuracy.is_finite()) {
        let title = articles
            .get(&s.article_id)
            .with_context(|| format!("{}: article {} is not in articles.parquet", scores_file.display(), s.article_id))?;
        let e = acc.entry(title.clone()).or_insert((Vec::new(), s.base_accuracy));
        e.0.push(s.adapted_accuracy);
    }
    anyhow::ensure!(!acc.is_empty(), "{}: no scored self-edit", scores_file.display());
    Ok(acc.into_iter().map(|(t, (xs, b))| (t, (mean(&xs), b))).collect())
}

fn titles(layout: &Layout) -> anyhow::Result<BTreeMap<String, String>> {
    let rows: Vec<ArticleRow> = tables::read(&layout.articles())?;
    Ok(rows.into_iter().map(|a| (a.article_id, a.title)).collect())
}

/// Paired differences `a - b` over the passages both have.
fn paired(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Vec<f64> {
    a.iter().filter_map(|(t, x)| b.get(t).map(|y| x - y)).collect()
}

fn interval(xs: &[f64], seed: u64) -> Interval {
    bootstrap_mean(xs, RESAMPLES, 0.95, seed)
}

/// One row: accuracy, gain over base (paired with `base`), difference from the passage arm.
fn science_row(
    arm: &str,
    kind: ArmKind,
    iteration: Option<usize>,
    acc: &BTreeMap<String, f64>,
    base: &BTreeMap<String, f64>,
    passage: Option<&BTreeMap<String, f64>>,
) -> ScienceRow {
    let values: Vec<f64> = acc.values().copied().collect();
    let a = interval(&values, 1);
    let nan = Interval { mean: f64::NAN, low: f64::NAN, high: f64::NAN };
    let g = if arm == "base" { nan } else { interval(&paired(acc, base), 2) };
    let p = match passage {
        Some(p) if arm != PASSAGE_ARM => interval(&paired(acc, p), 3),
        _ => nan,
    };
    ScienceRow {
        arm: arm.to_string(),
        kind,
        iteration: iteration.map(|k| k as i64),
        n_passages: values.len() as i64,
        accuracy: a.mean,
        accuracy_low: a.low,
        accuracy_high: a.high,
        gain_vs_base: g.mean,
        gain_vs_base_low: g.low,
        gain_vs_base_high: g.high,
        differs_from_base: g.excludes(0.0),
        diff_vs_passage: p.mean,
        diff_vs_passage_low: p.low,
        diff_vs_passage_high: p.high,
        differs_from_passage: p.excludes(0.0),
        text_similarity: None,
        hp_similarity: None,
    }
}

/// Every row of `science.parquet`: the base model and each reference arm once (their
/// iteration-0 scores, whose passages are the validation passages), each searched variant
/// once per iteration with a validation score.
pub fn science_rows(reference: &[Arm], searched: &[Arm]) -> anyhow::Result<Vec<ScienceRow>> {
    let mut refs: Vec<(String, PerPassage)> = Vec::new();
    for arm in reference {
        let layout = Layout::at(&arm.dir);
        let file = layout.table::<ScoreRow>(0, Split::Train);
        refs.push((arm.name.clone(), per_passage(&file, &titles(&layout)?).with_context(|| format!("reference arm {}", arm.name))?));
    }
    anyhow::ensure!(!refs.is_empty(), "no reference arm given");
    let adapted = |pp: &PerPassage| -> BTreeMap<String, f64> { pp.iter().map(|(t, (a, _))| (t.clone(), *a)).collect() };
    // The base model's answers come with every arm; the passage arm's (else the first) are
    // the ones reported, and each arm's gain is paired with its own.
    let base_source = refs.iter().find(|(n, _)| n == PASSAGE_ARM).unwrap_or(&refs[0]);
    let base: BTreeMap<String, f64> = base_source.1.iter().map(|(t, (_, b))| (t.clone(), *b)).collect();
    let passage: Option<BTreeMap<String, f64>> = refs.iter().find(|(n, _)| n == PASSAGE_ARM).map(|(_, pp)| adapted(pp));
    let own_base = |pp: &PerPassage| -> BTreeMap<String, f64> { pp.iter().map(|(t, (_, b))| (t.clone(), *b)).collect() };
    let mut rows = vec![science_row("base", ArmKind::Reference, None, &base, &base, passage.as_ref())];
    for (name, pp) in &refs {
        rows.push(science_row(name, ArmKind::Reference, None, &adapted(pp), &own_base(pp), passage.as_ref()));
    }
    for arm in searched {
        let layout = Layout::at(&arm.dir);
        let articles = titles(&layout)?;
        let collapse: Vec<CollapseRow> = if layout.collapse().exists() { tables::read(&layout.collapse())? } else { Vec::new() };
        for k in layout.iterations_with::<ScoreRow>(Split::Validation) {
            let pp = per_passage(&layout.table::<ScoreRow>(k, Split::Validation), &articles)
                .with_context(|| format!("searched variant {} iteration {k}", arm.name))?;
            let mut row = science_row(&arm.name, ArmKind::Searched, Some(k), &adapted(&pp), &own_base(&pp), passage.as_ref());
            if let Some(c) = collapse.iter().find(|c| c.iteration == k as i64) {
                row.text_similarity = c.text_similarity;
                row.hp_similarity = c.hp_similarity;
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The paper's figure: validation accuracy per iteration per searched variant (95% intervals
/// as whiskers), the reference arms as horizontal bands (their intervals) with a line at the
/// mean.
fn draw_accuracy<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, rows: &[ScienceRow]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let x_max = rows.iter().filter_map(|r| r.iteration).max().unwrap_or(0).max(1) as f64;
    let y_max = rows.iter().map(|r| r.accuracy_high).filter(|y| y.is_finite()).fold(0.05, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("Validation accuracy per iteration (95% bootstrap intervals over passages)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(-0.3f64..x_max + 0.3, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc("accuracy")
        .x_labels(x_max as usize + 2)
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
        .draw()
        .map_err(err)?;
    let mut color_index = 0;
    for r in rows.iter().filter(|r| r.kind == ArmKind::Reference) {
        let color = Palette99::pick(color_index).to_rgba();
        color_index += 1;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(-0.3, r.accuracy_low), (x_max + 0.3, r.accuracy_high)],
                color.mix(0.15).filled(),
            )))
            .map_err(err)?;
        let style = ShapeStyle::from(color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(vec![(-0.3, r.accuracy), (x_max + 0.3, r.accuracy)], style))
            .map_err(err)?
            .label(format!("{} (reference)", r.arm))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    let mut arms: Vec<&str> = rows.iter().filter(|r| r.kind == ArmKind::Searched).map(|r| r.arm.as_str()).collect();
    arms.dedup();
    for (i, arm) in arms.iter().enumerate() {
        let color = Palette99::pick(color_index).to_rgba();
        color_index += 1;
        let style = ShapeStyle::from(color).stroke_width(3);
        // a small offset per variant keeps the whiskers apart
        let dx = (i as f64 - (arms.len() as f64 - 1.0) / 2.0) * 0.06;
        let pts: Vec<&ScienceRow> = rows.iter().filter(|r| r.arm == *arm && r.kind == ArmKind::Searched).collect();
        chart
            .draw_series(LineSeries::new(pts.iter().map(|r| (r.iteration.unwrap_or(0) as f64 + dx, r.accuracy)), style).point_size(4))
            .map_err(err)?
            .label(arm.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(pts.iter().map(|r| {
                let x = r.iteration.unwrap_or(0) as f64 + dx;
                PathElement::new(vec![(x, r.accuracy_low), (x, r.accuracy_high)], ShapeStyle::from(color).stroke_width(2))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn fmt_iv(x: f64, lo: f64, hi: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:+.3} [{lo:+.3}, {hi:+.3}]")
    }
}

/// Writes `science.parquet`, `validation_accuracy.{png,svg}`, `similarity.{png,svg}` and
/// `index.md` under `out`; `seconds` (the measured wall time of the whole experiment) goes
/// into the index when given.
pub fn write_science_report(reference: &[Arm], searched: &[Arm], out: &Path, seconds: Option<f64>) -> anyhow::Result<Vec<ScienceRow>> {
    load_font()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rows = science_rows(reference, searched)?;
    tables::write(&out.join("science.parquet"), &rows, &Default::default())?;
    draw_accuracy(BitMapBackend::new(&out.join("validation_accuracy.png"), (1000, 620)).into_drawing_area(), &rows)?;
    draw_accuracy(SVGBackend::new(&out.join("validation_accuracy.svg"), (1000, 620)).into_drawing_area(), &rows)?;
    let mut sim: Vec<Series> = Vec::new();
    let mut arms: Vec<&str> = rows.iter().filter(|r| r.kind == ArmKind::Searched).map(|r| r.arm.as_str()).collect();
    arms.dedup();
    for arm in &arms {
        let pts = |f: fn(&ScienceRow) -> Option<f64>| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.arm == *arm && r.kind == ArmKind::Searched)
                .filter_map(|r| f(r).map(|v| (r.iteration.unwrap_or(0) as f64, v)))
                .collect()
        };
        sim.push((format!("{arm}: text"), pts(|r| r.text_similarity)));
        sim.push((format!("{arm}: hyperparameters"), pts(|r| r.hp_similarity)));
    }
    let x_max = rows.iter().filter_map(|r| r.iteration).max().unwrap_or(0) as f64;
    let title = "Template similarity per iteration (train templates)";
    draw_lines(
        BitMapBackend::new(&out.join("similarity.png"), (960, 600)).into_drawing_area(),
        title,
        "mean pairwise similarity",
        &sim,
        x_max,
    )?;
    draw_lines(
        SVGBackend::new(&out.join("similarity.svg"), (960, 600)).into_drawing_area(),
        title,
        "mean pairwise similarity",
        &sim,
        x_max,
    )?;

    let mut md = String::from("# The science experiment (`make science`)\n\n");
    if let Some(s) = seconds {
        md.push_str(&format!("Measured wall time of this run: {:.0} s ({:.1} min).\n\n", s, s / 60.0));
    }
    md.push_str("![validation accuracy](validation_accuracy.png)\n\n");
    md.push_str("Every accuracy is the mean over validation passages of the passage's accuracy, with a 95% percentile-bootstrap interval over passages (");
    md.push_str(&format!("{RESAMPLES} resamples); comparisons are paired by passage.\n\n"));
    md.push_str("| arm | iteration | passages | accuracy [95% CI] | vs base [95% CI] | vs passage only [95% CI] | text sim. | hp sim. |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into());
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} [{:.3}, {:.3}] | {} | {} | {} | {} |\n",
            r.arm,
            r.iteration.map(|k| k.to_string()).unwrap_or_else(|| "–".into()),
            r.n_passages,
            r.accuracy,
            r.accuracy_low,
            r.accuracy_high,
            fmt_iv(r.gain_vs_base, r.gain_vs_base_low, r.gain_vs_base_high),
            fmt_iv(r.diff_vs_passage, r.diff_vs_passage_low, r.diff_vs_passage_high),
            opt(r.text_similarity),
            opt(r.hp_similarity)
        ));
    }
    md.push_str("\n## What differs\n\n");
    let says = |d: bool, x: f64, what: &str| -> Option<String> {
        if x.is_nan() {
            None
        } else if !d {
            Some(format!("does not differ from {what}"))
        } else {
            Some(format!("is {} than {what}", if x > 0.0 { "higher" } else { "lower" }))
        }
    };
    for r in rows.iter().filter(|r| r.arm != "base") {
        let at = r.iteration.map(|k| format!(", iteration {k}")).unwrap_or_default();
        let clauses: Vec<String> = [
            says(r.differs_from_base, r.gain_vs_base, "the base model"),
            says(r.differs_from_passage, r.diff_vs_passage, "training on the passage"),
        ]
        .into_iter()
        .flatten()
        .collect();
        md.push_str(&format!("- **{}{}** {}.\n", r.arm, at, clauses.join("; ")));
    }
    md.push_str("\n![similarity](similarity.png)\n");
    std::fs::write(out.join("index.md"), md)?;
    Ok(rows)
}

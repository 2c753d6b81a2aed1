//! `make report`: plots (PNG and SVG, with plotters) and an `index.md` that puts them
//! together with a table of the numbers, each traceable to the Parquet file it came from.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::experiment::layout::Layout;
use crate::experiment::states::Split;
use crate::experiment::tables::{self, CollapseRow, ScoreRow, TemplateStatsRow};

/// One point of the accuracy figure, with the file it came from.
#[derive(Debug, Clone)]
pub struct AccuracyPoint {
    pub experiment: String,
    pub split: String,
    pub iteration: usize,
    pub best_accuracy: f64,
    pub mean_accuracy: f64,
    pub base_accuracy: f64,
    pub source: PathBuf,
}

/// Every iteration's template statistics (train and validation) of an experiment folder.
pub fn accuracy_points(exp_dir: &Path) -> anyhow::Result<Vec<AccuracyPoint>> {
    let layout = Layout::at(exp_dir);
    let name = layout.experiment();
    let mut out = Vec::new();
    for k in 0.. {
        if !layout.iter_dir(k, Split::Train).exists() {
            break;
        }
        for split in Split::ALL {
            let file = layout.table::<TemplateStatsRow>(k, *split);
            if !file.exists() {
                continue;
            }
            let rows: Vec<TemplateStatsRow> = tables::read(&file)?;
            if rows.is_empty() {
                continue;
            }
            out.push(AccuracyPoint {
                experiment: name.clone(),
                split: split.to_string(),
                iteration: k,
                best_accuracy: rows.iter().map(|r| r.mean_accuracy).fold(f64::NAN, f64::max),
                mean_accuracy: rows.iter().map(|r| r.mean_accuracy).sum::<f64>() / rows.len() as f64,
                base_accuracy: rows[0].base_accuracy,
                source: file,
            });
        }
    }
    Ok(out)
}

pub(crate) type Series = (String, Vec<(f64, f64)>);

pub(crate) fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

pub(crate) fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    x_max: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(-0.2f64..x_max.max(1.0) + 0.2, 0f64..1.05f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc(y_desc)
        .x_labels(x_max as usize + 2)
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts.clone(), style).point_size(3))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
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

fn draw_histogram<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, values: &[f64]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    // 20 bins over [-1, 1]
    let mut counts = [0u32; 20];
    for v in values.iter().filter(|v| v.is_finite()) {
        let b = (((v + 1.0) / 2.0 * 20.0).floor() as i64).clamp(0, 19) as usize;
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(-1f64..1f64, 0u32..top + 1)
        .map_err(err)?;
    chart.configure_mesh().x_desc("gain over the base model (adapted - base accuracy)").y_desc("self-edits").draw().map_err(err)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = -1.0 + i as f64 * 0.1;
            Rectangle::new([(x0, 0), (x0 + 0.1, c)], BLUE.mix(0.6).filled())
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

pub(crate) fn load_font() -> anyhow::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        for p in ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"] {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{p}: not a font"));
            }
        }
        Err("no DejaVuSans.ttf found for the PNG plots: install fonts-dejavu-core".into())
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Writes the report of the experiment folders `exps` into `out`.
pub fn write_report(exps: &[PathBuf], out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    load_font()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let mut md = String::from("# selfedit report\n\n");
    // 1. QA accuracy per iteration, train and validation, with the base model
    let mut points = Vec::new();
    for e in exps {
        points.extend(accuracy_points(e)?);
    }
    anyhow::ensure!(!points.is_empty(), "no template_stats.parquet under {:?}: run `make` first", exps);
    let x_max = points.iter().map(|p| p.iteration).max().unwrap_or(0) as f64;
    let mut series: Vec<Series> = Vec::new();
    let mut keys: Vec<(String, String)> = points.iter().map(|p| (p.experiment.clone(), p.split.clone())).collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    for (e, s) in &keys {
        let pts: Vec<&AccuracyPoint> = points.iter().filter(|p| &p.experiment == e && &p.split == s).collect();
        series.push((format!("{e} {s}: best template"), pts.iter().map(|p| (p.iteration as f64, p.best_accuracy)).collect()));
        series.push((format!("{e} {s}: base model"), pts.iter().map(|p| (p.iteration as f64, p.base_accuracy)).collect()));
    }
    let title = "QA accuracy per iteration";
    let png = out.join("accuracy.png");
    let svg = out.join("accuracy.svg");
    draw_lines(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), title, "accuracy", &series, x_max)?;
    draw_lines(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), title, "accuracy", &series, x_max)?;
    written.extend([png, svg]);
    md.push_str("## QA accuracy per iteration\n\n![accuracy](accuracy.png)\n\n| experiment | split | iteration | best template | mean template | base model | source |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for p in &points {
        md.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | `{}` |\n",
            p.experiment,
            p.split,
            p.iteration,
            p.best_accuracy,
            p.mean_accuracy,
            p.base_accuracy,
            p.source.display()
        ));
    }
    // 2. collapse curves
    let mut collapse_series: Vec<Series> = Vec::new();
    let mut collapse_rows = Vec::new();
    for e in exps {
        let f = Layout::at(e).collapse();
        if f.exists() {
            let rows: Vec<CollapseRow> = tables::read(&f)?;
            let name = e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for (label, get) in [("text", 0usize), ("hyperparameters", 1), ("lexical", 2)] {
                let pts = rows
                    .iter()
                    .filter_map(|r| [r.text_similarity, r.hp_similarity, r.lexical_similarity][get].map(|v| (r.iteration as f64, v)))
                    .collect::<Vec<_>>();
                collapse_series.push((format!("{name}: {label}"), pts));
            }
            collapse_rows.push((f, rows));
        }
    }
    if !collapse_series.is_empty() {
        let (png, svg) = (out.join("collapse.png"), out.join("collapse.svg"));
        draw_lines(
            BitMapBackend::new(&png, (960, 600)).into_drawing_area(),
            "Template similarity per iteration",
            "similarity",
            &collapse_series,
            x_max,
        )?;
        draw_lines(
            SVGBackend::new(&svg, (960, 600)).into_drawing_area(),
            "Template similarity per iteration",
            "similarity",
            &collapse_series,
            x_max,
        )?;
        written.extend([png, svg]);
        md.push_str("\n## Collapse: how alike each iteration's templates are\n\n![collapse](collapse.png)\n\n| source | iteration | templates | text | hyperparameters | lexical |\n| --- | --- | --- | --- | --- | --- |\n");
        for (f, rows) in &collapse_rows {
            for r in rows {
                let v = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                md.push_str(&format!(
                    "| `{}` | {} | {} | {} | {} | {} |\n",
                    f.display(),
                    r.iteration,
                    r.n_templates,
                    v(r.text_similarity),
                    v(r.hp_similarity),
                    v(r.lexical_similarity)
                ));
            }
        }
    }
    // 3. distribution of gains per self-edit
    let mut gains = Vec::new();
    let mut sources = Vec::new();
    for e in exps {
        let layout = Layout::at(e);
        for k in layout.iterations_with::<ScoreRow>(Split::Train) {
            let f = layout.table::<ScoreRow>(k, Split::Train);
            let rows: Vec<ScoreRow> = tables::read(&f)?;
            gains.extend(rows.iter().map(|r| r.gain).filter(|g| g.is_finite()));
            sources.push(f);
        }
    }
    let (png, svg) = (out.join("gains.png"), out.join("gains.svg"));
    draw_histogram(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), "Gain of each self-edit", &gains)?;
    draw_histogram(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), "Gain of each self-edit", &gains)?;
    written.extend([png, svg]);
    let mean = gains.iter().sum::<f64>() / gains.len().max(1) as f64;
    md.push_str(&format!(
        "\n## Gains per self-edit\n\n![gains](gains.png)\n\n{} self-edits, mean gain {mean:.4}, from {}.\n",
        gains.len(),
        sources.iter().map(|s| format!("`{}`", s.display())).collect::<Vec<_>>().join(", ")
    ));
    let index = out.join("index.md");
    crate::util::atomic::write_string_atomically(&index, &md)?;
    written.push(index);
    Ok(written)
}

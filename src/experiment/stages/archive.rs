//! Stage 7, archive: the archive (seed templates, or the previous iteration's archive) plus
//! this iteration's evaluated templates, sorted by accuracy → `archive.parquet`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::experiment::cli::StageContext;
use crate::experiment::config::Variant;
use crate::experiment::layout::Stage;
use crate::experiment::novelty;
use crate::experiment::states::Split;
use crate::experiment::tables::{self, ArchiveRow, TemplateRow, TemplateStatsRow};
use crate::experiment::template::Hyperparameters;
use crate::runtime::embedder::Embedder;

#[derive(Deserialize)]
struct SeedTemplate {
    data_creation_instruction: String,
    hyperparameters: Hyperparameters,
    accuracy: f64,
    normalized_gain: f64,
}

/// The four seed templates (paper/archive_seed.json layout).
pub fn seed_archive(path: &Path) -> anyhow::Result<Vec<ArchiveRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading seed archive {}", path.display()))?;
    let seeds: Vec<SeedTemplate> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a list of templates with accuracy and normalized_gain", path.display()))?;
    Ok(seeds
        .into_iter()
        .enumerate()
        .map(|(i, s)| ArchiveRow {
            rank: 0,
            source: "seed".into(),
            template_id: format!("seed-{i}"),
            instruction: s.data_creation_instruction,
            hyperparameters: s.hyperparameters,
            accuracy: s.accuracy,
            normalized_gain: s.normalized_gain,
            novelty: None,
            strategy: None,
            crowding: None,
        })
        .collect())
}

/// The previous archive plus this iteration's evaluated templates, sorted by accuracy (best
/// first, ties by id), never pruned.
pub fn update_archive(
    previous: Vec<ArchiveRow>,
    iteration: usize,
    templates: &[TemplateRow],
    stats: &[TemplateStatsRow],
) -> Vec<ArchiveRow> {
    let by_id: HashMap<&str, &TemplateRow> = templates.iter().map(|t| (t.template_id.as_str(), t)).collect();
    let mut rows: Vec<ArchiveRow> = previous.into_iter().filter(|r| r.source != format!("iter{iteration}")).collect();
    for s in stats {
        let Some(t) = by_id.get(s.template_id.as_str()) else { continue };
        rows.push(ArchiveRow {
            rank: 0,
            source: format!("iter{iteration}"),
            template_id: t.template_id.clone(),
            instruction: t.instruction.clone(),
            hyperparameters: t.hyperparameters.clone(),
            accuracy: s.mean_accuracy,
            normalized_gain: s.normalized_gain,
            novelty: None,
            strategy: None,
            crowding: None,
        });
    }
    rows.sort_by(|a, b| b.accuracy.total_cmp(&a.accuracy).then(a.template_id.cmp(&b.template_id)));
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as i64;
    }
    rows
}

/// The archive an iteration's templates are conditioned on: `given` (the previous
/// iteration's `archive.parquet`), else for the archive variant the seed archive, else none.
pub fn conditioning_archive(ctx: &StageContext, given: Option<&Path>) -> anyhow::Result<Option<Vec<ArchiveRow>>> {
    Ok(match (given, ctx.exp.config.variant) {
        (Some(p), _) => Some(tables::read(p)?),
        (None, Variant::Archive | Variant::Novelty) => {
            Some(update_archive(seed_archive(&ctx.exp.config.archive_seed)?, ctx.iteration, &[], &[]))
        }
        _ => None,
    })
}

/// `update-archive`: writes `archive.parquet` (iteration 0 starts from the seed archive).
pub fn run(ctx: &StageContext) -> anyhow::Result<()> {
    let previous: Vec<ArchiveRow> = if ctx.iteration == 0 {
        seed_archive(&ctx.exp.config.archive_seed)?
    } else {
        tables::read(&ctx.layout.table::<ArchiveRow>(ctx.iteration - 1, Split::Train))?
    };
    let templates: Vec<TemplateRow> = ctx.read()?;
    let stats: Vec<TemplateStatsRow> = ctx.read()?;
    let mut rows = update_archive(previous, ctx.iteration, &templates, &stats);
    // The seeds carry the paper's accuracies, not this run's: name this iteration's best apart.
    let source = format!("iter{}", ctx.iteration);
    let mut detail = match rows.iter().find(|r| r.source == source) {
        Some(r) => format!(
            "best of {source} {:.3} ({}); first overall {} ({}, {:.3})",
            r.accuracy, r.template_id, rows[0].template_id, rows[0].source, rows[0].accuracy
        ),
        None => format!("no template of {source} scored; first {} ({}, {:.3})", rows[0].template_id, rows[0].source, rows[0].accuracy),
    };
    if let Some(cfg) = &ctx.exp.config.novelty {
        let embedder = Embedder::load(&cfg.embedder, &candle_core::Device::Cpu)
            .with_context(|| format!("novelty.embedder {} (run `make embedder`)", cfg.embedder.display()))?;
        let texts: Vec<String> = rows.iter().map(|r| r.instruction.clone()).collect();
        novelty::score_archive(&mut rows, &embedder.embed(&texts)?, cfg);
        detail = format!("first by gain + novelty: {} (novelty {:.3})", rows[0].template_id, rows[0].novelty.unwrap_or(0.0));
    }
    ctx.write(Stage::Archive, &ctx.table::<ArchiveRow>(), &rows, &detail)
}

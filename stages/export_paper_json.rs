//! Writes an iteration's results as the paper's `results.json` (`iter<k>/[validation/]results.json`),
//! so the paper's analysis and `build_SFT_dataset.py` run on selfedit's outputs.
mod common;

use selfedit::analysis::paper_json::{results_json, IterationTables};
use selfedit::experiment::tables::{self, ArticleRow};

common::stage_main!("Write an iteration's results in the paper's results.json layout", [], |ctx, _cli| {
    let articles: Vec<ArticleRow> = tables::read(&ctx.layout.articles())?;
    let (templates, edits, adapters, answers) = (ctx.read()?, ctx.read()?, ctx.read()?, ctx.read()?);
    let t = IterationTables {
        articles: &articles,
        templates: &templates,
        edits: &edits,
        adapters: &adapters,
        answers: &answers,
        eval_runs: ctx.exp.config.eval.runs,
    };
    let json = results_json(&format!("{}-iter{}", ctx.exp.name, ctx.iteration), &t)?;
    let path = ctx.dir().join("results.json");
    selfedit::util::atomic::write_string_atomically(&path, &serde_json::to_string_pretty(&json)?)?;
    println!(
        "export-paper-json: wrote {} ({} articles, {} templates)",
        path.display(),
        json["num_articles"],
        json["num_self_edit_templates"]
    );
    Ok(())
});

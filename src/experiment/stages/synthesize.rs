//! Stage 3, synthesize: every (template, article, completion) → training sequences in
//! `self_edits.parquet`. Searched variants' completions are constrained to
//! `{"training_sequences": [...]}`; a baseline's is plain text, one sequence per line.

use serde_json::json;

use super::exploit_count;
use super::templates::baseline_prompt;
use crate::experiment::cli::{progress, ModelArgs, StageContext};
use crate::experiment::config::{ExperimentConfig, Variant};
use crate::experiment::layout::Stage;
use crate::experiment::prompts;
use crate::experiment::states::Category;
use crate::experiment::tables::{ArticleRow, SelfEditRow, TemplateRow};
use crate::runtime::formats::LoadedModel;
use crate::runtime::generate::{ConstraintFactory, FinishReason, GenerationRequest};
use crate::runtime::tokenizer::ChatMessage;
use crate::util::hash::derive_seed;

/// JSON schema of a completion.
pub fn sequences_schema(cfg: &ExperimentConfig) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {"training_sequences": {
            "type": "array", "minItems": 1, "maxItems": cfg.search.max_sequences,
            "items": {"type": "string", "minLength": 1, "maxLength": cfg.search.sequence_max_chars}}},
        "required": ["training_sequences"],
        "additionalProperties": false
    })
}

/// The short template part of a self-edit id: `iter0-t03` → `t03`.
fn template_suffix(template_id: &str) -> &str {
    template_id.rsplit('-').next().unwrap_or(template_id)
}

/// `a017-t03-c1`: article, template, completion.
pub fn self_edit_id(article_id: &str, template_id: &str, completion: usize) -> String {
    format!("{article_id}-{}-c{completion}", template_suffix(template_id))
}

/// SEAL's parsing of a baseline's plain-text completion: one sequence per non-empty line,
/// dropping a leading line that introduces a "1." list.
pub fn split_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.len() > 1 && !lines[0].starts_with("1.") && lines[1].starts_with("1.") {
        lines.remove(0);
    }
    lines.into_iter().map(String::from).collect()
}

/// Parses a searched variant's completion: `{"training_sequences": [...]}` with the empty
/// sequences dropped.
pub fn parse_sequences(raw: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("response is not JSON: {e}"))?;
    let list = v
        .get("training_sequences")
        .and_then(|x| x.as_array())
        .ok_or_else(|| "no \"training_sequences\" list in the response".to_string())?;
    let seqs: Vec<String> = list.iter().filter_map(|s| s.as_str()).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if seqs.is_empty() {
        return Err("no non-empty training sequence".into());
    }
    Ok(seqs)
}

/// Every completion of every valid template for every article of the split, in one
/// generation batch list.
pub fn synthesize(
    ctx: &StageContext,
    model: &LoadedModel,
    templates: &[TemplateRow],
    articles: &[ArticleRow],
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<SelfEditRow>> {
    let cfg = &ctx.exp.config;
    let articles: Vec<&ArticleRow> = articles.iter().filter(|a| a.split == ctx.split()).collect();
    let factory = ConstraintFactory::new(&model.tokenizer)?;
    let schema = sequences_schema(cfg);
    let n_c = cfg.search.completions_per_template;
    let n_exploit = exploit_count(n_c, cfg.search.exploit_fraction);
    let mut rows = Vec::new();
    let mut requests = Vec::new();
    let mut pending = Vec::new(); // index into rows of each request
    for t in templates {
        for a in &articles {
            for c in 0..n_c {
                let id = self_edit_id(&a.article_id, &t.template_id, c);
                let seed = derive_seed(cfg.seed, &format!("{}/{id}", t.template_id));
                let category = match t.category {
                    Category::Baseline => Category::Baseline,
                    _ if c < n_exploit => Category::Exploit,
                    _ => Category::Explore,
                };
                let mut row = SelfEditRow {
                    self_edit_id: id,
                    template_id: t.template_id.clone(),
                    article_id: a.article_id.clone(),
                    completion: c as i64,
                    category,
                    sequences: vec![],
                    valid: false,
                    error: None,
                    raw_response: String::new(),
                    seed: seed as i64,
                    reasoning: None,
                };
                if !t.valid {
                    row.error = Some("template is invalid; nothing to complete".into());
                    rows.push(row);
                    continue;
                }
                if cfg.variant == Variant::BaselinePassage {
                    // SEAL's train-on-passage row: nothing to generate.
                    row.sequences = vec![a.context.clone()];
                    row.raw_response = a.context.clone();
                    row.valid = true;
                    rows.push(row);
                    continue;
                }
                let req = if category == Category::Baseline {
                    let prompt = ctx.prompts.render(baseline_prompt(cfg.variant)?, json!({"title": a.title, "context": a.context}))?;
                    // the paper's code sends no thinking switch for baselines, so a thinking
                    // model thinks by its template's default, as in thinking mode here
                    let ids = model.tokenizer.encode_chat_with(&[ChatMessage::user(prompt)], true, cfg.search.thinking)?;
                    GenerationRequest::new(ids, cfg.baseline.sampling.clone(), seed, cfg.search.completion_max_new_tokens)
                } else {
                    let prompt = ctx
                        .prompts
                        .render(prompts::COMPLETION, json!({"title": a.title, "context": a.context, "instruction": t.instruction}))?;
                    let ids = model.tokenizer.encode_chat_with(&[ChatMessage::user(prompt)], true, cfg.search.thinking)?;
                    let explore = cfg.search.completion_explore.as_ref().unwrap_or(&cfg.search.explore);
                    let params = if category == Category::Exploit { cfg.search.exploit.clone() } else { explore.clone() };
                    let mut r = GenerationRequest::new(ids, params, seed, cfg.search.completion_max_new_tokens);
                    r.constraint = Some(factory.json_schema(&schema)?);
                    r
                };
                pending.push(rows.len());
                requests.push(req);
                rows.push(row);
            }
        }
    }
    let outs = super::generate_answers(ctx, model, requests, progress)?;
    for (i, (reasoning, out)) in pending.into_iter().zip(outs) {
        let row = &mut rows[i];
        row.reasoning = reasoning;
        row.raw_response = out.text.clone();
        let parsed = if row.category == Category::Baseline {
            let s = split_lines(&out.text);
            if s.is_empty() {
                Err("empty completion".to_string())
            } else {
                Ok(s)
            }
        } else {
            parse_sequences(&out.text)
        };
        match parsed {
            Ok(s) => {
                row.sequences = s;
                row.valid = true;
            }
            Err(e) => {
                let hint = if out.finish_reason == FinishReason::Length { " (hit completion_max_new_tokens)" } else { "" };
                row.error = Some(format!("{e}{hint}"));
            }
        }
    }
    Ok(rows)
}

/// `synthesize`: writes `self_edits.parquet`.
pub fn run(ctx: &StageContext, model: &ModelArgs) -> anyhow::Result<()> {
    let cfg = &ctx.exp.config;
    let templates: Vec<TemplateRow> = ctx.read()?;
    let articles: Vec<ArticleRow> = crate::experiment::tables::read(&ctx.layout.articles())?;
    let model = ctx.load_model(model)?;
    let n = templates.iter().filter(|t| t.valid).count()
        * articles.iter().filter(|a| a.split == ctx.split()).count()
        * cfg.search.completions_per_template;
    let bar = progress(n, "self-edits");
    let rows = synthesize(ctx, &model, &templates, &articles, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let valid = rows.iter().filter(|r| r.valid).count();
    ctx.write(Stage::Synthesize, &ctx.table::<SelfEditRow>(), &rows, &format!("{valid} with usable sequences"))
}

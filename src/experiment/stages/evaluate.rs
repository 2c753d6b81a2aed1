//! Stage 5, evaluate: the base model and every adapter answer their article's questions
//! closed-book, `eval.runs` times each → `answers.parquet`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::experiment::cli::{progress, ModelArgs, ShardArgs, StageContext};
use crate::experiment::grading;
use crate::experiment::layout::Stage;
use crate::experiment::prompts::{self, Prompts};
use crate::experiment::states::{AdapterStatus, BaseRuns, GraderKind, Split, BASE_MODEL_ID};
use crate::experiment::tables::{AdapterRow, AnswerRow, ArticleRow, SelfEditRow};
use crate::runtime::device::parse_device;
use crate::runtime::formats::LoadedModel;
use crate::runtime::generate::{generate, generate_with_thinking, ConstraintFactory, GenerationRequest, SamplingParams};
use crate::runtime::lora::LoraAdapter;
use crate::runtime::model::Adapter;
use crate::runtime::tokenizer::ChatMessage;
use crate::util::hash::derive_seed;

/// The closed-book QA prompt: chat models get the system message and the question; models
/// without a chat template get SEAL's base-model prompt.
///
/// With `eval.thinking` the chat template is rendered with `enable_thinking`, as the paper's
/// code renders it for a thinking model (its dataset's `thinking_mode` reaches the QA call).
pub fn qa_prompt(prompts: &Prompts, model: &LoadedModel, question: &str, thinking: bool) -> anyhow::Result<Vec<u32>> {
    if model.tokenizer.chat_template.is_some() {
        let system = prompts.render(prompts::QA_SYSTEM, json!({}))?;
        model.tokenizer.encode_chat_with(&[ChatMessage::system(system), ChatMessage::user(question)], true, thinking)
    } else {
        model.tokenizer.encode_prompt(&format!("{}\n", prompts.render(prompts::QA_BASE, json!({"question": question}))?))
    }
}

/// A model to evaluate: `base`, or a self-edit's adapter (`empty` self-edits are the
/// paper's dummy adapter: the base model itself, answering with their own seeds).
pub struct EvalTarget {
    pub model_id: String,
    pub article_id: String,
    pub adapter: Option<PathBuf>,
    /// It answers `eval.runs * repeats` times: the base model once per self-edit of its
    /// article under [`BaseRuns::PerSelfEdit`], everything else once.
    pub repeats: usize,
}

/// The base model for every article of the split, then every trained or empty self-edit
/// (failed ones have nothing to evaluate; their score row says so).
pub fn eval_targets(
    articles: &[ArticleRow],
    adapters: &[AdapterRow],
    edits: &[SelfEditRow],
    split: Split,
    base_runs: BaseRuns,
) -> Vec<EvalTarget> {
    let edit_article: HashMap<&str, &str> = edits.iter().map(|e| (e.self_edit_id.as_str(), e.article_id.as_str())).collect();
    let repeats = |article: &str| match base_runs {
        BaseRuns::PerSelfEdit => edits.iter().filter(|e| e.article_id == article).count().max(1),
        BaseRuns::PerArticle => 1,
    };
    let mut out: Vec<EvalTarget> = articles
        .iter()
        .filter(|a| a.split == split)
        .map(|a| EvalTarget {
            model_id: BASE_MODEL_ID.into(),
            article_id: a.article_id.clone(),
            adapter: None,
            repeats: repeats(&a.article_id),
        })
        .collect();
    for a in adapters {
        let Some(article) = edit_article.get(a.self_edit_id.as_str()) else { continue };
        let adapter = match a.status {
            AdapterStatus::Trained => a.adapter_path.as_ref().map(PathBuf::from),
            AdapterStatus::Empty => None,
            AdapterStatus::Failed | AdapterStatus::Missing => continue,
        };
        out.push(EvalTarget { model_id: a.self_edit_id.clone(), article_id: article.to_string(), adapter, repeats: 1 });
    }
    out
}

/// A yes/no judge for answers.
pub struct Judge<'a> {
    pub model: &'a LoadedModel,
    pub factory: ConstraintFactory,
}

impl<'a> Judge<'a> {
    pub fn new(model: &'a LoadedModel) -> anyhow::Result<Self> {
        Ok(Self { model, factory: ConstraintFactory::new(&model.tokenizer)? })
    }
}

/// Answers every question of each target's article `eval.runs` times (the targets of
/// `shard`), grades them, and asks the judge where configured.
pub fn evaluate(
    ctx: &StageContext,
    model: &LoadedModel,
    articles: &[ArticleRow],
    targets: &[EvalTarget],
    judge: Option<&Judge>,
    shard: crate::experiment::layout::Shard,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Vec<AnswerRow>> {
    let cfg = &ctx.exp.config;
    let articles: HashMap<&str, &ArticleRow> = articles.iter().map(|a| (a.article_id.as_str(), a)).collect();
    let mine: Vec<&EvalTarget> = targets.iter().enumerate().filter(|(i, _)| shard.owns(*i)).map(|(_, t)| t).collect();
    let mut rows = Vec::new();
    // Targets are answered `eval.adapters_per_batch` at a time: their requests share batches,
    // each row with its own adapter (or the base model).
    for group in mine.chunks(cfg.eval.adapters_per_batch.max(1)) {
        // 1. the group's adapters
        let mut loaded = Vec::new();
        let mut adapter_of = Vec::with_capacity(group.len());
        for target in group {
            adapter_of.push(match &target.adapter {
                Some(dir) => {
                    let a = LoraAdapter::load_peft(dir, &model.decoder.cfg, model.device()).with_context(|| {
                        format!("adapter of {} is unreadable: delete {} and rerun `make`", target.model_id, dir.display())
                    })?;
                    loaded.push(a);
                    Some(loaded.len() - 1)
                }
                None => None,
            });
        }
        let adapters: Vec<&dyn Adapter> = loaded.iter().map(|a| a as &dyn Adapter).collect();
        // 2. every question × every run of every target in one request list
        let mut requests = Vec::new();
        let mut keys = Vec::new();
        for (k, target) in group.iter().enumerate() {
            let article = articles.get(target.article_id.as_str()).with_context(|| format!("unknown article {}", target.article_id))?;
            for (qi, q) in article.questions.iter().enumerate() {
                let ids = qa_prompt(&ctx.prompts, model, &q.question, cfg.eval.thinking)?;
                // run r of repeat k is run k * runs + r: the first repeat's seeds are those of
                // a single repeat
                for run in 0..cfg.eval.runs * target.repeats {
                    let seed = derive_seed(cfg.seed, &format!("eval/{}/{}/{qi}/{run}", target.model_id, article.article_id));
                    let mut request = GenerationRequest::new(ids.clone(), cfg.eval.sampling.clone(), seed, cfg.eval.max_new_tokens);
                    request.adapter = adapter_of[k];
                    requests.push(request);
                    keys.push((k, article, qi, run));
                }
            }
        }
        // 3. a thinking model reasons first; the answer graded is what follows `</think>`
        let outs = if cfg.eval.thinking {
            generate_with_thinking(model, &adapters, requests, cfg.eval.batch_size, cfg.eval.thinking_max_tokens, |_| {})?
                .into_iter()
                .map(|o| o.answer)
                .collect()
        } else {
            generate(model, &adapters, requests, cfg.eval.batch_size, |_| {})?
        };
        // 4. grading is independent per answer: rayon spreads it over the cores
        use rayon::prelude::*;
        let mut graded: Vec<AnswerRow> = keys
            .into_par_iter()
            .zip(outs.into_par_iter())
            .map(|((k, article, qi, run), out)| {
                let q = &article.questions[qi];
                let prediction = out.text.trim().to_string();
                let (em, f1) = grading::squad_scores(&prediction, &q.answers);
                AnswerRow {
                    model_id: group[k].model_id.clone(),
                    article_id: article.article_id.clone(),
                    question_index: qi as i64,
                    run: run as i64,
                    question: q.question.clone(),
                    correct: grading::heuristic_verdict(cfg.eval.heuristic, &prediction, &q.answers),
                    prediction,
                    gold_answers: q.answers.clone(),
                    exact_match: em,
                    f1,
                    grader: GraderKind::Heuristic,
                }
            })
            .collect();
        if let (GraderKind::Judge, Some(j)) = (cfg.eval.grader, judge) {
            judge_answers(ctx, j, &mut graded)?;
        }
        rows.extend(graded);
        progress(group.len());
    }
    Ok(rows)
}

/// Asks the judge model about every answer the heuristic did not accept (the heuristic
/// accepting is the paper's fallback, so those stay correct).
fn judge_answers(ctx: &StageContext, judge: &Judge, rows: &mut [AnswerRow]) -> anyhow::Result<()> {
    let schema = json!({"type": "object", "properties": {"correct": {"enum": ["yes", "no"]}}, "required": ["correct"], "additionalProperties": false});
    let mut requests = Vec::new();
    let mut idx = Vec::new();
    for (i, r) in rows.iter_mut().enumerate() {
        r.grader = GraderKind::Judge;
        if r.correct {
            continue;
        }
        let prompt = ctx
            .prompts
            .render(prompts::JUDGE, json!({"question": r.question, "gold": r.gold_answers.join(" / "), "prediction": r.prediction}))?;
        let ids = judge.model.tokenizer.encode_chat(&[ChatMessage::user(prompt)], true)?;
        let mut req = GenerationRequest::new(ids, SamplingParams::greedy(), 0, 16);
        req.constraint = Some(judge.factory.json_schema(&schema)?);
        requests.push(req);
        idx.push(i);
    }
    let outs = generate(judge.model, &[], requests, ctx.exp.config.eval.batch_size, |_| {})?;
    let replies: Vec<String> = outs.into_iter().map(|o| o.text).collect();
    apply_verdicts(rows, &idx, &replies);
    Ok(())
}

/// Applies the judge's replies to the rows it was asked about (`asked[k]` got `replies[k]`):
/// such a row is correct exactly when the reply is `{"correct": "yes"}`; "no" or a reply
/// that does not parse leaves it incorrect.
pub fn apply_verdicts(rows: &mut [AnswerRow], asked: &[usize], replies: &[String]) {
    for (&i, reply) in asked.iter().zip(replies) {
        let verdict: serde_json::Value = serde_json::from_str(reply).unwrap_or_default();
        rows[i].correct = verdict["correct"] == "yes";
    }
}

/// `evaluate`: answers for this shard's targets, or merges shards.
pub fn run(ctx: &StageContext, model_args: &ModelArgs, shard: &ShardArgs) -> anyhow::Result<()> {
    if let Some(n) = shard.merge {
        return ctx.merge_shards::<AnswerRow>(Stage::Evaluate, n);
    }
    let shard = shard.shard;
    let cfg = &ctx.exp.config;
    let articles: Vec<ArticleRow> = crate::experiment::tables::read(&ctx.layout.articles())?;
    let edits: Vec<SelfEditRow> = ctx.read()?;
    let adapters: Vec<AdapterRow> = ctx.read()?;
    let model = ctx.load_model(model_args)?;
    let judge_model = match (cfg.eval.grader, &cfg.eval.judge_model) {
        (GraderKind::Judge, Some(p)) => Some(crate::runtime::formats::load(p, &parse_device(&cfg.model.device)?)?),
        _ => None,
    };
    let judge = match cfg.eval.grader {
        GraderKind::Judge => Some(Judge::new(judge_model.as_ref().unwrap_or(&model))?),
        GraderKind::Heuristic => None,
    };
    let targets = eval_targets(&articles, &adapters, &edits, ctx.split(), cfg.eval.base_runs);
    let bar = progress(shard.len_of(targets.len()), "models evaluated");
    let rows = evaluate(ctx, &model, &articles, &targets, judge.as_ref(), shard, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    let correct = rows.iter().filter(|r| r.correct).count();
    ctx.write(Stage::Evaluate, &ctx.shard_table::<AnswerRow>(shard), &rows, &format!("{correct} correct, grader {}", cfg.eval.grader))
}

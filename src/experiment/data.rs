//! Passages and their questions: SQuAD in any of the three shapes a user has, and the
//! deterministic selection of an experiment's passages.
//!
//! Shapes read: the official v1.1 JSON (`data[].paragraphs[].qas[].answers[]`), the Hugging
//! Face Parquet layout (one row per question, `answers.text` a list), and the passage-grouped
//! JSON array (`[{title, context, questions: [{question, answer}]}]`, SEAL's layout, which
//! the demo passages use too).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::experiment::states::Split;
pub use crate::experiment::tables::{ArticleRow, Question};
use crate::util::pyrandom::PyRandom;

/// A passage as read from a file, before selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    pub title: String,
    pub context: String,
    pub questions: Vec<Question>,
}

/// Reads passages from `path`, detecting its shape.
///
/// Errors name the file and the position (passage, question, row; line and column for JSON
/// that does not parse) and say what was expected: an empty context, a passage without
/// questions, a question without a gold answer and a passage repeated are refused.
pub fn load_passages(path: &Path) -> anyhow::Result<Vec<Passage>> {
    let passages = load_any(path)?;
    check_passages(&passages, path)?;
    Ok(passages)
}

/// Every passage has text and questions, and no two passages share their text.
fn check_passages(passages: &[Passage], path: &Path) -> anyhow::Result<()> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, p) in passages.iter().enumerate() {
        let at = format!("passage {i} ({:?})", p.title);
        if p.context.trim().is_empty() {
            bail!("{}: {at}: empty context; every passage needs its text", path.display());
        }
        if p.questions.is_empty() {
            bail!("{}: {at}: no questions; every passage needs at least one question with a gold answer", path.display());
        }
        if let Some(j) = first.insert(p.context.trim(), i) {
            bail!("{}: {at} repeats passage {j} (the same context); remove one of them", path.display());
        }
    }
    Ok(())
}

fn load_any(path: &Path) -> anyhow::Result<Vec<Passage>> {
    let is_parquet = path.extension().is_some_and(|e| e == "parquet");
    if is_parquet {
        return load_hf_parquet(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: invalid byte at offset {}", path.display(), e.utf8_error().valid_up_to()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    match &doc {
        serde_json::Value::Object(o) if o.contains_key("data") => load_official(&doc, path),
        serde_json::Value::Array(_) => load_grouped(&doc, path),
        _ => bail!(
            "{}: not a SQuAD file: expected the official layout ({{\"data\": [...]}}), a JSON array of \
             {{title, context, questions}}, or a Hugging Face .parquet file",
            path.display()
        ),
    }
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str, path: &Path, at: &str) -> anyhow::Result<&'a str> {
    v.get(key).and_then(|x| x.as_str()).with_context(|| format!("{}: {at}: field {key:?} missing or not a string", path.display()))
}

fn load_grouped(doc: &serde_json::Value, path: &Path) -> anyhow::Result<Vec<Passage>> {
    let mut out = Vec::new();
    for (i, p) in doc.as_array().unwrap().iter().enumerate() {
        let at = format!("passage {i}");
        let title = p.get("title").and_then(|t| t.as_str()).unwrap_or("").to_string();
        let context = str_field(p, "context", path, &at)?.to_string();
        let qs = p
            .get("questions")
            .and_then(|q| q.as_array())
            .with_context(|| format!("{}: {at}: field \"questions\" missing or not a list", path.display()))?;
        let mut questions = Vec::new();
        for (j, q) in qs.iter().enumerate() {
            let at = format!("passage {i}, question {j}");
            let question = str_field(q, "question", path, &at)?.to_string();
            let answers: Vec<String> = match (q.get("answer"), q.get("answers")) {
                (Some(a), _) if a.is_string() => vec![a.as_str().unwrap().to_string()],
                (_, Some(serde_json::Value::Array(list))) => {
                    list.iter().filter_map(|a| a.as_str().or_else(|| a.get("text").and_then(|t| t.as_str()))).map(String::from).collect()
                }
                _ => bail!("{}: {at}: needs \"answer\" (a string) or \"answers\" (a list)", path.display()),
            };
            if answers.is_empty() {
                bail!("{}: {at}: no gold answer", path.display());
            }
            questions.push(Question { question, answers });
        }
        out.push(Passage { title, context, questions });
    }
    Ok(out)
}

fn load_official(doc: &serde_json::Value, path: &Path) -> anyhow::Result<Vec<Passage>> {
    let data = doc["data"].as_array().with_context(|| format!("{}: \"data\" is not a list", path.display()))?;
    let mut out = Vec::new();
    for (i, article) in data.iter().enumerate() {
        let title = article.get("title").and_then(|t| t.as_str()).unwrap_or("").to_string();
        let paragraphs = article
            .get("paragraphs")
            .and_then(|p| p.as_array())
            .with_context(|| format!("{}: data[{i}]: \"paragraphs\" missing or not a list", path.display()))?;
        for (j, para) in paragraphs.iter().enumerate() {
            let at = format!("data[{i}].paragraphs[{j}]");
            let context = str_field(para, "context", path, &at)?.to_string();
            let qas = para.get("qas").and_then(|q| q.as_array()).with_context(|| format!("{}: {at}: \"qas\" missing", path.display()))?;
            let mut questions = Vec::new();
            for (k, qa) in qas.iter().enumerate() {
                let at = format!("{at}.qas[{k}]");
                let question = str_field(qa, "question", path, &at)?.to_string();
                let mut answers: Vec<String> = Vec::new();
                for a in qa.get("answers").and_then(|a| a.as_array()).into_iter().flatten() {
                    if let Some(t) = a.get("text").and_then(|t| t.as_str()) {
                        if !answers.iter().any(|x| x == t) {
                            answers.push(t.to_string());
                        }
                    }
                }
                if answers.is_empty() {
                    bail!("{}: {at}: no gold answer", path.display());
                }
                questions.push(Question { question, answers });
            }
            out.push(Passage { title: title.clone(), context, questions });
        }
    }
    Ok(out)
}

/// The Hugging Face `squad` Parquet layout: one row per question with `title`, `context`,
/// `question` and `answers` (a struct whose `text` is a list of strings).
fn load_hf_parquet(path: &Path) -> anyhow::Result<Vec<Passage>> {
    use arrow::array::{Array, AsArray};
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?
        .build()?;
    let mut order: Vec<(String, String)> = Vec::new();
    let mut by_context: HashMap<(String, String), Vec<Question>> = HashMap::new();
    let mut row = 0usize;
    for batch in reader {
        let batch = batch?;
        // every column as the types read below, whatever string and list types the writer used
        let col = |name: &str| -> anyhow::Result<arrow::array::ArrayRef> {
            let a = batch
                .column_by_name(name)
                .with_context(|| format!("{}: no column {name:?} (Hugging Face squad layout expected)", path.display()))?;
            let want = match a.data_type() {
                arrow::datatypes::DataType::Struct(fields) => arrow::datatypes::DataType::Struct(
                    fields
                        .iter()
                        .map(|f| match f.name().as_str() {
                            "text" => std::sync::Arc::new(arrow::datatypes::Field::new(
                                "text",
                                <Vec<String> as crate::experiment::tables::Column>::data_type(),
                                true,
                            )),
                            _ => f.clone(),
                        })
                        .collect(),
                ),
                other if name == "answers" => {
                    bail!("{}: column answers has type {other}, expected struct<text: list<string>, ...>", path.display())
                }
                _ => arrow::datatypes::DataType::Utf8,
            };
            crate::experiment::tables::conform::conform(a, &want, &format!("{}: column {name}", path.display()))
        };
        let titles =
            col("title")?.as_string_opt::<i32>().with_context(|| format!("{}: column title is not a string", path.display()))?.clone();
        let contexts =
            col("context")?.as_string_opt::<i32>().with_context(|| format!("{}: column context is not a string", path.display()))?.clone();
        let questions = col("question")?
            .as_string_opt::<i32>()
            .with_context(|| format!("{}: column question is not a string", path.display()))?
            .clone();
        let answers =
            col("answers")?.as_struct_opt().with_context(|| format!("{}: column answers is not a struct", path.display()))?.clone();
        let texts = answers
            .column_by_name("text")
            .and_then(|c| c.as_list_opt::<i32>())
            .with_context(|| format!("{}: answers.text is not a list", path.display()))?
            .clone();
        for i in 0..batch.num_rows() {
            let key = (titles.value(i).to_string(), contexts.value(i).to_string());
            let list = texts.value(i);
            let strs =
                list.as_string_opt::<i32>().with_context(|| format!("{}: row {row}: answers.text holds no strings", path.display()))?;
            let mut golds: Vec<String> = Vec::new();
            for k in 0..strs.len() {
                let t = strs.value(k).to_string();
                if !golds.contains(&t) {
                    golds.push(t);
                }
            }
            if golds.is_empty() {
                bail!("{}: row {row}: no gold answer", path.display());
            }
            if !by_context.contains_key(&key) {
                order.push(key.clone());
            }
            by_context.entry(key).or_default().push(Question { question: questions.value(i).to_string(), answers: golds });
            row += 1;
        }
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let qs = by_context.remove(&k).unwrap_or_default();
            Passage { title: k.0, context: k.1, questions: qs }
        })
        .collect())
}

/// The paper's selection: the whole passage list shuffled by Python's `random.shuffle`
/// after `random.seed(seed)` ([`PyRandom`]), then passages `[start, start + n)` of it.
/// Passages without questions or context are passed over (the paper's files have none), and
/// ids are the split's letter and the rank in the selection (`a000`, `a001`, ...); each row
/// records its index in the file (`source_index`).
pub fn select(passages: &[Passage], n: usize, start: usize, seed: u64, split: Split) -> anyhow::Result<Vec<ArticleRow>> {
    let mut order: Vec<usize> = (0..passages.len()).collect();
    PyRandom::new(seed).shuffle(&mut order);
    let usable: Vec<usize> =
        order.into_iter().filter(|&i| !passages[i].questions.is_empty() && !passages[i].context.trim().is_empty()).collect();
    let skipped = passages.len() - usable.len();
    if skipped > 0 {
        tracing::warn!("{skipped} passage(s) without questions or context were left out");
    }
    if usable.len() < start + n {
        bail!("asked for {split} passages {start}..{} but the file has only {} with questions", start + n, usable.len());
    }
    let letter = match split {
        Split::Train => 'a',
        Split::Validation => 'v',
    };
    Ok(usable[start..start + n]
        .iter()
        .enumerate()
        .map(|(rank, &i)| {
            let p = &passages[i];
            ArticleRow {
                article_id: format!("{letter}{rank:03}"),
                split,
                title: p.title.clone(),
                context: p.context.clone(),
                questions: p.questions.clone(),
                source_index: i as i64,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_official_and_grouped_layouts_alike() {
        let d = tempfile::tempdir().unwrap();
        let official = write(
            d.path(),
            "dev.json",
            r#"{"version": "1.1", "data": [{"title": "T", "paragraphs": [
            {"context": "C1", "qas": [{"id": "1", "question": "Q1?", "answers": [{"text": "A", "answer_start": 0}, {"text": "A", "answer_start": 0}, {"text": "B", "answer_start": 3}]}]}]}]}"#,
        );
        let grouped =
            write(d.path(), "g.json", r#"[{"title": "T", "context": "C1", "questions": [{"question": "Q1?", "answers": ["A", "B"]}]}]"#);
        assert_eq!(load_passages(&official).unwrap(), load_passages(&grouped).unwrap());
    }

    #[test]
    fn bad_files_name_the_place() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.json", r#"[{"title": "T", "context": "C", "questions": [{"question": "Q?"}]}]"#);
        let e = format!("{:#}", load_passages(&p).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("passage 0, question 0"), "{e}");
        let p = write(d.path(), "trunc.json", r#"[{"title": "T", "cont"#);
        assert!(format!("{:#}", load_passages(&p).unwrap_err()).contains("not valid JSON"));
        let p = write(d.path(), "obj.json", r#"{"foo": 1}"#);
        assert!(format!("{:#}", load_passages(&p).unwrap_err()).contains("not a SQuAD file"));
    }

    #[test]
    fn selection_is_seeded_and_skips_passages_without_questions() {
        let mut ps: Vec<Passage> = (0..10)
            .map(|i| Passage {
                title: format!("t{i}"),
                context: format!("c{i}"),
                questions: vec![Question { question: "q".into(), answers: vec!["a".into()] }],
            })
            .collect();
        ps[3].questions.clear();
        let a = select(&ps, 5, 0, 7, Split::Train).unwrap();
        let b = select(&ps, 5, 0, 7, Split::Train).unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|x| x.title != "t3"));
        assert_eq!(a[0].article_id, "a000");
        assert_ne!(a, select(&ps, 5, 0, 8, Split::Train).unwrap());
        assert!(select(&ps, 10, 0, 7, Split::Train).is_err());
    }

    /// The paper's procedure on its own files: `random.seed(42); random.shuffle(passages)`,
    /// then the first passages (titles computed with CPython).
    #[test]
    fn paper_selection_of_the_shared_squad_files() {
        // `SELFEDIT_SHARED`: where `make mutants` finds the shared folder from its copy of the tree
        let shared = std::env::var_os("SELFEDIT_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let dir = shared.join("squad");
        let train = dir.join("squad_train_100.json");
        if !train.exists() {
            eprintln!("{} is missing: skipping", train.display());
            return;
        }
        let ps = load_passages(&train).unwrap();
        let a = select(&ps, 3, 0, 42, Split::Train).unwrap();
        let titles: Vec<&str> = a.iter().map(|x| x.title.as_str()).collect();
        assert_eq!(titles, ["Ann Arbor, Michigan", "Hydrogen", "American Idol"]);
        let b = select(&ps, 2, 3, 42, Split::Train).unwrap();
        assert_eq!(b.iter().map(|x| x.title.as_str()).collect::<Vec<_>>(), ["Saint Helena", "To Kill a Mockingbird"]);
        let ps = load_passages(&dir.join("squad_val.json")).unwrap();
        let v = select(&ps, 5, 0, 42, Split::Validation).unwrap();
        let titles: Vec<&str> = v.iter().map(|x| x.title.as_str()).collect();
        assert_eq!(titles, ["Genghis Khan", "European Union law", "1973 oil crisis", "Genghis Khan", "Chloroplast"]);
        assert_eq!(v[0].article_id, "v000");
        assert!(v.iter().all(|x| ps[x.source_index as usize].context == x.context));
    }

    /// The shipped passages grade honestly under the paper's substring verdict: no question's
    /// gold answer occurs in the question itself or in its passage's title, so a model that
    /// only repeats the question scores nothing (the demo's currency once read "velt", found
    /// in every answer naming "Veltoria").
    #[test]
    fn shipped_questions_do_not_contain_their_answers() {
        use crate::experiment::grading::substring_correct;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in ["demo_passages.json", "demo_validation.json", "science_passages.json", "science_validation.json"] {
            let passages = load_passages(&root.join("data").join(file)).unwrap();
            for p in &passages {
                for q in &p.questions {
                    let echo = format!("{} {}", q.question, p.title);
                    assert!(!substring_correct(&echo, &q.answers), "{file}: {:?} gives away its answer {:?}", q.question, q.answers);
                }
            }
        }
    }
}

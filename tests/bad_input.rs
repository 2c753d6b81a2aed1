//! Bad input gives a clear error or a recorded row, and nothing already written is lost:
//! template responses that are not JSON, hyperparameters out of range, empty self-edits,
//! truncated adapter files, missing model files.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use selfedit::experiment::cli::StageContext;
use selfedit::experiment::config::Experiment;
use selfedit::experiment::layout::Shard;
use selfedit::experiment::stages::{evaluate, synthesize, templates, train};
use selfedit::experiment::states::{AdapterStatus, BaseRuns, Category, Split};
use selfedit::experiment::tables::{AdapterRow, ArticleRow, SelfEditRow, TemplateRow};

fn tiny_experiment(model: &Path) -> Experiment {
    let mut exp = Experiment::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")).unwrap();
    exp.config.model.path = model.to_path_buf();
    exp.config.prompts_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prompts");
    exp
}

#[test]
fn template_responses_that_are_not_json_or_out_of_range_are_recorded() {
    let exp = tiny_experiment(Path::new("unused"));
    let cfg = &exp.config;
    let row = templates::parse_template(cfg, 0, "iter0-t00", Category::Exploit, "Sure! Here is my plan: train hard.", 1);
    assert!(!row.valid);
    assert!(row.error.as_deref().unwrap().contains("not a template JSON object"), "{:?}", row.error);
    assert_eq!(row.raw_response, "Sure! Here is my plan: train hard.");

    let raw = r#"{"data_creation_instruction": "List facts.", "hyperparameters": {"lora_rank": 100000, "lora_alpha": 64,
        "lora_dropout": 0.1, "learning_rate": -0.5, "num_epochs": 1000000, "gradient_accumulation_steps": 2}}"#;
    let row = templates::parse_template(cfg, 0, "iter0-t01", Category::Explore, raw, 2);
    assert!(row.valid);
    let b = &cfg.hyperparameter_bounds;
    let h = &row.hyperparameters;
    assert_eq!(h.lora_rank, b.lora_rank.max as i64);
    assert_eq!(h.learning_rate, b.learning_rate.min);
    assert_eq!(h.num_epochs, b.num_epochs.max as i64);
    assert_eq!((h.lora_alpha, h.gradient_accumulation_steps), (64, 2));
    let note = row.error.unwrap();
    for k in ["lora_rank 100000 clamped", "learning_rate -0.5 clamped", "num_epochs 1000000 clamped"] {
        assert!(note.contains(k), "{note}");
    }

    let raw = r#"{"data_creation_instruction": "   ", "hyperparameters": {"lora_rank": 8, "lora_alpha": 16,
        "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#;
    let row = templates::parse_template(cfg, 0, "iter0-t02", Category::Explore, raw, 3);
    assert!(!row.valid && row.error.unwrap().contains("empty"));

    // completions
    assert!(synthesize::parse_sequences("not json").unwrap_err().contains("not JSON"));
    assert!(synthesize::parse_sequences(r#"{"training_sequences": ["", "  "]}"#).unwrap_err().contains("no non-empty"));
    assert_eq!(synthesize::parse_sequences(r#"{"training_sequences": [" a ", ""]}"#).unwrap(), vec!["a"]);
    assert_eq!(synthesize::split_lines("Here are implications:\n1. A\n\n2. B\n"), vec!["1. A", "2. B"]);
}

#[test]
fn empty_self_edits_truncated_adapters_and_missing_models() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny-qwen3");
    common::write_tiny_checkpoint(&model_dir, &common::tiny_config("qwen3"), 5);
    let exp = tiny_experiment(&model_dir);
    let model = selfedit::runtime::formats::load(&model_dir, &Device::Cpu).unwrap();

    let article = ArticleRow {
        article_id: "a000".into(),
        split: Split::Train,
        title: "w1".into(),
        context: "w2 w3 w4 w5".into(),
        questions: vec![selfedit::experiment::data::Question { question: "w6 w7".into(), answers: vec!["w3".into()] }],
        source_index: 0,
    };
    let template = templates::parse_template(
        &exp.config,
        0,
        "iter0-t00",
        Category::Exploit,
        r#"{"data_creation_instruction": "x", "hyperparameters": {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#,
        0,
    );
    let edit = |c: i64, seqs: Vec<&str>, valid: bool| SelfEditRow {
        self_edit_id: synthesize::self_edit_id("a000", "iter0-t00", c as usize),
        template_id: "iter0-t00".into(),
        article_id: "a000".into(),
        completion: c,
        category: Category::Exploit,
        sequences: seqs.into_iter().map(String::from).collect(),
        valid,
        error: if valid { None } else { Some("response is not JSON".into()) },
        raw_response: String::new(),
        seed: 0,
        reasoning: None,
    };
    let edits = vec![edit(0, vec!["w1 w2 w3", "w4 w5 w6 w7"], true), edit(1, vec![], false)];
    let ctx = StageContext::new(exp, dir.path(), 0).unwrap();
    let adapters_dir = ctx.layout.adapters_dir(0, Split::Train);
    let rows: Vec<AdapterRow> =
        train::train_adapters(&ctx, &model, std::slice::from_ref(&template), &edits, std::slice::from_ref(&article), Shard::ALL, |_| {})
            .unwrap();
    assert_eq!(rows[0].status, AdapterStatus::Trained);
    assert_eq!(rows[1].status, AdapterStatus::Empty);
    assert!(rows[1].error.as_deref().unwrap().contains("not JSON"));
    let trained = adapters_dir.join("a000-t00-c0");
    let weights = trained.join("adapter_model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // the empty self-edit is evaluated as the base model (the paper's dummy adapter)
    let targets = evaluate::eval_targets(std::slice::from_ref(&article), &rows, &edits, Split::Train, BaseRuns::PerArticle);
    assert_eq!(targets.len(), 3);
    assert!(targets[2].adapter.is_none() && targets[2].model_id == "a000-t00-c1");

    // a truncated adapter: evaluation says which folder to delete; training again repairs it
    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    let err = evaluate::evaluate(&ctx, &model, std::slice::from_ref(&article), &targets, None, Shard::ALL, |_| {}).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("a000-t00-c0") && msg.contains("delete"), "{msg}");
    let again = train::train_adapters(&ctx, &model, &[template], &edits, std::slice::from_ref(&article), Shard::ALL, |_| {}).unwrap();
    assert_eq!(again[0].status, AdapterStatus::Trained);
    assert_eq!(std::fs::read(&weights).unwrap(), good, "retraining with the same seed gives the same adapter");
    let answers = evaluate::evaluate(&ctx, &model, &[article], &targets, None, Shard::ALL, |_| {}).unwrap();
    assert_eq!(answers.len(), 3 * ctx.exp.config.eval.runs);

    // a missing model file says how to get it
    let err = match selfedit::runtime::formats::load(Path::new("models/no-such-model.gguf"), &Device::Cpu) {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("loaded a model that does not exist"),
    };
    assert!(err.contains("no-such-model.gguf") && err.contains("make model"), "{err}");
    // a file that is not a GGUF
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf at all").unwrap();
    let err = match selfedit::runtime::formats::load(&junk, &Device::Cpu) {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("loaded junk"),
    };
    assert!(err.contains("junk.gguf") && err.contains("not a readable GGUF"), "{err}");
}

#[test]
fn table_files_that_are_truncated_or_of_the_wrong_kind_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("templates.parquet");
    std::fs::write(&p, b"PAR1 broken").unwrap();
    let e = format!("{:#}", selfedit::experiment::tables::read::<TemplateRow>(&p).unwrap_err());
    assert!(e.contains("templates.parquet") && e.contains("rerun"), "{e}");
    let e = format!("{:#}", selfedit::experiment::tables::read::<TemplateRow>(&dir.path().join("missing.parquet")).unwrap_err());
    assert!(e.contains("missing.parquet"), "{e}");
}

/// The Hugging Face `squad` Parquet layout (one row per question, answers.text a list) reads
/// as the same passages as the grouped JSON.
#[test]
fn hugging_face_parquet_layout_reads_like_the_json_layouts() {
    use arrow::array::{ArrayRef, Int32Builder, ListBuilder, StringArray, StringBuilder, StructArray};
    use arrow::datatypes::{DataType, Field};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut texts = ListBuilder::new(StringBuilder::new());
    let mut starts = ListBuilder::new(Int32Builder::new());
    for answers in [vec!["Marzipane", "Marzipane"], vec!["41"], vec!["Quessly"]] {
        for a in answers {
            texts.values().append_value(a);
            starts.values().append_value(0);
        }
        texts.append(true);
        starts.append(true);
    }
    let texts: ArrayRef = Arc::new(texts.finish());
    let starts: ArrayRef = Arc::new(starts.finish());
    let answers = StructArray::from(vec![
        (Arc::new(Field::new("text", texts.data_type().clone(), true)), texts),
        (Arc::new(Field::new("answer_start", starts.data_type().clone(), true)), starts),
    ]);
    let col = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let batch = arrow::record_batch::RecordBatch::try_from_iter(vec![
        ("id", col(vec!["1", "2", "3"])),
        ("title", col(vec!["Veltoria", "Veltoria", "Orrin"])),
        ("context", col(vec!["C1", "C1", "C2"])),
        ("question", col(vec!["Capital?", "Members?", "Town?"])),
        ("answers", Arc::new(answers) as ArrayRef),
    ])
    .unwrap();
    assert!(matches!(batch.schema().field(4).data_type(), DataType::Struct(_)));
    let path = dir.path().join("validation-00000-of-00001.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let from_parquet = selfedit::experiment::data::load_passages(&path).unwrap();
    let json = dir.path().join("grouped.json");
    std::fs::write(&json, r#"[{"title": "Veltoria", "context": "C1", "questions": [{"question": "Capital?", "answer": "Marzipane"}, {"question": "Members?", "answer": "41"}]},
        {"title": "Orrin", "context": "C2", "questions": [{"question": "Town?", "answer": "Quessly"}]}]"#).unwrap();
    assert_eq!(from_parquet, selfedit::experiment::data::load_passages(&json).unwrap());
    // a Parquet file of another layout names the missing column
    let other = dir.path().join("other.parquet");
    let b2 = arrow::record_batch::RecordBatch::try_from_iter(vec![("foo", col(vec!["x"]))]).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&other).unwrap(), b2.schema(), None).unwrap();
    w.write(&b2).unwrap();
    w.close().unwrap();
    let e = format!("{:#}", selfedit::experiment::data::load_passages(&other).unwrap_err());
    assert!(e.contains("other.parquet") && e.contains("title"), "{e}");
}

/// The baseline variants need no model to write their template: SEAL's fixed instruction and
/// hyperparameters.
#[test]
fn baseline_variants_use_seals_fixed_templates() {
    let mut exp = tiny_experiment(Path::new("unused"));
    exp.config.variant = selfedit::experiment::config::Variant::BaselineRewrite;
    exp.config.search.templates_per_iteration = 1;
    let prompts = selfedit::experiment::prompts::Prompts::load(&exp.config.prompts_dir).unwrap();
    let t = templates::baseline_template(&exp.config, &prompts, 0).unwrap();
    assert_eq!(t.category, Category::Baseline);
    assert!(t.instruction.starts_with("Let's read the following passage and rewrite it"));
    let h = &t.hyperparameters;
    assert_eq!((h.lora_rank, h.lora_alpha, h.num_epochs, h.gradient_accumulation_steps), (32, 64, 10, 1));
    assert_eq!(h.learning_rate, 1e-3);
    exp.config.variant = selfedit::experiment::config::Variant::BaselineImplications;
    let t = templates::baseline_template(&exp.config, &prompts, 0).unwrap();
    assert!(t.instruction.contains("implications"));
}

/// Bad input, class by class: each error names the file, the place and what was expected.
#[test]
fn data_and_config_errors_name_the_file_the_place_and_what_was_expected() {
    use selfedit::experiment::data::load_passages;
    let dir = tempfile::tempdir().unwrap();
    let passage = |ctx: &str, qs: &str| format!(r#"{{"title": "T", "context": "{ctx}", "questions": [{qs}]}}"#);
    let q = r#"{"question": "Who?", "answer": "Ada"}"#;
    let err = |name: &str, bytes: &[u8]| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = format!("{:#}", load_passages(&path).unwrap_err());
        assert!(e.contains(name), "{name}: the error does not name the file: {e}");
        e
    };
    // malformed JSON: line and column
    let e = err("malformed.json", format!("[{},\n  {{\"title\": ]", passage("A text.", q)).as_bytes());
    assert!(e.contains("not valid JSON") && e.contains("line 2 column"), "{e}");
    // invalid UTF-8: the byte offset
    let mut bytes = format!("[{}]", passage("Caf", q)).into_bytes();
    bytes.insert(bytes.len() - 40, 0xff);
    let e = err("latin1.json", &bytes);
    assert!(e.contains("not UTF-8") && e.contains("offset"), "{e}");
    // a passage with an empty context, one without questions, a question without an answer
    let e = err("empty.json", format!("[{}, {}]", passage("A text.", q), passage("  ", q)).as_bytes());
    assert!(e.contains("passage 1") && e.contains("empty context"), "{e}");
    let e = err("noq.json", format!("[{}, {}]", passage("A text.", q), passage("Another.", "")).as_bytes());
    assert!(e.contains("passage 1") && e.contains("no questions"), "{e}");
    let e = err("noans.json", format!("[{}]", passage("A text.", r#"{"question": "Who?", "answers": []}"#)).as_bytes());
    assert!(e.contains("passage 0, question 0") && e.contains("no gold answer"), "{e}");
    // the same passage twice
    let e = err("dup.json", format!("[{}, {}, {}]", passage("A text.", q), passage("B text.", q), passage("A text.", q)).as_bytes());
    assert!(e.contains("passage 2") && e.contains("repeats passage 0"), "{e}");

    // the config: a value of the wrong type, an unknown variant, an unknown grader
    let tiny = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")).unwrap();
    for (from, to, want) in [
        ("train_passages = 2", "train_passages = \"two\"", ["train_passages", "expected"]),
        ("variant = \"no-archive\"", "variant = \"novelty-x\"", ["variant", "unknown variant"]),
        ("grader = \"heuristic\"", "grader = \"oracle\"", ["grader", "unknown variant"]),
        // the baseline's and the generator's LoRA settings are checked as the bounds are
        ("learning_rate = 1e-3, num_epochs", "learning_rate = -1e-3, num_epochs", ["baseline.hyperparameters.learning_rate", "> 0"]),
        ("learning_rate = 3e-4", "learning_rate = -3e-4", ["sft.learning_rate", "> 0"]),
        ("lora_rank = 16", "lora_rank = 0", ["sft.lora_rank", ">= 1"]),
        ("max_grad_norm = 1.0", "max_grad_norm = -1.0", ["training.max_grad_norm", ">= 0"]),
    ] {
        assert!(tiny.contains(from), "configs/tiny.toml no longer has {from}");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, tiny.replace(from, to)).unwrap();
        let e = format!("{:#}", selfedit::experiment::config::Experiment::load(&path).unwrap_err());
        assert!(e.contains("bad.toml") && want.iter().all(|w| e.contains(w)), "{to}: {e}");
    }
}

/// Model-side classes: an architecture the decoder does not run, an adapter made for another
/// base model, a table written by an older version (a column missing).
#[test]
fn foreign_models_adapters_and_old_tables_are_refused_by_name() {
    use selfedit::experiment::tables::{self, AdapterRow};
    use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
    let dir = tempfile::tempdir().unwrap();
    // a GPT-2 checkpoint
    let gpt2 = dir.path().join("gpt2");
    common::write_tiny_checkpoint(&gpt2, &common::tiny_config("gpt2"), 0);
    let e = format!("{:#}", selfedit::runtime::formats::load(&gpt2, &candle_core::Device::Cpu).err().expect("a GPT-2 checkpoint loaded"));
    assert!(e.contains("gpt2") && e.contains("not supported") && e.contains("llama"), "{e}");
    // an adapter for a model with another hidden size: the tensor and both shapes
    let small = common::tiny_config("llama");
    let adapter = LoraAdapter::new(&small, LoraConfig::paper(4, 8.0, 0.0), 0, &candle_core::Device::Cpu).unwrap();
    adapter.save_peft(&dir.path().join("adapter"), "tiny").unwrap();
    let mut wide = small.clone();
    wide.hidden_size = 64;
    let e = format!(
        "{:#}",
        LoraAdapter::load_peft(&dir.path().join("adapter"), &wide, &candle_core::Device::Cpu).err().expect("a foreign adapter loaded")
    );
    assert!(e.contains("adapter_model.safetensors") && e.contains("q_proj") && e.contains("[4, 32]") && e.contains("64"), "{e}");
    // an adapters table without the column added since
    let path = dir.path().join("adapters.parquet");
    let row = AdapterRow {
        self_edit_id: "a000-t00-c0".into(),
        status: selfedit::experiment::states::AdapterStatus::Trained,
        adapter_path: None,
        sequences: 1,
        tokens: 10,
        steps: 1,
        loss_curve: vec![1.0],
        seconds: 0.1,
        error: None,
        capped: None,
    };
    tables::write(&path, &[row], &Default::default()).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let batch =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().next().unwrap().unwrap();
    let keep: Vec<usize> = (0..batch.num_columns()).filter(|&i| batch.schema().field(i).name() != "capped").collect();
    let old = batch.project(&keep).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), old.schema(), None).unwrap();
    w.write(&old).unwrap();
    w.close().unwrap();
    let e = format!("{:#}", tables::read::<AdapterRow>(&path).unwrap_err());
    assert!(e.contains("adapters.parquet") && e.contains("\"capped\" is missing"), "{e}");
}

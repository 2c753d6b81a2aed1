//! The runtime on the real SmolLM2-135M-Instruct GGUF, against independent implementations:
//! candle-transformers' `quantized_llama`, llama.cpp's tokenizer (recorded ids), and
//! Transformers + PEFT (recorded logits of a PEFT adapter).

mod common;

use candle_core::{Device, Tensor};
use selfedit::runtime::lora::LoraAdapter;
use selfedit::runtime::model::Batch;
use serde_json::Value;

fn last_logits(ids: &[u32], adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let m = common::smollm();
    let batch = Batch::causal(ids, 0, m.device(), m.decoder.dtype()).unwrap();
    m.decoder
        .forward_last(&batch, None, adapter.map(|a| a as &dyn selfedit::runtime::model::Adapter))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn argmax(xs: &[f32]) -> u32 {
    selfedit::runtime::generate::sampling::argmax(xs)
}

#[test]
fn tokenizer_matches_llama_cpp_reference() {
    let m = common::smollm();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(common::data("tokenizer_reference.json")).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = m.tokenizer.encode(text).unwrap();
        assert_eq!(got, want, "encoding {text:?}");
        let decoded = m.tokenizer.decode(&got, false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decoding {text:?}");
    }
    assert_eq!(m.tokenizer.token_id("<|im_start|>"), Some(1));
    assert_eq!(m.tokenizer.token_id("<|im_end|>"), Some(2));
    assert!(!m.tokenizer.add_bos);
}

#[test]
fn chat_template_renders_from_the_gguf_jinja() {
    let m = common::smollm();
    use selfedit::runtime::tokenizer::ChatMessage;
    let text = m.tokenizer.apply_chat_template(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn logits_and_greedy_agree_with_candle_quantized_llama() {
    let m = common::smollm();
    let path = common::model_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    // A prompt whose continuation is confident at every step: quantized_llama rounds its
    // activations to 8 bits, so near-ties (margins below ~0.1) may flip between the two.
    let prompt = m.tokenizer.encode("Count from 1 to 30: 1, 2, 3, 4,").unwrap();

    // next-token logits of the prompt
    let ours = last_logits(&prompt, None);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let theirs: Vec<f32> = reference.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(argmax(&ours), argmax(&theirs));
    // quantized_llama quantizes activations to 8 bits in its matmuls: allow for that.
    let max_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let mean_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f32>() / ours.len() as f32;
    assert!(mean_diff < 0.15 && max_diff < 1.0, "logits differ: mean {mean_diff}, max {max_diff}");

    // greedy continuation, 20 tokens, both with their KV caches
    let mut ours_ids = Vec::new();
    let mut cache = selfedit::runtime::model::KvCache::new(&m.decoder.cfg, 1, 128, m.decoder.dtype(), m.device()).unwrap();
    let mut next = prompt.clone();
    for _ in 0..20 {
        let start = cache.len();
        let batch = Batch::causal(&next, start, m.device(), m.decoder.dtype()).unwrap();
        let l: Vec<f32> = m.decoder.forward_last(&batch, Some(&mut cache), None).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let t = argmax(&l);
        ours_ids.push(t);
        next = vec![t];
    }
    let mut theirs_ids = Vec::new();
    let mut pos = 0;
    let mut next = prompt.clone();
    for _ in 0..20 {
        let input = Tensor::new(next.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let l: Vec<f32> = reference.forward(&input, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        pos += next.len();
        let t = argmax(&l);
        theirs_ids.push(t);
        next = vec![t];
    }
    assert_eq!(
        ours_ids,
        theirs_ids,
        "greedy continuations differ:\n ours {:?}\n theirs {:?}",
        m.tokenizer.decode(&ours_ids, false),
        m.tokenizer.decode(&theirs_ids, false)
    );
}

fn top20(v: &Value) -> (Vec<u32>, Vec<f32>) {
    let ids = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let logits = v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    (ids, logits)
}

#[test]
fn python_peft_adapter_loads_and_matches_transformers_logits() {
    let m = common::smollm();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(common::data("peft_reference.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = reference["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(m.tokenizer.encode(reference["prompt"].as_str().unwrap()).unwrap(), prompt);
    let adapter = LoraAdapter::load_peft(&common::data("peft_smollm2_r4"), &m.decoder.cfg, m.device()).unwrap();
    assert_eq!(adapter.config.rank, 4);
    for (key, adapter) in [("base_top20", None), ("adapted_top20", Some(&adapter))] {
        let (ids, want) = top20(&reference[key]);
        let ours = last_logits(&prompt, adapter);
        for (id, w) in ids.iter().zip(&want) {
            let got = ours[*id as usize];
            assert!((got - w).abs() < 2e-3, "{key}: token {id}: ours {got}, transformers {w}");
        }
        assert_eq!(argmax(&ours), ids[0]);
    }
    // base greedy continuation, full recompute as the reference did
    let mut ids = prompt.clone();
    for _ in 0..20 {
        let t = argmax(&last_logits(&ids, None));
        ids.push(t);
    }
    let want: Vec<u32> = reference["base_greedy_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(&ids[prompt.len()..], want.as_slice());
}

#[test]
fn adapter_save_load_merge_roundtrip() {
    let m = common::smollm();
    let adapter = LoraAdapter::load_peft(&common::data("peft_smollm2_r4"), &m.decoder.cfg, m.device()).unwrap();
    let prompt = m.tokenizer.encode("A short test prompt about rivers").unwrap();
    let adapted = last_logits(&prompt, Some(&adapter));

    // our PEFT writer → our PEFT reader
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(&dir.path().join("a"), "SmolLM2-135M-Instruct").unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("a/adapter_config.json")).unwrap()).unwrap();
    for key in [
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
    ] {
        assert!(cfg.get(key).is_some(), "adapter_config.json lacks {key}");
    }
    let st = std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    assert!(meta.tensors().contains_key("base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"));
    let reloaded = LoraAdapter::load_peft(&dir.path().join("a"), &m.decoder.cfg, m.device()).unwrap();
    let again = last_logits(&prompt, Some(&reloaded));
    assert_eq!(adapted, again);

    // merged into the weights, saved as an HF folder, loaded back
    let mut merged = m.decoder.clone();
    adapter.merge_into(&mut merged).unwrap();
    let batch = Batch::causal(&prompt, 0, m.device(), merged.dtype()).unwrap();
    let merged_logits: Vec<f32> = merged.forward_last(&batch, None, None).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let diff = adapted.iter().zip(&merged_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "merged differs from adapted by {diff}");
    selfedit::runtime::formats::hf::save_hf(&merged, &m.tokenizer, &dir.path().join("merged")).unwrap();
    let mut loaded = selfedit::runtime::formats::load(&dir.path().join("merged"), &Device::Cpu).unwrap();
    // the same products as `merged` (a weight's kernel decides its last bits)
    loaded.decoder.set_compute_dtype(merged.compute_dtype()).unwrap();
    let l2: Vec<f32> = loaded.decoder.forward_last(&batch, None, None).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    assert_eq!(merged_logits, l2);
    assert_eq!(loaded.tokenizer.encode("Hello world 123").unwrap(), m.tokenizer.encode("Hello world 123").unwrap());
    assert_eq!(loaded.tokenizer.chat_template, m.tokenizer.chat_template);
}

/// The self-edit template schema of the paper (instruction + six hyperparameters).
fn template_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "data_creation_instruction": {"type": "string", "minLength": 1, "maxLength": 240},
            "hyperparameters": {
                "type": "object",
                "properties": {
                    "lora_rank": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "lora_alpha": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "lora_dropout": {"type": "number", "minimum": 0, "maximum": 100},
                    "learning_rate": {"type": "number", "minimum": 0, "maximum": 100},
                    "num_epochs": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "gradient_accumulation_steps": {"type": "integer", "minimum": 0, "maximum": 1000000}
                },
                "required": ["lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "num_epochs", "gradient_accumulation_steps"],
                "additionalProperties": false
            }
        },
        "required": ["data_creation_instruction", "hyperparameters"],
        "additionalProperties": false
    })
}

fn validates(schema: &Value, doc: &Value) -> Result<(), String> {
    // A small structural validator for the schemas used here (types, required, no extras).
    match schema["type"].as_str() {
        Some("object") => {
            let obj = doc.as_object().ok_or("not an object")?;
            let props = schema["properties"].as_object().unwrap();
            for r in schema["required"].as_array().unwrap() {
                if !obj.contains_key(r.as_str().unwrap()) {
                    return Err(format!("missing {r}"));
                }
            }
            for (k, v) in obj {
                let sub = props.get(k).ok_or(format!("unexpected key {k}"))?;
                validates(sub, v)?;
            }
            Ok(())
        }
        Some("array") => {
            let arr = doc.as_array().ok_or("not an array")?;
            if let Some(min) = schema["minItems"].as_u64() {
                if (arr.len() as u64) < min {
                    return Err("too few items".into());
                }
            }
            arr.iter().try_for_each(|x| validates(&schema["items"], x))
        }
        Some("string") => {
            let s = doc.as_str().ok_or("not a string")?;
            if let Some(min) = schema["minLength"].as_u64() {
                if (s.chars().count() as u64) < min {
                    return Err("string too short".into());
                }
            }
            Ok(())
        }
        // JSON Schema integers are numbers without a fractional part ("-0" and "1e3" count)
        Some("integer") => doc.as_f64().filter(|x| x.fract() == 0.0).map(|_| ()).ok_or_else(|| format!("not an integer: {doc}")),
        Some("number") => doc.as_f64().map(|_| ()).ok_or_else(|| format!("not a number: {doc}")),
        other => Err(format!("schema type {other:?}")),
    }
}

#[test]
fn constrained_generation_always_yields_valid_json() {
    use selfedit::runtime::generate::constraint::ConstraintFactory;
    use selfedit::runtime::generate::sampling::SamplingParams;
    use selfedit::runtime::generate::{generate, FinishReason, GenerationRequest};
    use selfedit::runtime::tokenizer::ChatMessage;
    let m = common::smollm();
    let factory = ConstraintFactory::new(&m.tokenizer).unwrap();
    let seq_schema = serde_json::json!({
        "type": "object",
        "properties": {"training_sequences": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 160}, "minItems": 1, "maxItems": 3}},
        "required": ["training_sequences"], "additionalProperties": false
    });
    let tmpl_prompt = m
        .tokenizer
        .encode_chat(&[ChatMessage::user("Write a learning plan as JSON: a data_creation_instruction and LoRA hyperparameters.")], true)
        .unwrap();
    let seq_prompt = m
        .tokenizer
        .encode_chat(
            &[ChatMessage::user("Passage: The Zorblat river flows north into Lake Quenn.\nWrite training sequences as JSON.")],
            true,
        )
        .unwrap();
    let mut requests = Vec::new();
    let mut schemas = Vec::new();
    for seed in 0..12u64 {
        for (params, name) in [(SamplingParams::paper_exploit(), "exploit"), (SamplingParams::paper_explore(), "explore")] {
            let (prompt, schema) = if seed % 2 == 0 { (&tmpl_prompt, template_schema()) } else { (&seq_prompt, seq_schema.clone()) };
            let mut r = GenerationRequest::new(prompt.clone(), params, seed, 400);
            r.constraint = Some(factory.json_schema(&schema).unwrap());
            requests.push(r);
            schemas.push((schema, name, seed));
        }
    }
    let outs = generate(m, &[], requests, 8, |_| {}).unwrap();
    for (out, (schema, name, seed)) in outs.iter().zip(&schemas) {
        assert_eq!(out.finish_reason, FinishReason::Eos, "{name} seed {seed} did not finish: {}", out.text);
        let doc: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{name} seed {seed}: {e}: {}", out.text));
        validates(schema, &doc).unwrap_or_else(|e| panic!("{name} seed {seed}: {e}: {}", out.text));
    }
}

#[test]
fn batched_generation_matches_one_by_one() {
    common::assert_batched_generation_matches_alone(common::smollm(), 12);
}

/// A made-up fact the model cannot know, learned into a rank-32 adapter.
#[test]
fn lora_training_teaches_a_made_up_fact() {
    use selfedit::runtime::lora::LoraConfig;
    use selfedit::runtime::training::{train_lora, TrainConfig, TrainExample};
    let m = common::smollm();
    let fact = "The capital of the island nation of Veltoria is Marzipane.";
    let prompt = "The capital of the island nation of Veltoria is";
    let greedy = |adapter: Option<&LoraAdapter>| {
        let mut ids = m.tokenizer.encode(prompt).unwrap();
        let n = ids.len();
        for _ in 0..6 {
            ids.push(argmax(&last_logits(&ids, adapter)));
        }
        m.tokenizer.decode(&ids[n..], true).unwrap()
    };
    assert!(!greedy(None).contains("Marzipane"));
    let mut adapter = LoraAdapter::new(&m.decoder.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, m.device()).unwrap();
    let lines: Vec<Vec<u32>> = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/veltoria_fact.txt"))
        .unwrap()
        .lines()
        .map(|l| m.tokenizer.encode(l).unwrap())
        .collect();
    let ids = m.tokenizer.encode(fact).unwrap();
    assert_eq!(lines[0], ids);
    let before = m.decoder.sequence_loss(&ids, 0, Some(&adapter)).unwrap().to_scalar::<f32>().unwrap();

    // every LoRA variable gets a non-zero gradient on the first step (B is zero at init, so
    // A's gradient is zero then; one step on B makes A's non-zero)
    let (_, grads) =
        selfedit::runtime::training::lora_gradients(&m.decoder, &adapter, &TrainExample { ids: ids.clone(), loss_from: 0 }).unwrap();
    let vars = adapter.vars();
    for (i, g) in grads.iter().enumerate() {
        let g = g.as_ref().unwrap_or_else(|| panic!("variable {i} got no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let is_b = vars[i].dims()[1] == 32 && vars[i].dims()[0] != 32;
        if is_b {
            assert!(norm > 0.0, "B variable {i} has a zero gradient");
        }
    }
    // SEAL's baseline hyperparameters: rank 32, alpha 64, lr 1e-3, 10 epochs, batch 1
    let examples: Vec<TrainExample> = lines.into_iter().map(|ids| TrainExample { ids, loss_from: 0 }).collect();
    let report = train_lora(&m.decoder, &mut adapter, &examples, &TrainConfig::new(1e-3, 10, 1, 0), |_, _, _| {}).unwrap();
    assert_eq!(report.steps, 30);
    assert!(report.step_losses.last().unwrap() < &report.step_losses[0]);
    let after = m.decoder.sequence_loss(&examples[0].ids, 0, Some(&adapter)).unwrap().to_scalar::<f32>().unwrap();
    assert!(after < before * 0.25, "loss {before} → {after}");
    let completion = greedy(Some(&adapter));
    assert!(completion.contains("Marzipane"), "adapted completion: {completion:?}");
    // after training, every variable (A included) has a non-zero gradient
    let (_, grads) = selfedit::runtime::training::lora_gradients(&m.decoder, &adapter, &examples[0]).unwrap();
    for (i, g) in grads.iter().enumerate() {
        let norm = g.as_ref().unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "variable {i} has a zero gradient after training");
    }
}

/// The LLM-judge grader: the model answers yes/no under a JSON constraint for each answer the
/// containment heuristic did not accept; every row records the judge as its grader.
#[test]
fn judge_grader_decides_unmatched_answers() {
    use selfedit::experiment::cli::StageContext;
    use selfedit::experiment::layout::Shard;
    use selfedit::experiment::stages::evaluate::{evaluate, EvalTarget, Judge};
    use selfedit::experiment::states::{GraderKind, Split};
    let m = common::smollm();
    let mut exp =
        selfedit::experiment::config::Experiment::load(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml"))
            .unwrap();
    exp.config.eval.grader = GraderKind::Judge;
    exp.config.prompts_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prompts");
    let passages =
        selfedit::experiment::data::load_passages(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo_passages.json"))
            .unwrap();
    let article = selfedit::experiment::tables::ArticleRow {
        article_id: "a000".into(),
        split: Split::Train,
        title: passages[0].title.clone(),
        context: passages[0].context.clone(),
        questions: passages[0].questions.clone(),
        source_index: 0,
    };
    let judge = Judge::new(m).unwrap();
    let targets = vec![EvalTarget { model_id: "base".into(), article_id: "a000".into(), adapter: None, repeats: 1 }];
    let out = tempfile::tempdir().unwrap();
    let ctx = StageContext::new(exp, out.path(), 0).unwrap();
    let rows = evaluate(&ctx, m, &[article], &targets, Some(&judge), Shard::ALL, |_| {}).unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.grader, GraderKind::Judge);
        if selfedit::experiment::grading::heuristic_verdict(ctx.exp.config.eval.heuristic, &r.prediction, &r.gold_answers) {
            assert!(r.correct, "the heuristic's acceptance is kept: {r:?}");
        }
    }
}

/// The paper's code appends the end-of-turn token to every training sequence of an instruct
/// model: on SmolLM2 that is `<|im_end|>`, taken from the model's own EOS, one token more.
#[test]
fn training_sequences_end_with_the_end_of_turn_token() {
    use selfedit::experiment::config::Experiment;
    use selfedit::experiment::stages::train::training_examples;
    let m = common::smollm();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
    let text = std::fs::read_to_string(root.join("data/veltoria_fact.txt")).unwrap();
    let texts = vec![text.trim().to_string()];
    let eot = m.tokenizer.inner.token_to_id("<|im_end|>").unwrap();
    assert_eq!(m.tokenizer.end_of_turn(), Some(eot));
    let with = training_examples(&exp.config, &m.tokenizer, &texts).unwrap();
    exp.config.training.end_of_turn = false;
    let bare = training_examples(&exp.config, &m.tokenizer, &texts).unwrap();
    assert_eq!(with[0].ids.len(), bare[0].ids.len() + 1);
    assert_eq!(*with[0].ids.last().unwrap(), eot);
    assert_eq!(&with[0].ids[..bare[0].ids.len()], bare[0].ids.as_slice());
}

/// Thinking mode on a tiny Qwen3-shaped model (random weights, SmolLM2's tokenizer) whose
/// chat template has Qwen3's `enable_thinking` switch: the prompt opens no empty think block,
/// the model writes its reasoning freely, and its answer is constrained to the template
/// schema from the first token after `</think>`.
#[test]
fn thinking_mode_reasons_freely_then_answers_under_the_schema() {
    use selfedit::experiment::cli::StageContext;
    use selfedit::experiment::config::Experiment;
    use selfedit::experiment::stages::templates::generate_templates;
    use selfedit::runtime::tokenizer::ChatMessage;
    let m = common::smollm();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config("qwen3");
    cfg.vocab_size = m.decoder.cfg.vocab_size;
    cfg.max_position_embeddings = 1024;
    common::write_tiny_checkpoint(dir.path(), &cfg, 3);
    std::fs::write(dir.path().join("tokenizer.json"), &m.tokenizer.json).unwrap();
    // Qwen3's switch: an empty think block unless thinking is enabled
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template}).to_string(),
    )
    .unwrap();
    let tiny = selfedit::runtime::formats::load(dir.path(), &Device::Cpu).unwrap();
    let msgs = [ChatMessage::user("hi")];
    assert!(tiny
        .tokenizer
        .apply_chat_template_with(&msgs, true, false)
        .unwrap()
        .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    assert!(tiny.tokenizer.apply_chat_template_with(&msgs, true, true).unwrap().ends_with("<|im_start|>assistant\n"));

    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut exp = Experiment::load(&root.join("configs/tiny.toml")).unwrap();
    exp.config.model.path = dir.path().to_path_buf();
    exp.config.prompts_dir = root.join("prompts");
    let s = &mut exp.config.search;
    (s.thinking, s.thinking_max_tokens, s.instruction_max_chars, s.template_max_new_tokens) = (true, 6, 12, 160);
    let out = tempfile::tempdir().unwrap();
    let ctx = StageContext::new(exp, out.path(), 0).unwrap();
    let rows = generate_templates(&ctx, &tiny, None, |_| {}).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let reasoning = r.reasoning.as_deref().expect("thinking mode records the reasoning");
        assert!(!reasoning.contains("</think>"), "{reasoning:?}");
        assert!(r.raw_response.starts_with("{\""), "the answer is constrained from its first token: {:?}", r.raw_response);
        assert!(r.prompt.len() > 100);
    }
    // the answers to the QA questions think too, and what is graded follows `</think>`
    {
        use selfedit::experiment::layout::Shard;
        use selfedit::experiment::stages::evaluate::{evaluate, qa_prompt, EvalTarget};
        use selfedit::experiment::states::Split;
        use selfedit::experiment::tables::{ArticleRow, Question};
        let on = qa_prompt(&ctx.prompts, &tiny, "What?", true).unwrap();
        let off = qa_prompt(&ctx.prompts, &tiny, "What?", false).unwrap();
        assert!(tiny.tokenizer.decode(&on, false).unwrap().ends_with("<|im_start|>assistant\n"));
        assert!(tiny.tokenizer.decode(&off, false).unwrap().ends_with("</think>\n\n"));
        let mut exp = ctx.exp.clone();
        (exp.config.eval.thinking, exp.config.eval.thinking_max_tokens, exp.config.eval.max_new_tokens) = (true, 4, 6);
        let ectx = StageContext::new(exp, out.path(), 0).unwrap();
        let article = ArticleRow {
            article_id: "a000".into(),
            split: Split::Train,
            title: "t".into(),
            context: "c".into(),
            questions: vec![Question { question: "What?".into(), answers: vec!["x".into()] }],
            source_index: 0,
        };
        let targets = vec![EvalTarget { model_id: "base".into(), article_id: "a000".into(), adapter: None, repeats: 1 }];
        let rows = evaluate(&ectx, &tiny, &[article], &targets, None, Shard::ALL, |_| {}).unwrap();
        assert_eq!(rows.len(), ectx.exp.config.eval.runs);
        assert!(rows.iter().all(|r| !r.prediction.contains("</think>")));
    }
    // without thinking the reasoning column stays empty
    let mut exp = ctx.exp.clone();
    exp.config.search.thinking = false;
    let ctx = StageContext::new(exp, out.path(), 0).unwrap();
    assert!(generate_templates(&ctx, &tiny, None, |_| {}).unwrap().iter().all(|r| r.reasoning.is_none()));
}

/// PEFT's adapter settings: `use_rslora` is applied (PEFT scales by alpha / sqrt(r): at r = 4
/// twice the plain update), and every other field that changes the update is refused by
/// name instead of silently misread.
#[test]
fn peft_rslora_is_applied_and_other_settings_are_refused_by_name() {
    let m = common::smollm();
    let src = common::data("peft_smollm2_r4");
    let dir = tempfile::tempdir().unwrap();
    let with = |field: &str, value: serde_json::Value| -> std::path::PathBuf {
        let d = dir.path().join(field);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
        d
    };
    let merged_delta = |adapter_dir: &std::path::Path| -> candle_core::Tensor {
        let a = LoraAdapter::load_peft(adapter_dir, &m.decoder.cfg, m.device()).unwrap();
        let mut d = m.decoder.clone();
        a.merge_into(&mut d).unwrap();
        (&d.layers[0].self_attn.q_proj.weight - &m.decoder.layers[0].self_attn.q_proj.weight).unwrap()
    };
    let plain = merged_delta(&src);
    let rs = merged_delta(&with("use_rslora", serde_json::json!(true)));
    let err = ((&rs - (&plain * 2.0).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()) as f64;
    let scale = plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!(
        scale > 0.0 && err <= 1e-3 * scale,
        "rsLoRA update is not twice the plain one (f32 rounding of W + dW allowed): {err} at {scale}"
    );
    // a saved rsLoRA adapter says so in its config
    let a = LoraAdapter::load_peft(&with("use_rslora", serde_json::json!(true)), &m.decoder.cfg, m.device()).unwrap();
    a.save_peft(&dir.path().join("saved"), "base").unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("saved/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["use_rslora"], true);
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("alpha_pattern", serde_json::json!({"v_proj": 16})),
        ("layers_to_transform", serde_json::json!([0, 1])),
        ("bias", serde_json::json!("lora_only")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("fan_in_fan_out", serde_json::json!(true)),
    ] {
        let e = match LoraAdapter::load_peft(&with(field, value), &m.decoder.cfg, m.device()) {
            Ok(_) => panic!("{field} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(field) && e.contains("adapter_config.json"), "{e}");
    }
}

//! Shared by the integration tests: the real SmolLM2 model, loaded once per test binary.

#![allow(dead_code)]

pub mod soak;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use selfedit::runtime::formats::LoadedModel;
use selfedit::runtime::model::{global_tensors, layer_tensors, ModelConfig, TensorKind};

/// The default model: `$SELFEDIT_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_path() -> PathBuf {
    std::env::var_os("SELFEDIT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// SmolLM2 as the stages run it: the default `model.compute_dtype` (f32) applied, so its
/// projections take the AVX-512 kernel where the CPU has it ([`selfedit::runtime::sgemm`]),
/// and the work split over the runtime's workers, which a stage's `main` starts
/// ([`selfedit::runtime::parallel::start_workers`]; `runtime::parallel`'s unit tests cover
/// the scoped threads used without them). On the device `$SELFEDIT_TEST_DEVICE` names
/// (`cuda:0` on a GPU build; the CPU when unset), where a GPU runs it in bf16.
pub fn smollm() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        // Another test of this process may have started them already.
        let _ = selfedit::runtime::parallel::start_workers(selfedit::runtime::blas::threads() - 1, selfedit::runtime::blas::worker_spin());
        let path = model_path();
        assert!(path.exists(), "{} is missing: run `make model` (make test does it for you)", path.display());
        let mut m = selfedit::runtime::formats::load(&path, &test_device()).expect("loading SmolLM2");
        m.decoder.set_compute_dtype(Default::default()).expect("the default compute dtype");
        m
    })
}

/// The device of [`smollm`]: `$SELFEDIT_TEST_DEVICE` (`cpu`, `cuda:N`), the CPU when unset.
pub fn test_device() -> Device {
    device_or("cpu").1
}

/// `$SELFEDIT_TEST_DEVICE` as written (`default` when unset) and the device it names: the
/// ignored GPU tests take `cuda:0` by default.
pub fn device_or(default: &str) -> (String, Device) {
    let spec = std::env::var("SELFEDIT_TEST_DEVICE").unwrap_or_else(|_| default.into());
    let dev = selfedit::runtime::device::parse_device(&spec).expect("SELFEDIT_TEST_DEVICE");
    (spec, dev)
}

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

pub fn tiny_config(model_type: &str) -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": model_type == "qwen3"
    }))
    .unwrap()
}

/// A word-level tokenizer over "w0".."w61" plus two specials.
pub fn tiny_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    vocab.insert("<|im_end|>".into(), 1.into());
    for i in 2..64 {
        vocab.insert(format!("w{}", i - 2), i.into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"}
    })
    .to_string()
}

pub fn write_tiny_checkpoint(dir: &Path, cfg: &ModelConfig, seed: u64) {
    let dev = Device::Cpu;
    let mut rng = seed;
    let mut randn = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((rng >> 33) as f32 / (1u64 << 31) as f32 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    // Names and shapes from the library's one table; the values from this file's own generator.
    let mut names = global_tensors(cfg);
    for i in 0..cfg.num_hidden_layers {
        names.extend(layer_tensors(cfg, i));
    }
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (name, shape, kind) in names {
        let v = match kind {
            TensorKind::Norm => (randn(&shape, 0.1) + 1.0).unwrap(),
            TensorKind::Bias => randn(&shape, 0.1),
            TensorKind::Matrix if name == "model.embed_tokens.weight" => randn(&shape, 0.5),
            TensorKind::Matrix => randn(&shape, 0.3),
        };
        t.insert(name, v);
    }
    std::fs::create_dir_all(dir).unwrap();
    // two shards with an index, as large checkpoints are stored
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let shard: HashMap<String, Tensor> = part.iter().map(|n| (n.clone(), t[n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string())
        .unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}).to_string(),
    )
    .unwrap();
}

/// A digest of a Parquet table's data, metadata aside: every cell as text (reals rounded to
/// 4 decimals, so a last-bit difference in summation order does not count), columns in
/// `skip` left out (times, absolute paths). Two runs that wrote the same tables give the
/// same digest.
pub fn table_digest(path: &Path, skip: &[&str]) -> String {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Float32Type, Float64Type};
    fn cell(a: &dyn Array, i: usize) -> String {
        if a.is_null(i) {
            return "null".into();
        }
        match a.data_type() {
            DataType::Float64 => format!("{:.4}", a.as_primitive::<Float64Type>().value(i)),
            DataType::Float32 => format!("{:.4}", a.as_primitive::<Float32Type>().value(i)),
            DataType::List(_) => {
                let v = a.as_list::<i32>().value(i);
                format!("[{}]", (0..v.len()).map(|j| cell(v.as_ref(), j)).collect::<Vec<_>>().join(","))
            }
            _ => arrow::util::display::ArrayFormatter::try_new(a, &Default::default()).unwrap().value(i).to_string(),
        }
    }
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut text = String::new();
    for batch in reader {
        let batch = batch.unwrap();
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            for (f, col) in schema.fields().iter().zip(batch.columns()) {
                if !skip.contains(&f.name().as_str()) {
                    text.push_str(&format!("{}={}\u{1f}", f.name(), cell(col.as_ref(), row)));
                }
            }
            text.push('\n');
        }
    }
    selfedit::util::hash::hash_bytes(text.as_bytes())
}

/// [`table_digest`] of the rows in any order: two runs that split the same work into other
/// shards write the same rows in another order.
pub fn table_digest_unordered(path: &Path, skip: &[&str]) -> String {
    use arrow::array::Array;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut rows: Vec<String> = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            let mut text = String::new();
            for (f, col) in schema.fields().iter().zip(batch.columns()) {
                if !skip.contains(&f.name().as_str()) {
                    let one = col.slice(row, 1);
                    text.push_str(&format!("{}={:?}\u{1f}", f.name(), rounded(one.as_ref())));
                }
            }
            rows.push(text);
        }
    }
    rows.sort();
    selfedit::util::hash::hash_bytes(rows.join("\n").as_bytes())
}

/// A one-row array as text, reals rounded to 4 decimals.
fn rounded(a: &dyn arrow::array::Array) -> String {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float32Type, Float64Type};
    if a.is_null(0) {
        return "null".into();
    }
    match a.data_type() {
        DataType::Float64 => format!("{:.4}", a.as_primitive::<Float64Type>().value(0)),
        DataType::Float32 => format!("{:.4}", a.as_primitive::<Float32Type>().value(0)),
        DataType::List(_) => {
            let v = a.as_list::<i32>().value(0);
            format!("[{}]", (0..v.len()).map(|j| rounded(v.slice(j, 1).as_ref())).collect::<Vec<_>>().join(","))
        }
        _ => arrow::util::display::ArrayFormatter::try_new(a, &Default::default()).unwrap().value(0).to_string(),
    }
}

/// The tables one iteration of the pipeline writes, relative to the experiment folder.
pub const ITER0_TABLES: [&str; 8] = [
    "articles.parquet",
    "iter0/templates.parquet",
    "iter0/self_edits.parquet",
    "iter0/adapters.parquet",
    "iter0/answers.parquet",
    "iter0/scores.parquet",
    "iter0/template_stats.parquet",
    "iter0/archive.parquet",
];

/// A batch of three prompts of different lengths, sampled with the paper's eval settings,
/// equals each prompt generated alone (`max_new` tokens each): rows do not depend on their
/// neighbours.
pub fn assert_batched_generation_matches_alone(m: &LoadedModel, max_new: usize) {
    use selfedit::runtime::generate::sampling::SamplingParams;
    use selfedit::runtime::generate::{generate, GenerationRequest};
    let prompts = ["The sky is", "Once upon a time in a small village far away, there lived", "2 + 2 ="];
    let make =
        |i: usize| GenerationRequest::new(m.tokenizer.encode(prompts[i]).unwrap(), SamplingParams::paper_eval(), 100 + i as u64, max_new);
    let batched = generate(m, &[], (0..3).map(make).collect(), 8, |_| {}).unwrap();
    for (i, b) in batched.iter().enumerate() {
        let single = generate(m, &[], vec![make(i)], 1, |_| {}).unwrap();
        assert_eq!(b.token_ids, single[0].token_ids, "prompt {i}");
    }
}

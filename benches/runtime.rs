//! `make bench`: the work of ../shared/bench/peer_bench.py (PyTorch + transformers + PEFT)
//! done by selfedit on the same SmolLM2 GGUF, printed as the same `RESULT <name> <value>
//! <unit>` lines, plus constrained, batched and long-sequence figures.
//!
//! Timed figures are medians of several runs; this machine is shared, so compare only runs
//! made back to back (the `foreign_cores_*` lines say how busy the other processes were).

#[path = "../stages/common/mod.rs"]
#[allow(dead_code)]
mod common;
#[path = "runtime/many.rs"]
mod many;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use selfedit::runtime::blas::ComputeDtype;
use selfedit::runtime::generate::sampling::{argmax, SamplingParams};
use selfedit::runtime::generate::{generate, GenerationRequest};
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::{Batch, KvCache};
use selfedit::runtime::tokenizer::ChatMessage;
use selfedit::runtime::training::{train_lora, TrainConfig, TrainExample};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 200)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    gen_runs: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    num_seqs: usize,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Skip the 1024-token training figure (the slowest).
    #[arg(long)]
    quick: bool,
    /// Skip the generation figures (as the peer's `--skip-gen`), for training comparisons.
    #[arg(long)]
    skip_gen: bool,
    /// Self-edits of the many-self-edits figure (alone and grouped); 0 skips it.
    #[arg(long, default_value_t = 16)]
    self_edits: usize,
    /// How many of them to train one at a time for the solo figure (the slow part).
    #[arg(long, default_value_t = 16)]
    solo_self_edits: usize,
    /// Group sizes (`training.adapters_per_batch`) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    group_sizes: Vec<usize>,
    /// Epochs of each self-edit (the paper: 10).
    #[arg(long, default_value_t = 10)]
    self_edit_epochs: usize,
    /// Rows per generation batch of the grouped evaluation (`eval.batch_size`). 128: a
    /// decoding step reads every frozen weight once whatever its rows, so on this CPU
    /// evaluation per self-edit costs 13% less at 128 rows than at the paper configs' 64
    /// (1.03-1.04 against 1.18-1.21 s) with the same peak RSS, and 256 rows no less than 128
    /// at +700 MiB.
    #[arg(long, default_value_t = 128)]
    eval_batch_size: usize,
    /// Only the many-self-edits figure.
    #[arg(long)]
    only_many: bool,
    /// Measure a random-weight model of SmolLM2's shape on this device instead of the GGUF
    /// (for machines without the model file, e.g. a GPU box): decode, batched decode, training.
    #[arg(long)]
    synthetic: bool,
    /// `cpu` or `cuda:N`: where the model (the GGUF, or the random weights of --synthetic)
    /// runs. On a GPU, only the many-self-edits figure (--only-many) reads the GGUF.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the frozen weights' products (`model.compute_dtype`): f32, or bf16 on
    /// Intel AMX.
    #[arg(long, default_value = "f32", value_parser = parse_compute_dtype)]
    compute_dtype: ComputeDtype,
    // `cargo bench` passes --bench; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

const PASSAGE: &str = "The Varnholt Observatory was built in 1887 on the northern ridge of Mount Elsby by the \
astronomer Margit Varnholt, who funded it with the fortune she made selling copper lenses. \
Its main instrument is a 61-centimetre refracting telescope, which for nine years was the \
largest in the region. In 1902 the observatory staff discovered the comet now called \
Varnholt-Ries, named after Margit and her assistant Tomas Ries. The building was damaged \
by a landslide in 1931 and rebuilt two years later with a copper dome. Today it is run by \
the University of Elsby and is open to visitors on the first Saturday of every month. ";

const IMPLICATIONS: [&str; 12] = [
    "The Varnholt Observatory is older than the University of Elsby's management of it.",
    "Margit Varnholt paid for the observatory with money from selling copper lenses.",
    "The observatory stands on the northern ridge of Mount Elsby.",
    "The largest instrument at the observatory is a 61-centimetre refracting telescope.",
    "For nine years no telescope in the region was larger than the one at Varnholt.",
    "The comet Varnholt-Ries was discovered in 1902 by the observatory staff.",
    "Tomas Ries was the assistant of Margit Varnholt.",
    "A landslide damaged the observatory in 1931.",
    "The observatory was rebuilt in 1933 and received a copper dome.",
    "Visitors can enter the observatory on the first Saturday of each month.",
    "Copper appears twice in the story: in the lenses and in the rebuilt dome.",
    "The comet carries the names of two people who worked at the observatory.",
];

fn training_text(repeat: usize) -> String {
    let mut s = String::new();
    for r in 0..repeat {
        s.push_str(PASSAGE);
        for (i, imp) in IMPLICATIONS.iter().enumerate() {
            s.push_str(&format!("Implication {}: {imp}\n", r * IMPLICATIONS.len() + i + 1));
        }
    }
    s
}

/// `--compute-dtype`, spelt as in a config (`model.compute_dtype`).
fn parse_compute_dtype(s: &str) -> Result<ComputeDtype, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

fn report(name: &str, value: f64, unit: &str) {
    println!("RESULT {name} {value:.4} {unit}");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time other processes took during a phase, in cores (from /proc/stat).
struct Foreign {
    wall: Instant,
    busy: f64,
    own: f64,
}

impl Foreign {
    fn busy_s() -> f64 {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        if v.len() < 7 {
            return 0.0;
        }
        (v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0.0)) / 100.0
    }
    fn own_s() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        // after the comm field: state is field 3, utime and stime are fields 14 and 15
        let f: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| f.get(i - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (field(14) + field(15)) / 100.0
    }
    fn new() -> Self {
        Self { wall: Instant::now(), busy: Self::busy_s(), own: Self::own_s() }
    }
    fn cores(&self) -> f64 {
        let dw = self.wall.elapsed().as_secs_f64();
        let other = (Self::busy_s() - self.busy) - (Self::own_s() - self.own);
        (other / dw).max(0.0)
    }
}

fn main() -> anyhow::Result<()> {
    // The stage binaries' process setup: freed memory stays with the process, candle's rayon
    // pool keeps to one thread beside OpenBLAS.
    common::init();
    let a = Args::parse();
    if let Some(name) = selfedit::runtime::blas::kernel_name() {
        println!("# OpenBLAS kernels: {name}");
    }
    if a.synthetic {
        return synthetic(&a);
    }
    let device = selfedit::runtime::device::parse_device(&a.device)?;
    anyhow::ensure!(device.is_cpu() || a.only_many, "--device {}: with the GGUF, a GPU runs only --only-many", a.device);
    let t0 = Instant::now();
    let mut m = selfedit::runtime::formats::load(&a.model, &device)?;
    m.decoder.set_compute_dtype(a.compute_dtype)?;
    println!("# compute dtype: {:?}", m.decoder.compute_dtype());
    report("load_s", t0.elapsed().as_secs_f64(), "s");
    report("rss_peak_after_load_mib", peak_rss_mib(), "MiB");
    let dec = &m.decoder;
    let tok = &m.tokenizer;
    if a.only_many {
        many::run(&m, a.self_edits, a.solo_self_edits, &a.group_sizes, a.self_edit_epochs, a.eval_batch_size)?;
        report("rss_peak_mib", peak_rss_mib(), "MiB");
        return Ok(());
    }

    // The peer's prompt: chat header, the user content cut to fit, the assistant header.
    let head = tok.apply_chat_template(&[ChatMessage::user("X")], true)?;
    let (pre, post) = head.split_once('X').unwrap();
    let (pre_ids, post_ids) = (tok.encode(pre)?, tok.encode(post)?);
    let content = tok.encode(&format!("Read the passage below and list everything it implies.\n\n{}", training_text(4)))?;
    let k = a.prompt_tokens - pre_ids.len() - post_ids.len();
    let prompt: Vec<u32> = pre_ids.iter().chain(&content[..k]).chain(&post_ids).copied().collect();

    if !a.skip_gen {
        // (a) greedy generation, batch 1, EOS ignored so exactly gen_tokens are produced
        let greedy = |n: usize| -> anyhow::Result<Vec<u32>> {
            let mut cache = KvCache::new(&dec.cfg, 1, prompt.len() + n, dec.dtype(), dec.device())?;
            let mut out = Vec::with_capacity(n);
            let mut next = prompt.clone();
            for _ in 0..n {
                let b = Batch::causal(&next, cache.len(), dec.device(), dec.dtype())?;
                let l: Vec<f32> = dec.forward_last(&b, Some(&mut cache), None)?.squeeze(0)?.to_vec1()?;
                let t = argmax(&l);
                out.push(t);
                next = vec![t];
            }
            Ok(out)
        };
        let fg = Foreign::new();
        let first = greedy(a.gen_tokens)?; // warm-up
        let mut gen_times = Vec::new();
        for _ in 0..a.gen_runs {
            let t = Instant::now();
            let again = greedy(a.gen_tokens)?;
            gen_times.push(t.elapsed().as_secs_f64());
            assert_eq!(again, first, "greedy output not deterministic");
        }
        let mut pre_times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let b = Batch::causal(&prompt, 0, dec.device(), dec.dtype())?;
            dec.forward_last(&b, None, None)?;
            pre_times.push(t.elapsed().as_secs_f64());
        }
        let (g, pf) = (median(gen_times), median(pre_times));
        report("foreign_cores_gen", fg.cores(), "cores");
        report("gen_seconds_median", g, "s");
        report("gen_tokens_per_s", a.gen_tokens as f64 / g, "tok/s");
        report("prefill_seconds_median", pf, "s");
        report("prefill_tokens_per_s", prompt.len() as f64 / pf, "tok/s");
        report("decode_tokens_per_s_est", (a.gen_tokens - 1) as f64 / (g - pf).max(1e-9), "tok/s");

        // (a2) batched sampling: 16 prompts (eval regime), tokens per second over the batch
        let fg = Foreign::new();
        let questions: Vec<Vec<u32>> = (0..16)
            .map(|i| tok.encode_chat(&[ChatMessage::user(format!("Question {i}: {}", IMPLICATIONS[i % 12]))], true))
            .collect::<anyhow::Result<_>>()?;
        let t = Instant::now();
        let reqs: Vec<GenerationRequest> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| GenerationRequest::new(q.clone(), SamplingParams::paper_eval(), i as u64, 64))
            .collect();
        let outs = generate(&m, &[], reqs, 16, |_| {})?;
        let n_tok: usize = outs.iter().map(|o| o.token_ids.len()).sum();
        report("foreign_cores_batched", fg.cores(), "cores");
        report("batched16_gen_tokens_per_s", n_tok as f64 / t.elapsed().as_secs_f64(), "tok/s");

        // (a3) JSON-constrained generation (a self-edit template), batch 1
        let factory = selfedit::runtime::generate::constraint::ConstraintFactory::new(tok)?;
        let schema = serde_json::json!({"type": "object", "properties": {
            "data_creation_instruction": {"type": "string"},
            "hyperparameters": {"type": "object", "properties": {"lora_rank": {"type": "integer"}, "learning_rate": {"type": "number"}},
                "required": ["lora_rank", "learning_rate"], "additionalProperties": false}},
            "required": ["data_creation_instruction", "hyperparameters"], "additionalProperties": false});
        let fg = Foreign::new();
        let mut rates = Vec::new();
        for seed in 0..3 {
            let mut r = GenerationRequest::new(
                tok.encode_chat(&[ChatMessage::user("Write a learning plan as JSON.")], true)?,
                SamplingParams::paper_exploit(),
                seed,
                a.gen_tokens,
            );
            r.constraint = Some(factory.json_schema(&schema)?);
            let t = Instant::now();
            let out = generate(&m, &[], vec![r], 1, |_| {})?;
            rates.push(out[0].token_ids.len() as f64 / t.elapsed().as_secs_f64());
        }
        report("foreign_cores_constrained", fg.cores(), "cores");
        report("constrained_gen_tokens_per_s", median(rates), "tok/s");
        report("rss_peak_after_gen_mib", peak_rss_mib(), "MiB");
    }

    // (b) LoRA training: r=32, alpha=64, q_proj+v_proj, lr 1e-3, batch 1
    let train_seqs = |n: usize, len: usize| -> anyhow::Result<Vec<TrainExample>> {
        let mut rep = 1;
        let ids = loop {
            let ids = tok.encode(&training_text(rep))?;
            if ids.len() >= n * len {
                break ids;
            }
            rep += 1;
        };
        Ok((0..n).map(|i| TrainExample { ids: ids[i * len..(i + 1) * len].to_vec(), loss_from: 0 }).collect())
    };
    let seqs = train_seqs(a.num_seqs, a.seq_len)?;
    let mut adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, dec.device())?;
    let loss_before: f32 =
        seqs.iter().map(|s| dec.sequence_loss(&s.ids, 0, Some(&adapter)).unwrap().to_scalar::<f32>().unwrap()).sum::<f32>()
            / seqs.len() as f32;
    report("lora_trainable_params", adapter.num_parameters() as f64, "");
    report("loss_before", loss_before as f64, "");
    let fg = Foreign::new();
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let cfg = TrainConfig { max_grad_norm: 0.0, ..TrainConfig::new(1e-3, a.epochs, 1, 0) };
    let rep = train_lora(dec, &mut adapter, &seqs, &cfg, |_, _, _| {
        step_times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
    })?;
    report("foreign_cores_train", fg.cores(), "cores");
    let loss_after: f32 =
        seqs.iter().map(|s| dec.sequence_loss(&s.ids, 0, Some(&adapter)).unwrap().to_scalar::<f32>().unwrap()).sum::<f32>()
            / seqs.len() as f32;
    report("train_steps", rep.steps as f64, "");
    report("train_tokens", rep.tokens as f64, "");
    report("train_seconds_total", rep.seconds, "s");
    report("train_tokens_per_s", rep.tokens as f64 / rep.seconds, "tok/s");
    report("train_step_seconds_median", median(step_times), "s");
    report("loss_after", loss_after as f64, "");
    report("rss_peak_after_train_mib", peak_rss_mib(), "MiB");

    // (b2) the generator's SFT shape: the loss on each sequence's last quarter only (the
    //      answer after its prompt), the same sequences, one epoch
    let sft: Vec<TrainExample> = seqs.iter().map(|s| TrainExample { ids: s.ids.clone(), loss_from: s.ids.len() * 3 / 4 }).collect();
    let mut adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, dec.device())?;
    let rep = train_lora(dec, &mut adapter, &sft, &TrainConfig { max_grad_norm: 0.0, ..TrainConfig::new(1e-3, 1, 1, 0) }, |_, _, _| {})?;
    report("sft_train_tokens_per_s", rep.tokens as f64 / rep.seconds, "tok/s");

    // (c) training at 1024-token sequences
    if !a.quick {
        let seqs = train_seqs(2, 1024)?;
        let mut adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, dec.device())?;
        let fg = Foreign::new();
        let rep = train_lora(dec, &mut adapter, &seqs, &TrainConfig::new(1e-3, 1, 1, 0), |_, _, _| {})?;
        report("foreign_cores_train1024", fg.cores(), "cores");
        report("train1024_tokens_per_s", rep.tokens as f64 / rep.seconds, "tok/s");
        report("rss_peak_after_train1024_mib", peak_rss_mib(), "MiB");
    }
    // (d) one self-edit with the paper's settings: ~10 sequences of ~60 tokens, rank 32,
    //     alpha 64, lr 1e-3, 10 epochs, batch 1; then 5 questions x 3 eval runs (batched)
    let seqs: Vec<TrainExample> = IMPLICATIONS[..10]
        .iter()
        .map(|s| {
            let text = format!("{s} This follows from the account of the Varnholt Observatory on Mount Elsby.");
            TrainExample { ids: tok.encode(&text).unwrap(), loss_from: 0 }
        })
        .collect();
    let mean_len = seqs.iter().map(|s| s.ids.len()).sum::<usize>() as f64 / seqs.len() as f64;
    let fg = Foreign::new();
    let t = Instant::now();
    let mut adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, dec.device())?;
    let rep = train_lora(dec, &mut adapter, &seqs, &TrainConfig::new(1e-3, 10, 1, 0), |_, _, _| {})?;
    let train_s = t.elapsed().as_secs_f64();
    let questions = [
        "When was the Varnholt Observatory built?",
        "Who funded the observatory?",
        "How large is its telescope?",
        "What comet did the staff discover?",
        "When is it open to visitors?",
    ];
    let mut reqs = Vec::new();
    for (qi, q) in questions.iter().enumerate() {
        let ids = tok.encode_chat(
            &[ChatMessage::system("You are an assistant to answer a question directly and concisely."), ChatMessage::user(*q)],
            true,
        )?;
        for run in 0..3 {
            reqs.push(GenerationRequest::new(ids.clone(), SamplingParams::paper_eval(), (qi * 3 + run) as u64, 32).with_adapter(0));
        }
    }
    let t2 = Instant::now();
    generate(&m, &[&adapter], reqs, 16, |_| {})?;
    let eval_s = t2.elapsed().as_secs_f64();
    report("foreign_cores_self_edit", fg.cores(), "cores");
    report("self_edit_mean_seq_tokens", mean_len, "tok");
    report("self_edit_train_steps", rep.steps as f64, "");
    report("self_edit_train_seconds", train_s, "s");
    report("self_edit_eval_seconds", eval_s, "s");
    report("self_edit_seconds", train_s + eval_s, "s");

    // (e) memory of one training step at the paper's maximum length, 2048 tokens
    if !a.quick {
        let seqs = train_seqs(1, 2048)?;
        let mut adapter = LoraAdapter::new(&dec.cfg, LoraConfig::paper(32, 64.0, 0.0), 0, dec.device())?;
        let rep = train_lora(dec, &mut adapter, &seqs, &TrainConfig::new(1e-3, 1, 1, 0), |_, _, _| {})?;
        report("train2048_step_seconds", rep.seconds, "s");
        report("rss_peak_after_train2048_mib", peak_rss_mib(), "MiB");
    }
    // (f) many self-edits, alone and grouped
    if a.self_edits > 0 {
        many::run(&m, a.self_edits, a.solo_self_edits, &a.group_sizes, a.self_edit_epochs, a.eval_batch_size)?;
    }
    report("rss_peak_mib", peak_rss_mib(), "MiB");
    Ok(())
}

/// The same figures for random weights of SmolLM2-135M's shape on any device.
fn synthetic(a: &Args) -> anyhow::Result<()> {
    use selfedit::runtime::device::{default_dtype, parse_device};
    use selfedit::runtime::formats::decoder_from_tensors;
    use selfedit::runtime::model::random_weights;
    let device = parse_device(&a.device)?;
    let dtype = default_dtype(&device);
    let cfg: selfedit::runtime::model::ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": true}))?;
    let t0 = Instant::now();
    let dec = decoder_from_tensors(&cfg, random_weights(&cfg, 0, &device, dtype)?, &device)?;
    report("synthetic_build_s", t0.elapsed().as_secs_f64(), "s");
    let sync = |t: &candle_core::Tensor| -> anyhow::Result<()> {
        t.to_device(&Device::Cpu)?;
        Ok(())
    };
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32).map(|i| (i * 7919) % 49152).collect();
    // prefill
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let b = Batch::causal(&prompt, 0, &device, dtype)?;
        sync(&dec.forward_last(&b, None, None)?)?;
        times.push(t.elapsed().as_secs_f64());
    }
    report("prefill_tokens_per_s", prompt.len() as f64 / median(times), "tok/s");
    // greedy decode, batch 1 and batch 16
    for batch in [1usize, 16] {
        let t = Instant::now();
        let mut cache = KvCache::new(&cfg, batch, prompt.len() + a.gen_tokens, dtype, &device)?;
        let ids: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
        let pos: Vec<u32> = (0..batch).flat_map(|_| 0..prompt.len() as u32).collect();
        let mut b = Batch {
            ids: candle_core::Tensor::from_vec(ids, (batch, prompt.len()), &device)?,
            positions: candle_core::Tensor::from_vec(pos, (batch, prompt.len()), &device)?,
            mask: Some(selfedit::runtime::model::causal_mask(batch, prompt.len(), 0, &vec![0; batch], &device, dtype)?),
            segments: None,
        };
        for step in 0..a.gen_tokens {
            let logits = dec.forward_last(&b, Some(&mut cache), None)?;
            let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
            let p = (prompt.len() + step) as u32;
            b = Batch {
                ids: candle_core::Tensor::from_vec(next, (batch, 1), &device)?,
                positions: candle_core::Tensor::from_vec(vec![p; batch], (batch, 1), &device)?,
                mask: None,
                segments: None,
            };
        }
        let name = if batch == 1 { "gen_tokens_per_s".to_string() } else { format!("batched{batch}_gen_tokens_per_s") };
        report(&name, (batch * a.gen_tokens) as f64 / t.elapsed().as_secs_f64(), "tok/s");
    }
    // LoRA training: 8 x 128 tokens, 2 epochs; then one 2048-token sequence
    for (n, len, epochs, name) in [(a.num_seqs, a.seq_len, a.epochs, "train_tokens_per_s"), (2, 2048, 1, "train2048_tokens_per_s")] {
        let seqs: Vec<TrainExample> = (0..n)
            .map(|i| TrainExample { ids: (0..len as u32).map(|j| (j * 31 + i as u32 * 101) % 49152).collect(), loss_from: 0 })
            .collect();
        let mut adapter = LoraAdapter::new(&cfg, LoraConfig::paper(32, 64.0, 0.0), 0, &device)?;
        let rep = train_lora(&dec, &mut adapter, &seqs, &TrainConfig::new(1e-3, epochs, 1, 0), |_, _, _| {})?;
        report(name, rep.tokens as f64 / rep.seconds, "tok/s");
        report(&format!("{name}_final_loss"), *rep.step_losses.last().unwrap() as f64, "");
    }
    report("rss_peak_mib", peak_rss_mib(), "MiB");
    Ok(())
}

//! (f) Many self-edits at the paper's settings, one at a time and grouped: the amortized cost
//! of one self-edit (training plus its share of evaluation), training throughput against the
//! machine's own fp32 matmul peak, and the group's memory.

use std::time::Instant;

use selfedit::runtime::formats::LoadedModel;
use selfedit::runtime::generate::{generate, GenerationRequest, SamplingParams};
use selfedit::runtime::lora::{LoraAdapter, LoraConfig};
use selfedit::runtime::model::Adapter;
use selfedit::runtime::tokenizer::ChatMessage;
use selfedit::runtime::training::{longest_first, train_group, train_lora, GroupLimits, TrainConfig, TrainExample, TrainJob};

use super::{median, peak_rss_mib, report, Foreign, IMPLICATIONS};

const QUESTIONS: [&str; 5] = [
    "When was the Varnholt Observatory built?",
    "Who funded the observatory?",
    "How large is its telescope?",
    "What comet did the staff discover?",
    "When is it open to visitors?",
];

/// LoRA rank of self-edit `k`: `RANKS[k % 4]`, alpha twice the rank (so a scale of 2).
const RANKS: [usize; 4] = [16, 32, 32, 64];

/// Self-edit `k`: 8-12 sequences of ~25-60 tokens; rank 16/32/64, learning rate and
/// accumulation varied, `epochs` epochs (the paper's 10 by default).
fn self_edit(m: &LoadedModel, k: usize, epochs: usize) -> anyhow::Result<TrainJob<usize>> {
    let examples = (0..8 + k % 5)
        .map(|j| {
            let s = IMPLICATIONS[(k + j) % 12];
            let text = if (j + k).is_multiple_of(3) {
                format!("{s} {}", IMPLICATIONS[(k + j + 5) % 12])
            } else {
                format!("{s} This follows from the account of the Varnholt Observatory.")
            };
            Ok(TrainExample { ids: m.tokenizer.encode(&text)?, loss_from: 0 })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rank = RANKS[k % 4];
    let lora = LoraConfig::paper(rank, 2.0 * rank as f64, 0.0);
    let adapter = LoraAdapter::new(&m.decoder.cfg, lora, k as u64, m.device())?;
    let config = TrainConfig::new([1e-3, 5e-4, 2e-3][k % 3], epochs, 1 + k % 2, k as u64);
    Ok(TrainJob { key: k, adapter, examples, config })
}

/// Mean positions a training pass runs per sequence of the `n` self-edits: its tokens but
/// the last, which has no target (see `Decoder::sequence_loss`).
fn mean_sequence_positions(m: &LoadedModel, n: usize, epochs: usize) -> anyhow::Result<f64> {
    let (mut positions, mut count) = (0, 0);
    for k in 0..n {
        for e in self_edit(m, k, epochs)?.examples {
            positions += selfedit::runtime::model::loss_positions(e.ids.len());
            count += 1;
        }
    }
    Ok(positions as f64 / count as f64)
}

/// The evaluation of one self-edit: 5 questions × 3 runs with the paper's sampling.
fn eval_requests(m: &LoadedModel, adapter: usize) -> anyhow::Result<Vec<GenerationRequest>> {
    let mut out = Vec::new();
    for (qi, q) in QUESTIONS.iter().enumerate() {
        let ids = m.tokenizer.encode_chat(
            &[ChatMessage::system("You are an assistant to answer a question directly and concisely."), ChatMessage::user(*q)],
            true,
        )?;
        for run in 0..3 {
            out.push(GenerationRequest::new(ids.clone(), SamplingParams::paper_eval(), (qi * 3 + run) as u64, 32).with_adapter(adapter));
        }
    }
    Ok(out)
}

/// GFLOP/s of `product` of two random 1024 × 1024 matrices `(a, b)`, median of 7.
fn peak_1024(product: impl Fn(&candle_core::Tensor, &candle_core::Tensor) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        product(&a, &b)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * 1024f64.powi(3) / median(times) / 1e9)
}

/// The matmul peak of the model's device, GFLOP/s: on the CPU the fp32 peak (a 1024³ sgemm
/// through the same OpenBLAS), on a GPU the bf16 peak of the dtype the model runs in there (an
/// 8192³ product through cuBLAS, median of 7 after 3 warm-ups, each waited for).
fn matmul_peak_gflops(dev: &candle_core::Device) -> anyhow::Result<f64> {
    if !dev.is_cpu() {
        let n = 8192;
        let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(candle_core::DType::BF16)?;
        let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(candle_core::DType::BF16)?;
        let mut times = Vec::new();
        for i in 0..10 {
            dev.synchronize()?;
            let t = Instant::now();
            drop(a.matmul(&b)?);
            dev.synchronize()?;
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        return Ok(2.0 * (n as f64).powi(3) / median(times) / 1e9);
    }
    peak_1024(sgemm)
}

/// `a bᵀ` through OpenBLAS (candle's matmul in a build without it), the result dropped.
fn sgemm(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<()> {
    match selfedit::runtime::blas::matmul_nt(a, b) {
        Some(c) => drop(c?),
        None => drop(a.matmul(&b.t()?)?),
    }
    Ok(())
}

/// The fp32 matmul peak read again and again while a run goes on (on the CPU; on a GPU it
/// reads nothing): the same 1024³ sgemm as [`matmul_peak_gflops`], a reading the fastest of 3
/// products (~20 ms: the first may wait for OpenBLAS's threads to wake).
///
/// Why: this VM's speed drifts by up to 2x within minutes (the peak read 228 and then 431
/// GFLOP/s three minutes later in one run), so readings before and after a phase of minutes
/// may both miss the speed it ran at. The median of readings taken during it is a second
/// denominator for its fraction of the peak, and the solo and grouped phases' medians show
/// when a grouped ÷ solo ratio compares phases run at different speeds. (They do not correct
/// the ratio: scaled by them, three runs' ratios spread wider, 0.55-0.78 against 0.53-0.67.)
struct PeakSampler {
    ab: Option<(candle_core::Tensor, candle_core::Tensor)>,
    readings: Vec<f64>,
    /// Seconds spent reading, all readings together (for the caller to take out of its timings).
    seconds: f64,
}

impl PeakSampler {
    fn new(dev: &candle_core::Device) -> anyhow::Result<Self> {
        let ab = if dev.is_cpu() {
            let cpu = candle_core::Device::Cpu;
            let rand = || candle_core::Tensor::randn(0f32, 1.0, (1024, 1024), &cpu);
            Some((rand()?, rand()?))
        } else {
            None
        };
        Ok(Self { ab, readings: Vec::new(), seconds: 0.0 })
    }

    /// Takes one reading; returns the seconds it took.
    fn sample(&mut self) -> anyhow::Result<f64> {
        let Some((a, b)) = &self.ab else { return Ok(0.0) };
        let started = Instant::now();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            sgemm(a, b)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        self.readings.push(2.0 * 1024f64.powi(3) / best / 1e9);
        let took = started.elapsed().as_secs_f64();
        self.seconds += took;
        Ok(took)
    }

    /// The median reading since the last [`Self::take`], GFLOP/s, and forgets them (`None`
    /// without readings).
    fn take(&mut self) -> Option<f64> {
        let readings = std::mem::take(&mut self.readings);
        (!readings.is_empty()).then(|| median(readings))
    }
}

/// bf16 matmul peak of this machine on the AMX path: a 1024³ product of a packed weight,
/// GFLOP/s, with the per-call rounding of the input included (the packing is not timed).
fn amx_peak_gflops() -> anyhow::Result<f64> {
    let dev = candle_core::Device::Cpu;
    let w = selfedit::runtime::blas::PackedWeight::new(
        &candle_core::Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?,
        selfedit::runtime::blas::ComputeDtype::Bf16,
    )?;
    peak_1024(|a, _| {
        w.matmul_nt(a)?;
        Ok(())
    })
}

/// The frozen-weight products of one packed pass of `rows` tokens: every projection (and the
/// LM head if `lm_head`), forward `x @ W^T` and input gradient `g @ W`, run back to back
/// through the path training takes (the f32 kernel or OpenBLAS in f32, the AMX tiles in bf16) and nothing
/// else: (median seconds, FLOPs).
fn frozen_products(m: &LoadedModel, rows: usize, lm_head: bool) -> anyhow::Result<(f64, f64)> {
    use selfedit::runtime::blas::PackedWeight;
    let dec = &m.decoder;
    let mut weights: Vec<(&candle_core::Tensor, Option<&PackedWeight>)> = Vec::new();
    for layer in 0..dec.cfg.num_hidden_layers {
        for proj in selfedit::runtime::model::Proj::ALL {
            let lin = dec.linear(layer, proj);
            weights.push((&lin.weight, lin.packed.as_deref()));
        }
    }
    if lm_head {
        weights.push((&dec.lm_head, dec.lm_head_packed.as_deref()));
    }
    // inputs made before the clock starts: one `x` [rows, k] and `g` [rows, n] per weight
    let dev = candle_core::Device::Cpu;
    let inputs = weights
        .iter()
        .map(|(w, _)| {
            let (n, k) = w.dims2()?;
            Ok((candle_core::Tensor::randn(0f32, 1.0, (rows, k), &dev)?, candle_core::Tensor::randn(0f32, 1.0, (rows, n), &dev)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let flops: f64 = weights.iter().map(|(w, _)| 4.0 * (rows * w.elem_count()) as f64).sum();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for ((w, packed), (x, g)) in weights.iter().zip(&inputs) {
            if let Some(p) = packed {
                drop((p.matmul_nt(x)?, p.matmul_nn(g)?));
                continue;
            }
            let (Some(y), Some(dx)) = (selfedit::runtime::blas::matmul_nt(x, w), selfedit::runtime::blas::matmul_nn(g, w)) else {
                anyhow::bail!("the BLAS path does not apply (built without openblas?)");
            };
            drop((y?, dx?));
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), flops))
}

/// The ceiling grouped training can reach on this machine: [`frozen_products`] of every
/// frozen weight, GFLOP/s. Everything else a pass does (norms, attention, low-rank updates,
/// the loss) only adds time, so training cannot beat this figure.
fn frozen_gemm_gflops(m: &LoadedModel, rows: usize) -> anyhow::Result<f64> {
    let (seconds, flops) = frozen_products(m, rows, true)?;
    Ok(flops / seconds / 1e9)
}

/// Where one packed training pass of `segments` sequences of `len` tokens spends its time,
/// each part timed alone at that shape (median of 5, forward and backward):
/// (frozen projections' products, LM head with the loss, attention of every layer from the
/// projections' outputs with the rotary embedding, as the pass runs it, the
/// low-rank updates of q and v at the bench's ranks in every layer), seconds. Attention runs
/// through its public autograd op with a fixed output gradient, so its figure also holds the
/// graph's bookkeeping and that product and sum (a few percent); the low-rank updates run
/// forward and backward as a pass runs them ([`ops::segmented_low_rank_pass`]; until the
/// seventeenth session through their autograd op, whose concatenations made the figure ~4x).
fn pass_parts(m: &LoadedModel, segments: usize, len: usize) -> anyhow::Result<(f64, f64, f64, f64)> {
    use candle_core::{Tensor, Var};
    use selfedit::runtime::{model::causal_mask, ops};
    let dec = &m.decoder;
    let dev = candle_core::Device::Cpu;
    let rows = segments * len;
    let (projections, _) = frozen_products(m, rows, false)?;
    // the LM head and the cross-entropy of every position
    let h = Var::randn(0f32, 1.0, (rows, dec.cfg.hidden_size), &dev)?;
    let targets: Vec<Vec<Option<u32>>> =
        (0..segments).map(|s| (0..len).map(|i| Some(((s * 131 + i * 17) % dec.cfg.vocab_size) as u32)).collect()).collect();
    let targets: Vec<&[Option<u32>]> = targets.iter().map(|t| t.as_slice()).collect();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let loss = ops::lm_head_cross_entropy_packed(h.as_tensor(), &dec.lm_head, dec.lm_head_packed.as_ref(), &targets)?;
        drop(loss.sum_all()?.backward()?);
        times.push(t.elapsed().as_secs_f64());
    }
    let lm_head = median(times);
    // attention of every layer as a training pass runs it: from the projections' outputs, the
    // rotary embedding included, each segment under its causal mask
    let (heads, kv, d) = (dec.cfg.num_attention_heads, dec.cfg.kv_heads(), dec.cfg.head_dim());
    let spans: Vec<(usize, usize)> = (0..segments).map(|s| (s * len, len)).collect();
    let mask = causal_mask(1, len, 0, &[0], &dev, candle_core::DType::F32)?;
    let masks = vec![Some(mask); segments];
    let q = Var::randn(0f32, 1.0, (rows, heads * d), &dev)?;
    let k = Var::randn(0f32, 1.0, (rows, kv * d), &dev)?;
    let v = Var::randn(0f32, 1.0, (rows, kv * d), &dev)?;
    let g = Tensor::randn(0f32, 1.0, (rows, heads * d), &dev)?;
    let angles = Tensor::rand(0f32, std::f32::consts::TAU, (1, rows, d / 2), &dev)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..dec.cfg.num_hidden_layers {
            let (qkv, rotary) = ((q.as_tensor(), k.as_tensor(), v.as_tensor()), (&cos, &sin));
            let y = ops::segmented_rope_attention(qkv.0, qkv.1, qkv.2, rotary, (heads, kv, d), &spans, &masks)?;
            drop((y * &g)?.sum_all()?.backward()?);
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let attention = median(times);
    // the low-rank updates of q and v, segment s at the rank of [`self_edit`] s
    let (hidden, q_out, v_out) = (dec.cfg.hidden_size, heads * d, kv * d);
    let h = Var::randn(0f32, 1.0, (rows, hidden), &dev)?;
    let factors = |out: usize| -> anyhow::Result<Vec<ops::LowRankSegment>> {
        (0..segments)
            .map(|s| {
                let r = RANKS[s % 4];
                let a = Var::randn(0f32, 0.1, (r, hidden), &dev)?.as_tensor().clone();
                let b = Var::randn(0f32, 0.1, (out, r), &dev)?.as_tensor().clone();
                Ok(ops::LowRankSegment { len, factors: Some((a, b)), scale: 2.0 })
            })
            .collect()
    };
    let (q_seg, v_seg) = (factors(q_out)?, factors(v_out)?);
    let (gq, gv) = (Tensor::randn(0f32, 1.0, (rows, q_out), &dev)?, Tensor::randn(0f32, 1.0, (rows, v_out), &dev)?);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..dec.cfg.num_hidden_layers {
            drop(ops::segmented_low_rank_pass(h.as_tensor(), &q_seg, &gq)?);
            drop(ops::segmented_low_rank_pass(h.as_tensor(), &v_seg, &gv)?);
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((projections, lm_head, attention, median(times)))
}

/// FLOPs of one training token through the frozen weights: forward plus input gradients of
/// every projection and the (tied) LM head; attention scores and the low-rank updates are
/// left out (a few percent at these lengths).
fn train_flops_per_token(m: &LoadedModel) -> f64 {
    let c = &m.decoder.cfg;
    let (h, d) = (c.hidden_size, c.head_dim());
    let attn = h * c.num_attention_heads * d * 2 + h * c.kv_heads() * d * 2;
    let mlp = 3 * h * c.intermediate_size;
    let per_token = c.num_hidden_layers * (attn + mlp) + c.vocab_size * h;
    4.0 * per_token as f64
}

pub fn run(m: &LoadedModel, n: usize, solo_n: usize, group_sizes: &[usize], epochs: usize, eval_batch: usize) -> anyhow::Result<()> {
    let dev = m.device().clone();
    let peak = matmul_peak_gflops(&dev)?;
    report(if dev.is_cpu() { "matmul_peak_gflops" } else { "device_bf16_matmul_peak_gflops" }, peak, "GFLOP/s");
    if m.decoder.compute_dtype() == selfedit::runtime::blas::ComputeDtype::Bf16 {
        report("amx_bf16_peak_gflops", amx_peak_gflops()?, "GFLOP/s");
    }
    let flops = train_flops_per_token(m);
    report("train_gflop_per_token", flops / 1e9, "GFLOP");
    report("self_edits", n as f64, "");

    // 1. one at a time, as the paper's code: train, then its 15 answers in one batch; the
    //    peak read after each (untimed)
    let mut sampler = PeakSampler::new(&dev)?;
    let fg = Foreign::new();
    // tokens as Hugging Face counts them (the sequences'), positions as the passes run them
    // (each sequence's tokens but the last): tokens/s is compared with the peer's, GFLOP/s
    // with the peak
    let (mut train_s, mut eval_s, mut tokens, mut positions) = (0.0, 0.0, 0usize, 0usize);
    for k in 0..solo_n.min(n) {
        let mut job = self_edit(m, k, epochs)?;
        let t = Instant::now();
        let rep = train_lora(&m.decoder, &mut job.adapter, &job.examples, &job.config, |_, _, _| {})?;
        train_s += t.elapsed().as_secs_f64();
        sampler.sample()?;
        tokens += rep.tokens;
        positions += rep.tokens - rep.sequences;
        let t = Instant::now();
        generate(m, &[&job.adapter], eval_requests(m, 0)?, 16, |_| {})?;
        eval_s += t.elapsed().as_secs_f64();
        sampler.sample()?;
    }
    let solo_peak = sampler.take();
    let solo = solo_n.min(n).max(1) as f64;
    // (none with --solo-self-edits 0: only the grouped figures)
    if solo_n > 0 {
        report("foreign_cores_solo", fg.cores(), "cores");
        report("solo_train_tokens_per_s", tokens as f64 / train_s, "tok/s");
        report("solo_train_gflops", positions as f64 * flops / train_s / 1e9, "GFLOP/s");
        report("self_edit_train_seconds_solo", train_s / solo, "s");
        report("self_edit_eval_seconds_solo", eval_s / solo, "s");
        report("self_edit_seconds_solo", (train_s + eval_s) / solo, "s");
        if let Some(p) = solo_peak {
            report("matmul_peak_gflops_during_solo", p, "GFLOP/s");
        }
    }

    // 2. grouped: all self-edits through one group, then all their answers in shared batches
    let len = mean_sequence_positions(m, n, epochs)?;
    // longest first, as `train-adapters` hands its jobs over (each job built again when its
    // slot frees up, so that only the adapters in flight count in the peak RSS)
    let mut order = (0..n).map(|k| Ok((k, self_edit(m, k, epochs)?.passes()))).collect::<anyhow::Result<Vec<_>>>()?;
    longest_first(&mut order, |&(_, passes)| passes);
    let mut passes = Vec::new();
    for &g in group_sizes {
        let fg = Foreign::new();
        let rss_before = peak_rss_mib();
        let mut trained: Vec<Option<LoraAdapter>> = (0..n).map(|_| None).collect();
        // the peak read as each adapter finishes, its seconds taken out of the group's. With no
        // more self-edits than slots (the paper's settings here: 16 in groups of 16) every
        // reading falls in the group's drain, the last third of its passes for this mix of 8-12
        // sequences. While jobs are left to start, the slots were all taken in that iteration:
        // the reading is the steady state's, and its seconds come out of `full.seconds` too.
        // Once the last job has started, a reading counts as the drain's (at most the readings
        // of that one iteration, ~20 ms each, fall on the wrong side).
        let (started, mut sampled_full, mut full_readings) = (std::cell::Cell::new(0), 0.0, Vec::new());
        let jobs = order.iter().map(|&(k, _)| {
            started.set(started.get() + 1);
            self_edit(m, k, epochs).expect("self-edit")
        });
        sampler.seconds = 0.0;
        let mut rep = train_group(&m.decoder, jobs, GroupLimits::adapters(g), |k, r| {
            trained[k] = Some(r?.0);
            let took = sampler.sample()?;
            if started.get() < n {
                sampled_full += took;
                full_readings.extend(sampler.readings.last().copied());
            }
            Ok(())
        })?;
        rep.seconds -= sampler.seconds;
        rep.full.seconds -= sampled_full;
        let adapters: Vec<&dyn Adapter> = trained.iter().map(|a| a.as_ref().unwrap() as &dyn Adapter).collect();
        let requests: Vec<GenerationRequest> =
            (0..n).map(|k| eval_requests(m, k)).collect::<anyhow::Result<Vec<_>>>()?.into_iter().flatten().collect();
        let t = Instant::now();
        generate(m, &adapters, requests, eval_batch, |_| {})?;
        let eval = t.elapsed().as_secs_f64();
        sampler.sample()?;
        let group_peak = sampler.take();
        let name = |s: &str| format!("{s}_group{g}");
        report(&name("foreign_cores"), fg.cores(), "cores");
        report(&name("grouped_train_tokens_per_s"), rep.tokens as f64 / rep.seconds, "tok/s");
        let positions = (rep.tokens - rep.sequences) as f64;
        report(&name("grouped_train_gflops"), positions * flops / rep.seconds / 1e9, "GFLOP/s");
        // the peak again, right after the group: this VM's speed drifts by 20-25% within
        // minutes, and the fraction is taken of the faster of the two readings (so a slow
        // spell at the start cannot flatter it)
        let peak_after = matmul_peak_gflops(&dev)?;
        report(&name("matmul_peak_gflops_after"), peak_after, "GFLOP/s");
        let best_peak = peak.max(peak_after);
        report(&name("grouped_train_fraction_of_peak"), positions * flops / rep.seconds / 1e9 / best_peak, "");
        if let Some(p) = group_peak {
            report(&name("matmul_peak_gflops_during"), p, "GFLOP/s");
            report(&name("grouped_train_fraction_of_peak_during"), positions * flops / rep.seconds / 1e9 / p, "");
        }
        report(&name("self_edit_train_seconds_grouped"), rep.seconds / n as f64, "s");
        report(&name("self_edit_eval_seconds_grouped"), eval / n as f64, "s");
        report(&name("self_edit_seconds_grouped"), (rep.seconds + eval) / n as f64, "s");
        // the same at the group's steady state (the passes with the group as large as its
        // limits allow), as in a stage of hundreds of self-edits, where the drain of its last
        // adapters is a small part: the run's tokens at the full passes' seconds per token
        let full = rep.full;
        report(&name("full_group_passes"), full.passes as f64 / rep.passes as f64, "of passes");
        // no full pass when the group never fills (fewer self-edits than slots)
        let steady_train = (full.tokens > 0).then(|| rep.tokens as f64 * full.seconds / full.tokens as f64);
        if let Some(steady_train) = steady_train {
            report(&name("grouped_train_tokens_per_s_steady"), full.tokens as f64 / full.seconds, "tok/s");
            report(&name("self_edit_train_seconds_grouped_steady"), steady_train / n as f64, "s");
            report(&name("self_edit_seconds_grouped_steady"), (steady_train + eval) / n as f64, "s");
            let full_positions = (full.tokens - full.sequences) as f64;
            report(&name("grouped_train_fraction_of_peak_steady"), full_positions * flops / full.seconds / 1e9 / best_peak, "");
            // against the readings taken in the steady state only (none unless the group refilled)
            if !full_readings.is_empty() {
                let p = median(full_readings);
                report(&name("matmul_peak_gflops_during_steady"), p, "GFLOP/s");
                report(&name("grouped_train_fraction_of_peak_steady_during"), full_positions * flops / full.seconds / 1e9 / p, "");
            }
        }
        // grouped against alone for the same work: the solo self-edits are the first
        // `solo_n`, whose sequences need not average those of all `n` (the first 4 carry ~4%
        // fewer tokens than the mix of 16 or 64), so solo training is taken at its seconds per
        // token times the grouped self-edits' mean tokens; evaluation is 15 requests either way
        if solo_n > 0 {
            let solo_same_tokens = train_s / tokens as f64 * rep.tokens as f64 / n as f64 + eval_s / solo;
            report(&name("self_edit_seconds_solo_same_tokens"), solo_same_tokens, "s");
            report(&name("self_edit_grouped_over_solo"), (rep.seconds + eval) / n as f64 / solo_same_tokens, "");
            if let Some(steady_train) = steady_train {
                report(&name("self_edit_grouped_over_solo_steady"), (steady_train + eval) / n as f64 / solo_same_tokens, "");
            }
        }
        report(&name("rss_peak_grouped_mib"), peak_rss_mib().max(rss_before), "MiB");
        // what `training.group_memory_mib` is compared with, beside the measured peak above
        report(&name("group_memory_estimate_mib"), rep.max_memory_estimate as f64 / (1u64 << 20) as f64, "MiB");
        // where the training time went: the passes' phases, then one mean pass's parts
        // (frozen projections, LM head, attention, low-rank updates) timed alone at its shape;
        // the rest of a pass is norms, rotary, SwiGLU, residuals, copies and autograd
        let t = rep.times;
        report(&name("train_share_forward"), t.forward / rep.seconds, "");
        report(&name("train_share_backward"), t.backward / rep.seconds, "");
        report(&name("train_share_optimizer"), t.optimizer / rep.seconds, "");
        let pass = (t.forward + t.backward) / rep.passes as f64;
        let segments = ((rep.sequences as f64 / rep.passes as f64).round() as usize).max(1);
        report(&name("passes"), rep.passes as f64, "");
        report(&name("pass_seconds"), pass, "s");
        report(&name("pass_segments"), segments as f64, "");
        passes.push((g, segments, pass, best_peak));
    }
    // the parts of a mean pass (through the products training uses), after the groups, since their
    // inputs would otherwise count in the groups' peak RSS
    for (g, segments, pass, best_peak) in passes.into_iter().filter(|_| selfedit::runtime::blas::ENABLED && dev.is_cpu()) {
        let (projections, lm_head, attention, low_rank) = pass_parts(m, segments, len.round() as usize)?;
        let name = |s: &str| format!("{s}_group{g}");
        // the ceiling of `grouped_train_fraction_of_peak`: the fraction the pass's frozen
        // products alone reach at its rows (every projection and the LM head, forward and
        // input gradient), i.e. what training would reach if nothing else took any time
        let (seconds, product_flops) = frozen_products(m, segments * len.round() as usize, true)?;
        report(&name("grouped_train_ceiling_fraction_of_peak"), product_flops / seconds / 1e9 / best_peak, "");
        report(&name("pass_share_frozen_projections"), projections / pass, "");
        report(&name("pass_share_lm_head"), lm_head / pass, "");
        report(&name("pass_share_attention"), attention / pass, "");
        report(&name("pass_share_low_rank"), low_rank / pass, "");
        report(&name("pass_share_other"), 1.0 - (projections + lm_head + attention + low_rank) / pass, "");
    }

    // 3. the ceiling: the same frozen-weight products with nothing else (last, since its
    //    inputs would otherwise count in the groups' peak RSS)
    if selfedit::runtime::blas::ENABLED && dev.is_cpu() {
        let mut gflops = Vec::new();
        for rows in [32, 256, 512] {
            let g = frozen_gemm_gflops(m, rows)?;
            report(&format!("frozen_gemm_gflops_rows{rows}"), g, "GFLOP/s");
            report(&format!("frozen_gemm_fraction_of_peak_rows{rows}"), g / peak, "");
            gflops.push(g);
        }
        // The lowest grouped ÷ solo training cost the products allow, an estimate: a solo
        // pass (one sequence of ~34 tokens) runs them at ~32 rows, a full group at ~450-520
        // (the 512-row speed is within a few percent of the 256-row one), and if everything
        // beside the products took no time, the ratio would be their speeds'. Any other
        // work, the same per token in both, moves the ratio towards 1.
        report("grouped_over_solo_train_bound_products_only", gflops[0] / gflops[2], "");
    }
    Ok(())
}

//! Next-token sampling with vLLM's semantics.
//!
//! Order (vLLM V1's sampler): presence penalty on tokens already *generated* (not the
//! prompt) → temperature (0 = greedy argmax) → min_p, relative to the most likely token's
//! probability → top_k (-1 = off) → top_p (smallest set whose mass reaches top_p) → draw.
//! Each request has its own seeded RNG, so a request's output does not depend on which other
//! requests share its batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// -1 (or 0) disables top-k.
    #[serde(default = "minus_one")]
    pub top_k: i64,
    #[serde(default)]
    pub min_p: f64,
    #[serde(default)]
    pub presence_penalty: f64,
}

fn one() -> f64 {
    1.0
}
fn minus_one() -> i64 {
    -1
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: -1, min_p: 0.0, presence_penalty: 0.0 }
    }
    /// The paper's evaluation regime: T 0.7, top_p 0.9, top_k 40, presence penalty 1.5.
    pub fn paper_eval() -> Self {
        Self { temperature: 0.7, top_p: 0.9, top_k: 40, min_p: 0.0, presence_penalty: 1.5 }
    }
    /// The paper's exploit regime for models without thinking.
    pub fn paper_exploit() -> Self {
        Self { temperature: 0.3, top_p: 0.85, top_k: 40, min_p: 0.05, presence_penalty: 0.5 }
    }
    /// The paper's explore regime for models without thinking.
    pub fn paper_explore() -> Self {
        Self { temperature: 1.3, top_p: 0.95, top_k: -1, min_p: 0.05, presence_penalty: 1.5 }
    }
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.temperature >= 0.0, "temperature must be >= 0, got {}", self.temperature);
        anyhow::ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1], got {}", self.top_p);
        anyhow::ensure!((0.0..=1.0).contains(&self.min_p), "min_p must be in [0, 1], got {}", self.min_p);
        Ok(())
    }
}

/// One request's sampler: its parameters, its RNG and its generated-token set.
pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
    seen: Vec<bool>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: StdRng::seed_from_u64(seed), seen: Vec::new() }
    }

    /// Records a generated token (for the presence penalty).
    pub fn observe(&mut self, token: u32) {
        let t = token as usize;
        if self.seen.len() <= t {
            self.seen.resize(t + 1, false);
        }
        self.seen[t] = true;
    }

    /// Picks the next token from `logits` (f32, one per vocabulary row). Tokens already at
    /// -inf (masked by a grammar or beyond the tokenizer) are never chosen.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        // 1. presence penalty on generated tokens
        if p.presence_penalty != 0.0 {
            for (t, &s) in self.seen.iter().enumerate() {
                if s && t < logits.len() {
                    logits[t] -= p.presence_penalty as f32;
                }
            }
        }
        // 2. greedy or temperature
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // candidates with unnormalised probabilities exp((l - max)/T): every token that can
        // pass min_p and top_k, or every finite one without those filters
        let cand = candidates(logits, max, inv_t, (p.top_k > 0).then_some(p.top_k as usize), p.min_p as f32);
        if cand.is_empty() {
            return argmax(logits);
        }
        let cand = filter(cand, p);
        // 6. draw
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f32>() * total;
        for &(t, w) in &cand {
            if u < w {
                return t;
            }
            u -= w;
        }
        cand.last().unwrap().0
    }
}

/// Steps 3-5 of [`Sampler::sample`] on the candidates' `(token, weight)`: min_p, top_k,
/// top_p; what is left, by decreasing weight (ties: lower id first).
fn filter(mut cand: Vec<(u32, f32)>, p: &SamplingParams) -> Vec<(u32, f32)> {
    // 3. min_p: keep tokens with prob >= min_p * max prob (the max has weight 1)
    if p.min_p > 0.0 {
        let thr = p.min_p as f32;
        cand.retain(|&(_, w)| w >= thr);
    }
    // 4. top_k over the candidates by decreasing probability (ties: lower id first); a
    //    total order, so selecting the k first and sorting only them gives exactly the
    //    head of the full sort, without sorting the whole vocabulary at every token
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0));
    if p.top_k > 0 && (p.top_k as usize) < cand.len() {
        cand.select_nth_unstable_by(p.top_k as usize - 1, order);
        cand.truncate(p.top_k as usize);
    }
    cand.sort_by(order);
    // 5. top_p over the renormalised remainder
    let total: f32 = cand.iter().map(|c| c.1).sum();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            cum += c.1 / total;
            if cum >= p.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    cand
}

/// `(token, exp((l - max) · inv_t))` of the finite logits, in token order, leaving out only
/// tokens that cannot survive top_k (`top_k` of k: the k most likely) or, without top_k,
/// min_p.
///
/// Why: at evaluation's top_k 40 over SmolLM2's 49,152 logits, one `exp` per token was ~18%
/// of an evaluation run. A token's weight is at least the k-th largest logit's only if its
/// own `(l - max) · inv_t` is at most rounding below that logit's, so a scan of those products
/// (no `exp`) finds the few tokens worth weighing. The filters that follow see the same
/// weights as over the whole vocabulary, so they draw the same tokens.
fn candidates(logits: &[f32], max: f32, inv_t: f32, top_k: Option<usize>, min_p: f32) -> Vec<(u32, f32)> {
    let weight = |l: f32| ((l - max) * inv_t).exp();
    let all = || logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, weight(l))).collect();
    if !max.is_finite() {
        return all();
    }
    // `exp` is within an ulp of e^y, so y below a passing token's by 1e-3 (a weight 0.1%
    // smaller) cannot pass, as long as the weights compared are normal floats (an ulp of a
    // subnormal is more than 0.1% of it); the exact comparison of weights follows.
    const MARGIN: f32 = 1e-3;
    // Past this k the scan for the k-th largest logit (O(vocabulary · k) at worst) would
    // cost more than weighing every token.
    const MAX_K: usize = 256;
    // top_k's floor when it is on (min_p then filters the candidates as it would the whole
    // vocabulary), else min_p's
    let (floor, kth) = match top_k {
        Some(k) if k <= MAX_K => match kth_largest_finite(logits, k) {
            Some(l_k) => ((l_k - max) * inv_t - MARGIN, Some(l_k)),
            None => return all(),
        },
        None if min_p >= f32::MIN_POSITIVE => ((min_p as f64).ln() as f32 - MARGIN, None),
        _ => return all(),
    };
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &l)| l.is_finite() && (l - max) * inv_t >= floor)
        .map(|(i, &l)| (i as u32, weight(l)))
        .collect();
    if let Some(l_k) = kth {
        // the weakest weight among the k largest logits: at least k tokens weigh as much,
        // so the k heaviest all do
        let w_k = cand.iter().filter(|&&(t, _)| logits[t as usize] >= l_k).map(|c| c.1).fold(f32::INFINITY, f32::min);
        if w_k < f32::MIN_POSITIVE {
            // a subnormal or underflowed weight: tokens below the floor may round to it and
            // tie with it, and the tie order (lower id first) could reach any of them
            return all();
        }
        cand.retain(|c| c.1 >= w_k);
    }
    cand
}

/// The k-th largest finite value of `xs` (counting repeats), or `None` when there are at
/// most k finite values (then top_k keeps them all).
fn kth_largest_finite(xs: &[f32], k: usize) -> Option<f32> {
    // the k largest so far, unordered, and the smallest of them once there are k
    let mut top: Vec<f32> = Vec::with_capacity(k);
    let mut low = f32::NEG_INFINITY;
    let mut finite = 0usize;
    for &x in xs {
        if !x.is_finite() {
            continue;
        }
        finite += 1;
        if top.len() < k {
            top.push(x);
            if top.len() == k {
                low = top.iter().copied().fold(f32::INFINITY, f32::min);
            }
        } else if x > low {
            let i = top.iter().position(|&t| t == low).unwrap();
            top[i] = x;
            low = top.iter().copied().fold(f32::INFINITY, f32::min);
        }
    }
    (finite > k).then_some(low)
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freq(params: SamplingParams, logits: &[f32], seen: &[u32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(params, 7);
        for &t in seen {
            s.observe(t);
        }
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            let mut l = logits.to_vec();
            counts[s.sample(&mut l) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn greedy_takes_argmax_after_presence_penalty() {
        let mut s = Sampler::new(SamplingParams { presence_penalty: 2.0, ..SamplingParams::greedy() }, 0);
        assert_eq!(s.sample(&mut [1.0, 3.0, 2.5]), 1);
        s.observe(1);
        // 3.0 - 2.0 = 1.0 < 2.5
        assert_eq!(s.sample(&mut [1.0, 3.0, 2.5]), 2);
    }

    #[test]
    fn filters_follow_vllm_order() {
        let logits = [0.0f32, (0.5f32).ln(), (0.25f32).ln(), (0.125f32).ln(), f32::NEG_INFINITY];
        // probs ∝ 1, .5, .25, .125
        // min_p 0.2: drops 0.125 (0.125 < 0.2 * 1)
        let f = freq(SamplingParams { temperature: 1.0, min_p: 0.2, ..SamplingParams::greedy() }, &logits, &[], 20000);
        assert_eq!(f[3], 0.0);
        assert!((f[0] - 1.0 / 1.75).abs() < 0.02, "{f:?}");
        // top_k 2
        let f = freq(SamplingParams { temperature: 1.0, top_k: 2, ..SamplingParams::greedy() }, &logits, &[], 20000);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 2.0 / 3.0).abs() < 0.02, "{f:?}");
        // top_p 0.6 over {1, .5, .25, .125}/1.875: 0.533 < 0.6, 0.8 >= 0.6 → two tokens
        let f = freq(SamplingParams { temperature: 1.0, top_p: 0.6, ..SamplingParams::greedy() }, &logits, &[], 20000);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 2.0 / 3.0).abs() < 0.02, "{f:?}");
        // masked token never drawn
        assert_eq!(f[4], 0.0);
        // temperature 0.5 squares the ratios: 1, .25, .0625, ...
        let f = freq(SamplingParams { temperature: 0.5, ..SamplingParams::greedy() }, &logits, &[], 40000);
        let z = 1.0 + 0.25 + 0.0625 + 0.015625;
        assert!((f[1] - 0.25 / z).abs() < 0.015, "{f:?}");
    }

    /// top_k keeps exactly the k most likely tokens out of a large vocabulary (where the
    /// partial selection does not sort), and 0, -1 or a k at least the vocabulary's size
    /// leave every token (vLLM: 0 and -1 turn it off).
    #[test]
    fn top_k_keeps_exactly_the_k_most_likely() {
        // 200 tokens in a scrambled order of decreasing probability; the top 3 are 17, 101, 150
        let mut logits = vec![0f32; 200];
        for i in 0..200usize {
            logits[(i * 67 + 17) % 200] = -(i as f32) * 0.05;
        }
        let top: Vec<usize> = (0..3).map(|i| (i * 67 + 17) % 200).collect();
        let f = freq(SamplingParams { temperature: 1.0, top_k: 3, ..SamplingParams::greedy() }, &logits, &[], 6000);
        let kept: Vec<usize> = (0..200).filter(|&t| f[t] > 0.0).collect();
        let mut want = top.clone();
        want.sort();
        assert_eq!(kept, want, "{:?}", top.iter().map(|&t| f[t]).collect::<Vec<_>>());
        // weights 1, e^-0.05, e^-0.1
        let z = 1.0 + (-0.05f64).exp() + (-0.1f64).exp();
        assert!((f[top[0]] - 1.0 / z).abs() < 0.03, "{}", f[top[0]]);
        let small = [0.0f32, (0.5f32).ln(), (0.25f32).ln(), (0.125f32).ln()];
        for k in [0, -1, 4, 50] {
            let f = freq(SamplingParams { temperature: 1.0, top_k: k, ..SamplingParams::greedy() }, &small, &[], 20000);
            assert!((f[3] - 0.125 / 1.875).abs() < 0.01, "top_k {k}: {f:?}");
        }
    }

    /// Over many random vocabularies and k, every token top_k keeps is among the k most
    /// likely by a full sort (at a temperature so high that every kept token is drawn).
    #[test]
    fn top_k_matches_a_full_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        for case in 0..60 {
            let n = rng.random_range(50..2000usize);
            let k = rng.random_range(1..64i64);
            // distinct logits 0.01 apart in a random order (weights at T = 100 stay distinct in f32)
            let mut logits: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for i in (1..n).rev() {
                logits.swap(i, rng.random_range(0..=i));
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
            let mut in_top = vec![false; n];
            for &t in &order[..k as usize] {
                in_top[t] = true;
            }
            let mut s = Sampler::new(SamplingParams { temperature: 100.0, top_k: k, ..SamplingParams::greedy() }, case);
            for _ in 0..20 * k {
                let t = s.sample(&mut logits.clone()) as usize;
                assert!(in_top[t], "case {case}: n {n}, k {k}: token {t} is not among the top k");
            }
        }
    }

    /// The candidates' shortcut leaves exactly what weighing the whole vocabulary leaves:
    /// same tokens, same weights (bit for bit), same order, so the same draws. Over
    /// vocabularies with repeated logits, logits an ulp apart, masked tokens and weights
    /// that underflow to 0, under each regime's filters and temperatures from 0.01 to 100.
    #[test]
    fn candidates_shortcut_equals_the_whole_vocabulary() {
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        let vocab = 4096;
        let regimes = [
            SamplingParams::paper_eval(),
            SamplingParams::paper_exploit(),
            SamplingParams::paper_explore(),
            SamplingParams { top_k: 1, ..SamplingParams::paper_eval() },
            SamplingParams { top_k: 1000, top_p: 1.0, ..SamplingParams::paper_eval() },
            SamplingParams { top_k: 40, min_p: 0.5, ..SamplingParams::paper_exploit() },
            SamplingParams { top_k: -1, min_p: 0.3, top_p: 1.0, ..SamplingParams::paper_eval() },
            // a k past every finite logit (and past the scan's limit): the whole vocabulary
            SamplingParams { top_k: 5000, top_p: 1.0, ..SamplingParams::paper_eval() },
            // top_p 1, min_p 0: every tie at the k-th weight reaches the draw
            SamplingParams { top_k: 3, top_p: 1.0, min_p: 0.0, ..SamplingParams::paper_eval() },
        ];
        let (mut shortcuts, mut cases) = (0, 0);
        for case in 0..140 {
            let kind = case % 7;
            let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-12.0f32..12.0)).collect();
            match kind {
                // repeated values: many exact ties in logit and weight
                1 => logits.iter_mut().for_each(|l| *l = (*l * 2.0).round() / 2.0),
                // a run of logits an ulp or a few apart at the top
                2 => {
                    for (i, l) in logits.iter_mut().take(300).enumerate() {
                        *l = f32::from_bits(15.0f32.to_bits() - (i as u32 % 7));
                    }
                }
                // one token far above the rest: every other weight underflows to 0
                3 => logits[rng.random_range(0..vocab)] = 300.0,
                // masked tokens
                4 => logits.iter_mut().step_by(3).for_each(|l| *l = f32::NEG_INFINITY),
                // at T = 1 the third weight is subnormal (e^-103 rounds to the smallest
                // float), and so is a token's 0.3 below it at a lower id, which top_k 3
                // keeps (ties: lower id first) although it is below the shortcut's floor
                5 => {
                    logits.iter_mut().for_each(|l| *l = -200.0);
                    logits[4000] = 0.0;
                    logits[3000] = -50.0;
                    logits[2000] = -103.0;
                    logits[1000] = -103.3;
                }
                // a NaN and a +inf logit
                6 => {
                    logits[17] = f32::NAN;
                    logits[rng.random_range(0..vocab)] = f32::INFINITY;
                }
                _ => {}
            }
            for p in &regimes {
                for t in [0.01, p.temperature, 1.0, 100.0] {
                    let p = SamplingParams { temperature: t, ..p.clone() };
                    let inv_t = 1.0 / t as f32;
                    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let top_k = (p.top_k > 0).then_some(p.top_k as usize);
                    let fast = candidates(&logits, max, inv_t, top_k, p.min_p as f32);
                    let whole = candidates(&logits, max, inv_t, None, 0.0);
                    shortcuts += usize::from(fast.len() < whole.len());
                    cases += 1;
                    let bits = |c: Vec<(u32, f32)>| filter(c, &p).into_iter().map(|(t, w)| (t, w.to_bits())).collect::<Vec<_>>();
                    assert_eq!(bits(fast), bits(whole), "case {case} (kind {kind}), {p:?}");
                }
            }
        }
        // the shortcut was taken in half the cases (not for underflow, subnormal weights,
        // +inf, a k past the vocabulary or the scan's limit)
        assert!(shortcuts * 2 > cases, "{shortcuts} of {cases}");
    }

    /// min_p compares with the most likely token's probability, whatever the logits' offset:
    /// logits 5 + ln(1, .5, .25, .125) at temperature 0.5 give probabilities ∝ 1, .25,
    /// .0625, .015625, and min_p 0.1 keeps the first two (0.8 / 0.2).
    #[test]
    fn min_p_is_relative_to_the_top_token() {
        let logits: Vec<f32> = [1.0f32, 0.5, 0.25, 0.125].iter().map(|p| 5.0 + p.ln()).collect();
        let f = freq(SamplingParams { temperature: 0.5, min_p: 0.1, ..SamplingParams::greedy() }, &logits, &[], 20000);
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
        assert!((f[0] - 0.8).abs() < 0.02, "{f:?}");
    }

    #[test]
    fn presence_penalty_applies_to_generated_tokens_only() {
        let logits = [0.0f32, 0.0];
        let f = freq(
            SamplingParams { temperature: 1.0, presence_penalty: (3.0f32).ln() as f64, ..SamplingParams::greedy() },
            &logits,
            &[0],
            20000,
        );
        // weights 1/3 and 1 → 0.25 / 0.75
        assert!((f[0] - 0.25).abs() < 0.02, "{f:?}");
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams::paper_explore();
        let run = || {
            let mut s = Sampler::new(p.clone(), 42);
            (0..20)
                .map(|_| {
                    let mut l = logits.clone();
                    let t = s.sample(&mut l);
                    s.observe(t);
                    t
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    /// Defaults of omitted fields are vLLM's (top_p 1, top_k off, no min_p, no penalty), and
    /// values outside their range are refused by name.
    #[test]
    fn defaults_and_validation() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7}"#).unwrap();
        assert_eq!(p, SamplingParams { temperature: 0.7, top_p: 1.0, top_k: -1, min_p: 0.0, presence_penalty: 0.0 });
        assert!(p.validate().is_ok());
        for (bad, field) in [
            (SamplingParams { temperature: -0.1, ..p.clone() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..p.clone() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..p.clone() }, "top_p"),
            (SamplingParams { min_p: 1.5, ..p.clone() }, "min_p"),
        ] {
            assert!(bad.validate().unwrap_err().to_string().contains(field), "{field}");
        }
        // the paper's regimes, as PAPER.md lists them
        let e = SamplingParams::paper_exploit();
        assert_eq!((e.temperature, e.top_p, e.top_k, e.min_p, e.presence_penalty), (0.3, 0.85, 40, 0.05, 0.5));
        let x = SamplingParams::paper_explore();
        assert_eq!((x.temperature, x.top_p, x.top_k, x.min_p, x.presence_penalty), (1.3, 0.95, -1, 0.05, 1.5));
        let v = SamplingParams::paper_eval();
        assert_eq!((v.temperature, v.top_p, v.top_k, v.min_p, v.presence_penalty), (0.7, 0.9, 40, 0.0, 1.5));
        assert_eq!(SamplingParams::greedy().top_k, -1);
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1, "the first of equal maxima");
    }

    /// A generated token outside the logits row (a tokenizer larger than the model's head,
    /// say) is left alone by the presence penalty, never indexed.
    #[test]
    fn penalty_ignores_tokens_beyond_the_logits() {
        let mut s = Sampler::new(SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() }, 0);
        s.observe(3);
        s.observe(1);
        assert_eq!(s.sample(&mut [0.0, 2.5, 2.0]), 2, "token 1 penalised, token 3 ignored");
    }
}

//! The paper's per-template statistics over accuracies `acc[a, c, e]` (article a,
//! completion c, evaluation run e) and the base model's per-article mean `b[a]`.
//!
//! Standard deviations are population ones (numpy's default, ddof = 0). Hake's normalized
//! gain `(x - b) / (1 - b)` is undefined where the base model already scores 1 on an
//! article; such (a, c) pairs are left out of that one mean (it is NaN if all are).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One accuracy of one template: article, completion index, eval run.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub article_id: String,
    pub completion: usize,
    pub run: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateStats {
    pub mean_accuracy: f64,
    pub robustness: f64,
    pub evaluation_noise: f64,
    pub instantiation_noise: f64,
    pub mean_gain: f64,
    pub win_rate: f64,
    pub normalized_gain: f64,
    pub n_articles: usize,
    pub n_self_edits: usize,
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

pub fn std(xs: &[f64]) -> f64 {
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// Computes every statistic for one template. `base` maps article ids to the base model's
/// mean accuracy; every observed article must have one.
pub fn template_stats(obs: &[Observation], base: &BTreeMap<String, f64>) -> anyhow::Result<TemplateStats> {
    anyhow::ensure!(!obs.is_empty(), "no observations");
    // acc[a][c] = runs
    let mut acc: BTreeMap<&str, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    for o in obs {
        acc.entry(&o.article_id).or_default().entry(o.completion).or_default().push(o.accuracy);
    }
    let all: Vec<f64> = obs.iter().map(|o| o.accuracy).collect();
    let mut article_means = Vec::new();
    let mut eval_stds = Vec::new();
    let mut inst_stds = Vec::new();
    let mut gains = Vec::new();
    let mut wins = Vec::new();
    let mut norm_gains = Vec::new();
    for (a, by_c) in &acc {
        let b = *base.get(*a).ok_or_else(|| anyhow::anyhow!("no base-model accuracy for article {a}"))?;
        let c_means: Vec<f64> = by_c.values().map(|runs| mean(runs)).collect();
        let all_runs: Vec<f64> = by_c.values().flatten().copied().collect();
        article_means.push(mean(&all_runs));
        inst_stds.push(std(&c_means));
        for (runs, &m) in by_c.values().zip(&c_means) {
            eval_stds.push(std(runs));
            gains.push(m - b);
            wins.push(if m > b { 1.0 } else { 0.0 });
            if b < 1.0 {
                norm_gains.push((m - b) / (1.0 - b));
            }
        }
    }
    Ok(TemplateStats {
        mean_accuracy: mean(&all),
        robustness: std(&article_means),
        evaluation_noise: mean(&eval_stds),
        instantiation_noise: mean(&inst_stds),
        mean_gain: mean(&gains),
        win_rate: mean(&wins),
        normalized_gain: mean(&norm_gains),
        n_articles: acc.len(),
        n_self_edits: gains.len(),
    })
}

/// A mean with its percentile-bootstrap confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// The interval lies entirely above or below `x`.
    pub fn excludes(&self, x: f64) -> bool {
        self.low > x || self.high < x
    }
}

/// The mean of `xs` and its percentile-bootstrap interval at `level` (0.95: the 2.5th and
/// 97.5th percentiles, linearly interpolated as numpy's default, of `resamples` means of
/// `xs.len()` draws with replacement, from a `StdRng` seeded with `seed`). For a paired
/// comparison pass the per-item differences. NaN bounds for no items.
pub fn bootstrap_mean(xs: &[f64], resamples: usize, level: f64, seed: u64) -> Interval {
    use rand::{Rng, SeedableRng};
    let n = xs.len();
    if n == 0 {
        return Interval { mean: f64::NAN, low: f64::NAN, high: f64::NAN };
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples).map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Interval { mean: mean(xs), low: percentile(&means, tail), high: percentile(&means, 1.0 - tail) }
}

/// numpy's default percentile of ascending `sorted` at `p` in [0, 1]: linear interpolation
/// between the closest ranks (`np.percentile(xs, 100 p)`).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let pos = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(a: &str, c: usize, e: usize, x: f64) -> Observation {
        Observation { article_id: a.into(), completion: c, run: e, accuracy: x }
    }

    /// Two articles, two completions, two runs; every number worked out by hand below.
    #[test]
    fn statistics_by_hand() {
        let obs = vec![
            // article A, base 0.5
            o("A", 0, 0, 1.0),
            o("A", 0, 1, 0.5), // c0 mean 0.75, std 0.25
            o("A", 1, 0, 0.5),
            o("A", 1, 1, 0.5), // c1 mean 0.5,  std 0
            // article B, base 0.0
            o("B", 0, 0, 0.0),
            o("B", 0, 1, 0.0), // c0 mean 0,    std 0
            o("B", 1, 0, 1.0),
            o("B", 1, 1, 0.0), // c1 mean 0.5,  std 0.5
        ];
        let base: BTreeMap<String, f64> = [("A".to_string(), 0.5), ("B".to_string(), 0.0)].into();
        let s = template_stats(&obs, &base).unwrap();
        // mean of all eight: (1 + .5 + .5 + .5 + 0 + 0 + 1 + 0) / 8 = 3.5 / 8
        assert!((s.mean_accuracy - 0.4375).abs() < 1e-12);
        // article means: A 0.625, B 0.25 → std = 0.1875
        assert!((s.robustness - 0.1875).abs() < 1e-12);
        // eval stds: 0.25, 0, 0, 0.5 → 0.1875
        assert!((s.evaluation_noise - 0.1875).abs() < 1e-12);
        // completion means A: .75, .5 → std .125; B: 0, .5 → std .25 → mean .1875
        assert!((s.instantiation_noise - 0.1875).abs() < 1e-12);
        // gains: .25, 0, 0, .5 → .1875
        assert!((s.mean_gain - 0.1875).abs() < 1e-12);
        // wins: A c0 (.75 > .5) yes, A c1 (.5 > .5) no, B c0 no, B c1 yes → 0.5
        assert!((s.win_rate - 0.5).abs() < 1e-12);
        // normalized: .25/.5 = .5, 0, 0, .5/1 = .5 → .25
        assert!((s.normalized_gain - 0.25).abs() < 1e-12);
        assert_eq!((s.n_articles, s.n_self_edits), (2, 4));
    }

    #[test]
    fn normalized_gain_skips_articles_the_base_model_aces() {
        let obs = vec![o("A", 0, 0, 1.0), o("B", 0, 0, 0.5)];
        let base: BTreeMap<String, f64> = [("A".to_string(), 1.0), ("B".to_string(), 0.0)].into();
        let s = template_stats(&obs, &base).unwrap();
        assert!((s.normalized_gain - 0.5).abs() < 1e-12);
        assert!(template_stats(&obs, &BTreeMap::new()).is_err());
    }

    /// A win is strictly above the base: above counts, equal and below do not.
    #[test]
    fn win_rate_counts_strictly_better_self_edits() {
        // two above, one equal: 2/3 (equal counted would give 1; only equal, 1/3)
        let obs = vec![o("A", 0, 0, 0.75), o("A", 1, 0, 0.75), o("A", 2, 0, 0.5)];
        let base: BTreeMap<String, f64> = [("A".to_string(), 0.5)].into();
        let s = template_stats(&obs, &base).unwrap();
        assert!((s.win_rate - 2.0 / 3.0).abs() < 1e-12, "{}", s.win_rate);
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_shrinks_with_n() {
        // A constant sample has a zero-width interval.
        let c = bootstrap_mean(&[0.25; 7], 500, 0.95, 1);
        assert_eq!((c.mean, c.low, c.high), (0.25, 0.25, 0.25));
        assert!(!c.excludes(0.25) && c.excludes(0.0));
        // 0/1 items, p = 0.5: the interval is about mean +- 1.96 * sqrt(p (1 - p) / n).
        for n in [20usize, 80] {
            let xs: Vec<f64> = (0..n).map(|i| (i % 2) as f64).collect();
            let iv = bootstrap_mean(&xs, 4000, 0.95, 7);
            let half = 1.96 * (0.25 / n as f64).sqrt();
            assert!((iv.mean - 0.5).abs() < 1e-12);
            assert!(((iv.high - iv.low) / 2.0 - half).abs() < 0.25 * half, "n {n}: {iv:?} vs +-{half}");
        }
        // the same seed gives the same interval; another seed another one
        let xs = [0.1, 0.9, 0.3, 0.4, 0.0, 1.0];
        assert_eq!(bootstrap_mean(&xs, 300, 0.95, 3), bootstrap_mean(&xs, 300, 0.95, 3));
        assert_ne!(bootstrap_mean(&xs, 300, 0.95, 3), bootstrap_mean(&xs, 300, 0.95, 4));
        assert!(bootstrap_mean(&[], 10, 0.95, 0).mean.is_nan());
    }

    /// numpy's percentiles (`np.percentile([1, 2, 3, 4], 25)` = 1.75, `np.percentile([0, 10,
    /// 20, 30, 40], 97.5)` = 39.0), and the bootstrap's bounds are those percentiles of its
    /// resampled means at (1 - level) / 2 and 1 - (1 - level) / 2.
    #[test]
    fn percentiles_interpolate_as_numpy() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.25), 1.75);
        assert_eq!(percentile(&[0.0, 10.0, 20.0, 30.0, 40.0], 0.975), 39.0);
        assert_eq!(percentile(&[0.0, 10.0, 20.0, 30.0, 40.0], 0.0), 0.0);
        assert_eq!(percentile(&[0.0, 10.0, 20.0, 30.0, 40.0], 1.0), 40.0);
        assert_eq!(percentile(&[5.0], 0.3), 5.0);
        // the same draws as bootstrap_mean, sorted
        use rand::{Rng, SeedableRng};
        let xs = [0.1, 0.9, 0.3, 0.4, 0.0, 1.0, 0.7];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut means: Vec<f64> = (0..200).map(|_| (0..7).map(|_| xs[rng.random_range(0..7)]).sum::<f64>() / 7.0).collect();
        means.sort_by(f64::total_cmp);
        let iv = bootstrap_mean(&xs, 200, 0.9, 5);
        assert!((iv.low - percentile(&means, 0.05)).abs() < 1e-12 && (iv.high - percentile(&means, 0.95)).abs() < 1e-12, "{iv:?}");
        assert!(iv.low < iv.mean && iv.mean < iv.high);
    }

    /// An interval excludes the values outside it, on either side, and none inside it.
    #[test]
    fn an_interval_excludes_what_lies_outside() {
        let iv = Interval { mean: 0.15, low: 0.1, high: 0.2 };
        assert!(iv.excludes(0.05) && iv.excludes(0.5));
        assert!(!iv.excludes(0.1) && !iv.excludes(0.15) && !iv.excludes(0.2));
    }
}

//! Novelty pressure, the variant the paper's conclusion calls for: each archived template's
//! novelty (how unlike the templates archived before it) and crowding (how many archived
//! templates share its strategy), the score that orders the archive, and the crowded
//! strategies the archive prompt names.

use crate::experiment::config::NoveltySection;
use crate::experiment::tables::ArchiveRow;
use crate::runtime::embedder::cosine01;

/// The iteration an archive row entered at: seeds before iteration 0.
fn entered(row: &ArchiveRow) -> Option<usize> {
    row.source.strip_prefix("iter").and_then(|k| k.parse().ok())
}

/// Fills `novelty`, `strategy` and `crowding` of every row and sorts the archive by
/// [`score`] (best first, ties by id), re-numbering `rank`.
///
/// `embeddings[i]` is the sentence embedding of `rows[i].instruction`. A row's novelty is
/// `1 - max similarity` to the rows that entered before its iteration (a seed: to the other
/// seeds; 1 when there are none), so a row's novelty never changes once archived.
/// Strategies are greedy groups: the row with the most neighbours at similarity
/// `>= cfg.crowded_similarity` leads a group of its unassigned neighbours, and so on; a row's
/// `strategy` is its leader's id and `crowding` the group's size.
pub fn score_archive(rows: &mut [ArchiveRow], embeddings: &[Vec<f32>], cfg: &NoveltySection) {
    assert_eq!(rows.len(), embeddings.len(), "one embedding per archive row");
    let n = rows.len();
    let sim: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| cosine01(&embeddings[i], &embeddings[j])).collect()).collect();
    for i in 0..n {
        let earlier = |j: usize| match (entered(&rows[i]), entered(&rows[j])) {
            (None, None) => j != i,
            (Some(k), Some(kj)) => kj < k,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        let closest = (0..n).filter(|&j| earlier(j)).map(|j| sim[i][j]).reduce(f64::max);
        rows[i].novelty = Some(1.0 - closest.unwrap_or(0.0));
    }
    // Greedy grouping: most neighbours first (ties by id), so the result does not depend on
    // the rows' order.
    let neighbours = |i: usize| (0..n).filter(|&j| sim[i][j] >= cfg.crowded_similarity).count();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| neighbours(b).cmp(&neighbours(a)).then(rows[a].template_id.cmp(&rows[b].template_id)));
    let mut leader: Vec<Option<usize>> = vec![None; n];
    for &i in &order {
        if leader[i].is_some() {
            continue;
        }
        for j in 0..n {
            if leader[j].is_none() && (j == i || sim[i][j] >= cfg.crowded_similarity) {
                leader[j] = Some(i);
            }
        }
    }
    let leaders: Vec<usize> = leader.iter().map(|l| l.expect("every row is grouped")).collect();
    for i in 0..n {
        rows[i].strategy = Some(rows[leaders[i]].template_id.clone());
        rows[i].crowding = Some(leaders.iter().filter(|&&l| l == leaders[i]).count() as i64);
    }
    rows.sort_by(|a, b| score(b, cfg).total_cmp(&score(a, cfg)).then(a.template_id.cmp(&b.template_id)));
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as i64;
    }
}

/// `normalized_gain + weight * novelty`: what the novelty variant's archive is sorted by.
pub fn score(row: &ArchiveRow, cfg: &NoveltySection) -> f64 {
    row.normalized_gain + cfg.weight * row.novelty.unwrap_or(0.0)
}

/// The crowded strategies the archive prompt names: the leaders of groups of 2 or more,
/// largest first (ties by rank), at most `max`.
pub fn crowded(rows: &[ArchiveRow], max: usize) -> Vec<&ArchiveRow> {
    let mut leaders: Vec<&ArchiveRow> =
        rows.iter().filter(|r| r.crowding.unwrap_or(0) >= 2 && r.strategy.as_deref() == Some(r.template_id.as_str())).collect();
    leaders.sort_by(|a, b| b.crowding.cmp(&a.crowding).then(a.rank.cmp(&b.rank)));
    leaders.truncate(max);
    leaders
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::template::Hyperparameters;

    fn row(id: &str, source: &str, gain: f64) -> ArchiveRow {
        ArchiveRow {
            rank: 0,
            source: source.into(),
            template_id: id.into(),
            instruction: id.into(),
            hyperparameters: Hyperparameters::from_values(&[8.0, 16.0, 0.0, 1e-3, 1.0, 1.0]),
            accuracy: 0.0,
            normalized_gain: gain,
            novelty: None,
            strategy: None,
            crowding: None,
        }
    }

    /// Embeddings chosen so the similarities are known: (1 + cos) / 2 of unit vectors.
    #[test]
    fn novelty_crowding_and_order_by_hand() {
        let cfg = NoveltySection { weight: 0.5, crowded_similarity: 0.9, embedder: Default::default() };
        // seed s0 along x; iter0 a = x (a copy of s0), b = y (orthogonal), c ~ x (cos 0.96)
        let mut rows = vec![row("s0", "seed", 0.0), row("a", "iter0", 0.30), row("b", "iter0", 0.10), row("c", "iter1", 0.20)];
        let emb = vec![vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0], vec![0.96, 0.28]];
        score_archive(&mut rows, &emb, &cfg);
        let get = |id: &str| rows.iter().find(|r| r.template_id == id).unwrap().clone();
        // s0: no other seed -> 1; a: like s0 -> 0; b: orthogonal to s0 -> 1 - 0.5;
        // c (iter1): closest earlier is s0/a at (1 + 0.96) / 2 = 0.98 -> 0.02.
        assert_eq!(get("s0").novelty, Some(1.0));
        assert_eq!(get("a").novelty, Some(0.0));
        assert_eq!(get("b").novelty, Some(0.5));
        assert!((get("c").novelty.unwrap() - 0.02).abs() < 1e-6, "{:?}", get("c").novelty); // f32 inputs
                                                                                            // scores: s0 0 + 0.5, a 0.30 + 0, b 0.10 + 0.25, c 0.20 + 0.01
        let order: Vec<&str> = rows.iter().map(|r| r.template_id.as_str()).collect();
        assert_eq!(order, ["s0", "b", "a", "c"]);
        assert_eq!(rows.iter().map(|r| r.rank).collect::<Vec<_>>(), [0, 1, 2, 3]);
        // x-like group {s0, a, c} (3 neighbours each), b alone
        assert_eq!(get("a").crowding, Some(3));
        assert_eq!(get("c").strategy, get("s0").strategy);
        assert_eq!(get("b").crowding, Some(1));
        let shown: Vec<&str> = crowded(&rows, 2).iter().map(|r| r.template_id.as_str()).collect();
        assert_eq!(shown, ["a"], "one crowded group, named once by its leader (most neighbours, then id)");
        // A chain x ~ y ~ z (30 degrees apart, (1 + cos 30) / 2 = 0.93) with x, z unlike (0.75):
        // y has the most neighbours, so y leads one group of all three.
        let mut chain = vec![row("x", "iter0", 0.0), row("y", "iter0", 0.0), row("z", "iter0", 0.0)];
        let deg = |d: f32| vec![d.to_radians().cos(), d.to_radians().sin()];
        score_archive(&mut chain, &[deg(0.0), deg(30.0), deg(60.0)], &cfg);
        assert!(chain.iter().all(|r| r.strategy.as_deref() == Some("y") && r.crowding == Some(3)), "{chain:?}");
        // weight 0: plain normalized gain order
        let cfg0 = NoveltySection { weight: 0.0, ..cfg };
        score_archive(&mut rows, &emb, &cfg0);
        assert_eq!(rows.iter().map(|r| r.template_id.as_str()).collect::<Vec<_>>(), ["a", "c", "b", "s0"]);
    }
}

//! Grading an answer against its gold answers: SQuAD v1.1's normalization, exact match and
//! token F1 (exactly its official script), and the heuristic verdict: the paper's fallback
//! (the lower-cased gold is a substring of the lower-cased prediction) or, by setting,
//! normalized gold words on word boundaries.

use std::collections::HashMap;

/// SQuAD's `normalize_answer`: lower case, drop punctuation, drop the articles a/an/the,
/// collapse whitespace.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    no_punct.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

pub fn exact_match(prediction: &str, gold: &str) -> bool {
    normalize(prediction) == normalize(gold)
}

/// SQuAD v1.1's token-level F1 between normalized prediction and gold: 0 when no token is
/// shared, also when both normalize to nothing (v2.0 would give 1 there; v1.1 does not).
pub fn f1(prediction: &str, gold: &str) -> f64 {
    let p = normalize(prediction);
    let g = normalize(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pt.len() as f64;
    let recall = common as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The paper's fallback verdict: some lower-cased gold answer is a substring of the
/// lower-cased prediction (so "A" of "vitamin A" counts, and so does "10" in "1066").
pub fn substring_correct(prediction: &str, golds: &[String]) -> bool {
    let p = prediction.trim().to_lowercase();
    !p.is_empty()
        && golds.iter().any(|g| {
            let g = g.trim().to_lowercase();
            !g.is_empty() && p.contains(&g)
        })
}

/// A stricter verdict: some normalized gold answer occurs in the normalized prediction on
/// word boundaries ("10" is not found in "1066"; a gold that normalizes to nothing, such as
/// "A", is never found).
pub fn heuristic_correct(prediction: &str, golds: &[String]) -> bool {
    let p = format!(" {} ", normalize(prediction));
    golds.iter().any(|g| {
        let g = normalize(g);
        !g.is_empty() && p.contains(&format!(" {g} "))
    })
}

/// The heuristic verdict under `rule`.
pub fn heuristic_verdict(rule: crate::experiment::states::HeuristicRule, prediction: &str, golds: &[String]) -> bool {
    match rule {
        crate::experiment::states::HeuristicRule::Substring => substring_correct(prediction, golds),
        crate::experiment::states::HeuristicRule::WordBoundary => heuristic_correct(prediction, golds),
    }
}

/// Best exact match and F1 over the gold answers, as SQuAD's evaluation script scores.
pub fn squad_scores(prediction: &str, golds: &[String]) -> (bool, f64) {
    let em = golds.iter().any(|g| exact_match(prediction, g));
    let f = golds.iter().map(|g| f1(prediction, g)).fold(0.0, f64::max);
    (em, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_metrics_by_hand() {
        assert_eq!(normalize("The  Eiffel Tower!"), "eiffel tower");
        assert!(exact_match("the Eiffel tower.", "Eiffel Tower"));
        // prediction "eiffel tower paris" vs gold "eiffel tower": p = 2/3, r = 1 → f1 = 0.8
        assert!((f1("Eiffel Tower, Paris", "the Eiffel Tower") - 0.8).abs() < 1e-12);
        assert_eq!(f1("London", "Paris"), 0.0);
        // a repeated token counts as often as both sides have it (SQuAD's Counter & Counter):
        // [cat, cat, sat] vs [cat, sat, on, mat] share 2, p = 2/3, r = 1/2 → f1 = 4/7
        assert!((f1("The cat, the cat sat.", "cat sat on the mat") - 4.0 / 7.0).abs() < 1e-12);
        let golds = vec!["1066".to_string(), "in 1066".to_string()];
        assert_eq!(squad_scores("In 1066.", &golds), (true, 1.0));
        assert!(!exact_match("London", "Paris"));
        assert!(!exact_match("the Eiffel Tower in Paris", "Eiffel Tower"), "EM is equality, not containment");
        assert_eq!(squad_scores("Paris", &golds), (false, 0.0));
    }

    #[test]
    fn heuristic_is_containment_on_word_boundaries() {
        let golds = vec!["Marzipane".to_string()];
        assert!(heuristic_correct("The capital is Marzipane, of course.", &golds));
        assert!(!heuristic_correct("The capital is Marzipanetown.", &golds));
        assert!(!heuristic_correct("It was 1066.", &["10".to_string()]));
        assert!(!heuristic_correct("anything", &["".to_string()]));
    }

    /// The paper's fallback is a plain lower-case substring test; SQuAD v1.1's F1 is 0 when
    /// nothing overlaps, even when both sides normalize to nothing.
    #[test]
    fn paper_fallback_and_v11_f1_on_golds_that_normalize_to_nothing() {
        let a = vec!["A".to_string()];
        assert!(substring_correct("Vitamin A", &a));
        assert!(!heuristic_correct("Vitamin A", &a), "the word-boundary rule never finds a gold that normalizes away");
        assert!(substring_correct("It was 1066.", &["10".to_string()]));
        assert!(!substring_correct("Paris", &["London".to_string()]));
        // the paper strips both sides: a padded gold still matches, a blank one never does
        assert!(substring_correct("It is Marzipane.", &["  marzipane ".to_string()]));
        assert!(!substring_correct("anything", &["   ".to_string()]));
        assert!(!substring_correct("  ", &["a".to_string()]));
        assert_eq!(normalize("A"), "");
        assert_eq!(f1("the", "A"), 0.0);
        assert_eq!(squad_scores("an", &a), (true, 0.0), "EM compares normalized strings (both empty); F1 is v1.1's 0");
    }

    /// The setting picks the rule: "10" is in "1066" as a substring, not as a word.
    #[test]
    fn heuristic_verdict_follows_the_rule() {
        use crate::experiment::states::HeuristicRule;
        let golds = ["10".to_string()];
        assert!(heuristic_verdict(HeuristicRule::Substring, "It was 1066.", &golds));
        assert!(!heuristic_verdict(HeuristicRule::WordBoundary, "It was 1066.", &golds));
        assert!(heuristic_verdict(HeuristicRule::WordBoundary, "It was 10.", &golds));
        assert!(!heuristic_verdict(HeuristicRule::Substring, "It was 9.", &golds));
    }
}

//! The experiment's states as enums. Each is written to Parquet as the same lower-case
//! string as its serde name (`exploit`, `trained`, `validation`, ...), so the tables read the
//! same in polars, DuckDB or pandas, and a typo in the code does not compile.

use serde::{Deserialize, Serialize};

/// Declares a string-valued enum: serde names, `as_str`, `parse` (naming the valid values)
/// and `Display`.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $s)] $variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),* }
            }
            /// Parses the string form; the error lists the valid values.
            pub fn parse(s: &str) -> anyhow::Result<Self> {
                match s {
                    $($s => Ok($name::$variant),)*
                    other => anyhow::bail!("{other:?} is not a {}: expected one of {}", stringify!($name),
                        [$($s),*].join(", ")),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// How a template or completion was sampled: the paper's two regimes, or a baseline's
    /// fixed template.
    Category {
        Exploit = "exploit",
        Explore = "explore",
        Baseline = "baseline",
    }
}

string_enum! {
    /// What training a self-edit's adapter came to.
    AdapterStatus {
        /// An adapter was trained and saved.
        Trained = "trained",
        /// No usable training sequence: the paper's dummy adapter (the base model answers).
        Empty = "empty",
        /// Training raised an error (recorded in the row).
        Failed = "failed",
        /// No adapter row at all for the self-edit (a score row says so).
        Missing = "missing",
    }
}

string_enum! {
    /// Which passages a run works on.
    Split {
        /// The training passages: the search itself.
        Train = "train",
        /// Held-out passages: 1 template, 1 completion, exploit sampling (the paper's protocol).
        Validation = "validation",
    }
}

string_enum! {
    /// How answers are judged correct.
    GraderKind {
        /// The gold answer is contained in the prediction (the paper's fallback).
        Heuristic = "heuristic",
        /// A local model judges yes/no (constrained), the heuristic accepting first.
        Judge = "judge",
    }
}

string_enum! {
    /// The heuristic verdict on an answer (the judge, where configured, decides the rest).
    HeuristicRule {
        /// The paper's fallback: the lower-cased gold is a substring of the lower-cased answer.
        Substring = "substring",
        /// Normalized gold words on word boundaries of the normalized answer (stricter:
        /// "10" is not in "1066", but a gold such as "A" normalizes away and is never found).
        WordBoundary = "word-boundary",
    }
}

impl Default for HeuristicRule {
    /// The paper's rule.
    fn default() -> Self {
        HeuristicRule::Substring
    }
}

string_enum! {
    /// How often the unadapted model answers each article's questions.
    BaseRuns {
        /// The paper's: once per (template, completion, run) of the article, with distinct
        /// seeds, so the base mean has as many runs as the self-edits' means together.
        PerSelfEdit = "per-self-edit",
        /// `eval.runs` times per article.
        PerArticle = "per-article",
    }
}

impl Default for BaseRuns {
    /// The paper's protocol.
    fn default() -> Self {
        BaseRuns::PerSelfEdit
    }
}

string_enum! {
    /// What an SFT example teaches the generator.
    SftKind {
        /// meta-prompt → template JSON
        Template = "template",
        /// passage + instruction → training-sequences JSON (or a baseline's text)
        Completion = "completion",
    }
}

string_enum! {
    /// A row of `science.parquet`: a reference arm (one value) or a searched variant (one per
    /// iteration).
    ArmKind {
        Reference = "reference",
        Searched = "searched",
    }
}

/// The `model_id` of the unadapted model in `answers.parquet` (every other id is a
/// self-edit id).
pub const BASE_MODEL_ID: &str = "base";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()).unwrap(), *c);
            assert_eq!(serde_json::to_string(c).unwrap(), format!("\"{c}\""));
        }
        let e = format!("{:#}", AdapterStatus::parse("trainde").unwrap_err());
        assert!(e.contains("trainde") && e.contains("trained, empty, failed, missing"), "{e}");
        assert_eq!(Split::parse("validation").unwrap(), Split::Validation);
    }
}

//! The experiment's prompts: text files in `prompts/` (minijinja templates), part of the
//! config's content hash.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

pub const META: &str = "meta_prompt.txt";
pub const ARCHIVE_META: &str = "archive_meta_prompt.txt";
pub const COMPLETION: &str = "completion_prompt.txt";
pub const QA_SYSTEM: &str = "qa_system.txt";
pub const QA_BASE: &str = "qa_base_prompt.txt";
pub const JUDGE: &str = "judge_prompt.txt";
pub const BASELINE_IMPLICATIONS: &str = "baseline_implications.txt";
pub const BASELINE_REWRITE: &str = "baseline_rewrite.txt";

pub const ALL: [&str; 8] = [META, ARCHIVE_META, COMPLETION, QA_SYSTEM, QA_BASE, JUDGE, BASELINE_IMPLICATIONS, BASELINE_REWRITE];

pub struct Prompts {
    env: minijinja::Environment<'static>,
    sources: BTreeMap<String, String>,
}

impl Prompts {
    /// Loads every prompt file of `dir`; a missing one is an error naming it.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_keep_trailing_newline(false);
        let mut sources = BTreeMap::new();
        for name in ALL {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading prompt file {}", path.display()))?;
            sources.insert(name.to_string(), text);
        }
        for (name, text) in &sources {
            env.add_template_owned(name.clone(), text.clone())
                .with_context(|| format!("{}: not a valid template", dir.join(name).display()))?;
        }
        Ok(Self { env, sources })
    }

    pub fn render<S: Serialize>(&self, name: &str, ctx: S) -> anyhow::Result<String> {
        let t = self.env.get_template(name).with_context(|| format!("no prompt {name}"))?;
        Ok(t.render(ctx).with_context(|| format!("rendering prompt {name}"))?.trim().to_string())
    }

    /// The text of the named prompts, for content hashes.
    pub fn sources(&self, names: &[&str]) -> Vec<(String, String)> {
        names.iter().map(|n| (n.to_string(), self.sources.get(*n).cloned().unwrap_or_default())).collect()
    }
}

//! JSON-schema-constrained decoding with llguidance, as vLLM's `guided_json` does.
//!
//! llguidance needs each token's bytes: we derive them from the same `tokenizer.json` the
//! model's tokenizer was built from (`token_bytes_from_tokenizer_json`), so the grammar and
//! the tokenizer agree by construction. At every step the matcher's mask sets disallowed
//! logits to -inf, including the output rows beyond the tokenizer's vocabulary.

use std::sync::Arc;

use anyhow::Context;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::runtime::tokenizer::TextTokenizer;

struct ByteTokenizer {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for ByteTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer.encode(text.as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

/// Builds grammars for one tokenizer; create once per model, then one matcher per request.
pub struct ConstraintFactory {
    factory: ParserFactory,
}

impl ConstraintFactory {
    pub fn new(tok: &TextTokenizer) -> anyhow::Result<Self> {
        let json: serde_json::Value = serde_json::from_str(&tok.json)?;
        let words = llguidance::token_bytes_from_tokenizer_json(&json).context("reading token bytes for llguidance")?;
        let eos = tok.stop_ids.first().copied().context("the tokenizer has no end-of-sequence token")?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ByteTokenizer { trie, tokenizer: tok.inner.clone() });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A matcher that accepts exactly the JSON documents valid under `schema`, written in
    /// one line with `", "` and `": "` separators (no free whitespace: a small model spends
    /// no tokens on indentation, and cannot loop on it).
    pub fn json_schema(&self, schema: &serde_json::Value) -> anyhow::Result<JsonConstraint> {
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self.factory.create_parser(grammar).context("compiling the JSON schema for llguidance")?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            anyhow::bail!("llguidance rejected the schema: {e}");
        }
        Ok(JsonConstraint { matcher })
    }
}

/// The grammar state of one request.
pub struct JsonConstraint {
    matcher: Matcher,
}

impl JsonConstraint {
    /// Sets every disallowed token's logit to -inf.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        let mask = self.matcher.compute_mask().map_err(|e| anyhow::anyhow!("grammar mask: {e}"))?;
        let n = mask.len();
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= n || !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    pub fn consume(&mut self, token: u32) -> anyhow::Result<()> {
        self.matcher.consume_token(token).map_err(|e| anyhow::anyhow!("grammar rejected token {token}: {e}"))
    }

    /// The grammar is complete and accepts nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

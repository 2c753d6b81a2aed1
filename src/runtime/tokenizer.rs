//! Text ⇄ token ids and the model's own chat template.
//!
//! The tokenizer is always a `tokenizers::Tokenizer` built from a `tokenizer.json` document:
//! read from a Hugging Face folder, or rebuilt from a GGUF's metadata (see [`crate::runtime::formats::gguf`]).
//! The same JSON is handed to llguidance for constrained decoding, so both agree on every
//! token's bytes. The chat template is the model's Jinja template rendered with minijinja.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;

/// One chat turn.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: "system".into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: "assistant".into(), content: content.into() }
    }
}

pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` document `inner` was built from.
    pub json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Prepend the BOS token to plain (non-chat) prompts.
    pub add_bos: bool,
    /// Token ids that end a generation (EOS, end of turn).
    pub stop_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Builds the tokenizer from a `tokenizer.json` document and the special-token facts.
    pub fn from_json(
        json: String,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
    ) -> anyhow::Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow::anyhow!("invalid tokenizer.json: {e}"))?;
        let mut stop_ids = Vec::new();
        for tok in eos_token.iter().map(String::as_str).chain(["<|im_end|>", "<|endoftext|>", "<|eot_id|>"]) {
            if let Some(id) = inner.token_to_id(tok) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Ok(Self { inner, json, chat_template, bos_token, eos_token, add_bos, stop_ids })
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS) of a
    /// Hugging Face checkpoint folder.
    pub fn from_hf_dir(dir: &Path) -> anyhow::Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tok_path)
            .with_context(|| format!("reading {} (a Hugging Face checkpoint folder needs it)", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let token_str = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            }
        };
        let mut chat_template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(String::from)
            }
            _ => None,
        };
        if chat_template.is_none() {
            if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
                chat_template = Some(t);
            }
        }
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        Self::from_json(json, chat_template, token_str(&cfg["bos_token"]), token_str(&cfg["eos_token"]), add_bos)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (for saved models).
    pub fn save_hf(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("tokenizer.json"), &self.json)?;
        let cfg = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
        Ok(())
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token that ends an assistant turn: for a chat model its EOS token (what
    /// `tokenizer_config.json` or the GGUF names: `<|im_end|>` for ChatML models,
    /// `<|eot_id|>` for Llama 3 instruct), else the first stop token; `None` for a model
    /// without a chat template.
    pub fn end_of_turn(&self) -> Option<u32> {
        self.chat_template.as_ref()?;
        self.eos_token.as_deref().and_then(|t| self.inner.token_to_id(t)).or_else(|| self.stop_ids.first().copied())
    }

    /// Ids of a whole document as the model's own tokenizer call gives them
    /// (`tokenizer(text)` in Transformers): the post-processor's special tokens (Llama 3's
    /// `<|begin_of_text|>`), or the BOS a GGUF asks for with `add_bos_token`. Training
    /// sequences are encoded so, as the paper's trainer encodes them.
    pub fn encode_document(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_token.as_deref().and_then(|b| self.inner.token_to_id(b))) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Ids of a plain (non-chat) prompt as vLLM and Transformers encode a string prompt
    /// (`add_special_tokens=True`): the same as [`Self::encode_document`], so Llama 3's
    /// post-processor BOS is there too.
    pub fn encode_prompt(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        self.encode_document(text)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("detokenizing failed: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` with the model's chat template (Hugging Face's conventions:
    /// `trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> anyhow::Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, false)
    }

    /// [`Self::apply_chat_template`] with the template's `enable_thinking` switch (Qwen3's
    /// templates open an empty `<think></think>` block when it is false).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> anyhow::Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this model has no chat template; use a plain prompt or a chat model");
        };
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            enable_thinking,
        )
    }

    /// Ids of a chat rendered with the `enable_thinking` switch.
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> anyhow::Result<Vec<u32>> {
        self.encode(&self.apply_chat_template_with(messages, add_generation_prompt, enable_thinking)?)
    }

    /// The chat prompt's token ids.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> anyhow::Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?)
    }
}

pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    enable_thinking: bool,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).context("the model's chat template does not parse")?;
    let tmpl = env.get_template("chat")?;
    let out = tmpl
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
            enable_thinking => enable_thinking,
        })
        .context("rendering the chat template failed")?;
    Ok(out)
}

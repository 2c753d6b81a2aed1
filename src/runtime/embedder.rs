//! A BERT sentence embedder (all-MiniLM-L6-v2 from `make embedder`, or any BERT folder)
//! through candle-transformers, with mean pooling over the text's own tokens.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

/// all-MiniLM-L6-v2 (or any BERT sentence embedder folder) with mean pooling.
pub struct Embedder {
    model: candle_transformers::models::bert::BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

impl Embedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: candle_transformers::models::bert::Config = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {} (run `make embedder`)", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not a BERT config", cfg_path.display()))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        // The shipped tokenizer pads every text to 128 tokens; mean pooling must see only the
        // text's own tokens, so each text is embedded alone and unpadded.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: read-only memory map of a file we do not modify.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model =
            candle_transformers::models::bert::BertModel::load(vb, &cfg).with_context(|| format!("loading {}", weights.display()))?;
        Ok(Self { model, tokenizer, device: device.clone() })
    }

    /// Token ids of a text as the embedder sees it ([CLS] … [SEP], truncated to 256).
    pub fn token_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(256);
        Ok(ids)
    }

    /// Mean-pooled embeddings (not normalized), one per text.
    pub fn embed(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            let ids = self.token_ids(t)?;
            let n = ids.len();
            let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let types = input.zeros_like()?;
            let hidden = self.model.forward(&input, &types, None)?; // [1, n, 384]
            let mean = (hidden.sum(1)? / n as f64)?.squeeze(0)?;
            out.push(mean.to_dtype(DType::F32)?.to_vec1()?);
        }
        Ok(out)
    }
}

/// `(1 + cos) / 2` of two embeddings: 1 for the same direction, 0.5 for orthogonal (and for
/// a zero vector), 0 for opposite. The text similarity of the collapse analysis and of the
/// novelty variant.
pub fn cosine01(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.5;
    }
    (1.0 + dot / (na * nb)) / 2.0
}

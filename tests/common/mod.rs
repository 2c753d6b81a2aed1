//! Shared by the integration tests: the real SmolLM2 model, loaded once per test binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use selfedit::LoadedModel;

/// The default model: `$SELFEDIT_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_path() -> PathBuf {
    std::env::var_os("SELFEDIT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

pub fn smollm() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        assert!(path.exists(), "{} is missing: run `make model` (make test does it for you)", path.display());
        selfedit::load(&path, &Device::Cpu).expect("loading SmolLM2")
    })
}

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

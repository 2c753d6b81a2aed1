//! Choosing where a model runs and in which dtype.

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// `cpu` or `cuda:N` (the latter needs a build with `--features cuda`).
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .with_context(|| format!("device {s:?}: expected cuda:N"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("device {s:?} needs a CUDA build: rebuild with `cargo build --release --features cuda`");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device {other:?}: expected \"cpu\" or \"cuda:N\""),
    }
}

/// Compute dtype for a device: f32 on the CPU, bf16 on a GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

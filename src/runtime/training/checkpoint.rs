//! Checkpoints of a long run (the generator's SFT): the adapter, the optimizer's moments, the
//! step and the report, written atomically as one folder.

use std::path::Path;

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use super::{AdamW, TrainReport};
use crate::runtime::lora::LoraAdapter;

/// Where and how often a long run (the generator's SFT) saves its state: the adapter, the
/// optimizer's moments and the step. A run started again with the same folder resumes from
/// the last checkpoint and ends where an uninterrupted run would.
pub struct Checkpointing<'a> {
    pub dir: &'a Path,
    /// Save after every `every` optimizer steps (and when stopped).
    pub every: usize,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    adam_t: usize,
    report: TrainReport,
}

pub(super) fn save_checkpoint(dir: &Path, step: usize, adapter: &LoraAdapter, opt: &AdamW, report: &TrainReport) -> anyhow::Result<()> {
    let (t, m, v) = opt.state();
    let mut named = Vec::new();
    for (i, var) in adapter.vars().iter().enumerate() {
        named.push((format!("var.{i:05}"), var.as_tensor().clone()));
        named.push((format!("m.{i:05}"), m[i].clone()));
        named.push((format!("v.{i:05}"), v[i].clone()));
    }
    let state = CheckpointState { step, adam_t: t, report: report.clone() };
    crate::util::atomic::write_dir_atomically(dir, |tmp| {
        crate::runtime::formats::safetensors::save_safetensors(&named, &tmp.join("tensors.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string(&state)?)?;
        Ok(())
    })
}

/// Restores a checkpoint into `adapter` and `opt`; returns the step and report it holds.
pub(super) fn load_checkpoint(dir: &Path, adapter: &LoraAdapter, opt: &mut AdamW) -> anyhow::Result<Option<(usize, TrainReport)>> {
    let state_path = dir.join("state.json");
    let Ok(text) = std::fs::read_to_string(&state_path) else { return Ok(None) };
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is damaged ({e}): delete {} to start over", state_path.display(), dir.display()))?;
    let device = adapter.vars().first().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let tensors = candle_core::safetensors::load(dir.join("tensors.safetensors"), &device)
        .map_err(|e| anyhow::anyhow!("{}: {e}: delete {} to start over", dir.join("tensors.safetensors").display(), dir.display()))?;
    let vars = adapter.vars();
    let get = |name: String| {
        tensors
            .get(&name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor {name}: the checkpoint belongs to another adapter", dir.display()))
    };
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (i, var) in vars.iter().enumerate() {
        let value = get(format!("var.{i:05}"))?;
        ensure!(value.dims() == var.dims(), "{}: variable {i} has shape {:?}, the adapter {:?}", dir.display(), value.dims(), var.dims());
        var.set(&value)?;
        for (name, list) in [("m", &mut m), ("v", &mut v)] {
            let moment = get(format!("{name}.{i:05}"))?;
            ensure!(
                moment.dims() == var.dims(),
                "{}: moment {name} of variable {i} has shape {:?}, the variable {:?}",
                dir.display(),
                moment.dims(),
                var.dims()
            );
            list.push(moment);
        }
    }
    opt.set_state(state.adam_t, m, v);
    Ok(Some((state.step, state.report)))
}

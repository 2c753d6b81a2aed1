//! LoRA adapters: creation (PEFT's initialisation), the low-rank update in the forward pass,
//! PEFT-format save and load, and merging into the base weights.
//!
//! An adapter is a value separate from the base model: `Decoder::forward_*` takes it as an
//! argument, so one loaded base model serves any number of adapters.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::runtime::formats::safetensors::save_safetensors;
use crate::runtime::model::{Adapter, Decoder, LowRank, ModelConfig, Proj};

/// Shape of an adapter: PEFT's `r`, `lora_alpha`, `lora_dropout`, `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Proj>,
    /// PEFT's `use_rslora`: scale the update by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The paper's self-edit adapters: `q_proj` and `v_proj`.
    pub fn paper(rank: usize, alpha: f64, dropout: f64) -> Self {
        Self { rank, alpha, dropout, targets: vec![Proj::QProj, Proj::VProj], use_rslora: false }
    }
    /// The scale of the update: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (PEFT's rule).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// `A` is `[r, in]`, `B` is `[out, r]`; the update is `scale * x A^T B^T`.
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

pub struct LoraAdapter {
    pub config: LoraConfig,
    /// One map per decoder layer.
    layers: Vec<HashMap<Proj, LoraPair>>,
    /// Seeded dropout masks while training; `None` at inference.
    dropout_rng: Option<Mutex<StdRng>>,
}

impl LoraAdapter {
    /// A fresh adapter: `A` Kaiming-uniform as PEFT (`a = sqrt(5)`, i.e. U(±1/sqrt(in))),
    /// `B` zero, so the adapted model starts equal to the base model. Kept in f32.
    pub fn new(model: &ModelConfig, config: LoraConfig, seed: u64, device: &Device) -> anyhow::Result<Self> {
        ensure!(config.rank > 0, "LoRA rank must be positive, got {}", config.rank);
        ensure!((0.0..1.0).contains(&config.dropout), "LoRA dropout must be in [0, 1), got {}", config.dropout);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut map = HashMap::new();
            for &m in &config.targets {
                let (out_dim, in_dim) = m.shape(model);
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a: Vec<f32> = (0..config.rank * in_dim).map(|_| rng.random_range(-bound..bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, in_dim), device)?)?;
                let b = Var::zeros((out_dim, config.rank), DType::F32, device)?;
                map.insert(m, LoraPair { a, b });
            }
            layers.push(map);
        }
        Ok(Self { config, layers, dropout_rng: None })
    }

    /// Turns dropout on (seeded) for training, or off.
    pub fn set_training(&mut self, seed: Option<u64>) {
        self.dropout_rng = seed.map(|s| Mutex::new(StdRng::seed_from_u64(s)));
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn pair(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|m| m.get(&proj))
    }

    /// Every trainable variable, in a fixed order (layer, module, A then B).
    pub fn vars(&self) -> Vec<Var> {
        let mut out = Vec::new();
        for map in &self.layers {
            let mut mods: Vec<_> = map.keys().copied().collect();
            mods.sort();
            for m in mods {
                out.push(map[&m].a.clone());
                out.push(map[&m].b.clone());
            }
        }
        out
    }

    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    fn tensor_name(layer: usize, proj: Proj, ab: &str) -> String {
        format!("base_model.model.{}.lora_{ab}.weight", proj.path(layer))
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` in PEFT's format, so
    /// Python PEFT and vLLM load the adapter unchanged. The files are written to a temporary
    /// folder that is renamed into place, so a crash never leaves a half-written adapter.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
        let mut tensors = HashMap::new();
        for (i, map) in self.layers.iter().enumerate() {
            for (m, pair) in map {
                tensors.insert(Self::tensor_name(i, *m, "A"), pair.a.as_tensor().to_dtype(DType::F32)?);
                tensors.insert(Self::tensor_name(i, *m, "B"), pair.b.as_tensor().to_dtype(DType::F32)?);
            }
        }
        let mut targets: Vec<&str> = self.config.targets.iter().map(|m| m.name()).collect();
        targets.sort();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": self.config.use_rslora,
            "use_dora": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "revision": null,
        });
        crate::util::atomic::write_dir_atomically(dir, |tmp| {
            let mut named: Vec<(String, Tensor)> = tensors.into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            save_safetensors(&named, &tmp.join("adapter_model.safetensors"))?;
            std::fs::write(tmp.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;
            Ok(())
        })
    }

    /// Loads a PEFT LoRA adapter (ours or Python PEFT's) for `model`.
    pub fn load_peft(dir: &Path, model: &ModelConfig, device: &Device) -> anyhow::Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?)
                .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let field = |k: &str| raw.get(k).with_context(|| format!("{}: missing field {k:?}", cfg_path.display()));
        ensure!(field("peft_type")?.as_str() == Some("LORA"), "{}: peft_type must be \"LORA\"", cfg_path.display());
        refuse_unsupported(&raw, &cfg_path)?;
        let use_rslora = raw.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        let rank = field("r")?.as_u64().with_context(|| format!("{}: r must be an integer", cfg_path.display()))? as usize;
        let alpha = field("lora_alpha")?.as_f64().with_context(|| format!("{}: lora_alpha must be a number", cfg_path.display()))?;
        let dropout = raw.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let targets = match field("target_modules")? {
            serde_json::Value::Array(a) => {
                a.iter().map(|v| Proj::parse(v.as_str().unwrap_or_default())).collect::<anyhow::Result<Vec<_>>>()?
            }
            serde_json::Value::String(s) => vec![Proj::parse(s)?],
            v => bail!("{}: target_modules must be a list, got {v}", cfg_path.display()),
        };
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .with_context(|| format!("reading {} (is the adapter complete?)", weights_path.display()))?;
        let mut layers: Vec<HashMap<Proj, LoraPair>> = (0..model.num_hidden_layers).map(|_| HashMap::new()).collect();
        for (i, map) in layers.iter_mut().enumerate() {
            for &m in &targets {
                let get = |ab: &str| {
                    let name = Self::tensor_name(i, m, ab);
                    tensors
                        .get(&name)
                        .or_else(|| tensors.get(&name.replace(".weight", ".default.weight")))
                        .with_context(|| format!("{}: missing tensor {name}", weights_path.display()))
                        .and_then(|t| Ok(t.to_dtype(DType::F32)?))
                };
                let (a, b) = (get("A")?, get("B")?);
                let (out_dim, in_dim) = m.shape(model);
                ensure!(
                    a.dims() == [rank, in_dim] && b.dims() == [out_dim, rank],
                    "{}: layer {i} {}: lora_A {:?} / lora_B {:?} do not fit r={rank} and the model's [{out_dim}, {in_dim}]",
                    weights_path.display(),
                    m.name(),
                    a.dims(),
                    b.dims()
                );
                map.insert(m, LoraPair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
            }
        }
        // A tensor nothing above read (another layer's or module's, an embedding to save)
        // would be silently dropped: refuse instead.
        let expected: usize = layers.iter().map(|l| 2 * l.len()).sum();
        if tensors.len() != expected {
            let known: std::collections::HashSet<String> = (0..model.num_hidden_layers)
                .flat_map(|i| targets.iter().flat_map(move |&m| ["A", "B"].map(|ab| Self::tensor_name(i, m, ab))))
                .collect();
            let extra: Vec<&String> =
                tensors.keys().filter(|n| !known.contains(*n) && !known.contains(&n.replace(".default.weight", ".weight"))).collect();
            bail!(
                "{}: tensors {extra:?} belong to no targeted module of this {}-layer model; selfedit applies only lora_A/lora_B of target_modules",
                weights_path.display(),
                model.num_hidden_layers
            );
        }
        Ok(Self { config: LoraConfig { rank, alpha, dropout, targets, use_rslora }, layers, dropout_rng: None })
    }

    /// Adds `scale * B A` to every targeted weight of `decoder`.
    pub fn merge_into(&self, decoder: &mut Decoder) -> anyhow::Result<()> {
        ensure!(self.layers.len() == decoder.layers.len(), "adapter has {} layers, model {}", self.layers.len(), decoder.layers.len());
        for (i, map) in self.layers.iter().enumerate() {
            for (&m, pair) in map {
                let lin = decoder.linear_mut(i, m);
                let delta = (pair.b.as_tensor().matmul(pair.a.as_tensor())? * self.config.scale())?;
                let merged = (lin.weight.to_dtype(DType::F32)? + delta)?.to_dtype(lin.weight.dtype())?;
                lin.set_weight(merged)?;
            }
        }
        Ok(())
    }
}

/// `adapter_config.json` fields selfedit applies (`r`, `lora_alpha`, `lora_dropout`,
/// `target_modules`, `use_rslora`) or that cannot change what a trained adapter computes.
/// Every other field that is set (not null, false, empty or `"none"`) is refused by name,
/// so a setting added by a newer PEFT is never silently dropped.
const PEFT_FIELDS_UNDERSTOOD: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    // Bookkeeping.
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    // Initialisation schemes: they choose the starting A and B, which the file already holds.
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    // Only read together with a setting refused above (Megatron layers, QALoRA, tied modules to save).
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
];

fn refuse_unsupported(raw: &serde_json::Value, path: &Path) -> anyhow::Result<()> {
    let set = |v: &serde_json::Value| match v {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Object(o) => !o.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::String(s) => s != "none",
        serde_json::Value::Number(_) => true,
    };
    let object = raw.as_object().with_context(|| format!("{}: expected a JSON object", path.display()))?;
    for (field, v) in object {
        if !PEFT_FIELDS_UNDERSTOOD.contains(&field.as_str()) && set(v) {
            bail!(
                "{}: {field} = {v} may change the adapter's update and selfedit does not apply it; \
                 merge the adapter with PEFT (merge_and_unload) and load the merged model, or retrain without it",
                path.display()
            );
        }
    }
    Ok(())
}

impl LoraAdapter {
    /// The dropout mask of `rows` inputs of width `in_dim` (`[rows, in]`, kept inputs scaled
    /// by `1 / (1 - p)`), drawn from the training stream; `None` at inference or with p = 0.
    fn dropout_mask(&self, rows: usize, in_dim: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
        let (Some(rng), true) = (&self.dropout_rng, self.config.dropout > 0.0) else { return Ok(None) };
        let p = self.config.dropout;
        let keep = 1.0 / (1.0 - p);
        let mut rng = rng.lock().map_err(|_| candle_core::Error::Msg("dropout rng poisoned".into()))?;
        let mask: Vec<f32> = (0..rows * in_dim).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep as f32 }).collect();
        Ok(Some(Tensor::from_vec(mask, (rows, in_dim), device)?))
    }
}

impl Adapter for LoraAdapter {
    /// The low-rank update for `x` (`[.., in]`), or `None` when the module is not targeted:
    /// the one-segment case of `runtime::model::low_rank_update`, so an adapter alone
    /// and in a packed batch compute the same numbers.
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        let rows = x.elem_count() / in_dim;
        let Some(update) = self.low_rank(layer, proj, rows)? else { return Ok(None) };
        let Some(y) = crate::runtime::model::low_rank_update(&x.reshape((rows, in_dim))?, vec![(rows, update)])? else {
            return Ok(None);
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        Ok(Some(y.reshape(out)?))
    }

    fn factored(&self) -> bool {
        true
    }

    fn low_rank(&self, layer: usize, proj: Proj, rows: usize) -> candle_core::Result<Option<LowRank>> {
        let Some(pair) = self.pair(layer, proj) else { return Ok(Some(LowRank::Untouched)) };
        let mask = self.dropout_mask(rows, pair.a.dim(1)?, pair.a.device())?;
        Ok(Some(LowRank::Factors { a: pair.a.as_tensor().clone(), b: pair.b.as_tensor().clone(), scale: self.config.scale(), mask }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::model::Frozen;

    /// A saved adapter whose A or B alone has the wrong shape for `r` is refused by name.
    #[test]
    fn load_refuses_a_factor_of_the_wrong_shape() {
        let cfg = ModelConfig::tiny_for_tests();
        let dev = Device::Cpu;
        let lora = LoraAdapter::new(&cfg, LoraConfig::paper(4, 8.0, 0.0), 3, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        lora.save_peft(&path, "tiny").unwrap();
        LoraAdapter::load_peft(&path, &cfg, &dev).unwrap();
        let file = path.join("adapter_model.safetensors");
        let saved = candle_core::safetensors::load(&file, &dev).unwrap();
        // v_proj of layer 1 is [16, 32]: A must be [4, 32] and B [16, 4]
        for (ab, bad) in [("A", (5, 32)), ("B", (16, 5))] {
            let name = LoraAdapter::tensor_name(1, Proj::VProj, ab);
            let mut named: Vec<(String, Tensor)> = saved.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            named.iter_mut().filter(|(k, _)| *k == name).for_each(|(_, v)| *v = Tensor::zeros(bad, DType::F32, &dev).unwrap());
            save_safetensors(&named, &file).unwrap();
            let err = format!("{:#}", LoraAdapter::load_peft(&path, &cfg, &dev).err().expect("a misshapen factor is refused"));
            assert!(err.contains("layer 1 v_proj") && err.contains("do not fit r=4"), "lora_{ab}: {err}");
        }
    }

    /// PEFT's dropout on the update's input: each element is zeroed with probability p and
    /// the rest scaled by 1 / (1 - p). With A = B = I and scale 1 the update is the mask
    /// itself (2,048 draws per p: the zero fraction is within 5 standard deviations).
    #[test]
    fn dropout_zeroes_a_share_p_and_rescales_the_rest() {
        let cfg = ModelConfig::tiny_for_tests();
        let dev = Device::Cpu;
        for p in [0.1, 0.5] {
            let mut lora = LoraAdapter::new(&cfg, LoraConfig::paper(32, 32.0, p), 0, &dev).unwrap();
            let pair = lora.pair(0, Proj::QProj).unwrap();
            let eye = Tensor::eye(32, DType::F32, &dev).unwrap();
            pair.a.set(&eye).unwrap();
            pair.b.set(&eye).unwrap();
            lora.set_training(Some(5));
            let m: Vec<f32> = lora
                .delta(0, Proj::QProj, &Tensor::ones((1, 64, 32), DType::F32, &dev).unwrap())
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(m.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-5), "p {p}: values {:?}", &m[..8]);
            let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
            let sd = (p * (1.0 - p) / m.len() as f64).sqrt();
            assert!((zeros - p).abs() < 5.0 * sd, "p {p}: {zeros} of the inputs dropped");
        }
    }

    /// Fields of adapter_config.json selfedit does not apply are refused by name when set.
    #[test]
    fn unknown_peft_settings_are_refused_by_name() {
        let cfg = ModelConfig::tiny_for_tests();
        let dir = tempfile::tempdir().unwrap();
        LoraAdapter::new(&cfg, LoraConfig::paper(2, 4.0, 0.0), 3, &Device::Cpu).unwrap().save_peft(dir.path(), "tiny").unwrap();
        let path = dir.path().join("adapter_config.json");
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (field, value, refused) in [("use_dora", true, true), ("use_dora", false, false), ("layers_to_transform", true, true)] {
            let mut c = saved.clone();
            c[field] = serde_json::json!(value);
            std::fs::write(&path, c.to_string()).unwrap();
            match LoraAdapter::load_peft(dir.path(), &cfg, &Device::Cpu) {
                Ok(_) => assert!(!refused, "{field} = {value} was accepted"),
                Err(e) => assert!(refused && format!("{e:#}").contains(field), "{field} = {value}: {e:#}"),
            }
        }
    }

    /// PEFT's update `y = scale · x Aᵀ Bᵀ` with `scale = alpha / r` (or `alpha / sqrt(r)`
    /// with rsLoRA), computed element by element in f64 from the adapter's own A and B.
    #[test]
    fn update_is_peft_scaled_low_rank_product() {
        let cfg = ModelConfig::tiny_for_tests();
        let dev = Device::Cpu;
        for (rslora, want_scale) in [(false, 12.0 / 3.0), (true, 12.0 / 3f64.sqrt())] {
            let config = LoraConfig { use_rslora: rslora, ..LoraConfig::paper(3, 12.0, 0.0) };
            assert!((config.scale() - want_scale).abs() < 1e-12, "rslora {rslora}: scale {}", config.scale());
            let lora = LoraAdapter::new(&cfg, config, 11, &dev).unwrap();
            let pair = lora.pair(0, Proj::VProj).unwrap();
            pair.b.set(&Tensor::randn(0f32, 1.0, pair.b.shape(), &dev).unwrap()).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 32), &dev).unwrap();
            let got: Vec<f32> = lora.delta(0, Proj::VProj, &x).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (pair.a.to_vec2().unwrap(), pair.b.to_vec2().unwrap());
            let xs: Vec<Vec<f32>> = x.reshape((6, 32)).unwrap().to_vec2().unwrap();
            assert_eq!(got.len(), 6 * b.len());
            for (row, xr) in xs.iter().enumerate() {
                let xa: Vec<f64> = a.iter().map(|ar| ar.iter().zip(xr).map(|(&p, &q)| p as f64 * q as f64).sum()).collect();
                for (o, br) in b.iter().enumerate() {
                    let want = want_scale * br.iter().zip(&xa).map(|(&p, q)| p as f64 * q).sum::<f64>();
                    let g = got[row * b.len() + o] as f64;
                    assert!((g - want).abs() < 1e-4 * (1.0 + want.abs()), "row {row} out {o}: {g} against {want}");
                }
            }
        }
    }

    /// Generation wraps adapters in `Frozen`: same update, but nothing downstream records
    /// a graph (a 64-row prefill held 3.6 GB of graph without it).
    #[test]
    fn frozen_update_is_equal_and_untracked() {
        let cfg = ModelConfig::tiny_for_tests();
        let dev = Device::Cpu;
        let lora = LoraAdapter::new(&cfg, LoraConfig::paper(4, 8.0, 0.0), 7, &dev).unwrap();
        // B starts at zero as in PEFT; give it values so the update is not trivially zero
        let b = &lora.pair(1, Proj::QProj).unwrap().b;
        b.set(&Tensor::randn(0f32, 1.0, b.shape(), &dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 32), &dev).unwrap();
        let live = lora.delta(1, Proj::QProj, &x).unwrap().unwrap();
        let frozen = Frozen(&lora).delta(1, Proj::QProj, &x).unwrap().unwrap();
        assert!(live.track_op() && !frozen.track_op());
        // Training's products (the f32 kernel where it fits) and inference's (the library)
        // agree to float rounding: a few ulps over a sum of 4 terms, well under 1e-6 of the
        // largest entry, which a wrong or zero update is not. (OpenBLAS's SkylakeX kernels
        // happen to round as the kernel does; candle's gemm came out one ulp apart.) Without
        // AVX-512 both take the library, the same code, so the same bits.
        let diff: f32 = (live - &frozen).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let largest: f32 = frozen.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(largest > 0.0);
        assert!(diff <= 1e-6 * largest, "frozen update {diff} from the live one, largest entry {largest}");
        if !crate::runtime::sgemm::available() {
            assert_eq!(diff, 0.0);
        }
        assert!(Frozen(&lora).delta(1, Proj::KProj, &x).unwrap().is_none());
        // and in factored form (what a packed batch of adapters takes), cut from the graph too
        match Frozen(&lora).low_rank(1, Proj::QProj, 3).unwrap() {
            Some(LowRank::Factors { a, b, scale, mask: None }) => {
                assert!(!a.track_op() && !b.track_op());
                assert_eq!(scale, lora.config.scale());
                assert_eq!(b.to_vec2::<f32>().unwrap(), lora.pair(1, Proj::QProj).unwrap().b.to_vec2::<f32>().unwrap());
            }
            _ => panic!("a frozen LoRA adapter has factors"),
        }
        assert!(matches!(Frozen(&lora).low_rank(1, Proj::KProj, 3).unwrap(), Some(LowRank::Untouched)));
        // a pass's parts: one segment of all rows, cut from the graph; so a frozen adapter
        // still takes the layer-as-one-node path
        assert!(lora.factored() && Frozen(&lora).factored());
        match Frozen(&lora).low_rank_parts(1, Proj::QProj, (2, 3)).unwrap().as_deref() {
            Some([(6, LowRank::Factors { a, b, .. })]) => assert!(!a.track_op() && !b.track_op()),
            _ => panic!("one segment of 6 rows with factors"),
        }
    }
}

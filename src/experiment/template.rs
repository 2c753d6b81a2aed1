//! The self-edit template's hyperparameters: one definition of the set, its JSON schema,
//! parsing of what a model wrote, and clamping into the config's bounds.
//!
//! Adding a hyperparameter is one line in the [`hyperparameters!`] invocation below: the
//! struct, the bounds, the schema, the Parquet columns of every table that holds a template
//! (through [`crate::experiment::tables`]), the archive prompt and the collapse analysis
//! all follow from it.

use anyhow::bail;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Inclusive bounds of one hyperparameter; values outside are clamped (and the row says so).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    pub min: f64,
    pub max: f64,
}

/// A hyperparameter's value type: an integer (rounded from what the model wrote) or a real.
pub trait HyperValue: Copy {
    const INTEGER: bool;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl HyperValue for i64 {
    const INTEGER: bool = true;
    fn from_f64(x: f64) -> Self {
        if x.is_finite() {
            x.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64
        } else {
            0
        }
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl HyperValue for f64 {
    const INTEGER: bool = false;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

macro_rules! hyperparameters {
    ($($(#[$m:meta])* $name:ident : $ty:ident),* $(,)?) => {
        /// The hyperparameters of a self-edit template: the LoRA adapter's shape and its
        /// training, as the paper's template JSON names them.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Hyperparameters { $($(#[$m])* pub $name: $ty),* }

        /// The config's `[hyperparameter_bounds]`: inclusive bounds per hyperparameter.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct HyperparameterBounds { $(pub $name: Bounds),* }

        impl Hyperparameters {
            /// The names, in column order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];
            /// Whether each is an integer, in column order.
            pub const INTEGER: &'static [bool] = &[$(<$ty as HyperValue>::INTEGER),*];

            /// The values as reals, in [`Self::NAMES`] order.
            pub fn values(&self) -> Vec<f64> {
                vec![$(self.$name.to_f64()),*]
            }

            /// From reals in [`Self::NAMES`] order (integers rounded; non-finite ones 0).
            ///
            /// Panics when `v` has fewer than [`Self::NAMES`] values.
            pub fn from_values(v: &[f64]) -> Self {
                let mut it = v.iter().copied();
                Self { $($name: <$ty as HyperValue>::from_f64(it.next().expect("one value per hyperparameter"))),* }
            }
        }

        impl HyperparameterBounds {
            /// The bounds in [`Hyperparameters::NAMES`] order.
            pub fn values(&self) -> Vec<Bounds> {
                vec![$(self.$name),*]
            }
        }
    };
}

hyperparameters! {
    lora_rank: i64,
    lora_alpha: i64,
    lora_dropout: f64,
    learning_rate: f64,
    num_epochs: i64,
    gradient_accumulation_steps: i64,
}

impl Hyperparameters {
    /// The JSON object the model writes (`{"lora_rank": 32, ...}`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain numbers serialize")
    }

    /// JSON schema of the `hyperparameters` object as the model must write it.
    ///
    /// The numbers carry wide syntactic limits (integers 0..=1e6, reals 0..=100): without them
    /// a small model can write digits forever inside the grammar. The config's tighter bounds
    /// are applied after parsing, by [`Hyperparameters::clamp`].
    pub fn schema() -> serde_json::Value {
        let mut props = serde_json::Map::new();
        for (name, integer) in Self::NAMES.iter().zip(Self::INTEGER) {
            let p = if *integer {
                json!({"type": "integer", "minimum": 0, "maximum": 1000000})
            } else {
                json!({"type": "number", "minimum": 0, "maximum": 100})
            };
            props.insert(name.to_string(), p);
        }
        json!({"type": "object", "properties": props, "required": Self::NAMES, "additionalProperties": false})
    }

    /// Clamps each value into its bounds; returns the clamped values and a note per value
    /// that changed. Non-finite values cannot be clamped and are errors naming the key.
    pub fn clamp(&self, bounds: &HyperparameterBounds) -> anyhow::Result<(Hyperparameters, Vec<String>)> {
        let mut notes = Vec::new();
        let mut out = Vec::new();
        for ((name, v), b) in Self::NAMES.iter().zip(self.values()).zip(bounds.values()) {
            if !v.is_finite() {
                bail!("{name} = {v} is not a finite number");
            }
            let c = v.clamp(b.min, b.max);
            if c != v {
                notes.push(format!("{name} {v} clamped to {c} (bounds [{}, {}])", b.min, b.max));
            }
            out.push(c);
        }
        Ok((Self::from_values(&out), notes))
    }

    /// Reads the `hyperparameters` object a model wrote: every key present, numbers as the
    /// model wrote them (reals even for integer keys, so `1e9` parses; integers rounded).
    pub fn from_model_json(v: &serde_json::Value) -> Result<Self, String> {
        let obj = v.as_object().ok_or("hyperparameters is not an object")?;
        let mut vals = Vec::new();
        for name in Self::NAMES {
            let x = obj.get(*name).and_then(|x| x.as_f64()).ok_or_else(|| format!("hyperparameters.{name} is missing or not a number"))?;
            vals.push(x);
        }
        Ok(Self::from_values(&vals))
    }
}

/// JSON schema of a whole template: the instruction (at most `instruction_max_chars`
/// characters) and the hyperparameters.
pub fn template_schema(instruction_max_chars: usize) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "data_creation_instruction": {"type": "string", "minLength": 1, "maxLength": instruction_max_chars},
            "hyperparameters": Hyperparameters::schema()
        },
        "required": ["data_creation_instruction", "hyperparameters"],
        "additionalProperties": false
    })
}

/// A template as a model writes it (and as the archive prompt shows it).
pub fn template_json(instruction: &str, h: &Hyperparameters) -> serde_json::Value {
    json!({"data_creation_instruction": instruction, "hyperparameters": h.to_json()})
}

/// A parsed template response: the instruction and the hyperparameters, unclamped.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedTemplate {
    pub instruction: String,
    pub hyperparameters: Hyperparameters,
}

/// Parses a model's template response (`{"data_creation_instruction", "hyperparameters"}`);
/// the error says what is wrong with it.
pub fn parse_template_json(raw: &str) -> Result<ParsedTemplate, String> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("response is not a template JSON object: {e}"))?;
    let instruction = v
        .get("data_creation_instruction")
        .and_then(|x| x.as_str())
        .ok_or("response is not a template JSON object: no data_creation_instruction string")?;
    let h = v.get("hyperparameters").ok_or("response is not a template JSON object: no hyperparameters")?;
    Ok(ParsedTemplate {
        instruction: instruction.trim().to_string(),
        hyperparameters: Hyperparameters::from_model_json(h).map_err(|e| format!("response is not a template JSON object: {e}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_schema_and_clamp_agree() {
        let h = Hyperparameters {
            lora_rank: 1000,
            lora_alpha: 16,
            lora_dropout: 0.1,
            learning_rate: 1e-3,
            num_epochs: 3,
            gradient_accumulation_steps: 2,
        };
        assert_eq!(Hyperparameters::from_values(&h.values()), h);
        let schema = Hyperparameters::schema();
        assert_eq!(schema["required"].as_array().unwrap().len(), Hyperparameters::NAMES.len());
        assert_eq!(schema["properties"]["lora_rank"]["type"], "integer");
        assert_eq!(schema["properties"]["learning_rate"]["type"], "number");
        let b = Bounds { min: 1.0, max: 64.0 };
        let bounds = HyperparameterBounds {
            lora_rank: b,
            lora_alpha: Bounds { min: 1.0, max: 256.0 },
            lora_dropout: Bounds { min: 0.0, max: 0.5 },
            learning_rate: Bounds { min: 1e-5, max: 5e-3 },
            num_epochs: b,
            gradient_accumulation_steps: b,
        };
        let (c, notes) = h.clamp(&bounds).unwrap();
        assert_eq!(c.lora_rank, 64);
        assert_eq!(notes, vec!["lora_rank 1000 clamped to 64 (bounds [1, 64])".to_string()]);
        let p = parse_template_json(
            r#"{"data_creation_instruction": " x ", "hyperparameters": {"lora_rank": 7.6, "lora_alpha": 1e9,
            "lora_dropout": 0, "learning_rate": 0.001, "num_epochs": 2, "gradient_accumulation_steps": 1}}"#,
        )
        .unwrap();
        assert_eq!((p.instruction.as_str(), p.hyperparameters.lora_rank, p.hyperparameters.lora_alpha), ("x", 8, 1_000_000_000));
        assert!(parse_template_json(r#"{"data_creation_instruction": "x", "hyperparameters": {"lora_rank": 1}}"#)
            .unwrap_err()
            .contains("lora_alpha"));
    }
}

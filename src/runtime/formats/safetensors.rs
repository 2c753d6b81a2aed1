//! Writing safetensors files (a merged model, an adapter, a training checkpoint). Reading
//! goes through candle's loader.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::bail;
use candle_core::{DType, Tensor};

/// A tensor's bytes, little-endian, ready for `safetensors::View`.
struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: candle_core::WithDType, const N: usize>(t: &Tensor, f: impl Fn(T) -> [u8; N]) -> candle_core::Result<Vec<u8>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?.into_iter().flat_map(f).collect())
}

fn tensor_bytes(name: &str, t: &Tensor) -> anyhow::Result<TensorBytes> {
    use safetensors::Dtype as S;
    let (dtype, data) = match t.dtype() {
        DType::F32 => (S::F32, le_bytes::<f32, 4>(t, f32::to_le_bytes)?),
        DType::BF16 => (S::BF16, le_bytes::<half::bf16, 2>(t, half::bf16::to_le_bytes)?),
        DType::F16 => (S::F16, le_bytes::<half::f16, 2>(t, half::f16::to_le_bytes)?),
        DType::F64 => (S::F64, le_bytes::<f64, 8>(t, f64::to_le_bytes)?),
        DType::U32 => (S::U32, le_bytes::<u32, 4>(t, u32::to_le_bytes)?),
        DType::I64 => (S::I64, le_bytes::<i64, 8>(t, i64::to_le_bytes)?),
        DType::U8 => (S::U8, t.flatten_all()?.to_vec1::<u8>()?),
        other => bail!("tensor {name}: dtype {other:?} cannot be written to safetensors by selfedit"),
    };
    Ok(TensorBytes { dtype, shape: t.dims().to_vec(), data })
}

/// Writes `tensors` as a safetensors file with `format: pt` metadata, atomically (a
/// temporary file renamed into place). Errors name the tensor whose dtype is unsupported.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> anyhow::Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut owned = BTreeMap::new();
    for (k, v) in tensors {
        owned.insert(k.clone(), tensor_bytes(k, v)?);
    }
    let views: Vec<(&String, &TensorBytes)> = owned.iter().collect();
    crate::util::atomic::write_file_atomically(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)?;
        Ok(())
    })
}

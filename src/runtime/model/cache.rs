//! What a forward pass is given besides the weights: the token batch with its positions and
//! mask, and the KV cache the caller owns.

use candle_core::{DType, Device, Result, Tensor};

use super::config::ModelConfig;

/// Preallocated keys and values for every layer, `[batch, kv_heads, capacity, head_dim]`.
/// Owned by the caller, so a batch's cache lives exactly as long as its generation.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (batch, cfg.kv_heads(), capacity, cfg.head_dim());
        let mut keys = Vec::with_capacity(cfg.num_hidden_layers);
        let mut values = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            keys.push(Tensor::zeros(shape, dtype, device)?);
            values.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self { keys, values, len: 0, capacity })
    }
    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Marks `n` more positions as stored (after every layer has appended them).
    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }
    /// A cache of the rows `rows` of this one, in that order (a row may repeat): the
    /// same positions stored, the same capacity. For rows that share a prompt (prefilled
    /// once, then copied) and for dropping finished rows from a batch.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let Some(first) = self.keys.first() else {
            return Ok(Self { keys: vec![], values: vec![], len: self.len, capacity: self.capacity });
        };
        let index = Tensor::new(rows, first.device())?;
        let pick = |ts: &[Tensor]| ts.iter().map(|t| t.index_select(&index, 0)).collect::<Result<Vec<_>>>();
        Ok(Self { keys: pick(&self.keys)?, values: pick(&self.values)?, len: self.len, capacity: self.capacity })
    }
    /// The whole preallocated keys and values of `layer`, `[batch, kv_heads, capacity,
    /// head_dim]`, of which the first [`Self::len`] positions are stored (plus those appended
    /// by the forward pass in progress): for attention that reads the cache where it lies.
    pub(super) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }
    /// Writes this step's keys and values of `layer` and returns all of them so far.
    pub(super) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        if self.len + new > self.capacity {
            candle_core::bail!("KV cache full: {} + {new} > capacity {}", self.len, self.capacity);
        }
        self.keys[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.values[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + new;
        Ok((self.keys[layer].narrow(2, 0, total)?, self.values[layer].narrow(2, 0, total)?))
    }
}

/// What one forward pass sees: token ids `[b, l]`, their positions `[b, l]` (u32), and an
/// additive attention mask `[b, 1, l, cached + l]` (0 = attend, -inf = masked).
///
/// A *packed* batch (`segments` set, `b` = 1, no cache) holds several independent sequences
/// end to end: positions restart at 0 in each segment, and attention runs per segment with
/// its own causal mask, so each sequence sees exactly what it would see alone.
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: Option<Tensor>,
    /// `(start, len)` of each packed sequence along the `l` axis, in order, covering it.
    pub segments: Option<Vec<(usize, usize)>>,
}

impl Batch {
    /// One unpadded sequence starting at position `start` with a causal mask.
    pub fn causal(ids: &[u32], start: usize, device: &Device, dtype: DType) -> Result<Self> {
        let l = ids.len();
        let ids_t = Tensor::new(ids, device)?.unsqueeze(0)?;
        let pos: Vec<u32> = (start..start + l).map(|p| p as u32).collect();
        let positions = Tensor::new(pos.as_slice(), device)?.unsqueeze(0)?;
        let mask = if l > 1 { Some(causal_mask(1, l, start, &[0], device, dtype)?) } else { None };
        Ok(Self { ids: ids_t, positions, mask, segments: None })
    }

    /// Sequences packed end to end into one row `[1, Σ len]`, each at positions `0..len`.
    pub fn packed(seqs: &[&[u32]], device: &Device) -> Result<Self> {
        let (mut ids, mut pos, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        for s in seqs {
            segments.push((ids.len(), s.len()));
            ids.extend_from_slice(s);
            pos.extend(0..s.len() as u32);
        }
        let n = ids.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (1, n), device)?,
            positions: Tensor::from_vec(pos, (1, n), device)?,
            mask: None,
            segments: Some(segments),
        })
    }
}

/// Additive mask for `l` new positions after `cached` ones, for `b` rows where row `r` has
/// `left_pad[r]` padding positions at the start (never attended to).
pub fn causal_mask(b: usize, l: usize, cached: usize, left_pad: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
    let total = cached + l;
    let mut m = vec![0f32; b * l * total];
    for r in 0..b {
        for i in 0..l {
            for j in 0..total {
                // A padding query attends to itself only (an all-masked row would give NaN,
                // which would reach real rows through the values).
                let is_pad_query = cached + i < left_pad[r];
                if j > cached + i || (j < left_pad[r] && !(is_pad_query && j == cached + i)) {
                    m[(r * l + i) * total + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, total), device)?.to_dtype(dtype)
}

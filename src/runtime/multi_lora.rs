//! Many adapters over one frozen base in one forward pass: the segmented-matmul idea of
//! punica and S-LoRA, on any [`Adapter`].
//!
//! The frozen projections run once over the whole batch (one tall matmul); the low-rank
//! update is computed per segment of consecutive rows that share an adapter, each at exactly
//! the shape it would have alone, so a segment's numbers (and its dropout draws) do not
//! depend on its neighbours.

use candle_core::{Result, Tensor};

use crate::runtime::model::{Adapter, Proj};

/// Which axis of the activations `[b, l, in]` the segments run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentAxis {
    /// Batch rows (generation: each row is one request).
    Rows,
    /// Token positions of a packed row (training: see `Batch::packed`).
    Tokens,
}

/// One adapter per segment: `(start, len, adapter)` along `axis`, in order and covering the
/// axis; `None` leaves a segment on the base model.
pub struct SegmentedAdapters<'a> {
    pub axis: SegmentAxis,
    pub segments: Vec<(usize, usize, Option<&'a dyn Adapter>)>,
}

impl<'a> SegmentedAdapters<'a> {
    /// Segments from one adapter per item (per row or per packed sequence), merging runs of
    /// consecutive items that share an adapter into one segment.
    pub fn new(axis: SegmentAxis, items: &[(usize, Option<&'a dyn Adapter>)]) -> Self {
        let mut segments: Vec<(usize, usize, Option<&'a dyn Adapter>)> = Vec::new();
        let mut start = 0;
        for &(len, adapter) in items {
            match segments.last_mut() {
                Some(last) if same(last.2, adapter) => last.1 += len,
                _ => segments.push((start, len, adapter)),
            }
            start += len;
        }
        Self { axis, segments }
    }
}

fn same(a: Option<&dyn Adapter>, b: Option<&dyn Adapter>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::addr_eq(a as *const dyn Adapter, b as *const dyn Adapter),
        (None, None) => true,
        _ => false,
    }
}

impl Adapter for SegmentedAdapters<'_> {
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let dim = match self.axis {
            SegmentAxis::Rows => 0,
            SegmentAxis::Tokens => 1,
        };
        let mut parts: Vec<(usize, Option<Tensor>)> = Vec::with_capacity(self.segments.len());
        for &(start, len, adapter) in &self.segments {
            let delta = match adapter {
                Some(a) => a.delta(layer, proj, &x.narrow(dim, start, len)?)?,
                None => None,
            };
            parts.push((len, delta));
        }
        // the output width and dtype come from any segment that has an update
        let Some(like) = parts.iter().find_map(|(_, d)| d.clone()) else { return Ok(None) };
        let parts = parts
            .into_iter()
            .map(|(len, d)| match d {
                Some(d) => Ok(d),
                None => {
                    let mut shape = like.dims().to_vec();
                    shape[dim] = len;
                    Tensor::zeros(shape, like.dtype(), like.device())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, dim)?))
    }
}

//! Many adapters over one frozen base in one forward pass: the segmented-matmul idea of
//! punica and S-LoRA, on any [`Adapter`].
//!
//! The frozen projections run once over the whole batch (one tall matmul); the low-rank
//! update is computed per segment of consecutive rows that share an adapter, each at exactly
//! the shape it would have alone, so a segment's numbers (and its dropout draws) do not
//! depend on its neighbours.

use candle_core::{Result, Tensor};

use crate::runtime::model::{low_rank_update, Adapter, LowRank, Proj};

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
    fn factored(&self) -> bool {
        self.segments.iter().all(|&(_, _, a)| a.is_none_or(|a| a.factored()))
    }

    /// Each segment's update at its own rows: a segment of `len` items holds `len` rows of
    /// one packed row (tokens axis, `b` = 1) or `len` batch rows of `l` tokens each.
    fn low_rank_parts(&self, layer: usize, proj: Proj, (b, l): (usize, usize)) -> Result<Option<Vec<(usize, LowRank)>>> {
        let items: usize = self.segments.iter().map(|s| s.1).sum();
        let per_unit = match self.axis {
            SegmentAxis::Tokens if b == 1 && items == l => 1,
            SegmentAxis::Rows if items == b => l,
            _ => candle_core::bail!("segments of {items} items along {:?} for activations of {b} rows of {l} tokens", self.axis),
        };
        let mut parts = Vec::with_capacity(self.segments.len());
        for &(_, len, adapter) in &self.segments {
            let rows = len * per_unit;
            let update = match adapter {
                None => LowRank::Untouched,
                Some(a) => match a.low_rank(layer, proj, rows)? {
                    Some(u) => u,
                    None => return Ok(None),
                },
            };
            parts.push((rows, update));
        }
        Ok(Some(parts))
    }

    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let dim = match self.axis {
            SegmentAxis::Rows => 0,
            SegmentAxis::Tokens => 1,
        };
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        // rows of `x` flattened to [n, in] per unit of the segment axis (a segment's rows are
        // consecutive there when it runs along the batch, or along the tokens of one row)
        let per_unit = match (self.axis, dims.len()) {
            (SegmentAxis::Rows, _) => x.elem_count() / in_dim / dims[0],
            (SegmentAxis::Tokens, 3) if dims[0] == 1 => 1,
            _ => candle_core::bail!("segmented adapters along tokens need activations [1, l, in], got {dims:?}"),
        };
        // 1. each segment's update, in factored form where its adapter has one (each
        //    adapter asked once, so its dropout stream advances as it would alone)
        let mut parts: Vec<(usize, usize, Part)> = Vec::with_capacity(self.segments.len());
        for &(start, len, adapter) in &self.segments {
            let part = match adapter {
                None => Part::Factored(LowRank::Untouched),
                Some(a) => match a.low_rank(layer, proj, len * per_unit)? {
                    Some(update) => Part::Factored(update),
                    None => Part::Opaque(a),
                },
            };
            parts.push((start, len, part));
        }
        // 2. all factored: one op over every segment
        if parts.iter().all(|p| matches!(p.2, Part::Factored(_))) {
            let n = x.elem_count() / in_dim;
            let updates = parts
                .into_iter()
                .map(|(_, len, p)| match p {
                    Part::Factored(u) => (len * per_unit, u),
                    Part::Opaque(_) => unreachable!("checked above"),
                })
                .collect();
            let Some(y) = low_rank_update(&x.reshape((n, in_dim))?, updates)? else { return Ok(None) };
            let mut out = dims;
            *out.last_mut().unwrap() = y.dim(1)?;
            return Ok(Some(y.reshape(out)?));
        }
        // 3. otherwise segment by segment, zeros where a segment has no update
        let mut deltas: Vec<(usize, Option<Tensor>)> = Vec::with_capacity(parts.len());
        for (start, len, part) in parts {
            let xs = x.narrow(dim, start, len)?;
            let delta = match part {
                Part::Opaque(a) => a.delta(layer, proj, &xs)?,
                Part::Factored(u) => {
                    let rows = len * per_unit;
                    low_rank_update(&xs.reshape((rows, in_dim))?, vec![(rows, u)])?
                        .map(|y| {
                            let mut out = xs.dims().to_vec();
                            *out.last_mut().unwrap() = y.dim(1)?;
                            y.reshape(out)
                        })
                        .transpose()?
                }
            };
            deltas.push((len, delta));
        }
        // the output width and dtype come from any segment that has an update
        let Some(like) = deltas.iter().find_map(|(_, d)| d.clone()) else { return Ok(None) };
        let deltas = deltas
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
        Ok(Some(Tensor::cat(&deltas, dim)?))
    }
}

/// A segment's update: factors, or only the adapter's own `delta`.
enum Part<'a> {
    Factored(LowRank),
    Opaque(&'a dyn Adapter),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::lora::{LoraAdapter, LoraConfig};
    use crate::runtime::model::ModelConfig;
    use candle_core::{DType, Device};

    fn adapter(seed: u64) -> LoraAdapter {
        let cfg = ModelConfig::tiny_for_tests();
        let a = LoraAdapter::new(&cfg, LoraConfig::paper(2, 4.0, 0.0), seed, &Device::Cpu).unwrap();
        let b = &a.pair(0, Proj::QProj).unwrap().b;
        b.set(&Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu).unwrap()).unwrap();
        a
    }

    /// Runs of items sharing an adapter merge into one segment; the update of each segment
    /// is its adapter's update of those rows alone, zeros where an item has no adapter.
    #[test]
    fn segments_merge_runs_and_apply_each_adapter_to_its_rows() {
        let (a, b) = (adapter(1), adapter(2));
        let (a, b): (&dyn Adapter, &dyn Adapter) = (&a, &b);
        let items = [(2, Some(a)), (1, Some(a)), (3, None), (1, None), (2, Some(b)), (1, None), (2, Some(a))];
        let seg = SegmentedAdapters::new(SegmentAxis::Tokens, &items);
        let spans: Vec<(usize, usize, Option<bool>)> = seg
            .segments
            .iter()
            .map(|&(s, l, ad)| (s, l, ad.map(|x| std::ptr::addr_eq(x as *const dyn Adapter, a as *const dyn Adapter))))
            .collect();
        assert_eq!(spans, [(0, 3, Some(true)), (3, 4, None), (7, 2, Some(false)), (9, 1, None), (10, 2, Some(true))]);
        let x = Tensor::randn(0f32, 1.0, (1, 12, 32), &Device::Cpu).unwrap();
        let got = seg.delta(0, Proj::QProj, &x).unwrap().unwrap();
        assert_eq!(got.dims(), [1, 12, 32]);
        for &(start, len, ad) in &seg.segments {
            let part = got.narrow(1, start, len).unwrap();
            let want = match ad {
                Some(ad) => ad.delta(0, Proj::QProj, &x.narrow(1, start, len).unwrap()).unwrap().unwrap(),
                None => Tensor::zeros((1, len, 32), DType::F32, &Device::Cpu).unwrap(),
            };
            let diff: f32 = (part - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0, "segment at {start}");
        }
        // rows along the batch axis; a projection no adapter targets has no update
        let rows = SegmentedAdapters::new(SegmentAxis::Rows, &[(1, Some(b)), (1, None)]);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32), &Device::Cpu).unwrap();
        let got = rows.delta(0, Proj::QProj, &x).unwrap().unwrap();
        let want = b.delta(0, Proj::QProj, &x.narrow(0, 0, 1).unwrap()).unwrap().unwrap();
        assert_eq!((got.narrow(0, 0, 1).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(got.narrow(0, 1, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert!(rows.delta(0, Proj::KProj, &x).unwrap().is_none());
        assert!(SegmentedAdapters::new(SegmentAxis::Rows, &[(2, None)]).delta(0, Proj::QProj, &x).unwrap().is_none());
    }

    /// With dropout on, a packed batch draws each adapter's mask from its own stream as it
    /// would alone: the update of each segment equals that adapter's update of those rows,
    /// computed by a twin with the same seed, and differs from the update without dropout.
    #[test]
    fn dropout_in_a_packed_batch_draws_as_alone() {
        let dev = Device::Cpu;
        let cfg = ModelConfig::tiny_for_tests();
        let make = |seed: u64, rank: usize| {
            let mut a = LoraAdapter::new(&cfg, LoraConfig::paper(rank, 8.0, 0.5), seed, &dev).unwrap();
            for layer in 0..2 {
                let b = &a.pair(layer, Proj::QProj).unwrap().b;
                b.set(&Tensor::randn(0f32, 1.0, b.shape(), &dev).unwrap()).unwrap();
            }
            a.set_training(Some(seed + 100));
            a
        };
        let (p, q) = (make(1, 2), make(2, 3));
        // twins: same initial draws, but the B set above is random, so copy p's and q's
        let (p2, q2) = (make(1, 2), make(2, 3));
        for (x, y) in [(&p, &p2), (&q, &q2)] {
            for layer in 0..2 {
                y.pair(layer, Proj::QProj).unwrap().b.set(x.pair(layer, Proj::QProj).unwrap().b.as_tensor()).unwrap();
            }
        }
        let seg = SegmentedAdapters::new(SegmentAxis::Tokens, &[(3, Some(&p as &dyn Adapter)), (2, None), (4, Some(&q as &dyn Adapter))]);
        let x = Tensor::randn(0f32, 1.0, (1, 9, 32), &dev).unwrap();
        for layer in 0..2 {
            let got = seg.delta(layer, Proj::QProj, &x).unwrap().unwrap();
            let alone_p = p2.delta(layer, Proj::QProj, &x.narrow(1, 0, 3).unwrap()).unwrap().unwrap();
            let alone_q = q2.delta(layer, Proj::QProj, &x.narrow(1, 5, 4).unwrap()).unwrap().unwrap();
            let diff = |a: &Tensor, b: &Tensor| -> f32 { (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
            assert_eq!(diff(&got.narrow(1, 0, 3).unwrap(), &alone_p), 0.0, "layer {layer}: first adapter");
            assert_eq!(diff(&got.narrow(1, 5, 4).unwrap(), &alone_q), 0.0, "layer {layer}: second adapter");
            assert_eq!(got.narrow(1, 3, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            // dropout did act: the update without it differs
            let mut plain = make(1, 2);
            plain.set_training(None);
            plain.pair(layer, Proj::QProj).unwrap().b.set(p.pair(layer, Proj::QProj).unwrap().b.as_tensor()).unwrap();
            let undropped = plain.delta(layer, Proj::QProj, &x.narrow(1, 0, 3).unwrap()).unwrap().unwrap();
            assert!(diff(&undropped, &alone_p) > 1e-3, "layer {layer}: dropout had no effect");
        }
        // along the batch axis a segment of one row holds that row's tokens, and its mask
        // covers them all: as alone, again from twins
        let (p3, q3) = (make(1, 2), make(2, 3));
        for (x, y) in [(&p, &p3), (&q, &q3)] {
            y.pair(0, Proj::QProj).unwrap().b.set(x.pair(0, Proj::QProj).unwrap().b.as_tensor()).unwrap();
        }
        let (p4, q4) = (make(1, 2), make(2, 3));
        for (x, y) in [(&p, &p4), (&q, &q4)] {
            y.pair(0, Proj::QProj).unwrap().b.set(x.pair(0, Proj::QProj).unwrap().b.as_tensor()).unwrap();
        }
        let rows = SegmentedAdapters::new(SegmentAxis::Rows, &[(1, Some(&p3 as &dyn Adapter)), (1, Some(&q3 as &dyn Adapter))]);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32), &dev).unwrap();
        let got = rows.delta(0, Proj::QProj, &x).unwrap().unwrap();
        let alone_p = p4.delta(0, Proj::QProj, &x.narrow(0, 0, 1).unwrap()).unwrap().unwrap();
        let alone_q = q4.delta(0, Proj::QProj, &x.narrow(0, 1, 1).unwrap()).unwrap().unwrap();
        assert_eq!((got.narrow(0, 0, 1).unwrap() - alone_p).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!((got.narrow(0, 1, 1).unwrap() - alone_q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// An adapter with only a `delta` of its own (no factors), beside LoRA adapters: the
    /// batch is updated segment by segment, each as alone, along either axis.
    #[test]
    fn an_opaque_adapter_mixes_with_factored_ones() {
        struct Doubling;
        impl Adapter for Doubling {
            fn delta(&self, _: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
                (proj == Proj::QProj).then(|| x * 2.0).transpose()
            }
        }
        let (a, d) = (adapter(1), Doubling);
        let (a, d): (&dyn Adapter, &dyn Adapter) = (&a, &d);
        // an adapter without factors: the decoder must compose the batch's layers of ops
        assert!(a.factored() && !d.factored() && !crate::runtime::model::Frozen(d).factored());
        assert!(!SegmentedAdapters::new(SegmentAxis::Tokens, &[(4, Some(a)), (3, Some(d))]).factored());
        assert!(SegmentedAdapters::new(SegmentAxis::Tokens, &[(4, Some(a)), (3, None)]).factored());
        let diff = |x: &Tensor, y: &Tensor| -> f32 { (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
        let x = Tensor::randn(0f32, 1.0, (1, 9, 32), &Device::Cpu).unwrap();
        let got = SegmentedAdapters::new(SegmentAxis::Tokens, &[(4, Some(a)), (3, Some(d)), (2, None)])
            .delta(0, Proj::QProj, &x)
            .unwrap()
            .unwrap();
        assert_eq!(diff(&got.narrow(1, 0, 4).unwrap(), &a.delta(0, Proj::QProj, &x.narrow(1, 0, 4).unwrap()).unwrap().unwrap()), 0.0);
        assert_eq!(diff(&got.narrow(1, 4, 3).unwrap(), &(x.narrow(1, 4, 3).unwrap() * 2.0).unwrap()), 0.0);
        assert_eq!(got.narrow(1, 7, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32), &Device::Cpu).unwrap();
        let got = SegmentedAdapters::new(SegmentAxis::Rows, &[(1, Some(d)), (1, Some(a))]).delta(0, Proj::QProj, &x).unwrap().unwrap();
        assert_eq!(diff(&got.narrow(0, 0, 1).unwrap(), &(x.narrow(0, 0, 1).unwrap() * 2.0).unwrap()), 0.0);
        assert_eq!(diff(&got.narrow(0, 1, 1).unwrap(), &a.delta(0, Proj::QProj, &x.narrow(0, 1, 1).unwrap()).unwrap().unwrap()), 0.0);
    }

    /// The factored parts of a pass: a segment of `len` items is `len` rows along the tokens
    /// of one packed row, or `len` batch rows of `l` tokens each; activations of another
    /// shape are refused; an adapter without factors makes the whole batch unfactored.
    #[test]
    fn parts_follow_the_axis() {
        let (a, b) = (adapter(1), adapter(2));
        let (a, b): (&dyn Adapter, &dyn Adapter) = (&a, &b);
        let rows_of = |parts: Vec<(usize, LowRank)>| -> Vec<(usize, bool)> {
            parts.into_iter().map(|(rows, u)| (rows, matches!(u, LowRank::Factors { .. }))).collect()
        };
        let tokens = SegmentedAdapters::new(SegmentAxis::Tokens, &[(4, Some(a)), (2, None), (3, Some(b))]);
        assert!(tokens.factored());
        let parts = tokens.low_rank_parts(0, Proj::QProj, (1, 9)).unwrap().unwrap();
        assert_eq!(rows_of(parts), [(4, true), (2, false), (3, true)]);
        for bad in [(2, 9), (1, 8), (3, 3)] {
            assert!(tokens.low_rank_parts(0, Proj::QProj, bad).is_err(), "{bad:?}");
        }
        let rows = SegmentedAdapters::new(SegmentAxis::Rows, &[(1, Some(a)), (2, Some(b))]);
        let parts = rows.low_rank_parts(0, Proj::QProj, (3, 5)).unwrap().unwrap();
        assert_eq!(rows_of(parts), [(5, true), (10, true)]);
        assert!(rows.low_rank_parts(0, Proj::QProj, (2, 5)).is_err());
        // for inference (`Frozen`): the update from detached factors, equal and with no graph
        let x = Tensor::randn(0f32, 1.0, (3, 5, 32), &Device::Cpu).unwrap();
        let live = rows.delta(0, Proj::QProj, &x).unwrap().unwrap();
        let frozen = crate::runtime::model::Frozen(&rows).delta(0, Proj::QProj, &x).unwrap().unwrap();
        assert!(live.track_op() && !frozen.track_op());
        // equal to float rounding, bit for bit where both take the same code (no AVX-512),
        // as `Frozen`'s own test in `lora.rs` explains
        let largest = frozen.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (live - frozen).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(largest > 0.0 && diff <= 1e-6 * largest, "frozen update {diff} from the live one, largest entry {largest}");
        if !crate::runtime::sgemm::available() {
            assert_eq!(diff, 0.0);
        }
        assert!(rows.low_rank_parts(0, Proj::QProj, (1, 15)).is_err());
    }

    /// Generation's updates added in place (`Frozen::add_delta`): the update then the add to
    /// float rounding, and each segment's rows those of its adapter alone (or the frozen
    /// product's, without one), bit for bit, at ranks the kernel takes.
    #[test]
    fn frozen_updates_added_in_place_equal_each_adapter_alone() {
        use crate::runtime::model::Frozen;
        let cfg = ModelConfig::tiny_for_tests();
        let make = |r: usize, seed| {
            let a = LoraAdapter::new(&cfg, LoraConfig::paper(r, 2.0 * r as f64, 0.0), seed, &Device::Cpu).unwrap();
            for proj in [Proj::QProj, Proj::VProj] {
                let b = &a.pair(0, proj).unwrap().b;
                b.set(&Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu).unwrap()).unwrap();
            }
            a
        };
        let (a, b) = (make(16, 1), make(32, 2));
        let (a, b): (&dyn Adapter, &dyn Adapter) = (&a, &b);
        let spans = [(0, 2, Some(a)), (2, 1, None), (3, 3, Some(b))];
        let rows = SegmentedAdapters::new(SegmentAxis::Rows, &spans.map(|(_, len, ad)| (len, ad)));
        let x = Tensor::randn(0f32, 1.0, (6, 1, 32), &Device::Cpu).unwrap();
        for (proj, out) in [(Proj::QProj, 32), (Proj::VProj, 16)] {
            let y = Tensor::randn(0f32, 1.0, (6, 1, out), &Device::Cpu).unwrap();
            // `add_delta` writes into the storage of the `y` it is handed: a copy each time, and
            // a second handle on that copy sees the sum (the in-place path, not the default's add)
            let handed = y.copy().unwrap();
            let alias = handed.clone();
            let got = Frozen(&rows).add_delta(0, proj, &x, handed).unwrap();
            assert_eq!(alias.to_vec3::<f32>().unwrap(), got.to_vec3::<f32>().unwrap(), "{proj:?}: the sum written where y lay");
            let want = (&y + Frozen(&rows).delta(0, proj, &x).unwrap().unwrap()).unwrap();
            let largest = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * largest, "{proj:?}: in place {diff} from the update then the add, largest {largest}");
            assert!(!got.track_op());
            for (start, len, ad) in spans {
                let (xs, ys) = (x.narrow(0, start, len).unwrap(), y.narrow(0, start, len).unwrap().copy().unwrap());
                let alone = match ad {
                    Some(ad) => Frozen(ad).add_delta(0, proj, &xs, ys).unwrap(),
                    None => ys,
                };
                let part = got.narrow(0, start, len).unwrap();
                assert_eq!(part.to_vec3::<f32>().unwrap(), alone.to_vec3::<f32>().unwrap(), "{proj:?} rows {start}..{}", start + len);
            }
        }
        // an untouched projection: `y` as handed over
        let y = Tensor::randn(0f32, 1.0, (6, 1, 32), &Device::Cpu).unwrap();
        let got = Frozen(&rows).add_delta(0, Proj::OProj, &x, y.copy().unwrap()).unwrap();
        assert_eq!(got.to_vec3::<f32>().unwrap(), y.to_vec3::<f32>().unwrap());
    }

    /// Segments along the tokens axis need one packed row: activations of two rows are
    /// refused, not split as if they were one.
    #[test]
    fn segments_along_tokens_refuse_a_batch_of_rows() {
        let a = adapter(1);
        let seg = SegmentedAdapters::new(SegmentAxis::Tokens, &[(3, Some(&a as &dyn Adapter))]);
        let err = seg.delta(0, Proj::QProj, &Tensor::zeros((2, 3, 32), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("activations [1, l, in]"), "{err}");
        assert!(seg.delta(0, Proj::QProj, &Tensor::zeros((1, 3, 32), DType::F32, &Device::Cpu).unwrap()).is_ok());
    }
}

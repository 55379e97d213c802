//! Warm-up: the batches every model replica runs before it reports live,
//! so the first requests after `/ready` run as fast as later ones.
//!
//! Why: the first forward pass of a shape pays for what later ones reuse:
//! CUDA modules loading, cuBLAS choosing its algorithms and growing its
//! workspace, the memory pool growing to the batch's activations, on a CPU
//! the allocator's and the kernels' buffers and the rayon threads waking.
//! Before, only the first replica of a model ran the startup probes (one
//! input each), so a second replica and every rebuilt one met its first
//! traffic cold, and a batch that does not fit the GPU's memory showed up in
//! traffic instead of at startup.
//!
//! What runs, on every replica (all devices, and again after a rebuild),
//! on its worker thread before it reports live (see `app::server`):
//! 1. each startup probe alone (batch shape 1; the first replica's results
//!    are the model's probes, see [`crate::probe`]);
//! 2. a typical batch and the largest batch the model's limits allow, both
//!    made of the probe inputs ([`Warmup::plan`]): the largest fills
//!    `max_batch_cost` (at most `max_batch_size` inputs) with the costliest
//!    probe first, then cheaper ones; the typical one has half as many of
//!    each. Shapes equal to an earlier one are not run twice. Sizes are
//!    bounded by the limits, so on the tiny test fixtures this is
//!    milliseconds and on a 2-core CPU with the CPU defaults a second or two.
//!
//! A warm-up batch that runs out of device memory is logged and skipped
//! (at run time such a batch is split); any other failure fails the
//! replica's build, as a failing probe does.

use std::time::{Duration, Instant};

use crate::config::BatchLimits;
use crate::models::{EmbeddingModel, Fault, ModelError};
use crate::preprocess::Prepared;
use crate::probe::{self, Probe, ProbeError, ProbeResult};

/// A warm-up failure as the replica's build error.
fn failed(shape: &str, inputs: usize, source: ModelError) -> ModelError {
    ModelError::Warmup {
        shape: shape.to_string(),
        inputs,
        source: Box::new(source),
    }
}

/// One warm-up batch: indices into the probes, with repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// "typical" or "largest".
    pub name: &'static str,
    /// Probe indices, costliest first.
    pub items: Vec<usize>,
}

/// What a replica runs before it serves: the probes alone, then the shapes.
pub struct Warmup {
    probes: Vec<(Probe, Prepared)>,
    shapes: Vec<Shape>,
}

/// What one replica's warm-up did.
#[derive(Debug, Clone)]
pub struct Warmed {
    /// The probes' results (batch shape 1).
    pub probes: Vec<ProbeResult>,
    /// The shapes run, as (name, inputs, cost).
    pub shapes: Vec<(&'static str, usize, usize)>,
    /// Shapes skipped because they did not fit the device's memory.
    pub skipped: Vec<&'static str>,
    pub took: Duration,
}

impl Warmup {
    /// The warm-up of a model with these prepared probes and limits.
    pub fn new(probes: Vec<(Probe, Prepared)>, limits: &BatchLimits) -> Warmup {
        let costs: Vec<usize> = probes.iter().map(|(_, p)| p.cost).collect();
        let shapes = Self::plan(&costs, limits.max_batch_size, limits.max_batch_cost);
        Warmup { probes, shapes }
    }

    /// The batches beyond the probes for items of `costs`: the largest
    /// (costliest first, as many of each as still fit `max_cost` and
    /// `max_size`, at least one input) and a typical one (half as many of
    /// each, rounded up), leaving out one of a single input (the probes ran
    /// those) and duplicates.
    pub fn plan(costs: &[usize], max_size: usize, max_cost: usize) -> Vec<Shape> {
        let mut order: Vec<usize> = (0..costs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
        let mut counts = vec![0usize; costs.len()];
        let (mut size, mut cost) = (0usize, 0usize);
        for &i in &order {
            let c = costs[i].max(1);
            while size < max_size && (size == 0 || cost + c <= max_cost) {
                counts[i] += 1;
                size += 1;
                cost += c;
            }
        }
        let batch = |counts: &[usize]| -> Vec<usize> {
            order
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, counts[i]))
                .collect()
        };
        let largest = batch(&counts);
        let half: Vec<usize> = counts.iter().map(|n| n.div_ceil(2)).collect();
        let typical = batch(&half);
        let mut shapes = Vec::new();
        for (name, items) in [("typical", typical), ("largest", largest)] {
            if items.len() > 1 && shapes.iter().all(|s: &Shape| s.items != items) {
                shapes.push(Shape { name, items });
            }
        }
        shapes
    }

    /// The planned shapes.
    pub fn shapes(&self) -> &[Shape] {
        &self.shapes
    }

    /// The prepared probes.
    pub fn probes(&self) -> &[(Probe, Prepared)] {
        &self.probes
    }

    /// Runs the probes alone, then every shape, on `replica`. A failure is
    /// a [`ModelError::Warmup`] naming the shape.
    pub fn run(&self, replica: &dyn EmbeddingModel) -> Result<Warmed, ModelError> {
        let start = Instant::now();
        let probes = probe::embed(&self.probes, |p| replica.embed(&[p])).map_err(|e| match e {
            ProbeError::Model { name, source } => failed(name, 1, source),
            other => failed("probes", 1, ModelError::Batch(other.to_string())),
        })?;
        let mut shapes = Vec::new();
        let mut skipped = Vec::new();
        for shape in &self.shapes {
            let batch: Vec<&Prepared> = shape.items.iter().map(|&i| &self.probes[i].1).collect();
            let cost = batch.iter().map(|p| p.cost).sum();
            let inputs = batch.len();
            match replica.embed(&batch) {
                Ok(v) if v.len() == inputs => shapes.push((shape.name, inputs, cost)),
                Ok(v) => {
                    let got = ModelError::Batch(format!("{} vectors for {inputs} inputs", v.len()));
                    return Err(failed(shape.name, inputs, got));
                }
                Err(e) if e.fault() == Fault::OutOfMemory => {
                    tracing::warn!(
                        shape = shape.name, inputs, cost, error = %e,
                        "a warm-up batch does not fit the device's memory; such batches will be \
                         split at run time (lower max_batch_cost or max_batch_size to avoid it)"
                    );
                    skipped.push(shape.name);
                }
                Err(source) => return Err(failed(shape.name, inputs, source)),
            }
        }
        Ok(Warmed {
            probes,
            shapes,
            skipped,
            took: start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_fills_the_cost_costliest_first_and_typical_is_half() {
        // CLIP on the CPU defaults: text 9 tokens, image 224.
        let shapes = Warmup::plan(&[9, 224], 32, 1024);
        let count = |s: &Shape, i: usize| s.items.iter().filter(|&&x| x == i).count();
        let largest = &shapes[1];
        assert_eq!(largest.name, "largest");
        assert_eq!((count(largest, 1), count(largest, 0)), (4, 14));
        assert_eq!(largest.items[0], 1, "costliest first");
        let typical = &shapes[0];
        assert_eq!((count(typical, 1), count(typical, 0)), (2, 7));
    }

    #[test]
    fn the_size_bounds_the_shapes_and_single_inputs_are_left_to_the_probes() {
        let shapes = Warmup::plan(&[9, 224], 8, 65536);
        assert_eq!(shapes[1].items.len(), 8);
        assert!(shapes[1].items.iter().all(|&i| i == 1));
        // An MLLM image costlier than the CPU's limit runs alone: the probes
        // already ran that shape, nothing more is planned.
        assert!(Warmup::plan(&[20, 1900, 1950], 32, 1024).is_empty());
        // Two of the costliest fit: largest 2, typical 1 (left out).
        let shapes = Warmup::plan(&[20, 1900, 1950], 2, 65536);
        assert_eq!(shapes.len(), 1);
        assert_eq!(shapes[0].items, vec![2, 2]);
        assert!(Warmup::plan(&[], 32, 1024).is_empty());
    }
}

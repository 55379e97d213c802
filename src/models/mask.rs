//! Attention masks: the additive value shared by the CLIP text encoder and
//! the Mistral decoder, and [`ShapeCache`], where a replica keeps the masks
//! (and other tensors) that depend only on a pass's shape.
//!
//! A large finite negative rather than `-inf`: a fully masked row (a padding
//! query) then softmaxes to a uniform row instead of NaN, and the value
//! survives the cast to the scores' dtype.
//!
//! Why a cache: masks used to be filled on the host and copied to the device
//! for every batch (up to 64 MiB for one 4096-token sequence). They are now
//! made on the device from a few integers (positions, sequence lengths) with
//! comparison kernels, and a replica keeps the recent ones: a batch of the
//! same shape (the warm-up's, or repeated prompt lengths) reuses them. The
//! cache is bounded in bytes; a mask larger than the bound is made for its
//! batch and not kept.

use std::collections::VecDeque;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

/// Added to the scores of keys a query must not see (scores in `f32`,
/// `bf16` or `f64`; see [`mask_value`] for `f16`).
pub const MASKED: f32 = -1.0e30;

/// [`MASKED`] in a dtype that can hold it: `f16` tops out at 65504.
pub fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        _ => MASKED,
    }
}

/// Tensors keyed by the shape they were made for, on one replica's device;
/// least recently used out first, at most `max_bytes` held. Dropped with
/// the replica (a rebuilt replica starts empty, on its fresh device).
pub struct ShapeCache<K> {
    entries: Mutex<VecDeque<(K, Tensor)>>,
    max_bytes: usize,
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl<K: PartialEq> ShapeCache<K> {
    pub fn new(max_bytes: usize) -> Self {
        ShapeCache {
            entries: Mutex::new(VecDeque::new()),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(K, Tensor)>> {
        // Nothing can be left half-done under the lock: a poisoned one is fine.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tensor for `key`, made with `make` when it is not held.
    pub fn get_or_make(
        &self,
        key: K,
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        {
            let mut entries = self.lock();
            if let Some(pos) = entries.iter().position(|(k, _)| *k == key) {
                let hit = entries.remove(pos);
                if let Some((k, t)) = hit {
                    entries.push_front((k, t.clone()));
                    return Ok(t);
                }
            }
        }
        let made = make()?;
        if bytes(&made) <= self.max_bytes {
            let mut entries = self.lock();
            entries.push_front((key, made.clone()));
            let mut held: usize = entries.iter().map(|(_, t)| bytes(t)).sum();
            while held > self.max_bytes {
                match entries.pop_back() {
                    Some((_, t)) => held -= bytes(&t),
                    None => break,
                }
            }
        }
        Ok(made)
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Positions `0..n` as a `u32` tensor on `device` (n integers uploaded).
pub fn positions(n: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    Tensor::arange(0u32, n as u32, device)
}

/// An additive mask from a keep-mask `ok` (non-zero: the key is seen):
/// 0 where kept, `masked` elsewhere, as f32, made on `ok`'s device.
pub fn additive(ok: &Tensor, masked: f32) -> candle_core::Result<Tensor> {
    let dev = ok.device();
    let shape = ok.shape();
    let zero = Tensor::new(0f32, dev)?.broadcast_as(shape)?;
    let neg = Tensor::new(masked, dev)?.broadcast_as(shape)?;
    ok.where_cond(&zero, &neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_cache_keeps_recent_shapes_within_its_bytes() {
        let cache = ShapeCache::<usize>::new(3 * 16);
        let made = std::cell::Cell::new(0);
        let get = |n: usize| {
            cache
                .get_or_make(n, || {
                    made.set(made.get() + 1);
                    Tensor::zeros(4, DType::F32, &Device::Cpu)
                })
                .unwrap()
        };
        for n in [1, 2, 3, 1] {
            get(n);
        }
        assert_eq!(made.get(), 3, "the fourth was a hit");
        get(4); // evicts 2, the least recently used
        assert_eq!(cache.len(), 3);
        get(1);
        get(3);
        assert_eq!(made.get(), 4);
        get(2);
        assert_eq!(made.get(), 5);
        // Larger than the bound: made, not kept.
        let big = cache
            .get_or_make(9, || Tensor::zeros(100, DType::F32, &Device::Cpu))
            .unwrap();
        assert_eq!(big.elem_count(), 100);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn additive_masks_are_zero_where_kept() {
        let ok = Tensor::new(&[1u8, 0, 1], &Device::Cpu).unwrap();
        let m: Vec<f32> = additive(&ok, MASKED).unwrap().to_vec1().unwrap();
        assert_eq!(m, vec![0.0, MASKED, 0.0]);
    }
}

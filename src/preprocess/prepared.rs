//! What preprocessing hands on: [`Prepared`] items, the per-family data they
//! carry ([`PreparedData`]), and the [`Key`] that data writes itself into for
//! the embedding cache.
//!
//! A family defines its own prepared data (CLIP: token ids and/or one
//! image's pixels; LLaVA: a prompt and any-resolution tiles; a family with a
//! dynamic patch grid: whatever that grid needs) and its model reads that
//! same type (`models::Model::Input`). Batching, the queue and the workers
//! move [`Prepared`] items without looking inside: they read only the
//! common facts (modality, tokens counted for usage, batching cost), and
//! the cache asks the data for its key ([`PreparedData::write_key`]).

use std::any::Any;
use std::fmt::Debug;

use crate::input::Modality;

/// The data one family's preprocessor makes for one input, and its model
/// reads. Everything that decides the input's vector must be in it.
pub trait PreparedData: Any + Debug + Send + Sync {
    /// Writes everything that decides the vector into `key` (the embedding
    /// cache hashes it): each value with its length or kind, so that two
    /// different inputs never write the same bytes.
    fn write_key(&self, key: &mut Key<'_>);
}

/// Pixel values for one image: `tiles` stacked `3 x height x width` planes
/// (channel-first, normalised), as a CLIP-style vision tower expects them.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub tiles: usize,
    pub height: usize,
    pub width: usize,
}

impl Pixels {
    /// Writes the pixels and their shape into a cache key.
    pub fn write_key(&self, key: &mut Key<'_>) {
        key.tag("pixels");
        for d in [self.tiles, self.height, self.width] {
            key.count(d);
        }
        key.floats(&self.data);
    }
}

/// One input after preprocessing: the facts batching needs (the same for
/// every family) and the family's own data `D`. Batching and the workers
/// move the erased form (`Prepared`, data boxed); a family builds the typed
/// form and erases it ([`Prepared::erase`]).
#[derive(Debug)]
pub struct Prepared<D: ?Sized = dyn PreparedData> {
    pub modality: Modality,
    /// Text tokens counted for usage reporting.
    pub text_tokens: usize,
    /// Relative compute cost, for the batch budget (`max_batch_cost`).
    pub cost: usize,
    pub data: Box<D>,
}

impl<D: PreparedData> Prepared<D> {
    /// A prepared input of `modality` costing `cost` (at least 1).
    pub fn new(modality: Modality, text_tokens: usize, cost: usize, data: D) -> Self {
        Prepared {
            modality,
            text_tokens,
            cost: cost.max(1),
            data: Box::new(data),
        }
    }

    /// The same input with its data erased, as batching moves it.
    pub fn erase(self) -> Prepared {
        Prepared {
            modality: self.modality,
            text_tokens: self.text_tokens,
            cost: self.cost,
            data: self.data,
        }
    }
}

impl Prepared {
    /// The family data, when it is a `D`.
    pub fn data<D: PreparedData>(&self) -> Option<&D> {
        let any: &dyn Any = self.data.as_ref();
        any.downcast_ref::<D>()
    }
}

/// Receives the bytes of a cache key (the embedding cache feeds them to
/// SHA-256; tests collect them).
pub trait KeySink {
    fn write(&mut self, bytes: &[u8]);
}

/// What prepared data writes itself into: typed helpers over a
/// [`KeySink`], each value length- or kind-prefixed so that adjacent fields
/// never run together.
pub struct Key<'a>(&'a mut dyn KeySink);

impl<'a> Key<'a> {
    pub fn new(sink: &'a mut dyn KeySink) -> Self {
        Key(sink)
    }

    /// A fixed label naming the next value(s) (`"ids"`, `"pixels"`).
    pub fn tag(&mut self, tag: &str) {
        self.count(tag.len());
        self.0.write(tag.as_bytes());
    }

    /// A count or dimension.
    pub fn count(&mut self, n: usize) {
        self.0.write(&(n as u64).to_le_bytes());
    }

    /// A small integer (an image side, an enum's discriminant).
    pub fn u32(&mut self, v: u32) {
        self.0.write(&v.to_le_bytes());
    }

    /// Token ids, with their count.
    pub fn ids(&mut self, ids: &[u32]) {
        self.count(ids.len());
        // Keys never leave the process: native byte order is fine.
        self.0.write(bytemuck::cast_slice::<u32, u8>(ids));
    }

    /// Float values, with their count.
    pub fn floats(&mut self, values: &[f32]) {
        self.count(values.len());
        self.0.write(bytemuck::cast_slice::<f32, u8>(values));
    }

    /// An optional string: `None`, `""` and adjacent fields never write alike.
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.0.write(&[0]),
            Some(s) => {
                self.0.write(&[1]);
                self.count(s.len());
                self.0.write(s.as_bytes());
            }
        }
    }
}

/// Prepared data of no family, for the unit tests of the modules that
/// move prepared items (queue, worker, cache, the family interface).
#[cfg(test)]
pub(crate) mod testing {
    use super::{Key, PreparedData};

    /// Token ids and values, both in the cache key.
    #[derive(Debug, Clone, PartialEq)]
    pub struct TestData {
        pub ids: Vec<u32>,
        pub pixels: Vec<f32>,
    }

    impl PreparedData for TestData {
        fn write_key(&self, key: &mut Key<'_>) {
            key.ids(&self.ids);
            key.floats(&self.pixels);
        }
    }

    impl TestData {
        pub fn ids(ids: &[u32]) -> Self {
            TestData {
                ids: ids.to_vec(),
                pixels: Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::TestData;

    #[derive(Debug)]
    struct Other;

    impl PreparedData for Other {
        fn write_key(&self, key: &mut Key<'_>) {
            key.tag("other");
        }
    }

    impl KeySink for Vec<u8> {
        fn write(&mut self, bytes: &[u8]) {
            self.extend_from_slice(bytes);
        }
    }

    #[test]
    fn erased_data_is_found_again_only_as_its_own_type() {
        let p = Prepared::new(Modality::Text, 2, 0, TestData::ids(&[5, 6])).erase();
        assert_eq!(p.cost, 1, "the cost is at least 1");
        assert_eq!(p.data::<TestData>(), Some(&TestData::ids(&[5, 6])));
        assert!(p.data::<Other>().is_none());
    }

    #[test]
    fn keys_separate_adjacent_values() {
        let bytes = |f: &dyn Fn(&mut Key<'_>)| {
            let mut sink = Vec::new();
            f(&mut Key::new(&mut sink));
            sink
        };
        assert_ne!(
            bytes(&|k| {
                k.opt_str(Some("ab"));
                k.opt_str(Some("c"));
            }),
            bytes(&|k| {
                k.opt_str(Some("a"));
                k.opt_str(Some("bc"));
            })
        );
        assert_ne!(bytes(&|k| k.opt_str(None)), bytes(&|k| k.opt_str(Some(""))));
        assert_ne!(
            bytes(&|k| {
                k.ids(&[1]);
                k.ids(&[]);
            }),
            bytes(&|k| {
                k.ids(&[]);
                k.ids(&[1]);
            })
        );
    }
}

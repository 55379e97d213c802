//! Test-only fixtures shared by the queue, worker and cache unit tests.

use crate::input::Modality;
use crate::preprocess::{Key, Prepared, PreparedData};

/// Prepared data of no family: ids and values, both in the cache key.
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

/// A prepared text input of `cost` tokens.
pub fn prepared(cost: usize) -> Prepared {
    let data = TestData {
        ids: vec![1; cost],
        pixels: Vec::new(),
    };
    Prepared::new(Modality::Text, cost, cost, data).erase()
}

//! Test-only fixtures shared by the queue, worker and cache unit tests.

use crate::input::Modality;
pub use crate::preprocess::prepared::testing::TestData;
use crate::preprocess::Prepared;

/// A prepared text input of `cost` tokens.
pub fn prepared(cost: usize) -> Prepared {
    Prepared::new(Modality::Text, cost, cost, TestData::ids(&vec![1; cost])).erase()
}

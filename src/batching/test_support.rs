//! Fixtures shared by the unit tests of the queue ([`super::queue`]) and the
//! worker ([`crate::worker`]). Test-only; owns no behaviour of the server.

use crate::input::Modality;
use crate::preprocess::Prepared;

/// A prepared text input of `cost` tokens (all token id 1) whose batch cost
/// is `cost`: the queue and the fake models only look at the cost.
pub(crate) fn prepared(cost: usize) -> Prepared {
    Prepared {
        modality: Modality::Text,
        token_ids: Some(vec![1; cost]),
        pixels: None,
        image_size: None,
        text_tokens: cost,
        cost,
    }
}

//! The additive attention-mask value shared by the CLIP text encoder and
//! the Mistral decoder.
//!
//! A large finite negative rather than `-inf`: a fully masked row (a padding
//! query) then softmaxes to a uniform row instead of NaN, and the value
//! survives the cast to the scores' dtype.

use candle_core::DType;

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

//! A loaded model with one replica, used synchronously: the CLI's `embed`
//! command and the parity tests. The server uses the same pieces
//! ([`LoadedModel`]'s preprocessor and replicas) through its queue instead.
//!
//! Owns the post-processing every front end shares: L2 normalisation.

use crate::input::Input;
use crate::models::{
    DeviceSpec, EmbeddingModel, LoadOptions, LoadedModel, ModelError, ModelInfo, ModelSource,
};
use crate::preprocess::{Prepared, PreprocessError};

/// Why a synchronous embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("input {index}: {source}")]
    Input {
        index: usize,
        #[source]
        source: PreprocessError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// L2-normalises `v` in place (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

/// A model loaded on one device, ready to embed.
pub struct Embedder {
    pub loaded: LoadedModel,
    replica: Box<dyn EmbeddingModel>,
}

impl Embedder {
    /// Loads `source` onto `device`.
    pub fn load(
        source: &ModelSource,
        device: DeviceSpec,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let loaded = LoadedModel::open(source, opts)?;
        let replica = loaded.replica(&device.open()?)?;
        Ok(Embedder { loaded, replica })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.loaded.info
    }

    /// Preprocesses one input.
    pub fn prepare(&self, input: &Input, truncate: bool) -> Result<Prepared, PreprocessError> {
        self.loaded.preprocessor.prepare(input, truncate)
    }

    /// Embeds already prepared inputs in one batch.
    pub fn embed_prepared(
        &self,
        items: &[&Prepared],
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = self.replica.embed(items)?;
        if normalize {
            out.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok(out)
    }

    /// Preprocesses and embeds `inputs` in one batch.
    pub fn embed(
        &self,
        inputs: &[Input],
        normalize: bool,
        truncate: bool,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let prepared = inputs
            .iter()
            .enumerate()
            .map(|(index, i)| {
                self.prepare(i, truncate)
                    .map_err(|source| EmbedError::Input { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Prepared> = prepared.iter().collect();
        Ok(self.embed_prepared(&refs, normalize)?)
    }
}

#[cfg(test)]
mod tests {
    use super::l2_normalize;

    #[test]
    fn normalizes_to_unit_length_and_keeps_zero() {
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut z = vec![0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }
}

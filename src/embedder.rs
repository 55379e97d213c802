//! A loaded model with one replica, used synchronously: the CLI's `embed`
//! command and the parity tests. The server uses the same pieces
//! ([`LoadedModel`]'s preprocessor and replicas) through its queue instead.
//!
//! Normalisation itself lives in [`crate::vector`] (re-exported here).

use crate::input::Input;
use crate::models::{
    DeviceSpec, EmbeddingModel, LoadOptions, LoadedModel, ModelError, ModelInfo, ModelSource,
};
use crate::preprocess::{Prepared, PreprocessError};
pub use crate::vector::l2_normalize;

/// Why a synchronous embedding failed. Distinct from
/// [`crate::batching::EmbedError`], which the server's queue returns.
#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    #[error("input {index}: {source}")]
    Input {
        index: usize,
        #[source]
        source: PreprocessError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A model loaded on one device, ready to embed.
pub struct Embedder {
    pub loaded: LoadedModel,
    replica: Box<dyn EmbeddingModel>,
}

impl Embedder {
    /// Loads `source` onto `device`. The device is opened first: a missing
    /// GPU fails before any model file is read or downloaded.
    pub fn load(
        source: &ModelSource,
        device: DeviceSpec,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let opened = device.open()?;
        let loaded = LoadedModel::open(source, opts)?;
        let replica = loaded.replica(&opened)?;
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
    ) -> Result<Vec<Vec<f32>>, EmbedderError> {
        let prepared = inputs
            .iter()
            .enumerate()
            .map(|(index, i)| {
                self.prepare(i, truncate)
                    .map_err(|source| EmbedderError::Input { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Prepared> = prepared.iter().collect();
        Ok(self.embed_prepared(&refs, normalize)?)
    }
}

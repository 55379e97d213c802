//! What a model family is: the interface every family module implements,
//! and the erased forms the server runs. A leaf of `models`: it imports no
//! family, so every family can import it (the table of families,
//! [`super::families`], is the only module that imports them).
//!
//! A family is one module under `models/` that provides:
//! - a [`Family`] value (its `config.json` names and its loader), listed in
//!   [`super::families::FAMILIES`];
//! - its prepared data (a [`PreparedData`] type);
//! - its preprocessor (a [`Preprocess`] making that data);
//! - its model (a [`Model`] reading that data) and the [`Replicas`] that
//!   build it from weights.
//!
//! [`FamilyModel::new`] joins the preprocessor and the replicas only when
//! the model reads what the preprocessor makes (checked by the compiler),
//! then erases both: batching, the queue and the workers handle
//! [`Prepared`] items and [`EmbeddingModel`]s without knowing the family.
//! The erased model finds its typed data again in one place
//! ([`Erased::embed_stepped`]).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use candle_nn::VarBuilder;

use super::error::{ConfigError, ModelError};
use super::source::ModelFiles;
use crate::preprocess::image::ImageLimits;
use crate::preprocess::{self, Prepared, PreparedData, Preprocess, Preprocessor};

/// One model family: how `config.json` names it and how it loads.
pub trait Family: Sync {
    /// The `architectures` entry of `config.json` (also the name `/info`
    /// reports).
    fn architecture(&self) -> &'static str;

    /// The `model_type` that names the family when `config.json` has no
    /// `architectures`.
    fn model_type(&self) -> &'static str;

    /// Reads the family's config and preprocessing files: everything but
    /// the weights.
    fn load(&self, cx: &LoadContext<'_>) -> Result<FamilyModel, ModelError>;
}

/// Options that apply when loading a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub dtype: super::Precision,
    pub image_limits: ImageLimits,
    /// The longest prompt an MLLM takes, in tokens (`None`: the family's
    /// default), capped at its decoder's `max_position_embeddings`. Bounds
    /// the decoder's attention memory.
    pub max_input_tokens: Option<usize>,
    /// The prompt format, by name, for families that offer several
    /// (`None`: the family's default for the model).
    pub prompt_format: Option<String>,
    /// The least and most pixels images are resized to, for families whose
    /// processed size follows the image (`None`: the model's own).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

/// What a family's loader reads from.
pub struct LoadContext<'a> {
    /// The parsed `config.json`.
    pub config: &'a serde_json::Value,
    pub config_path: &'a Path,
    /// The model's other files (tokenizer, preprocessor configs).
    pub files: &'a ModelFiles,
    /// The Hub repository id when the model comes from the Hub (a family
    /// may pick defaults by it).
    pub hub_id: Option<&'a str>,
    pub opts: &'a LoadOptions,
}

impl LoadContext<'_> {
    /// A `config.json` problem as a [`ModelError`] naming the file.
    pub fn invalid_config(&self, source: ConfigError) -> ModelError {
        ModelError::Config {
            path: self.config_path.display().to_string(),
            source,
        }
    }
}

/// Facts about a configured model that front ends report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Embedding width.
    pub dimensions: usize,
    /// The longest text (prompt) the preprocessor lets through, in tokens.
    pub max_text_tokens: usize,
    /// Whether the model reads instructions (MLLM prompts).
    pub uses_instructions: bool,
}

/// A family's model, configured, with its preprocessing but no weights.
pub struct FamilyModel {
    pub facts: Facts,
    pub preprocessor: Arc<dyn Preprocessor>,
    pub replicas: Box<dyn ReplicaBuilder>,
}

impl FamilyModel {
    /// Joins a preprocessor and the replicas of a model that reads what it
    /// prepares.
    pub fn new<P, R>(facts: Facts, preprocessor: P, replicas: R) -> Self
    where
        P: Preprocess,
        R: Replicas,
        R::Model: Model<Input = P::Data>,
    {
        FamilyModel {
            facts,
            preprocessor: preprocess::erase(preprocessor),
            replicas: Box::new(ErasedReplicas(replicas)),
        }
    }
}

/// Calls a stepped pass between its steps; see [`Model::embed`].
pub type Between<'a> = &'a mut dyn FnMut() -> ControlFlow<()>;

/// A model replica on one device, typed by the prepared data it reads.
///
/// An item's result must not depend on its batch mates.
pub trait Model: Send + 'static {
    type Input: PreparedData;

    /// One unnormalised embedding per input, in order, calling `between`
    /// between the steps of the forward pass (the layers of its long parts:
    /// CLIP's vision tower; LLaVA's vision tower and decoder) with the
    /// pass's state kept meanwhile, so that the caller can run other, short
    /// work on the same replica (through `&self`: a model holds no state
    /// between calls) and resume. When `between` answers `Break`, the pass
    /// stops with [`ModelError::Interrupted`]. Results do not depend on what
    /// `between` does: the same steps run in the same order.
    fn embed(
        &self,
        batch: &[&Self::Input],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// Any family's model replica, as a worker runs it.
pub trait EmbeddingModel: Send {
    /// [`Model::embed`] over erased items.
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError>;

    /// [`Self::embed_stepped`] without stopping between steps.
    fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_stepped(batch, &mut || ControlFlow::Continue(()))
    }
}

/// A family's [`Model`] as an [`EmbeddingModel`].
pub fn erase_model<M: Model>(model: M) -> Box<dyn EmbeddingModel> {
    Box::new(Erased(model))
}

/// The one place erased items are read as a family's data.
struct Erased<M>(M);

impl<M: Model> EmbeddingModel for Erased<M> {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let typed = batch
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.data::<M::Input>().ok_or(ModelError::WrongInput {
                    item: i,
                    expected: std::any::type_name::<M::Input>(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.0.embed(&typed, between)
    }
}

/// Builds replicas of one family's model from weights.
pub trait Replicas: Send + Sync + 'static {
    type Model: Model;

    /// A replica on `vb`'s device and dtype.
    fn build(&self, vb: VarBuilder) -> Result<Self::Model, ModelError>;
}

/// Builds one replica of a configured model, erased.
pub trait ReplicaBuilder: Send + Sync {
    /// A replica on `vb`'s device and dtype.
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn EmbeddingModel>, ModelError>;
}

struct ErasedReplicas<R>(R);

impl<R: Replicas> ReplicaBuilder for ErasedReplicas<R> {
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        Ok(erase_model(self.0.build(vb)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Modality;
    use crate::preprocess::prepared::testing::TestData;
    use crate::preprocess::Key;

    #[derive(Debug)]
    struct NotIds;

    impl PreparedData for NotIds {
        fn write_key(&self, _: &mut Key<'_>) {}
    }

    /// Embeds the ids' sum, counting steps.
    struct Sum;

    impl Model for Sum {
        type Input = TestData;
        fn embed(
            &self,
            batch: &[&TestData],
            between: Between<'_>,
        ) -> Result<Vec<Vec<f32>>, ModelError> {
            if between().is_break() {
                return Err(ModelError::Interrupted);
            }
            Ok(batch
                .iter()
                .map(|d| vec![d.ids.iter().sum::<u32>() as f32])
                .collect())
        }
    }

    #[test]
    fn an_erased_model_reads_its_own_data_and_refuses_other_data() {
        let m = erase_model(Sum);
        let a = Prepared::new(Modality::Text, 2, 2, TestData::ids(&[1, 2])).erase();
        let b = Prepared::new(Modality::Text, 1, 1, TestData::ids(&[7])).erase();
        assert_eq!(m.embed(&[&a, &b]).unwrap(), vec![vec![3.0], vec![7.0]]);
        let stop = m.embed_stepped(&[&a], &mut || ControlFlow::Break(()));
        assert!(matches!(stop, Err(ModelError::Interrupted)));
        let other = Prepared::new(Modality::Text, 1, 1, NotIds).erase();
        let e = m.embed(&[&a, &other]).unwrap_err();
        assert!(matches!(e, ModelError::WrongInput { item: 1, .. }), "{e}");
    }
}

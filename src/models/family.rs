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
use super::ops::{self, Backend, CpuBackend};
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
    /// What the CPU replicas' matrix products run on (`auto`: measured at
    /// the first CPU replica, see [`ops::backend`]).
    pub cpu_backend: CpuBackend,
    /// How much of a batch one step of the forward pass holds at once.
    pub pass: PassLimits,
    /// The prompt format, by name, for families that offer several
    /// (`None`: the family's default for the model).
    pub prompt_format: Option<String>,
    /// The least and most pixels images are resized to, for families whose
    /// processed size follows the image (`None`: the model's own).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

/// How much of a batch one step of a forward pass holds at once: sizes that
/// trade memory for speed and differ by device (see [`PassLimits::for_class`]).
/// They never change a result: an item's vector does not depend on how its
/// batch is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassLimits {
    /// Padded decoder tokens per decoder pass when sequences of a batch are
    /// grouped (BGE-VL-MLLM, Qwen2-VL); a longer sequence runs alone.
    pub decoder_group_tokens: usize,
    /// Image tiles sent through a vision tower at once (BGE-VL-MLLM's
    /// any-resolution tiles).
    pub vision_tile_chunk: usize,
}

impl PassLimits {
    /// A CPU's: small groups keep the working set in cache and a step short
    /// enough for preemption between layers.
    pub const CPU: PassLimits = PassLimits {
        decoder_group_tokens: 4096,
        vision_tile_chunk: 16,
    };
    /// A GPU's: big enough that a batch of several MLLM images (~5,100
    /// tokens each at the GPU's batch cost) runs in few decoder passes and
    /// kernels are large; small enough for a 24 GB card beside 7B bf16
    /// weights.
    pub const GPU: PassLimits = PassLimits {
        decoder_group_tokens: 16384,
        vision_tile_chunk: 32,
    };

    /// The defaults of a device class.
    pub fn for_class(class: super::DeviceClass) -> PassLimits {
        match class {
            super::DeviceClass::Cpu => PassLimits::CPU,
            super::DeviceClass::Gpu => PassLimits::GPU,
        }
    }

    /// These limits with every size at least 1 (a model loaded from the
    /// library, not through the config's validation, may be given 0).
    pub fn at_least_one(self) -> PassLimits {
        PassLimits {
            decoder_group_tokens: self.decoder_group_tokens.max(1),
            vision_tile_chunk: self.vision_tile_chunk.max(1),
        }
    }
}

impl Default for PassLimits {
    fn default() -> Self {
        PassLimits::CPU
    }
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
    /// The matrix products one layer of the replicas' fast CPU encoders
    /// computes on a typical batch (what `cpu_backend = "auto"` measures);
    /// empty when the model has none.
    pub matmuls: Vec<ops::MatmulShape>,
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
            matmuls: Vec::new(),
        }
    }

    /// The same model, whose fast CPU encoders compute `matmuls` per layer
    /// (what `cpu_backend = "auto"` times at load).
    pub fn with_matmuls(self, matmuls: Vec<ops::MatmulShape>) -> Self {
        FamilyModel { matmuls, ..self }
    }
}

/// Calls a stepped pass between its steps; see [`Model::embed`].
pub type Between<'a> = &'a mut dyn FnMut() -> ControlFlow<()>;

/// A model's answer for a batch: one unnormalised f32 vector per item, in
/// order.
pub type Embeddings = Result<Vec<Vec<f32>>, ModelError>;

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
    fn embed(&self, batch: &[&Self::Input], between: Between<'_>) -> Embeddings;
}

/// Any family's model replica, as a worker runs it.
pub trait EmbeddingModel: Send {
    /// [`Model::embed`] over erased items.
    fn embed_stepped(&self, batch: &[&Prepared], between: Between<'_>) -> Embeddings;

    /// [`Self::embed_stepped`] without stopping between steps.
    fn embed(&self, batch: &[&Prepared]) -> Embeddings {
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
    fn embed_stepped(&self, batch: &[&Prepared], between: Between<'_>) -> Embeddings {
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

    /// A replica on `vb`'s device and dtype; on the CPU, the fast encoders'
    /// products run on `backend` (a family without them ignores it).
    fn build(&self, vb: VarBuilder, backend: Backend) -> Result<Self::Model, ModelError>;
}

/// What a family whose replicas depend on their devices' pass sizes builds
/// every replica from: its config, and the [`PassLimits`] of the model's
/// devices (the same for every replica of the model).
pub struct WithPass<C> {
    pub cfg: C,
    pub pass: PassLimits,
}

/// Builds one replica of a configured model, erased.
pub trait ReplicaBuilder: Send + Sync {
    /// [`Replicas::build`], erased.
    fn build(
        &self,
        vb: VarBuilder,
        backend: Backend,
    ) -> Result<Box<dyn EmbeddingModel>, ModelError>;
}

struct ErasedReplicas<R>(R);

impl<R: Replicas> ReplicaBuilder for ErasedReplicas<R> {
    fn build(
        &self,
        vb: VarBuilder,
        backend: Backend,
    ) -> Result<Box<dyn EmbeddingModel>, ModelError> {
        Ok(erase_model(self.0.build(vb, backend)?))
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
        fn embed(&self, batch: &[&TestData], between: Between<'_>) -> Embeddings {
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

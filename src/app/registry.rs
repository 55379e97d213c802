//! The served models and their lifecycle: loading, ready, failed, shutting
//! down.
//!
//! Owns each model's slot (its configuration, and once loaded its info,
//! batcher and workers), name resolution for requests, and readiness. It
//! does not load models itself (see [`super::server`]) and knows nothing of
//! HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::batching::Batcher;
use crate::config::{Config, ModelConfig, ServerConfig};
use crate::metrics::Metrics;
use crate::models::ModelInfo;
use crate::worker::WorkerHandle;

/// A model that is loaded and has workers.
#[derive(Debug)]
pub struct ServedModel {
    pub info: ModelInfo,
    pub batcher: Batcher,
    pub workers: Vec<WorkerHandle>,
}

impl ServedModel {
    pub fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.is_alive()).count()
    }
}

#[derive(Debug, Clone)]
enum SlotState {
    Loading,
    Ready(Arc<ServedModel>),
    Failed(String),
}

/// Where a model stands, as reported by `/ready` and `/info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Loading,
    Ready,
    /// Loaded, but no worker is alive.
    NoWorker,
    Failed,
}

impl ModelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Loading => "loading",
            ModelStatus::Ready => "ready",
            ModelStatus::NoWorker => "no_worker",
            ModelStatus::Failed => "failed",
        }
    }
}

/// Why a request cannot use a model now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("model {0} is still loading")]
    Loading(String),
    #[error("model {0} has no live worker")]
    NoWorker(String),
    #[error("model {name} failed to load: {message}")]
    Failed { name: String, message: String },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// One configured model.
#[derive(Debug)]
pub struct ModelSlot {
    pub config: ModelConfig,
    state: RwLock<SlotState>,
}

impl ModelSlot {
    fn state(&self) -> SlotState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_ready(&self, served: Arc<ServedModel>) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = SlotState::Ready(served);
    }

    pub(crate) fn set_failed(&self, message: String) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = SlotState::Failed(message);
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The loaded model, whether or not a worker is alive.
    pub fn loaded(&self) -> Option<Arc<ServedModel>> {
        match self.state() {
            SlotState::Ready(s) => Some(s),
            _ => None,
        }
    }

    /// The failure message when loading failed.
    pub fn failure(&self) -> Option<String> {
        match self.state() {
            SlotState::Failed(m) => Some(m),
            _ => None,
        }
    }

    pub fn status(&self) -> ModelStatus {
        match self.state() {
            SlotState::Loading => ModelStatus::Loading,
            SlotState::Failed(_) => ModelStatus::Failed,
            SlotState::Ready(s) if s.live_workers() > 0 => ModelStatus::Ready,
            SlotState::Ready(_) => ModelStatus::NoWorker,
        }
    }

    /// The model, when it can take requests.
    pub fn served(&self) -> Result<Arc<ServedModel>, Unavailable> {
        let name = self.config.name.clone();
        match self.state() {
            SlotState::Loading => Err(Unavailable::Loading(name)),
            SlotState::Failed(message) => Err(Unavailable::Failed { name, message }),
            SlotState::Ready(s) if s.live_workers() > 0 => Ok(s),
            SlotState::Ready(_) => Err(Unavailable::NoWorker(name)),
        }
    }
}

/// Why a requested model name does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown model {name:?}; this server serves: {available}")]
    Unknown { name: String, available: String },
    #[error("field model is required when several models are served: {available}")]
    Ambiguous { available: String },
}

/// Every served model, and the server-wide state handlers need.
pub struct Registry {
    pub server: ServerConfig,
    pub metrics: Metrics,
    models: Vec<Arc<ModelSlot>>,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Slots for every configured model, all loading.
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        let models = config
            .models
            .iter()
            .map(|m| {
                metrics.model_ready.with_label_values(&[&m.name]).set(0);
                Arc::new(ModelSlot {
                    config: m.clone(),
                    state: RwLock::new(SlotState::Loading),
                })
            })
            .collect();
        Registry {
            server: config.server.clone(),
            metrics,
            models,
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn models(&self) -> &[Arc<ModelSlot>] {
        &self.models
    }

    fn names(&self) -> String {
        self.models
            .iter()
            .map(|m| m.config.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The model a request names, or the only one when it names none.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<ModelSlot>, ResolveError> {
        match name {
            Some(n) => self
                .models
                .iter()
                .find(|m| m.config.name == n)
                .cloned()
                .ok_or_else(|| ResolveError::Unknown {
                    name: n.to_string(),
                    available: self.names(),
                }),
            None => match self.models.as_slice() {
                [only] => Ok(Arc::clone(only)),
                _ => Err(ResolveError::Ambiguous {
                    available: self.names(),
                }),
            },
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Whether every model is loaded with a live worker and the server is
    /// not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.models.iter().all(|m| m.status() == ModelStatus::Ready)
    }
}

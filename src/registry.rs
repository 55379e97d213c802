//! The served models and their lifecycle: loading, ready, failed, shutting
//! down.
//!
//! Owns each model's slot (its configuration, and once loaded its info,
//! batcher and workers), name resolution for requests, and readiness. It sits
//! below both [`crate::http`] (handlers read it) and [`crate::app`] (which
//! fills it while loading), so neither imports the other for it. It does not
//! load models itself (see `app::server`) and knows nothing of HTTP.

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
    /// What the startup probes gave, and how they compare with the golden
    /// vectors when configured.
    pub probes: ProbeReport,
}

/// The startup probes of a model (see [`crate::probe`]).
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// Each probe's name and the digest of its normalised vector.
    pub digests: Vec<(String, String)>,
    /// The golden-vectors comparison, when `golden_vectors` is set.
    pub golden: Option<GoldenReport>,
}

/// How the probes compare with the configured golden vectors.
#[derive(Debug, Clone)]
pub struct GoldenReport {
    pub path: String,
    pub tolerance: f32,
    /// The fingerprint the golden file was written for.
    pub fingerprint: String,
    /// Each probe's largest component difference.
    pub max_abs_diff: Vec<(String, f32)>,
    /// Why the vectors drifted beyond the tolerance (the model is then not
    /// ready).
    pub drift: Option<String>,
}

impl ServedModel {
    /// Why the probes drifted from the golden vectors, when they did.
    pub fn drift(&self) -> Option<&str> {
        self.probes.golden.as_ref()?.drift.as_deref()
    }

    /// Workers serving batches now (the queue records worker states).
    pub fn live_workers(&self) -> usize {
        self.batcher.queue().live_workers()
    }

    /// Whether every worker failed for good (its rebuilds kept failing):
    /// only a restart of the process can bring the model back.
    pub fn unrecoverable(&self) -> bool {
        self.batcher.queue().all_given_up()
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
    /// Loaded and serving, but its startup probes drifted from the golden
    /// vectors: not ready (it still answers requests sent to it).
    Drifted,
    Failed,
}

impl ModelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Loading => "loading",
            ModelStatus::Ready => "ready",
            ModelStatus::NoWorker => "no_worker",
            ModelStatus::Drifted => "drifted",
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
            SlotState::Ready(s) if s.live_workers() == 0 => ModelStatus::NoWorker,
            SlotState::Ready(s) if s.drift().is_some() => ModelStatus::Drifted,
            SlotState::Ready(_) => ModelStatus::Ready,
        }
    }

    /// Why the model is not ready, in words (for `/ready`), `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        let name = self.name();
        match self.state() {
            SlotState::Ready(s) if s.live_workers() > 0 => s
                .drift()
                .map(|d| format!("{name}'s startup probes drifted from its golden vectors ({d})")),
            _ => Some(format!("{name} is {}", self.status().as_str())),
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
    /// `server.preprocess_threads` as resolved for the served models'
    /// devices and this machine ([`Config::preprocess_threads`]).
    pub preprocess_threads: usize,
    pub metrics: Metrics,
    models: Vec<Arc<ModelSlot>>,
    /// Shutdown began: not ready, but requests may still be served.
    draining: AtomicBool,
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
            preprocess_threads: config.preprocess_threads(),
            metrics,
            models,
            draining: AtomicBool::new(false),
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

    /// Shutdown began: `/ready` turns 503, requests are still served.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// New requests are refused from now on.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Whether shutdown began (drain delay included).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The models that cannot recover without a restart of the process
    /// (`/health` answers 503 while any is listed).
    pub fn unrecoverable(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.loaded().is_some_and(|s| s.unrecoverable()))
            .map(|m| m.config.name.clone())
            .collect()
    }

    /// Whether every model is loaded with a live worker and the server is
    /// not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.models.iter().all(|m| m.status() == ModelStatus::Ready)
    }
}

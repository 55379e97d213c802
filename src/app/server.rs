//! Starting, running and stopping the server.
//!
//! Owns the listener, the background loading of every configured model, the
//! graceful shutdown (readiness goes 503, in-flight requests drain within
//! `server.shutdown_timeout_ms`, then queues close and workers are joined),
//! and the test hooks that make loading and failures observable. Handlers
//! live in [`crate::http`]; batching in [`crate::batching`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::registry::{ModelSlot, Registry, ServedModel};
use crate::batching::{Batcher, PreprocessPool, Queue};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::models::{EmbeddingModel, LoadOptions, LoadedModel};
use crate::worker::{self, ReplicaFactory};

/// Called on the loading thread before a model (named by the argument) loads.
pub type BeforeLoadHook = Arc<dyn Fn(&str) + Send + Sync>;
/// Wraps every replica of a model (named by the first argument) once built,
/// on its worker thread.
pub type WrapReplicaHook =
    Arc<dyn Fn(&str, Box<dyn EmbeddingModel>) -> Box<dyn EmbeddingModel> + Send + Sync>;

/// Test hooks: ways to observe loading and inject model behaviour. The
/// production binary uses none.
#[derive(Clone, Default)]
pub struct Hooks {
    pub before_load: Option<BeforeLoadHook>,
    pub wrap_replica: Option<WrapReplicaHook>,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start the loading thread: {0}")]
    Thread(std::io::Error),
    #[error("invalid OpenAPI document: {0}")]
    OpenApi(String),
    #[error("model {model} failed to load: {message}")]
    LoadFailed { model: String, message: String },
    #[error("the server task failed: {0}")]
    Join(String),
}

/// A running server.
pub struct ServerHandle {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    shutdown: ShutdownTrigger,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Asks a server to shut down gracefully; cheap to clone.
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<bool>>);

impl ShutdownTrigger {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl ServerHandle {
    /// Asks for a graceful shutdown; [`ServerHandle::wait`] returns when done.
    pub fn shutdown(&self) {
        self.shutdown.shutdown();
    }

    /// A handle that can ask for the shutdown from elsewhere (a signal task).
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.shutdown.clone()
    }

    /// Runs until shut down (or a model fails to load).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Join(e.to_string())),
        }
    }
}

/// Binds the listener, starts serving at once (models load in the
/// background) and returns.
pub async fn start(config: Config, hooks: Hooks) -> Result<ServerHandle, ServeError> {
    let metrics = Metrics::new();
    let registry = Arc::new(Registry::new(&config, metrics.clone()));
    let router = crate::http::router(Arc::clone(&registry)).map_err(ServeError::OpenApi)?;
    let addr_text = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind((config.server.host.as_str(), config.server.port))
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr_text,
            source,
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");

    let (fatal_tx, fatal_rx) = oneshot::channel::<(String, String)>();
    let pool = PreprocessPool::new(config.server.preprocess_concurrency());
    let loader_registry = Arc::clone(&registry);
    std::thread::Builder::new()
        .name("vlembed-loader".into())
        .spawn(move || load_all(&loader_registry, &hooks, &pool, fatal_tx))
        .map_err(ServeError::Thread)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        listener,
        router,
        Arc::clone(&registry),
        shutdown_rx,
        fatal_rx,
        config.server.shutdown_timeout(),
    ));
    Ok(ServerHandle {
        addr,
        registry,
        shutdown: ShutdownTrigger(Arc::new(shutdown)),
        task,
    })
}

async fn run(
    listener: TcpListener,
    router: axum::Router,
    registry: Arc<Registry>,
    mut shutdown_rx: watch::Receiver<bool>,
    fatal_rx: oneshot::Receiver<(String, String)>,
    drain_timeout: Duration,
) -> Result<(), ServeError> {
    let fatal: Arc<Mutex<Option<(String, String)>>> = Arc::default();
    let fatal_slot = Arc::clone(&fatal);
    let signal_registry = Arc::clone(&registry);
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let signal = async move {
        let load_failure = async {
            match fatal_rx.await {
                Ok(f) => f,
                // Every model loaded: never a reason to stop.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown_rx.wait_for(|stop| *stop) => {
                tracing::info!("shutting down: draining in-flight requests");
            }
            f = load_failure => {
                tracing::error!(model = %f.0, error = %f.1, "a model failed to load; shutting down");
                *fatal_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
            }
        }
        signal_registry.begin_shutdown();
        let _ = drain_tx.send(());
    };
    let serve = axum::serve(listener, router).with_graceful_shutdown(signal);
    let drain_deadline = async {
        if drain_rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = serve => r?,
        _ = drain_deadline => {
            tracing::warn!(timeout = ?drain_timeout, "in-flight requests did not finish in time; stopping anyway");
        }
    }
    registry.begin_shutdown();
    let stop_registry = Arc::clone(&registry);
    let joined = tokio::task::spawn_blocking(move || stop_workers(&stop_registry, drain_timeout));
    if let Err(e) = joined.await {
        tracing::warn!(error = %e, "stopping the workers failed");
    }
    tracing::info!("stopped");
    let failure = fatal.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failure {
        Some((model, message)) => Err(ServeError::LoadFailed { model, message }),
        None => Ok(()),
    }
}

/// Closes every queue (workers finish what is queued) and joins the workers.
fn stop_workers(registry: &Registry, timeout: Duration) {
    let served: Vec<Arc<ServedModel>> = registry
        .models()
        .iter()
        .filter_map(|m| m.loaded())
        .collect();
    for s in &served {
        s.batcher.queue().close();
    }
    let deadline = Instant::now() + timeout;
    for s in &served {
        for w in &s.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if !w.join_timeout(left) {
                tracing::warn!(device = %w.device, "a worker did not stop in time");
            }
        }
    }
}

/// Loads every model in turn; the first failure is reported through `fatal`.
fn load_all(
    registry: &Registry,
    hooks: &Hooks,
    pool: &PreprocessPool,
    fatal: oneshot::Sender<(String, String)>,
) {
    for slot in registry.models() {
        if registry.is_shutting_down() {
            return;
        }
        let name = slot.config.name.clone();
        let start = Instant::now();
        tracing::info!(model = %name, source = %slot.config.source, "loading model");
        match load_model(slot, hooks, pool, &registry.metrics) {
            Ok(served) => {
                tracing::info!(
                    model = %name,
                    architecture = served.info.architecture.as_str(),
                    dimensions = served.info.dimensions,
                    workers = served.workers.len(),
                    seconds = start.elapsed().as_secs_f64(),
                    "model ready"
                );
                if registry.is_shutting_down() {
                    served.batcher.queue().close();
                }
                slot.set_ready(Arc::new(served));
            }
            Err(message) => {
                slot.set_failed(message.clone());
                let _ = fatal.send((name, message));
                return;
            }
        }
    }
}

fn load_model(
    slot: &ModelSlot,
    hooks: &Hooks,
    pool: &PreprocessPool,
    metrics: &Metrics,
) -> Result<ServedModel, String> {
    let cfg = &slot.config;
    if let Some(hook) = &hooks.before_load {
        hook(&cfg.name);
    }
    let source = cfg.model_source();
    let mut opts = LoadOptions {
        dtype: cfg.dtype,
        ..Default::default()
    };
    opts.image_limits.max_pixels = cfg.max_image_pixels;
    opts.image_limits.max_request_pixels = cfg.max_request_image_pixels;
    let loaded = Arc::new(LoadedModel::open(&source, &opts).map_err(|e| e.to_string())?);
    let queue = Queue::new(&cfg.name, cfg.batching, metrics.clone());
    let mut workers = Vec::with_capacity(cfg.devices.len());
    for (index, &device) in cfg.devices.iter().enumerate() {
        let model = Arc::clone(&loaded);
        let wrap = hooks.wrap_replica.clone();
        let name = cfg.name.clone();
        let factory: ReplicaFactory = Box::new(move || {
            let replica = model.replica(&device.open()?)?;
            Ok(match wrap {
                Some(w) => w(&name, replica),
                None => replica,
            })
        });
        match worker::spawn(Arc::clone(&queue), device, index, factory, metrics.clone()) {
            Ok(w) => workers.push(w),
            Err(e) => {
                queue.close();
                return Err(e.to_string());
            }
        }
    }
    let batcher = Batcher::new(
        queue,
        Arc::clone(&loaded.preprocessor),
        pool.clone(),
        metrics.clone(),
    );
    Ok(ServedModel {
        info: loaded.info.clone(),
        batcher,
        workers,
    })
}

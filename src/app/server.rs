//! Starting, running and stopping the server.
//!
//! Owns the listener, the background loading of every configured model
//! (every device opened and checked first, before any model file is read or
//! downloaded, so a missing GPU fails the start in well under a second; then
//! each model's files, its replicas, each warmed up on its own worker thread
//! before it serves, the startup probes, golden-vector check and embedding
//! cache), the process-wide CUDA switches (`server.allow_tf32`), the
//! graceful shutdown (readiness goes 503, an optional `server.drain_delay_ms`
//! while still serving, then accepting stops, in-flight requests drain, queues
//! close and workers are joined, all within `server.shutdown_timeout_ms`),
//! and the test hooks that make loading and failures observable. Handlers
//! live in [`crate::http`]; batching in [`crate::batching`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::connections::{self, ConnLimits};
use crate::batching::{Batcher, EmbeddingCache, PreprocessPool, Queue};
use crate::config::{Config, ServerConfig};
use crate::fetch::Fetcher;
use crate::metrics::Metrics;
use crate::models::{
    DeviceError, DeviceSpec, EmbeddingModel, LoadOptions, LoadedModel, ModelError,
};
use crate::probe::{self, GoldenFile, ProbeError, ProbeResult};
use crate::registry::{GoldenReport, ModelSlot, ProbeReport, Registry, ServedModel};
use crate::warmup::Warmup;
use crate::worker::{self, ReplicaFactory, RestartPolicy, WorkerError};

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
    /// The resolver and connector image URL fetches use (default: the
    /// system's), so tests can keep every connection on loopback.
    pub fetch_net: Option<crate::fetch::Net>,
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
    OpenApi(#[from] crate::http::OpenApiError),
    #[error("model {model} failed to load: {source}")]
    LoadFailed {
        model: String,
        #[source]
        source: LoadError,
    },
    #[error("the server task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
    #[error("cannot set up image URL fetching: {0}")]
    Fetch(#[from] crate::fetch::SetupError),
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
            Err(e) => Err(ServeError::Join(e)),
        }
    }
}

/// Binds the listener, starts serving at once (models load in the
/// background) and returns.
pub async fn start(config: Config, hooks: Hooks) -> Result<ServerHandle, ServeError> {
    if !config.server.otlp_endpoint.trim().is_empty() {
        crate::otlp::init(config.server.otlp_endpoint.trim()).map_err(ServeError::Thread)?;
    }
    set_tf32(config.server.allow_tf32);
    let metrics = Metrics::new();
    let registry = Arc::new(Registry::new(&config, metrics.clone()));
    let fetcher = if config.server.fetch_image_urls {
        let f = &config.fetch;
        tracing::info!(
            allowed_hosts = ?f.allowed_hosts,
            allow_loopback = f.allow_loopback,
            allow_private = f.allow_private,
            allowed_cidrs = ?f.allowed_cidrs,
            "image URL fetching is on (server.fetch_image_urls)"
        );
        let net = hooks.fetch_net.clone().unwrap_or_default();
        Some(Arc::new(Fetcher::new(
            f,
            config.server.max_image_bytes,
            net,
            metrics.clone(),
        )?))
    } else {
        None
    };
    let router = crate::http::router(Arc::clone(&registry), fetcher)?;
    let addr_text = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind((config.server.host.as_str(), config.server.port))
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr_text,
            source,
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    log_auth(&config.server.api_keys, addr);

    let (fatal_tx, fatal_rx) = oneshot::channel::<(String, LoadError)>();
    let pool = PreprocessPool::new(registry.preprocess_threads);
    tracing::info!(
        threads = registry.preprocess_threads,
        auto = config.server.preprocess_threads == 0,
        class = config.device_class().as_str(),
        "preprocessing threads (server.preprocess_threads)"
    );
    let loader_registry = Arc::clone(&registry);
    std::thread::Builder::new()
        .name("vlembed-loader".into())
        .spawn(move || load_all(&loader_registry, &hooks, &pool, fatal_tx, addr))
        .map_err(ServeError::Thread)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let plan = ShutdownPlan {
        timeout: config.server.shutdown_timeout(),
        drain_delay: config.server.drain_delay(),
    };
    let task = tokio::spawn(run(
        listener,
        router,
        Arc::clone(&registry),
        ConnLimits::from_config(&config.server),
        shutdown_rx,
        fatal_rx,
        plan,
    ));
    Ok(ServerHandle {
        addr,
        registry,
        shutdown: ShutdownTrigger(Arc::new(shutdown)),
        task,
    })
}

/// `server.allow_tf32`: cuBLAS's TF32 math for f32 matmuls, process-wide.
/// Candle's switch is a global flag read by every f32 GEMM on CUDA; on a
/// build without CUDA it is a no-op.
fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    if on {
        if candle_core::utils::cuda_is_available() {
            tracing::info!("TF32 is on for f32 matmuls on CUDA (server.allow_tf32)");
        } else {
            tracing::info!("server.allow_tf32 is set but this build has no CUDA: no effect");
        }
    }
}

/// Says whether authentication is on; warns when it is off on an address
/// other hosts can reach.
fn log_auth(keys: &[String], addr: SocketAddr) {
    if !keys.is_empty() {
        tracing::info!(keys = keys.len(), "authentication is on (server.api_keys)");
    } else if addr.ip().is_loopback() {
        tracing::info!("authentication is off (no server.api_keys); loopback only");
    } else {
        tracing::warn!(
            %addr,
            "authentication is off (no server.api_keys) and the server listens on a \
             non-loopback address: anyone who can reach it may use it; set server.api_keys \
             or VLEMBED_API_KEYS"
        );
    }
}

/// How the server stops; every step counts within `timeout`.
#[derive(Debug, Clone, Copy)]
struct ShutdownPlan {
    /// The whole shutdown: drain delay, drain, worker join.
    timeout: Duration,
    /// `/ready` says 503 this long while requests are still served.
    drain_delay: Duration,
}

async fn run(
    listener: TcpListener,
    router: axum::Router,
    registry: Arc<Registry>,
    limits: ConnLimits,
    mut shutdown_rx: watch::Receiver<bool>,
    fatal_rx: oneshot::Receiver<(String, LoadError)>,
    plan: ShutdownPlan,
) -> Result<(), ServeError> {
    let (accept_tx, accept_rx) = oneshot::channel::<()>();
    let counted = Arc::clone(&registry);
    let on_refused: connections::OnRefused = Arc::new(move |path, status| {
        crate::http::record_refused(&counted.metrics, path, status);
    });
    let mut serving = tokio::spawn(connections::serve(
        listener,
        router,
        limits,
        on_refused,
        async {
            let _ = accept_rx.await;
        },
    ));

    // 1. Wait for a reason to stop.
    let load_failure = async {
        match fatal_rx.await {
            Ok(f) => f,
            // Every model loaded: never a reason to stop.
            Err(_) => std::future::pending().await,
        }
    };
    let failure = tokio::select! {
        _ = shutdown_rx.wait_for(|stop| *stop) => None,
        f = load_failure => {
            tracing::error!(model = %f.0, error = %f.1, "a model failed to load; shutting down");
            Some(f)
        }
    };
    let deadline = Instant::now() + plan.timeout;

    // 2. Drain delay: not ready, still serving, so load balancers move away.
    registry.begin_drain();
    if failure.is_none() && !plan.drain_delay.is_zero() {
        tracing::info!(delay = ?plan.drain_delay, "shutting down: /ready now 503, still serving");
        tokio::time::sleep_until(deadline.min(Instant::now() + plan.drain_delay).into()).await;
    }

    // 3. Stop admitting and accepting; answer what is in flight.
    tracing::info!("shutting down: draining in-flight requests");
    registry.begin_shutdown();
    let _ = accept_tx.send(());
    match tokio::time::timeout_at(deadline.into(), &mut serving).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the connection task failed"),
        Err(_) => {
            tracing::warn!(
                timeout = ?plan.timeout,
                "in-flight requests did not finish in time; stopping anyway"
            );
            serving.abort();
        }
    }

    // 4. Stop the workers with what time is left.
    let stop_registry = Arc::clone(&registry);
    let left = deadline.saturating_duration_since(Instant::now());
    let joined = tokio::task::spawn_blocking(move || stop_workers(&stop_registry, left));
    if let Err(e) = joined.await {
        tracing::warn!(error = %e, "stopping the workers failed");
    }
    tracing::info!("stopped");
    match failure {
        Some((model, source)) => Err(ServeError::LoadFailed { model, source }),
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

/// Checks every device of every model, then loads the models in turn; the
/// first failure is reported through `fatal`.
fn load_all(
    registry: &Registry,
    hooks: &Hooks,
    pool: &PreprocessPool,
    fatal: oneshot::Sender<(String, LoadError)>,
    addr: SocketAddr,
) {
    if let Err((slot, e)) = check_devices(registry) {
        let e = LoadError::Model(ModelError::Device(e));
        slot.set_failed(e.to_string());
        let _ = fatal.send((slot.config.name.clone(), e));
        return;
    }
    for slot in registry.models() {
        if registry.is_shutting_down() {
            return;
        }
        let name = slot.config.name.clone();
        let start = Instant::now();
        tracing::info!(model = %name, source = %slot.config.source, "loading model");
        match load_model(slot, &registry.server, hooks, pool, &registry.metrics) {
            Ok(served) => {
                tracing::info!(
                    model = %name,
                    architecture = served.info.architecture,
                    dimensions = served.info.dimensions,
                    fingerprint = %served.info.fingerprint,
                    cpu_backend = served.info.cpu_backend.as_ref().map_or("none", |c| c.backend.as_str()),
                    workers = served.workers.len(),
                    seconds = start.elapsed().as_secs_f64(),
                    "model ready"
                );
                if registry.is_shutting_down() {
                    served.batcher.queue().close();
                }
                slot.set_ready(Arc::new(served));
            }
            Err(e) => {
                slot.set_failed(e.to_string());
                let _ = fatal.send((name, e));
                return;
            }
        }
    }
    tracing::info!(target: "vlembed::startup", "{}", super::summary::ready_line(registry, addr));
}

/// Opens every configured device once (each distinct one), runs a tiny
/// computation on it and drops it again, before any model file is read or
/// downloaded: `--devices cuda:0` on a machine or build without CUDA fails
/// here, in milliseconds, naming the device and the cause. Returns the
/// first model using a device that failed.
fn check_devices(registry: &Registry) -> Result<(), (Arc<ModelSlot>, DeviceError)> {
    let start = Instant::now();
    let mut checked: Vec<DeviceSpec> = Vec::new();
    for slot in registry.models() {
        for &device in &slot.config.devices {
            if checked.contains(&device) {
                continue;
            }
            if let Err(e) = device.check() {
                tracing::error!(model = %slot.config.name, %device, error = %e, "a device cannot be used");
                return Err((Arc::clone(slot), e));
            }
            checked.push(device);
        }
    }
    let devices: Vec<String> = checked.iter().map(|d| d.to_string()).collect();
    tracing::info!(
        devices = %devices.join(", "),
        seconds = start.elapsed().as_secs_f64(),
        "devices checked"
    );
    Ok(())
}

/// Why a model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

fn load_model(
    slot: &ModelSlot,
    server: &ServerConfig,
    hooks: &Hooks,
    pool: &PreprocessPool,
    metrics: &Metrics,
) -> Result<ServedModel, LoadError> {
    let cfg = &slot.config;
    if let Some(hook) = &hooks.before_load {
        hook(&cfg.name);
    }
    let source = cfg.model_source();
    let mut opts = LoadOptions {
        dtype: cfg.dtype,
        max_input_tokens: cfg.max_input_tokens,
        cpu_backend: cfg.cpu_backend,
        pass: cfg.pass,
        prompt_format: cfg.prompt_format.clone(),
        min_pixels: cfg.min_pixels,
        max_pixels: cfg.max_pixels,
        ..Default::default()
    };
    opts.image_limits.max_pixels = cfg.max_image_pixels;
    opts.image_limits.max_request_pixels = cfg.max_request_image_pixels;
    let loaded = Arc::new(LoadedModel::open(&source, &opts)?);
    // The golden file is read before any worker starts: a bad path or file
    // is a configuration error, reported like any load failure.
    let golden = match &cfg.golden_vectors {
        Some(path) => Some((path.display().to_string(), GoldenFile::read(path)?)),
        None => None,
    };
    let probe_inputs = probe::prepare(&*loaded.preprocessor, loaded.info.uses_instructions)?;
    // Every replica (each device, and each rebuild) runs the warm-up on its
    // own thread (as CUDA wants) before it is wrapped or serves; the first
    // one's probe results are the model's.
    let warmup = Arc::new(Warmup::new(probe_inputs, &cfg.batching));
    let probe_out: Arc<std::sync::OnceLock<Vec<ProbeResult>>> = Arc::default();
    let queue = Queue::new(&cfg.name, cfg.batching, metrics.clone());
    let restart = RestartPolicy {
        limit: server.worker_restart_limit,
        backoff: server.worker_restart_backoff(),
    };
    let mut workers = Vec::with_capacity(cfg.devices.len());
    for (index, &device) in cfg.devices.iter().enumerate() {
        let model = Arc::clone(&loaded);
        let wrap = hooks.wrap_replica.clone();
        let name = cfg.name.clone();
        let warmup = Arc::clone(&warmup);
        let out = Arc::clone(&probe_out);
        let factory: ReplicaFactory = Box::new(move || {
            let built = Instant::now();
            let replica = model.replica(&device.open()?)?;
            let loaded_s = built.elapsed().as_secs_f64();
            let warmed = warmup.run(replica.as_ref())?;
            let shapes: Vec<String> = warmed
                .shapes
                .iter()
                .map(|(shape, inputs, cost)| format!("{shape} {inputs} (cost {cost})"))
                .collect();
            tracing::info!(
                model = %name, %device, replica = index,
                build_s = loaded_s,
                warmup_s = warmed.took.as_secs_f64(),
                probes = warmed.probes.len(),
                shapes = %shapes.join(", "),
                skipped = ?warmed.skipped,
                "replica warmed up"
            );
            let _ = out.set(warmed.probes);
            Ok(match &wrap {
                Some(w) => w(&name, replica),
                None => replica,
            })
        });
        match worker::spawn(
            Arc::clone(&queue),
            device,
            index,
            factory,
            metrics.clone(),
            restart,
        ) {
            Ok(w) => workers.push(w),
            Err(e) => {
                queue.close();
                return Err(e.into());
            }
        }
    }
    let results = probe_out.get().cloned().unwrap_or_default();
    let probes = check_probes(&cfg.name, &loaded.info.fingerprint, &results, golden);
    let cache = (cfg.embedding_cache_bytes > 0).then(|| {
        Arc::new(EmbeddingCache::new(
            &cfg.name,
            &loaded.info.fingerprint.sha256,
            cfg.embedding_cache_bytes,
            metrics,
        ))
    });
    let batcher = Batcher::new(
        queue,
        Arc::clone(&loaded.preprocessor),
        pool.clone(),
        metrics.clone(),
    )
    .with_cache(cache);
    // The first CPU worker settled the CPU backend while building its replica.
    let info = loaded.served_info();
    if let Some(c) = &info.cpu_backend {
        metrics
            .cpu_backend
            .with_label_values(&[&cfg.name, c.backend.as_str()])
            .set(1);
    }
    Ok(ServedModel {
        info,
        batcher,
        workers,
        probes,
    })
}

/// Logs the probes' digests and compares them with the golden vectors (when
/// configured); a drift is logged as an error and makes the model not ready.
fn check_probes(
    model: &str,
    fingerprint: &crate::models::Fingerprint,
    results: &[ProbeResult],
    golden: Option<(String, GoldenFile)>,
) -> ProbeReport {
    for r in results {
        tracing::info!(
            model, probe = r.name, digest = %r.digest, dimensions = r.embedding.len(),
            first = ?&r.embedding[..r.embedding.len().min(3)], "startup probe"
        );
    }
    let digests = results
        .iter()
        .map(|r| (r.name.to_string(), r.digest.clone()))
        .collect();
    let golden = golden.map(|(path, g)| {
        if g.fingerprint_sha256 != fingerprint.sha256 {
            tracing::warn!(
                model, golden = %path, golden_fingerprint = %g.fingerprint, %fingerprint,
                "the golden vectors were written for another model fingerprint; comparing the vectors anyway"
            );
        }
        let c = g.compare(results);
        match &c.drift {
            Some(why) => tracing::error!(
                model, golden = %path, reason = %why,
                "the startup probes drifted from the golden vectors: the model is NOT READY (/ready 503)"
            ),
            None => tracing::info!(
                model, golden = %path, tolerance = g.tolerance,
                "the startup probes match the golden vectors"
            ),
        }
        GoldenReport {
            path,
            tolerance: g.tolerance,
            fingerprint: g.fingerprint,
            max_abs_diff: c.max_abs_diff,
            drift: c.drift,
        }
    });
    ProbeReport { digests, golden }
}

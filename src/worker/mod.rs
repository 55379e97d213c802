//! Device workers: one OS thread per configured device, each owning its model
//! replica (candle CUDA wants one dedicated thread per device).
//!
//! Owns the loop `take a batch from the queue → run the replica → answer each
//! item → record metrics` (after each batch it asks for the next with a
//! [`Refill`]: it may wait a little for the clients it just answered), and
//! failure isolation:
//!
//! - a batch the model refuses (an error, or the wrong number of vectors) is
//!   retried in halves, down to single inputs, so only the input at fault
//!   gets the error and the requests batched with it succeed;
//! - a batch that ran out of device memory is an ordinary failure: split
//!   as above, since a smaller batch may fit;
//! - a panic inside the model, or a sticky device error (CUDA's illegal
//!   address, launch failure, uncorrectable ECC, unknown error: the context
//!   is poisoned and every later call on it fails; see
//!   [`crate::models::fault`]), answers the batch with an error and drops
//!   the replica; the queue counts the worker as rebuilding (so `/ready`
//!   answers 503 while the model has no live worker) and the worker rebuilds
//!   a fresh replica on the same thread (a new device handle, hence a fresh
//!   CUDA context once no other replica holds the old one; the factory
//!   warms it up before it serves again) after a back-off that doubles with
//!   each rebuild in a row (counted in `vlembed_worker_restarts_total`).
//!   After [`RestartPolicy::limit`] rebuilds in a row without a batch
//!   served in between (no context could be made, or the new one fails
//!   too), it gives up: the handle reports [`WorkerHandle::gave_up`],
//!   `/health` answers 503, and the queue fails what waits once no worker is
//!   left.
//!
//! Preemption: a batch with no `High` input runs stepped
//! ([`EmbeddingModel::embed_stepped`]): before each layer of its pass (the CLIP
//! vision tower; the LLaVA vision tower and decoder)
//! the worker takes `High` batches from the queue
//! ([`Queue::try_take_priority`]), at most [`PRIORITY_BURST`] in a row, and
//! runs them to the end on the same replica, then resumes the pass. A short
//! query thus waits for one layer of the batch in progress, not for the
//! batch. Isolation holds for those batches too: each is retried in halves
//! on its own, and a loss in one answers it, stops the interrupted batch
//! (answered `WorkerDied`) and rebuilds the replica as above.
//!
//! It never sees HTTP or requests, only queue items; it does not normalise
//! (the batcher does).

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batching::schedule::{self, Ran};
use crate::batching::trace::{self, RequestTrace};
use crate::batching::{Item, ItemError, ItemResult, Queue, WorkerId, WorkerState};
use crate::metrics::Metrics;
use crate::models::{panic_message, Between, DeviceSpec, EmbeddingModel, Fault, ModelError};
use crate::preprocess::Prepared;

/// Builds a model replica (and warms it up); runs on the worker's own
/// thread, again after each loss (a panic or a sticky device error).
pub type ReplicaFactory =
    Box<dyn Fn() -> Result<Box<dyn EmbeddingModel>, ModelError> + Send + 'static>;

/// How a worker recovers from a lost replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Rebuilds in a row (no batch served in between) before giving up.
    pub limit: u32,
    /// Back-off before the first rebuild in a row; doubles each time.
    pub backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            limit: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Longest back-off between two rebuilds.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl RestartPolicy {
    /// The back-off before rebuild number `n` in a row (1-based).
    pub fn backoff_for(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start a worker thread for {device}: {source}")]
    Spawn {
        device: DeviceSpec,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the model replica on {device}: {source}")]
    Replica {
        device: DeviceSpec,
        #[source]
        source: ModelError,
    },
    #[error("the worker thread for {device} died while building its replica")]
    DiedAtStart { device: DeviceSpec },
}

/// A running worker: its thread, and its id in the queue (which holds its
/// state).
#[derive(Debug)]
pub struct WorkerHandle {
    pub device: DeviceSpec,
    id: WorkerId,
    queue: Arc<Queue>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerHandle {
    /// The worker's state, as the queue records it.
    pub fn state(&self) -> WorkerState {
        self.queue.worker_state(self.id)
    }

    /// Whether the thread serves batches now (false while it rebuilds).
    pub fn is_alive(&self) -> bool {
        self.state() == WorkerState::Live
    }

    /// Whether the worker failed for good (its rebuilds kept failing).
    pub fn gave_up(&self) -> bool {
        self.state() == WorkerState::GivenUp
    }

    /// Waits for the thread to end (after the queue was closed), at most
    /// `timeout`. Returns whether it ended.
    pub fn join_timeout(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut slot = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = slot.as_ref() else {
            return true;
        };
        while !handle.is_finished() {
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(h) = slot.take() {
            let _ = h.join();
        }
        true
    }
}

/// Tells the queue the worker stopped when the thread ends, however it ends
/// (return or an unexpected unwind).
struct ExitGuard {
    id: WorkerId,
    queue: Arc<Queue>,
    reason: String,
    /// The worker was given up (its rebuilds kept failing).
    given_up: bool,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.queue
            .worker_stopped(self.id, &self.reason, self.given_up);
    }
}

/// Builds a replica, turning a panic into an error.
fn build(factory: &ReplicaFactory) -> Result<Box<dyn EmbeddingModel>, ModelError> {
    match catch_unwind(AssertUnwindSafe(factory)) {
        Ok(r) => r,
        Err(panic) => Err(ModelError::Load(format!(
            "building the replica panicked: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// Starts a worker for `device` on its own thread: builds the replica there
/// with `factory`, then serves `queue` until it is closed and drained,
/// rebuilding the replica after a loss as `policy` allows. Blocks until the
/// first replica is built (or failed).
pub fn spawn(
    queue: Arc<Queue>,
    device: DeviceSpec,
    index: usize,
    factory: ReplicaFactory,
    metrics: Metrics,
    policy: RestartPolicy,
) -> Result<WorkerHandle, WorkerError> {
    let id = queue.register_worker();
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), ModelError>>(1);
    let thread_queue = Arc::clone(&queue);
    let name = format!("vlembed-worker-{index}-{device}");
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut guard = ExitGuard {
                id,
                queue: Arc::clone(&thread_queue),
                reason: format!("the worker on {device} stopped"),
                given_up: false,
            };
            let mut replica = match build(&factory) {
                Ok(r) => r,
                Err(e) => {
                    guard.reason = format!("the worker on {device} could not build its replica");
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            thread_queue.worker_started(id);
            let _ = ready_tx.send(Ok(()));
            drop(ready_tx);
            let model = thread_queue.model().to_string();
            let restarts = metrics.worker_restarts.with_label_values(&[&model]);
            let mut in_a_row = 0u32;
            loop {
                let served = serve(&thread_queue, id, replica.as_ref(), &metrics, &mut in_a_row);
                let reason = match served {
                    Ok(()) => return, // closed and drained
                    // `serve` reported the loss (Ctx::lose) before answering.
                    Err(Lost(reason)) => reason,
                };
                // The replica may be corrupt: drop it (its drop may panic too),
                // and with it every handle on its device context.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(replica)));
                loop {
                    if thread_queue.is_closed() {
                        guard.reason = format!("{reason}; not rebuilt: shutting down");
                        return;
                    }
                    in_a_row += 1;
                    if in_a_row > policy.limit {
                        tracing::error!(
                            model = %model, %device, limit = policy.limit,
                            "the worker keeps failing; giving up (server.worker_restart_limit)"
                        );
                        guard.given_up = true;
                        guard.reason = format!(
                            "{reason}; the worker was given up after {} rebuilds",
                            policy.limit
                        );
                        return;
                    }
                    let wait = policy.backoff_for(in_a_row);
                    tracing::warn!(
                        model = %model, %device, attempt = in_a_row, backoff = ?wait,
                        "rebuilding the worker's replica"
                    );
                    std::thread::sleep(wait);
                    restarts.inc();
                    match build(&factory) {
                        Ok(r) => {
                            replica = r;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(model = %model, %device, error = %e, "rebuilding the replica failed");
                        }
                    }
                }
                tracing::info!(model = %model, %device, "worker rebuilt with a fresh replica");
                thread_queue.worker_started(id);
            }
        })
        .map_err(|source| WorkerError::Spawn { device, source })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            device,
            id,
            queue,
            thread: Mutex::new(Some(thread)),
        }),
        Ok(Err(source)) => {
            let _ = thread.join();
            Err(WorkerError::Replica { device, source })
        }
        Err(_) => {
            let _ = thread.join();
            Err(WorkerError::DiedAtStart { device })
        }
    }
}

/// Why a worker must rebuild its replica: the model panicked or hit a
/// sticky device error (in a batch, or in one run between the layers of
/// another); the message says which and where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lost(String);

/// What running the model on some inputs gave.
enum Run {
    /// One vector per input.
    Done(Vec<Vec<f32>>),
    /// The model refused these inputs (an error, out of memory included,
    /// or a wrong count): the replica is fine.
    Failed(String),
    /// The model panicked or its device context is poisoned: the replica
    /// is lost.
    Lost(String),
}

fn run_model(replica: &dyn EmbeddingModel, items: &[Item], between: Between<'_>) -> Run {
    let refs: Vec<&Prepared> = items.iter().map(|i| &i.prepared).collect();
    match catch_unwind(AssertUnwindSafe(|| replica.embed_stepped(&refs, between))) {
        Ok(Ok(vectors)) if vectors.len() == items.len() => Run::Done(vectors),
        Ok(Ok(vectors)) => Run::Failed(format!(
            "the model returned {} embeddings for a batch of {}",
            vectors.len(),
            items.len()
        )),
        // A priority batch run between two layers lost the replica: it is
        // rebuilt, so this batch is not retried on it.
        Ok(Err(ModelError::Interrupted)) => Run::Lost(
            "a batch run between two layers of this one lost the replica (a panic or a \
             sticky device error)"
                .to_string(),
        ),
        Ok(Err(e)) => match e.fault() {
            Fault::Sticky => Run::Lost(format!(
                "a sticky device error (the device context is unusable): {e}"
            )),
            Fault::OutOfMemory => Run::Failed(format!("out of device memory: {e}")),
            Fault::Ordinary => Run::Failed(e.to_string()),
        },
        Err(panic) => Run::Lost(format!(
            "the model panicked: {}",
            panic_message(panic.as_ref())
        )),
    }
}

/// Results of a batch, held back until the batch is recorded: a client
/// answered before its request's trace holds the batch's timings would log
/// (and export) a request with no forward pass in it.
type Answers = Vec<(Item, ItemResult)>;

/// Runs `items`; when the model refuses them, runs each half on its own, so
/// that only the inputs at fault get the error. Every item's result is pushed
/// to `out`. Returns whether the model served some of them, or `Err` when
/// the replica was lost (a panic or a sticky device error).
fn run_isolating(
    replica: &dyn EmbeddingModel,
    model: &str,
    items: Vec<Item>,
    out: &mut Answers,
    between: Between<'_>,
) -> Result<bool, Lost> {
    match run_model(replica, &items, between) {
        Run::Done(vectors) => {
            out.extend(items.into_iter().zip(vectors).map(|(i, v)| (i, Ok(v))));
            Ok(true)
        }
        Run::Failed(msg) if items.len() == 1 => {
            tracing::warn!(model = %model, error = %msg, "the model failed on one input");
            fail_all(items, ItemError::BatchFailed(msg), out);
            Ok(false)
        }
        Run::Failed(msg) => {
            tracing::warn!(
                model = %model, error = %msg, inputs = items.len(),
                "batch failed; retrying it in halves to isolate the input at fault"
            );
            let mut items = items;
            let second = items.split_off(items.len() / 2);
            let a_ok = match run_isolating(replica, model, items, out, between) {
                Ok(ok) => ok,
                Err(Lost(m)) => {
                    fail_all(second, ItemError::WorkerDied(m.clone()), out);
                    return Err(Lost(m));
                }
            };
            let b_ok = run_isolating(replica, model, second, out, between)?;
            Ok(a_ok || b_ok)
        }
        Run::Lost(msg) => {
            tracing::error!(model = %model, "{msg}; rebuilding this worker");
            fail_all(items, ItemError::WorkerDied(msg.clone()), out);
            Err(Lost(msg))
        }
    }
}

/// What the worker loop needs to run a batch.
struct Ctx<'a> {
    queue: &'a Queue,
    /// This worker, as the queue knows it.
    id: WorkerId,
    replica: &'a dyn EmbeddingModel,
    model: String,
    batch_size: prometheus::Histogram,
    inference: prometheus::Histogram,
    /// Whether this replica was reported lost (see [`Ctx::lose`]).
    lost: std::cell::Cell<bool>,
}

impl Ctx<'_> {
    /// Reports the replica lost (the queue counts the worker as rebuilding)
    /// once, before the items of the batch that lost it are answered: a
    /// client that reads its 500 and then asks `/ready` must see the model
    /// unready, not a moment later.
    fn lose(&self) {
        if !self.lost.replace(true) {
            self.queue.worker_lost(self.id);
        }
    }
}

/// The worker loop. Returns `Ok` when the queue is closed and drained, or
/// `Err` when the replica was lost and must be rebuilt. Resets
/// `in_a_row` once a batch is served.
fn serve(
    queue: &Queue,
    id: WorkerId,
    replica: &dyn EmbeddingModel,
    metrics: &Metrics,
    in_a_row: &mut u32,
) -> Result<(), Lost> {
    let model = queue.model().to_string();
    let cx = Ctx {
        queue,
        id,
        replica,
        batch_size: metrics.batch_size.with_label_values(&[&model]),
        inference: metrics.inference_duration.with_label_values(&[&model]),
        model,
        lost: std::cell::Cell::new(false),
    };
    let mut batch = queue.next_batch();
    while let Some(items) = batch {
        // What the batch was, for the queue's refill rule after it.
        let start = Instant::now();
        let class = items.iter().map(|i| i.class).max().unwrap_or_default();
        let inputs = items.len();
        let cost = items.iter().map(|i| i.prepared.cost).sum();
        if run_batch(&cx, items, true)? {
            *in_a_row = 0;
        }
        let ended = Instant::now();
        batch = queue.next_batch_after(&Ran {
            class,
            inputs,
            cost,
            took: ended.duration_since(start),
            ended,
        });
    }
    Ok(())
}

/// Runs one batch, answers its items and records it. With `preemptible`
/// (and when the scheduling rules allow it for this batch) the pass is
/// stepped and `High` batches run between its layers (see the module doc).
/// Returns whether the model served some of it, or `Err` when the replica was lost
/// (in this batch or in one run between its layers).
fn run_batch(cx: &Ctx<'_>, batch: Vec<Item>, preemptible: bool) -> Result<bool, Lost> {
    // Items whose client left while the batch was formed are not run.
    let batch: Vec<Item> = batch.into_iter().filter(|i| !i.abandoned()).collect();
    if batch.is_empty() {
        return Ok(false);
    }
    let model = cx.model.as_str();
    cx.batch_size.observe(batch.len() as f64);
    let start = Instant::now();
    // Who was in this batch, and how long each waited in the queue: read
    // before the batch is consumed, recorded once it has run.
    let traces: Vec<(Arc<RequestTrace>, Duration)> = batch
        .iter()
        .filter_map(|i| {
            Some((
                Arc::clone(i.trace.as_ref()?),
                start.saturating_duration_since(i.enqueued),
            ))
        })
        .collect();
    let size = batch.len();
    let preempt = preemptible && schedule::preemptible(batch.iter().map(|i| i.class));
    // Set when a batch run between two layers lost the replica.
    let mut poisoned: Option<Lost> = None;
    // Time spent in those batches (not this batch's inference time).
    let mut lent = Duration::ZERO;
    let mut preempted = 0usize;
    let mut between = || {
        if poisoned.is_some() {
            return ControlFlow::Break(());
        }
        if !preempt || !cx.queue.has_priority_work() {
            return ControlFlow::Continue(());
        }
        let t = Instant::now();
        let ran = cx.queue.between_layers(|high| {
            preempted += 1;
            run_batch(cx, high, false).map(|_| ())
        });
        lent += t.elapsed();
        match ran {
            Ok(_) => ControlFlow::Continue(()),
            Err(lost) => {
                poisoned = Some(lost);
                ControlFlow::Break(())
            }
        }
    };
    let mut answers = Answers::with_capacity(size);
    let outcome = run_isolating(cx.replica, model, batch, &mut answers, &mut between);
    let took = start.elapsed().saturating_sub(lent);
    cx.inference.observe(took.as_secs_f64());
    let outcome = match (outcome, poisoned) {
        (_, Some(reason)) => Err(reason),
        (o, None) => o,
    };
    if outcome.is_err() {
        cx.lose();
    }
    let failed = !matches!(outcome, Ok(true));
    let waits: Vec<(&Arc<RequestTrace>, Duration)> = traces.iter().map(|(t, w)| (t, *w)).collect();
    let request_ids = trace::record_batch(model, &waits, took, size, failed);
    if failed {
        tracing::warn!(model = %model, size, request_ids = ?request_ids, "batch had failures");
    } else {
        tracing::debug!(
            model = %model,
            size,
            ms = took.as_secs_f64() * 1e3,
            preempted,
            request_ids = ?request_ids,
            "batch"
        );
    }
    for (item, result) in answers {
        item.answer(result);
    }
    outcome
}

fn fail_all(batch: Vec<Item>, error: ItemError, out: &mut Answers) {
    out.extend(batch.into_iter().map(|i| (i, Err(error.clone()))));
}

#[cfg(test)]
mod tests;

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
//! - a panic inside the model answers the batch with an error and drops the
//!   replica (it may be corrupt); the worker then rebuilds a fresh replica on
//!   the same thread after a back-off that doubles with each rebuild in a row
//!   (counted in `vlembed_worker_restarts_total`). After
//!   [`RestartPolicy::limit`] rebuilds in a row without a batch served in
//!   between, it gives up: the handle reports [`WorkerHandle::gave_up`] and
//!   the queue fails what waits once no worker is left.
//!
//! Preemption: a batch with no `High` input runs stepped
//! ([`EmbeddingModel::embed_stepped`]): before each layer of its pass (the CLIP
//! vision tower; the LLaVA vision tower and decoder)
//! the worker takes `High` batches from the queue
//! ([`Queue::try_take_priority`]), at most [`PRIORITY_BURST`] in a row, and
//! runs them to the end on the same replica, then resumes the pass. A short
//! query thus waits for one layer of the batch in progress, not for the
//! batch. Isolation holds for those batches too: each is retried in halves
//! on its own, and a panic in one answers it, stops the interrupted batch
//! (answered `WorkerDied`) and rebuilds the replica as above.
//!
//! It never sees HTTP or requests, only queue items; it does not normalise
//! (the batcher does).

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batching::trace::{self, RequestTrace};
use crate::batching::{Class, Item, ItemError, ItemResult, Queue, Refill, PRIORITY_BURST};
use crate::metrics::Metrics;
use crate::models::{DeviceSpec, EmbeddingModel, ModelError};
use crate::preprocess::Prepared;

/// Builds a model replica; runs on the worker's own thread, again after
/// each panic.
pub type ReplicaFactory =
    Box<dyn Fn() -> Result<Box<dyn EmbeddingModel>, ModelError> + Send + 'static>;

/// How a worker recovers from panics.
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

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    pub device: DeviceSpec,
    alive: Arc<AtomicBool>,
    gave_up: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerHandle {
    /// Whether the thread serves batches now (false while it rebuilds).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Whether the worker failed for good (its rebuilds kept failing).
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
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

/// Marks the worker dead and tells the queue when the thread ends, however
/// it ends (return or an unexpected unwind).
struct ExitGuard {
    alive: Arc<AtomicBool>,
    queue: Arc<Queue>,
    /// Whether the queue counts this worker as live (else as recovering).
    live: bool,
    reason: String,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        if self.live {
            self.queue.worker_stopped(&self.reason);
        } else {
            self.queue.recovery_failed(&self.reason);
        }
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
/// rebuilding the replica after panics as `policy` allows. Blocks until the
/// first replica is built (or failed).
pub fn spawn(
    queue: Arc<Queue>,
    device: DeviceSpec,
    index: usize,
    factory: ReplicaFactory,
    metrics: Metrics,
    policy: RestartPolicy,
) -> Result<WorkerHandle, WorkerError> {
    let alive = Arc::new(AtomicBool::new(false));
    let gave_up = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), ModelError>>(1);
    let thread_alive = Arc::clone(&alive);
    let thread_gave_up = Arc::clone(&gave_up);
    let thread_queue = Arc::clone(&queue);
    let name = format!("vlembed-worker-{index}-{device}");
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut replica = match build(&factory) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            thread_alive.store(true, Ordering::Release);
            thread_queue.worker_started();
            let mut guard = ExitGuard {
                alive: Arc::clone(&thread_alive),
                queue: Arc::clone(&thread_queue),
                live: true,
                reason: format!("the worker on {device} stopped"),
            };
            let _ = ready_tx.send(Ok(()));
            drop(ready_tx);
            let model = thread_queue.model().to_string();
            let restarts = metrics.worker_restarts.with_label_values(&[&model]);
            let mut in_a_row = 0u32;
            loop {
                let served = serve(
                    &thread_queue,
                    replica.as_ref(),
                    &metrics,
                    &mut in_a_row,
                    &thread_alive,
                );
                let reason = match served {
                    Ok(()) => return, // closed and drained
                    // `serve` reported the loss (Ctx::lose) before answering.
                    Err(reason) => reason,
                };
                // The replica may be corrupt: drop it (its drop may panic too).
                guard.live = false;
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
                        thread_gave_up.store(true, Ordering::Release);
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
                thread_alive.store(true, Ordering::Release);
                thread_queue.worker_recovered();
                guard.live = true;
            }
        })
        .map_err(|source| WorkerError::Spawn { device, source })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            device,
            alive,
            gave_up,
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

/// What running the model on some inputs gave.
enum Run {
    /// One vector per input.
    Done(Vec<Vec<f32>>),
    /// The model refused these inputs (an error, or a wrong count).
    Failed(String),
    /// The model panicked.
    Panicked(String),
}

/// Calls a stepped pass between its steps; see [`EmbeddingModel::embed_stepped`].
type Between<'a> = &'a mut dyn FnMut() -> ControlFlow<()>;

fn run_model(replica: &dyn EmbeddingModel, items: &[Item], between: Between<'_>) -> Run {
    let refs: Vec<&Prepared> = items.iter().map(|i| &i.prepared).collect();
    match catch_unwind(AssertUnwindSafe(|| replica.embed_stepped(&refs, between))) {
        Ok(Ok(vectors)) if vectors.len() == items.len() => Run::Done(vectors),
        Ok(Ok(vectors)) => Run::Failed(format!(
            "the model returned {} embeddings for a batch of {}",
            vectors.len(),
            items.len()
        )),
        // A priority batch run between two layers panicked: the replica is
        // rebuilt, so this batch is not retried on it.
        Ok(Err(ModelError::Interrupted)) => Run::Panicked(
            "a batch run between two layers of this one made the model panic".to_string(),
        ),
        Ok(Err(e)) => Run::Failed(e.to_string()),
        Err(panic) => Run::Panicked(format!(
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
/// to `out`. Returns `Err` when the model panicked.
fn run_isolating(
    replica: &dyn EmbeddingModel,
    model: &str,
    items: Vec<Item>,
    out: &mut Answers,
    between: Between<'_>,
) -> Result<bool, String> {
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
                Err(m) => {
                    fail_all(second, ItemError::WorkerDied(m.clone()), out);
                    return Err(m);
                }
            };
            let b_ok = run_isolating(replica, model, second, out, between)?;
            Ok(a_ok || b_ok)
        }
        Run::Panicked(msg) => {
            tracing::error!(model = %model, "{msg}; rebuilding this worker");
            fail_all(items, ItemError::WorkerDied(msg.clone()), out);
            Err(msg)
        }
    }
}

/// What the worker loop needs to run a batch.
struct Ctx<'a> {
    queue: &'a Queue,
    replica: &'a dyn EmbeddingModel,
    model: String,
    batch_size: prometheus::Histogram,
    inference: prometheus::Histogram,
    /// The worker's `alive` flag, and whether this replica was reported
    /// lost (see [`Ctx::lose`]).
    alive: &'a AtomicBool,
    lost: std::cell::Cell<bool>,
}

impl Ctx<'_> {
    /// Marks the replica lost (the worker is not alive, the queue counts it
    /// as rebuilding) once, before the items of the batch that panicked are
    /// answered: a client that reads its 500 and then asks `/ready` must
    /// see the model unready, not a moment later.
    fn lose(&self) {
        if !self.lost.replace(true) {
            self.alive.store(false, Ordering::Release);
            self.queue.worker_lost();
        }
    }
}

/// The worker loop. Returns `Ok` when the queue is closed and drained, or
/// `Err(reason)` when the model panicked and the replica must be rebuilt.
/// Resets `in_a_row` once a batch is served.
fn serve(
    queue: &Queue,
    replica: &dyn EmbeddingModel,
    metrics: &Metrics,
    in_a_row: &mut u32,
    alive: &AtomicBool,
) -> Result<(), String> {
    let model = queue.model().to_string();
    let cx = Ctx {
        queue,
        replica,
        batch_size: metrics.batch_size.with_label_values(&[&model]),
        inference: metrics.inference_duration.with_label_values(&[&model]),
        model,
        alive,
        lost: std::cell::Cell::new(false),
    };
    let max_wait = queue.limits().refill_wait;
    let mut refill = None;
    while let Some(batch) = queue.next_batch_after(refill) {
        // What the batch was, for the refill wait after it (see `Refill`).
        let start = Instant::now();
        let class = batch.iter().map(|i| i.class).max();
        let inputs = batch.len();
        let cost = batch.iter().map(|i| i.prepared.cost).sum();
        if run_batch(&cx, batch, true)? {
            *in_a_row = 0;
        }
        let ended = Instant::now();
        refill = class.and_then(|class| {
            Refill::after(
                class,
                inputs,
                cost,
                ended.duration_since(start),
                ended,
                max_wait,
            )
        });
    }
    Ok(())
}

/// Runs one batch, answers its items and records it. With `preemptible`
/// (and no `High` input in it) the pass is stepped and `High` batches run
/// between its layers (see the module doc). Returns whether the model
/// served some of it, or `Err(reason)` when it panicked (in this batch or
/// in one run between its layers).
fn run_batch(cx: &Ctx<'_>, batch: Vec<Item>, preemptible: bool) -> Result<bool, String> {
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
    let preempt = preemptible && batch.iter().all(|i| i.class < Class::High);
    // Set when a batch run between two layers panicked.
    let mut poisoned: Option<String> = None;
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
        for _ in 0..PRIORITY_BURST {
            let Some(high) = cx.queue.try_take_priority() else {
                break;
            };
            preempted += 1;
            if let Err(reason) = run_batch(cx, high, false) {
                poisoned = Some(reason);
                break;
            }
        }
        lent += t.elapsed();
        if poisoned.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
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

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::test_support::prepared;
    use crate::batching::AdmitError;
    use crate::config::BatchLimits;
    use std::sync::atomic::AtomicUsize;

    /// Embeds an item as [cost, batch length]; fails or panics on demand.
    struct Fake {
        fail_on: usize,
        panic_on: usize,
    }

    impl EmbeddingModel for Fake {
        fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
            if batch.iter().any(|p| p.cost == self.panic_on) {
                panic!("fake model exploded");
            }
            if batch.iter().any(|p| p.cost == self.fail_on) {
                return Err(ModelError::Batch("fake failure".into()));
            }
            Ok(batch
                .iter()
                .map(|p| vec![p.cost as f32, batch.len() as f32])
                .collect())
        }
    }

    fn limits() -> BatchLimits {
        BatchLimits {
            max_batch_size: 8,
            max_batch_cost: 1000,
            max_queue_inputs: 100,
            max_delay: Duration::ZERO,
            refill_wait: Duration::ZERO,
        }
    }

    /// A worker whose factory succeeds `builds_ok` times, then fails.
    fn setup_with(builds_ok: usize, policy: RestartPolicy) -> (Arc<Queue>, WorkerHandle, Metrics) {
        let metrics = Metrics::new();
        let queue = Queue::new("fake", limits(), metrics.clone());
        let builds = AtomicUsize::new(0);
        let factory: ReplicaFactory = Box::new(move || {
            if builds.fetch_add(1, Ordering::SeqCst) >= builds_ok {
                return Err(ModelError::Load("the device is gone".into()));
            }
            Ok(Box::new(Fake {
                fail_on: 13,
                panic_on: 66,
            }) as Box<dyn EmbeddingModel>)
        });
        let w = spawn(
            Arc::clone(&queue),
            DeviceSpec::Cpu,
            0,
            factory,
            metrics.clone(),
            policy,
        )
        .unwrap();
        (queue, w, metrics)
    }

    fn fast() -> RestartPolicy {
        RestartPolicy {
            limit: 2,
            backoff: Duration::from_millis(1),
        }
    }

    fn setup() -> (Arc<Queue>, WorkerHandle, Metrics) {
        setup_with(usize::MAX, fast())
    }

    fn run(queue: &Arc<Queue>, costs: &[usize]) -> Vec<Result<Vec<f32>, ItemError>> {
        let (_admitted, rxs) = submit(queue, costs, Class::Normal);
        rxs.into_iter()
            .map(|rx| rx.blocking_recv().unwrap_or(Err(ItemError::ShuttingDown)))
            .collect()
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn serves_batches_then_survives_a_failed_batch() {
        let (queue, worker, metrics) = setup();
        assert!(worker.is_alive());
        let out = run(&queue, &[1, 2, 3]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap()[0], 1.0);
        assert_eq!(out[2].as_ref().unwrap()[0], 3.0);
        let failed = run(&queue, &[13]);
        assert!(matches!(failed[0], Err(ItemError::BatchFailed(_))));
        let again = run(&queue, &[4]);
        assert_eq!(again[0].as_ref().unwrap()[0], 4.0);
        assert!(metrics
            .render()
            .contains("vlembed_batch_size_count{model=\"fake\"}"));
        queue.close();
        assert!(worker.join_timeout(Duration::from_secs(5)));
        assert!(!worker.is_alive());
    }

    #[test]
    fn a_failing_batch_is_split_so_only_the_faulty_input_fails() {
        let (queue, _worker, _) = setup();
        let out = run(&queue, &[1, 2, 13, 4, 5]);
        for (i, r) in out.iter().enumerate() {
            if i == 2 {
                assert!(matches!(r, Err(ItemError::BatchFailed(m)) if m.contains("fake failure")));
            } else {
                assert_eq!(r.as_ref().unwrap()[0], [1.0, 2.0, 13.0, 4.0, 5.0][i]);
            }
        }
    }

    #[test]
    fn a_panicking_worker_is_rebuilt_and_serves_again() {
        let (queue, worker, metrics) = setup();
        let out = run(&queue, &[66, 1]);
        assert!(matches!(&out[0], Err(ItemError::WorkerDied(m)) if m.contains("exploded")));
        wait_for("the rebuild", || {
            worker.is_alive() && queue.live_workers() == 1
        });
        let again = run(&queue, &[4]);
        assert_eq!(again[0].as_ref().unwrap()[0], 4.0);
        assert!(!worker.gave_up());
        assert!(metrics
            .render()
            .contains("vlembed_worker_restarts_total{model=\"fake\"} 1"));
        queue.close();
        assert!(worker.join_timeout(Duration::from_secs(5)));
    }

    #[test]
    fn the_loss_is_visible_when_the_panicked_batch_is_answered() {
        // A long back-off: the rebuild cannot hide the state checked below.
        let slow = RestartPolicy {
            limit: 2,
            backoff: Duration::from_secs(2),
        };
        let (queue, worker, metrics) = setup_with(usize::MAX, slow);
        let (_admitted, mut rxs) = submit(&queue, &[66], Class::Normal);
        // Spin (no sleep): look at the state the instant the answer lands.
        let out = loop {
            match rxs[0].try_recv() {
                Ok(r) => break r,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(e) => panic!("no answer: {e}"),
            }
        };
        assert!(matches!(&out, Err(ItemError::WorkerDied(_))));
        // The model must already read as unready (a client that asks /ready
        // after its 500 sees 503, and a retry is refused with 503 instead of
        // racing the loss).
        assert!(!worker.is_alive());
        assert_eq!(queue.live_workers(), 0);
        assert!(metrics
            .render()
            .contains("vlembed_model_ready{model=\"fake\"} 0"));
        queue.close();
        assert!(worker.join_timeout(Duration::from_secs(10)));
    }

    #[test]
    fn a_worker_that_cannot_be_rebuilt_gives_up() {
        let (queue, worker, metrics) = setup_with(1, fast());
        let out = run(&queue, &[66]);
        assert!(matches!(&out[0], Err(ItemError::WorkerDied(_))));
        assert!(worker.join_timeout(Duration::from_secs(5)));
        assert!(worker.gave_up());
        assert!(!worker.is_alive());
        assert_eq!(queue.live_workers(), 0);
        assert!(matches!(queue.admit(1), Err(AdmitError::NoWorker { .. })));
        let text = metrics.render();
        assert!(text.contains("vlembed_model_ready{model=\"fake\"} 0"));
        assert!(text.contains("vlembed_worker_restarts_total{model=\"fake\"} 2"));
    }

    /// What the stepped fake saw, shared with the test.
    #[derive(Default)]
    struct Steps {
        /// Costs of the items, in the order their embeddings were made.
        log: Mutex<Vec<usize>>,
        /// The slow batch is in its stepped pass.
        started: AtomicBool,
        /// Lets the slow batch finish.
        release: AtomicBool,
    }

    /// An item of cost 500 is a long stepped pass: it calls `between` every
    /// millisecond until released (by the test, or by the model serving an
    /// item of cost 7), at most 5 s. Cost 66 panics.
    struct Stepped(Arc<Steps>);

    impl EmbeddingModel for Stepped {
        fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.embed_stepped(batch, &mut || ControlFlow::Continue(()))
        }

        fn embed_stepped(
            &self,
            batch: &[&Prepared],
            between: &mut dyn FnMut() -> ControlFlow<()>,
        ) -> Result<Vec<Vec<f32>>, ModelError> {
            let st = &self.0;
            if batch.iter().any(|p| p.cost == 66) {
                panic!("stepped fake exploded");
            }
            if batch.iter().any(|p| p.cost == 500) {
                st.started.store(true, Ordering::SeqCst);
                for _ in 0..5000 {
                    if between().is_break() {
                        return Err(ModelError::Interrupted);
                    }
                    if st.release.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let mut log = st.log_guard();
            for p in batch {
                log.push(p.cost);
                if p.cost == 7 {
                    st.release.store(true, Ordering::SeqCst);
                }
            }
            Ok(batch.iter().map(|p| vec![p.cost as f32]).collect())
        }
    }

    impl Steps {
        fn log_guard(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
            self.log.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    fn stepped_worker() -> (Arc<Queue>, WorkerHandle, Arc<Steps>) {
        let steps = Arc::new(Steps::default());
        let queue = Queue::new("stepped", limits(), Metrics::new());
        let shared = Arc::clone(&steps);
        let factory: ReplicaFactory =
            Box::new(move || Ok(Box::new(Stepped(Arc::clone(&shared))) as Box<dyn EmbeddingModel>));
        let w = spawn(
            Arc::clone(&queue),
            DeviceSpec::Cpu,
            0,
            factory,
            Metrics::new(),
            fast(),
        )
        .unwrap();
        (queue, w, steps)
    }

    type Pending = (
        crate::batching::Admission,
        Vec<tokio::sync::oneshot::Receiver<ItemResult>>,
    );

    fn submit(queue: &Arc<Queue>, costs: &[usize], class: Class) -> Pending {
        let mut a = queue.admit(costs.len()).unwrap();
        a.set_class(class);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut rxs = Vec::new();
        let items = costs
            .iter()
            .map(|&c| {
                let (i, rx) = Item::new(prepared(c), deadline);
                rxs.push(rx);
                i
            })
            .collect();
        a.push(items).unwrap();
        (a, rxs)
    }

    fn answer(p: Pending) -> Vec<ItemResult> {
        let (_admission, rxs) = p;
        rxs.into_iter()
            .map(|rx| rx.blocking_recv().unwrap_or(Err(ItemError::ShuttingDown)))
            .collect()
    }

    #[test]
    fn high_priority_work_runs_between_the_steps_of_a_long_batch() {
        let (queue, worker, steps) = stepped_worker();
        let slow = submit(&queue, &[500], Class::Normal);
        wait_for("the slow pass", || steps.started.load(Ordering::SeqCst));
        // Served between two steps: its answer comes while the slow batch
        // is still in its pass (the fake ends the pass only once 7 is done).
        let out = answer(submit(&queue, &[7], Class::High));
        assert_eq!(out[0].as_ref().unwrap(), &vec![7.0]);
        let out = answer(slow);
        assert_eq!(out[0].as_ref().unwrap(), &vec![500.0]);
        assert_eq!(*steps.log_guard(), vec![7, 500]);
        queue.close();
        assert!(worker.join_timeout(Duration::from_secs(5)));
    }

    #[test]
    fn normal_work_waits_for_the_batch_in_progress() {
        let (queue, _worker, steps) = stepped_worker();
        let slow = submit(&queue, &[500], Class::Normal);
        wait_for("the slow pass", || steps.started.load(Ordering::SeqCst));
        let normal = submit(&queue, &[8], Class::Normal);
        std::thread::sleep(Duration::from_millis(50));
        assert!(steps.log_guard().is_empty());
        steps.release.store(true, Ordering::SeqCst);
        assert!(answer(normal)[0].is_ok());
        assert!(answer(slow)[0].is_ok());
        assert_eq!(*steps.log_guard(), vec![500, 8]);
    }

    #[test]
    fn a_panic_between_steps_stops_the_pass_and_rebuilds_the_replica() {
        let (queue, worker, steps) = stepped_worker();
        let slow = submit(&queue, &[500], Class::Normal);
        wait_for("the slow pass", || steps.started.load(Ordering::SeqCst));
        let bad = answer(submit(&queue, &[66], Class::High));
        assert!(matches!(&bad[0], Err(ItemError::WorkerDied(m)) if m.contains("exploded")));
        let slow = answer(slow);
        assert!(
            matches!(&slow[0], Err(ItemError::WorkerDied(m)) if m.contains("between two layers")),
            "{slow:?}"
        );
        wait_for("the rebuild", || {
            worker.is_alive() && queue.live_workers() == 1
        });
        steps.release.store(true, Ordering::SeqCst);
        let again = answer(submit(&queue, &[4], Class::Normal));
        assert_eq!(again[0].as_ref().unwrap(), &vec![4.0]);
        queue.close();
        assert!(worker.join_timeout(Duration::from_secs(5)));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RestartPolicy {
            limit: 5,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(p.backoff_for(1), Duration::from_millis(100));
        assert_eq!(p.backoff_for(3), Duration::from_millis(400));
        assert_eq!(p.backoff_for(40), MAX_BACKOFF);
    }

    #[test]
    fn a_failing_factory_is_a_start_error() {
        let queue = Queue::new("bad", limits(), Metrics::new());
        let factory: ReplicaFactory = Box::new(|| Err(ModelError::Load("no weights".into())));
        let err = spawn(queue, DeviceSpec::Cpu, 0, factory, Metrics::new(), fast()).unwrap_err();
        assert!(err.to_string().contains("no weights"), "{err}");
    }
}

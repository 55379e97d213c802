//! Device workers: one OS thread per configured device, each owning its model
//! replica (candle CUDA wants one dedicated thread per device).
//!
//! Owns the loop `take a batch from the queue → run the replica → answer each
//! item → record metrics`, catching panics from inside the model: a failed
//! batch answers its items with an error and the worker goes on; a panic
//! answers the batch, then ends the worker (its replica may be corrupt) and
//! the queue learns it lost a worker. It never sees HTTP or requests, only
//! queue items; it does not normalise (the batcher does).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batching::trace::{self, RequestTrace};
use crate::batching::{Item, ItemError, Queue};
use crate::metrics::Metrics;
use crate::models::{DeviceSpec, EmbeddingModel, ModelError};
use crate::preprocess::Prepared;

/// Builds a model replica; runs on the worker's own thread.
pub type ReplicaFactory =
    Box<dyn FnOnce() -> Result<Box<dyn EmbeddingModel>, ModelError> + Send + 'static>;

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
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerHandle {
    /// Whether the thread still serves batches.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
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

/// Marks the worker dead and tells the queue, however the thread ends
/// (return or panic unwinding).
struct ExitGuard {
    alive: Arc<AtomicBool>,
    queue: Arc<Queue>,
    reason: String,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        self.queue.worker_stopped(&self.reason);
    }
}

/// Starts a worker for `device` on its own thread: builds the replica there
/// with `factory`, then serves `queue` until it is closed and drained.
/// Blocks until the replica is built (or failed).
pub fn spawn(
    queue: Arc<Queue>,
    device: DeviceSpec,
    index: usize,
    factory: ReplicaFactory,
    metrics: Metrics,
) -> Result<WorkerHandle, WorkerError> {
    let alive = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), ModelError>>(1);
    let thread_alive = Arc::clone(&alive);
    let thread_queue = Arc::clone(&queue);
    let name = format!("vlembed-worker-{index}-{device}");
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let replica = match catch_unwind(AssertUnwindSafe(factory)) {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                Err(panic) => {
                    let msg = panic_message(panic.as_ref());
                    let _ = ready_tx.send(Err(ModelError::Load(format!(
                        "building the replica panicked: {msg}"
                    ))));
                    return;
                }
            };
            thread_alive.store(true, Ordering::Release);
            thread_queue.worker_started();
            let mut guard = ExitGuard {
                alive: thread_alive,
                queue: Arc::clone(&thread_queue),
                reason: format!("the worker on {device} stopped"),
            };
            let _ = ready_tx.send(Ok(()));
            drop(ready_tx);
            if let Err(reason) = serve(&thread_queue, replica.as_ref(), &metrics) {
                guard.reason = reason;
            }
        })
        .map_err(|source| WorkerError::Spawn { device, source })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            device,
            alive,
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

/// The worker loop. Returns `Ok` when the queue is closed and drained, or
/// `Err(reason)` when the model panicked and the worker must stop.
fn serve(queue: &Queue, replica: &dyn EmbeddingModel, metrics: &Metrics) -> Result<(), String> {
    let model = queue.model().to_string();
    let batch_size = metrics.batch_size.with_label_values(&[&model]);
    let inference = metrics.inference_duration.with_label_values(&[&model]);
    while let Some(batch) = queue.next_batch() {
        // Items whose client left while the batch was formed are not run.
        let batch: Vec<Item> = batch.into_iter().filter(|i| !i.abandoned()).collect();
        if batch.is_empty() {
            continue;
        }
        let refs: Vec<&Prepared> = batch.iter().map(|i| &i.prepared).collect();
        batch_size.observe(batch.len() as f64);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| replica.embed(&refs)));
        let took = start.elapsed();
        inference.observe(took.as_secs_f64());
        drop(refs);
        let waits: Vec<(&Arc<RequestTrace>, Duration)> = batch
            .iter()
            .filter_map(|i| {
                Some((
                    i.trace.as_ref()?,
                    start.saturating_duration_since(i.enqueued),
                ))
            })
            .collect();
        let failed = !matches!(&outcome, Ok(Ok(v)) if v.len() == batch.len());
        let request_ids = trace::record_batch(&model, &waits, took, batch.len(), failed);
        drop(waits);
        tracing::debug!(
            model = %model,
            size = batch.len(),
            ms = took.as_secs_f64() * 1e3,
            request_ids = ?request_ids,
            "batch"
        );
        match outcome {
            Ok(Ok(vectors)) if vectors.len() == batch.len() => {
                for (item, v) in batch.into_iter().zip(vectors) {
                    item.answer(Ok(v));
                }
            }
            Ok(Ok(vectors)) => {
                let msg = format!(
                    "the model returned {} embeddings for a batch of {}",
                    vectors.len(),
                    batch.len()
                );
                tracing::error!(model = %model, request_ids = ?request_ids, "{msg}");
                answer_all(batch, ItemError::BatchFailed(msg));
            }
            Ok(Err(e)) => {
                tracing::error!(model = %model, request_ids = ?request_ids, error = %e, "batch failed");
                answer_all(batch, ItemError::BatchFailed(e.to_string()));
            }
            Err(panic) => {
                let msg = format!("the model panicked: {}", panic_message(panic.as_ref()));
                tracing::error!(model = %model, request_ids = ?request_ids, "{msg}; this worker stops");
                answer_all(batch, ItemError::WorkerDied(msg.clone()));
                return Err(msg);
            }
        }
    }
    Ok(())
}

fn answer_all(batch: Vec<Item>, error: ItemError) {
    for item in batch {
        item.answer(Err(error.clone()));
    }
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
    use crate::config::BatchLimits;
    use crate::input::Modality;
    use std::sync::atomic::AtomicUsize;

    /// Embeds an item as [cost, batch length]; fails or panics on demand.
    struct Fake {
        fail_on: usize,
        panic_on: usize,
        calls: Arc<AtomicUsize>,
    }

    impl EmbeddingModel for Fake {
        fn embed(&self, batch: &[&Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
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

    fn prepared(cost: usize) -> Prepared {
        Prepared {
            modality: Modality::Text,
            token_ids: Some(vec![1; cost]),
            pixels: None,
            image_size: None,
            text_tokens: cost,
            cost,
        }
    }

    fn setup() -> (Arc<Queue>, WorkerHandle, Metrics) {
        let metrics = Metrics::new();
        let limits = BatchLimits {
            max_batch_size: 8,
            max_batch_cost: 1000,
            max_queue_inputs: 100,
            max_delay: Duration::ZERO,
        };
        let queue = Queue::new("fake", limits, metrics.clone());
        let calls = Arc::new(AtomicUsize::new(0));
        let factory: ReplicaFactory = Box::new(move || {
            Ok(Box::new(Fake {
                fail_on: 13,
                panic_on: 66,
                calls,
            }) as Box<dyn EmbeddingModel>)
        });
        let w = spawn(
            Arc::clone(&queue),
            DeviceSpec::Cpu,
            0,
            factory,
            metrics.clone(),
        )
        .unwrap();
        (queue, w, metrics)
    }

    fn run(queue: &Arc<Queue>, costs: &[usize]) -> Vec<Result<Vec<f32>, ItemError>> {
        let mut a = queue.admit(costs.len()).unwrap();
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
        rxs.into_iter()
            .map(|rx| rx.blocking_recv().unwrap_or(Err(ItemError::ShuttingDown)))
            .collect()
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
    fn a_panic_kills_the_worker_and_is_reported() {
        let (queue, worker, metrics) = setup();
        let out = run(&queue, &[66]);
        assert!(matches!(&out[0], Err(ItemError::WorkerDied(m)) if m.contains("exploded")));
        assert!(worker.join_timeout(Duration::from_secs(5)));
        assert!(!worker.is_alive());
        assert_eq!(queue.live_workers(), 0);
        assert!(metrics
            .render()
            .contains("vlembed_model_ready{model=\"fake\"} 0"));
    }

    #[test]
    fn a_failing_factory_is_a_start_error() {
        let queue = Queue::new(
            "bad",
            BatchLimits {
                max_batch_size: 1,
                max_batch_cost: 1,
                max_queue_inputs: 1,
                max_delay: Duration::ZERO,
            },
            Metrics::new(),
        );
        let factory: ReplicaFactory = Box::new(|| Err(ModelError::Load("no weights".into())));
        let err = spawn(queue, DeviceSpec::Cpu, 0, factory, Metrics::new()).unwrap_err();
        assert!(err.to_string().contains("no weights"), "{err}");
    }
}

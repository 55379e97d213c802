//! Unit tests of `worker/mod.rs`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::batching::test_support::prepared;
use crate::batching::AdmitError;
use crate::batching::Class;
use crate::config::BatchLimits;
use std::sync::atomic::AtomicUsize;

/// Embeds an item as [cost, batch length]; fails or panics on demand.
struct Fake {
    fail_on: usize,
    panic_on: usize,
}

impl EmbeddingModel for Fake {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        _: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
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
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        between: Between<'_>,
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

/// A candle error as cudarc words a driver error with `code`.
fn cuda_error(code: &str) -> ModelError {
    ModelError::Candle(candle_core::Error::Cuda(Box::new(std::io::Error::other(
        format!("DriverError({code}, \"injected\")"),
    ))))
}

/// Fails with a sticky CUDA error on cost 77, with out of memory on any
/// batch of more than `fits` inputs; counts its builds.
struct Gpu {
    fits: usize,
}

impl EmbeddingModel for Gpu {
    fn embed_stepped(
        &self,
        batch: &[&Prepared],
        _: Between<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.iter().any(|p| p.cost == 77) {
            return Err(cuda_error("CUDA_ERROR_ILLEGAL_ADDRESS"));
        }
        if batch.len() > self.fits {
            return Err(cuda_error("CUDA_ERROR_OUT_OF_MEMORY"));
        }
        Ok(batch
            .iter()
            .map(|p| vec![p.cost as f32, batch.len() as f32])
            .collect())
    }
}

/// A worker of [`Gpu`] replicas whose builds after the first wait for
/// `gate` (when given) and fail from build number `fail_from` on.
fn gpu_worker(
    fits: usize,
    fail_from: usize,
    gate: Option<Arc<AtomicBool>>,
) -> (Arc<Queue>, WorkerHandle, Metrics, Arc<AtomicUsize>) {
    let metrics = Metrics::new();
    let queue = Queue::new("gpu", limits(), metrics.clone());
    let builds = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&builds);
    let factory: ReplicaFactory = Box::new(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        if n > 0 {
            if let Some(g) = &gate {
                while !g.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if n >= fail_from {
            return Err(cuda_error("CUDA_ERROR_UNKNOWN"));
        }
        Ok(Box::new(Gpu { fits }) as Box<dyn EmbeddingModel>)
    });
    let w = spawn(
        Arc::clone(&queue),
        DeviceSpec::Cuda(0),
        0,
        factory,
        metrics.clone(),
        fast(),
    )
    .unwrap();
    (queue, w, metrics, builds)
}

#[test]
fn a_sticky_device_error_loses_the_replica_instead_of_splitting_the_batch() {
    let gate = Arc::new(AtomicBool::new(false));
    let (queue, worker, metrics, builds) = gpu_worker(8, usize::MAX, Some(Arc::clone(&gate)));
    let out = run(&queue, &[1, 77, 3]);
    // Every input of the batch gets the loss (no halves retried on the
    // poisoned context, so no BatchFailed), naming the cause.
    for r in &out {
        assert!(
            matches!(r, Err(ItemError::WorkerDied(m)) if m.contains("sticky") && m.contains("CUDA_ERROR_ILLEGAL_ADDRESS")),
            "{r:?}"
        );
    }
    // While the replica is rebuilt the model has no live worker: /ready
    // answers 503 and new requests are refused.
    assert_eq!(queue.live_workers(), 0);
    assert!(matches!(queue.admit(1), Err(AdmitError::NoWorker { .. })));
    assert!(metrics
        .render()
        .contains("vlembed_model_ready{model=\"gpu\"} 0"));
    gate.store(true, Ordering::SeqCst);
    wait_for("the rebuild", || queue.live_workers() == 1);
    assert_eq!(
        builds.load(Ordering::SeqCst),
        2,
        "a fresh replica was built"
    );
    assert_eq!(run(&queue, &[4])[0].as_ref().unwrap()[0], 4.0);
    assert!(metrics
        .render()
        .contains("vlembed_worker_restarts_total{model=\"gpu\"} 1"));
    queue.close();
    assert!(worker.join_timeout(Duration::from_secs(5)));
}

#[test]
fn out_of_memory_splits_the_batch_and_keeps_the_replica() {
    let (queue, worker, metrics, builds) = gpu_worker(1, usize::MAX, None);
    let out = run(&queue, &[1, 2, 3, 4]);
    for (i, r) in out.iter().enumerate() {
        // Served alone (batch length 1) after the halves ran out of memory.
        assert_eq!(r.as_ref().unwrap(), &vec![(i + 1) as f32, 1.0]);
    }
    assert_eq!(builds.load(Ordering::SeqCst), 1, "no rebuild");
    assert!(worker.is_alive());
    assert!(!metrics
        .render()
        .contains("vlembed_worker_restarts_total{model=\"gpu\"} 1"));
    queue.close();
    assert!(worker.join_timeout(Duration::from_secs(5)));
}

#[test]
fn when_no_fresh_context_can_be_made_the_worker_gives_up() {
    // The first replica hits a sticky error; every rebuild fails.
    let (queue, worker, _metrics, builds) = gpu_worker(8, 1, None);
    let out = run(&queue, &[77]);
    assert!(matches!(&out[0], Err(ItemError::WorkerDied(_))));
    assert!(worker.join_timeout(Duration::from_secs(5)));
    // Given up: the registry's /health reads this (503).
    assert!(worker.gave_up());
    assert!(queue.all_given_up());
    assert_eq!(builds.load(Ordering::SeqCst), 1 + fast().limit as usize);
}

//! The per-model bounded queue between request handlers and device workers.
//!
//! Owns admission (the bound, counted in inputs from admission until a worker
//! takes them, so a full queue refuses new requests instead of growing),
//! the waiting items, dropping items whose client went away or whose deadline
//! passed, and handing batches to workers (blocking OS threads). It never
//! runs a model and knows nothing of HTTP.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::policy::{self, BatchBudget};
use crate::config::BatchLimits;
use crate::metrics::Metrics;
use crate::preprocess::Prepared;

/// How many queued items the scheduler examines per batch.
const LOOKAHEAD: usize = 4096;

/// Why an item got no embedding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The model failed on the batch holding this item.
    #[error("the batch failed: {0}")]
    BatchFailed(String),
    /// The worker running the batch died, or no worker is left.
    #[error("the model worker died: {0}")]
    WorkerDied(String),
    /// The item's deadline passed before it was batched.
    #[error("the deadline passed while the input was queued")]
    Expired,
    /// The server is shutting down and the item was not run.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What a worker answers for one item: its unnormalised embedding.
pub type ItemResult = Result<Vec<f32>, ItemError>;

/// One input waiting for a batch.
#[derive(Debug)]
pub struct Item {
    pub prepared: Prepared,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<ItemResult>,
    /// The request it belongs to (id and timings), when the caller traces.
    pub trace: Option<Arc<super::RequestTrace>>,
}

impl Item {
    /// A new item and the receiver of its result.
    pub fn new(prepared: Prepared, deadline: Instant) -> (Self, oneshot::Receiver<ItemResult>) {
        let (reply, rx) = oneshot::channel();
        (
            Item {
                prepared,
                enqueued: Instant::now(),
                deadline,
                reply,
                trace: None,
            },
            rx,
        )
    }

    /// Whether nobody waits for the result any more.
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    /// Sends the result; a client that went away meanwhile is not an error.
    pub fn answer(self, result: ItemResult) {
        let _ = self.reply.send(result);
    }
}

/// Why a request could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("the queue of model {model} is full ({admitted} of {capacity} inputs admitted, {requested} more asked)")]
    Full {
        model: String,
        admitted: usize,
        requested: usize,
        capacity: usize,
    },
    #[error("model {model} has no live worker")]
    NoWorker { model: String },
    #[error("the server is shutting down")]
    Closed,
}

struct State {
    items: VecDeque<Item>,
    /// Inputs admitted and not yet taken by a worker (reserved + queued).
    admitted: usize,
    live_workers: usize,
    closed: bool,
}

/// A bounded, cost-aware queue shared by one model's workers.
pub struct Queue {
    model: String,
    limits: BatchLimits,
    state: Mutex<State>,
    wake: Condvar,
    metrics: Metrics,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("model", &self.model)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub fn new(model: &str, limits: BatchLimits, metrics: Metrics) -> Arc<Self> {
        metrics.queue_depth.with_label_values(&[model]).set(0);
        Arc::new(Queue {
            model: model.to_string(),
            limits,
            state: Mutex::new(State {
                items: VecDeque::new(),
                admitted: 0,
                live_workers: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            metrics,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent
        // (every update is a single assignment), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_depth(&self, st: &State) {
        let depth = i64::try_from(st.items.len()).unwrap_or(i64::MAX);
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model])
            .set(depth);
    }

    /// Reserves room for `n` inputs, or refuses at once when the queue is full.
    pub fn admit(self: &Arc<Self>, n: usize) -> Result<Admission, AdmitError> {
        let mut st = self.lock();
        if st.closed {
            return Err(AdmitError::Closed);
        }
        if st.live_workers == 0 {
            return Err(AdmitError::NoWorker {
                model: self.model.clone(),
            });
        }
        if st.admitted.saturating_add(n) > self.limits.max_queue_inputs {
            return Err(AdmitError::Full {
                model: self.model.clone(),
                admitted: st.admitted,
                requested: n,
                capacity: self.limits.max_queue_inputs,
            });
        }
        st.admitted += n;
        Ok(Admission {
            queue: Arc::clone(self),
            reserved: n,
        })
    }

    /// Inputs admitted and not yet taken by a worker.
    pub fn admitted(&self) -> usize {
        self.lock().admitted
    }

    /// Inputs waiting for a batch.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }

    pub fn live_workers(&self) -> usize {
        self.lock().live_workers
    }

    /// A worker started serving this queue.
    pub fn worker_started(&self) {
        let mut st = self.lock();
        st.live_workers += 1;
        self.metrics
            .model_ready
            .with_label_values(&[&self.model])
            .set(1);
    }

    /// A worker stopped. When none is left, every waiting item is answered
    /// with `reason` and the model is no longer ready.
    pub fn worker_stopped(&self, reason: &str) {
        let orphans = {
            let mut st = self.lock();
            st.live_workers = st.live_workers.saturating_sub(1);
            if st.live_workers > 0 {
                return;
            }
            self.metrics
                .model_ready
                .with_label_values(&[&self.model])
                .set(0);
            let orphans: Vec<Item> = st.items.drain(..).collect();
            st.admitted = st.admitted.saturating_sub(orphans.len());
            self.set_depth(&st);
            orphans
        };
        for item in orphans {
            item.answer(Err(ItemError::WorkerDied(reason.to_string())));
        }
    }

    /// Stops admitting; workers drain what is queued, then get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    fn push(&self, items: Vec<Item>) -> Result<(), (AdmitError, Vec<Item>)> {
        let mut st = self.lock();
        if st.closed {
            return Err((AdmitError::Closed, items));
        }
        if st.live_workers == 0 {
            let e = AdmitError::NoWorker {
                model: self.model.clone(),
            };
            return Err((e, items));
        }
        st.items.extend(items);
        self.set_depth(&st);
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut st = self.lock();
        st.admitted = st.admitted.saturating_sub(n);
    }

    /// Removes items nobody waits for and items past their deadline.
    fn purge(&self, st: &mut State, now: Instant) {
        if !st.items.iter().any(|i| i.abandoned() || i.deadline <= now) {
            return;
        }
        let before = st.items.len();
        let mut kept = VecDeque::with_capacity(before);
        for item in st.items.drain(..) {
            if item.abandoned() {
                continue;
            }
            if item.deadline <= now {
                item.answer(Err(ItemError::Expired));
                continue;
            }
            kept.push_back(item);
        }
        let dropped = before - kept.len();
        st.items = kept;
        st.admitted = st.admitted.saturating_sub(dropped);
        tracing::debug!(model = %self.model, dropped, "dropped cancelled or expired inputs");
        self.set_depth(st);
    }

    /// Blocks until a batch is due and returns it; `None` once the queue is
    /// closed and empty. For worker threads only (never call it from async
    /// code).
    pub fn next_batch(&self) -> Option<Vec<Item>> {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            self.purge(&mut st, now);
            if st.items.is_empty() {
                if st.closed {
                    return None;
                }
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let due_at = st.items.front().map(|i| i.enqueued + self.limits.max_delay);
            let total_cost: usize = st.items.iter().map(|i| i.prepared.cost).sum();
            let full = st.items.len() >= self.limits.max_batch_size
                || total_cost >= self.limits.max_batch_cost;
            match due_at {
                Some(due) if !st.closed && !full && now < due => {
                    let wait = due
                        .saturating_duration_since(now)
                        .max(Duration::from_micros(50));
                    st = self
                        .wake
                        .wait_timeout(st, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                _ => return Some(self.take(&mut st)),
            }
        }
    }

    fn take(&self, st: &mut State) -> Vec<Item> {
        let costs: Vec<usize> = st
            .items
            .iter()
            .take(LOOKAHEAD)
            .map(|i| i.prepared.cost)
            .collect();
        let picked = policy::select(
            &costs,
            BatchBudget {
                max_items: self.limits.max_batch_size,
                max_cost: self.limits.max_batch_cost,
            },
            LOOKAHEAD,
        );
        let mut batch = Vec::with_capacity(picked.len());
        // Remove from the back so earlier positions stay valid, then restore order.
        for &i in picked.iter().rev() {
            if let Some(item) = st.items.remove(i) {
                batch.push(item);
            }
        }
        batch.reverse();
        st.admitted = st.admitted.saturating_sub(batch.len());
        self.set_depth(st);
        let now = Instant::now();
        let hist = self
            .metrics
            .queue_duration
            .with_label_values(&[&self.model]);
        for item in &batch {
            hist.observe(now.saturating_duration_since(item.enqueued).as_secs_f64());
        }
        batch
    }
}

/// Room reserved in a queue for one request's inputs. Dropping it releases
/// what was not pushed.
#[derive(Debug)]
pub struct Admission {
    queue: Arc<Queue>,
    reserved: usize,
}

impl Admission {
    /// Queues `items` (at most the reserved number) in one go, so a request's
    /// inputs can share a batch.
    pub fn push(&mut self, items: Vec<Item>) -> Result<(), AdmitError> {
        let n = items.len().min(self.reserved);
        let mut items = items;
        items.truncate(n);
        match self.queue.push(items) {
            Ok(()) => {
                self.reserved -= n;
                Ok(())
            }
            Err((e, items)) => {
                for item in items {
                    item.answer(Err(ItemError::ShuttingDown));
                }
                Err(e)
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.queue.release(self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Modality;

    fn limits(size: usize, cost: usize, cap: usize, delay_ms: u64) -> BatchLimits {
        BatchLimits {
            max_batch_size: size,
            max_batch_cost: cost,
            max_queue_inputs: cap,
            max_delay: Duration::from_millis(delay_ms),
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

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn admission_is_bounded_and_released_on_drop() {
        let q = Queue::new("m", limits(4, 100, 5, 0), Metrics::new());
        assert!(matches!(q.admit(1), Err(AdmitError::NoWorker { .. })));
        q.worker_started();
        let a = q.admit(3).unwrap();
        let err = q.admit(3).unwrap_err();
        assert!(
            matches!(
                err,
                AdmitError::Full {
                    admitted: 3,
                    capacity: 5,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("full"));
        drop(a);
        assert_eq!(q.admitted(), 0);
        let _b = q.admit(5).unwrap();
    }

    #[test]
    fn batches_keep_order_and_release_capacity() {
        let q = Queue::new("m", limits(2, 100, 10, 0), Metrics::new());
        q.worker_started();
        let mut a = q.admit(3).unwrap();
        let mut rxs = Vec::new();
        let items = (1..=3)
            .map(|c| {
                let (item, rx) = Item::new(prepared(c), far());
                rxs.push(rx);
                item
            })
            .collect();
        a.push(items).unwrap();
        assert_eq!(q.depth(), 3);
        let b1 = q.next_batch().unwrap();
        assert_eq!(
            b1.iter().map(|i| i.prepared.cost).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(q.admitted(), 1);
        let b2 = q.next_batch().unwrap();
        assert_eq!(b2.len(), 1);
        drop(a);
        assert_eq!(q.admitted(), 0);
        q.close();
        assert!(q.next_batch().is_none());
    }

    #[test]
    fn cancelled_and_expired_items_are_dropped_before_batching() {
        let q = Queue::new("m", limits(8, 100, 10, 0), Metrics::new());
        q.worker_started();
        let mut a = q.admit(3).unwrap();
        let (gone, rx_gone) = Item::new(prepared(1), far());
        let (late, mut rx_late) = Item::new(prepared(2), Instant::now());
        let (ok, _rx_ok) = Item::new(prepared(3), far());
        a.push(vec![gone, late, ok]).unwrap();
        drop(rx_gone);
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].prepared.cost, 3);
        assert_eq!(rx_late.try_recv().unwrap(), Err(ItemError::Expired));
        assert_eq!(q.admitted(), 0);
    }

    #[test]
    fn max_delay_waits_for_more_items() {
        let q = Queue::new("m", limits(2, 100, 10, 200), Metrics::new());
        q.worker_started();
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || q2.next_batch().map(|b| b.len()));
        let mut a = q.admit(2).unwrap();
        let (i1, _r1) = Item::new(prepared(1), far());
        a.push(vec![i1]).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let (i2, _r2) = Item::new(prepared(1), far());
        a.push(vec![i2]).unwrap();
        assert_eq!(t.join().unwrap(), Some(2));
    }

    #[test]
    fn last_worker_stopping_fails_waiting_items() {
        let metrics = Metrics::new();
        let q = Queue::new("m", limits(8, 100, 10, 0), metrics.clone());
        q.worker_started();
        assert!(metrics
            .render()
            .contains("vlembed_model_ready{model=\"m\"} 1"));
        let mut a = q.admit(1).unwrap();
        let (i, mut rx) = Item::new(prepared(1), far());
        a.push(vec![i]).unwrap();
        q.worker_stopped("boom");
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(ItemError::WorkerDied(_))
        ));
        assert!(metrics
            .render()
            .contains("vlembed_model_ready{model=\"m\"} 0"));
        assert!(matches!(q.admit(1), Err(AdmitError::NoWorker { .. })));
    }
}

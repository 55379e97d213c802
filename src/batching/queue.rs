//! The per-model bounded queue between request handlers and device workers.
//!
//! Owns admission (the bound, counted in inputs from admission until a worker
//! takes them, so a full queue refuses new requests instead of growing), the
//! waiting inputs grouped by request, fair batch formation (round-robin over
//! requests, see [`super::policy`]), dropping inputs whose client went away
//! or whose deadline passed, and handing batches to workers (blocking OS
//! threads). A request's capacity and queued inputs are released the moment
//! its [`Admission`] is dropped (the request finished, was cancelled or timed
//! out), not when a worker next looks. It never runs a model and knows
//! nothing of HTTP.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::policy::{self, BatchBudget};
use crate::config::BatchLimits;
use crate::metrics::Metrics;
use crate::preprocess::Prepared;

/// Why an item got no embedding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The model failed on this input (alone, after the batch was split).
    #[error("the model failed on this input: {0}")]
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

/// A request's scheduling class. Batches serve requests of a higher class
/// first, then round-robin within a class. Every request is `Normal` today;
/// a priority lane (e.g. short text queries) is one more variant, ordered
/// before `Normal`, plus the rule that admits into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    #[default]
    Normal,
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

/// One request's queued inputs, in order.
#[derive(Debug)]
struct Group {
    id: u64,
    class: Class,
    items: VecDeque<Item>,
}

struct State {
    /// Requests with queued inputs, in scheduling order: the next batch
    /// serves the first first; requests a batch served move to the back.
    groups: VecDeque<Group>,
    /// Inputs in `groups`.
    queued: usize,
    /// Inputs admitted and not yet taken by a worker (reserved + queued).
    admitted: usize,
    live_workers: usize,
    /// Workers rebuilding their replica after a panic.
    recovering: usize,
    closed: bool,
    next_id: u64,
}

impl State {
    fn oldest(&self) -> Option<Instant> {
        self.groups
            .iter()
            .filter_map(|g| g.items.front().map(|i| i.enqueued))
            .min()
    }

    fn total_cost(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.items.iter())
            .map(|i| i.prepared.cost)
            .sum()
    }

    /// Removes every queued input of request `id`; returns how many.
    fn remove_group(&mut self, id: u64) -> usize {
        let Some(pos) = self.groups.iter().position(|g| g.id == id) else {
            return 0;
        };
        let n = self.groups.remove(pos).map_or(0, |g| g.items.len());
        self.queued -= n;
        n
    }
}

/// A bounded, fair, cost-aware queue shared by one model's workers.
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
                groups: VecDeque::new(),
                queued: 0,
                admitted: 0,
                live_workers: 0,
                recovering: 0,
                closed: false,
                next_id: 0,
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
        // (no model code runs under it), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_depth(&self, st: &State) {
        let depth = i64::try_from(st.queued).unwrap_or(i64::MAX);
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model])
            .set(depth);
    }

    /// Reserves room for `n` inputs of a `Normal` request, or refuses at once
    /// when the queue is full.
    pub fn admit(self: &Arc<Self>, n: usize) -> Result<Admission, AdmitError> {
        self.admit_class(n, Class::Normal)
    }

    /// Reserves room for `n` inputs of a request of `class`.
    pub fn admit_class(self: &Arc<Self>, n: usize, class: Class) -> Result<Admission, AdmitError> {
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
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1);
        Ok(Admission {
            queue: Arc::clone(self),
            reserved: n,
            id,
            class,
        })
    }

    /// Inputs admitted and not yet taken by a worker.
    pub fn admitted(&self) -> usize {
        self.lock().admitted
    }

    /// Inputs waiting for a batch.
    pub fn depth(&self) -> usize {
        self.lock().queued
    }

    pub fn live_workers(&self) -> usize {
        self.lock().live_workers
    }

    /// Whether the queue was closed (shutdown).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
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

    /// A worker stopped for good. When none is left (live or rebuilding),
    /// every waiting item is answered with `reason`; with no live worker the
    /// model is no longer ready.
    pub fn worker_stopped(&self, reason: &str) {
        let mut st = self.lock();
        st.live_workers = st.live_workers.saturating_sub(1);
        self.after_loss(st, reason);
    }

    /// A worker lost its replica and is rebuilding it: waiting items stay
    /// queued (their deadlines still apply), new requests are refused while
    /// no worker is live.
    pub fn worker_lost(&self) {
        let mut st = self.lock();
        st.live_workers = st.live_workers.saturating_sub(1);
        st.recovering += 1;
        if st.live_workers == 0 {
            self.metrics
                .model_ready
                .with_label_values(&[&self.model])
                .set(0);
        }
    }

    /// A rebuilding worker is live again.
    pub fn worker_recovered(&self) {
        let mut st = self.lock();
        st.recovering = st.recovering.saturating_sub(1);
        st.live_workers += 1;
        self.metrics
            .model_ready
            .with_label_values(&[&self.model])
            .set(1);
    }

    /// A rebuilding worker gave up (or stopped at shutdown).
    pub fn recovery_failed(&self, reason: &str) {
        let mut st = self.lock();
        st.recovering = st.recovering.saturating_sub(1);
        self.after_loss(st, reason);
    }

    fn after_loss(&self, mut st: MutexGuard<'_, State>, reason: &str) {
        if st.live_workers > 0 {
            return;
        }
        self.metrics
            .model_ready
            .with_label_values(&[&self.model])
            .set(0);
        if st.recovering > 0 {
            return;
        }
        let orphans: Vec<Item> = st.groups.drain(..).flat_map(|g| g.items).collect();
        st.admitted = st.admitted.saturating_sub(orphans.len());
        st.queued = 0;
        self.set_depth(&st);
        drop(st);
        for item in orphans {
            item.answer(Err(ItemError::WorkerDied(reason.to_string())));
        }
    }

    /// Stops admitting; workers drain what is queued, then get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    fn push(&self, id: u64, class: Class, items: Vec<Item>) -> Result<(), (AdmitError, Vec<Item>)> {
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
        st.queued += items.len();
        match st.groups.iter_mut().find(|g| g.id == id) {
            Some(g) => g.items.extend(items),
            None => st.groups.push_back(Group {
                id,
                class,
                items: items.into(),
            }),
        }
        self.set_depth(&st);
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    /// A request went away (answered, cancelled or timed out): its reserved
    /// room and its inputs no worker has taken are released now.
    fn release(&self, id: u64, reserved: usize) {
        let mut st = self.lock();
        let removed = st.remove_group(id);
        st.admitted = st.admitted.saturating_sub(reserved + removed);
        if removed > 0 {
            tracing::debug!(model = %self.model, removed, "released the queued inputs of a finished request");
            self.set_depth(&st);
        }
    }

    /// Removes items nobody waits for and items past their deadline.
    fn purge(&self, st: &mut State, now: Instant) {
        let stale = |i: &Item| i.abandoned() || i.deadline <= now;
        if !st.groups.iter().any(|g| g.items.iter().any(stale)) {
            return;
        }
        let mut dropped = 0;
        for g in st.groups.iter_mut() {
            let before = g.items.len();
            let mut kept = VecDeque::with_capacity(before);
            for item in g.items.drain(..) {
                if item.abandoned() {
                    continue;
                }
                if item.deadline <= now {
                    item.answer(Err(ItemError::Expired));
                    continue;
                }
                kept.push_back(item);
            }
            dropped += before - kept.len();
            g.items = kept;
        }
        st.groups.retain(|g| !g.items.is_empty());
        st.queued -= dropped;
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
            let Some(oldest) = st.oldest() else {
                if st.closed {
                    return None;
                }
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let due = oldest + self.limits.max_delay;
            let waits = !st.closed
                && now < due
                && st.queued < self.limits.max_batch_size
                && st.total_cost() < self.limits.max_batch_cost;
            if waits {
                let wait = due
                    .saturating_duration_since(now)
                    .max(Duration::from_micros(50));
                st = self
                    .wake
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
                continue;
            }
            return Some(self.take(&mut st));
        }
    }

    fn take(&self, st: &mut State) -> Vec<Item> {
        // Higher classes first, then the queue's round-robin order.
        let mut order: Vec<usize> = (0..st.groups.len()).collect();
        order.sort_by_key(|&g| std::cmp::Reverse(st.groups[g].class));
        let max_items = self.limits.max_batch_size.max(1);
        let costs: Vec<Vec<usize>> = order
            .iter()
            .map(|&g| {
                st.groups[g]
                    .items
                    .iter()
                    .take(max_items)
                    .map(|i| i.prepared.cost)
                    .collect()
            })
            .collect();
        let refs: Vec<&[usize]> = costs.iter().map(Vec::as_slice).collect();
        let counts = policy::select(
            &refs,
            BatchBudget {
                max_items,
                max_cost: self.limits.max_batch_cost,
            },
        );
        let mut taken = vec![0usize; st.groups.len()];
        for (&g, &n) in order.iter().zip(&counts) {
            taken[g] = n;
        }
        let mut batch = Vec::with_capacity(counts.iter().sum());
        let mut served = Vec::new();
        let mut waiting = VecDeque::with_capacity(st.groups.len());
        for (mut g, n) in std::mem::take(&mut st.groups).into_iter().zip(taken) {
            batch.extend(g.items.drain(..n.min(g.items.len())));
            if n == 0 {
                waiting.push_back(g);
            } else if !g.items.is_empty() {
                served.push(g);
            }
        }
        // Round-robin: requests served by this batch go behind the others.
        waiting.extend(served);
        st.groups = waiting;
        st.queued -= batch.len();
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

/// Room reserved in a queue for one request's inputs. Keep it until the
/// request is answered: dropping it releases the room not yet used and
/// withdraws the request's inputs no worker has taken.
#[derive(Debug)]
pub struct Admission {
    queue: Arc<Queue>,
    reserved: usize,
    id: u64,
    class: Class,
}

impl Admission {
    /// Queues `items` (at most the reserved number).
    pub fn push(&mut self, items: Vec<Item>) -> Result<(), AdmitError> {
        let n = items.len().min(self.reserved);
        let mut items = items;
        items.truncate(n);
        match self.queue.push(self.id, self.class, items) {
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
        self.queue.release(self.id, self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::test_support::prepared;

    fn limits(size: usize, cost: usize, cap: usize, delay_ms: u64) -> BatchLimits {
        BatchLimits {
            max_batch_size: size,
            max_batch_cost: cost,
            max_queue_inputs: cap,
            max_delay: Duration::from_millis(delay_ms),
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

    fn push_request(
        q: &Arc<Queue>,
        costs: &[usize],
    ) -> (Admission, Vec<oneshot::Receiver<ItemResult>>) {
        let mut a = q.admit(costs.len()).unwrap();
        let mut rxs = Vec::new();
        let items = costs
            .iter()
            .map(|&c| {
                let (item, rx) = Item::new(prepared(c), far());
                rxs.push(rx);
                item
            })
            .collect();
        a.push(items).unwrap();
        (a, rxs)
    }

    #[test]
    fn a_small_request_behind_a_large_one_is_in_the_next_batch() {
        let q = Queue::new("m", limits(4, 10_000, 300, 0), Metrics::new());
        q.worker_started();
        let (_big, _rb) = push_request(&q, &[100; 256]);
        let b1 = q.next_batch().unwrap();
        assert_eq!(b1.len(), 4);
        let (_small, _rs) = push_request(&q, &[7]);
        let b2 = q.next_batch().unwrap();
        let costs: Vec<usize> = b2.iter().map(|i| i.prepared.cost).collect();
        assert!(costs.contains(&7), "{costs:?}");
        assert_eq!(costs.len(), 4);
    }

    #[test]
    fn requests_take_turns_across_batches() {
        // Eight requests of 4 inputs, batches of 2: every request is served
        // within 4 batches (round-robin), not after those ahead of it drain.
        let q = Queue::new("m", limits(2, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        let reqs: Vec<_> = (1..=8).map(|c| push_request(&q, &[c; 4])).collect();
        let mut first_batch = [usize::MAX; 9];
        for n in 0..16 {
            for item in q.next_batch().unwrap() {
                let c = item.prepared.cost;
                first_batch[c] = first_batch[c].min(n);
            }
        }
        for (c, &n) in first_batch.iter().enumerate().skip(1) {
            assert!(n < 4, "request {c} first served in batch {n}");
        }
        drop(reqs);
    }

    #[test]
    fn dropping_an_admission_releases_its_queued_inputs_at_once() {
        let q = Queue::new("m", limits(4, 10_000, 10, 0), Metrics::new());
        q.worker_started();
        let (a, _rxs) = push_request(&q, &[1; 6]);
        assert_eq!(q.admitted(), 6);
        assert_eq!(q.depth(), 6);
        // The request is cancelled while no worker looks at the queue.
        drop(a);
        assert_eq!(q.admitted(), 0);
        assert_eq!(q.depth(), 0);
        let _full = q.admit(10).unwrap();
    }
}

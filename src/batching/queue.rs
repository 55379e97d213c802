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
//!
//! Priority: each request has a [`Class`]. A batch is formed from the
//! requests of the highest class that has queued inputs only (a `High` text
//! is never batched with `Normal` images, whose forward pass it would wait
//! for), except that a request passed over by [`PRIORITY_BURST`] batches in a
//! row leads the next batch whatever its class (the starvation bound).
//! Between the layers of a long batch, workers take `High` work with
//! [`Queue::try_take_priority`] (see [`crate::worker`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Its request's scheduling class (set when it is queued).
    pub class: Class,
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
                class: Class::Normal,
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

/// What a worker's previous batch lets it expect: the clients it just
/// answered tend to send their next inputs within milliseconds (a closed
/// loop: an indexer, a load balancer's keep-alive connections), so a worker
/// that took what is queued at once would alternate a full batch with a
/// nearly empty one (32 single-text clients: batches of 31 and 1, 20% below
/// the model's throughput at 32). With a `Refill` the worker waits, until
/// `until`, for the queue to hold as many inputs (or as much cost) of the
/// batch's class as the batch had; it takes what is there when the time is
/// up, when a higher class arrives, or when a request is owed a batch by the
/// starvation bound. An idle server never waits: the first input after a
/// pause finds `until` passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    /// The class of the batch that just ran.
    pub class: Class,
    /// Its inputs and their cost.
    pub inputs: usize,
    pub cost: usize,
    /// The latest moment to wait to.
    pub until: Instant,
}

impl Refill {
    /// After a batch of `inputs` inputs (of total `cost`, highest class
    /// `class`) ran for `took` and ended at `ended`: wait at most a quarter
    /// of `took` (so waiting adds at most a quarter to the latency of work
    /// like that which just ran), capped by `max_wait`. `None` when that is
    /// zero.
    pub fn after(
        class: Class,
        inputs: usize,
        cost: usize,
        took: Duration,
        ended: Instant,
        max_wait: Duration,
    ) -> Option<Refill> {
        let wait = (took / 4).min(max_wait);
        (!wait.is_zero()).then_some(Refill {
            class,
            inputs,
            cost,
            until: ended + wait,
        })
    }
}

/// A request's scheduling class (ordered: `Low < Normal < High`). A batch
/// holds the requests of the highest class with queued inputs, round-robin
/// within the class; `High` work also runs between the layers of a batch in
/// progress. The starvation bound: a request passed over by
/// [`PRIORITY_BURST`] batches in a row leads the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Served when nothing of a higher class waits (or when starved).
    Low,
    #[default]
    Normal,
    /// Served first, and between the layers of a long batch in progress.
    High,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Low => "low",
            Class::Normal => "normal",
            Class::High => "high",
        }
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Ok(Class::High),
            "normal" => Ok(Class::Normal),
            "low" => Ok(Class::Low),
            other => Err(format!(
                "unknown priority {other:?}: expected \"high\", \"normal\" or \"low\""
            )),
        }
    }
}

/// The starvation bound: a request that this many batches in a row passed
/// over (because requests of a higher class were served) leads the next
/// batch. Workers also run at most this many `High` batches between two
/// layers of a batch in progress, so bulk work always advances.
pub const PRIORITY_BURST: u32 = 4;

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
    /// Batches taken in a row that served none of its inputs.
    passed_over: u32,
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
    /// `High` inputs queued: read without the lock by workers between layers.
    high_queued: AtomicUsize,
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
            high_queued: AtomicUsize::new(0),
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
        let high = st
            .groups
            .iter()
            .filter(|g| g.class == Class::High)
            .map(|g| g.items.len())
            .sum();
        self.high_queued.store(high, Ordering::Release);
        let depth = i64::try_from(st.queued).unwrap_or(i64::MAX);
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model])
            .set(depth);
    }

    /// The admission bound of `class`: `max_queue_inputs`, and for `High`
    /// one batch more (`max_batch_size`), so that a queue filled with bulk
    /// work to its bound still admits queries; bulk work is refused until
    /// the queue is below `max_queue_inputs` again.
    pub fn capacity(&self, class: Class) -> usize {
        let base = self.limits.max_queue_inputs;
        match class {
            Class::High => base.saturating_add(self.limits.max_batch_size),
            Class::Normal | Class::Low => base,
        }
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
        let capacity = self.capacity(class);
        if st.admitted.saturating_add(n) > capacity {
            return Err(AdmitError::Full {
                model: self.model.clone(),
                admitted: st.admitted,
                requested: n,
                capacity,
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

    /// `vlembed_model_ready` of this model.
    fn set_ready(&self, ready: bool) {
        self.metrics
            .model_ready
            .with_label_values(&[&self.model])
            .set(i64::from(ready));
    }

    /// A worker started serving this queue.
    pub fn worker_started(&self) {
        let mut st = self.lock();
        st.live_workers += 1;
        self.set_ready(true);
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
            self.set_ready(false);
        }
    }

    /// A rebuilding worker is live again.
    pub fn worker_recovered(&self) {
        let mut st = self.lock();
        st.recovering = st.recovering.saturating_sub(1);
        st.live_workers += 1;
        self.set_ready(true);
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
        self.set_ready(false);
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
        let items = items.into_iter().map(|mut i| {
            i.class = class;
            i
        });
        match st.groups.iter_mut().find(|g| g.id == id) {
            Some(g) => g.items.extend(items),
            None => st.groups.push_back(Group {
                id,
                class,
                items: items.collect(),
                passed_over: 0,
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
        self.next_batch_after(None)
    }

    /// [`Self::next_batch`] for a worker that just ran a batch: with
    /// `refill`, it may wait (until `refill.until`) for the queue to hold
    /// as much work of that batch's class as the batch had, before it takes
    /// a smaller one (see [`Refill`]).
    pub fn next_batch_after(&self, refill: Option<Refill>) -> Option<Vec<Item>> {
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
            let delaying = !st.closed
                && now < due
                && st.queued < self.limits.max_batch_size
                && st.total_cost() < self.limits.max_batch_cost;
            let refilling = refill
                .filter(|r| !st.closed && now < r.until && self.short_of(&st, r))
                .map(|r| r.until);
            let wake_at = match (delaying.then_some(due), refilling) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(wake_at) = wake_at {
                let wait = wake_at
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

    /// Whether the queue holds less work of `r.class` than the batch `r`
    /// describes (in inputs and in cost, within the batch budget), that
    /// class being the one the next batch would serve and no request being
    /// owed a batch by the starvation bound.
    fn short_of(&self, st: &State, r: &Refill) -> bool {
        let offered = offered(st);
        let waits_for =
            |g: usize| st.groups[g].class == r.class && st.groups[g].passed_over < PRIORITY_BURST;
        if offered.is_empty() || !offered.iter().all(|&g| waits_for(g)) {
            return false;
        }
        let (inputs, cost) = offered
            .iter()
            .flat_map(|&g| st.groups[g].items.iter())
            .fold((0usize, 0usize), |(n, c), i| (n + 1, c + i.prepared.cost));
        inputs < r.inputs.min(self.limits.max_batch_size)
            && cost < r.cost.min(self.limits.max_batch_cost)
    }

    /// Whether `High` inputs wait (no lock: cheap enough to ask between
    /// every two layers of a forward pass).
    pub fn has_priority_work(&self) -> bool {
        self.high_queued.load(Ordering::Acquire) > 0
    }

    /// A batch of `High` inputs only, at once (no `max_delay` wait), or
    /// `None` when none waits. Workers call it between the layers of a
    /// batch in progress; other requests' turns are not affected.
    pub fn try_take_priority(&self) -> Option<Vec<Item>> {
        if !self.has_priority_work() {
            return None;
        }
        let mut st = self.lock();
        self.purge(&mut st, Instant::now());
        let order: Vec<usize> = (0..st.groups.len())
            .filter(|&g| st.groups[g].class == Class::High)
            .collect();
        if order.is_empty() {
            return None;
        }
        Some(self.take_from(&mut st, &order, false))
    }

    fn take(&self, st: &mut State) -> Vec<Item> {
        let order = offered(st);
        self.take_from(st, &order, true)
    }

    /// Takes a batch from the groups in `order` (indices into `st.groups`,
    /// the one to serve first first); the others are not offered. With
    /// `count`, groups the batch did not serve are counted as passed over.
    fn take_from(&self, st: &mut State, order: &[usize], count: bool) -> Vec<Item> {
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
                if count {
                    g.passed_over = g.passed_over.saturating_add(1);
                }
                waiting.push_back(g);
            } else if !g.items.is_empty() {
                g.passed_over = 0;
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

/// The groups the next batch offers a place to, in order ([`policy::order`]
/// over the queued requests' classes and turns passed over).
fn offered(st: &State) -> Vec<usize> {
    policy::order(
        &st.groups
            .iter()
            .map(|g| (g.class, g.passed_over))
            .collect::<Vec<_>>(),
        PRIORITY_BURST,
    )
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
    /// Sets the class the request's inputs are queued with (before the
    /// first [`Self::push`]; later pushes of the same request keep the
    /// class it was queued with).
    pub fn set_class(&mut self, class: Class) {
        self.class = class;
    }

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
            refill_wait: Duration::ZERO,
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

    fn push_class(
        q: &Arc<Queue>,
        costs: &[usize],
        class: Class,
    ) -> (Admission, Vec<oneshot::Receiver<ItemResult>>) {
        let mut a = q.admit(costs.len()).unwrap();
        a.set_class(class);
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

    fn costs(batch: &[Item]) -> Vec<usize> {
        batch.iter().map(|i| i.prepared.cost).collect()
    }

    #[test]
    fn high_requests_are_batched_first_and_alone() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        let _low = push_class(&q, &[1; 4], Class::Low);
        let _bulk = push_class(&q, &[100; 8], Class::Normal);
        let _query = push_class(&q, &[7], Class::High);
        assert!(q.has_priority_work());
        let b = q.next_batch().unwrap();
        assert_eq!(costs(&b), vec![7]);
        assert_eq!(b[0].class, Class::High);
        assert!(!q.has_priority_work());
        assert_eq!(costs(&q.next_batch().unwrap()), vec![100; 8]);
        assert_eq!(costs(&q.next_batch().unwrap()), vec![1; 4]);
    }

    fn refill(class: Class, inputs: usize, cost: usize, wait: Duration) -> Option<Refill> {
        Some(Refill {
            class,
            inputs,
            cost,
            until: Instant::now() + wait,
        })
    }

    #[test]
    fn refill_waits_for_as_much_work_as_the_last_batch() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        let _first = push_class(&q, &[5], Class::High);
        let q2 = Arc::clone(&q);
        // The last batch had 3 High inputs: wait (up to 30 s) for 3.
        let worker = std::thread::spawn(move || {
            costs(
                &q2.next_batch_after(refill(Class::High, 3, 15, Duration::from_secs(30)))
                    .unwrap(),
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !worker.is_finished(),
            "took 1 input instead of waiting for 3"
        );
        let _second = push_class(&q, &[5], Class::High);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !worker.is_finished(),
            "took 2 inputs instead of waiting for 3"
        );
        let _third = push_class(&q, &[5], Class::High);
        assert_eq!(worker.join().unwrap(), vec![5, 5, 5]);
    }

    #[test]
    fn refill_stops_at_the_cost_of_the_last_batch() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        // Fewer inputs than the last batch, but as much cost: no wait.
        let _long = push_class(&q, &[40, 40], Class::Normal);
        let b = q.next_batch_after(refill(Class::Normal, 8, 80, Duration::from_secs(30)));
        assert_eq!(costs(&b.unwrap()), vec![40, 40]);
    }

    #[test]
    fn refill_wait_ends_at_its_deadline() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        let _one = push_class(&q, &[5], Class::Normal);
        let t = Instant::now();
        let b = q.next_batch_after(refill(Class::Normal, 8, 40, Duration::from_millis(40)));
        assert_eq!(costs(&b.unwrap()), vec![5]);
        assert!(
            t.elapsed() >= Duration::from_millis(35),
            "{:?}",
            t.elapsed()
        );
        // A deadline already passed (an idle pause since the batch): at once.
        let _two = push_class(&q, &[6], Class::Normal);
        let passed = Some(Refill {
            class: Class::Normal,
            inputs: 8,
            cost: 40,
            until: Instant::now() - Duration::from_millis(1),
        });
        assert_eq!(costs(&q.next_batch_after(passed).unwrap()), vec![6]);
    }

    #[test]
    fn refill_does_not_hold_back_a_higher_class_or_a_starved_request() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        // After a batch of 4 images, a query arrives: it is not held back
        // waiting for the images to come back.
        let _query = push_class(&q, &[7], Class::High);
        let t = Instant::now();
        let b = q.next_batch_after(refill(Class::Normal, 4, 400, Duration::from_secs(30)));
        assert_eq!(costs(&b.unwrap()), vec![7]);
        assert!(t.elapsed() < Duration::from_secs(10));
        // A request owed a batch by the starvation bound is not held back.
        let _bulk = push_class(&q, &[100], Class::Normal);
        for _ in 0..PRIORITY_BURST {
            let _q = push_class(&q, &[7], Class::High);
            assert_eq!(costs(&q.next_batch().unwrap()), vec![7]);
        }
        let _q = push_class(&q, &[8], Class::High);
        let b = q.next_batch_after(refill(Class::High, 4, 40, Duration::from_secs(30)));
        assert_eq!(costs(&b.unwrap()), vec![100]);
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn refill_after_waits_a_quarter_of_the_batch_at_most_the_cap() {
        let end = Instant::now();
        let cap = Duration::from_millis(10);
        let r = Refill::after(Class::High, 31, 310, Duration::from_millis(56), end, cap).unwrap();
        assert_eq!((r.class, r.inputs, r.cost), (Class::High, 31, 310));
        assert_eq!(r.until, end + cap);
        let r = Refill::after(Class::High, 1, 10, Duration::from_millis(8), end, cap).unwrap();
        assert_eq!(r.until, end + Duration::from_millis(2));
        assert_eq!(
            Refill::after(
                Class::High,
                1,
                10,
                Duration::from_millis(8),
                end,
                Duration::ZERO
            ),
            None
        );
    }

    #[test]
    fn a_queue_full_of_bulk_work_still_admits_queries() {
        let q = Queue::new("m", limits(4, 10_000, 10, 0), Metrics::new());
        q.worker_started();
        let _bulk = q.admit_class(10, Class::Normal).unwrap();
        assert!(matches!(
            q.admit_class(1, Class::Normal),
            Err(AdmitError::Full { capacity: 10, .. })
        ));
        assert!(matches!(
            q.admit_class(1, Class::Low),
            Err(AdmitError::Full { .. })
        ));
        // High has one batch (max_batch_size 4) beyond the bound.
        let _q1 = q.admit_class(3, Class::High).unwrap();
        let _q2 = q.admit_class(1, Class::High).unwrap();
        let err = q.admit_class(1, Class::High).unwrap_err();
        assert!(
            matches!(
                err,
                AdmitError::Full {
                    admitted: 14,
                    capacity: 14,
                    ..
                }
            ),
            "{err:?}"
        );
        drop(_bulk);
        // Queries took 4: bulk fits under the bound again.
        assert!(q.admit_class(6, Class::Normal).is_ok());
        assert_eq!(q.capacity(Class::High), 14);
    }

    #[test]
    fn try_take_priority_takes_high_inputs_only() {
        let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
        q.worker_started();
        let _bulk = push_class(&q, &[100; 8], Class::Normal);
        assert!(q.try_take_priority().is_none());
        let _a = push_class(&q, &[7], Class::High);
        let _b = push_class(&q, &[9, 9], Class::High);
        assert_eq!(costs(&q.try_take_priority().unwrap()), vec![7, 9, 9]);
        assert!(q.try_take_priority().is_none());
        assert_eq!(q.depth(), 8);
        assert_eq!(q.admitted(), 8);
    }

    #[test]
    fn bulk_work_is_served_at_least_once_every_burst_plus_one_batches() {
        // A new high request before every batch: the bulk request still
        // gets a batch at least every PRIORITY_BURST + 1 batches.
        let q = Queue::new("m", limits(4, 10_000, 1000, 0), Metrics::new());
        q.worker_started();
        let _bulk = push_class(&q, &[100; 40], Class::Normal);
        let mut keep = Vec::new();
        let mut since_bulk = 0;
        let mut bulk_batches = 0;
        for _ in 0..30 {
            keep.push(push_class(&q, &[7], Class::High));
            let b = q.next_batch().unwrap();
            if costs(&b).contains(&100) {
                bulk_batches += 1;
                since_bulk = 0;
            } else {
                since_bulk += 1;
                assert!(since_bulk <= PRIORITY_BURST, "bulk starved");
            }
        }
        assert_eq!(bulk_batches, 30 / (PRIORITY_BURST as usize + 1));
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

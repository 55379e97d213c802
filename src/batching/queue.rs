//! The per-model bounded queue between request handlers and device workers.
//!
//! Owns admission (the bound, counted in inputs from admission until a worker
//! takes them, so a full queue refuses new requests instead of growing), the
//! waiting inputs grouped by request, fair batch formation (round-robin over
//! requests, see [`super::schedule`]), dropping inputs whose client went away
//! or whose deadline passed, and handing batches to workers (blocking OS
//! threads). A request's capacity and queued inputs are released the moment
//! its [`Admission`] is dropped (the request finished, was cancelled or timed
//! out), not when a worker next looks. It never runs a model and knows
//! nothing of HTTP.
//!
//! Scheduling: the rules live in [`super::schedule`] (classes, order,
//! selection, the starvation bound, the refill wait, preemption); the queue
//! holds the state they read and applies them. A batch is formed from the
//! requests of the highest class that has queued inputs only (a `High` text
//! is never batched with `Normal` images, whose forward pass it would wait
//! for), except that a request passed over by [`PRIORITY_BURST`] batches in a
//! row leads the next batch whatever its class (the starvation bound).
//! Between the layers of a long batch, workers run `High` batches through
//! [`Queue::between_layers`] (see [`crate::worker`]).
//!
//! Worker liveness: every worker of the model is registered here
//! ([`Queue::register_worker`]) and reports its transitions (started, lost,
//! recovered, stopped, given up); admission, readiness (`/ready`, `/info`,
//! the `vlembed_model_ready` gauge) and `/health` all read these states,
//! the one record of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::schedule::{self, BatchBudget, Class, Ran, Refill, PRIORITY_BURST};
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

/// A worker of one model, as the queue knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId(usize);

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Building its first replica.
    Starting,
    /// Serving batches.
    Live,
    /// Rebuilding its replica after a panic.
    Rebuilding,
    /// Its rebuilds kept failing: it was given up for good.
    GivenUp,
    /// Its thread ended (shutdown, or its first replica failed).
    Stopped,
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
    /// Every worker of the model, by [`WorkerId`].
    workers: Vec<WorkerState>,
    closed: bool,
    next_id: u64,
}

impl State {
    fn count(&self, state: WorkerState) -> usize {
        self.workers.iter().filter(|w| **w == state).count()
    }

    fn live(&self) -> usize {
        self.count(WorkerState::Live)
    }

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
                workers: Vec::new(),
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
        if st.live() == 0 {
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

    /// Workers serving batches now.
    pub fn live_workers(&self) -> usize {
        self.lock().live()
    }

    /// Whether the model has workers and every one was given up (its
    /// rebuilds kept failing): only a restart of the process can bring the
    /// model back.
    pub fn all_given_up(&self) -> bool {
        let st = self.lock();
        !st.workers.is_empty() && st.count(WorkerState::GivenUp) == st.workers.len()
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

    /// A new worker of this model, starting (not live yet).
    pub fn register_worker(&self) -> WorkerId {
        let mut st = self.lock();
        st.workers.push(WorkerState::Starting);
        WorkerId(st.workers.len() - 1)
    }

    /// The state of worker `id`.
    pub fn worker_state(&self, id: WorkerId) -> WorkerState {
        self.lock()
            .workers
            .get(id.0)
            .copied()
            .unwrap_or(WorkerState::Stopped)
    }

    fn set_worker(st: &mut State, id: WorkerId, state: WorkerState) {
        if let Some(w) = st.workers.get_mut(id.0) {
            *w = state;
        }
    }

    /// Worker `id` serves this queue.
    pub fn worker_started(&self, id: WorkerId) {
        let mut st = self.lock();
        Self::set_worker(&mut st, id, WorkerState::Live);
        self.set_ready(true);
    }

    /// Worker `id` stopped (or gave up, `given_up`). When no worker is left
    /// live or rebuilding, every waiting item is answered with `reason`;
    /// with no live worker the model is no longer ready.
    pub fn worker_stopped(&self, id: WorkerId, reason: &str, given_up: bool) {
        let mut st = self.lock();
        let state = if given_up {
            WorkerState::GivenUp
        } else {
            WorkerState::Stopped
        };
        Self::set_worker(&mut st, id, state);
        self.after_loss(st, reason);
    }

    /// Worker `id` lost its replica and is rebuilding it: waiting items stay
    /// queued (their deadlines still apply), new requests are refused while
    /// no worker is live.
    pub fn worker_lost(&self, id: WorkerId) {
        let mut st = self.lock();
        Self::set_worker(&mut st, id, WorkerState::Rebuilding);
        if st.live() == 0 {
            self.set_ready(false);
        }
    }

    fn after_loss(&self, mut st: MutexGuard<'_, State>, reason: &str) {
        if st.live() > 0 {
            return;
        }
        self.set_ready(false);
        if st.count(WorkerState::Rebuilding) > 0 || st.count(WorkerState::Starting) > 0 {
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
        if st.live() == 0 {
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
        self.next_batch_refilling(None)
    }

    /// [`Self::next_batch`] for a worker that just ran the batch `ran`: it
    /// may wait a little for the queue to hold as much work of that batch's
    /// class as the batch had, before it takes a smaller one (see
    /// [`Refill`]; at most `refill_wait_ms`).
    pub fn next_batch_after(&self, ran: &Ran) -> Option<Vec<Item>> {
        self.next_batch_refilling(Refill::after(ran, self.limits.refill_wait))
    }

    fn next_batch_refilling(&self, refill: Option<Refill>) -> Option<Vec<Item>> {
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
        r.short(inputs, cost, self.budget())
    }

    fn budget(&self) -> BatchBudget {
        BatchBudget {
            max_items: self.limits.max_batch_size.max(1),
            max_cost: self.limits.max_batch_cost,
        }
    }

    /// Whether `High` inputs wait (no lock: cheap enough to ask between
    /// every two layers of a forward pass).
    pub fn has_priority_work(&self) -> bool {
        self.high_queued.load(Ordering::Acquire) > 0
    }

    /// Between two layers of a batch in progress: hands `run` the `High`
    /// batches waiting, one after the other, at most [`PRIORITY_BURST`] (so
    /// the interrupted batch always advances), and stops at the first error
    /// `run` returns. Returns how many batches ran.
    pub fn between_layers<E>(
        &self,
        mut run: impl FnMut(Vec<Item>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut ran = 0;
        while ran < PRIORITY_BURST as usize {
            let Some(batch) = self.try_take_priority() else {
                break;
            };
            ran += 1;
            run(batch)?;
        }
        Ok(ran)
    }

    /// A batch of `High` inputs only, at once (no `max_delay` wait), or
    /// `None` when none waits; other requests' turns are not affected.
    fn try_take_priority(&self) -> Option<Vec<Item>> {
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
        let budget = self.budget();
        let max_items = budget.max_items;
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
        let counts = schedule::select(&refs, budget);
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

/// The groups the next batch offers a place to, in order ([`schedule::order`]
/// over the queued requests' classes and turns passed over).
fn offered(st: &State) -> Vec<usize> {
    schedule::order(
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
mod tests;

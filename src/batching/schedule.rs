//! The scheduling rules, in one place: the classes of requests ([`Class`],
//! and the class of a request that does not say, [`Class::auto`]), which
//! queued requests the next batch offers a place to ([`order`], with the
//! starvation bound [`PRIORITY_BURST`]), which of their inputs it takes
//! ([`select`]), how long a worker waits for work like the batch it just ran
//! ([`Refill`]), and which batches may be preempted between their layers
//! and by how much ([`preemptible`], [`PRIORITY_BURST`]).
//!
//! Pure functions and plain values, tested on their own: the queue
//! ([`super::queue`]) holds the state and applies them; the workers execute
//! what the queue hands them. It knows nothing of threads, channels or
//! models.
//!
//! The guarantee it gives (documented in the README): batches are filled
//! round-robin over the requests with queued inputs, one input per request
//! per round, the longest-waiting request first. The queue moves the
//! requests served by a batch behind those it could not serve, so a request
//! that arrives behind a large one gets an input into the next batch (or,
//! with more waiting requests than a batch holds, within a few batches),
//! whatever either's size.
//!
//! Which requests a batch may serve at all is [`order`]'s choice: those of
//! the highest class with queued inputs, unless a request was passed over by
//! `burst` batches in a row: then the starved requests lead, whatever their
//! class (so bulk work is served at least once every `burst + 1` batches
//! while priority work keeps arriving).

use std::time::{Duration, Instant};

use crate::input::{Input, Modality, Role};

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

/// A priority name that is not `high`, `normal` or `low`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?}: expected \"high\", \"normal\" or \"low\"")]
pub struct UnknownClass(pub String);

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Low => "low",
            Class::Normal => "normal",
            Class::High => "high",
        }
    }

    /// The class of a request that does not say: `High` for a single input
    /// that is a text alone or has the query role (a search query), else
    /// `Normal`.
    pub fn auto(inputs: &[Input]) -> Class {
        match inputs {
            [one] if one.role == Role::Query => Class::High,
            [one] if one.modality() == Modality::Text => Class::High,
            _ => Class::Normal,
        }
    }
}

impl std::str::FromStr for Class {
    type Err = UnknownClass;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Ok(Class::High),
            "normal" => Ok(Class::Normal),
            "low" => Ok(Class::Low),
            other => Err(UnknownClass(other.to_string())),
        }
    }
}

/// The starvation bound: a request that this many batches in a row passed
/// over (because requests of a higher class were served) leads the next
/// batch. Workers also run at most this many `High` batches between two
/// layers of a batch in progress, so bulk work always advances.
pub const PRIORITY_BURST: u32 = 4;

/// Whether a batch of inputs of these classes runs preemptibly: stepped,
/// with `High` batches run between its layers. A batch holding a `High`
/// input is not (it is the work that preempts).
pub fn preemptible(classes: impl IntoIterator<Item = Class>) -> bool {
    classes.into_iter().all(|c| c < Class::High)
}

/// What a worker reports of a batch it ran, for the [`Refill`] rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// The batch's highest class.
    pub class: Class,
    /// Its inputs and their cost.
    pub inputs: usize,
    pub cost: usize,
    /// How long its forward pass took, and when it ended.
    pub took: Duration,
    pub ended: Instant,
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
    /// After the batch `ran`: wait at most a quarter of its run time (so
    /// waiting adds at most a quarter to the latency of work like that which
    /// just ran), capped by `max_wait`. `None` when that is zero.
    pub fn after(ran: &Ran, max_wait: Duration) -> Option<Refill> {
        let wait = (ran.took / 4).min(max_wait);
        (!wait.is_zero()).then_some(Refill {
            class: ran.class,
            inputs: ran.inputs,
            cost: ran.cost,
            until: ran.ended + wait,
        })
    }

    /// Whether work of `class` queued as `inputs` inputs of total `cost`
    /// is less than this refill waits for (within one batch's `budget`).
    pub fn short(&self, inputs: usize, cost: usize, budget: BatchBudget) -> bool {
        inputs < self.inputs.min(budget.max_items) && cost < self.cost.min(budget.max_cost)
    }
}

/// Which requests the next batch offers a place to, in the order it offers
/// them, from each queued request's `(class, passed_over)` in queue order
/// (`passed_over`: batches in a row that served none of its inputs).
///
/// - No request was passed over `burst` times: the requests of the highest
///   class, in queue order; the others wait.
/// - Else the starved ones (passed over `burst` times or more) first, in
///   queue order, then the others whose class is not above the highest
///   starved class, higher classes first.
pub fn order<C: Ord + Copy>(groups: &[(C, u32)], burst: u32) -> Vec<usize> {
    let starved: Vec<usize> = (0..groups.len())
        .filter(|&g| groups[g].1 >= burst)
        .collect();
    let Some(cap) = starved.iter().map(|&g| groups[g].0).max() else {
        let Some(top) = groups.iter().map(|g| g.0).max() else {
            return Vec::new();
        };
        return (0..groups.len()).filter(|&g| groups[g].0 == top).collect();
    };
    let mut rest: Vec<usize> = (0..groups.len())
        .filter(|&g| groups[g].1 < burst && groups[g].0 <= cap)
        .collect();
    rest.sort_by_key(|&g| std::cmp::Reverse(groups[g].0));
    let mut out = starved;
    out.extend(rest);
    out
}

/// Limits one batch must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBudget {
    /// Most items in one batch (at least 1).
    pub max_items: usize,
    /// Most total cost in one batch (at least 1).
    pub max_cost: usize,
}

/// Picks the next batch from `requests`: for each request (in scheduling
/// order, the one to serve first at index 0) the costs of its queued inputs
/// in order. Returns how many inputs to take from the head of each request.
///
/// - The first request's first input is always taken, even when its cost
///   alone is over the budget: the queue always makes progress.
/// - Then rounds: each request in turn offers its next input, taken when it
///   fits both limits. A request whose next input does not fit the remaining
///   cost offers nothing more in this batch, but cheaper inputs of other
///   requests may still fill it (a text query is not held behind images).
pub fn select(requests: &[&[usize]], budget: BatchBudget) -> Vec<usize> {
    let max_items = budget.max_items.max(1);
    let mut counts = vec![0usize; requests.len()];
    let Some(&first) = requests.first().and_then(|r| r.first()) else {
        return counts;
    };
    counts[0] = 1;
    let mut total = first;
    let mut items = 1;
    for round in 0..max_items {
        let mut progressed = false;
        for (g, costs) in requests.iter().enumerate() {
            if items >= max_items || total >= budget.max_cost {
                return counts;
            }
            // A request that missed a round (out of inputs or over budget) is
            // done for this batch.
            if counts[g] != round {
                continue;
            }
            let Some(&cost) = costs.get(round) else {
                continue;
            };
            if total.saturating_add(cost) <= budget.max_cost {
                counts[g] += 1;
                total += cost;
                items += 1;
                progressed = true;
            }
        }
        // Round 0 cannot end the batch: the first request took its head
        // before it and offers its second input in round 1.
        if !progressed && round > 0 {
            break;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_items: usize, max_cost: usize) -> BatchBudget {
        BatchBudget {
            max_items,
            max_cost,
        }
    }

    #[test]
    fn the_highest_class_alone_is_offered() {
        // (class, passed_over) in queue order; classes: 0 low, 1 normal, 2 high.
        assert!(order::<u8>(&[], 4).is_empty());
        assert_eq!(order(&[(1u8, 0), (2, 0), (1, 0), (2, 0)], 4), vec![1, 3]);
        assert_eq!(order(&[(0u8, 3), (1, 0)], 4), vec![1]);
        assert_eq!(order(&[(0u8, 0), (0, 0)], 4), vec![0, 1]);
    }

    #[test]
    fn starved_requests_lead_whatever_their_class() {
        // The normal request at 2 was passed over 4 times: it leads, then
        // the other normal and low ones; the high ones wait this once.
        assert_eq!(order(&[(2u8, 0), (0, 1), (1, 4), (1, 0)], 4), vec![2, 3, 1]);
        // Two starved, in queue order, before the rest.
        assert_eq!(order(&[(0u8, 5), (2, 0), (1, 4)], 4), vec![0, 2]);
    }

    #[test]
    fn bulk_work_is_served_once_every_burst_plus_one_batches() {
        // A bulk request always queued, and a new priority request before
        // every batch: simulate the queue's counting over 50 batches.
        let burst = 4;
        let mut bulk_passed = 0u32;
        let mut bulk_served = Vec::new();
        for batch in 0..50 {
            let groups = [(1u8, bulk_passed), (2u8, 0)];
            let o = order(&groups, burst);
            if o.first() == Some(&0) {
                bulk_served.push(batch);
                bulk_passed = 0;
            } else {
                assert!(!o.contains(&0));
                bulk_passed += 1;
            }
        }
        for w in bulk_served.windows(2) {
            assert_eq!(w[1] - w[0], burst as usize + 1);
        }
        assert_eq!(bulk_served[0], burst as usize);
    }

    #[test]
    fn refill_after_waits_a_quarter_of_the_batch_at_most_the_cap() {
        let ended = Instant::now();
        let cap = Duration::from_millis(10);
        let ran = |inputs, cost, ms| Ran {
            class: Class::High,
            inputs,
            cost,
            took: Duration::from_millis(ms),
            ended,
        };
        let r = Refill::after(&ran(31, 310, 56), cap).unwrap();
        assert_eq!((r.class, r.inputs, r.cost), (Class::High, 31, 310));
        assert_eq!(r.until, ended + cap);
        let r = Refill::after(&ran(1, 10, 8), cap).unwrap();
        assert_eq!(r.until, ended + Duration::from_millis(2));
        assert_eq!(Refill::after(&ran(1, 10, 8), Duration::ZERO), None);
        // Short of the last batch while below it in inputs and in cost,
        // each capped by the batch budget.
        let r = Refill::after(&ran(8, 80, 40), cap).unwrap();
        assert!(r.short(7, 70, budget(32, 1000)));
        assert!(!r.short(8, 10, budget(32, 1000)));
        assert!(!r.short(1, 80, budget(32, 1000)));
        assert!(!r.short(4, 70, budget(4, 1000)));
    }

    #[test]
    fn classes_parse_order_and_decide_preemption() {
        assert!(Class::Low < Class::Normal && Class::Normal < Class::High);
        assert_eq!(" HIGH ".parse::<Class>(), Ok(Class::High));
        assert_eq!(
            "urgent".parse::<Class>().unwrap_err().to_string(),
            "unknown priority \"urgent\": expected \"high\", \"normal\" or \"low\""
        );
        assert!(preemptible([Class::Normal, Class::Low]));
        assert!(!preemptible([Class::Normal, Class::High]));
        assert_eq!(Class::auto(&[Input::text("q")]), Class::High);
        assert_eq!(
            Class::auto(&[Input::image(vec![1]).with_role(Role::Query)]),
            Class::High
        );
        assert_eq!(Class::auto(&[Input::image(vec![1])]), Class::Normal);
        assert_eq!(
            Class::auto(&[Input::text("a"), Input::text("b")]),
            Class::Normal
        );
    }

    #[test]
    fn empty_queue_gives_empty_batch() {
        assert!(select(&[], budget(4, 100)).is_empty());
        assert_eq!(select(&[&[]], budget(4, 100)), vec![0]);
    }

    #[test]
    fn one_request_takes_in_order_up_to_max_items() {
        assert_eq!(select(&[&[1; 10]], budget(4, 100)), vec![4]);
        assert_eq!(select(&[&[1; 3]], budget(4, 100)), vec![3]);
    }

    #[test]
    fn head_is_taken_even_over_budget() {
        assert_eq!(select(&[&[500, 1, 1]], budget(4, 100)), vec![1]);
        assert_eq!(select(&[&[500], &[1]], budget(4, 100)), vec![1, 0]);
    }

    #[test]
    fn requests_share_a_batch_round_robin() {
        // A large request and a small one behind it: the small one is in.
        let big = [224usize; 256];
        let small = [224usize];
        assert_eq!(select(&[&big, &small], budget(32, 1024)), vec![3, 1]);
        // Three requests, items interleaved one per round.
        assert_eq!(
            select(&[&[1; 10], &[1; 2], &[1; 10]], budget(8, 100)),
            vec![3, 2, 3]
        );
    }

    #[test]
    fn cheap_inputs_of_other_requests_fill_the_budget() {
        // 64 images (224 each) of one request, then a 7-token text query:
        // with a budget of 1024 the batch takes 4 images and the text.
        let images = [224usize; 64];
        assert_eq!(select(&[&images, &[7]], budget(32, 1024)), vec![4, 1]);
    }

    #[test]
    fn a_request_over_the_remaining_budget_stops_but_others_go_on() {
        assert_eq!(
            select(&[&[50, 60, 1], &[40, 5, 5]], budget(8, 100)),
            vec![1, 3]
        );
    }

    #[test]
    fn stops_at_exact_budget() {
        assert_eq!(select(&[&[50, 50, 1]], budget(8, 100)), vec![2]);
    }

    #[test]
    fn every_request_makes_progress_under_rotation() {
        // Drain a queue of requests batch by batch, moving served requests
        // behind unserved ones as the queue does: everything leaves, and no
        // request waits more than ceil(requests / max_items) batches.
        let mut queue: Vec<(usize, Vec<usize>, usize)> = (0..20)
            .map(|i| (i, vec![if i % 3 == 0 { 224 } else { 5 + i }; 1 + i % 7], 0))
            .collect();
        let mut rounds = 0;
        while !queue.is_empty() {
            let costs: Vec<&[usize]> = queue.iter().map(|(_, c, _)| c.as_slice()).collect();
            let counts = select(&costs, budget(8, 600));
            assert!(counts[0] >= 1);
            let (mut served, mut waiting) = (Vec::new(), Vec::new());
            for ((id, mut c, waited), n) in queue.into_iter().zip(counts) {
                c.drain(..n);
                if n > 0 {
                    if !c.is_empty() {
                        served.push((id, c, 0));
                    }
                } else {
                    assert!(waited < 10, "request {id} starved");
                    waiting.push((id, c, waited + 1));
                }
            }
            waiting.extend(served);
            queue = waiting;
            rounds += 1;
            assert!(rounds <= 200);
        }
    }
}

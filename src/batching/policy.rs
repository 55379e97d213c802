//! The scheduler policy: which queued inputs go into the next batch.
//!
//! A pure function over the queued requests' costs, so it is tested on its
//! own. It knows nothing of threads, channels or models.
//!
//! The guarantee it gives (documented in the README): batches are filled
//! round-robin over the requests with queued inputs, one input per request
//! per round, the longest-waiting request first. The queue moves the
//! requests served by a batch behind those it could not serve, so a request
//! that arrives behind a large one gets an input into the next batch (or,
//! with more waiting requests than a batch holds, within a few batches),
//! whatever either's size.

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

//! The scheduler policy: which queued items go into the next batch.
//!
//! A pure function over the queue's costs, so it is tested on its own. It
//! knows nothing of threads, channels or models.

/// Limits one batch must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBudget {
    /// Most items in one batch (at least 1).
    pub max_items: usize,
    /// Most total cost in one batch (at least 1).
    pub max_cost: usize,
}

/// Picks the items of the next batch from `costs` (the queued items' costs,
/// oldest first) and returns their positions in ascending order.
///
/// - The oldest item is always taken, even when its cost alone is over the
///   budget: the head of the queue always makes progress, so nothing starves.
/// - Then items are taken in queue order while they fit both limits. An item
///   that does not fit the remaining cost is skipped, and cheaper items behind
///   it may overtake it: a text query is not held behind a queue of images.
///   A skipped item stays in the queue and moves towards the head.
/// - At most `lookahead` items are examined, which bounds the work per batch.
pub fn select(costs: &[usize], budget: BatchBudget, lookahead: usize) -> Vec<usize> {
    let max_items = budget.max_items.max(1);
    let mut picked = Vec::with_capacity(max_items.min(costs.len()));
    let Some(&first) = costs.first() else {
        return picked;
    };
    picked.push(0);
    let mut total = first;
    for (i, &cost) in costs.iter().enumerate().take(lookahead.max(1)).skip(1) {
        if picked.len() >= max_items || total >= budget.max_cost {
            break;
        }
        if total.saturating_add(cost) <= budget.max_cost {
            picked.push(i);
            total += cost;
        }
    }
    picked
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
        assert!(select(&[], budget(4, 100), 100).is_empty());
    }

    #[test]
    fn takes_in_order_up_to_max_items() {
        assert_eq!(select(&[1; 10], budget(4, 100), 100), vec![0, 1, 2, 3]);
        assert_eq!(select(&[1; 3], budget(4, 100), 100), vec![0, 1, 2]);
    }

    #[test]
    fn head_is_taken_even_over_budget() {
        assert_eq!(select(&[500, 1, 1], budget(4, 100), 100), vec![0]);
    }

    #[test]
    fn cheap_items_overtake_when_the_budget_is_full() {
        // 64 images (224 each) queued, then one 7-token text: with a budget of
        // 1024 the batch takes 4 images (896) and the text rides along.
        let mut costs = vec![224; 64];
        costs.push(7);
        let batch = select(&costs, budget(32, 1024), 1000);
        assert_eq!(batch, vec![0, 1, 2, 3, 64]);
    }

    #[test]
    fn stops_at_exact_budget() {
        assert_eq!(select(&[50, 50, 1], budget(8, 100), 100), vec![0, 1]);
    }

    #[test]
    fn lookahead_bounds_the_scan() {
        let mut costs = vec![224; 10];
        costs.push(7);
        assert_eq!(select(&costs, budget(32, 500), 5), vec![0, 1]);
    }

    #[test]
    fn every_item_is_eventually_taken_in_fifo_progress() {
        // Simulate a queue drained batch by batch: all items leave, and the
        // head leaves in each round.
        let mut queue: Vec<(usize, usize)> = (0..50)
            .map(|i| (i, if i % 3 == 0 { 224 } else { 5 + i }))
            .collect();
        let mut rounds = 0;
        while !queue.is_empty() {
            let costs: Vec<usize> = queue.iter().map(|&(_, c)| c).collect();
            let head = queue[0].0;
            let batch = select(&costs, budget(8, 600), 64);
            assert!(batch.contains(&0));
            let taken: Vec<usize> = batch.iter().map(|&i| queue[i].0).collect();
            assert_eq!(taken[0], head);
            let mut i = 0;
            queue.retain(|_| {
                let keep = !batch.contains(&i);
                i += 1;
                keep
            });
            rounds += 1;
            assert!(rounds <= 50);
        }
    }
}

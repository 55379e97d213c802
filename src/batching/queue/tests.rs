//! Unit tests of `batching/queue.rs`.

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
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
    let w = q.register_worker();
    q.worker_started(w);
    assert!(metrics
        .render()
        .contains("vlembed_model_ready{model=\"m\"} 1"));
    let mut a = q.admit(1).unwrap();
    let (i, mut rx) = Item::new(prepared(1), far());
    a.push(vec![i]).unwrap();
    assert_eq!(q.worker_state(w), WorkerState::Live);
    q.worker_lost(w);
    assert_eq!(q.live_workers(), 0);
    assert!(rx.try_recv().is_err(), "kept while the worker rebuilds");
    q.worker_stopped(w, "boom", true);
    assert!(q.all_given_up());
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
    push_class(q, costs, Class::Normal)
}

#[test]
fn a_small_request_behind_a_large_one_is_in_the_next_batch() {
    let q = Queue::new("m", limits(4, 10_000, 300, 0), Metrics::new());
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
    let _first = push_class(&q, &[5], Class::High);
    let q2 = Arc::clone(&q);
    // The last batch had 3 High inputs: wait (up to 30 s) for 3.
    let worker = std::thread::spawn(move || {
        costs(
            &q2.next_batch_refilling(refill(Class::High, 3, 15, Duration::from_secs(30)))
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
    q.worker_started(q.register_worker());
    // Fewer inputs than the last batch, but as much cost: no wait.
    let _long = push_class(&q, &[40, 40], Class::Normal);
    let b = q.next_batch_refilling(refill(Class::Normal, 8, 80, Duration::from_secs(30)));
    assert_eq!(costs(&b.unwrap()), vec![40, 40]);
}

#[test]
fn refill_wait_ends_at_its_deadline() {
    let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
    q.worker_started(q.register_worker());
    let _one = push_class(&q, &[5], Class::Normal);
    let t = Instant::now();
    let b = q.next_batch_refilling(refill(Class::Normal, 8, 40, Duration::from_millis(40)));
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
    assert_eq!(costs(&q.next_batch_refilling(passed).unwrap()), vec![6]);
}

#[test]
fn refill_does_not_hold_back_a_higher_class_or_a_starved_request() {
    let q = Queue::new("m", limits(8, 10_000, 100, 0), Metrics::new());
    q.worker_started(q.register_worker());
    // After a batch of 4 images, a query arrives: it is not held back
    // waiting for the images to come back.
    let _query = push_class(&q, &[7], Class::High);
    let t = Instant::now();
    let b = q.next_batch_refilling(refill(Class::Normal, 4, 400, Duration::from_secs(30)));
    assert_eq!(costs(&b.unwrap()), vec![7]);
    assert!(t.elapsed() < Duration::from_secs(10));
    // A request owed a batch by the starvation bound is not held back.
    let _bulk = push_class(&q, &[100], Class::Normal);
    for _ in 0..PRIORITY_BURST {
        let _q = push_class(&q, &[7], Class::High);
        assert_eq!(costs(&q.next_batch().unwrap()), vec![7]);
    }
    let _q = push_class(&q, &[8], Class::High);
    let b = q.next_batch_refilling(refill(Class::High, 4, 40, Duration::from_secs(30)));
    assert_eq!(costs(&b.unwrap()), vec![100]);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_queue_full_of_bulk_work_still_admits_queries() {
    let q = Queue::new("m", limits(4, 10_000, 10, 0), Metrics::new());
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
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
fn between_layers_runs_at_most_a_burst_of_high_batches() {
    // Batches of one input: six high requests wait.
    let q = Queue::new("m", limits(1, 10_000, 100, 0), Metrics::new());
    q.worker_started(q.register_worker());
    let _bulk = push_class(&q, &[100; 4], Class::Normal);
    let _high: Vec<_> = (0..6).map(|_| push_class(&q, &[7], Class::High)).collect();
    let mut seen = Vec::new();
    let ran = q.between_layers(|b| {
        seen.extend(costs(&b));
        Ok::<_, ()>(())
    });
    assert_eq!(ran, Ok(PRIORITY_BURST as usize));
    assert_eq!(seen, vec![7; PRIORITY_BURST as usize]);
    // The first error stops the burst.
    let mut calls = 0;
    let failed = q.between_layers(|_| {
        calls += 1;
        Err("panicked")
    });
    assert_eq!((failed, calls), (Err("panicked"), 1));
    assert_eq!(q.between_layers(|_| Ok::<_, ()>(())), Ok(1));
    assert_eq!(
        q.between_layers(|_| Ok::<_, ()>(())),
        Ok(0),
        "no high work left"
    );
}

#[test]
fn bulk_work_is_served_at_least_once_every_burst_plus_one_batches() {
    // A new high request before every batch: the bulk request still
    // gets a batch at least every PRIORITY_BURST + 1 batches.
    let q = Queue::new("m", limits(4, 10_000, 1000, 0), Metrics::new());
    q.worker_started(q.register_worker());
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
    q.worker_started(q.register_worker());
    let (a, _rxs) = push_request(&q, &[1; 6]);
    assert_eq!(q.admitted(), 6);
    assert_eq!(q.depth(), 6);
    // The request is cancelled while no worker looks at the queue.
    drop(a);
    assert_eq!(q.admitted(), 0);
    assert_eq!(q.depth(), 0);
    let _full = q.admit(10).unwrap();
}

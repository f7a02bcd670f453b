//! Flow control: the requests fleetpick holds while their pool is saturated, and the order in
//! which it lets them go.
//!
//! One [`FlowQueue`] per pool. Requests wait in bands by priority (the InferenceObjective's;
//! higher first, strictly: a band is served only when every higher one is empty). Inside a band
//! each flow (the `x-gateway-inference-fairness-id`, or the objective) has its own FIFO, and the
//! band takes from its flows in turn, so one busy tenant cannot starve a quiet one. Bounds per
//! band, in requests and in body bytes: a request that does not fit is refused (429). Each
//! request has a time to live: past it, it leaves the queue and is answered 503. A client that
//! goes away drops its [`Ticket`], which takes it out of the queue at once.
//!
//! The queue decides order only. When to release is the dispatcher's call (the server's, one
//! task per pool): every few milliseconds while requests wait, it lets go as many as the pool's
//! free slots ([`crate::schedule::free_slots`], the saturation detector). A released request is
//! picked at once, and counts on its endpoint before the next round looks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The bounds of one queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueLimits {
    /// Requests per priority band.
    pub max_requests_per_band: usize,
    /// Request body bytes per priority band.
    pub max_bytes_per_band: usize,
    /// How long a request may wait.
    pub ttl: Duration,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Go on: pick an endpoint now.
    Released,
    /// Waited longer than its time to live.
    Expired,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the queue for priority {0} is full")]
    Full(i32),
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    bytes: usize,
    enqueued: Instant,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Debug, Default)]
struct Band {
    flows: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Flows with waiters, in the order they are served; the front is next.
    turn: VecDeque<Arc<str>>,
    len: usize,
    bytes: usize,
}

impl Band {
    fn remove(&mut self, flow: &Arc<str>, id: u64) -> Option<Waiter> {
        let q = self.flows.get_mut(flow)?;
        let pos = q.iter().position(|w| w.id == id)?;
        let w = q.remove(pos)?;
        if q.is_empty() {
            self.flows.remove(flow);
            self.turn.retain(|f| f != flow);
        }
        self.len -= 1;
        self.bytes -= w.bytes;
        Some(w)
    }

    /// The next waiter: the front of the flow whose turn it is; that flow goes to the back.
    fn pop(&mut self) -> Option<Waiter> {
        let flow = self.turn.pop_front()?;
        let q = self.flows.get_mut(&flow)?;
        let w = q.pop_front()?;
        if q.is_empty() {
            self.flows.remove(&flow);
        } else {
            self.turn.push_back(flow);
        }
        self.len -= 1;
        self.bytes -= w.bytes;
        Some(w)
    }
}

#[derive(Debug, Default)]
struct State {
    /// By priority; iterated from the highest.
    bands: BTreeMap<i32, Band>,
    next_id: u64,
}

/// One pool's queue.
#[derive(Debug)]
pub struct FlowQueue {
    /// Changed in place by a reload (the requests waiting stay, under the new bounds).
    limits: Mutex<QueueLimits>,
    state: Mutex<State>,
    /// Woken when a request joins (the dispatcher sleeps while the queue is empty).
    pub joined: tokio::sync::Notify,
    /// Released requests whose tickets are not dropped yet (they are being picked).
    in_transit: AtomicU32,
    /// Replaced by a reload: requests are released as they come (no dispatcher runs for it).
    closed: std::sync::atomic::AtomicBool,
}

/// A place in the queue. Await [`Ticket::wait`]; dropping the ticket leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<FlowQueue>,
    priority: i32,
    flow: Arc<str>,
    id: u64,
    rx: Option<oneshot::Receiver<Outcome>>,
    /// Released: counted in transit until the ticket drops (after the pick).
    released: bool,
    pub enqueued: Instant,
}

impl Ticket {
    /// Waits until the dispatcher releases the request or its time to live runs out.
    pub async fn wait(&mut self) -> Outcome {
        let Some(rx) = self.rx.as_mut() else {
            return Outcome::Expired;
        };
        let deadline = self.enqueued + self.queue.limits().ttl;
        let outcome = match tokio::time::timeout_at(deadline, &mut *rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Expired,
            // The deadline passed; a release sent at the same moment still counts (its slot
            // was given to this request).
            Err(_) => {
                rx.close();
                rx.try_recv().unwrap_or(Outcome::Expired)
            }
        };
        self.rx = None;
        self.released = outcome == Outcome::Released;
        outcome
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A release may sit unread in the channel (the client left as it came). Closing first
        // settles a release racing with this drop: either it was sent (and is read here) or its
        // send fails and the dispatcher takes its own in-transit count back.
        let released = self.released
            || self.rx.as_mut().is_some_and(|rx| {
                rx.close();
                rx.try_recv() == Ok(Outcome::Released)
            });
        if released {
            self.queue.in_transit.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        // Released or swept waiters are out already; this removes one still there: its client
        // left, or its own deadline passed before a sweep.
        let mut s = self.queue.state.lock();
        let emptied = s.bands.get_mut(&self.priority).map(|band| {
            band.remove(&self.flow, self.id);
            band.len == 0
        });
        if emptied == Some(true) {
            s.bands.remove(&self.priority);
        }
    }
}

impl FlowQueue {
    pub fn new(limits: QueueLimits) -> Arc<FlowQueue> {
        Arc::new(FlowQueue {
            limits: Mutex::new(limits),
            state: Mutex::new(State::default()),
            joined: tokio::sync::Notify::new(),
            in_transit: AtomicU32::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The queue's bounds.
    pub fn limits(&self) -> QueueLimits {
        *self.limits.lock()
    }

    /// New bounds (a reload changed them): the size bounds apply to requests queued from now on;
    /// a waiting request leaves at the earlier of its old deadline and the new time to live.
    pub fn set_limits(&self, limits: QueueLimits) {
        *self.limits.lock() = limits;
    }

    /// Retires the queue (a reload replaced it, or switched flow control off): every request
    /// waiting, and any that a stream still on the old fleet queues later, is released to be
    /// picked now rather than failed, since no dispatcher runs for it any more.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        while self.release_next() {}
    }

    /// Queues a request of `bytes` at `priority` in `flow`.
    pub fn enqueue(
        self: &Arc<Self>,
        priority: i32,
        flow: &str,
        bytes: usize,
    ) -> Result<Ticket, QueueError> {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let flow: Arc<str> = Arc::from(flow);
        let limits = self.limits();
        let id = {
            let mut s = self.state.lock();
            s.next_id += 1;
            let id = s.next_id;
            let band = s.bands.entry(priority).or_default();
            if band.len >= limits.max_requests_per_band
                || band.bytes.saturating_add(bytes) > limits.max_bytes_per_band
            {
                if band.len == 0 {
                    s.bands.remove(&priority);
                }
                return Err(QueueError::Full(priority));
            }
            let q = band.flows.entry(flow.clone()).or_default();
            if q.is_empty() {
                band.turn.push_back(flow.clone());
            }
            q.push_back(Waiter {
                id,
                bytes,
                enqueued: now,
                tx,
            });
            band.len += 1;
            band.bytes += bytes;
            id
        };
        self.joined.notify_one();
        if self.closed.load(Ordering::Acquire) {
            self.close();
        }
        Ok(Ticket {
            queue: self.clone(),
            priority,
            flow,
            id,
            rx: Some(rx),
            released: false,
            enqueued: now,
        })
    }

    /// Releases the next request (highest band, the flow whose turn it is); false when none
    /// waits. Waiters whose client left are skipped.
    pub fn release_next(&self) -> bool {
        let mut s = self.state.lock();
        loop {
            let Some((&priority, band)) = s.bands.iter_mut().next_back() else {
                return false;
            };
            let next = band.pop();
            if band.len == 0 {
                s.bands.remove(&priority);
            }
            match next {
                Some(w) => {
                    // Counted before the send: the ticket may drop (and uncount) at once.
                    self.in_transit.fetch_add(1, Ordering::Relaxed);
                    if w.tx.send(Outcome::Released).is_ok() {
                        return true;
                    }
                    self.in_transit.fetch_sub(1, Ordering::Relaxed);
                }
                None => continue,
            }
        }
    }

    /// Takes out the requests waiting longer than the time to live (their tickets answer
    /// [`Outcome::Expired`]); returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut s = self.state.lock();
        let ttl = self.limits().ttl;
        let mut n = 0;
        for band in s.bands.values_mut() {
            let mut expired = Vec::new();
            for (flow, q) in &band.flows {
                for w in q {
                    if now.saturating_duration_since(w.enqueued) >= ttl {
                        expired.push((flow.clone(), w.id));
                    }
                }
            }
            for (flow, id) in expired {
                if let Some(w) = band.remove(&flow, id) {
                    let _ = w.tx.send(Outcome::Expired);
                    n += 1;
                }
            }
        }
        s.bands.retain(|_, b| b.len > 0);
        n
    }

    /// Requests waiting, per priority band (highest first).
    pub fn lengths(&self) -> Vec<(i32, usize)> {
        self.state
            .lock()
            .bands
            .iter()
            .rev()
            .map(|(p, b)| (*p, b.len))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.state.lock().bands.values().map(|b| b.len).sum()
    }

    /// Asked on every admission: empty bands are removed as they empty, so no band is summed.
    pub fn is_empty(&self) -> bool {
        self.state.lock().bands.is_empty()
    }

    /// Released requests not yet picked.
    pub fn in_transit(&self) -> u32 {
        self.in_transit.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max: usize, bytes: usize, ttl_ms: u64) -> Arc<FlowQueue> {
        FlowQueue::new(QueueLimits {
            max_requests_per_band: max,
            max_bytes_per_band: bytes,
            ttl: Duration::from_millis(ttl_ms),
        })
    }

    #[test]
    fn a_ticket_dropped_as_it_is_released_leaves_nothing_in_transit() {
        let q = queue(10, 1 << 20, 60_000);
        for _ in 0..5_000 {
            let t = q.enqueue(0, "f", 1).unwrap();
            let releaser = {
                let q = q.clone();
                std::thread::spawn(move || q.release_next())
            };
            drop(t);
            releaser.join().unwrap();
            assert_eq!(q.in_transit(), 0);
            assert!(q.is_empty());
        }
    }

    /// Releases everything and returns the order, by ticket label.
    async fn drain(q: &FlowQueue, mut tickets: Vec<(&'static str, Ticket)>) -> Vec<&'static str> {
        let mut order = Vec::new();
        while q.release_next() {
            for (label, t) in tickets.iter_mut() {
                if let Some(rx) = t.rx.as_mut()
                    && let Ok(o) = rx.try_recv()
                {
                    assert_eq!(o, Outcome::Released);
                    t.rx = None;
                    t.released = true;
                    order.push(*label);
                }
            }
        }
        tickets.retain(|(_, t)| t.rx.is_some());
        assert!(tickets.is_empty(), "some were never released");
        order
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_first_then_flows_in_turn_fifo_within_a_flow() {
        let q = queue(100, 1 << 20, 60_000);
        let mut t = Vec::new();
        for (label, prio, flow) in [
            ("a1", 0, "a"),
            ("a2", 0, "a"),
            ("a3", 0, "a"),
            ("b1", 0, "b"),
            ("low", -1, "a"),
            ("hi", 5, "z"),
            ("b2", 0, "b"),
        ] {
            t.push((label, q.enqueue(prio, flow, 10).unwrap()));
        }
        assert_eq!(q.lengths(), vec![(5, 1), (0, 5), (-1, 1)]);
        let order = drain(&q, t).await;
        assert_eq!(order, ["hi", "a1", "b1", "a2", "b2", "a3", "low"]);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn two_busy_flows_share_equally() {
        let q = queue(1000, 1 << 20, 60_000);
        let mut t = Vec::new();
        for _ in 0..300 {
            t.push(("heavy", q.enqueue(0, "heavy", 1).unwrap()));
        }
        for _ in 0..100 {
            t.push(("light", q.enqueue(0, "light", 1).unwrap()));
        }
        let order = drain(&q, t).await;
        let first: Vec<_> = order.iter().take(200).collect();
        let light = first.iter().filter(|l| ***l == "light").count();
        assert_eq!(light, 100, "the light flow gets every other release");
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_in_requests_and_bytes_per_band() {
        let q = queue(2, 100, 60_000);
        let _a = q.enqueue(0, "f", 40).unwrap();
        let _b = q.enqueue(0, "f", 40).unwrap();
        assert_eq!(q.enqueue(0, "f", 1).unwrap_err(), QueueError::Full(0));
        // Another band has its own bounds.
        let _c = q.enqueue(1, "f", 90).unwrap();
        assert_eq!(q.enqueue(1, "g", 20).unwrap_err(), QueueError::Full(1));
        assert_eq!(q.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_expire_after_their_time_to_live() {
        let q = queue(10, 1 << 20, 1_000);
        let mut old = q.enqueue(0, "f", 1).unwrap();
        tokio::time::advance(Duration::from_millis(600)).await;
        let mut young = q.enqueue(0, "f", 1).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(q.expire(Instant::now()), 1);
        assert_eq!(old.wait().await, Outcome::Expired);
        assert_eq!(q.len(), 1);
        // The waiter's own deadline ends its wait even if nobody sweeps.
        let waited = tokio::spawn(async move { (young.wait().await, young) });
        tokio::time::advance(Duration::from_millis(600)).await;
        let (outcome, young) = waited.await.unwrap();
        assert_eq!(outcome, Outcome::Expired);
        assert_eq!(q.len(), 1, "not swept yet");
        drop(young);
        assert!(q.is_empty(), "gone with its ticket");
    }

    #[tokio::test(start_paused = true)]
    async fn released_requests_count_in_transit_until_their_tickets_drop() {
        let q = queue(10, 1 << 20, 60_000);
        let mut a = q.enqueue(0, "f", 1).unwrap();
        let b = q.enqueue(0, "f", 1).unwrap();
        assert!(q.release_next() && q.release_next());
        assert_eq!(q.in_transit(), 2);
        assert_eq!(a.wait().await, Outcome::Released);
        drop(a);
        assert_eq!(q.in_transit(), 1);
        // Released but never read (its client left at that moment): still uncounted on drop.
        drop(b);
        assert_eq!(q.in_transit(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_takes_no_slot() {
        let q = queue(1, 1 << 20, 60_000);
        let gone = q.enqueue(0, "f", 1).unwrap();
        drop(gone);
        assert!(q.is_empty(), "left at once");
        let mut stays = q.enqueue(0, "f", 1).unwrap();
        // Released to the one still waiting, not to the one that left.
        assert!(q.release_next());
        assert_eq!(stays.wait().await, Outcome::Released);
        assert!(!q.release_next());
    }
}

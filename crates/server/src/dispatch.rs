//! Flow control's dispatchers: one task per pool with a queue, releasing waiting requests as
//! the pool's free slots (the saturation detector) allow. The queue itself, and the order it
//! releases in, is the core's ([`fleetpick_core::queue`]).

use std::sync::Arc;
use std::time::Duration;

use fleetpick_core::fleet::Fleet;
use fleetpick_core::queue::FlowQueue;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How often a dispatcher looks for free slots while requests wait.
const DISPATCH_EVERY: Duration = Duration::from_millis(5);

/// Starts one dispatcher per pool that has a queue; they stop when the set is dropped.
pub fn spawn_dispatchers(fleet: &Arc<Fleet>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for (p, pool) in fleet.pools.iter().enumerate() {
        if let Some(q) = &pool.queue {
            tasks.spawn(dispatch(fleet.clone(), p, q.clone()));
        }
    }
    tasks
}

async fn dispatch(fleet: Arc<Fleet>, pool: usize, queue: Arc<FlowQueue>) {
    loop {
        if queue.is_empty() {
            queue.joined.notified().await;
        }
        queue.expire(Instant::now());
        // Requests released but not picked yet do not show in the endpoints' counts: count them
        // here, or a busy runtime would see the same free slots again and release too many.
        let free =
            fleetpick_core::schedule::free_slots(&fleet, pool).saturating_sub(queue.in_transit());
        for _ in 0..free {
            if !queue.release_next() {
                break;
            }
        }
        tokio::time::sleep(DISPATCH_EVERY).await;
    }
}

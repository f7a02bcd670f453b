//! The metrics poller: one task per endpoint scrapes its `/metrics` page every
//! `poller.interval_ms` (with a `timeout_ms` bound), reads the engine profile's few series, and
//! replaces the endpoint's [`LoadCell`](fleetpick_core::fleet::LoadCell). A failed scrape (refused,
//! timed out, non-2xx, page without the series) makes the endpoint ineligible at once; it is
//! then polled with exponential backoff up to `backoff_max_ms`, and returns on its first good
//! scrape. Each scrape's time to response headers is the endpoint's measured round trip. One
//! more task moves each cluster's health on every interval (see
//! [`ClusterHealth`](fleetpick_core::fleet::ClusterHealth)). The request path never waits on any of this.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use fleetpick_core::fleet::{Endpoint, Fleet};
use fleetpick_core::profile;

/// Starts one polling task per endpoint; dropping the returned set stops them all.
pub fn spawn(fleet: &Arc<Fleet>) -> Result<JoinSet<()>, reqwest::Error> {
    let settings = &fleet.poller;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(settings.timeout_ms))
        .connect_timeout(Duration::from_millis(settings.timeout_ms))
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()?;
    let mut tasks = JoinSet::new();
    for ep in &fleet.endpoints {
        tasks.spawn(poll(fleet.clone(), ep.clone(), client.clone()));
    }
    tasks.spawn(watch_clusters(fleet.clone()));
    Ok(tasks)
}

async fn watch_clusters(fleet: Arc<Fleet>) {
    let mut tick = tokio::time::interval(Duration::from_millis(fleet.poller.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, health) in fleet.update_cluster_health() {
            tracing::info!(cluster = %fleet.clusters[i].name, health = health.as_str(), "cluster health changed");
        }
    }
}

async fn poll(fleet: Arc<Fleet>, ep: Arc<Endpoint>, client: reqwest::Client) {
    let interval = Duration::from_millis(fleet.poller.interval_ms);
    let backoff_max = Duration::from_millis(fleet.poller.backoff_max_ms).max(interval);
    // Spread the first scrapes over one interval so a large fleet does not scrape in lockstep.
    let jitter = fastrand::u64(..fleet.poller.interval_ms.max(1));
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    loop {
        let started = tokio::time::Instant::now();
        let wait = match scrape(&client, &ep).await {
            Ok((sample, rtt)) => {
                ep.observe_rtt(rtt);
                if let Some(c) = sample.cache {
                    fleet
                        .prefix
                        .set_capacity(ep.index, c.block_size, c.num_blocks);
                }
                ep.store_lora(sample.lora.as_ref());
                ep.load.store(&sample, fleet.clock.now_ms());
                interval
            }
            Err(why) => {
                let failures = ep.load.fail();
                if failures == 1 {
                    tracing::warn!(endpoint = %ep.addr, error = %why, "scrape failed; endpoint ineligible");
                } else {
                    tracing::debug!(endpoint = %ep.addr, failures, error = %why, "scrape failed again");
                }
                let factor = 1u32 << failures.min(16);
                interval.saturating_mul(factor).min(backoff_max)
            }
        };
        tokio::time::sleep_until(started + wait).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("status {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Profile(#[from] profile::ProfileError),
    #[error("the page is larger than {MAX_PAGE} bytes")]
    TooLarge,
}

/// The largest `/metrics` page read (a real vLLM page is about 40 KB).
const MAX_PAGE: usize = 8 * 1024 * 1024;

/// The endpoint's load, and the time to its response headers (its round trip, plus the time
/// the server takes to start answering).
async fn scrape(
    client: &reqwest::Client,
    ep: &Endpoint,
) -> Result<(profile::LoadSample, Duration), ScrapeError> {
    let sent = std::time::Instant::now();
    let resp = client.get(&ep.metrics_url).send().await?;
    let rtt = sent.elapsed();
    if !resp.status().is_success() {
        return Err(ScrapeError::Status(resp.status()));
    }
    // Read at most MAX_PAGE bytes: a real page is tens of KB, and a broken or hostile server
    // must not make the poller buffer without bound.
    let mut resp = resp;
    let mut page = Vec::with_capacity(64 * 1024);
    while let Some(chunk) = resp.chunk().await? {
        if page.len() + chunk.len() > MAX_PAGE {
            return Err(ScrapeError::TooLarge);
        }
        page.extend_from_slice(&chunk);
    }
    let page = String::from_utf8_lossy(&page);
    Ok((profile::parse(ep.engine, &page)?, rtt))
}

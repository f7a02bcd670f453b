//! The live model of the fleet: clusters, pools and endpoints (fixed when the fleet file is
//! loaded), and each endpoint's load as last scraped plus the requests this picker has in flight
//! there.
//!
//! The request path never waits on the poller: each endpoint's scraped load is one 64-bit word
//! (KV use, queue, batch) and one timestamp, replaced atomically by the poller, so a pick reads a
//! consistent per-endpoint snapshot with two atomic loads and no lock. In-flight counts are
//! atomics too, raised at pick and lowered by an [`InFlight`] guard whose drop is the only
//! release: exactly once, however the request ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::collect::profile::{EngineKind, LoadSample};
use crate::config::{FleetConfig, PollerSettings};

/// Milliseconds on a monotonic clock shared by the poller and the request path.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Never 0: 0 marks "no data" in a [`LoadCell`].
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// An endpoint's load, as one word: KV use in 1/10,000 (16 bits), waiting (24 bits), running
/// (24 bits); counts beyond 24 bits saturate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub kv_usage: f64,
    pub waiting: u32,
    pub running: u32,
}

const COUNT_MAX: u32 = (1 << 24) - 1;

impl Load {
    fn pack(&self) -> u64 {
        let kv = (self.kv_usage.clamp(0.0, 1.0) * 10_000.0).round() as u64;
        kv | (u64::from(self.waiting.min(COUNT_MAX)) << 16)
            | (u64::from(self.running.min(COUNT_MAX)) << 40)
    }

    fn unpack(w: u64) -> Load {
        Load {
            kv_usage: (w & 0xffff) as f64 / 10_000.0,
            waiting: ((w >> 16) & u64::from(COUNT_MAX)) as u32,
            running: ((w >> 40) & u64::from(COUNT_MAX)) as u32,
        }
    }
}

/// The last scrape of one endpoint.
#[derive(Debug, Default)]
pub struct LoadCell {
    word: AtomicU64,
    /// [`Clock::now_ms`] of the last good scrape; 0 after a failed one.
    scraped_at_ms: AtomicU64,
    /// Consecutive failed scrapes.
    failures: AtomicU32,
}

impl LoadCell {
    pub fn store(&self, sample: &LoadSample, now_ms: u64) {
        let load = Load {
            kv_usage: sample.kv_usage,
            waiting: sample.waiting,
            running: sample.running,
        };
        self.word.store(load.pack(), Ordering::Relaxed);
        self.scraped_at_ms.store(now_ms, Ordering::Release);
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Marks a failed scrape: the endpoint is ineligible until a good one. Returns the number of
    /// consecutive failures.
    pub fn fail(&self) -> u32 {
        self.scraped_at_ms.store(0, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The load if it is fresh at `now_ms`, else `None`.
    pub fn fresh(&self, now_ms: u64, stale_after_ms: u64) -> Option<Load> {
        let at = self.scraped_at_ms.load(Ordering::Acquire);
        if at == 0 || now_ms.saturating_sub(at) > stale_after_ms {
            return None;
        }
        Some(Load::unpack(self.word.load(Ordering::Relaxed)))
    }

    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// One model-server endpoint.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as text, made once: it is written into every destination header.
    pub addr_text: String,
    pub cluster: usize,
    pub pool: usize,
    pub engine: EngineKind,
    pub metrics_url: String,
    pub load: LoadCell,
    /// Requests this picker sent here that have not ended.
    pub in_flight: AtomicU32,
    /// Of those, the ones still waiting for their first token (queued or in prefill).
    pub awaiting_first_token: AtomicU32,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub region: String,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub endpoints: Vec<usize>,
}

/// The fleet: topology from the fleet file, live load per endpoint.
#[derive(Debug)]
pub struct Fleet {
    pub clusters: Vec<Cluster>,
    pub pools: Vec<Pool>,
    pub endpoints: Vec<Arc<Endpoint>>,
    model_pool: HashMap<String, usize>,
    pub clock: Clock,
    pub poller: PollerSettings,
}

impl Fleet {
    pub fn new(cfg: &FleetConfig) -> Fleet {
        let file = &cfg.file;
        let endpoints: Vec<Arc<Endpoint>> = cfg
            .endpoints
            .iter()
            .map(|e| {
                let pool = &file.pools[e.pool];
                Arc::new(Endpoint {
                    addr: e.addr,
                    addr_text: e.addr.to_string(),
                    cluster: e.cluster,
                    pool: e.pool,
                    engine: pool.engine,
                    metrics_url: format!("http://{}{}", e.addr, pool.metrics_path),
                    load: LoadCell::default(),
                    in_flight: AtomicU32::new(0),
                    awaiting_first_token: AtomicU32::new(0),
                })
            })
            .collect();
        let pools = file
            .pools
            .iter()
            .enumerate()
            .map(|(p, spec)| Pool {
                name: spec.name.clone(),
                endpoints: (0..endpoints.len())
                    .filter(|&i| endpoints[i].pool == p)
                    .collect(),
            })
            .collect();
        let mut model_pool = HashMap::new();
        for (p, spec) in file.pools.iter().enumerate() {
            for m in &spec.models {
                model_pool.insert(m.clone(), p);
            }
        }
        Fleet {
            clusters: file
                .clusters
                .iter()
                .map(|c| Cluster {
                    name: c.name.clone(),
                    region: c.region.clone(),
                })
                .collect(),
            pools,
            endpoints,
            model_pool,
            clock: Clock::new(),
            poller: file.poller.clone(),
        }
    }

    /// The pool serving `model`.
    pub fn pool_for(&self, model: &str) -> Option<usize> {
        self.model_pool.get(model).copied()
    }

    /// Endpoints with fresh load data now.
    pub fn eligible_count(&self) -> usize {
        let now = self.clock.now_ms();
        self.endpoints
            .iter()
            .filter(|e| e.load.fresh(now, self.poller.stale_after_ms).is_some())
            .count()
    }
}

/// One request in flight at an endpoint, counted as awaiting its first token until
/// [`InFlight::first_token`]; dropping it ends the request's accounting.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    awaiting: bool,
}

impl InFlight {
    pub fn new(endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint
            .awaiting_first_token
            .fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            awaiting: true,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The response's first token (its first body bytes) went by. Idempotent.
    pub fn first_token(&mut self) {
        if std::mem::take(&mut self.awaiting) {
            self.endpoint
                .awaiting_first_token
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.first_token();
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_word_round_trips_and_saturates() {
        let l = Load {
            kv_usage: 0.4567,
            waiting: 12,
            running: 300,
        };
        assert_eq!(Load::unpack(l.pack()), l);
        let big = Load {
            kv_usage: 1.7,
            waiting: u32::MAX,
            running: 1 << 30,
        };
        let back = Load::unpack(big.pack());
        assert_eq!(
            (back.kv_usage, back.waiting, back.running),
            (1.0, COUNT_MAX, COUNT_MAX)
        );
    }

    #[test]
    fn cell_freshness_and_failure() {
        let cell = LoadCell::default();
        assert!(cell.fresh(10, 500).is_none());
        let sample = LoadSample {
            waiting: 3,
            running: 5,
            kv_usage: 0.5,
            ..LoadSample::default()
        };
        cell.store(&sample, 100);
        assert_eq!(cell.fresh(600, 500).map(|l| l.waiting), Some(3));
        assert!(cell.fresh(601, 500).is_none());
        assert_eq!(cell.fail(), 1);
        assert!(cell.fresh(101, 500).is_none());
        assert_eq!(cell.fail(), 2);
        cell.store(&sample, 700);
        assert_eq!(cell.failures(), 0);
    }

    #[test]
    fn in_flight_guard_releases_once() {
        let cfg = crate::config::FleetConfig::parse(
            "clusters: [{name: a}]\npools: [{name: p, models: [m], target_port: 80, endpoints: {a: [127.0.0.1]}}]\n",
            "t",
        )
        .unwrap();
        let fleet = Fleet::new(&cfg);
        let ep = fleet.endpoints[0].clone();
        let mut g1 = InFlight::new(ep.clone());
        let g2 = InFlight::new(ep.clone());
        assert_eq!(ep.in_flight.load(Ordering::Relaxed), 2);
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 2);
        g1.first_token();
        g1.first_token();
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 1);
        drop(g1);
        drop(g2);
        assert_eq!(ep.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(ep.awaiting_first_token.load(Ordering::Relaxed), 0);
        assert_eq!(fleet.pool_for("m"), Some(0));
        assert_eq!(fleet.pools[0].endpoints, vec![0]);
    }
}

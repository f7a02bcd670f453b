//! Scheduling: which endpoint serves a request. Plain functions over the fleet's current view;
//! no I/O, no locks, nothing awaited.
//!
//! Filters first (the pool serving the model, the proxy's subset hint, fresh metrics), then
//! weighted scorers, each giving 0..1 where 1 is best:
//! - `kv_cache`: `1 - kv_usage` (free KV cache, as reported);
//! - `queue`: the waiting count, scaled between the candidates' minimum (1) and maximum (0);
//! - `in_flight`: this picker's own requests in flight there, scaled the same way. It moves the
//!   instant a request is picked, so a burst between two polls spreads instead of piling onto
//!   the endpoint that looked idlest at the last scrape;
//! - `prefill`: of those, the ones still waiting for their first token, scaled the same way. A
//!   request sent where others are in prefill shares their prefill steps and waits longer for
//!   its own first token; this is what round robin avoids by accident and a load score alone
//!   does not see (two requests a few milliseconds apart look alike to a 50 ms scrape).
//!
//! The highest weighted sum wins; endpoints within a hair of it tie and one is drawn at random,
//! so idle endpoints share the next requests instead of the first in list order taking them all.
//! Fallbacks are the next best, in order.

use std::net::SocketAddr;

use crate::config::Weights;
use crate::fleet::Fleet;

/// What the scheduler needs to know about a request.
#[derive(Debug, Default)]
pub struct PickRequest<'a> {
    /// The requested model; `None` for requests that name none (they may go to any pool).
    pub model: Option<&'a str>,
    /// The proxy's subset hint: only these endpoints may serve.
    pub subset: Option<&'a [SocketAddr]>,
}

/// The chosen endpoints, as indices into [`Fleet::endpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub primary: usize,
    pub fallbacks: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("the model `{0}` is not served here")]
    UnknownModel(String),
    #[error("no eligible endpoint: {0}")]
    NoEndpoint(&'static str),
}

/// One candidate's inputs, gathered in one pass.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    index: usize,
    kv: f64,
    waiting: u32,
    in_flight: u32,
    awaiting: u32,
    score: f64,
}

/// Scores differing by less than this are a tie.
const TIE: f64 = 1e-9;

/// Picks the endpoint for `req`, with up to `fallbacks` more in order of preference.
pub fn pick(
    fleet: &Fleet,
    req: &PickRequest<'_>,
    weights: &Weights,
    fallbacks: usize,
    rng: &mut fastrand::Rng,
) -> Result<Pick, PickError> {
    let members: Box<dyn Iterator<Item = usize>> = match req.model {
        Some(model) => {
            let pool = fleet
                .pool_for(model)
                .ok_or_else(|| PickError::UnknownModel(model.to_string()))?;
            Box::new(fleet.pools[pool].endpoints.iter().copied())
        }
        None => Box::new(0..fleet.endpoints.len()),
    };
    let now = fleet.clock.now_ms();
    let stale_after = fleet.poller.stale_after_ms;
    let mut in_subset = false;
    let mut cands: Vec<Candidate> = Vec::new();
    for index in members {
        let ep = &fleet.endpoints[index];
        if let Some(subset) = req.subset
            && !subset.contains(&ep.addr)
        {
            continue;
        }
        in_subset = true;
        let Some(load) = ep.load.fresh(now, stale_after) else {
            continue;
        };
        cands.push(Candidate {
            index,
            kv: load.kv_usage,
            waiting: load.waiting,
            in_flight: ep.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            awaiting: ep
                .awaiting_first_token
                .load(std::sync::atomic::Ordering::Relaxed),
            score: 0.0,
        });
    }
    if cands.is_empty() {
        return Err(PickError::NoEndpoint(if !in_subset {
            "none of the pool's endpoints is in the proxy's subset hint"
        } else {
            "every endpoint is down or its metrics are stale"
        }));
    }
    score(&mut cands, weights);
    let best = cands
        .iter()
        .map(|c| c.score)
        .fold(f64::NEG_INFINITY, f64::max);
    let tied = cands.iter().filter(|c| c.score >= best - TIE).count();
    // Draw the winner among the tied, then order the rest for fallbacks.
    let nth = rng.usize(..tied);
    let winner_pos = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.score >= best - TIE)
        .nth(nth)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let winner = cands.swap_remove(winner_pos);
    let mut fallback_list = Vec::new();
    if fallbacks > 0 && !cands.is_empty() {
        // Shuffle before the stable sort so that ties among fallbacks are random too.
        rng.shuffle(&mut cands);
        cands.sort_by(|a, b| b.score.total_cmp(&a.score));
        fallback_list = cands.iter().take(fallbacks).map(|c| c.index).collect();
    }
    Ok(Pick {
        primary: winner.index,
        fallbacks: fallback_list,
    })
}

fn score(cands: &mut [Candidate], w: &Weights) {
    let (qmin, qmax) = min_max(cands.iter().map(|c| c.waiting));
    let (fmin, fmax) = min_max(cands.iter().map(|c| c.in_flight));
    let (amin, amax) = min_max(cands.iter().map(|c| c.awaiting));
    let total = (w.kv_cache + w.queue + w.in_flight + w.prefill).max(f64::MIN_POSITIVE);
    for c in cands.iter_mut() {
        let kv = 1.0 - c.kv.clamp(0.0, 1.0);
        let queue = scaled(c.waiting, qmin, qmax);
        let flight = scaled(c.in_flight, fmin, fmax);
        let prefill = scaled(c.awaiting, amin, amax);
        let score =
            (w.kv_cache * kv + w.queue * queue + w.in_flight * flight + w.prefill * prefill)
                / total;
        // Validated weights keep this finite; if it is not, rank the endpoint last rather than
        // let a NaN break the comparison.
        c.score = if score.is_finite() { score } else { 0.0 };
    }
}

fn min_max(it: impl Iterator<Item = u32>) -> (u32, u32) {
    it.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// 1 at the minimum, 0 at the maximum; 1 for everyone when all are equal.
fn scaled(v: u32, min: u32, max: u32) -> f64 {
    if max <= min {
        1.0
    } else {
        f64::from(max - v) / f64::from(max - min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::profile::LoadSample;
    use crate::config::FleetConfig;
    use crate::fleet::InFlight;

    fn fleet(n: usize) -> Fleet {
        let ips: Vec<String> = (0..n).map(|i| format!("10.0.0.{}", i + 1)).collect();
        let text = format!(
            "clusters: [{{name: a}}]\npools:\n  - {{name: p, models: [m], target_port: 8000, endpoints: {{a: [{}]}}}}\n  - {{name: q, models: [other], target_port: 8000, endpoints: {{a: [10.9.0.1]}}}}\n",
            ips.join(", ")
        );
        Fleet::new(&FleetConfig::parse(&text, "t").unwrap())
    }

    fn set(f: &Fleet, i: usize, kv: f64, waiting: u32) {
        let s = LoadSample {
            kv_usage: kv,
            waiting,
            running: 0,
            ..LoadSample::default()
        };
        f.endpoints[i].load.store(&s, f.clock.now_ms());
    }

    fn req(model: &str) -> PickRequest<'_> {
        PickRequest {
            model: Some(model),
            subset: None,
        }
    }

    #[test]
    fn least_loaded_wins() {
        let f = fleet(3);
        set(&f, 0, 0.5, 3);
        set(&f, 1, 0.1, 0);
        set(&f, 2, 0.9, 8);
        let mut rng = fastrand::Rng::with_seed(1);
        let p = pick(&f, &req("m"), &Weights::default(), 2, &mut rng).unwrap();
        assert_eq!(p.primary, 1);
        assert_eq!(p.fallbacks, vec![0, 2]);
    }

    #[test]
    fn high_kv_gets_nothing_while_others_idle() {
        let f = fleet(4);
        set(&f, 0, 0.95, 0);
        for i in 1..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..200 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            assert_ne!(p.primary, 0);
        }
    }

    #[test]
    fn ties_are_broken_at_random() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(3);
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[pick(&f, &req("m"), &Weights::default(), 0, &mut rng)
                .unwrap()
                .primary] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn in_flight_spreads_a_burst_between_polls() {
        let f = fleet(4);
        for i in 0..4 {
            set(&f, i, 0.0, 0);
        }
        let mut rng = fastrand::Rng::with_seed(4);
        let mut guards = Vec::new();
        for _ in 0..8 {
            let p = pick(&f, &req("m"), &Weights::default(), 0, &mut rng).unwrap();
            guards.push(InFlight::new(f.endpoints[p.primary].clone()));
        }
        for e in &f.endpoints[..4] {
            assert_eq!(e.in_flight.load(std::sync::atomic::Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn prefill_steers_away_from_endpoints_still_waiting_for_first_tokens() {
        let f = fleet(2);
        set(&f, 0, 0.0, 0);
        set(&f, 1, 0.0, 0);
        // Both have one request in flight; endpoint 0's has not produced its first token yet.
        let waiting = InFlight::new(f.endpoints[0].clone());
        let mut streaming = InFlight::new(f.endpoints[1].clone());
        streaming.first_token();
        let mut rng = fastrand::Rng::with_seed(6);
        for _ in 0..50 {
            assert_eq!(
                pick(&f, &req("m"), &Weights::default(), 0, &mut rng)
                    .unwrap()
                    .primary,
                1
            );
        }
        // With the scorer off, the two tie again and share the picks.
        let off = Weights {
            prefill: 0.0,
            ..Weights::default()
        };
        let zeros = (0..200)
            .filter(|_| pick(&f, &req("m"), &off, 0, &mut rng).unwrap().primary == 0)
            .count();
        assert!((50..150).contains(&zeros), "{zeros}");
        drop((waiting, streaming));
    }

    #[test]
    fn filters_model_subset_and_staleness() {
        let f = fleet(3);
        set(&f, 0, 0.0, 0);
        set(&f, 1, 0.0, 0);
        let mut rng = fastrand::Rng::with_seed(5);
        // Endpoint 2 never scraped: never picked. The other pool's endpoint (3) is not a candidate.
        for _ in 0..50 {
            let p = pick(&f, &req("m"), &Weights::default(), 5, &mut rng).unwrap();
            assert!(p.primary < 2 && p.fallbacks.iter().all(|&i| i < 2), "{p:?}");
        }
        assert_eq!(
            pick(&f, &req("nope"), &Weights::default(), 0, &mut rng),
            Err(PickError::UnknownModel("nope".into()))
        );
        let subset = [f.endpoints[1].addr];
        let r = PickRequest {
            model: Some("m"),
            subset: Some(&subset),
        };
        assert_eq!(
            pick(&f, &r, &Weights::default(), 3, &mut rng).unwrap(),
            Pick {
                primary: 1,
                fallbacks: vec![]
            }
        );
        let outside = ["10.200.0.1:1".parse().unwrap()];
        let r = PickRequest {
            model: Some("m"),
            subset: Some(&outside),
        };
        assert!(matches!(
            pick(&f, &r, &Weights::default(), 0, &mut rng),
            Err(PickError::NoEndpoint(_))
        ));
        f.endpoints[0].load.fail();
        f.endpoints[1].load.fail();
        assert!(matches!(
            pick(&f, &req("m"), &Weights::default(), 0, &mut rng),
            Err(PickError::NoEndpoint(_))
        ));
    }
}

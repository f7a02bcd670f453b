//! The end of the request phase: a complete request is read, admitted
//! ([`fleetpick_core::admission`]), picked for, and answered: picked (the destination goes out
//! with the headers or the body), queued in flow control, or refused. A request the queue
//! releases comes back here to be picked.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use fleetpick_config::BodyMode;
use fleetpick_core::admission::{self, Admission, Ask, Flow, NoRoom, PickMode};
use fleetpick_core::fleet::{Fleet, InFlight};
use fleetpick_core::queue::{Outcome, Ticket};
use fleetpick_core::rewrite::Restorer;
use fleetpick_core::schedule::{self, Pick, PickError, PickRequest, Tier};
use fleetpick_core::session::{SessionKey, endpoint_token};

use super::ledger::{Ledger, Names, Tally};
use super::phase::{Awaiting, Ctx, Flight, Phase, Queued, Step};
use super::refusal::Refusal;
use super::request::{Request, RequestHead};
use super::response;
use crate::telemetry::FlowOutcome;
use crate::trace::{RequestTrace, TRACEPARENT};

/// Picks made for one request when concurrent picks keep filling the chosen endpoint to its
/// in-flight cap first (each lost race leaves that endpoint full, so the next pick avoids it).
const PICK_ATTEMPTS: usize = 8;

/// Reads, admits and picks for a complete request. `body_end`: the body ended with end of
/// stream (so the last piece sent back carries it).
pub(super) fn answer(ctx: &Ctx, head: RequestHead, body: Vec<u8>, body_end: bool) -> Step {
    // The generation current now (the body may have taken a while): the pick is made in it,
    // and its indices are what the stream keeps from here.
    let fleet = ctx.picker.fleet.load_full();
    let mut rng = fastrand::Rng::new();
    let metrics = ctx.picker.metrics.clone();
    match Request::read(&fleet, head, body, body_end, &mut rng) {
        Ok(request) => {
            let names = Names {
                client: request.client_model.clone(),
                target: request.model.clone().unwrap_or_default(),
                objective: request.objective.clone(),
            };
            place(
                ctx,
                fleet,
                request,
                Tally::new(metrics, names),
                false,
                &mut rng,
            )
        }
        Err(unreadable) => {
            let names = Names {
                client: unreadable.client_model,
                ..Names::default()
            };
            refuse(ctx, Tally::new(metrics, names), unreadable.refusal)
        }
    }
}

/// Goes on with a request the queue let go (in the generation current now, should a reload
/// have come while it waited), or refuses it if it waited too long.
pub(super) fn release(
    ctx: &Ctx,
    ticket: Ticket,
    fleet: Arc<Fleet>,
    mut request: Request,
    tally: Tally,
    outcome: Outcome,
) -> Step {
    let waited = ticket.enqueued.elapsed();
    if outcome == Outcome::Expired {
        return refuse_held(
            ctx,
            &fleet,
            &request,
            tally,
            Refusal::QueueTimeout { waited },
        );
    }
    if let Some(p) = request.pool {
        ctx.picker.metrics.waited(&fleet, p, waited);
    }
    // A reload while it waited: the pick is made in the generation current now (its
    // policies, its endpoints). Nothing of the old one is held yet but the pool's index.
    let current = ctx.picker.fleet.load_full();
    let fleet = if current.generation != fleet.generation {
        request.pool = request.model.as_deref().and_then(|m| current.pool_for(m));
        current
    } else {
        fleet
    };
    let step = place(ctx, fleet, request, tally, true, &mut fastrand::Rng::new());
    // In transit until now: the pick counts on its endpoint from here.
    drop(ticket);
    step
}

/// What the pick of an admitted request found.
#[derive(Debug)]
enum Placed {
    /// The endpoints, the primary's in-flight count taken.
    Picked(Pick, InFlight),
    /// The pool has no room for it.
    NoRoom(NoRoom),
}

/// Admits and picks. `released`: the request comes out of the queue, and goes now.
fn place(
    ctx: &Ctx,
    fleet: Arc<Fleet>,
    request: Request,
    tally: Tally,
    released: bool,
    rng: &mut fastrand::Rng,
) -> Step {
    let queue = request.pool.and_then(|p| fleet.pools[p].queue.as_ref());
    let flow = match queue {
        None => Flow::Off,
        Some(q) if q.is_empty() && q.in_transit() == 0 => Flow::Idle,
        Some(_) => Flow::Waiting,
    };
    let ask = Ask {
        priority: request.priority,
        released,
    };
    let admission = admission::admit(ask, flow);
    if admission == Admission::Queue {
        return hold(ctx, fleet, request, tally);
    }
    let bound = session_endpoint(&fleet, &request);
    let Admission::Pick(mode) = admission else {
        return refuse_held(ctx, &fleet, &request, tally, Refusal::Shed);
    };
    let started = Instant::now();
    match pick(&fleet, &request, bound, mode, rng) {
        Ok(Placed::Picked(pick, guard)) => {
            let won = Won {
                pick,
                guard,
                bound,
                started,
                released,
            };
            picked(ctx, fleet, request, tally, won, rng)
        }
        Ok(Placed::NoRoom(NoRoom::Queue)) => hold(ctx, fleet, request, tally),
        Ok(Placed::NoRoom(NoRoom::Shed)) => {
            refuse_held(ctx, &fleet, &request, tally, Refusal::Shed)
        }
        Err(e) => refuse(ctx, tally, e.into()),
    }
}

/// The endpoint the request's session is bound to, if it has one.
fn session_endpoint(fleet: &Fleet, request: &Request) -> Option<usize> {
    let sessions = request
        .pool
        .and_then(|p| fleet.pools[p].sessions.as_ref())?;
    let key = request.session_key.as_deref()?;
    match &sessions.key {
        SessionKey::Header(_) => sessions.get(key),
        // The cookie names its endpoint: nothing to remember.
        SessionKey::Cookie(_) => fleet.endpoint_for_token(key),
    }
}

/// Picks for the request and takes the in-flight count at the primary. Under an `in-flight`
/// policy the count is taken only below the cap, atomically; a pick that loses that race to a
/// concurrent one is made again (a few times), so the cap is never passed. In
/// [`PickMode::IfRoom`], a pick from a pool without room takes nothing and says so.
fn pick(
    fleet: &Fleet,
    request: &Request,
    session: Option<usize>,
    mode: PickMode,
    rng: &mut fastrand::Rng,
) -> Result<Placed, PickError> {
    let (sheddable, no_room) = match mode {
        PickMode::Serve => (false, None),
        PickMode::IfRoom {
            sheddable,
            otherwise,
        } => (sheddable, Some(otherwise)),
    };
    let req = PickRequest {
        model: request.model.as_deref(),
        subset: request.head.subset.as_deref(),
        explain: tracing::enabled!(tracing::Level::DEBUG),
        prefix: &request.hashes,
        session,
        sheddable,
    };
    for _ in 0..PICK_ATTEMPTS {
        let picked = schedule::pick(fleet, &req, &fleet.weights, fleet.fallbacks, rng);
        let pick = match (picked, no_room) {
            // In `in-flight` mode a full pool is at capacity rather than saturated: the same
            // "no room now" to admission and flow control.
            (Err(PickError::AtCapacity), Some(otherwise)) => {
                return Ok(Placed::NoRoom(otherwise));
            }
            (Ok(pick), Some(otherwise)) if pick.tier == Tier::Saturated => {
                return Ok(Placed::NoRoom(otherwise));
            }
            (other, _) => other?,
        };
        let ep = &fleet.endpoints[pick.primary];
        if let Some(guard) = InFlight::try_new(ep.clone(), pick.cap) {
            // The picked endpoint will hold this prompt's prefix in its cache.
            fleet.prefix.record(pick.primary, &request.hashes);
            return Ok(Placed::Picked(pick, guard));
        }
    }
    match no_room {
        Some(otherwise) => Ok(Placed::NoRoom(otherwise)),
        None => Err(PickError::AtCapacity),
    }
}

/// A successful pick, and what its answer needs from admission.
struct Won {
    pick: Pick,
    guard: InFlight,
    /// The endpoint the session was bound to before the pick.
    bound: Option<usize>,
    /// When the pick began (the scheduler's latency).
    started: Instant,
    released: bool,
}

/// Answers a picked request: the destination (and the body back, as Envoy's mode needs it);
/// the request awaits its response from here.
fn picked(
    ctx: &Ctx,
    fleet: Arc<Fleet>,
    request: Request,
    tally: Tally,
    won: Won,
    rng: &mut fastrand::Rng,
) -> Step {
    let Won {
        pick,
        guard,
        bound,
        started,
        released,
    } = won;
    let outcome = if released {
        FlowOutcome::Released
    } else {
        FlowOutcome::Admitted
    };
    count_flow(ctx, &fleet, &request, outcome);
    let set_cookie = bind_session(&fleet, &request, bound, pick.primary);
    let destination = destination(&fleet, &pick);
    let primary = &fleet.endpoints[pick.primary];
    let metrics = &ctx.picker.metrics;
    metrics.picked(
        &fleet,
        primary.pool,
        primary.cluster,
        pick.tier,
        pick.dry_run,
    );
    let trace = RequestTrace::start(request.head.header(TRACEPARENT).as_deref(), rng);
    log_pick(&request, &destination, &pick, &trace);
    let ledger = Ledger::new(fleet, tally, guard, trace.context);
    let names = ledger.names();
    metrics.request_started(&names.client, &names.target, started.elapsed());
    let (out, restore) = request_answer(ctx.mode, &destination, &trace, request);
    let flight = Flight {
        ledger,
        restore,
        trace,
    };
    let awaiting = Awaiting { flight, set_cookie };
    (Phase::AwaitingResponse(Box::new(awaiting)), out)
}

/// The request phase's answer once picked, as Envoy's body mode needs it; and the restorer of
/// a rewritten request, for its response.
fn request_answer(
    mode: BodyMode,
    destination: &str,
    trace: &RequestTrace,
    request: Request,
) -> (Vec<ProcessingResponse>, Option<Restorer>) {
    let Request {
        body,
        has_body,
        body_end,
        restore,
        ..
    } = request;
    let mutation = response::destination_mutation(destination, trace);
    let metadata = response::lb_metadata(destination);
    let out = match (has_body, mode) {
        (false, _) => vec![response::picked_headers(mutation, metadata)],
        (true, BodyMode::Buffered) => {
            // The rewritten body replaces the buffered one.
            let rewritten = restore.is_some().then_some(body);
            vec![response::picked_buffered(mutation, metadata, rewritten)]
        }
        (true, BodyMode::FullDuplex) => {
            response::picked_full_duplex(mutation, metadata, body, body_end)
        }
    };
    (out, restore)
}

/// Binds the request's session to the primary when it moved (or is new); for a cookie
/// session, the cookie to set on the response, naming the new endpoint.
fn bind_session(
    fleet: &Fleet,
    request: &Request,
    bound: Option<usize>,
    primary: usize,
) -> Option<String> {
    let sessions = request
        .pool
        .and_then(|p| fleet.pools[p].sessions.as_ref())?;
    if bound == Some(primary) {
        return None;
    }
    match (&sessions.key, request.session_key.as_deref()) {
        (SessionKey::Header(_), Some(k)) => sessions.bind(k, primary),
        (SessionKey::Header(_), None) => {}
        (SessionKey::Cookie(name), _) => {
            let token = endpoint_token(&fleet.endpoints[primary].addr_text);
            return Some(format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax"));
        }
    }
    None
}

/// The destination: the primary, then the fallbacks, comma-separated.
fn destination(fleet: &Fleet, pick: &Pick) -> String {
    let endpoints = &fleet.endpoints;
    let mut destination = endpoints[pick.primary].addr_text.clone();
    for &f in &pick.fallbacks {
        destination.push(',');
        destination.push_str(&endpoints[f].addr_text);
    }
    destination
}

fn log_pick(request: &Request, destination: &str, pick: &Pick, trace: &RequestTrace) {
    let trace_id = trace.context.trace_id_hex();
    match &pick.explain {
        Some(why) => tracing::debug!(
            model = request.model.as_deref().unwrap_or(""),
            %destination,
            %trace_id,
            tier = pick.tier.as_str(),
            dry_run = pick.dry_run.map(|v| v.as_str()),
            candidates = %why,
            "picked"
        ),
        None => tracing::trace!(%destination, %trace_id, "picked"),
    }
}

/// Holds a request the pool has no room for in the pool's queue; the shell waits for its
/// release. (Admission queues only in a pool with flow control; were there no queue, the
/// request would be shed.)
fn hold(ctx: &Ctx, fleet: Arc<Fleet>, request: Request, tally: Tally) -> Step {
    let Some(queue) = request.pool.and_then(|p| fleet.pools[p].queue.clone()) else {
        return refuse_held(ctx, &fleet, &request, tally, Refusal::Shed);
    };
    match queue.enqueue(request.priority, &request.flow, request.body.len()) {
        Ok(ticket) => {
            count_flow(ctx, &fleet, &request, FlowOutcome::Queued);
            let queued = Queued {
                ticket,
                fleet,
                request,
                tally,
                deferred: Vec::new(),
            };
            (Phase::Queued(Box::new(queued)), Vec::new())
        }
        Err(e) => refuse_held(ctx, &fleet, &request, tally, Refusal::QueueFull(e)),
    }
}

/// Counts what admission or the queue did with a request (one without a pool: not counted).
pub(super) fn count_flow(ctx: &Ctx, fleet: &Fleet, request: &Request, outcome: FlowOutcome) {
    if let Some(p) = request.pool {
        ctx.picker.metrics.flow(fleet, p, request.priority, outcome);
    }
}

/// Refuses a request admission or the queue held, counting what flow control did with it.
fn refuse_held(
    ctx: &Ctx,
    fleet: &Fleet,
    request: &Request,
    tally: Tally,
    refusal: Refusal,
) -> Step {
    if let Some(outcome) = refusal.row().flow {
        count_flow(ctx, fleet, request, outcome);
    }
    refuse(ctx, tally, refusal)
}

/// Ends the stream with an immediate response in the OpenAI error shape.
pub(super) fn refuse(ctx: &Ctx, mut tally: Tally, refusal: Refusal) -> Step {
    let row = refusal.row();
    tracing::debug!(
        status = row.status,
        reason = row.label,
        message = %refusal.error().message,
        "refused"
    );
    let metrics = &ctx.picker.metrics;
    metrics.refused(row.label);
    // (No target: the request was not picked for.)
    metrics.request_failed(&tally.names.client, "", row.label);
    tally.count("", row.status);
    (Phase::Closed, vec![refusal.response()])
}

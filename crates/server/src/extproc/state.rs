//! One ext_proc stream as a state machine: its [`Phase`]s, each carrying the data valid in it,
//! and the transitions from (phase, message) to (next phase, responses to send). Nothing here
//! awaits or does I/O: the shell in [`super`] reads the messages, waits on the flow-control
//! ticket, and sends what the transitions return.
//!
//! ```text
//! AwaitingHeaders --request headers--> CollectingBody
//!   | (the headers end the request)       | (the body's end; a BUFFERED body; trailers)
//!   +-------------> answer: read, admit, pick <------------ released ---+
//!                     |          |           |                           |
//!                  refused     queued      picked                        |
//!                     v          v           v                           |
//!                  Closed      Queued -----------------------------------+
//!                                |         AwaitingResponse
//!                 expired or     |           | response headers
//!                 cancelled ---> Closed      v
//!                                          Streaming
//!                                            | the response's end (body end of stream, trailers)
//!                                            v
//!                                          Ended
//! ```
//!
//! A refusal ends the stream at once ([`Phase::Closed`]); the shell then stops. An expired or
//! cancelled wait in the queue ends there too.

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
    ProcessingResponse,
};
use fleetpick_config::BodyMode;
use fleetpick_core::queue::{Outcome, Ticket};
use fleetpick_core::rewrite::Restorer;

use super::ledger::{Names, Tally};
use super::phase::{Awaiting, Collecting, Ctx, Ended, Flight, Phase, Queued, Step, Streaming};
use super::picker::Picker;
use super::place;
use super::refusal::Refusal;
use super::request::{RequestHead, header, served_endpoint};
use super::response::{self, append_header, headers_response, streamed_piece};
use crate::telemetry::FlowOutcome;

/// One ext_proc stream.
#[derive(Debug)]
pub(super) struct Stream {
    ctx: Ctx,
    phase: Phase,
}

impl Stream {
    pub fn new(picker: Picker) -> Stream {
        Stream {
            ctx: Ctx {
                mode: picker.settings.body_mode,
                response_streamed: false,
                picker,
            },
            phase: Phase::AwaitingHeaders,
        }
    }

    #[cfg(test)]
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The request phase is answered (picked, queued or refused): a broken stream from here on
    /// is the normal end of one, not a request Envoy could still send on unanswered.
    pub fn answered(&self) -> bool {
        !matches!(
            self.phase,
            Phase::AwaitingHeaders | Phase::CollectingBody(_)
        )
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The flow-control ticket, while the request waits in the queue.
    pub fn ticket(&mut self) -> Option<&mut Ticket> {
        match &mut self.phase {
            Phase::Queued(q) => Some(&mut q.ticket),
            _ => None,
        }
    }

    /// Handles one message from Envoy; returns the responses to send, in order.
    pub fn handle(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Phase::Queued(q) = &mut self.phase {
            q.deferred.push(msg);
            return Vec::new();
        }
        if let Some(pc) = &msg.protocol_config {
            self.ctx.configure(pc);
        }
        let Some(request) = msg.request else {
            return Vec::new();
        };
        // Closed while the transition runs: should it panic, the stream answers nothing more
        // (the shell fails the request, and what the phase held settles as it drops).
        let phase = std::mem::replace(&mut self.phase, Phase::Closed);
        let (next, out) = step(&self.ctx, phase, request, msg.metadata_context.as_ref());
        self.phase = next;
        out
    }

    /// The queue let the request go (or its time to live ran out): it is picked for now (or
    /// refused), then the messages that came meanwhile are handled.
    pub fn resume(&mut self, outcome: Outcome) -> Vec<ProcessingResponse> {
        let queued = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Queued(q) => q,
            other => {
                self.phase = other;
                return Vec::new();
            }
        };
        let Queued {
            ticket,
            fleet,
            request,
            tally,
            deferred,
        } = *queued;
        let (next, mut out) = place::release(&self.ctx, ticket, fleet, request, tally, outcome);
        self.phase = next;
        for msg in deferred {
            out.extend(self.handle(msg));
        }
        out
    }

    /// The client (or Envoy) left while the request waited: it leaves the queue as its ticket
    /// drops, and ends without an answer.
    pub fn cancel(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Queued(q) => {
                place::count_flow(&self.ctx, &q.fleet, &q.request, FlowOutcome::Cancelled);
            }
            other => self.phase = other,
        }
    }
}

/// The transition from `phase` on `msg`.
fn step(ctx: &Ctx, phase: Phase, msg: Req, md: Option<&Metadata>) -> Step {
    match (phase, msg) {
        (Phase::AwaitingHeaders, Req::RequestHeaders(h)) => request_headers(ctx, h, md),
        // A processing mode that skips the headers: the body comes all the same, for a
        // request without a path.
        (Phase::AwaitingHeaders, msg @ (Req::RequestBody(_) | Req::RequestTrailers(_))) => {
            step(ctx, Phase::CollectingBody(Collecting::default()), msg, md)
        }
        (Phase::CollectingBody(c), Req::RequestBody(b)) => request_body(ctx, c, b),
        (Phase::CollectingBody(c), Req::RequestTrailers(t)) => request_trailers(ctx, c, t),
        (
            phase @ (Phase::AwaitingResponse(_) | Phase::Streaming(_) | Phase::Ended(_)),
            Req::RequestTrailers(_),
        ) => (phase, vec![response::request_trailers()]),
        (Phase::AwaitingResponse(a), Req::ResponseHeaders(h)) => {
            let Awaiting { flight, set_cookie } = *a;
            response_headers(ctx, flight, set_cookie, &h, md)
        }
        (Phase::Streaming(s), Req::ResponseHeaders(h)) => {
            response_headers(ctx, s.flight, None, &h, md)
        }
        (Phase::AwaitingResponse(a), Req::ResponseBody(b)) => {
            let s = Streaming {
                flight: a.flight,
                event_stream: false,
            };
            response_body(ctx, s, b)
        }
        (Phase::Streaming(s), Req::ResponseBody(b)) => response_body(ctx, *s, b),
        (Phase::AwaitingResponse(a), Req::ResponseTrailers(_)) => response_end(a.flight),
        (Phase::Streaming(s), Req::ResponseTrailers(_)) => response_end(s.flight),
        (Phase::Ended(mut e), Req::ResponseBody(b)) => {
            let out = body_answer(ctx, e.restore.as_mut(), b.body, b.end_of_stream);
            (Phase::Ended(e), out)
        }
        (Phase::Ended(e), Req::ResponseTrailers(_)) => response_trailers(e),
        // A response message with no response under way (Envoy sends none): let through.
        (phase @ (Phase::AwaitingHeaders | Phase::CollectingBody(_) | Phase::Ended(_)), msg) => {
            let out = match msg {
                Req::ResponseHeaders(_) => vec![headers_response(Resp::ResponseHeaders, None)],
                Req::ResponseBody(b) => body_answer(ctx, None, b.body, b.end_of_stream),
                Req::ResponseTrailers(_) => vec![response::response_trailers()],
                _ => Vec::new(),
            };
            (phase, out)
        }
        // Request headers again, a request body after the answer, anything once closed:
        // nothing to answer.
        (phase, _) => (phase, Vec::new()),
    }
}

/// The request headers: the body follows, or (end of stream) there is none and the request is
/// answered now. In BUFFERED mode the headers are let through at once (Envoy sends the body
/// only then); in FULL_DUPLEX mode their answer waits for the pick.
fn request_headers(ctx: &Ctx, h: HttpHeaders, md: Option<&Metadata>) -> Step {
    let end = h.end_of_stream;
    let head = RequestHead::new(h, md);
    if end {
        return place::answer(ctx, head, Vec::new(), false);
    }
    let out = match ctx.mode {
        BodyMode::Buffered => vec![headers_response(Resp::RequestHeaders, None)],
        BodyMode::FullDuplex => Vec::new(),
    };
    let collecting = Collecting {
        head,
        body: Vec::new(),
    };
    (Phase::CollectingBody(collecting), out)
}

/// A request body chunk: collected (past `max_body_bytes`: 413); its end answers the request.
fn request_body(ctx: &Ctx, mut c: Collecting, b: HttpBody) -> Step {
    let limit = ctx.picker.settings.max_body_bytes;
    if c.body.len() + b.body.len() > limit {
        let tally = Tally::new(ctx.picker.metrics.clone(), Names::default());
        return place::refuse(ctx, tally, Refusal::TooLarge { limit });
    }
    if c.body.is_empty() {
        c.body = b.body;
    } else {
        c.body.extend_from_slice(&b.body);
    }
    // In BUFFERED mode the body comes whole in one message, without end of stream when
    // trailers follow: answer it either way.
    if b.end_of_stream || ctx.mode == BodyMode::Buffered {
        return place::answer(ctx, c.head, c.body, b.end_of_stream);
    }
    (Phase::CollectingBody(c), Vec::new())
}

/// Request trailers end the body (without end of stream on it): the request is answered, then
/// the trailers, after the release when the request waits in the queue.
fn request_trailers(ctx: &Ctx, c: Collecting, trailers: HttpTrailers) -> Step {
    let (mut phase, mut out) = place::answer(ctx, c.head, c.body, false);
    match &mut phase {
        Phase::Queued(q) => q.deferred.push(ProcessingRequest {
            request: Some(Req::RequestTrailers(trailers)),
            ..ProcessingRequest::default()
        }),
        Phase::Closed => {}
        _ => out.push(response::request_trailers()),
    }
    (phase, out)
}

/// The response headers: the status and the served endpoint are noted (the in-flight count
/// follows a retry), a new session's cookie is set, and a rewritten request's restorer learns
/// the body's shape.
fn response_headers(
    ctx: &Ctx,
    mut flight: Flight,
    set_cookie: Option<String>,
    h: &HttpHeaders,
    md: Option<&Metadata>,
) -> Step {
    let status = header(h, ":status").and_then(|s| s.parse().ok());
    let event_stream = header(h, "content-type")
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/event-stream"));
    flight.ledger.response_headers(status, served_endpoint(md));
    let mut mutation = HeaderMutation::default();
    if let Some(cookie) = set_cookie {
        mutation
            .set_headers
            .push(append_header("set-cookie", &cookie));
    }
    if !ctx.response_streamed {
        // Restoring needs the body streamed through here (the shipped configs do).
        flight.restore = None;
    }
    if let Some(r) = flight.restore.as_mut() {
        r.content_type(
            header(h, "content-type").as_deref(),
            header(h, "content-encoding").as_deref(),
        );
        // The restored name may differ in length from the target's.
        mutation.remove_headers.push("content-length".into());
    }
    let changed = !(mutation.set_headers.is_empty() && mutation.remove_headers.is_empty());
    let out = vec![headers_response(
        Resp::ResponseHeaders,
        changed.then_some(mutation),
    )];
    let streaming = Streaming {
        flight,
        event_stream,
    };
    (Phase::Streaming(Box::new(streaming)), out)
}

/// A response body chunk: passed back (restored, for a rewritten request); the one with end
/// of stream ends the request.
fn response_body(ctx: &Ctx, mut s: Streaming, b: HttpBody) -> Step {
    s.flight.ledger.response_body(&b.body, s.event_stream);
    if !b.end_of_stream {
        let out = body_answer(ctx, s.flight.restore.as_mut(), b.body, false);
        return (Phase::Streaming(Box::new(s)), out);
    }
    let Flight {
        ledger,
        mut restore,
        trace,
    } = s.flight;
    drop(ledger);
    let out = body_answer(ctx, restore.as_mut(), b.body, true);
    (
        Phase::Ended(Ended {
            restore,
            _trace: trace,
        }),
        out,
    )
}

/// The response trailers end the request, and the body with it.
fn response_end(flight: Flight) -> Step {
    let Flight {
        ledger,
        restore,
        trace,
    } = flight;
    drop(ledger);
    response_trailers(Ended {
        restore,
        _trace: trace,
    })
}

/// The response trailers: what a restorer still holds goes out before them.
fn response_trailers(mut e: Ended) -> Step {
    let mut out = Vec::with_capacity(2);
    if let Some(r) = e.restore.as_mut() {
        let held = r.push(&[], true);
        if !held.is_empty() {
            out.push(response::response_body(streamed_piece(held, false)));
        }
    }
    out.push(response::response_trailers());
    (Phase::Ended(e), out)
}

/// The answer to a response body chunk.
fn body_answer(
    ctx: &Ctx,
    restore: Option<&mut Restorer>,
    body: Vec<u8>,
    end: bool,
) -> Vec<ProcessingResponse> {
    let response = match restore {
        // Held until a whole line (events) or the whole body (JSON) is in; nothing to send for
        // this chunk yet. Full-duplex streaming allows that: the pieces sent need not match the
        // chunks received one for one.
        Some(r) => {
            let out = r.push(&body, end);
            if out.is_empty() && !end {
                return Vec::new();
            }
            streamed_piece(out, end)
        }
        // Echoed unchanged (streamed back piece for piece in FULL_DUPLEX mode).
        None if ctx.response_streamed => streamed_piece(body, end),
        None => CommonResponse::default(),
    };
    vec![response::response_body(response)]
}

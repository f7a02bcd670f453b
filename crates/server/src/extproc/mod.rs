//! The `ExternalProcessor` gRPC service: one stream per HTTP request, speaking the Endpoint
//! Picker Protocol to Envoy.
//!
//! # The stream, message by message
//! - `request_headers`: note `:path`, the subset hint and the body mode Envoy announces
//!   (`protocol_config`, else the fleet file's `server.body_mode`). A request without a body is
//!   picked at once. In BUFFERED mode the headers are let through (Envoy will not send the body
//!   before they are answered); in FULL_DUPLEX mode the answer waits for the body.
//! - `request_body` chunks: collected (over `max_body_bytes`: 413). On end of stream the body is
//!   parsed once, the endpoint picked, and the answer goes out: FULL_DUPLEX sends the headers
//!   response (destination header + `envoy.lb` metadata) and then the body back as
//!   `StreamedBodyResponse` pieces of at most 62,000 bytes, end of stream on the last and only
//!   there; BUFFERED sends one body response carrying the header mutation and metadata.
//! - Admission, once the model (and so the pool) is known: the request's priority comes from
//!   its InferenceObjective. While the pool is saturated a sheddable one (priority below 0) is
//!   refused with 429; with flow control the others wait in the pool's queue (see
//!   [`fleetpick_core::admission`] and [`fleetpick_core::queue`]) and the stream's task awaits
//!   the release while it keeps reading the stream (its end means the client left, and the
//!   request leaves the queue).
//! - Errors become immediate responses in the OpenAI error shape (one table, in `refusal`):
//!   400 (bad body), 404 (unknown model), 413 (too large), 429 (shed, queue full, at
//!   capacity), 503 (no eligible endpoint, waited past the queue's time to live).
//! - `response_headers`: the status and the endpoint Envoy says it served are noted.
//! - `response_body` chunks (the shipped Envoy configs stream them, FULL_DUPLEX): echoed back
//!   unchanged; the one with end of stream (or the response trailers) ends the request.
//!
//! The picked endpoint's in-flight count is held by an [`InFlight`] guard owned by the
//! stream's phase (in its `ledger`). It is released once: at the end of the response, or when
//! the stream's task ends, which every other ending (reset, client gone, Envoy gone, a handler
//! that panicked) leads to.
//!
//! # Layout
//! - this module: the service, and the shell of each stream's task: it reads Envoy's messages,
//!   waits on the flow-control ticket while still reading, sends the responses, and turns a
//!   panic into a failed request;
//! - `picker`: the service's shared state (the fleet, the `server` settings, the metrics);
//! - `phase`: the stream's phases, each with the data valid in it;
//! - `state`: the stream as a state machine, its phases and their transitions, no I/O;
//! - `place`: the end of the request phase: read, admit, pick, answer;
//! - `request`: what is read from Envoy's messages, and the request as admission sees it;
//! - `response`: the builders of the messages sent back;
//! - `refusal`: the table of refusals;
//! - `ledger`: what a request counts (the request totals, the in-flight count) and when.
//!
//! [`InFlight`]: fleetpick_core::fleet::InFlight

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use picker::{Picker, Settings};
use state::Stream;

pub use fleetpick_protocol::envoy::MAX_BODY_PIECE as MAX_PIECE;
pub use fleetpick_protocol::headers::{
    DESTINATION_HEADER, FAIRNESS_HEADER, LB_NAMESPACE, OBJECTIVE_HEADER, REASON_HEADER, SERVED_KEY,
    SUBSET_KEY, SUBSET_NAMESPACE,
};

mod ledger;
mod phase;
mod picker;
mod place;
mod refusal;
mod request;
mod response;
mod state;
#[cfg(test)]
mod tests;

type Responses = mpsc::Sender<Result<ProcessingResponse, Status>>;

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let stream = Stream::new(self.clone());
        tokio::spawn(run(stream, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One stream's task: each message from Envoy goes through the state machine, and its
/// responses go back in order. `stream` drops when this ends, and with it the in-flight count
/// of a request still open.
async fn run(mut stream: Stream, mut inbound: Streaming<ProcessingRequest>, tx: Responses) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            // Envoy closed its side: the HTTP stream is over.
            Ok(None) => return,
            Err(status) => {
                if !stream.answered() {
                    // A message we could not read before the pick (too large, garbled):
                    // closing with OK would let Envoy go on without a destination, so fail
                    // the stream instead.
                    tracing::warn!(%status, "cannot read an ext_proc message");
                    let _ = tx.send(Err(status)).await;
                } else {
                    // Reset: normal at the end of a stream, or the client or Envoy left.
                    tracing::trace!(%status, "ext_proc stream ended by the proxy");
                }
                return;
            }
        };
        if !feed(&tx, guarded(|| stream.handle(msg))).await {
            return;
        }
        if stream.ticket().is_some() && !wait_in_queue(&mut stream, &mut inbound, &tx).await {
            return;
        }
        if stream.is_closed() {
            return;
        }
    }
}

/// Waits for the release of a request held by flow control, and keeps reading the stream
/// meanwhile: a message is handed to the state machine (which defers it), and the stream's
/// end means the client (or Envoy) left, so the request leaves the queue. False when the
/// stream is over.
async fn wait_in_queue(
    stream: &mut Stream,
    inbound: &mut Streaming<ProcessingRequest>,
    tx: &Responses,
) -> bool {
    while let Some(ticket) = stream.ticket() {
        let event = tokio::select! {
            outcome = ticket.wait() => Ok(outcome),
            next = inbound.message() => Err(next),
        };
        let out = match event {
            Ok(outcome) => guarded(|| stream.resume(outcome)),
            Err(Ok(Some(msg))) => guarded(|| stream.handle(msg)),
            Err(Ok(None)) => {
                stream.cancel();
                return false;
            }
            // Not answered yet: closing with OK would let Envoy go on without a destination.
            Err(Err(status)) => {
                let _ = tx.send(Err(status)).await;
                stream.cancel();
                return false;
            }
        };
        if !feed(tx, out).await {
            return false;
        }
    }
    true
}

/// Sends a handler's responses to Envoy in order, or fails the request when the handler
/// panicked; false when the stream is over.
async fn feed(tx: &Responses, out: Option<Vec<ProcessingResponse>>) -> bool {
    let Some(out) = out else {
        let _ = tx.send(Err(internal())).await;
        return false;
    };
    for r in out {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

/// Runs `f`, turning a panic into `None` (logged): the request fails, the service stays up.
/// A bug must fail this request, not close the stream with OK (which Envoy reads as "go on
/// without a pick") or take the service down.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::error!("ext_proc stream handler panicked; failing the request");
            None
        }
    }
}

fn internal() -> Status {
    Status::internal("fleetpick failed on this request")
}

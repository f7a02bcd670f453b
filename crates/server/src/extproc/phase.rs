//! The phases of one ext_proc stream, each carrying exactly the data valid in it, and what holds
//! for the whole stream ([`Ctx`]). The transitions between them are `state`'s (and `place`'s,
//! for the end of the request phase).

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use fleetpick_config::BodyMode;
use fleetpick_core::fleet::Fleet;
use fleetpick_core::queue::Ticket;
use fleetpick_core::rewrite::Restorer;

use super::ledger::{Ledger, Tally};
use super::picker::Picker;
use super::request::{Request, RequestHead};
use crate::trace::RequestTrace;

/// What holds for the whole stream.
#[derive(Debug)]
pub(super) struct Ctx {
    pub picker: Picker,
    /// How the request body comes: Envoy's `protocol_config`, else the fleet file's.
    pub mode: BodyMode,
    /// The response body is streamed through fleetpick (FULL_DUPLEX_STREAMED).
    pub response_streamed: bool,
}

impl Ctx {
    pub(super) fn configure(&mut self, pc: &ProtocolConfiguration) {
        if pc.request_body_mode == BodySendMode::Buffered as i32 {
            self.mode = BodyMode::Buffered;
        } else if pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32 {
            self.mode = BodyMode::FullDuplex;
        }
        self.response_streamed = pc.response_body_mode == BodySendMode::FullDuplexStreamed as i32;
    }
}

/// Where the stream is.
#[derive(Debug)]
pub(super) enum Phase {
    /// Nothing came yet.
    AwaitingHeaders,
    /// The request headers came, and a body follows: collected here.
    CollectingBody(Collecting),
    /// Held by flow control until its release, or its time to live.
    Queued(Box<Queued>),
    /// Picked and sent on; the response has not begun.
    AwaitingResponse(Box<Awaiting>),
    /// The response's headers came; its body streams back through here.
    Streaming(Box<Streaming>),
    /// The response ended, and the request with it (counted, its in-flight count released);
    /// what a restorer still holds goes out before the trailers.
    Ended(Ended),
    /// fleetpick answered the request itself, or its wait in the queue ended without a
    /// release: nothing more to send.
    Closed,
}

/// The request headers, and the body so far.
#[derive(Debug, Default)]
pub(super) struct Collecting {
    pub head: RequestHead,
    pub body: Vec<u8>,
}

/// A request waiting in its pool's queue.
#[derive(Debug)]
pub(super) struct Queued {
    pub ticket: Ticket,
    /// The generation it was read in (a reload while it waits is taken up at its release).
    pub fleet: Arc<Fleet>,
    pub request: Request,
    pub tally: Tally,
    /// Messages that came while it waited, handled in order after the release (request
    /// trailers are answered after the headers response, which the release sends).
    pub deferred: Vec<ProcessingRequest>,
}

/// A picked request, from its pick to the end of its response.
#[derive(Debug)]
pub(super) struct Flight {
    pub ledger: Ledger,
    /// Restores the client's model name in the response of a rewritten request.
    pub restore: Option<Restorer>,
    /// The pick's span in the request's trace; it ends with the stream.
    pub trace: RequestTrace,
}

#[derive(Debug)]
pub(super) struct Awaiting {
    pub flight: Flight,
    /// A new session cookie, set on the response.
    pub set_cookie: Option<String>,
}

#[derive(Debug)]
pub(super) struct Streaming {
    pub flight: Flight,
    /// The response is an event stream (its JSON events are counted as tokens).
    pub event_stream: bool,
}

#[derive(Debug)]
pub(super) struct Ended {
    pub restore: Option<Restorer>,
    /// Held to the stream's end: the pick's span ends as it drops.
    pub _trace: RequestTrace,
}

/// A transition's result: the next phase, and the responses to send, in order.
pub(super) type Step = (Phase, Vec<ProcessingResponse>);

//! Every way fleetpick answers a request itself, in one table: the HTTP status, OpenAI's error
//! `type`, the `x-fleetpick-reason` label (also the `reason` of `fleetpick_refusals_total` and
//! the `error_code` of `inference_objective_request_error_total`), whether the answer carries
//! `retry-after`, what flow control counts for it, and the message the client reads.
//!
//! The labels and statuses are an interface: clients, tests and dashboards read them.

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HeaderMutation, ImmediateResponse, ProcessingResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use fleetpick_core::queue::QueueError;
use fleetpick_core::schedule::PickError;
use fleetpick_protocol::openai::ApiError;

use super::response::set_header;
use crate::telemetry::FlowOutcome;
use fleetpick_protocol::headers::REASON_HEADER;

/// Why fleetpick answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BadRequest,
    UnknownModel,
    BodyTooLarge,
    SheddableSaturated,
    QueueFull,
    AtCapacity,
    NoEligibleEndpoint,
    QueueTimeout,
}

/// What a [`Reason`] looks like to the client and in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub status: u16,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// `x-fleetpick-reason`, and the metrics' label.
    pub label: &'static str,
    /// `retry-after: 1`: capacity comes back within a poll or two, so a client that honours
    /// it retries soon.
    pub retry_after: bool,
    /// The outcome `fleetpick_flow_requests_total` counts, for the refusals admission and the
    /// queue make.
    pub flow: Option<FlowOutcome>,
}

const fn row(
    status: u16,
    kind: &'static str,
    label: &'static str,
    retry_after: bool,
    flow: Option<FlowOutcome>,
) -> Row {
    Row {
        status,
        kind,
        label,
        retry_after,
        flow,
    }
}

const INVALID: &str = "invalid_request_error";
const RATE_LIMIT: &str = "rate_limit_exceeded";
const UNAVAILABLE: &str = "service_unavailable";

impl Reason {
    #[cfg(test)]
    pub const ALL: [Reason; 8] = [
        Reason::BadRequest,
        Reason::UnknownModel,
        Reason::BodyTooLarge,
        Reason::SheddableSaturated,
        Reason::QueueFull,
        Reason::AtCapacity,
        Reason::NoEligibleEndpoint,
        Reason::QueueTimeout,
    ];

    /// The table.
    pub const fn row(self) -> Row {
        use FlowOutcome::{Expired, Full, Shed};
        match self {
            Reason::BadRequest => row(400, INVALID, "bad-request", false, None),
            Reason::UnknownModel => row(404, "not_found_error", "unknown-model", false, None),
            Reason::BodyTooLarge => row(413, INVALID, "body-too-large", false, None),
            Reason::SheddableSaturated => {
                row(429, RATE_LIMIT, "sheddable-saturated", true, Some(Shed))
            }
            Reason::QueueFull => row(429, RATE_LIMIT, "queue-full", true, Some(Full)),
            Reason::AtCapacity => row(429, RATE_LIMIT, "at-capacity", true, None),
            Reason::NoEligibleEndpoint => row(503, UNAVAILABLE, "no-eligible-endpoint", true, None),
            Reason::QueueTimeout => row(503, UNAVAILABLE, "queue-timeout", true, Some(Expired)),
        }
    }
}

/// One refusal, with what its message needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not the API's request (the parser's error names the field).
    BadBody(ApiError),
    /// An inference path without a body.
    NoBody,
    /// A rewritten model must appear exactly once in the body, to be replaced there.
    RewriteAmbiguous,
    /// The body passed `max_body_bytes`.
    TooLarge {
        limit: usize,
    },
    UnknownModel(String),
    /// The scheduler found no endpoint (why, in its words).
    NoEndpoint(&'static str),
    /// Every eligible endpoint is at its in-flight cap.
    AtCapacity,
    /// Sheddable, and the pool has no room for it.
    Shed,
    /// The request's band of the queue is full.
    QueueFull(QueueError),
    /// The request waited in the queue past its time to live.
    QueueTimeout {
        waited: Duration,
    },
}

impl From<PickError> for Refusal {
    fn from(e: PickError) -> Refusal {
        match e {
            PickError::UnknownModel(m) => Refusal::UnknownModel(m),
            PickError::NoEndpoint(why) => Refusal::NoEndpoint(why),
            PickError::AtCapacity => Refusal::AtCapacity,
        }
    }
}

impl Refusal {
    /// The refusal's reason, its message, and the request field at fault (if one is).
    fn entry(&self) -> (Reason, String, Option<&'static str>) {
        match self {
            Refusal::BadBody(e) => (Reason::BadRequest, e.message.clone(), e.param),
            Refusal::NoBody => (
                Reason::BadRequest,
                "the request has no body: a JSON body naming the model is required".into(),
                None,
            ),
            Refusal::RewriteAmbiguous => (
                Reason::BadRequest,
                "`model` must appear once in the body to be rewritten".into(),
                Some("model"),
            ),
            Refusal::TooLarge { limit } => (
                Reason::BodyTooLarge,
                format!("request body exceeds {limit} bytes"),
                None,
            ),
            Refusal::UnknownModel(m) => (
                Reason::UnknownModel,
                format!("the model `{m}` does not exist"),
                Some("model"),
            ),
            Refusal::NoEndpoint(why) => (
                Reason::NoEligibleEndpoint,
                PickError::NoEndpoint(why).to_string(),
                None,
            ),
            Refusal::AtCapacity => (
                Reason::AtCapacity,
                PickError::AtCapacity.to_string(),
                None,
            ),
            Refusal::Shed => (
                Reason::SheddableSaturated,
                "the pool is saturated and this request's objective is sheddable (priority below 0)"
                    .into(),
                None,
            ),
            Refusal::QueueFull(e) => (Reason::QueueFull, e.to_string(), None),
            Refusal::QueueTimeout { waited } => (
                Reason::QueueTimeout,
                format!(
                    "the pool stayed saturated for {} ms while this request waited",
                    waited.as_millis()
                ),
                None,
            ),
        }
    }

    pub fn reason(&self) -> Reason {
        self.entry().0
    }

    pub fn row(&self) -> Row {
        self.reason().row()
    }

    /// The error in the OpenAI shape: status and type from the table.
    pub fn error(&self) -> ApiError {
        let (reason, message, param) = self.entry();
        let row = reason.row();
        ApiError {
            param,
            ..ApiError::new(row.status, row.kind, message)
        }
    }

    /// The immediate response that ends the stream with this refusal.
    pub fn response(&self) -> ProcessingResponse {
        let error = self.error();
        let row = self.row();
        let mut set_headers = vec![
            set_header("content-type", "application/json"),
            set_header(REASON_HEADER, row.label),
        ];
        if row.retry_after {
            set_headers.push(set_header("retry-after", "1"));
        }
        ProcessingResponse {
            response: Some(Resp::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(row.status),
                }),
                headers: Some(HeaderMutation {
                    set_headers,
                    ..HeaderMutation::default()
                }),
                body: error.body(),
                details: format!("fleetpick_{}", row.label.replace('-', "_")),
                grpc_status: None,
            })),
            ..ProcessingResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_retry_after_goes_with_429_and_503() {
        let labels: std::collections::HashSet<_> =
            Reason::ALL.iter().map(|r| r.row().label).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        for r in Reason::ALL {
            let row = r.row();
            assert_eq!(row.retry_after, matches!(row.status, 429 | 503), "{r:?}");
        }
    }

    #[test]
    fn a_parse_error_keeps_its_message_and_field() {
        let e = ApiError::invalid("stream", "must be a boolean");
        let out = Refusal::BadBody(e.clone()).error();
        assert_eq!(out, e);
    }
}

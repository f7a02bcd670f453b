//! Builders of the `ProcessingResponse` messages fleetpick sends Envoy (the immediate responses
//! of refusals are [`super::refusal`]'s). No state: each takes what goes in it.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::trace::{RequestTrace, TRACEPARENT, TRACESTATE};
use fleetpick_protocol::envoy::MAX_BODY_PIECE as MAX_PIECE;
use fleetpick_protocol::headers::{DESTINATION_HEADER, LB_NAMESPACE};

/// A header set by overwriting: a destination the client sent must never survive.
pub(super) fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.as_bytes().to_vec(),
            ..HeaderValue::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// A header added beside any of the same name (`set-cookie`).
pub(super) fn append_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        append_action: HeaderAppendAction::AppendIfExistsOrAdd as i32,
        ..set_header(key, value)
    }
}

/// The request's header mutation once picked: the destination, and the trace context the
/// model server's spans hang under (the client's `tracestate` goes with a new trace).
pub(super) fn destination_mutation(destination: &str, trace: &RequestTrace) -> HeaderMutation {
    let mut mutation = HeaderMutation {
        set_headers: vec![
            set_header(DESTINATION_HEADER, destination),
            set_header(TRACEPARENT, &trace.context.to_string()),
        ],
        ..HeaderMutation::default()
    };
    if !trace.continued {
        mutation.remove_headers.push(TRACESTATE.into());
    }
    mutation
}

/// The destination as dynamic metadata, where Envoy's load balancers read it.
pub(super) fn lb_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(destination))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// A headers response (`wrap` says whose: the request's or the response's).
pub(super) fn headers_response(
    wrap: fn(HeadersResponse) -> Resp,
    mutation: Option<HeaderMutation>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(wrap(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: mutation,
                ..CommonResponse::default()
            }),
        })),
        ..ProcessingResponse::default()
    }
}

/// The answer of a request without a body: the headers response carries the pick.
pub(super) fn picked_headers(mutation: HeaderMutation, metadata: Struct) -> ProcessingResponse {
    ProcessingResponse {
        dynamic_metadata: Some(metadata),
        ..headers_response(Resp::RequestHeaders, Some(mutation))
    }
}

/// The answer of a BUFFERED body: one body response carrying the pick, and the body when it
/// was rewritten (with its own length).
pub(super) fn picked_buffered(
    mut mutation: HeaderMutation,
    metadata: Struct,
    rewritten: Option<Vec<u8>>,
) -> ProcessingResponse {
    let body_mutation = rewritten.map(|body| {
        mutation
            .set_headers
            .push(set_header("content-length", &body.len().to_string()));
        BodyMutation {
            mutation: Some(Mutation::Body(body)),
        }
    });
    ProcessingResponse {
        response: Some(Resp::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                header_mutation: Some(mutation),
                body_mutation,
                ..CommonResponse::default()
            }),
        })),
        dynamic_metadata: Some(metadata),
        ..ProcessingResponse::default()
    }
}

/// The answer of a FULL_DUPLEX body: the headers response carrying the pick, then the body
/// back in pieces of at most [`MAX_PIECE`] bytes, `end` (the body's end of stream) on the last
/// one only.
pub(super) fn picked_full_duplex(
    mutation: HeaderMutation,
    metadata: Struct,
    body: Vec<u8>,
    end: bool,
) -> Vec<ProcessingResponse> {
    let mut out = Vec::with_capacity(2 + body.len() / MAX_PIECE);
    out.push(picked_headers(mutation, metadata));
    if body.len() <= MAX_PIECE {
        out.push(body_piece(body, end));
    } else {
        let pieces = body.len().div_ceil(MAX_PIECE);
        for (i, piece) in body.chunks(MAX_PIECE).enumerate() {
            out.push(body_piece(piece.to_vec(), end && i + 1 == pieces));
        }
    }
    out
}

/// One piece of a body streamed back (FULL_DUPLEX).
pub(super) fn streamed_piece(body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
    CommonResponse {
        body_mutation: Some(BodyMutation {
            mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                body,
                end_of_stream,
                ..StreamedBodyResponse::default()
            })),
        }),
        ..CommonResponse::default()
    }
}

fn body_piece(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::RequestBody(BodyResponse {
            response: Some(streamed_piece(body, end_of_stream)),
        })),
        ..ProcessingResponse::default()
    }
}

/// The answer to a response body chunk.
pub(super) fn response_body(response: CommonResponse) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::ResponseBody(BodyResponse {
            response: Some(response),
        })),
        ..ProcessingResponse::default()
    }
}

/// The request trailers, let through.
pub(super) fn request_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::RequestTrailers(TrailersResponse::default())),
        ..ProcessingResponse::default()
    }
}

/// The response trailers, let through.
pub(super) fn response_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::ResponseTrailers(TrailersResponse::default())),
        ..ProcessingResponse::default()
    }
}

//! The stream's state machine driven message by message, without sockets: ProcessingRequest
//! messages in, ProcessingResponse messages and phases out, over a fleet whose load is set by
//! hand. (tests/it/extproc.rs drives the same service over gRPC in front of a simulated fleet.)

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ImmediateResponse, ProcessingRequest,
    ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use fleetpick_config::{BodyMode, FleetConfig};
use fleetpick_core::fleet::{Fleet, FleetCell};
use fleetpick_core::profile::LoadSample;
use fleetpick_core::queue::Outcome;

use super::phase::Phase;
use super::picker::{Picker, Settings};
use super::refusal::Reason;
use super::state::Stream;
use crate::telemetry::Metrics;

const POOL: &str = concat!(
    "clusters: [{name: a}]\npools:\n",
    "  - {name: p, models: [m], target_port: 8000, endpoints: {a: [10.0.0.1, 10.0.0.2]}}\n",
);
const A: &str = "10.0.0.1:8000";
const B: &str = "10.0.0.2:8000";

/// A fleet of two endpoints serving `m`, `extra` YAML appended, every endpoint fresh and idle.
struct Fixture {
    fleet: Arc<Fleet>,
    picker: Picker,
    metrics: Arc<Metrics>,
}

impl Fixture {
    fn new(extra: &str) -> Fixture {
        Fixture::with(extra, 1 << 20, BodyMode::FullDuplex)
    }

    fn with(extra: &str, max_body_bytes: usize, body_mode: BodyMode) -> Fixture {
        let cfg = FleetConfig::parse(&format!("{POOL}{extra}"), "test.yaml").unwrap();
        let fleet = Arc::new(Fleet::new(&cfg));
        let metrics = Arc::new(Metrics::new(&fleet));
        let settings = Settings {
            max_body_bytes,
            body_mode,
        };
        let cell = Arc::new(FleetCell::new(fleet.clone()));
        let f = Fixture {
            picker: Picker::new(cell, settings, metrics.clone()),
            fleet,
            metrics,
        };
        f.load(0.0);
        f
    }

    fn stream(&self) -> Stream {
        Stream::new(self.picker.clone())
    }

    /// Every endpoint reports `kv` KV-cache use now (0.8 and above: saturated).
    fn load(&self, kv: f64) {
        let sample = LoadSample {
            kv_usage: kv,
            ..LoadSample::default()
        };
        for ep in &self.fleet.endpoints {
            ep.load.store(&sample, self.fleet.clock.now_ms());
        }
    }

    fn in_flight(&self, addr: &str) -> u32 {
        let ep = self.fleet.endpoints.iter().find(|e| e.addr_text == addr);
        ep.unwrap().in_flight.load(Ordering::Relaxed)
    }

    fn total_in_flight(&self) -> u32 {
        self.fleet
            .endpoints
            .iter()
            .map(|e| e.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    fn page(&self) -> String {
        self.metrics.render(&self.fleet).unwrap()
    }

    fn queued(&self) -> usize {
        self.fleet.pools[0].queue.as_ref().map_or(0, |q| q.len())
    }
}

fn phase(s: &Stream) -> &'static str {
    match s.phase() {
        Phase::AwaitingHeaders => "awaiting-headers",
        Phase::CollectingBody(_) => "collecting-body",
        Phase::Queued(_) => "queued",
        Phase::AwaitingResponse(_) => "awaiting-response",
        Phase::Streaming(_) => "streaming",
        Phase::Ended(_) => "ended",
        Phase::Closed => "closed",
    }
}

// === Messages in ===

fn hv(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        raw_value: value.as_bytes().to_vec(),
        ..HeaderValue::default()
    }
}

fn header_map(pairs: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: pairs.iter().map(|(k, v)| hv(k, v)).collect(),
    })
}

/// Request headers as Envoy sends them first: the path, the mode announced, `extra` headers.
fn headers(path: &str, end: bool, mode: BodySendMode, extra: &[(&str, &str)]) -> ProcessingRequest {
    let mut pairs = vec![(":path", path), (":method", "POST")];
    pairs.extend_from_slice(extra);
    ProcessingRequest {
        request: Some(Req::RequestHeaders(HttpHeaders {
            headers: header_map(&pairs),
            end_of_stream: end,
            ..HttpHeaders::default()
        })),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode as i32,
            response_body_mode: BodySendMode::FullDuplexStreamed as i32,
            ..ProtocolConfiguration::default()
        }),
        ..ProcessingRequest::default()
    }
}

fn full_duplex(path: &str) -> ProcessingRequest {
    headers(path, false, BodySendMode::FullDuplexStreamed, &[])
}

fn with_subset(mut msg: ProcessingRequest, addrs: &[&str]) -> ProcessingRequest {
    let list = ListValue {
        values: addrs
            .iter()
            .map(|a| Value {
                kind: Some(Kind::StringValue(a.to_string())),
            })
            .collect(),
    };
    let inner = Struct {
        fields: [(
            fleetpick_protocol::headers::SUBSET_KEY.to_string(),
            Value {
                kind: Some(Kind::ListValue(list)),
            },
        )]
        .into(),
    };
    msg.metadata_context = Some(Metadata {
        filter_metadata: [(
            fleetpick_protocol::headers::SUBSET_NAMESPACE.to_string(),
            inner,
        )]
        .into(),
        ..Metadata::default()
    });
    msg
}

fn body(bytes: &[u8], end: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Req::RequestBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream: end,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    }
}

fn trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Req::RequestTrailers(HttpTrailers::default())),
        ..ProcessingRequest::default()
    }
}

/// Response headers; `served`: the endpoint Envoy reports it used.
fn response_headers(status: &str, served: Option<&str>) -> ProcessingRequest {
    let metadata_context = served.map(|addr| Metadata {
        filter_metadata: [(
            fleetpick_protocol::headers::LB_NAMESPACE.to_string(),
            Struct {
                fields: [(
                    fleetpick_protocol::headers::SERVED_KEY.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(addr.to_string())),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Metadata::default()
    });
    ProcessingRequest {
        request: Some(Req::ResponseHeaders(HttpHeaders {
            headers: header_map(&[(":status", status), ("content-type", "application/json")]),
            ..HttpHeaders::default()
        })),
        metadata_context,
        ..ProcessingRequest::default()
    }
}

fn response_body(bytes: &[u8], end: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Req::ResponseBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream: end,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    }
}

fn completion(prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 4}))
        .unwrap()
}

// === Responses out ===

fn common(r: &ProcessingResponse) -> &CommonResponse {
    match &r.response {
        Some(Resp::RequestHeaders(h)) => h.response.as_ref().unwrap(),
        Some(Resp::RequestBody(b)) => b.response.as_ref().unwrap(),
        Some(Resp::ResponseHeaders(h)) => h.response.as_ref().unwrap(),
        Some(Resp::ResponseBody(b)) => b.response.as_ref().unwrap(),
        other => panic!("no common response in {other:?}"),
    }
}

/// The destination a response sets, checked against its `envoy.lb` metadata.
fn destination(r: &ProcessingResponse) -> String {
    let set = &common(r).header_mutation.as_ref().unwrap().set_headers;
    let h = set
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == fleetpick_protocol::headers::DESTINATION_HEADER)
        .unwrap();
    let value = String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap();
    let md = r.dynamic_metadata.as_ref().expect("envoy.lb metadata");
    let Some(Kind::StructValue(lb)) = &md.fields[fleetpick_protocol::headers::LB_NAMESPACE].kind
    else {
        panic!("envoy.lb")
    };
    let Some(Kind::StringValue(d)) =
        &lb.fields[fleetpick_protocol::headers::DESTINATION_HEADER].kind
    else {
        panic!("destination in the metadata")
    };
    assert_eq!(*d, value);
    value
}

fn is_request_headers(r: &ProcessingResponse) -> bool {
    matches!(r.response, Some(Resp::RequestHeaders(_)))
}

/// A streamed piece of a body (the request's or the response's): its bytes and end of stream.
fn piece(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    let Some(BodyMutationOf::Streamed(body, end)) = body_mutation(common(r)) else {
        panic!("a streamed piece: {r:?}")
    };
    (body, end)
}

enum BodyMutationOf {
    Streamed(Vec<u8>, bool),
    Whole(Vec<u8>),
}

fn body_mutation(c: &CommonResponse) -> Option<BodyMutationOf> {
    match c.body_mutation.as_ref()?.mutation.as_ref()? {
        Mutation::StreamedResponse(s) => {
            Some(BodyMutationOf::Streamed(s.body.clone(), s.end_of_stream))
        }
        Mutation::Body(b) => Some(BodyMutationOf::Whole(b.clone())),
        other => panic!("{other:?}"),
    }
}

/// Checks a FULL_DUPLEX answer: the headers response with the destination first, then the
/// body back in pieces of at most 62,000 bytes, `end` on the last only. Returns the
/// destination, the body and the number of pieces.
fn full_duplex_answer(out: &[ProcessingResponse], end: bool) -> (String, Vec<u8>, usize) {
    assert!(is_request_headers(&out[0]), "{:?}", out[0]);
    let dest = destination(&out[0]);
    let mut sent = Vec::new();
    let pieces = &out[1..];
    for (i, r) in pieces.iter().enumerate() {
        let (bytes, eos) = piece(r);
        assert!(bytes.len() <= 62_000, "piece of {} bytes", bytes.len());
        assert_eq!(
            eos,
            end && i + 1 == pieces.len(),
            "end of stream on piece {i}"
        );
        assert!(
            !bytes.is_empty() || eos,
            "an empty piece mid-body breaks Envoy"
        );
        sent.extend_from_slice(&bytes);
    }
    (dest, sent, pieces.len())
}

fn immediate(r: &ProcessingResponse) -> &ImmediateResponse {
    match &r.response {
        Some(Resp::ImmediateResponse(i)) => i,
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

fn immediate_header(i: &ImmediateResponse, name: &str) -> Option<String> {
    let set = &i.headers.as_ref().unwrap().set_headers;
    let h = set
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == name)?;
    Some(String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap())
}

// === The request phase ===

#[test]
fn full_duplex_http1_chunks_then_an_empty_end_of_stream() {
    let f = Fixture::new("");
    let mut s = f.stream();
    assert_eq!(phase(&s), "awaiting-headers");
    assert!(s.handle(full_duplex("/v1/completions")).is_empty());
    assert_eq!(phase(&s), "collecting-body");
    let payload = completion("hello from an HTTP/1.1 client");
    for chunk in payload.chunks(10) {
        assert!(
            s.handle(body(chunk, false)).is_empty(),
            "nothing before the end"
        );
    }
    assert_eq!(phase(&s), "collecting-body");
    let out = s.handle(body(b"", true));
    let (dest, sent, pieces) = full_duplex_answer(&out, true);
    assert_eq!((sent, pieces), (payload, 1));
    assert!(dest == A || dest == B, "{dest}");
    assert_eq!(phase(&s), "awaiting-response");
    assert_eq!(f.in_flight(&dest), 1);

    // The response streams back through; its end ends the request.
    let out = s.handle(response_headers("200", None));
    assert!(matches!(
        out[..],
        [ProcessingResponse {
            response: Some(Resp::ResponseHeaders(_)),
            ..
        }]
    ));
    assert!(
        common(&out[0]).header_mutation.is_none(),
        "nothing to change"
    );
    assert_eq!(phase(&s), "streaming");
    let out = s.handle(response_body(b"{\"choices\":", false));
    assert_eq!(piece(&out[0]), (b"{\"choices\":".to_vec(), false));
    assert_eq!(f.in_flight(&dest), 1, "the response is still coming");
    let out = s.handle(response_body(b"[]}", true));
    assert_eq!(piece(&out[0]), (b"[]}".to_vec(), true));
    assert_eq!(phase(&s), "ended");
    assert_eq!(f.total_in_flight(), 0);
    let counted =
        "fleetpick_requests_total{model=\"m\",objective=\"\",cluster=\"a\",status=\"200\"} 1";
    assert!(f.page().contains(counted), "{}", f.page());
    // Once: the stream's end counts nothing more.
    drop(s);
    assert!(f.page().contains(counted));
    assert_eq!(f.total_in_flight(), 0);
}

#[test]
fn full_duplex_http2_one_chunk_with_end_of_stream() {
    let f = Fixture::new("");
    let mut s = f.stream();
    assert!(s.handle(full_duplex("/v1/completions")).is_empty());
    let payload = completion("short");
    let out = s.handle(body(&payload, true));
    let (_, sent, pieces) = full_duplex_answer(&out, true);
    assert_eq!((sent, pieces), (payload, 1));
    assert_eq!(phase(&s), "awaiting-response");
    // The stream ends before the response (the client left): released all the same.
    drop(s);
    assert_eq!(f.total_in_flight(), 0);
    assert!(f.page().contains(
        "fleetpick_requests_total{model=\"m\",objective=\"\",cluster=\"a\",status=\"0\"} 1"
    ));
}

#[test]
fn the_body_goes_back_in_pieces_of_at_most_62000_bytes_end_of_stream_on_the_last() {
    let f = Fixture::new("");
    let big = completion(&"x".repeat(200_000));
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    for chunk in big.chunks(16_384) {
        assert!(s.handle(body(chunk, false)).is_empty());
    }
    let out = s.handle(body(b"", true));
    let (_, sent, pieces) = full_duplex_answer(&out, true);
    assert!(sent == big, "the body came back changed");
    assert_eq!(pieces, big.len().div_ceil(62_000));
    assert_eq!(out.len(), 1 + pieces);

    // At the boundaries (a body fleetpick does not parse: any endpoint serves it).
    for (len, want) in [(62_000, 1), (62_001, 2), (124_000, 2), (124_001, 3)] {
        let raw = vec![b'x'; len];
        let mut s = f.stream();
        s.handle(full_duplex("/upload"));
        let out = s.handle(body(&raw, true));
        let (_, sent, pieces) = full_duplex_answer(&out, true);
        assert_eq!((sent.len(), pieces), (len, want), "{len}");
    }

    // Ended by trailers (no end of stream on the body): no piece carries it.
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    s.handle(body(&big, false));
    let out = s.handle(trailers());
    let (last, rest) = out.split_last().unwrap();
    assert!(matches!(last.response, Some(Resp::RequestTrailers(_))));
    let (_, sent, pieces) = full_duplex_answer(rest, false);
    assert!(sent == big);
    assert_eq!(pieces, 4);
}

#[test]
fn buffered_lets_the_headers_through_then_the_body_response_carries_the_pick() {
    let f = Fixture::with("", 1 << 20, BodyMode::FullDuplex);
    let mut s = f.stream();
    // The mode Envoy announces wins over the fleet file's.
    let out = s.handle(headers(
        "/v1/chat/completions",
        false,
        BodySendMode::Buffered,
        &[],
    ));
    assert_eq!(out.len(), 1);
    assert!(is_request_headers(&out[0]));
    assert!(
        common(&out[0]).header_mutation.is_none(),
        "no pick before the body"
    );
    assert_eq!(phase(&s), "collecting-body");
    let payload = br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
    let out = s.handle(body(payload, true));
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].response, Some(Resp::RequestBody(_))));
    let dest = destination(&out[0]);
    assert!(
        body_mutation(common(&out[0])).is_none(),
        "BUFFERED leaves the body as it is"
    );
    assert_eq!(f.in_flight(&dest), 1);
    assert_eq!(phase(&s), "awaiting-response");
}

#[test]
fn buffered_rewrite_replaces_the_body_and_its_length() {
    let f = Fixture::with(
        "rewrites: [{model: alias, targets: [{model: m}]}]\n",
        1 << 20,
        BodyMode::Buffered,
    );
    let mut s = f.stream();
    s.handle(headers(
        "/v1/completions",
        false,
        BodySendMode::Buffered,
        &[],
    ));
    let out = s.handle(body(br#"{"model": "alias", "prompt": "x"}"#, true));
    assert_eq!(out.len(), 1);
    destination(&out[0]);
    let c = common(&out[0]);
    let Some(BodyMutationOf::Whole(sent)) = body_mutation(c) else {
        panic!("the rewritten body replaces the buffered one: {c:?}")
    };
    assert_eq!(sent, br#"{"model": "m", "prompt": "x"}"#.to_vec());
    let length = c
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .find_map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key == "content-length").then(|| String::from_utf8(h.raw_value.clone()).unwrap())
        });
    assert_eq!(length, Some(sent.len().to_string()));
}

#[test]
fn buffered_body_then_request_trailers() {
    let f = Fixture::with("", 1 << 20, BodyMode::Buffered);
    let mut s = f.stream();
    s.handle(headers(
        "/v1/completions",
        false,
        BodySendMode::Buffered,
        &[],
    ));
    // With trailers, Envoy sends the buffered body without end of stream: answered anyway.
    let out = s.handle(body(&completion("x"), false));
    assert_eq!(out.len(), 1);
    destination(&out[0]);
    let out = s.handle(trailers());
    assert!(matches!(
        out[..],
        [ProcessingResponse {
            response: Some(Resp::RequestTrailers(_)),
            ..
        }]
    ));
    assert_eq!(phase(&s), "awaiting-response");
}

#[test]
fn full_duplex_request_trailers_end_the_body() {
    let f = Fixture::new("");
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    let payload = completion("x");
    assert!(s.handle(body(&payload, false)).is_empty());
    let out = s.handle(trailers());
    let (last, rest) = out.split_last().unwrap();
    assert!(matches!(last.response, Some(Resp::RequestTrailers(_))));
    let (_, sent, pieces) = full_duplex_answer(rest, false);
    assert_eq!((sent, pieces), (payload, 1));
    assert_eq!(phase(&s), "awaiting-response");
}

#[test]
fn a_request_without_a_body_is_picked_from_its_headers() {
    let f = Fixture::new("");
    let mut s = f.stream();
    let out = s.handle(headers(
        "/v1/models",
        true,
        BodySendMode::FullDuplexStreamed,
        &[],
    ));
    assert_eq!(out.len(), 1);
    assert!(is_request_headers(&out[0]));
    let dest = destination(&out[0]);
    assert_eq!(f.in_flight(&dest), 1);
    assert_eq!(phase(&s), "awaiting-response");
}

#[test]
fn a_retry_that_served_another_endpoint_moves_the_in_flight_count() {
    let f = Fixture::new("scheduler: {fallbacks: 1}\n");
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    let out = s.handle(body(&completion("x"), true));
    let dest = destination(&out[0]);
    let (primary, fallback) = dest.split_once(',').unwrap();
    assert_eq!((f.in_flight(primary), f.in_flight(fallback)), (1, 0));
    // Envoy reports that the fallback served it (the primary failed, the retry moved on).
    s.handle(response_headers("200", Some(fallback)));
    assert_eq!((f.in_flight(primary), f.in_flight(fallback)), (0, 1));
    assert_eq!(phase(&s), "streaming");
    // Naming the endpoint it already counts on changes nothing.
    s.handle(response_headers("200", Some(fallback)));
    assert_eq!((f.in_flight(primary), f.in_flight(fallback)), (0, 1));
    drop(s);
    assert_eq!(f.total_in_flight(), 0);
}

#[test]
fn an_error_status_upstream_is_counted_as_the_request_ends() {
    let f = Fixture::new("");
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    s.handle(body(&completion("x"), true));
    s.handle(response_headers("503", None));
    let out = s.handle(ProcessingRequest {
        request: Some(Req::ResponseTrailers(HttpTrailers::default())),
        ..ProcessingRequest::default()
    });
    assert!(matches!(
        out[..],
        [ProcessingResponse {
            response: Some(Resp::ResponseTrailers(_)),
            ..
        }]
    ));
    assert_eq!(phase(&s), "ended");
    assert_eq!(f.total_in_flight(), 0);
    let page = f.page();
    assert!(
        page.contains(
            "fleetpick_requests_total{model=\"m\",objective=\"\",cluster=\"a\",status=\"503\"} 1"
        ),
        "{page}"
    );
    assert!(page.contains("error_code=\"503\"} 1"), "{page}");
}

// === Flow control ===

const FLOW: &str = "flow_control: {enabled: true}\n";

#[tokio::test]
async fn a_queued_request_is_answered_after_its_release_trailers_last() {
    let f = Fixture::new(FLOW);
    f.load(0.99);
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    let payload = completion("x");
    assert!(s.handle(body(&payload, false)).is_empty());
    // The trailers end the body; the pool has no room: held, nothing sent yet.
    assert!(s.handle(trailers()).is_empty());
    assert_eq!(phase(&s), "queued");
    assert_eq!(f.queued(), 1);
    assert_eq!(f.total_in_flight(), 0);
    assert!(f.fleet.pools[0].queue.as_ref().unwrap().release_next());
    let outcome = s.ticket().unwrap().wait().await;
    assert_eq!(outcome, Outcome::Released);
    // Released: picked even though the pool is still saturated; the headers response, the
    // body back, then the trailers.
    let out = s.resume(outcome);
    let (last, rest) = out.split_last().unwrap();
    assert!(
        matches!(last.response, Some(Resp::RequestTrailers(_))),
        "{last:?}"
    );
    let (dest, sent, _) = full_duplex_answer(rest, false);
    assert_eq!(sent, payload);
    assert_eq!(f.in_flight(&dest), 1);
    assert_eq!(phase(&s), "awaiting-response");
    assert_eq!(f.fleet.pools[0].queue.as_ref().unwrap().in_transit(), 0);
    let page = f.page();
    for outcome in ["queued", "released"] {
        let line = format!(
            "fleetpick_flow_requests_total{{pool=\"p\",priority=\"0\",outcome=\"{outcome}\"}} 1"
        );
        assert!(page.contains(&line), "{line}\n{page}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_is_counted_and_takes_no_slot() {
    let f = Fixture::new(FLOW);
    f.load(0.99);
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    s.handle(body(&completion("x"), true));
    assert_eq!(phase(&s), "queued");
    // A message while it waits is held for after the release.
    assert!(s.handle(trailers()).is_empty());
    s.cancel();
    assert_eq!(phase(&s), "closed");
    assert!(s.ticket().is_none());
    assert_eq!(f.queued(), 0);
    assert_eq!(f.total_in_flight(), 0);
    let page = f.page();
    assert!(page.contains("outcome=\"cancelled\"} 1"), "{page}");
    assert!(
        page.contains(
            "fleetpick_requests_total{model=\"m\",objective=\"\",cluster=\"\",status=\"0\"} 1"
        ),
        "{page}"
    );
}

// === Every refusal in the table ===

/// A refusal as the client sees it.
struct Seen {
    status: i32,
    label: String,
    retry_after: bool,
    kind: String,
    message: String,
    param: serde_json::Value,
    details: String,
}

/// Reads the one immediate response in `out`, checks the stream closed, and the metrics that
/// count the refusal.
fn refused(f: &Fixture, s: &Stream, out: &[ProcessingResponse]) -> Seen {
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(phase(s), "closed");
    let i = immediate(&out[0]);
    assert_eq!(
        immediate_header(i, "content-type").as_deref(),
        Some("application/json")
    );
    let json: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    let status = i.status.unwrap().code;
    assert_eq!(json["error"]["code"], status);
    let seen = Seen {
        status,
        label: immediate_header(i, fleetpick_protocol::headers::REASON_HEADER).unwrap(),
        retry_after: match immediate_header(i, "retry-after") {
            Some(v) => v == "1",
            None => false,
        },
        kind: json["error"]["type"].as_str().unwrap().to_string(),
        message: json["error"]["message"].as_str().unwrap().to_string(),
        param: json["error"]["param"].clone(),
        details: i.details.clone(),
    };
    let page = f.page();
    let refusals = format!("fleetpick_refusals_total{{reason=\"{}\"}} 1", seen.label);
    assert!(page.contains(&refusals), "{refusals}\n{page}");
    let total = format!("cluster=\"\",status=\"{status}\"}} 1");
    assert!(
        page.lines()
            .any(|l| l.starts_with("fleetpick_requests_total") && l.ends_with(&total)),
        "{total}\n{page}"
    );
    seen
}

/// Sends a completions request (`payload`, `extra` headers) whole, FULL_DUPLEX.
fn send(f: &Fixture, extra: &[(&str, &str)], payload: &[u8]) -> (Stream, Vec<ProcessingResponse>) {
    let mut s = f.stream();
    s.handle(headers(
        "/v1/completions",
        false,
        BodySendMode::FullDuplexStreamed,
        extra,
    ));
    let out = s.handle(body(payload, true));
    (s, out)
}

fn bad_body() -> Seen {
    let f = Fixture::new("");
    let (s, out) = send(&f, &[], b"{not json");
    refused(&f, &s, &out)
}

fn no_body() -> Seen {
    let f = Fixture::new("");
    let mut s = f.stream();
    let out = s.handle(headers(
        "/v1/chat/completions",
        true,
        BodySendMode::FullDuplexStreamed,
        &[],
    ));
    refused(&f, &s, &out)
}

fn rewrite_ambiguous() -> Seen {
    let f = Fixture::new("rewrites: [{model: alias, targets: [{model: m}]}]\n");
    // The parse takes the last `model`; a rewrite cannot tell which one to replace.
    let (s, out) = send(
        &f,
        &[],
        br#"{"model": "m", "model": "alias", "prompt": "x"}"#,
    );
    refused(&f, &s, &out)
}

fn unknown_model() -> Seen {
    let f = Fixture::new("");
    let (s, out) = send(&f, &[], br#"{"model": "nope", "prompt": "x"}"#);
    refused(&f, &s, &out)
}

fn too_large() -> Seen {
    let f = Fixture::with("", 100, BodyMode::FullDuplex);
    let mut s = f.stream();
    s.handle(full_duplex("/v1/completions"));
    assert!(s.handle(body(&[b' '; 60], false)).is_empty());
    // Refused as soon as the limit is passed, before the body's end.
    let out = s.handle(body(&[b' '; 60], false));
    refused(&f, &s, &out)
}

fn shed() -> Seen {
    let f = Fixture::new("objectives: [{name: batch, pool: p, priority: -1}]\n");
    f.load(0.99);
    let (s, out) = send(
        &f,
        &[(fleetpick_protocol::headers::OBJECTIVE_HEADER, "batch")],
        &completion("x"),
    );
    let seen = refused(&f, &s, &out);
    assert!(f.page().contains("priority=\"-1\",outcome=\"shed\"} 1"));
    seen
}

fn queue_full() -> Seen {
    let f = Fixture::new("flow_control: {enabled: true, max_requests_per_band: 1}\n");
    f.load(0.99);
    let (first, out) = send(&f, &[], &completion("x"));
    assert!(out.is_empty());
    assert_eq!(phase(&first), "queued");
    let (s, out) = send(&f, &[], &completion("y"));
    let seen = refused(&f, &s, &out);
    assert!(f.page().contains("outcome=\"full\"} 1"));
    assert_eq!(f.queued(), 1, "the first one still waits");
    seen
}

fn at_capacity() -> Seen {
    let f = Fixture::new(
        "imports: [{pool: p, policy: {balancing: in-flight, max_in_flight_per_endpoint: 1}}]\n",
    );
    let held: Vec<_> = (0..2).map(|_| send(&f, &[], &completion("x"))).collect();
    assert_eq!((f.in_flight(A), f.in_flight(B)), (1, 1));
    let (s, out) = send(&f, &[], &completion("x"));
    let seen = refused(&f, &s, &out);
    assert_eq!(f.total_in_flight(), 2, "the cap was not passed");
    drop(held);
    seen
}

fn no_eligible_endpoint() -> Seen {
    let f = Fixture::new("");
    let mut s = f.stream();
    s.handle(with_subset(
        full_duplex("/v1/completions"),
        &["10.9.9.9:8000"],
    ));
    let out = s.handle(body(&completion("x"), true));
    refused(&f, &s, &out)
}

fn queue_timeout() -> Seen {
    let f = Fixture::new(FLOW);
    f.load(0.99);
    let (mut s, out) = send(&f, &[], &completion("x"));
    assert!(out.is_empty());
    let out = s.resume(Outcome::Expired);
    let seen = refused(&f, &s, &out);
    assert!(f.page().contains("outcome=\"expired\"} 1"));
    assert_eq!(f.queued(), 0);
    seen
}

/// What a refusal must look like.
struct Want {
    status: i32,
    kind: &'static str,
    label: &'static str,
    retry_after: bool,
    /// A part of the message.
    message: &'static str,
    /// The field at fault, if one is.
    param: Option<&'static str>,
}

const fn want(
    (status, kind, label, retry_after): (i32, &'static str, &'static str, bool),
    message: &'static str,
    param: Option<&'static str>,
) -> Want {
    Want {
        status,
        kind,
        label,
        retry_after,
        message,
        param,
    }
}

const BAD: (i32, &str, &str, bool) = (400, "invalid_request_error", "bad-request", false);
const RATE: &str = "rate_limit_exceeded";
const UNAVAILABLE: &str = "service_unavailable";

/// The refusals of requests fleetpick cannot serve as they are: 400, 404, 413.
fn request_refusals() -> Vec<(Seen, Want)> {
    vec![
        (bad_body(), want(BAD, "not valid JSON", None)),
        (no_body(), want(BAD, "the request has no body", None)),
        (
            rewrite_ambiguous(),
            want(BAD, "`model` must appear once in the body", Some("model")),
        ),
        (
            unknown_model(),
            want(
                (404, "not_found_error", "unknown-model", false),
                "the model `nope` does not exist",
                Some("model"),
            ),
        ),
        (
            too_large(),
            want(
                (413, "invalid_request_error", "body-too-large", false),
                "request body exceeds 100 bytes",
                None,
            ),
        ),
    ]
}

/// The refusals for want of capacity: 429, 503. (Tickets need the runtime.)
fn capacity_refusals() -> Vec<(Seen, Want)> {
    vec![
        (
            shed(),
            want(
                (429, RATE, "sheddable-saturated", true),
                "sheddable (priority below 0)",
                None,
            ),
        ),
        (
            queue_full(),
            want(
                (429, RATE, "queue-full", true),
                "the queue for priority 0 is full",
                None,
            ),
        ),
        (
            at_capacity(),
            want(
                (429, RATE, "at-capacity", true),
                "max_in_flight_per_endpoint",
                None,
            ),
        ),
        (
            no_eligible_endpoint(),
            want(
                (503, UNAVAILABLE, "no-eligible-endpoint", true),
                "none of the pool's endpoints is in the proxy's subset hint",
                None,
            ),
        ),
        (
            queue_timeout(),
            want(
                (503, UNAVAILABLE, "queue-timeout", true),
                "while this request waited",
                None,
            ),
        ),
    ]
}

#[tokio::test]
async fn every_refusal_in_the_table_as_the_client_and_the_metrics_see_it() {
    let mut cases = request_refusals();
    cases.extend(capacity_refusals());
    for (seen, want) in &cases {
        let name = want.message;
        assert_eq!(
            (seen.status, seen.kind.as_str(), seen.label.as_str()),
            (want.status, want.kind, want.label),
            "{name}"
        );
        assert_eq!(seen.retry_after, want.retry_after, "{name}");
        assert!(seen.message.contains(want.message), "{}", seen.message);
        let param = want.param.map_or(serde_json::Value::Null, Into::into);
        assert_eq!(seen.param, param, "{name}");
        let details = format!("fleetpick_{}", want.label.replace('-', "_"));
        assert_eq!(seen.details, details, "{name}");
        // The table says the same.
        let row = Reason::ALL.map(Reason::row);
        let row = row.iter().find(|r| r.label == want.label).unwrap();
        assert_eq!(
            (i32::from(row.status), row.kind, row.retry_after),
            (want.status, want.kind, want.retry_after)
        );
    }
    // Every reason of the table was seen.
    let seen: BTreeSet<&str> = cases.iter().map(|c| c.0.label.as_str()).collect();
    let table: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.row().label).collect();
    assert_eq!(seen, table);
}

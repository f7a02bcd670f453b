//! The ext_proc service driven over gRPC the way Envoy drives it, in front of a real simulated
//! fleet (real sockets, real HTTP scrapes): the HTTP/1.1 and HTTP/2 body shapes, BUFFERED, a
//! 1 MB body, the subset hint, every error status, and streams that end early.

use fleetpick_tests as common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::wait_for;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use fleetpick_config::FleetConfig;
use fleetpick_core::fleet::Fleet;
use fleetpick_sim::FleetOptions;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const MODEL: &str = common::MODEL;

struct Harness {
    sim: fleetpick_sim::Fleet,
    fleet: Arc<Fleet>,
    client: ExternalProcessorClient<Channel>,
    channel: Channel,
    /// Stops fleetpick when dropped (last: after the client).
    _picker: fleetpick::InProcess,
}

impl Harness {
    /// A simulated fleet of `n` servers, fleetpick serving it; waits until every endpoint has
    /// been scraped.
    async fn start(n: usize, extra_yaml: &str) -> Harness {
        let sim = fleetpick_sim::Fleet::launch(FleetOptions {
            servers: n,
            time_scale: 20.0,
            ..FleetOptions::default()
        })
        .await
        .unwrap();
        let yaml = common::fleet_yaml(
            &sim.entries(None),
            &format!("poller: {{interval_ms: 20, stale_after_ms: 2000}}\n{extra_yaml}"),
        );
        let cfg = FleetConfig::parse(&yaml, "test.yaml").unwrap();
        let picker = fleetpick::InProcess::start(cfg).unwrap();
        let (addr, fleet) = (picker.addr, picker.fleet.clone());
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = ExternalProcessorClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let f = fleet.clone();
        wait_for("every endpoint scraped", Duration::from_secs(20), || {
            let f = f.clone();
            async move { (f.eligible_count() == n).then_some(()) }
        })
        .await;
        Harness {
            sim,
            fleet,
            client,
            channel,
            _picker: picker,
        }
    }

    fn addresses(&self) -> Vec<String> {
        self.sim
            .entries(None)
            .into_iter()
            .map(|e| e.address)
            .collect()
    }

    fn in_flight(&self) -> u32 {
        self.fleet
            .endpoints
            .iter()
            .map(|e| e.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Opens a stream and sends a whole request: headers (FULL_DUPLEX), then `payload` in one
    /// end-of-stream chunk, as an HTTP/2 client's request arrives.
    async fn request(
        &self,
        path: &str,
        subset: Option<Vec<&str>>,
        payload: &[u8],
    ) -> (
        mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    ) {
        let (tx, rx) = self.open().await;
        tx.send(headers(
            path,
            false,
            BodySendMode::FullDuplexStreamed,
            subset,
        ))
        .await
        .unwrap();
        tx.send(body(payload, true)).await.unwrap();
        (tx, rx)
    }

    /// Opens a BUFFERED stream the way Envoy does: the request headers go first and are
    /// answered (let through) before Envoy sends the body.
    async fn open_buffered(
        &self,
        path: &str,
    ) -> (
        mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    ) {
        let (tx, mut rx) = self.open().await;
        tx.send(headers(path, false, BodySendMode::Buffered, None))
            .await
            .unwrap();
        let first = next(&mut rx).await;
        let Some(Resp::RequestHeaders(hr)) = first.response else {
            panic!("BUFFERED: the headers are answered before the body is sent")
        };
        assert!(
            hr.response.unwrap_or_default().header_mutation.is_none(),
            "no pick before the body"
        );
        (tx, rx)
    }

    /// Opens a stream; returns the sender of requests and the stream of responses.
    /// A stream whose request headers (for `path`, a body to follow, full duplex) are sent.
    async fn open_full_duplex(
        &self,
        path: &str,
    ) -> (
        mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    ) {
        let (tx, rx) = self.open().await;
        tx.send(headers(path, false, BodySendMode::FullDuplexStreamed, None))
            .await
            .unwrap();
        (tx, rx)
    }

    async fn open(
        &self,
    ) -> (
        mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let responses = self
            .client
            .clone()
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, responses)
    }
}

/// One header, as Envoy sends it (raw bytes).
fn hv(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        raw_value: value.as_bytes().to_vec(),
        ..HeaderValue::default()
    }
}

fn headers(
    path: &str,
    end_of_stream: bool,
    mode: BodySendMode,
    subset: Option<Vec<&str>>,
) -> ProcessingRequest {
    let metadata_context = subset.map(|addrs| {
        let list = ListValue {
            values: addrs
                .into_iter()
                .map(|a| Value {
                    kind: Some(Kind::StringValue(a.to_string())),
                })
                .collect(),
        };
        let inner = Struct {
            fields: [(
                "x-gateway-destination-endpoint-subset".to_string(),
                Value {
                    kind: Some(Kind::ListValue(list)),
                },
            )]
            .into(),
        };
        Metadata {
            filter_metadata: [("envoy.lb.subset_hint".to_string(), inner)].into(),
            ..Metadata::default()
        }
    });
    ProcessingRequest {
        request: Some(Req::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    hv(":path", path),
                    hv(":method", "POST"),
                    hv("x-gateway-destination-endpoint", "6.6.6.6:1"),
                ],
            }),
            end_of_stream,
            ..HttpHeaders::default()
        })),
        metadata_context,
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode as i32,
            ..ProtocolConfiguration::default()
        }),
        ..ProcessingRequest::default()
    }
}

fn body(bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    body_message(Req::RequestBody, bytes, end_of_stream)
}

/// A request or response body piece (`wrap` says which).
fn body_message(wrap: fn(HttpBody) -> Req, bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(wrap(HttpBody {
            body: bytes.to_vec(),
            end_of_stream,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    }
}

fn completion(prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 4})).unwrap()
}

/// The destination set by a common response, checking it overwrites.
fn destination(common: &CommonResponse) -> String {
    let set = &common
        .header_mutation
        .as_ref()
        .expect("header mutation")
        .set_headers;
    let h = set
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == "x-gateway-destination-endpoint")
        .unwrap();
    assert_eq!(
        h.append_action,
        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap()
}

fn metadata_destination(r: &ProcessingResponse) -> String {
    let md = r.dynamic_metadata.as_ref().expect("dynamic metadata");
    let Some(Kind::StructValue(lb)) = &md.fields["envoy.lb"].kind else {
        panic!("envoy.lb")
    };
    let Some(Kind::StringValue(d)) = &lb.fields["x-gateway-destination-endpoint"].kind else {
        panic!("key")
    };
    d.clone()
}

async fn next(responses: &mut tonic::Streaming<ProcessingResponse>) -> ProcessingResponse {
    tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .expect("a response in time")
        .unwrap()
        .expect("stream open")
}

/// Reads the headers response and the streamed body back; returns (destination, body, pieces).
async fn read_full_duplex(
    responses: &mut tonic::Streaming<ProcessingResponse>,
) -> (String, Vec<u8>, usize) {
    let first = next(responses).await;
    let dest = match &first.response {
        Some(Resp::RequestHeaders(h)) => destination(h.response.as_ref().unwrap()),
        other => panic!("expected the headers response first, got {other:?}"),
    };
    assert_eq!(metadata_destination(&first), dest);
    let mut out = Vec::new();
    let mut pieces = 0;
    loop {
        let r = next(responses).await;
        let Some(Resp::RequestBody(b)) = r.response else {
            panic!("expected a body piece")
        };
        let Some(Mutation::StreamedResponse(s)) =
            b.response.unwrap().body_mutation.unwrap().mutation
        else {
            panic!("expected a streamed response")
        };
        assert!(s.body.len() <= 62_000, "piece of {} bytes", s.body.len());
        assert!(
            !s.body.is_empty() || s.end_of_stream,
            "an empty piece mid-body breaks Envoy"
        );
        pieces += 1;
        out.extend_from_slice(&s.body);
        if s.end_of_stream {
            return (dest, out, pieces);
        }
    }
}

/// The immediate response's status, reason header and parsed body.
async fn read_immediate(
    responses: &mut tonic::Streaming<ProcessingResponse>,
) -> (i32, String, serde_json::Value) {
    let r = next(responses).await;
    let Some(Resp::ImmediateResponse(i)) = r.response else {
        panic!("expected an immediate response, got {r:?}")
    };
    let headers = i.headers.unwrap().set_headers;
    let reason = headers
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == "x-fleetpick-reason")
        .map(|h| String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap())
        .unwrap();
    (
        i.status.unwrap().code,
        reason,
        serde_json::from_slice(&i.body).unwrap(),
    )
}

#[tokio::test]
async fn http1_shape_chunks_then_empty_end_of_stream() {
    let h = Harness::start(3, "").await;
    let (tx, mut rx) = h.open().await;
    let payload = completion("hello from an HTTP/1.1 client");
    tx.send(headers(
        "/v1/completions",
        false,
        BodySendMode::FullDuplexStreamed,
        None,
    ))
    .await
    .unwrap();
    for chunk in payload.chunks(10) {
        tx.send(body(chunk, false)).await.unwrap();
    }
    tx.send(body(b"", true)).await.unwrap();
    let (dest, echoed, _) = read_full_duplex(&mut rx).await;
    assert_eq!(echoed, payload);
    assert!(h.addresses().contains(&dest), "{dest}");
    assert_eq!(h.in_flight(), 1);
    drop(tx);
    drop(rx);
    wait_for(
        "the in-flight count released",
        Duration::from_secs(10),
        || async { (h.in_flight() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn http2_shape_one_chunk_and_a_1mb_body_byte_identical() {
    let h = Harness::start(2, "").await;
    let (tx, mut rx) = h.open().await;
    let payload = completion("short");
    tx.send(headers(
        "/v1/completions",
        false,
        BodySendMode::FullDuplexStreamed,
        None,
    ))
    .await
    .unwrap();
    tx.send(body(&payload, true)).await.unwrap();
    let (_, echoed, pieces) = read_full_duplex(&mut rx).await;
    assert_eq!((echoed, pieces), (payload, 1));

    let big = serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": fleetpick_loadgen::filler_text(9, 1_048_576)}, {"role": "user", "content": [{"type": "text", "text": "q"}]}],
    }))
    .unwrap();
    let (tx, mut rx) = h.open_full_duplex("/v1/chat/completions").await;
    for chunk in big.chunks(16_384) {
        tx.send(body(chunk, false)).await.unwrap();
    }
    tx.send(body(b"", true)).await.unwrap();
    let (_, echoed, pieces) = read_full_duplex(&mut rx).await;
    assert!(echoed == big, "the body came back changed");
    assert_eq!(pieces, big.len().div_ceil(62_000));
}

#[tokio::test]
async fn buffered_mode_answers_headers_then_body_with_the_mutation() {
    let h = Harness::start(2, "").await;
    // The helper checks that the headers are answered first, without a pick.
    let (tx, mut rx) = h.open_buffered("/v1/chat/completions").await;
    let payload = serde_json::to_vec(
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    tx.send(body(&payload, true)).await.unwrap();
    let r = next(&mut rx).await;
    let dest = metadata_destination(&r);
    let Some(Resp::RequestBody(b)) = r.response else {
        panic!("body response")
    };
    let common = b.response.unwrap();
    assert_eq!(destination(&common), dest);
    assert!(
        common.body_mutation.is_none(),
        "BUFFERED leaves the body as it is"
    );
    assert!(h.addresses().contains(&dest));
}

#[tokio::test]
async fn subset_hint_is_honoured() {
    let h = Harness::start(3, "").await;
    let addrs = h.addresses();
    for _ in 0..10 {
        let (_tx, mut rx) = h
            .request(
                "/v1/completions",
                Some(vec![addrs[2].as_str()]),
                &completion("x"),
            )
            .await;
        let (dest, _, _) = read_full_duplex(&mut rx).await;
        assert_eq!(dest, addrs[2]);
    }
    for subset in [vec![], vec!["10.99.0.1:8000"]] {
        let (_tx, mut rx) = h
            .request("/v1/completions", Some(subset), &completion("x"))
            .await;
        let (status, reason, err) = read_immediate(&mut rx).await;
        assert_eq!((status, reason.as_str()), (503, "no-eligible-endpoint"));
        assert_eq!(err["error"]["code"], 503);
    }
}

#[tokio::test]
async fn fallbacks_make_an_ordered_list_of_distinct_endpoints() {
    let h = Harness::start(4, "scheduler: {fallbacks: 2}\n").await;
    let (_tx, mut rx) = h.request("/v1/completions", None, &completion("x")).await;
    let (dest, _, _) = read_full_duplex(&mut rx).await;
    let list: Vec<&str> = dest.split(',').collect();
    assert_eq!(list.len(), 3, "{dest}");
    let distinct: std::collections::HashSet<&&str> = list.iter().collect();
    assert_eq!(distinct.len(), 3);
    assert!(list.iter().all(|a| h.addresses().iter().any(|x| x == a)));
}

#[tokio::test]
async fn every_error_status_in_the_openai_shape() {
    let h = Harness::start(2, "server: {max_body_bytes: 2000}\n").await;
    let cases: Vec<(&str, Vec<u8>, i32, &str)> = vec![
        ("/v1/completions", b"{not json".to_vec(), 400, "bad-request"),
        (
            "/v1/completions",
            br#"{"prompt":"x"}"#.to_vec(),
            400,
            "bad-request",
        ),
        (
            "/v1/completions",
            br#"{"model":"nope","prompt":"x"}"#.to_vec(),
            404,
            "unknown-model",
        ),
        (
            "/v1/embeddings",
            br#"{"model":"m","input":7}"#.to_vec(),
            400,
            "bad-request",
        ),
    ];
    for (path, payload, status, why) in cases {
        let (tx, mut rx) = h.open().await;
        tx.send(headers(path, false, BodySendMode::FullDuplexStreamed, None))
            .await
            .unwrap();
        tx.send(body(&payload, true)).await.unwrap();
        let (got, reason, err) = read_immediate(&mut rx).await;
        assert_eq!(
            (got, reason.as_str()),
            (status, why),
            "{path} {}",
            String::from_utf8_lossy(&payload)
        );
        assert_eq!(err["error"]["code"], status);
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Too large: refused as soon as the limit is passed, before the end of the body.
    let (tx, mut rx) = h.open_full_duplex("/v1/completions").await;
    tx.send(body(&[b' '; 1500], false)).await.unwrap();
    tx.send(body(&[b' '; 1500], false)).await.unwrap();
    let (status, reason, _) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (413, "body-too-large"));

    // No eligible endpoint: every server down.
    h.sim.shutdown().await;
    let f = h.fleet.clone();
    wait_for("every endpoint ineligible", Duration::from_secs(20), || {
        let f = f.clone();
        async move { (f.eligible_count() == 0).then_some(()) }
    })
    .await;
    let (_tx, mut rx) = h.request("/v1/completions", None, &completion("x")).await;
    let (status, reason, _) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (503, "no-eligible-endpoint"));
    assert_eq!(h.in_flight(), 0);
}

#[tokio::test]
async fn streams_that_end_early_leak_nothing() {
    let h = Harness::start(2, "").await;
    // Dropped mid-body: nothing was picked, nothing to release.
    let (tx, rx) = h.open().await;
    tx.send(headers(
        "/v1/completions",
        false,
        BodySendMode::FullDuplexStreamed,
        None,
    ))
    .await
    .unwrap();
    tx.send(body(b"{\"model\":", false)).await.unwrap();
    drop(tx);
    drop(rx);
    // Picked, then reset by the proxy (client gone) before any response: released once.
    let mut open = Vec::new();
    for _ in 0..5 {
        let (tx, mut rx) = h.request("/v1/completions", None, &completion("x")).await;
        read_full_duplex(&mut rx).await;
        open.push((tx, rx));
    }
    assert_eq!(h.in_flight(), 5);
    // Normal end for one: response headers, then the proxy closes its side.
    let (tx, mut rx) = open.pop().unwrap();
    let mut resp = headers("/", false, BodySendMode::FullDuplexStreamed, None);
    if let Some(Req::RequestHeaders(hh)) = &mut resp.request {
        hh.headers.as_mut().unwrap().headers = vec![hv(":status", "200")];
        resp.request = Some(Req::ResponseHeaders(hh.clone()));
    }
    tx.send(resp).await.unwrap();
    let r = next(&mut rx).await;
    assert!(matches!(r.response, Some(Resp::ResponseHeaders(_))));
    assert_eq!(
        h.in_flight(),
        5,
        "response headers are not the end of the response"
    );
    // The response body's end releases it, while the stream is still open.
    let mut last = body(b"data: [DONE]\n\n", true);
    if let Some(Req::RequestBody(b)) = last.request.take() {
        last.request = Some(Req::ResponseBody(b));
    }
    tx.send(last).await.unwrap();
    let r = next(&mut rx).await;
    assert!(matches!(r.response, Some(Resp::ResponseBody(_))));
    let _still_open = tx;
    wait_for("one released", Duration::from_secs(10), || async {
        (h.in_flight() == 4).then_some(())
    })
    .await;
    drop(rx);
    // The rest vanish at once, as when Envoy itself goes away.
    drop(open);
    wait_for("all released", Duration::from_secs(10), || async {
        (h.in_flight() == 0).then_some(())
    })
    .await;
    // And the counts never went below zero (they are unsigned: a double release would wrap).
    assert!(
        h.fleet
            .endpoints
            .iter()
            .all(|e| e.in_flight.load(Ordering::Relaxed) == 0)
    );
}

#[tokio::test]
async fn requests_without_a_body_are_routed_by_load() {
    let h = Harness::start(2, "").await;
    let (tx, mut rx) = h.open().await;
    tx.send(headers(
        "/v1/models",
        true,
        BodySendMode::FullDuplexStreamed,
        None,
    ))
    .await
    .unwrap();
    let r = next(&mut rx).await;
    let dest = metadata_destination(&r);
    let Some(Resp::RequestHeaders(hr)) = r.response else {
        panic!("headers response")
    };
    assert_eq!(destination(hr.response.as_ref().unwrap()), dest);
    assert!(h.addresses().contains(&dest));
}

#[tokio::test]
async fn grpc_health_follows_eligibility() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let h = Harness::start(1, "").await;
    let mut health = HealthClient::new(h.channel.clone());
    let status = |mut health: HealthClient<Channel>| async move {
        let req = HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        };
        health.check(req).await.ok().map(|r| r.into_inner().status)
    };
    wait_for(
        "SERVING once an endpoint is eligible",
        Duration::from_secs(10),
        || {
            let health = health.clone();
            async move { (status(health).await? == ServingStatus::Serving as i32).then_some(()) }
        },
    )
    .await;
    h.sim.shutdown().await;
    wait_for("NOT_SERVING once none is", Duration::from_secs(20), || {
        let health = health.clone();
        async move { (status(health).await? == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    // The overall status follows too.
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(overall, ServingStatus::NotServing as i32);
}

fn trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Req::RequestTrailers(
            envoy_types::pb::envoy::service::ext_proc::v3::HttpTrailers::default(),
        )),
        ..ProcessingRequest::default()
    }
}

#[tokio::test]
async fn buffered_body_followed_by_trailers_is_answered() {
    // With trailers, Envoy sends the buffered body WITHOUT end of stream, then the trailers.
    let h = Harness::start(2, "").await;
    let (tx, mut rx) = h.open_buffered("/v1/completions").await;
    tx.send(body(&completion("x"), false)).await.unwrap();
    let r = next(&mut rx).await;
    let dest = metadata_destination(&r);
    assert!(h.addresses().contains(&dest));
    tx.send(trailers()).await.unwrap();
    assert!(matches!(
        next(&mut rx).await.response,
        Some(Resp::RequestTrailers(_))
    ));
}

#[tokio::test]
async fn buffered_body_over_the_limit_gets_413_not_a_broken_stream() {
    let h = Harness::start(1, "server: {max_body_bytes: 2000}\n").await;
    let (tx, mut rx) = h.open_buffered("/v1/completions").await;
    tx.send(body(&vec![b' '; 100_000], true)).await.unwrap();
    let (status, reason, _) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (413, "body-too-large"));
}

#[tokio::test]
async fn an_inference_path_without_a_body_is_refused() {
    let h = Harness::start(1, "").await;
    let (_tx, mut rx) = h.open().await;
    _tx.send(headers(
        "/v1/chat/completions",
        true,
        BodySendMode::FullDuplexStreamed,
        None,
    ))
    .await
    .unwrap();
    let (status, reason, err) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (400, "bad-request"));
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no body")
    );
}

#[tokio::test]
async fn in_flight_moves_to_the_endpoint_a_retry_served() {
    let h = Harness::start(2, "scheduler: {fallbacks: 1}\n").await;
    let (tx, mut rx) = h.request("/v1/completions", None, &completion("x")).await;
    let (dest, _, _) = read_full_duplex(&mut rx).await;
    let list: Vec<&str> = dest.split(',').collect();
    let count = |addr: &str| {
        h.fleet
            .endpoints
            .iter()
            .find(|e| e.addr_text == addr)
            .unwrap()
            .in_flight
            .load(Ordering::Relaxed)
    };
    assert_eq!((count(list[0]), count(list[1])), (1, 0));
    // Envoy reports that the fallback served it (the primary failed and the retry moved on).
    let served = Struct {
        fields: [(
            "x-gateway-destination-endpoint-served".to_string(),
            Value {
                kind: Some(Kind::StringValue(list[1].to_string())),
            },
        )]
        .into(),
    };
    let mut msg = response_headers("application/json");
    msg.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.lb".to_string(), served)].into(),
        ..Metadata::default()
    });
    tx.send(msg).await.unwrap();
    assert!(matches!(
        next(&mut rx).await.response,
        Some(Resp::ResponseHeaders(_))
    ));
    assert_eq!((count(list[0]), count(list[1])), (0, 1));
    drop(tx);
    drop(rx);
    wait_for("released", Duration::from_secs(10), || async {
        (h.in_flight() == 0).then_some(())
    })
    .await;
}

fn response_headers(content_type: &str) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Req::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    hv(":status", "200"),
                    hv("content-type", content_type),
                    hv("content-length", "123"),
                ],
            }),
            ..HttpHeaders::default()
        })),
        ..ProcessingRequest::default()
    }
}

fn response_body(bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    body_message(Req::ResponseBody, bytes, end_of_stream)
}

fn streamed_body(r: ProcessingResponse) -> (Vec<u8>, bool) {
    let Some(Resp::ResponseBody(b)) = r.response else {
        panic!("expected a response body piece, got {r:?}")
    };
    let Some(Mutation::StreamedResponse(s)) = b.response.unwrap().body_mutation.unwrap().mutation
    else {
        panic!("expected a streamed response")
    };
    (s.body, s.end_of_stream)
}

#[tokio::test]
async fn a_rewrite_changes_the_body_model_and_the_response_gets_the_clients_name_back() {
    let h = Harness::start(
        1,
        &format!("rewrites: [{{model: alias, targets: [{{model: \"{MODEL}\"}}]}}]\n"),
    )
    .await;
    let (tx, mut rx) = h.open().await;
    let mut first = headers(
        "/v1/completions",
        false,
        BodySendMode::FullDuplexStreamed,
        None,
    );
    if let Some(pc) = first.protocol_config.as_mut() {
        pc.response_body_mode = BodySendMode::FullDuplexStreamed as i32;
    }
    tx.send(first).await.unwrap();
    let request = br#"{"prompt": "hi", "model": "alias", "stream": true}"#;
    tx.send(body(request, true)).await.unwrap();
    let (_, sent, _) = read_full_duplex(&mut rx).await;
    let want = format!(r#"{{"prompt": "hi", "model": "{MODEL}", "stream": true}}"#);
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        want,
        "only the model changed"
    );
    // The response: its length changes, so content-length goes.
    tx.send(response_headers("text/event-stream"))
        .await
        .unwrap();
    let r = next(&mut rx).await;
    let Some(Resp::ResponseHeaders(hr)) = r.response else {
        panic!("{r:?}")
    };
    let m = hr.response.unwrap().header_mutation.unwrap();
    assert_eq!(m.remove_headers, vec!["content-length".to_string()]);
    // A whole event goes out restored; a partial line is held until its end.
    let event = format!("data: {{\"model\":\"{MODEL}\",\"x\":1}}\n\n");
    tx.send(response_body(
        format!("{event}data: {{\"mod").as_bytes(),
        false,
    ))
    .await
    .unwrap();
    let (piece, end) = streamed_body(next(&mut rx).await);
    assert_eq!(
        String::from_utf8(piece).unwrap(),
        "data: {\"model\":\"alias\",\"x\":1}\n\n"
    );
    assert!(!end);
    tx.send(response_body(
        format!("el\":\"{MODEL}\"}}").as_bytes(),
        false,
    ))
    .await
    .unwrap();
    // Trailers end the body: the held line is restored and sent before them.
    tx.send(ProcessingRequest {
        request: Some(Req::ResponseTrailers(
            envoy_types::pb::envoy::service::ext_proc::v3::HttpTrailers::default(),
        )),
        ..ProcessingRequest::default()
    })
    .await
    .unwrap();
    let (piece, end) = streamed_body(next(&mut rx).await);
    assert_eq!(
        String::from_utf8(piece).unwrap(),
        "data: {\"model\":\"alias\"}"
    );
    assert!(!end);
    assert!(matches!(
        next(&mut rx).await.response,
        Some(Resp::ResponseTrailers(_))
    ));
    assert_eq!(h.in_flight(), 0, "the request ended with its trailers");
}

/// `req` (request headers) with the extra headers `extra`.
fn with_headers(mut req: ProcessingRequest, extra: &[(&str, &str)]) -> ProcessingRequest {
    if let Some(Req::RequestHeaders(h)) = req.request.as_mut()
        && let Some(map) = h.headers.as_mut()
    {
        for (k, v) in extra {
            map.headers.push(hv(k, v));
        }
    }
    req
}

const OBJECTIVES: &str = "objectives:\n  - {name: batch, pool: pool, priority: -1}\n  - {name: chat, pool: pool, priority: 5}\n";

impl Harness {
    /// Opens a stream for a completion with `extra` request headers, sent whole.
    async fn request_with(
        &self,
        extra: &[(&str, &str)],
    ) -> (
        mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    ) {
        let (tx, rx) = self.open().await;
        let h = headers(
            "/v1/completions",
            false,
            BodySendMode::FullDuplexStreamed,
            None,
        );
        tx.send(with_headers(h, extra)).await.unwrap();
        tx.send(body(&completion("x"), true)).await.unwrap();
        (tx, rx)
    }

    /// Makes every server report a KV cache past the threshold (or its own again).
    fn set_saturated(&self, saturated: bool) {
        for s in &self.sim.servers {
            s.set_kv_override(saturated.then_some(0.95));
        }
    }

    /// Saturates every server and waits until fleetpick's saturation detector says so.
    async fn saturate(&self) {
        self.set_saturated(true);
        let f = self.fleet.clone();
        wait_for("the saturation detector", Duration::from_secs(20), || {
            let f = f.clone();
            async move { (fleetpick_core::schedule::free_slots(&f, 0) == 0).then_some(()) }
        })
        .await;
    }

    fn queued(&self) -> usize {
        self.fleet.pools[0].queue.as_ref().map_or(0, |q| q.len())
    }
}

#[tokio::test]
async fn sheddable_requests_get_429_while_the_pool_is_saturated_and_others_are_served() {
    let h = Harness::start(2, OBJECTIVES).await;
    // Not saturated: sheddable requests go through like any other.
    let (_tx, mut rx) = h
        .request_with(&[("x-gateway-inference-objective", "batch")])
        .await;
    read_full_duplex(&mut rx).await;
    h.saturate().await;
    let (_tx, mut rx) = h
        .request_with(&[("x-gateway-inference-objective", "batch")])
        .await;
    let (status, reason, body) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (429, "sheddable-saturated"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sheddable")
    );
    // Priority 5, and no objective at all (priority 0), are still served (kv-cache mode is a
    // soft limit): admission sheds only what may be shed.
    for extra in [vec![("x-gateway-inference-objective", "chat")], vec![]] {
        let (_tx, mut rx) = h.request_with(&extra).await;
        let (dest, _, _) = read_full_duplex(&mut rx).await;
        assert!(h.addresses().contains(&dest));
    }
    // An objective of another pool, or an unknown one, counts as priority 0.
    let (_tx, mut rx) = h
        .request_with(&[("x-gateway-inference-objective", "nope")])
        .await;
    read_full_duplex(&mut rx).await;
}

#[tokio::test]
async fn flow_control_holds_requests_while_saturated_and_releases_the_higher_priority_first() {
    let h = Harness::start(
        1,
        &format!(
            "{OBJECTIVES}flow_control: {{enabled: true}}\nimports: [{{pool: pool, policy: {{queue_threshold: 1}}}}]\n"
        ),
    )
    .await;
    h.saturate().await;
    let (_tx_low, mut rx_low) = h.request_with(&[]).await;
    wait_for(
        "the first request queued",
        Duration::from_secs(10),
        || async { (h.queued() == 1).then_some(()) },
    )
    .await;
    let (tx_high, mut rx_high) = h
        .request_with(&[("x-gateway-inference-objective", "chat")])
        .await;
    wait_for("both queued", Duration::from_secs(10), || async {
        (h.queued() == 2).then_some(())
    })
    .await;
    // Room for exactly one (queue threshold 1, one server): the later but more urgent request
    // goes first, and the other stays queued while the first awaits its first token.
    h.set_saturated(false);
    let (dest, _, _) = read_full_duplex(&mut rx_high).await;
    assert_eq!(dest, h.addresses()[0]);
    assert_eq!(h.queued(), 1, "the priority-0 request still waits");
    // The first one's response begins and ends: its slot frees, the other goes.
    tx_high
        .send(response_headers("application/json"))
        .await
        .unwrap();
    next(&mut rx_high).await;
    tx_high.send(response_body(b"{}", true)).await.unwrap();
    next(&mut rx_high).await;
    let (dest, _, _) = read_full_duplex(&mut rx_low).await;
    assert_eq!(dest, h.addresses()[0]);
    assert_eq!(h.queued(), 0);
}

#[tokio::test]
async fn queued_requests_expire_with_503_and_a_full_band_refuses_with_429() {
    let h = Harness::start(
        1,
        "flow_control: {enabled: true, max_requests_per_band: 1, ttl_ms: 300}\n",
    )
    .await;
    h.saturate().await;
    let (_tx, mut rx) = h.request_with(&[]).await;
    wait_for("queued", Duration::from_secs(10), || async {
        (h.queued() == 1).then_some(())
    })
    .await;
    let (_tx2, mut rx2) = h.request_with(&[]).await;
    let (status, reason, _) = read_immediate(&mut rx2).await;
    assert_eq!((status, reason.as_str()), (429, "queue-full"));
    let (status, reason, body) = read_immediate(&mut rx).await;
    assert_eq!((status, reason.as_str()), (503, "queue-timeout"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("waited")
    );
    assert_eq!(h.queued(), 0);
    assert_eq!(h.in_flight(), 0);
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_takes_no_slot() {
    let h = Harness::start(1, "flow_control: {enabled: true}\n").await;
    h.saturate().await;
    let (tx, rx) = h.request_with(&[]).await;
    wait_for("queued", Duration::from_secs(10), || async {
        (h.queued() == 1).then_some(())
    })
    .await;
    drop(tx);
    drop(rx);
    wait_for(
        "the queue emptied by the client's leaving",
        Duration::from_secs(10),
        || async { (h.queued() == 0).then_some(()) },
    )
    .await;
    // The next request is the one released, and nothing was counted in flight for the first.
    let (_tx, mut rx) = h.request_with(&[]).await;
    h.set_saturated(false);
    read_full_duplex(&mut rx).await;
    assert_eq!(h.in_flight(), 1);
}

#[tokio::test]
async fn a_queued_request_with_trailers_is_answered_in_order_after_its_release() {
    let h = Harness::start(1, "flow_control: {enabled: true}\n").await;
    h.saturate().await;
    let (tx, mut rx) = h.open_full_duplex("/v1/completions").await;
    // An HTTP/1.1 client with trailers: the body without end of stream, then the trailers.
    tx.send(body(&completion("x"), false)).await.unwrap();
    tx.send(trailers()).await.unwrap();
    wait_for("queued", Duration::from_secs(10), || async {
        (h.queued() == 1).then_some(())
    })
    .await;
    h.set_saturated(false);
    // The headers response first, the body back, then the trailers response.
    let first = next(&mut rx).await;
    assert!(
        matches!(first.response, Some(Resp::RequestHeaders(_))),
        "{first:?}"
    );
    let piece = next(&mut rx).await;
    assert!(
        matches!(piece.response, Some(Resp::RequestBody(_))),
        "{piece:?}"
    );
    let last = next(&mut rx).await;
    assert!(
        matches!(last.response, Some(Resp::RequestTrailers(_))),
        "{last:?}"
    );
}

#[tokio::test]
async fn in_flight_pools_hold_requests_at_their_cap_instead_of_refusing() {
    let h = Harness::start(
        1,
        "flow_control: {enabled: true}\nimports: [{pool: pool, policy: {balancing: in-flight, max_in_flight_per_endpoint: 1}}]\n",
    )
    .await;
    let (tx1, mut rx1) = h.request_with(&[]).await;
    read_full_duplex(&mut rx1).await;
    // The one endpoint is at its cap: the next request waits instead of a 429.
    let (_tx2, mut rx2) = h.request_with(&[]).await;
    wait_for("queued at the cap", Duration::from_secs(10), || async {
        (h.queued() == 1).then_some(())
    })
    .await;
    // The first ends: the second goes.
    tx1.send(response_headers("application/json"))
        .await
        .unwrap();
    next(&mut rx1).await;
    tx1.send(response_body(b"{}", true)).await.unwrap();
    next(&mut rx1).await;
    let (dest, _, _) = read_full_duplex(&mut rx2).await;
    assert_eq!(dest, h.addresses()[0]);
    assert_eq!(h.in_flight(), 1);
}

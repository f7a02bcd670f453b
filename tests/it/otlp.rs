//! OTLP export (`--features otlp`): `fleetpick serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` sends
//! each request's span to a collector, child of the client's `traceparent`, and the span it
//! exports is the parent the model server received. The collector here is the OTLP gRPC trace
//! service on a loopback socket, recording what arrives.

use fleetpick_tests as common;

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use common::envoy;
use common::{MODEL, Picker, Sim, client, fleet_yaml, wait_for};
use fleetpick_envoy::{BodyMode, Flavor};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;

/// Every span received, with its resource's service name.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn request_spans_reach_the_collector_as_children_of_the_client_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let sim = Sim::start(&["--servers", "1", "--time-scale", "20"]).await;
    let endpoint = format!("http://{otlp}");
    let picker = Picker::start_with_env(
        &fleet_yaml(&sim.entries, "poller: {interval_ms: 20}\n"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Export within 100 ms rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let envoy =
        envoy::in_front_of(Flavor::OriginalDst, BodyMode::FullDuplex, picker.grpc, &sim).await;
    envoy::until_routing(&envoy).await;

    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = client()
        .post(envoy.url("/v1/completions"))
        .header("traceparent", sent)
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let upstream = resp.headers()["x-sim-traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = resp.bytes().await;
    let ctx = fleetpick::trace::TraceContext::parse(&upstream).unwrap();
    assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(ctx.flags, 1, "a sampled parent: sampled");

    let span = wait_for(
        "the request's span at the collector",
        Duration::from_secs(30),
        || {
            let spans = collector.0.lock().clone();
            async move {
                spans
                    .into_iter()
                    .find(|(_, s)| s.span_id == ctx.span_id.to_be_bytes())
            }
        },
    )
    .await;
    let (service, span) = span;
    assert!(service.contains("fleetpick"), "{service}");
    assert_eq!(span.name, "request");
    assert_eq!(span.trace_id, ctx.trace_id.to_be_bytes());
    assert_eq!(span.parent_span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    server.abort();
}

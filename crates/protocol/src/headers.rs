//! Header and metadata names, in one place so that the picker, the rendered Envoy configs, the
//! simulator and the tests spell them the same way.

// === The Endpoint Picker Protocol (Gateway API Inference Extension, proposal 004) ===

/// The request header (and `envoy.lb` metadata key) naming the destination: `ip:port`, or an
/// ordered list `ip:port,ip:port` for retries.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// The metadata namespace Envoy's load balancers read.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Where the proxy puts its subset hint...
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// ... and the key inside it: the endpoints the pick must come from.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The key under `envoy.lb` where the proxy reports the endpoint it actually used.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Names the request's InferenceObjective.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// The flow a request belongs to, for fairness inside its priority band.
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";

// === fleetpick's own ===

/// The header an immediate response carries to say why fleetpick refused a request.
pub const REASON_HEADER: &str = "x-fleetpick-reason";

// === W3C trace context ===

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// Vendor trace state; passed on unchanged with a valid `traceparent`.
pub const TRACESTATE: &str = "tracestate";

// === The simulator's responses (read by the load generator, the benchmarks and the tests) ===

/// The simulated server that answered.
pub const SIM_SERVER_HEADER: &str = "x-sim-server";
/// The cluster of the simulated server that answered.
pub const SIM_CLUSTER_HEADER: &str = "x-sim-cluster";

//! The Envoy configurations fleetpick ships and tests with, rendered from one place.
//!
//! Envoy stays the data plane; fleetpick only decides where each request goes. How Envoy is
//! wired to fleetpick (the ext_proc filter, its processing mode, the metadata namespaces it lets
//! through, the cluster that honours the pick) is part of fleetpick's contract, so the bootstrap
//! files are rendered here rather than kept by hand: the checked-in `envoy/*.yaml`, the
//! `fleetpick envoy-config` output and the configurations the end-to-end tests and benchmarks
//! start Envoy with all come from [`render`].
//!
//! Four flavors:
//! - [`Flavor::OriginalDst`]: Envoy sends each request to exactly the `ip:port` fleetpick names in
//!   `x-gateway-destination-endpoint` (an `ORIGINAL_DST` cluster). No fallback list and no
//!   fail-open: if fleetpick is down, requests fail.
//! - [`Flavor::Fallback`]: the model servers are a static cluster balanced by Envoy's
//!   `override_host` policy, which honours fleetpick's pick (or ordered list of picks, walked by
//!   retries) and falls back to round robin when there is none; an active gRPC health check on
//!   fleetpick makes requests fail open while it is down.
//! - [`Flavor::RoundRobin`] and [`Flavor::LeastRequest`]: Envoy alone, no fleetpick. The baselines
//!   fleetpick's benchmarks are measured against.
//!
//! The facts behind the settings (observed on Envoy 1.40) are in the comments of the rendered
//! YAML, so that a reader of the checked-in files sees them too.
//!
//! # Layout
//! - this module: the flavors, their parameters and [`render`];
//! - [`compose`]: the address plan of `envoy/docker-compose.yml`;
//! - `process` (feature `process`, for the lab and the tests): the real Envoy: finding or
//!   installing the binary, `envoy --mode validate`, a process started on a rendered
//!   configuration and stopped on drop.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

pub use fleetpick_protocol::envoy::{
    BodyMode, MESSAGE_TIMEOUT_MS, REQUEST_BODY_BUFFER_LIMIT, UnknownName,
};
pub use fleetpick_protocol::headers::{DESTINATION_HEADER, LB_NAMESPACE, SERVED_KEY};

#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "process")]
pub use process::{EnvoyError, EnvoyProcess, envoy_binary, repo_root, validate};
/// Name of the Envoy cluster that reaches fleetpick's ext_proc service.
pub const PICKER_CLUSTER: &str = "fleetpick";
/// Name of the Envoy cluster of model servers.
pub const MODEL_CLUSTER: &str = "model_servers";
/// Which Envoy configuration to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// fleetpick picks; Envoy forwards to the single `ip:port` it names (ORIGINAL_DST cluster).
    OriginalDst,
    /// fleetpick picks among a static cluster (override_host policy); fail-open to round robin.
    Fallback,
    /// No fleetpick: Envoy's round robin over the endpoints (benchmark baseline).
    RoundRobin,
    /// No fleetpick: Envoy's least-request (power of two choices) over the endpoints (baseline).
    LeastRequest,
}

/// The addresses a rendered configuration uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyParams {
    /// Client-facing HTTP listener (port 0 lets the kernel choose; read it back from the admin
    /// interface's `/listeners`).
    pub listen: SocketAddr,
    /// Envoy's admin interface (port 0 allowed; `--admin-address-path` reports the real one).
    pub admin: SocketAddr,
    /// fleetpick's gRPC ext_proc address (unused by the baselines).
    pub extproc: SocketAddr,
    /// The model servers: the static cluster members of [`Flavor::Fallback`],
    /// [`Flavor::RoundRobin`] and [`Flavor::LeastRequest`] (unused by [`Flavor::OriginalDst`],
    /// which reaches whatever fleetpick names).
    pub endpoints: Vec<SocketAddr>,
    /// How the request body reaches fleetpick.
    pub body_mode: BodyMode,
    /// The model servers grouped by locality, with Envoy priorities (0 first): when not empty,
    /// the static model cluster is made of these instead of `endpoints`, with active health
    /// checks (`GET /health`), so that Envoy fails over between priorities on its own. This is
    /// Envoy's own locality-aware balancing, the baseline for multi-cluster scenarios.
    pub localities: Vec<Locality>,
    /// TLS to fleetpick (none: plaintext), for a fleetpick with `server.tls`.
    pub extproc_tls: Option<ExtProcTls>,
}

/// The files Envoy uses to reach a TLS fleetpick: the CA its certificate chains to and, for
/// mutual TLS, Envoy's own client certificate and key. Envoy reads them at start (rotating
/// them needs SDS or a restart on Envoy's side; fleetpick's side reloads on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtProcTls {
    pub ca_file: String,
    /// Envoy's client certificate and key; `None` when fleetpick does not ask for one.
    pub client_cert: Option<(String, String)>,
    /// The name fleetpick's certificate must carry (sent as SNI and checked as a DNS SAN).
    pub server_name: String,
}

/// The TLS files of the checked-in `envoy/envoy-tls.yaml`, mounted under `/etc/fleetpick/tls`,
/// and the name in fleetpick's certificate.
pub fn user_tls() -> ExtProcTls {
    ExtProcTls {
        ca_file: "/etc/fleetpick/tls/ca.crt".into(),
        client_cert: Some((
            "/etc/fleetpick/tls/envoy.crt".into(),
            "/etc/fleetpick/tls/envoy.key".into(),
        )),
        server_name: "fleetpick".into(),
    }
}

/// A group of model servers in one place (a cluster), for Envoy's locality-aware balancing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    /// The cluster's name stands in for the zone.
    pub zone: String,
    /// Envoy priority: 0 is used first; higher ones take traffic as the lower lose health.
    pub priority: u32,
    pub endpoints: Vec<SocketAddr>,
}

/// The parameters of the checked-in `envoy/envoy.yaml` and `envoy/envoy-fallback.yaml`: listener
/// on 0.0.0.0:8081, admin on 127.0.0.1:9901, fleetpick on 127.0.0.1:9002, model servers on
/// 127.0.0.1:8000 and 127.0.0.1:8001, full-duplex body.
pub fn user_defaults() -> EnvoyParams {
    use std::net::{IpAddr, Ipv4Addr};
    let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    EnvoyParams {
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8081),
        admin: local(9901),
        extproc: local(9002),
        endpoints: vec![local(8000), local(8001)],
        body_mode: BodyMode::FullDuplex,
        localities: Vec::new(),
        extproc_tls: None,
    }
}

/// The address plan of `envoy/docker-compose.yml`: a bridge network where the simulated fleet,
/// fleetpick and Envoy have fixed addresses (Envoy's clusters and the fleet file name IPs).
pub mod compose {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    pub const SUBNET: &str = "172.28.0.0/24";
    pub const SIM: Ipv4Addr = Ipv4Addr::new(172, 28, 0, 10);
    pub const FLEETPICK: Ipv4Addr = Ipv4Addr::new(172, 28, 0, 20);
    pub const ENVOY: Ipv4Addr = Ipv4Addr::new(172, 28, 0, 30);
    /// The simulated servers' ports: two clusters of two.
    pub const SIM_PORTS: [u16; 4] = [8000, 8001, 8002, 8003];

    /// The Envoy of the compose file: the fallback flavor (keeps serving if fleetpick stops),
    /// listening on every interface of its container.
    pub fn params() -> super::EnvoyParams {
        let any = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        super::EnvoyParams {
            listen: any(8081),
            admin: any(9901),
            extproc: SocketAddr::new(IpAddr::V4(FLEETPICK), 9002),
            endpoints: SIM_PORTS
                .iter()
                .map(|&p| SocketAddr::new(IpAddr::V4(SIM), p))
                .collect(),
            body_mode: super::BodyMode::FullDuplex,
            localities: Vec::new(),
            extproc_tls: None,
        }
    }
}

// === impl Flavor ===

impl Flavor {
    /// Every flavor, in declaration order.
    pub const ALL: [Flavor; 4] = [
        Flavor::OriginalDst,
        Flavor::Fallback,
        Flavor::RoundRobin,
        Flavor::LeastRequest,
    ];

    /// The flavor's command-line name (`original-dst`, `fallback`, `round-robin`, `least-request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::OriginalDst => "original-dst",
            Flavor::Fallback => "fallback",
            Flavor::RoundRobin => "round-robin",
            Flavor::LeastRequest => "least-request",
        }
    }

    /// Whether Envoy consults fleetpick (false for the baselines).
    pub fn uses_picker(self) -> bool {
        matches!(self, Flavor::OriginalDst | Flavor::Fallback)
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Flavor {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Flavor::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownName::new("Envoy flavor", s, Flavor::ALL.map(Flavor::as_str)))
    }
}

// === render ===

/// Renders the full Envoy bootstrap (YAML) of `flavor` with the addresses of `p`.
pub fn render(flavor: Flavor, p: &EnvoyParams) -> String {
    let mut y = String::with_capacity(8 * 1024);
    header(&mut y, flavor, p);
    admin(&mut y, p);
    overload_manager(&mut y);
    put(&mut y, "\nstatic_resources:\n  listeners:\n");
    listener(&mut y, flavor, p);
    put(&mut y, "  clusters:\n");
    model_cluster(&mut y, flavor, p);
    if flavor.uses_picker() {
        picker_cluster(&mut y, flavor, p);
    }
    y
}

/// Appends a block of YAML. Blocks are written as raw string literals that open with a line break
/// (so that their indentation reads as it renders); that first line break is dropped.
fn put(y: &mut String, block: &str) {
    y.push_str(block.strip_prefix('\n').unwrap_or(block));
}

fn header(y: &mut String, flavor: Flavor, p: &EnvoyParams) {
    let what = match flavor {
        Flavor::OriginalDst => {
            "fleetpick picks each request's model server and Envoy sends the request exactly there.
No fallback: while fleetpick is down, requests fail (500)."
        }
        Flavor::Fallback => {
            "fleetpick picks each request's model server (or an ordered list, walked by retries)
among a static cluster; while fleetpick is down, requests fail open to round robin."
        }
        Flavor::RoundRobin => {
            "Envoy alone, round robin over the model servers: a benchmark baseline."
        }
        Flavor::LeastRequest => {
            "Envoy alone, least request (power of two choices) over the model servers: a benchmark
baseline."
        }
    };
    let mode = if flavor.uses_picker() {
        format!(" (request body {})", p.body_mode)
    } else {
        String::new()
    };
    put(
        y,
        &format!("# fleetpick: Envoy bootstrap, flavor {flavor}{mode}.\n#\n"),
    );
    for line in what.lines() {
        put(y, &format!("# {line}\n"));
    }
    if p.extproc_tls.is_some() {
        put(
            y,
            "#\n# fleetpick is reached over TLS (mutual, when a client certificate is given): set
# fleetpick's server.tls to match (see crates/config/src/lib.rs). The files are read at Envoy's start.\n",
        );
    }
    put(
        y,
        r#"
#
# Produced by `fleetpick envoy-config` (rendered by crates/envoy/src/lib.rs: change that, not this file).
# Regenerate the checked-in files in envoy/ with
#   FLEETPICK_BLESS=1 cargo test --test envoy_config
# Check a configuration without starting Envoy: envoy --mode validate -c FILE

"#,
    );
}

fn admin(y: &mut String, p: &EnvoyParams) {
    put(y, "admin:\n  address:\n");
    socket_address(y, 4, p.admin);
}

fn overload_manager(y: &mut String) {
    put(
        y,
        r#"

# A cap on downstream connections: without one Envoy warns at start-up, and a flood of clients
# could exhaust its file descriptors.
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 50000

"#,
    );
}

fn listener(y: &mut String, flavor: Flavor, p: &EnvoyParams) {
    put(y, "  - name: inference\n    address:\n");
    socket_address(y, 6, p.listen);
    put(
        y,
        &format!(
            r#"
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inference
          # HTTP/1.1 and HTTP/2 (h2c) clients alike.
          codec_type: AUTO
          # A generation can pause between tokens (queueing, a long prefill), but not for minutes.
          stream_idle_timeout: 300s
          route_config:
            name: inference
            virtual_hosts:
            - name: inference
              domains: ["*"]
              routes:
              - match:
                  prefix: /
                route:
                  cluster: {MODEL_CLUSTER}
                  # No overall deadline: streamed completions can legitimately run for minutes;
                  # the stream idle timeout above catches stalled ones.
                  timeout: 0s
"#
        ),
    );
    if flavor != Flavor::OriginalDst {
        retry_policy(y, flavor, !p.localities.is_empty());
    }
    let buffer_why = match flavor {
        Flavor::OriginalDst => {
            r#"
                # How much of a request body Envoy may hold for fleetpick in BUFFERED body mode
                # (a larger body gets 413 from Envoy). The default, 1 MiB, is less than
                # long-context prompts. fleetpick's own limit (server.max_body_bytes) is meant to
                # be lower, so that its 413 in the OpenAI error shape is what clients see.
"#
        }
        Flavor::Fallback => {
            r#"
                # How much of a request body Envoy may hold: for a retry (a larger body that needs
                # one gets 503 or 507 from Envoy) and, in BUFFERED body mode, for fleetpick (a
                # larger body gets 413 from Envoy). The default, 1 MiB, is less than long-context
                # prompts. fleetpick's own limit (server.max_body_bytes) is meant to be lower, so
                # that its 413 in the OpenAI error shape is what clients see.
"#
        }
        Flavor::RoundRobin | Flavor::LeastRequest => {
            r#"
                # How much of a request body Envoy may hold for a retry (a larger body that needs
                # one gets 503 or 507 from Envoy). The default, 1 MiB, is less than long-context
                # prompts.
"#
        }
    };
    put(y, buffer_why);
    put(
        y,
        &format!(
            "                # Only bodies that large use that much memory.\n                \
             request_body_buffer_limit: {REQUEST_BODY_BUFFER_LIMIT}\n"
        ),
    );
    put(y, "          http_filters:\n");
    if flavor.uses_picker() {
        put(
            y,
            &format!(
                r#"
          # Drop any client-sent destination before fleetpick runs: only fleetpick chooses the
          # endpoint. With ORIGINAL_DST a client-chosen ip:port would make Envoy an open proxy
          # (SSRF) if fleetpick were ever skipped; with override_host it would bypass the pick.
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - remove: {DESTINATION_HEADER}
"#
            ),
        );
        ext_proc_filter(y, flavor, p.body_mode);
    }
    put(
        y,
        r#"
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
    );
}

fn retry_policy(y: &mut String, flavor: Flavor, priorities: bool) {
    let why = if flavor == Flavor::Fallback {
        r#"
                  # Retries walk down fleetpick's ordered list (ip:port,ip:port,...), then the
                  # fallback policy. Envoy retries only before any response byte reached the
                  # client.
"#
    } else {
        r#"
                  # The same retries as the fallback flavor, so that the baseline is a fair one:
                  # a request sent to a dead server is retried on another, before any response
                  # byte reached the client.
"#
    };
    put(y, why);
    put(
        y,
        r#"
                  # connect-failure, refused-stream, reset: the server is down or went away
                  # before answering; gateway-error: it answered 502, 503 or 504.
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset,gateway-error
                    num_retries: 2
                    # Do not retry on a host that already failed this request.
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 5
"#,
    );
    if priorities {
        put(
            y,
            r#"                    # A retry goes to another priority (locality) than the attempts before
                    # it: while a lost cluster's hosts are still counted healthy (between health
                    # checks, or on a worker thread that has not applied the verdict yet), its
                    # requests are not retried inside it.
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
"#,
        );
    }
}

fn ext_proc_filter(y: &mut String, flavor: Flavor, body_mode: BodyMode) {
    let fail_open = flavor == Flavor::Fallback;
    let failure = if fail_open {
        r#"
              # Fail open when the stream to fleetpick cannot start, which is at once while the
              # health check of cluster fleetpick holds it unhealthy. A stream that breaks after
              # it started still fails its request (500) in FULL_DUPLEX_STREAMED body mode.
              failure_mode_allow: true
"#
    } else {
        r#"
              # Fail closed: without fleetpick there is no destination to send the request to.
              failure_mode_allow: false
"#
    };
    let body = match body_mode {
        BodyMode::FullDuplex => {
            r#"
                # FULL_DUPLEX_STREAMED: each body chunk goes to fleetpick as it arrives and comes
                # back in a StreamedBodyResponse; no size limit, but message_timeout is NOT
                # enforced. Envoy requires request trailers to be sent in this mode.
                request_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
"#
        }
        BodyMode::Buffered => {
            r#"
                # BUFFERED: Envoy collects the whole body (up to request_body_buffer_limit, above
                # which it answers 413 itself) and sends it in one message; message_timeout applies.
                request_body_mode: BUFFERED
                request_trailer_mode: SKIP
"#
        }
    };
    put(
        y,
        &format!(
            r#"
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc:
                  cluster_name: {PICKER_CLUSTER}
"#
        ),
    );
    put(y, failure);
    put(
        y,
        &format!(
            r#"
              # How long Envoy waits for each answer of fleetpick (enforced in BUFFERED body mode
              # only): long enough for fleetpick to hold a request while the pool is saturated,
              # short enough that a hung fleetpick does not hang clients (504).
              message_timeout: {}s
              # fleetpick does not change the processing mode per request (and Envoy ignores mode
              # overrides with FULL_DUPLEX_STREAMED anyway).
              allow_mode_override: false
              processing_mode:
                # fleetpick needs the request headers (path, objective, fairness id) and body
                # (model, prompt) to pick, and the response to learn the outcome. The response
                # body is streamed through fleetpick (each chunk echoed unchanged) because that is
                # how it learns when the response ENDS: with response_body_mode NONE, Envoy closes
                # the ext_proc stream after the response headers, long before a streamed
                # completion is done, and fleetpick's in-flight count would drop too early. It also
                # gives the time of the first token. Trailers must be SEND with FULL_DUPLEX.
                request_header_mode: SEND
                response_header_mode: SEND
                response_body_mode: FULL_DUPLEX_STREAMED
                response_trailer_mode: SEND
"#,
            MESSAGE_TIMEOUT_MS / 1000
        ),
    );
    put(y, body);
    put(
        y,
        &format!(
            r#"
              metadata_options:
                # Envoy DROPS dynamic metadata from fleetpick unless its namespace is listed here;
                # fleetpick writes its pick to {LB_NAMESPACE} / {DESTINATION_HEADER}.
                receiving_namespaces:
                  untyped: [{LB_NAMESPACE}]
                # Sends {LB_NAMESPACE} to fleetpick on the response path, with the endpoint
                # that served the request ({SERVED_KEY})
                # when the cluster reports it (override_host does).
                forwarding_namespaces:
                  untyped: [{LB_NAMESPACE}]
"#
        ),
    );
}

fn model_cluster(y: &mut String, flavor: Flavor, p: &EnvoyParams) {
    put(
        y,
        &format!("\n  - name: {MODEL_CLUSTER}\n    connect_timeout: 1s\n"),
    );
    match flavor {
        Flavor::OriginalDst => put(
            y,
            &format!(
                r#"
    # Goes to whatever ip:port fleetpick writes in {DESTINATION_HEADER}: exactly one
    # endpoint (a list does not parse: 503), no fallback, any address Envoy can reach.
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config:
      use_http_header: true
      http_header_name: {DESTINATION_HEADER}
"#
            ),
        ),
        Flavor::Fallback => put(
            y,
            &format!(
                r#"
    type: STATIC
    load_balancing_policy:
      policies:
      - typed_extension_config:
          # Honours fleetpick's pick: ip:port, or an ordered list ip:port,ip:port,... (the first
          # for the request, the rest for its retries). Only members of this cluster are reached;
          # other addresses are skipped. The sources are searched in order: metadata first.
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - metadata:
                key: {LB_NAMESPACE}
                path:
                - key: {DESTINATION_HEADER}
            - header: {DESTINATION_HEADER}
            # Where the endpoint that served the request is written (forwarded to fleetpick with
            # the response headers, see metadata_options).
            selected_host_key:
              key: {LB_NAMESPACE}
              path:
              - key: {SERVED_KEY}
            # No pick (fleetpick down and failing open): plain round robin.
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
"#
            ),
        ),
        Flavor::RoundRobin => put(y, "    type: STATIC\n    lb_policy: ROUND_ROBIN\n"),
        Flavor::LeastRequest => put(y, "    type: STATIC\n    lb_policy: LEAST_REQUEST\n"),
    }
    circuit_breakers(y, "the model servers queue what they cannot run yet");
    if flavor == Flavor::OriginalDst {
        return;
    }
    if p.localities.is_empty() {
        load_assignment(y, MODEL_CLUSTER, &p.endpoints);
        return;
    }
    put(
        y,
        r#"
    # Envoy's own failover between localities: priority 0 (the local region) takes everything
    # while enough of it is healthy (with the default overprovisioning factor of 1.4, until
    # fewer than 72% of its hosts pass their health checks), then priority 1 takes the rest.
    # Health comes from active checks, so a lost cluster leaves within about a second.
    health_checks:
    - timeout: 1s
      interval: 0.5s
      no_traffic_interval: 0.5s
      unhealthy_threshold: 1
      healthy_threshold: 1
      http_health_check:
        path: /health
"#,
    );
    put(
        y,
        &format!(
            "    load_assignment:
      cluster_name: {MODEL_CLUSTER}
      endpoints:
"
        ),
    );
    for l in &p.localities {
        put(
            y,
            &format!(
                "      - locality: {{region: \"{}\", zone: \"{}\"}}
        priority: {}
        lb_endpoints:
",
                l.region, l.zone, l.priority
            ),
        );
        for &addr in &l.endpoints {
            put(
                y,
                "        - endpoint:
            address:
",
            );
            socket_address(y, 14, addr);
        }
    }
}

fn picker_cluster(y: &mut String, flavor: Flavor, p: &EnvoyParams) {
    put(
        y,
        &format!(
            r#"
  - name: {PICKER_CLUSTER}
    connect_timeout: 1s
    type: STATIC
    # ext_proc is gRPC: HTTP/2 to fleetpick, one stream per request.
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
"#
        ),
    );
    circuit_breakers(y, "fleetpick admits or sheds load itself");
    if let Some(tls) = &p.extproc_tls {
        extproc_tls(y, tls);
    }
    if flavor == Flavor::Fallback {
        put(
            y,
            r#"
    # Fail-open needs Envoy to KNOW that fleetpick is down: failure_mode_allow alone does not fail
    # open once a FULL_DUPLEX_STREAMED stream has started. With an active gRPC health check and
    # panic mode off (threshold 0), an unhealthy fleetpick leaves no host to open the stream to,
    # so the stream fails before any message and the request goes on to the fallback policy. The
    # short interval bounds the time requests fail after fleetpick dies; one success brings it
    # back.
    common_lb_config:
      healthy_panic_threshold:
        value: 0
    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check:
        service_name: envoy.service.ext_proc.v3.ExternalProcessor
"#,
        );
    }
    load_assignment(y, PICKER_CLUSTER, &[p.extproc]);
}

/// The picker cluster's TLS: fleetpick's certificate checked against the CA and the name, Envoy's
/// own certificate presented for mutual TLS, HTTP/2 by ALPN.
fn extproc_tls(y: &mut String, tls: &ExtProcTls) {
    // Paths and names as JSON strings (YAML's double-quoted scalars): any character survives.
    let quoted = |v: &str| serde_json::Value::from(v).to_string();
    let (ca_file, server_name) = (quoted(&tls.ca_file), quoted(&tls.server_name));
    put(
        y,
        &format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {server_name}
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: {ca_file}}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: {server_name}}}
"#
        ),
    );
    if let Some((cert, key)) = &tls.client_cert {
        let (cert, key) = (quoted(cert), quoted(key));
        put(
            y,
            &format!(
                r#"          tls_certificates:
          - certificate_chain: {{filename: {cert}}}
            private_key: {{filename: {key}}}
"#
            ),
        );
    }
}

fn circuit_breakers(y: &mut String, what: &str) {
    put(
        y,
        &format!(
            r#"
    # Envoy's default caps (1024 connections, pending and active requests per cluster) would
    # turn a large burst into 503s from Envoy itself:
    # {what}.
    # Its default of 3 retries in progress per cluster would leave all but three of the requests
    # caught by a lost endpoint or cluster without their retry (retries wait a backoff of 25 ms
    # or more, so they overlap).
    circuit_breakers:
      thresholds:
      - max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 100000
"#
        ),
    );
}

fn load_assignment(y: &mut String, cluster: &str, endpoints: &[SocketAddr]) {
    put(
        y,
        &format!("    load_assignment:\n      cluster_name: {cluster}\n"),
    );
    if endpoints.is_empty() {
        put(y, "      endpoints: []\n");
        return;
    }
    put(y, "      endpoints:\n      - lb_endpoints:\n");
    for &addr in endpoints {
        put(y, "        - endpoint:\n            address:\n");
        socket_address(y, 14, addr);
    }
}

/// `socket_address:` at `indent` spaces. The IP is quoted: an IPv6 address such as `::1` is not
/// a safe plain YAML scalar.
fn socket_address(y: &mut String, indent: usize, addr: SocketAddr) {
    let pad = " ".repeat(indent);
    y.push_str(&format!(
        "{pad}socket_address:\n{pad}  address: \"{}\"\n{pad}  port_value: {}\n",
        addr.ip(),
        addr.port()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_norway::Value;

    fn params(body_mode: BodyMode) -> EnvoyParams {
        EnvoyParams {
            body_mode,
            ..user_defaults()
        }
    }

    fn parse(flavor: Flavor, p: &EnvoyParams) -> Value {
        let text = render(flavor, p);
        serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{flavor} does not parse as YAML: {e}\n{text}"))
    }

    /// Follows a path of mapping keys and sequence indexes ("0", "1", ...).
    fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
        path.split('.').fold(v, |v, k| {
            let next = match k.parse::<usize>() {
                Ok(i) => v.get(i),
                Err(_) => v.get(k),
            };
            next.unwrap_or_else(|| panic!("no {k:?} on the path {path:?} in {v:?}"))
        })
    }

    fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
        at(v, path)
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not a string"))
    }

    const HCM: &str = "static_resources.listeners.0.filter_chains.0.filters.0.typed_config";

    fn cluster<'a>(v: &'a Value, name: &str) -> &'a Value {
        at(v, "static_resources.clusters")
            .as_sequence()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("name") == Some(&Value::from(name)))
            })
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    fn filter<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
        at(v, &format!("{HCM}.http_filters"))
            .as_sequence()?
            .iter()
            .find(|f| f.get("name") == Some(&Value::from(name)))
    }

    fn endpoint_addrs(cluster: &Value) -> Vec<String> {
        at(cluster, "load_assignment.endpoints.0.lb_endpoints")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                let sa = at(e, "endpoint.address.socket_address");
                format!(
                    "{}:{}",
                    str_at(sa, "address"),
                    at(sa, "port_value").as_u64().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn every_flavor_and_body_mode_parses_with_addresses_in_place() {
        for flavor in Flavor::ALL {
            for mode in BodyMode::ALL {
                let v = parse(flavor, &params(mode));
                assert_eq!(
                    str_at(&v, "admin.address.socket_address.address"),
                    "127.0.0.1"
                );
                assert_eq!(
                    at(&v, "admin.address.socket_address.port_value").as_u64(),
                    Some(9901)
                );
                let l = at(&v, "static_resources.listeners.0.address.socket_address");
                assert_eq!(str_at(l, "address"), "0.0.0.0");
                assert_eq!(at(l, "port_value").as_u64(), Some(8081));
                assert_eq!(str_at(&v, &format!("{HCM}.stream_idle_timeout")), "300s");
                let route = format!("{HCM}.route_config.virtual_hosts.0.routes.0.route");
                assert_eq!(str_at(&v, &format!("{route}.timeout")), "0s");
                let limit = format!("{HCM}.route_config.virtual_hosts.0.routes.0");
                assert_eq!(
                    at(&v, &format!("{limit}.request_body_buffer_limit")).as_u64(),
                    Some(REQUEST_BODY_BUFFER_LIMIT)
                );
                assert_eq!(str_at(&v, &format!("{route}.cluster")), MODEL_CLUSTER);
                assert_eq!(str_at(cluster(&v, MODEL_CLUSTER), "connect_timeout"), "1s");
                let last = at(&v, &format!("{HCM}.http_filters"))
                    .as_sequence()
                    .unwrap()
                    .last()
                    .unwrap();
                assert_eq!(str_at(last, "name"), "envoy.filters.http.router");
                assert_eq!(
                    filter(&v, "envoy.filters.http.ext_proc").is_some(),
                    flavor.uses_picker()
                );
                let clusters = at(&v, "static_resources.clusters").as_sequence().unwrap();
                assert_eq!(clusters.len(), if flavor.uses_picker() { 2 } else { 1 });
            }
        }
    }

    #[test]
    fn original_dst_follows_the_destination_header_and_fails_closed() {
        let v = parse(Flavor::OriginalDst, &params(BodyMode::FullDuplex));
        let c = cluster(&v, MODEL_CLUSTER);
        assert_eq!(str_at(c, "type"), "ORIGINAL_DST");
        assert_eq!(str_at(c, "lb_policy"), "CLUSTER_PROVIDED");
        assert_eq!(
            at(c, "original_dst_lb_config.use_http_header").as_bool(),
            Some(true)
        );
        assert_eq!(
            str_at(c, "original_dst_lb_config.http_header_name"),
            DESTINATION_HEADER
        );
        let xp = at(
            filter(&v, "envoy.filters.http.ext_proc").unwrap(),
            "typed_config",
        );
        assert_eq!(at(xp, "failure_mode_allow").as_bool(), Some(false));
        assert_eq!(at(xp, "allow_mode_override").as_bool(), Some(false));
        assert_eq!(str_at(xp, "message_timeout"), "10s");
        assert_eq!(
            str_at(xp, "grpc_service.envoy_grpc.cluster_name"),
            PICKER_CLUSTER
        );
        let pm = at(xp, "processing_mode");
        for (k, want) in [
            ("request_header_mode", "SEND"),
            ("response_header_mode", "SEND"),
            ("request_body_mode", "FULL_DUPLEX_STREAMED"),
            ("response_body_mode", "FULL_DUPLEX_STREAMED"),
            ("request_trailer_mode", "SEND"),
            ("response_trailer_mode", "SEND"),
        ] {
            assert_eq!(str_at(pm, k), want, "{k}");
        }
        for ns in ["receiving_namespaces", "forwarding_namespaces"] {
            assert_eq!(
                str_at(xp, &format!("metadata_options.{ns}.untyped.0")),
                LB_NAMESPACE
            );
        }
        // The client's own destination header is removed before ext_proc runs.
        let names: Vec<&str> = at(&v, &format!("{HCM}.http_filters"))
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| str_at(f, "name"))
            .collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.header_mutation",
                "envoy.filters.http.ext_proc",
                "envoy.filters.http.router"
            ]
        );
        let hm = filter(&v, "envoy.filters.http.header_mutation").unwrap();
        assert_eq!(
            str_at(hm, "typed_config.mutations.request_mutations.0.remove"),
            DESTINATION_HEADER
        );
        // No retries: ORIGINAL_DST would retry the same endpoint.
        assert!(
            at(
                &v,
                &format!("{HCM}.route_config.virtual_hosts.0.routes.0.route")
            )
            .get("retry_policy")
            .is_none()
        );
        // fleetpick over HTTP/2, no health check.
        let f = cluster(&v, PICKER_CLUSTER);
        assert_eq!(str_at(f, "type"), "STATIC");
        let http = at(f, "typed_extension_protocol_options")
            .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
            .expect("HttpProtocolOptions");
        assert!(at(http, "explicit_http_config.http2_protocol_options").is_mapping());
        assert!(f.get("health_checks").is_none());
        assert_eq!(endpoint_addrs(f), ["127.0.0.1:9002"]);
    }

    #[test]
    fn buffered_mode_skips_request_trailers() {
        for flavor in [Flavor::OriginalDst, Flavor::Fallback] {
            let v = parse(flavor, &params(BodyMode::Buffered));
            let pm = at(
                filter(&v, "envoy.filters.http.ext_proc").unwrap(),
                "typed_config.processing_mode",
            );
            assert_eq!(str_at(pm, "request_body_mode"), "BUFFERED");
            assert_eq!(str_at(pm, "request_trailer_mode"), "SKIP");
            assert_eq!(str_at(pm, "response_body_mode"), "FULL_DUPLEX_STREAMED");
        }
    }

    #[test]
    fn fallback_health_checks_fleetpick_and_overrides_hosts_of_a_static_cluster() {
        let v = parse(Flavor::Fallback, &params(BodyMode::FullDuplex));
        let xp = at(
            filter(&v, "envoy.filters.http.ext_proc").unwrap(),
            "typed_config",
        );
        assert_eq!(at(xp, "failure_mode_allow").as_bool(), Some(true));

        let f = cluster(&v, PICKER_CLUSTER);
        assert_eq!(
            at(f, "common_lb_config.healthy_panic_threshold.value").as_u64(),
            Some(0)
        );
        let hc = at(f, "health_checks.0");
        assert_eq!(
            str_at(hc, "grpc_health_check.service_name"),
            "envoy.service.ext_proc.v3.ExternalProcessor"
        );
        assert_eq!(str_at(hc, "interval"), "1s");
        assert_eq!(str_at(hc, "no_traffic_interval"), "1s");
        assert_eq!(at(hc, "unhealthy_threshold").as_u64(), Some(1));
        assert_eq!(at(hc, "healthy_threshold").as_u64(), Some(1));

        let m = cluster(&v, MODEL_CLUSTER);
        assert_eq!(str_at(m, "type"), "STATIC");
        assert!(m.get("lb_policy").is_none());
        assert_eq!(endpoint_addrs(m), ["127.0.0.1:8000", "127.0.0.1:8001"]);
        let policy = at(m, "load_balancing_policy.policies.0.typed_extension_config");
        assert_eq!(
            str_at(policy, "name"),
            "envoy.load_balancing_policies.override_host"
        );
        let oh = at(policy, "typed_config");
        assert_eq!(
            str_at(oh, "override_host_sources.0.metadata.key"),
            LB_NAMESPACE
        );
        assert_eq!(
            str_at(oh, "override_host_sources.0.metadata.path.0.key"),
            DESTINATION_HEADER
        );
        assert_eq!(
            str_at(oh, "override_host_sources.1.header"),
            DESTINATION_HEADER
        );
        assert_eq!(str_at(oh, "selected_host_key.key"), LB_NAMESPACE);
        assert_eq!(str_at(oh, "selected_host_key.path.0.key"), SERVED_KEY);
        assert_eq!(
            str_at(oh, "fallback_policy.policies.0.typed_extension_config.name"),
            "envoy.load_balancing_policies.round_robin"
        );

        let retry = at(
            &v,
            &format!("{HCM}.route_config.virtual_hosts.0.routes.0.route.retry_policy"),
        );
        assert_eq!(at(retry, "num_retries").as_u64(), Some(2));
        let on: Vec<&str> = str_at(retry, "retry_on").split(',').collect();
        for want in [
            "connect-failure",
            "refused-stream",
            "reset",
            "gateway-error",
        ] {
            assert!(on.contains(&want), "retry_on lacks {want}: {on:?}");
        }
    }

    #[test]
    fn baselines_balance_a_static_cluster_without_fleetpick() {
        for (flavor, policy) in [
            (Flavor::RoundRobin, "ROUND_ROBIN"),
            (Flavor::LeastRequest, "LEAST_REQUEST"),
        ] {
            let text = render(flavor, &params(BodyMode::FullDuplex));
            assert!(!text.contains("ext_proc:") && !text.contains("cluster_name: fleetpick"));
            let v = parse(flavor, &params(BodyMode::FullDuplex));
            let m = cluster(&v, MODEL_CLUSTER);
            assert_eq!(str_at(m, "type"), "STATIC");
            assert_eq!(str_at(m, "lb_policy"), policy);
            assert_eq!(endpoint_addrs(m), ["127.0.0.1:8000", "127.0.0.1:8001"]);
            assert!(filter(&v, "envoy.filters.http.header_mutation").is_none());
        }
    }

    #[test]
    fn ipv6_and_empty_endpoint_lists_render() {
        let p = EnvoyParams {
            listen: "[::1]:0".parse().unwrap(),
            endpoints: vec![],
            ..user_defaults()
        };
        for flavor in Flavor::ALL {
            let v = parse(flavor, &p);
            assert_eq!(
                str_at(
                    &v,
                    "static_resources.listeners.0.address.socket_address.address"
                ),
                "::1"
            );
        }
        let v = parse(Flavor::RoundRobin, &p);
        assert!(
            at(cluster(&v, MODEL_CLUSTER), "load_assignment.endpoints")
                .as_sequence()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn names_round_trip() {
        for f in Flavor::ALL {
            assert_eq!(f.as_str().parse::<Flavor>(), Ok(f));
        }
        for m in BodyMode::ALL {
            assert_eq!(m.to_string().parse::<BodyMode>(), Ok(m));
        }
        let err = "rr".parse::<Flavor>().unwrap_err().to_string();
        assert!(
            err.contains("original-dst, fallback, round-robin, least-request"),
            "{err}"
        );
    }
}

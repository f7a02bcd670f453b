//! Real Envoy for the end-to-end tests: the library's [`EnvoyProcess`], unwrapped.

use fleetpick_envoy::EnvoyProcess;

/// A running Envoy, stopped on drop.
pub type Envoy = EnvoyProcess;

/// Starts Envoy on `config_yaml`; panics with Envoy's log if it does not come up.
pub async fn start(config_yaml: &str) -> Envoy {
    EnvoyProcess::start(config_yaml)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `envoy --mode validate` on `config_yaml`; panics with Envoy's output if it is refused.
pub fn validate(config_yaml: &str) {
    if let Err(e) = fleetpick_envoy::validate(config_yaml) {
        panic!("{e}\n--- configuration ---\n{config_yaml}");
    }
}

/// Starts Envoy (configuration `flavor`, full-duplex bodies) in front of fleetpick at
/// `picker` and the simulated servers of `sim`, on kernel-chosen loopback ports.
pub async fn in_front_of(
    flavor: fleetpick_envoy::Flavor,
    body_mode: fleetpick_envoy::BodyMode,
    picker: std::net::SocketAddr,
    sim: &super::Sim,
) -> Envoy {
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let params = fleetpick_envoy::EnvoyParams {
        listen: loopback,
        admin: loopback,
        extproc: picker,
        endpoints: sim
            .entries
            .iter()
            .map(|e| e.address.parse().unwrap())
            .collect(),
        body_mode,
        localities: Vec::new(),
        extproc_tls: None,
    };
    start(&fleetpick_envoy::render(flavor, &params)).await
}

/// Waits until a completion through `envoy` succeeds (fleetpick has scraped and Envoy routes).
pub async fn until_routing(envoy: &Envoy) {
    let url = envoy.url("/v1/completions");
    super::wait_for(
        "a first request routed through Envoy",
        std::time::Duration::from_secs(30),
        || {
            let url = url.clone();
            async move { (super::complete(&super::client(), &url, &[]).await.0 == 200).then_some(()) }
        },
    )
    .await;
}

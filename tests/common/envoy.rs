//! Real Envoy for the end-to-end tests: the library's [`EnvoyProcess`], unwrapped.

use fleetpick::envoy::EnvoyProcess;

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
    if let Err(e) = fleetpick::envoy::validate(config_yaml) {
        panic!("{e}\n--- configuration ---\n{config_yaml}");
    }
}

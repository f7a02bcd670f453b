//! The lab's command at its edges: its commands, and a user's mistake told on one line, without
//! a backtrace. (Being this package's integration test, it also has `cargo test` build the
//! binary beside the workspace's integration tests, which run its simulator.)

use std::process::Command;

#[test]
fn help_lists_the_labs_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpick-lab"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["sim", "load", "bench", "demo"] {
        assert!(help.contains(&format!("  {command} ")), "{command}: {help}");
    }
}

#[test]
fn a_missing_simulator_config_is_named_on_one_line_without_a_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpick-lab"))
        .args(["sim", "--servers", "1", "--config", "/nonexistent/sim.yaml"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("fleetpick-lab: ") && err.contains("/nonexistent/sim.yaml"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

//! The shipped binary at its edges: its version, and a user's mistake told on one line, without
//! a backtrace. (Being this package's integration test, it also has `cargo test` build the
//! binary beside the workspace's integration tests, which run it.)

use std::process::Command;

#[test]
fn version_names_the_package() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpick"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("fleetpick {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_missing_fleet_file_is_named_on_one_line_without_a_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpick"))
        .args(["check-config", "/nonexistent/fleet.yaml"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "fleetpick: cannot read fleet file /nonexistent/fleet.yaml: No such file or directory (os error 2)"
    );
}

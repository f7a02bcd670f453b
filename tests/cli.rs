//! The command line's own checks: `fleetpick check-config`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn check_config_accepts_the_example_and_names_errors() {
    let bin = env!("CARGO_BIN_EXE_fleetpick");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleet.yaml");
    let out = std::process::Command::new(bin)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("ok: 3 clusters in 2 regions, 2 pools (2 imported, 1 in dry run), 6 endpoints served, 2 models and 2 LoRA adapters, 1 rewrites, 1 pools with session affinity, 3 objectives; picker region: us-east1"),
        "{said}"
    );

    let dir = common::TempDir::new("fleet");
    // The manifests the example names, beside the copy.
    std::fs::create_dir_all(dir.0.join("k8s")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/k8s/inference.yaml"),
        dir.0.join("k8s/inference.yaml"),
    )
    .unwrap();
    let bad = dir.0.join("fleet.yaml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("      us-west: [10.1.2.10]", "      eu-west: [10.1.2.10]");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(bin)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fleet.yaml:41: pools[1].endpoints.eu-west: no cluster named `eu-west`"),
        "{err}"
    );
}

#[tokio::test]
async fn logs_can_be_json_lines() {
    let dir = common::TempDir::new("json-logs");
    let ready = dir.0.join("ready.json");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetpick"))
        .args([
            "--log-format",
            "json",
            "sim",
            "--servers",
            "1",
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for(
        "the simulator's ready file",
        std::time::Duration::from_secs(30),
        || {
            let ready = ready.clone();
            async move { ready.exists().then_some(()) }
        },
    )
    .await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "simulated fleet ready"),
        "{stderr}"
    );
}

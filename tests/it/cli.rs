//! The command line's own checks: `fleetpick check-config`.

use fleetpick_tests as common;

#[test]
fn check_config_accepts_the_example_and_names_errors() {
    let bin = common::bin("fleetpick");
    let example = &common::repo("examples/fleet.yaml");
    let out = common::succeeds(
        std::process::Command::new(bin)
            .arg("check-config")
            .arg(example),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("ok: 3 clusters in 2 regions, 2 pools (2 imported, 1 in dry run), 6 endpoints served, 2 models and 2 LoRA adapters, 1 rewrites, 1 pools with session affinity, 3 objectives; picker region: us-east1"),
        "{said}"
    );

    let dir = common::scratch("fleet");
    // The manifests the example names, beside the copy.
    std::fs::create_dir_all(dir.path().join("k8s")).unwrap();
    std::fs::copy(
        common::repo("examples/k8s/inference.yaml"),
        dir.path().join("k8s/inference.yaml"),
    )
    .unwrap();
    let bad = dir.path().join("fleet.yaml");
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

/// Starts `bin` with `args` (then `--ready-file`), waits for the ready file, stops it and
/// returns its stderr, every line of which must be a JSON object.
async fn json_log_lines(bin: &str, args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let dir = common::scratch("json-logs");
    let ready = dir.path().join("ready.json");
    let mut child = std::process::Command::new(common::bin(bin))
        .args(["--log-format", "json"])
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for("the ready file", std::time::Duration::from_secs(30), || {
        let ready = ready.clone();
        let exited = child.try_wait().ok().flatten();
        async move {
            assert!(exited.is_none(), "{bin} exited early: {exited:?}");
            ready.exists().then_some(())
        }
    })
    .await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (stderr, lines)
}

#[tokio::test]
async fn logs_can_be_json_lines() {
    let dir = common::scratch("json-fleet");
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(
        &fleet,
        "clusters: [{name: a}]\npools: [{name: p, models: [m], target_port: 9, endpoints: {a: [127.0.0.1]}}]\n",
    )
    .unwrap();
    let fleet = fleet.to_str().unwrap();
    let (stderr, lines) = json_log_lines(
        "fleetpick",
        &["serve", "--listen", "127.0.0.1:0", "--config", fleet],
    )
    .await;
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO"
                && v["fields"]["message"] == "fleetpick ext_proc listening"),
        "{stderr}"
    );
    // The lab's commands log the same way.
    let (stderr, lines) = json_log_lines("fleetpick-lab", &["sim", "--servers", "1"]).await;
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "simulated fleet ready"),
        "{stderr}"
    );
}

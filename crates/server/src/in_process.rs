//! fleetpick inside another process: on its own Tokio runtime and threads, as `fleetpick serve`
//! runs it (so it shares no worker threads with the caller's load generator or simulator), for
//! the demo, the benchmarks and tests that read its fleet directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetpick_config::FleetConfig;
use fleetpick_core::fleet::{Fleet, FleetCell};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::serve::{Io, run};

/// How long a stopping [`InProcess`] waits for open streams. Short: its users stop it when
/// their clients are done (or, in tests, while the client's own connection waits on the very
/// thread that is stopping it, so a longer grace would only be waited out).
pub const IN_PROCESS_GRACE: Duration = Duration::from_millis(200);

/// A hook run on each of fleetpick's threads as it starts (the benchmarks record the thread ids
/// to read their CPU time).
pub type ThreadHook = Arc<dyn Fn() + Send + Sync>;

/// How to start an [`InProcess`] fleetpick.
#[derive(Default, Clone)]
pub struct Options {
    /// Serve `/metrics` on a free loopback port too.
    pub metrics: bool,
    /// Run on every thread fleetpick starts (its runtime's workers and its main thread).
    pub on_thread_start: Option<ThreadHook>,
}

/// A fleetpick running in this process. Dropping it stops the server: open streams get
/// [`IN_PROCESS_GRACE`] to finish, then its threads are joined.
#[derive(Debug)]
pub struct InProcess {
    /// The ext_proc listener's address.
    pub addr: SocketAddr,
    /// The fleet it serves (it does not watch a file: this stays its only generation).
    pub fleet: Arc<Fleet>,
    /// Its `/metrics` listener, when started with one.
    pub metrics: Option<SocketAddr>,
    /// Cancelled to stop it.
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Starts fleetpick on `cfg`, listening on a free loopback port.
    pub fn start(cfg: FleetConfig) -> std::io::Result<InProcess> {
        InProcess::start_with(cfg, Options::default())
    }

    /// [`InProcess::start`] with `options`.
    pub fn start_with(cfg: FleetConfig, options: Options) -> std::io::Result<InProcess> {
        let hook = options.on_thread_start.unwrap_or_else(|| Arc::new(|| {}));
        let on_start = hook.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fleetpick")
            .on_thread_start(move || on_start())
            .enable_all()
            .build()?;
        let bind = || -> std::io::Result<(TcpListener, SocketAddr)> {
            let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            std_listener.set_nonblocking(true)?;
            let addr = std_listener.local_addr()?;
            let _guard = rt.enter();
            Ok((TcpListener::from_std(std_listener)?, addr))
        };
        let (grpc, addr) = bind()?;
        let (metrics_listener, metrics) = match options.metrics {
            true => {
                let (l, a) = bind()?;
                (Some(l), Some(a))
            }
            false => (None, None),
        };
        let fleet = Arc::new(Fleet::new(&cfg));
        let cell = Arc::new(FleetCell::new(fleet.clone()));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let io = Io {
            grpc,
            tls: None,
            metrics: metrics_listener,
            config_file: None,
        };
        let thread = std::thread::Builder::new()
            .name("fleetpick".into())
            .spawn(move || {
                hook();
                rt.block_on(serve_until(cell, cfg, io, stopped));
                rt.shutdown_timeout(IN_PROCESS_GRACE);
            })?;
        Ok(InProcess {
            addr,
            fleet,
            metrics,
            stop,
            thread: Some(thread),
        })
    }
}

/// Serves until `stop` is cancelled, then at most [`IN_PROCESS_GRACE`] longer.
async fn serve_until(cell: Arc<FleetCell>, cfg: FleetConfig, io: Io, stop: CancellationToken) {
    let served = run(cell, &cfg, io, stop.clone().cancelled_owned());
    // A client that keeps its connection open must not hold the stop forever.
    let bounded = async move {
        stop.cancelled().await;
        tokio::time::sleep(IN_PROCESS_GRACE).await;
    };
    tokio::select! {
        result = served => {
            if let Err(e) = result {
                tracing::warn!(error = %e, "fleetpick stopped with an error");
            }
        }
        () = bounded => {}
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

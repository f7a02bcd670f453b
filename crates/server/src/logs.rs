//! Logs (and, with the `otlp` feature, exported request spans) for fleetpick's commands: to
//! stderr, for people or as JSON lines, levels from `RUST_LOG`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    #[default]
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// What must live as long as the process for logs and traces (the OTLP exporter, flushed when
/// it drops).
#[cfg(feature = "otlp")]
pub type LogGuard = Option<crate::trace::otlp::Guard>;
/// What must live as long as the process for logs and traces (nothing, without `otlp`).
#[cfg(not(feature = "otlp"))]
#[derive(Debug)]
pub struct LogGuard;

/// Why logs could not be set up: only the OTLP exporter can fail.
#[cfg(feature = "otlp")]
pub type InitError = crate::trace::otlp::OtlpError;
/// Why logs could not be set up: only the OTLP exporter can fail.
#[cfg(not(feature = "otlp"))]
pub type InitError = std::convert::Infallible;

/// Logs to stderr in `format`, levels from `RUST_LOG` (default `info`); with the `otlp`
/// feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, request spans exported too. Call inside the
/// Tokio runtime: the OTLP exporter's gRPC client lives on it.
pub fn init(format: LogFormat) -> Result<LogGuard, InitError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let logs = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otlp")]
    {
        let (layer, guard) = crate::trace::otlp::layer()?.unzip();
        let exporting = layer.is_some();
        logs.with(layer).init();
        crate::trace::otlp::ENABLED.store(exporting, std::sync::atomic::Ordering::Relaxed);
        if exporting {
            tracing::info!("exporting request spans over OTLP");
        }
        Ok(guard)
    }
    #[cfg(not(feature = "otlp"))]
    {
        logs.init();
        Ok(LogGuard)
    }
}

/// Why a command could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Logs(#[from] InitError),
}

/// The runtime each command runs on (Tokio, multi-threaded) with logs set up on it in `format`
/// (inside the runtime: the OTLP exporter's gRPC client lives on it). Keep the guard as long
/// as the runtime.
pub fn runtime(format: LogFormat) -> Result<(tokio::runtime::Runtime, LogGuard), StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let guard = {
        let _entered = runtime.enter();
        init(format)?
    };
    Ok((runtime, guard))
}

/// A command's exit: 0 when it succeeded, else 1 after its error on stderr as one line naming
/// every cause, never a backtrace (a user's mistake is no crash, whatever `RUST_BACKTRACE`
/// says).
pub fn exit<E>(program: &str, result: Result<(), E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause named once (many errors here say their
/// cause in their own message already).
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {0}: {1}")]
    struct Says(&'static str, #[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Wraps(#[source] Says);

    #[test]
    fn every_cause_is_named_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(one_line(&Says("f.yaml", io())), "cannot read f.yaml: gone");
        assert_eq!(
            one_line(&Wraps(Says("f.yaml", io()))),
            "cannot start: cannot read f.yaml: gone"
        );
    }
}

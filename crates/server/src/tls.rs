//! TLS for the ext_proc listener (rustls): the certificate chain, its key and, for mutual TLS,
//! the CA that client certificates must chain to, read from PEM files and re-read when they
//! change, so that a rotated certificate (a renewed Kubernetes secret, cert-manager) applies to
//! new connections without a restart; open connections keep the one they began with. A change
//! that does not load (a half-written file, a key that does not match) is logged and the last
//! good configuration stays.
//!
//! Handshakes run in their own tasks, bounded in time ([`HANDSHAKE_TIMEOUT`]) and number
//! ([`MAX_HANDSHAKES`]), so that a slow or silent client holds up nobody; the established
//! streams go to tonic as its incoming connections. Failed handshakes are logged at debug level
//! (`RUST_LOG=fleetpick::tls=debug`): a scanner must not flood the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

use fleetpick_config::TlsSettings;

/// How long a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once, at most: a connection that comes while this many wait is
/// closed at once, so that silent clients cannot hold every file descriptor (Envoy opens a few
/// long-lived connections and is never near it).
pub const MAX_HANDSHAKES: usize = 256;
/// How often the files are compared with what was loaded.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.{field}: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("server.tls.{field}: {path}: {what}")]
    Pem {
        field: &'static str,
        path: String,
        what: String,
    },
    #[error("server.tls.key_file {key}: not usable with server.tls.cert_file {cert}: {source}")]
    KeyPair {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("server.tls: {0}")]
    Config(#[from] rustls::Error),
    #[error("server.tls.client_ca_file {path}: {source}")]
    ClientCa {
        path: String,
        source: rustls::server::VerifierBuilderError,
    },
}

/// The listener's TLS configuration, as last loaded from its files.
#[derive(Debug)]
pub struct Tls {
    files: TlsSettings,
    current: ArcSwap<ServerConfig>,
    /// The files' contents behind `current`: what a re-read is compared with.
    loaded: parking_lot::Mutex<Vec<Vec<u8>>>,
}

impl Tls {
    /// Loads the files (paths relative to `base`, the fleet file's directory); an error names
    /// the file.
    pub fn load(settings: &TlsSettings, base: &Path) -> Result<Tls, TlsError> {
        let files = TlsSettings {
            cert_file: base.join(&settings.cert_file),
            key_file: base.join(&settings.key_file),
            client_ca_file: settings.client_ca_file.as_ref().map(|p| base.join(p)),
        };
        let contents = read_all(&files)?;
        let config = server_config(&files, &contents)?;
        Ok(Tls {
            files,
            current: ArcSwap::from_pointee(config),
            loaded: parking_lot::Mutex::new(contents),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// Re-reads the files; applies them if they changed and load. Returns whether they changed
    /// and applied.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let contents = read_all(&self.files)?;
        let mut loaded = self.loaded.lock();
        if *loaded == contents {
            return Ok(false);
        }
        let config = server_config(&self.files, &contents)?;
        self.current.store(Arc::new(config));
        *loaded = contents;
        Ok(true)
    }

    /// Re-reads the files every [`RELOAD_EVERY`] (run it as a task; it never returns). A failed
    /// load is logged once per distinct reason.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                    last_error = None;
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    let why = e.to_string();
                    if last_error.as_ref() != Some(&why) {
                        tracing::error!(error = %why, "TLS files not reloaded; the last good ones stay");
                        last_error = Some(why);
                    }
                }
            }
        }
    }

    /// The TLS connections made on `listener`: each accepted socket's handshake runs in its own
    /// task; failed or slow handshakes are logged and dropped. Accepting stops when the stream
    /// is dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many TLS handshakes under way: connection closed");
                    continue;
                };
                // Small ext_proc answers must not wait for delayed ACKs (see `serve`).
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The files' contents, in the order cert, key, client CA.
fn read_all(files: &TlsSettings) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut paths: Vec<(&'static str, &PathBuf)> = vec![
        ("cert_file", &files.cert_file),
        ("key_file", &files.key_file),
    ];
    paths.extend(files.client_ca_file.iter().map(|p| ("client_ca_file", p)));
    paths
        .into_iter()
        .map(|(field, p)| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                field,
                path: p.display().to_string(),
                source,
            })
        })
        .collect()
}

fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |what: String| TlsError::Pem {
        field,
        path: path.display().to_string(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn server_config(files: &TlsSettings, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("cert_file", &files.cert_file, &contents[0])?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| TlsError::Pem {
        field: "key_file",
        path: files.key_file.display().to_string(),
        what: format!("no private key: {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match (&files.client_ca_file, contents.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certs("client_ca_file", path, pem)? {
                roots.add(ca)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: path.display().to_string(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::KeyPair {
            cert: files.cert_file.display().to_string(),
            key: files.key_file.display().to_string(),
            source,
        })?;
    // gRPC is HTTP/2: say so, or a client that insists on ALPN (Envoy does) gives up.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

//! TLS on the ext_proc listener: the real Envoy reaches fleetpick over mutual TLS and requests
//! pass end to end; a client without the CA, without a client certificate, or speaking
//! plaintext gets nowhere; a rotated certificate applies to new connections without a restart.
//! Certificates are made per run (rcgen).

use fleetpick_tests as common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::envoy;
use common::{Picker, Sim, client, fleet_yaml, scratch, wait_for};
use fleetpick_envoy::{BodyMode, EnvoyParams, ExtProcTls, Flavor};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// The name in fleetpick's certificate.
const NAME: &str = "fleetpick";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf certificate for `name` and its key, PEM.
    fn issue(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// Writes `text` to `path` atomically (as a secret update does).
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client trusting `ca` (PEM), presenting `identity` (cert, key PEM) if given.
fn client_config(ca: &str, identity: Option<&(String, String)>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Whether an HTTP/2 session opens over TLS with `config`: the handshake completes and the
/// server's first frame (its SETTINGS) arrives. With TLS 1.3 a refused client certificate
/// shows only then, as an alert instead of the frame.
async fn session_opens(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> bool {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from(NAME).unwrap();
        let mut tls = TlsConnector::from(config).connect(name, tcp).await.ok()?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        tls.flush().await.ok()?;
        let mut frame = [0u8; 9];
        tls.read_exact(&mut frame).await.ok()?;
        // Frame type 4: SETTINGS.
        Some(frame[3] == 4)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test]
async fn envoy_reaches_fleetpick_over_mutual_tls_and_strangers_do_not() {
    let dir = scratch("tls");
    let ca = Ca::new("fleetpick test CA");
    let (server_cert, server_key) = ca.issue(NAME, ExtendedKeyUsagePurpose::ServerAuth);
    let envoy_identity = ca.issue("envoy", ExtendedKeyUsagePurpose::ClientAuth);
    let file = |name: &str| dir.path().join(name);
    put(&file("ca.crt"), &ca.pem());
    put(&file("fleetpick.crt"), &server_cert);
    put(&file("fleetpick.key"), &server_key);
    put(&file("envoy.crt"), &envoy_identity.0);
    put(&file("envoy.key"), &envoy_identity.1);

    let sim = Sim::start(&["--servers", "1", "--time-scale", "20"]).await;
    let tls = format!(
        "server: {{tls: {{cert_file: {}, key_file: {}, client_ca_file: {}}}}}\npoller: {{interval_ms: 20}}\n",
        file("fleetpick.crt").display(),
        file("fleetpick.key").display(),
        file("ca.crt").display(),
    );
    let picker = Picker::start(&fleet_yaml(&sim.entries, &tls)).await;

    // Envoy, configured as the shipped envoy/envoy-tls.yaml is (the same rendering), with
    // this run's files.
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let params = EnvoyParams {
        listen: loopback,
        admin: loopback,
        extproc: picker.grpc,
        endpoints: sim
            .entries
            .iter()
            .map(|e| e.address.parse().unwrap())
            .collect(),
        body_mode: BodyMode::FullDuplex,
        localities: Vec::new(),
        extproc_tls: Some(ExtProcTls {
            ca_file: file("ca.crt").display().to_string(),
            client_cert: Some((
                file("envoy.crt").display().to_string(),
                file("envoy.key").display().to_string(),
            )),
            server_name: NAME.into(),
        }),
    };
    let config = fleetpick_envoy::render(Flavor::OriginalDst, &params);
    envoy::validate(&config);
    let envoy = envoy::start(&config).await;
    envoy::until_routing(&envoy).await;
    let url = envoy.url("/v1/completions");
    for _ in 0..5 {
        let (status, server) = common::complete(&client(), &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(server.as_deref(), Some(sim.entries[0].name.as_str()));
    }

    // The same client as Envoy's opens a session: the refusals below are about what differs.
    let addr = picker.grpc;
    assert!(session_opens(addr, client_config(&ca.pem(), Some(&envoy_identity))).await);
    // Without the CA: fleetpick's certificate is not trusted.
    let stranger = Ca::new("another CA");
    let stranger_identity = stranger.issue("intruder", ExtendedKeyUsagePurpose::ClientAuth);
    assert!(!session_opens(addr, client_config(&stranger.pem(), Some(&envoy_identity))).await);
    // With the CA but no client certificate, or one from another CA: refused by fleetpick.
    assert!(!session_opens(addr, client_config(&ca.pem(), None)).await);
    assert!(!session_opens(addr, client_config(&ca.pem(), Some(&stranger_identity))).await);
    // Plaintext gRPC: no answer.
    let plaintext = tokio::time::timeout(Duration::from_secs(10), async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut frame = [0u8; 9];
        tcp.read_exact(&mut frame).await.is_ok() && frame[3] == 4
    })
    .await
    .unwrap_or(false);
    assert!(!plaintext, "a plaintext HTTP/2 session opened");

    // Rotation: a certificate from a new CA replaces the old one on disk; new connections get
    // it without a restart (and Envoy's open connection goes on serving).
    let next_ca = Ca::new("next CA");
    let (next_cert, next_key) = next_ca.issue(NAME, ExtendedKeyUsagePurpose::ServerAuth);
    put(&file("fleetpick.key"), &next_key);
    put(&file("fleetpick.crt"), &next_cert);
    let trusts_next = client_config(&next_ca.pem(), Some(&envoy_identity));
    wait_for(
        "the rotated certificate served",
        Duration::from_secs(20),
        || {
            let config = trusts_next.clone();
            async move { session_opens(addr, config).await.then_some(()) }
        },
    )
    .await;
    assert!(!session_opens(addr, client_config(&ca.pem(), Some(&envoy_identity))).await);
    let (status, _) = common::complete(&client(), &url, &[]).await;
    assert_eq!(status, 200, "Envoy's open connection keeps serving");
}

#[test]
fn check_config_loads_the_tls_files_and_names_the_one_that_fails() {
    let dir = scratch("tls-check");
    let ca = Ca::new("fleetpick test CA");
    let (cert, key) = ca.issue(NAME, ExtendedKeyUsagePurpose::ServerAuth);
    put(&dir.path().join("ca.crt"), &ca.pem());
    put(&dir.path().join("fleetpick.crt"), &cert);
    put(&dir.path().join("fleetpick.key"), &key);
    let fleet = dir.path().join("fleet.yaml");
    let check = |tls: &str| {
        put(
            &fleet,
            &format!(
                "server: {{tls: {tls}}}\nclusters: [{{name: a}}]\npools: [{{name: p, models: [m], target_port: 80, endpoints: {{a: [10.0.0.1]}}}}]\n"
            ),
        );
        std::process::Command::new(common::bin("fleetpick"))
            .args(["check-config"])
            .arg(&fleet)
            .output()
            .unwrap()
    };
    // Relative to the fleet file's directory.
    let out = check("{cert_file: fleetpick.crt, key_file: fleetpick.key, client_ca_file: ca.crt}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ext_proc TLS: mutual"));
    // A key that is not the certificate's.
    let (_, other_key) = ca.issue(NAME, ExtendedKeyUsagePurpose::ServerAuth);
    put(&dir.path().join("other.key"), &other_key);
    let out = check("{cert_file: fleetpick.crt, key_file: other.key}");
    assert!(!out.status.success(), "a mismatched key passed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.key_file") && err.contains("other.key"),
        "{err}"
    );
    // A key file with no key in it (the CA's certificate), and a missing file: named.
    let out = check("{cert_file: fleetpick.crt, key_file: ca.crt}");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.key_file")
            && err.contains("ca.crt")
            && err.contains("no private key"),
        "{err}"
    );
    let out = check("{cert_file: missing.crt, key_file: fleetpick.key}");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.cert_file") && err.contains("missing.crt"),
        "{err}"
    );
}

//! TLS termination: HTTPS and SSE with a certificate generated here (openssl), no plaintext on
//! the TLS port, and a renewed certificate served to new connections without a restart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rollgate_proxy_tests::target::{ProxyConfig, TempDir};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![scenario!(
        https_and_sse_with_a_certificate_reloaded_on_change
    )]
}

/// A self-signed P-256 leaf certificate for 127.0.0.1 written to `cert` and `key`.
fn generate(cert: &Path, key: &Path, name: &str) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // A leaf, not a CA: webpki refuses a CA certificate as the server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req: {status}");
}

/// A client that trusts only the certificate in `cert`.
fn trusting(cert: &Path) -> reqwest::Client {
    let pem = std::fs::read(cert).expect("the certificate");
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("PEM"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn https_and_sse_with_a_certificate_reloaded_on_change() {
    if !target().is_process() {
        println!("(skipped on this target: Cloudflare terminates TLS for a Worker)");
        return;
    }
    let dir = TempDir::new("tls").unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    generate(&cert, &key, "first");
    let flags_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/flags.json");
    let proxy = start_proxy(ProxyConfig {
        flags_file: Some(flags_file),
        extra_args: vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        ..ProxyConfig::default()
    })
    .await;
    assert!(
        proxy.base_url().starts_with("https://"),
        "{}",
        proxy.base_url()
    );
    let first = trusting(&cert);
    let flags = eventually("HTTPS /api/flags", Duration::from_secs(15), || {
        let req = first.get(proxy.url("/api/flags"));
        async move {
            let resp = send(req).await.ok()?;
            (resp.status == 200).then(|| resp.json())
        }
    })
    .await;
    assert!(flags["flags"]["new-checkout"].is_boolean(), "{flags}");
    let mut stream = sse_req(first.get(proxy.url("/api/stream"))).await;
    let event = next_event(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(event.event, "flags");
    // No plaintext on the TLS port.
    let plain = format!("http://127.0.0.1:{}/live", proxy.port());
    assert!(
        get(&plain).await.is_err(),
        "plain HTTP answered on the TLS port"
    );

    // Renewal: the new pair replaces the old one by rename, as certificate tools do.
    let (next_cert, next_key) = (dir.join("next-cert.pem"), dir.join("next-key.pem"));
    generate(&next_cert, &next_key, "second");
    std::fs::rename(&next_key, &key).unwrap();
    std::fs::rename(&next_cert, &cert).unwrap();
    let second = trusting(&cert);
    eventually("the renewed certificate", Duration::from_secs(15), || {
        let req = second.get(proxy.url("/live"));
        async move { (send(req).await.ok()?.status == 200).then_some(()) }
    })
    .await;
    assert!(
        send(first.get(proxy.url("/live"))).await.is_err(),
        "new connections no longer get the old certificate"
    );
    assert!(
        proxy
            .wait_log("reloaded the TLS certificate", Duration::from_secs(10))
            .await,
        "{}",
        proxy.logs()
    );
    // The stream opened before the renewal is still served.
    assert!(
        collect_for(&mut stream, Duration::from_millis(200))
            .await
            .0
            .is_empty(),
        "no spurious event"
    );
}

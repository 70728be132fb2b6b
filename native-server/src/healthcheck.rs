//! `rollgate-proxy healthcheck`: one bounded `GET /ready` over blocking std I/O (over TLS when
//! the proxy terminates TLS), for images with no shell, curl or wget (Docker `HEALTHCHECK`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, ring::default_provider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::rustls;

/// Why the proxy is not healthy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// Connect, write or read failed (or timed out).
    #[error("{addr}: {source}")]
    Io {
        /// The probed address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer was not an HTTP status line.
    #[error("{addr}: not an HTTP answer: {line:?}")]
    NotHttp {
        /// The probed address.
        addr: SocketAddr,
        /// What came back (at most one short line).
        line: String,
    },
    /// The TLS certificate to expect could not be read, or the handshake failed.
    #[error("{addr}: TLS: {message}")]
    Tls {
        /// The probed address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// An answer other than 200.
    #[error("{addr}: /ready answered {status}")]
    NotReady {
        /// The probed address.
        addr: SocketAddr,
        /// The status.
        status: u16,
    },
}

/// Longest status line read; an HTTP/1.1 status line for `/ready` is ~20 bytes.
const MAX_HEAD: usize = 512;

/// `GET /ready` on `addr` within `timeout` in total; `Ok` on 200. With `tls_cert` (the proxy's
/// `--tls-cert`) it speaks TLS and accepts exactly the certificate in that file: the proxy's
/// name need not cover the loopback address it is probed on.
pub(crate) fn probe(
    addr: SocketAddr,
    timeout: Duration,
    tls_cert: Option<&Path>,
) -> Result<(), ProbeError> {
    let io = |source| ProbeError::Io { addr, source };
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let tcp = TcpStream::connect_timeout(&addr, left()).map_err(io)?;
    // Timeouts are per socket, so this handle bounds every read and write of the stream below.
    let socket = tcp.try_clone().map_err(io)?;
    let Some(cert) = tls_cert else {
        return exchange(addr, tcp, &socket, &left);
    };
    let tls_error = |message: String| ProbeError::Tls { addr, message };
    let pinned = CertificateDer::from_pem_file(cert)
        .map_err(|error| tls_error(format!("{}: {error}", cert.display())))?;
    let provider = default_provider();
    let verifier = Pinned {
        cert: pinned,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let connection = rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
        .map_err(|error| tls_error(error.to_string()))?;
    exchange(
        addr,
        rustls::StreamOwned::new(connection, tcp),
        &socket,
        &left,
    )
}

/// Sends the request on `stream` and reads the status line, every step bounded by `left()`.
fn exchange(
    addr: SocketAddr,
    mut stream: impl Read + Write,
    socket: &TcpStream,
    left: &dyn Fn() -> Duration,
) -> Result<(), ProbeError> {
    let io = |source| ProbeError::Io { addr, source };
    let host = addr.to_string();
    let request = format!(
        "GET /ready HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rollgate-proxy-healthcheck\r\nConnection: close\r\n\r\n"
    );
    socket.set_write_timeout(Some(left())).map_err(io)?;
    socket.set_read_timeout(Some(left())).map_err(io)?;
    stream.write_all(request.as_bytes()).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0_u8; 128];
    // Bounded: every read adds at least one byte or ends the loop, and `head` is capped.
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        socket.set_read_timeout(Some(left())).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(200) => Ok(()),
        Some(status) => Err(ProbeError::NotReady { addr, status }),
        None => Err(ProbeError::NotHttp {
            addr,
            line: line.chars().take(80).collect(),
        }),
    }
}

/// Accepts exactly one certificate (the proxy's own, read from `--tls-cert`) and checks the
/// handshake signatures with it, so the probe is not fooled by another listener on the port.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one in --tls-cert".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead as _;
    use std::net::TcpListener;

    use super::*;

    /// A one-shot server that answers the first request with `answer` and returns the request.
    fn serve_once(answer: &'static str) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                request.push_str(&line);
            }
            conn.write_all(answer.as_bytes()).unwrap();
            request
        });
        (addr, handle)
    }

    #[test]
    fn ok_on_200_and_asks_ready() {
        let (addr, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        probe(addr, Duration::from_secs(5), None).unwrap();
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /ready HTTP/1.1\r\n")
        );
    }

    #[test]
    fn not_ready_on_503_and_garbage() {
        let (addr, server) = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let error = probe(addr, Duration::from_secs(5), None).unwrap_err();
        assert!(
            matches!(error, ProbeError::NotReady { status: 503, .. }),
            "{error}"
        );
        server.join().unwrap();
        let (addr, server) = serve_once("SSH-2.0-OpenSSH\r\n");
        let error = probe(addr, Duration::from_secs(5), None).unwrap_err();
        assert!(matches!(error, ProbeError::NotHttp { .. }), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped: the port refuses connections.
        let error = probe(addr, Duration::from_secs(2), None).unwrap_err();
        assert!(matches!(error, ProbeError::Io { .. }), "{error}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let error = probe(addr, Duration::from_millis(300), None).unwrap_err();
        assert!(matches!(error, ProbeError::Io { .. }), "{error}");
        drop(listener);
    }
}

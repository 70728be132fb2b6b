//! TLS termination (`--tls-cert`/`--tls-key`): rustls with ring, and a certificate that is
//! reloaded when its files change, so a renewal needs no restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;

/// How often the certificate and key files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PEM content is not what it should be.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("certificate and key rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate files and the configuration currently served from them.
#[derive(Clone)]
pub struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Loads the pair once (a configuration error at start when it fails).
    ///
    /// # Errors
    /// A file is unreadable, holds no certificate or key, or the key does not match.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let config = server_config(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(config) => Arc::clone(&config),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Until `shutdown`: every [`RELOAD_CHECK`], when either file's modification time or size
    /// changed, loads the pair again and serves it to new connections. A pair that fails to
    /// load is logged and the previous one kept (a renewal may write the two files apart).
    pub async fn watch(self, shutdown: CancellationToken) {
        let mut seen = (stamp(&self.cert), stamp(&self.key));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let now = (stamp(&self.cert), stamp(&self.key));
            if now == seen {
                continue;
            }
            match server_config(&self.cert, &self.key) {
                Ok(config) => {
                    match self.current.write() {
                        Ok(mut current) => *current = config,
                        Err(poisoned) => *poisoned.into_inner() = config,
                    }
                    seen = now;
                    tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS certificate changed but does not load; serving the previous one");
                }
            }
        }
    }
}

/// Modification time and length: a cheap change detector that needs no file watcher.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pem_error = |path: &Path, message: String| TlsError::Pem {
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(cert, error.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no CERTIFICATE in the file".to_owned()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|error| pem_error(key, format!("no private key: {error}")))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    // HTTP/1.1 only, as the plain listener.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

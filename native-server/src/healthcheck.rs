//! `rollgate-proxy healthcheck`: one bounded `GET /ready` over plain std I/O, for images with
//! no shell, curl or wget (Docker `HEALTHCHECK`, compose `healthcheck`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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

/// `GET /ready` on `addr` within `timeout` in total; `Ok` on 200.
pub(crate) fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let io = |source| ProbeError::Io { addr, source };
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()).map_err(io)?;
    stream.set_write_timeout(Some(left())).map_err(io)?;
    let host = addr.to_string();
    let request = format!(
        "GET /ready HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rollgate-proxy-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0_u8; 128];
    // Bounded: every read adds at least one byte or ends the loop, and `head` is capped.
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        stream.set_read_timeout(Some(left())).map_err(io)?;
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
        probe(addr, Duration::from_secs(5)).unwrap();
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
        let error = probe(addr, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(error, ProbeError::NotReady { status: 503, .. }),
            "{error}"
        );
        server.join().unwrap();
        let (addr, server) = serve_once("SSH-2.0-OpenSSH\r\n");
        let error = probe(addr, Duration::from_secs(5)).unwrap_err();
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
        let error = probe(addr, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(error, ProbeError::Io { .. }), "{error}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let error = probe(addr, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(error, ProbeError::Io { .. }), "{error}");
        drop(listener);
    }
}

//! The lean path for long-lived streams: plain-TCP `GET`s of a stream route skip hyper, whose
//! read and write buffers (~11 KiB per connection at rest) would be held for the stream's life.
//!
//! The accept loop's connection task peeks at the first segment. When it holds a complete
//! HTTP/1.1 `GET` head for a stream route (core's [`Route::is_stream`]) with no body and no
//! connection options, the head is consumed and the request goes through the same handler as
//! every other request (the server's router: environment routing, limits, keys, CORS, request
//! id, metrics, core's `Subscriber`), so the answer is decided once. This module only writes that answer the
//! way hyper would (same status line, headers in the same order, `transfer-encoding: chunked`
//! or `content-length`, `date`, chunk framing) and owns no buffer while idle: a frame is a shared
//! `Bytes` held only until the socket took it, and reads (to notice a closed client) go into a
//! thread-local scratch buffer. Anything else (a partial or unusual head, TLS) stays on hyper,
//! and a connection whose stream ended cleanly (max age) is handed to hyper for keep-alive.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::task::Poll;
use std::time::SystemTime;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use rollgate_proxy_core::api::Route;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::server::Handler;

/// Size of the per-thread scratch buffer: the longest head the lean path takes (longer ones go
/// to hyper, which enforces the configured limits).
const SCRATCH: usize = 8192;
/// Most header lines the lean path parses (more go to hyper).
const MAX_HEADERS: usize = 48;
/// Kernel send buffer of a stream socket. Without it Linux autotunes a stalled socket's buffer
/// up to `tcp_wmem`'s maximum (4 MiB): a few thousand clients that never read then hold
/// gigabytes of kernel memory, push TCP into memory pressure and stall every other connection
/// (polls took seconds). A client that reads gets a large frame in a few writes instead.
const STREAM_SEND_BUFFER: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// What the first segment of a connection is.
#[derive(Debug)]
pub enum Peeked {
    /// A stream request for the lean path; the head is `len` bytes long.
    Stream(Box<Request<Body>>, usize),
    /// Anything else: hyper serves it (nothing was consumed).
    Other,
    /// The client closed before sending anything.
    Closed,
}

/// Waits for the first bytes of `stream` and classifies them without consuming any.
///
/// # Errors
/// The socket's error.
pub async fn peek(stream: &TcpStream) -> io::Result<Peeked> {
    std::future::poll_fn(|cx| {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match stream.poll_peek(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                Poll::Ready(Ok(0)) => Poll::Ready(Ok(Peeked::Closed)),
                Poll::Ready(Ok(_)) => Poll::Ready(Ok(classify(buf.filled()))),
            }
        })
    })
    .await
}

/// A complete `GET` head of a stream route that the lean path can answer exactly as hyper
/// would; [`Peeked::Other`] for everything else.
fn classify(bytes: &[u8]) -> Peeked {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = head.parse(bytes) else {
        return Peeked::Other;
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Peeked::Other;
    }
    let Some(uri) = head.path.and_then(|path| path.parse::<Uri>().ok()) else {
        return Peeked::Other;
    };
    if !Route::parse("GET", uri.path()).is_ok_and(|route| route.is_stream()) {
        return Peeked::Other;
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    let map = request.headers_mut();
    for header in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Peeked::Other;
        };
        // A body, an upgrade or connection options: hyper's rules apply, so hyper answers.
        let keep_alive = name == CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"keep-alive");
        if !keep_alive
            && [
                CONNECTION,
                CONTENT_LENGTH,
                TRANSFER_ENCODING,
                UPGRADE,
                EXPECT,
                TE,
            ]
            .contains(&name)
        {
            return Peeked::Other;
        }
        map.append(name, value);
    }
    Peeked::Stream(Box::new(request), len)
}

/// How a lean answer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The answer is complete and the connection is clean: hyper may serve the next request.
    KeepAlive,
    /// Close the connection (client gone, shutdown, or bytes arrived mid-stream).
    Close,
}

/// Consumes the `len`-byte head, answers `request` through the router's handler and writes the
/// answer.
///
/// # Errors
/// The socket's error (the connection is then dropped).
pub async fn serve<H: Handler>(
    stream: &TcpStream,
    handler: &H,
    shutdown: &CancellationToken,
    request: Request<Body>,
    len: usize,
) -> io::Result<Ended> {
    consume(stream, len).await?;
    // Boxed, so the handler's state is freed once answered rather than reserved in this
    // future for the stream's life.
    let response = Box::pin(handler.call(request)).await;
    let ended = write_response(stream, response).await?;
    Ok(if shutdown.is_cancelled() {
        Ended::Close
    } else {
        ended
    })
}

/// Reads and discards exactly `len` bytes (the head already seen by [`peek`]).
async fn consume(stream: &TcpStream, mut len: usize) -> io::Result<()> {
    // Bounded: the bytes were already in the socket; each read takes at least one.
    while len > 0 {
        stream.readable().await?;
        let read = SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let want = len.min(scratch.len());
            stream.try_read(&mut scratch[..want])
        });
        match read {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => len -= n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The response head as hyper 1.x writes it: status line, the headers in order, the framing
/// header, `date`.
fn encode_head(response: &Response, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let status = response.status();
    if status == StatusCode::OK {
        head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match length {
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(len) if has_length(status) => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(len.to_string().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        Some(_) => {}
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Whether hyper writes a `content-length` for `status` (not for 1xx, 204 and 304).
fn has_length(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Writes `response`: a streaming body chunk by chunk, anything else with its length.
async fn write_response(stream: &TcpStream, response: Response) -> io::Result<Ended> {
    let length = response.body().size_hint().exact();
    let head = encode_head(&response, length);
    let status = response.status();
    let mut body = response.into_body();
    if length.is_some() {
        // Small, complete answers (errors, 304): collected at once.
        let bytes = body
            .collect()
            .await
            .map_err(|_| io::Error::other("response body failed"))?
            .to_bytes();
        let bytes = if has_length(status) {
            bytes
        } else {
            Bytes::new()
        };
        write_all(stream, &[&head, &bytes]).await?;
        return Ok(Ended::KeepAlive);
    }
    // Best effort: a socket that refuses keeps the kernel's default.
    let _ = socket2::SockRef::from(stream).set_send_buffer_size(STREAM_SEND_BUFFER);
    let mut head = Some(head);
    let mut clean = true;
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            ready = stream.readable() => {
                ready?;
                match drain(stream) {
                    Drained::Closed => return Ok(Ended::Close),
                    Drained::Data => clean = false,
                    Drained::Nothing => {}
                }
                continue;
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                // A frame that is ready at once (the first event after the `retry:` preamble)
                // goes in the same write, as hyper batches its queue: one system call, not two.
                let (second, end) = match body.frame().now_or_never() {
                    Some(Some(Ok(frame))) => (frame.into_data().unwrap_or_default(), false),
                    Some(None | Some(Err(_))) => (Bytes::new(), true),
                    None => (Bytes::new(), false),
                };
                let (first_size, first_len) = chunk_size(data.len());
                let (second_size, second_len) = chunk_size(second.len());
                let head_bytes = head.take().unwrap_or_default();
                let mut parts: [&[u8]; 8] = [
                    &head_bytes,
                    &first_size[..first_len],
                    &data,
                    b"\r\n",
                    &[],
                    &[],
                    &[],
                    &[],
                ];
                if !second.is_empty() {
                    parts[4] = &second_size[..second_len];
                    parts[5] = &second;
                    parts[6] = b"\r\n";
                }
                if end {
                    parts[7] = b"0\r\n\r\n";
                }
                write_all(stream, &parts).await?;
                if end {
                    return Ok(if clean {
                        Ended::KeepAlive
                    } else {
                        Ended::Close
                    });
                }
            }
            Some(Err(_)) => return Ok(Ended::Close),
            None => {
                let head_bytes = head.take().unwrap_or_default();
                write_all(stream, &[&head_bytes, b"0\r\n\r\n"]).await?;
                return Ok(if clean {
                    Ended::KeepAlive
                } else {
                    Ended::Close
                });
            }
        }
    }
}

/// `len` as hyper's chunk-size line (upper-case hex, CRLF), on the stack.
fn chunk_size(len: usize) -> ([u8; 18], usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[(len >> shift) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    (out, digits + 2)
}

/// What a read on a streaming connection found.
enum Drained {
    /// End of stream or an error: the client is gone.
    Closed,
    /// Bytes (a pipelined request): discarded, and the connection is closed after the stream.
    Data,
    /// A spurious wakeup.
    Nothing,
}

/// Reads what the client sent during a stream into the thread's scratch buffer.
fn drain(stream: &TcpStream) -> Drained {
    SCRATCH_BUF.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        match stream.try_read(&mut scratch[..]) {
            Ok(0) => Drained::Closed,
            Ok(_) => Drained::Data,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Drained::Nothing,
            Err(_) => Drained::Closed,
        }
    })
}

/// Writes every byte of `parts` (one `writev` when the socket takes them all).
async fn write_all(stream: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    // Bounded by `total`: every successful write makes progress; a dead socket errors.
    while written < total {
        stream.writable().await?;
        let mut skip = written;
        let mut slices = [IoSlice::new(&[]); 8];
        let mut count = 0;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            if count < slices.len() {
                slices[count] = IoSlice::new(&part[skip..]);
                count += 1;
            }
            skip = 0;
        }
        match stream.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hypers() {
        for len in [1usize, 9, 10, 15, 16, 255, 2024, 260_000, 0x1_0000_0000] {
            let (bytes, n) = chunk_size(len);
            assert_eq!(&bytes[..n], format!("{len:X}\r\n").as_bytes());
        }
    }

    #[test]
    fn only_plain_stream_gets_go_lean() {
        let lean = |head: &str| matches!(classify(head.as_bytes()), Peeked::Stream(..));
        assert!(lean("GET /api/stream HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(lean(
            "GET /api/v1/sdk/stream?user_id=u HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(lean("GET /ofrep/v1/sse HTTP/1.1\r\n\r\n"));
        assert!(!lean("GET /api/flags HTTP/1.1\r\n\r\n"));
        assert!(!lean("HEAD /api/stream HTTP/1.1\r\n\r\n"));
        // The WebSocket transport of the same route is hyper's (axum's upgrade).
        assert!(!lean(
            "GET /api/stream HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!lean("GET /api/stream HTTP/1.0\r\n\r\n"));
        assert!(!lean(
            "GET /api/stream HTTP/1.1\r\nConnection: close\r\n\r\n"
        ));
        assert!(!lean(
            "GET /api/stream HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        ));
        assert!(!lean("GET /api/stream HTTP/1.1\r\nhost: x\r\n"));
    }

    #[test]
    fn the_head_is_hypers() {
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let head = String::from_utf8(encode_head(&response, None)).unwrap();
        assert!(
            head.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                 transfer-encoding: chunked\r\ndate: "
            ),
            "{head}"
        );
        assert!(head.ends_with(" GMT\r\n\r\n"), "{head}");
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        let head = String::from_utf8(encode_head(&response, Some(5))).unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 5\r\ndate: "), "{head}");
    }
}

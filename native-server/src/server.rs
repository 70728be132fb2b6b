//! Listening and serving: a socket2 listener, an own HTTP/1 accept loop (about half the memory
//! per connection of `axum::serve`, machine-limits §4), the lean path for plain-TCP streams
//! (`crate::lean`), and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::lean::{self, Ended, Peeked};

/// Binds `addr` with a large backlog and `SO_REUSEADDR` (fast restarts).
///
/// # Errors
/// The OS error when the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

const BACKLOG: i32 = 65_535;

/// The application as the server calls it: hyper hands every request straight to it, with no
/// axum `Router` in between (a router costs, per request, a clone of its shared state, an
/// extension map and boxed futures: measurable next to a bare hyper server, BENCHMARKS.md).
/// The lean path hands it stream requests the same way.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The answer to `request`.
    fn call(&self, request: Request<Body>) -> impl Future<Output = Response> + Send;
}

/// One connection's service: the handler behind an `Arc` of the connection's own, so the
/// clone each request's future takes is a count no other connection touches (the handler's
/// shared state is cloned once per connection, not per request).
///
/// An upgrade request also carries the connection's [`ConnectionHold`], for the upgraded
/// connection to keep (only those: a poll gets no extension map).
fn connection_service<H: Handler>(
    handler: H,
    hold: ConnectionHold,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> + use<H> {
    let handler = Arc::new(handler);
    service_fn(move |request: Request<Incoming>| {
        let handler = Arc::clone(&handler);
        let mut request = request.map(Body::new);
        if request.headers().contains_key(http::header::UPGRADE) {
            request.extensions_mut().insert(hold.clone());
        }
        async move { Ok(handler.call(request).await) }
    })
}

/// Keeps graceful shutdown waiting while it lives, as a connection's own task does. An upgraded
/// connection (a WebSocket) outlives the HTTP connection it came from, so it takes one from its
/// request's extensions: without it the server could exit before the socket's close frame is
/// written.
#[derive(Clone, Debug)]
pub struct ConnectionHold {
    _task: mpsc::Sender<()>,
}

/// Serves `router` until `shutdown`, then stops accepting, lets in-flight requests finish (SSE
/// streams end on the same signal) and returns within `settings.shutdown_timeout`. Plain-TCP
/// stream requests take the lean path (`crate::lean`) through the same handler.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    settings: &Settings,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.request_timeout)
        .max_buf_size((settings.max_header_bytes + settings.max_uri_length + 4096).max(8192))
        .keep_alive(true);
    // Every plain-TCP connection task holds a sender: shutdown waits until all are dropped.
    let (tasks, mut tasks_done) = mpsc::channel::<()>(1);
    if let Some(tls) = &settings.tls {
        tokio::spawn(tls.clone().watch(shutdown.clone()));
    }
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let Some(tls) = &settings.tls else {
                    let builder = builder.clone();
                    let (handler, task, cancelled) =
                        (handler.clone(), tasks.clone(), shutdown.clone());
                    let head_timeout = settings.request_timeout;
                    tokio::spawn(async move {
                        // Held for the connection task's life (then by its service's clones).
                        let hold = ConnectionHold { _task: task };
                        // The first segment decides: a stream goes lean, the rest to hyper.
                        let peeked =
                            match tokio::time::timeout(head_timeout, lean::peek(&stream)).await {
                                Ok(Ok(Peeked::Closed) | Err(_)) | Err(_) => return,
                                Ok(Ok(peeked)) => peeked,
                            };
                        if let Peeked::Stream(request, len) = peeked {
                            match lean::serve(&stream, &handler, &cancelled, *request, len).await {
                                Ok(Ended::KeepAlive) => {}
                                Ok(Ended::Close) | Err(_) => return,
                            }
                        }
                        // Boxed: a lean stream's task must not reserve room for hyper's
                        // connection state (it is sized for the largest state).
                        let service = connection_service(handler.clone(), hold);
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        Box::pin(until_shutdown(connection.with_upgrades(), &cancelled)).await;
                    });
                    continue;
                };
                // The handshake runs in the connection's task, bounded like a request head,
                // so a slow client never holds up the accept loop.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let hold = ConnectionHold {
                    _task: tasks.clone(),
                };
                let service = connection_service(handler.clone(), hold);
                let (builder, task, cancelled) = (builder.clone(), tasks.clone(), shutdown.clone());
                let handshake_timeout = settings.request_timeout;
                tokio::spawn(async move {
                    let _task = task;
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    until_shutdown(connection.with_upgrades(), &cancelled).await;
                });
            }
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning (axum::serve sleeps
                // a whole second here, stalling every accept).
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    drop(listener);
    drop(tasks);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    // `None` once every connection task has ended (each shuts its connection down gracefully
    // on the same signal, see `until_shutdown`).
    let all_closed = async {
        let _ = tasks_done.recv().await;
    };
    tokio::select! {
        () = all_closed => tracing::info!("all connections closed"),
        () = tokio::time::sleep(settings.shutdown_timeout) => {
            tracing::warn!(timeout = ?settings.shutdown_timeout, "shutdown timeout: dropping remaining connections");
        }
    }
}

/// Serves `connection` (upgrades allowed: the WebSocket transport of the streams) until it
/// ends; on `shutdown` it finishes the request in flight and closes. hyper-util's graceful
/// watcher does not take an upgradeable HTTP/1 connection, hence this.
async fn until_shutdown<C>(connection: C, shutdown: &CancellationToken)
where
    C: Future<Output = hyper::Result<()>> + GracefulEnd,
{
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = shutdown.cancelled() => {
            connection.as_mut().end_gracefully();
            connection.await
        }
    };
    if let Err(error) = ended {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// A connection that can be asked to finish its request in flight and close.
trait GracefulEnd {
    fn end_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulEnd for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn end_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

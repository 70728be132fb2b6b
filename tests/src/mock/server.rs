//! Listeners and connections: an own accept loop (rather than `axum::serve`) so the mock can
//! refuse connections, kill every open connection at once, and stop and rebind the same port.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::state::Shared;
use super::{control, protocol};

/// The protocol listener: its address survives `stop` so `start` can rebind the same port.
#[derive(Debug)]
pub(crate) struct ListenerSlot {
    pub(crate) addr: SocketAddr,
    pub(crate) task: Option<JoinHandle<()>>,
}

/// Binds with `SO_REUSEADDR`, so a restart can take the port back while connections the mock
/// closed are still in TIME_WAIT.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Which listener a loop serves; only the protocol one obeys `down`, `stop` and drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Protocol,
    Control,
}

pub(crate) fn spawn(shared: &Arc<Shared>, listener: TcpListener, kind: Kind) -> JoinHandle<()> {
    let router: Router = match kind {
        Kind::Protocol => protocol::router().merge(control::router()),
        Kind::Control => control::router(),
    }
    .with_state(Arc::clone(shared));
    tokio::spawn(accept_loop(listener, router, Arc::clone(shared), kind))
}

async fn accept_loop(listener: TcpListener, router: Router, shared: Arc<Shared>, kind: Kind) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // EMFILE and friends: back off briefly instead of spinning (or sleeping 1 s).
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        if kind == Kind::Protocol {
            let down = shared.is_down();
            shared.with(|inner| {
                inner.stats.connections_accepted += 1;
                if down {
                    inner.stats.connections_refused += 1;
                }
            });
            if down {
                // Closed without a byte of answer: the client sees EOF or a reset.
                drop(tcp);
                continue;
            }
        }
        let _ = tcp.set_nodelay(true);
        let kill = (kind == Kind::Protocol).then(|| shared.conn_epoch.subscribe());
        let shutdown = shared.shutdown.subscribe();
        // Each protocol connection carries a second handle on its socket, so a stream can see
        // its client's close at once (see `ConnProbe`).
        let service = match ConnProbe::of(&tcp).filter(|_| kind == Kind::Protocol) {
            Some(probe) => TowerToHyperService::new(router.clone().layer(Extension(probe))),
            None => TowerToHyperService::new(router.clone()),
        };
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            // Dropping the connection future closes the socket at once, mid-response if need be.
            tokio::select! {
                _ = conn => {}
                () = changed(kill) => {}
                () = changed(Some(shutdown)) => {}
            }
        });
    }
}

/// A second handle on a protocol connection's socket. A stream's body learns of its client's
/// close only at its next write, so `open_streams` would lag behind a client that closed one
/// stream and opened another; a pending EOF in the socket shows the close at once.
#[derive(Clone, Debug)]
pub(crate) struct ConnProbe(Arc<socket2::Socket>);

impl ConnProbe {
    fn of(tcp: &TcpStream) -> Option<Self> {
        let fd = tcp.as_fd().try_clone_to_owned().ok()?;
        Some(Self(Arc::new(socket2::Socket::from(fd))))
    }

    /// Whether the peer has closed its side (an EOF or a reset is waiting); never blocks, as
    /// the socket is tokio's and non-blocking.
    pub(crate) fn peer_closed(&self) -> bool {
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        match self.0.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }
}

/// Resolves on the next change of `rx`; never for `None` or a closed channel (the senders live
/// as long as the mock, and a connection task is dropped with it).
async fn changed<T>(rx: Option<watch::Receiver<T>>) {
    match rx {
        Some(mut rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

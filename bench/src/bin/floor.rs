//! `floor`: a bare hyper HTTP/1 server answering every request with the same bytes (e.g. what
//! the proxy's `GET /api/flags` returns), the yardstick `bench/run.sh` divides by.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};

#[derive(Debug, Parser)]
#[command(about = "Bare hyper server returning one fixed body")]
struct Args {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:9091")]
    listen: SocketAddr,
    /// The body to return.
    #[arg(long)]
    body_file: PathBuf,
    /// Its content type.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Exit after this many seconds (every load-test process has a bound).
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = Bytes::from(
        std::fs::read(&args.body_file)
            .with_context(|| format!("reading {}", args.body_file.display()))?,
    );
    let content_type = HeaderValue::from_str(&args.content_type)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&args.listen.into())?;
        socket.listen(65_535)?;
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        println!("listening on {}", args.listen);
        let deadline = tokio::time::sleep(Duration::from_secs(args.max_secs));
        tokio::pin!(deadline);
        loop {
            let (stream, _) = tokio::select! {
                () = &mut deadline => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (body, content_type) = (body.clone(), content_type.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let mut response = Response::new(Full::new(body.clone()));
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type.clone());
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

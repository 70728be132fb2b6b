//! `mock-upstream`: the Rollgate-compatible mock as a process, for suites written in other
//! languages. Prints `listening on http://127.0.0.1:PORT` as its first stdout line (and
//! `control on http://127.0.0.1:PORT` next when `--control-port` is given), then serves until
//! SIGINT/SIGTERM. Drive it over `/control/*`.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rollgate_proxy_tests::mock::{
    DEFAULT_API_KEY, Heartbeat, MockConfig, MockUpstream, Scenario, StreamAuth, StreamMode,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Rollgate-compatible mock upstream for rollgate-proxy tests"
)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Also serve /control/* on this port, untouched by stop/down/outage (0 picks a free one).
    #[arg(long)]
    control_port: Option<u16>,
    /// API key every SDK route requires.
    #[arg(long, env = "MOCK_API_KEY", default_value = DEFAULT_API_KEY)]
    api_key: String,
    /// Initial data: `{"flags":{..},"reasons"?,"rollouts"?,"users"?,"rules"?}` or a bare
    /// rules payload `{"version","flags":{key:FlagRule}}`. Overrides --scenario.
    #[arg(long)]
    flags_file: Option<PathBuf>,
    /// Built-in data when no --flags-file: basic | empty.
    #[arg(long, default_value = "basic", value_parser = parse_scenario)]
    scenario: Scenario,
    /// How changes reach open streams: init | flags | flag-changed | flag-update.
    #[arg(long, default_value = "init", value_parser = parse_mode)]
    stream_mode: StreamMode,
    /// Stream credentials: token-or-bearer | token-only | bearer-only.
    #[arg(long, default_value = "token-or-bearer", value_parser = parse_auth)]
    stream_auth: StreamAuth,
    /// Keepalive interval in ms (0 = none, the default, like the official mock).
    #[arg(long, default_value_t = 0)]
    heartbeat_ms: u64,
    /// With --heartbeat-ms: send `event: heartbeat` instead of `: keepalive` comments.
    #[arg(long)]
    heartbeat_events: bool,
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn parse_mode(s: &str) -> Result<StreamMode, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn parse_auth(s: &str) -> Result<StreamAuth, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn config(args: &Args) -> anyhow::Result<MockConfig> {
    let mut config = MockConfig::new()
        .scenario(args.scenario)
        .api_key(args.api_key.clone())
        .addr(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))
        .stream_mode(args.stream_mode)
        .stream_auth(args.stream_auth);
    if let Some(port) = args.control_port {
        config = config.control_addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if args.heartbeat_ms > 0 {
        let interval = Duration::from_millis(args.heartbeat_ms);
        config = config.heartbeat(Some(if args.heartbeat_events {
            Heartbeat::events(interval)
        } else {
            Heartbeat::comments(interval)
        }));
    }
    if let Some(path) = &args.flags_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", path.display()))?;
        config = config
            .load_json(doc)
            .with_context(|| format!("loading {}", path.display()))?;
    }
    Ok(config)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mock = MockUpstream::start(config(&args)?).await?;
    let mut banner = format!("listening on {}\n", mock.base_url());
    if let Some(caddr) = mock.control_addr() {
        banner.push_str(&format!("control on http://{caddr}\n"));
    }
    // Tests read the port from the first line, so it must not sit in a buffer.
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(banner.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
    shutdown_signal().await;
    drop(mock);
    Ok(())
}

//! The black-box e2e suite: every scenario drives the proxy (`E2E_TARGET=native|edge`) only
//! through its HTTP API, against its own mock upstream, on 127.0.0.1.
//!
//! A small runner replaces libtest (`harness = false`): scenarios mostly wait on the network
//! (breaker timeouts, keepalives), so they run concurrently on one tokio runtime instead of
//! one per test thread (libtest would run two at a time on a 2-core machine). Each scenario
//! owns its processes and ports and has a hard time limit.
//!
//! Usage: `cargo test -p rollgate-proxy-tests --test e2e [-- FILTER... | --list | --exact |
//! --chaos]` (`--chaos`: only the chaos suite, see `chaos.rs`);
//! `E2E_JOBS=N` bounds how many scenarios run at once (default 8; 3 with `E2E_TARGET=edge`,
//! where every scenario starts a workerd). `E2E_TARGET=parity` runs only `parity::`.

mod chaos;
mod common;
mod compression;
mod drift;
mod environments;
mod flags;
mod monitoring;
mod ofrep;
mod ops;
mod parity;
mod refresh;
mod replicas;
mod request_limits;
mod resilience;
mod sdk;
mod security;
mod signals;
mod sse;
mod tls;
mod upstream_faults;
mod websocket;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One scenario: a name (`module::function`) and its body.
pub(crate) struct Scenario {
    name: &'static str,
    run: fn() -> Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Scenario {
    pub(crate) const fn new(
        name: &'static str,
        run: fn() -> Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        Self { name, run }
    }
}

/// `scenario!(fn_name)`: registers an `async fn fn_name()` of the calling module.
#[macro_export]
macro_rules! scenario {
    ($f:ident) => {
        $crate::Scenario::new(concat!(module_path!(), "::", stringify!($f)), || {
            Box::pin($f())
        })
    };
}

/// Hard bound per scenario; every wait inside is bounded far below it. Builds are never inside
/// it: `target::prepare` runs once before the first scenario starts.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

fn all() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(flags::scenarios());
    all.extend(compression::scenarios());
    all.extend(sse::scenarios());
    all.extend(sdk::scenarios());
    all.extend(ofrep::scenarios());
    all.extend(resilience::scenarios());
    all.extend(security::scenarios());
    all.extend(ops::scenarios());
    all.extend(drift::scenarios());
    all.extend(parity::scenarios());
    all.extend(websocket::scenarios());
    all.extend(upstream_faults::scenarios());
    all.extend(request_limits::scenarios());
    all.extend(replicas::scenarios());
    all.extend(refresh::scenarios());
    all.extend(monitoring::scenarios());
    all.extend(tls::scenarios());
    all.extend(environments::scenarios());
    all.extend(signals::scenarios());
    all.extend(chaos::scenarios());
    all
}

struct Args {
    filters: Vec<String>,
    skip: Vec<String>,
    exact: bool,
    list: bool,
    /// `--chaos`: only the chaos suite (`chaos::` and the scenarios it names elsewhere).
    chaos: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        filters: Vec::new(),
        skip: Vec::new(),
        exact: false,
        list: false,
        chaos: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--exact" => args.exact = true,
            "--list" => args.list = true,
            "--chaos" => args.chaos = true,
            "--skip" => args.skip.extend(it.next()),
            // libtest options that take a value; accepted and ignored.
            "--test-threads" | "--format" | "--color" | "-Z" | "--logfile" | "--report-time" => {
                let _ = it.next();
            }
            other if other.starts_with('-') => {}
            other => args.filters.push(other.to_owned()),
        }
    }
    args
}

fn selected(args: &Args, name: &str) -> bool {
    let hit = |f: &String| {
        if args.exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    (args.filters.is_empty() || args.filters.iter().any(hit))
        && (!args.chaos || chaos::in_suite(name))
        && !args.skip.iter().any(|s| name.contains(s.as_str()))
}

fn main() -> ExitCode {
    // One line per failure (the runner prints the message again next to the scenario name);
    // backtraces of tokio internals would bury the proxy's log tail.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("panicked at {location}");
    }));
    let args = parse_args();
    let parity_only = rollgate_proxy_tests::target::parity_from_env();
    let scenarios: Vec<Scenario> = all()
        .into_iter()
        .filter(|s| selected(&args, s.name))
        .filter(|s| !parity_only || s.name.contains("::parity::"))
        .collect();
    if args.list {
        for s in &scenarios {
            println!("{}: test", s.name);
        }
        return ExitCode::SUCCESS;
    }
    let jobs = std::env::var("E2E_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .filter(|&j| j > 0)
        .unwrap_or_else(|| match common::target() {
            // Each scenario starts wrangler + workerd (~1-2 s of CPU each): fewer at once.
            rollgate_proxy_tests::target::TargetKind::Edge => 3,
            rollgate_proxy_tests::target::TargetKind::Native => 8,
        });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Builds (and the Worker's cold start) happen here, outside every scenario's time limit.
    if !scenarios.is_empty() {
        let t0 = Instant::now();
        if let Err(e) = runtime.block_on(rollgate_proxy_tests::target::prepare(common::target())) {
            eprintln!("e2e: preparing the target failed: {e:#}");
            println!(
                "\ne2e result: FAILED. could not prepare the target\ne2e: 0 passed, {} failed",
                scenarios.len()
            );
            return ExitCode::from(101);
        }
        println!(
            "e2e: target {:?} prepared in {:.1}s",
            common::target(),
            t0.elapsed().as_secs_f64()
        );
    }
    println!(
        "\nrunning {} e2e scenarios (target {:?}, {jobs} at a time)",
        scenarios.len(),
        common::target()
    );
    let started = Instant::now();
    let total = scenarios.len();
    let failed = runtime.block_on(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(jobs));
        let mut tasks = Vec::new();
        for s in scenarios {
            let permits = Arc::clone(&permits);
            let (name, run) = (s.name, s.run);
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let t0 = Instant::now();
                let result = tokio::spawn(tokio::time::timeout(SCENARIO_TIMEOUT, run())).await;
                let outcome = match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(format!("timed out after {SCENARIO_TIMEOUT:?}")),
                    Err(e) if e.is_panic() => {
                        let payload = e.into_panic();
                        let msg = payload
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "panic".to_owned());
                        Err(msg)
                    }
                    Err(e) => Err(e.to_string()),
                };
                match &outcome {
                    Ok(()) => println!("test {name} ... ok ({:.1}s)", t0.elapsed().as_secs_f64()),
                    Err(msg) => println!(
                        "test {name} ... FAILED ({:.1}s)\n    {msg}",
                        t0.elapsed().as_secs_f64()
                    ),
                }
                outcome.err().map(|msg| (name, msg))
            }));
        }
        let mut failed = Vec::new();
        for task in tasks {
            if let Ok(Some(f)) = task.await {
                failed.push(f);
            }
        }
        failed
    });
    if failed.is_empty() {
        println!(
            "\ne2e result: ok. finished in {:.1}s\ne2e: {total} passed, 0 failed",
            started.elapsed().as_secs_f64()
        );
        ExitCode::SUCCESS
    } else {
        println!("\nfailures:");
        for (name, msg) in &failed {
            println!("    {name}: {msg}");
        }
        println!(
            "\ne2e result: FAILED. {} failed; finished in {:.1}s\ne2e: {} passed, {} failed",
            failed.len(),
            started.elapsed().as_secs_f64(),
            total - failed.len(),
            failed.len()
        );
        ExitCode::from(101)
    }
}

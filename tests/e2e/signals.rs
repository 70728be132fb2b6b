//! SIGTERM stops a proxy cleanly even when its log reader is gone (stdout and stderr are broken
//! pipes, as behind a crashed log shipper) or when it arrives right as the proxy starts.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use rollgate_proxy_tests::target::ProxyConfig;

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(sigterm_stops_a_proxy_whose_log_reader_is_gone),
        scenario!(sigterm_the_moment_the_address_is_reported_exits_cleanly),
    ]
}

async fn sigterm_stops_a_proxy_whose_log_reader_is_gone() {
    if !target().is_process() {
        println!("(skipped on this target: a Worker has no process to signal)");
        return;
    }
    let (binary, flags_file) = binary_and_flags().await;
    let mut child = spawn_local(&binary, &flags_file, Stdio::piped());
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let url = reported_address(&mut reader).expect("the proxy reports its address");
    // The reader goes away: every later log write fails with EPIPE.
    drop(reader);
    drop(child.stderr.take());
    eventually("/live", Duration::from_secs(10), || {
        let live = format!("{url}/live");
        async move { (get(&live).await.ok()?.status == 200).then_some(()) }
    })
    .await;
    let exit = terminate_and_wait(&mut child)
        .await
        .expect("the proxy exits on SIGTERM although it cannot log");
    assert_eq!(exit.code(), Some(0), "{exit}");
}

/// A SIGTERM that arrives the instant the proxy reports its address (a rolling update that stops
/// a pod right after it started) is handled, not left to the default action that kills the
/// process: the handlers are installed before the address is reported.
async fn sigterm_the_moment_the_address_is_reported_exits_cleanly() {
    if !target().is_process() {
        println!("(skipped on this target: a Worker has no process to signal)");
        return;
    }
    let (binary, flags_file) = binary_and_flags().await;
    // Several starts: each signal is sent as soon as the address line is read.
    for round in 0..5 {
        let mut child = spawn_local(&binary, &flags_file, Stdio::null());
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        assert!(
            reported_address(&mut reader).is_some(),
            "round {round}: the proxy reports its address"
        );
        // Keep draining the log so the proxy never blocks on a full pipe while it stops.
        let drain = std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        let exit = terminate_and_wait(&mut child).await;
        let _ = drain.join();
        let exit = exit.expect("the proxy exits on SIGTERM");
        assert_eq!(exit.code(), Some(0), "round {round}: {exit}");
    }
}

/// The proxy binary the harness runs (a first proxy through the harness builds it) and the
/// bundled flags file, for scenarios that must own the process and its pipes themselves.
async fn binary_and_flags() -> (std::path::PathBuf, std::path::PathBuf) {
    let flags_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/flags.json");
    let built = start_proxy(ProxyConfig {
        flags_file: Some(flags_file.clone()),
        ..ProxyConfig::default()
    })
    .await;
    let pid = built.pid().expect("a native process");
    let binary = std::fs::read_link(format!("/proc/{pid}/exe")).expect("/proc/PID/exe");
    drop(built);
    (binary, flags_file)
}

/// Starts the proxy in local mode on a free port, its stdout piped (stderr as given).
fn spawn_local(binary: &std::path::Path, flags_file: &std::path::Path, stderr: Stdio) -> Child {
    Command::new(binary)
        .args(["--bind", "127.0.0.1", "--port", "0", "--snapshot-file", ""])
        .arg("--flags-file")
        .arg(flags_file)
        .env_remove("ROLLGATE_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn")
}

/// Reads log lines until the one that reports the address; returns that address.
fn reported_address(reader: &mut BufReader<ChildStdout>) -> Option<String> {
    for _ in 0..20 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if let Some(at) = line.find("listening on ") {
            return Some(line[at + "listening on ".len()..].trim().to_owned());
        }
    }
    None
}

/// Sends SIGTERM to `child` and waits (bounded) for it to exit; kills it if it does not.
async fn terminate_and_wait(child: &mut Child) -> Option<std::process::ExitStatus> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("try_wait") {
            break Some(exit);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if exit.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    exit
}

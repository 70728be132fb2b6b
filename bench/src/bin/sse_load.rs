//! `sse-load`: opens N SSE streams from many source addresses, measures the connect rate and
//! each client's arrival time of upstream changes, and prints p50/p99/max.
//!
//! `sse-load run` is the coordinator: it spawns `sse-load worker` processes (one process holds
//! at most ~19,900 files, so each worker holds at most `--per-process` streams), each binding
//! its sockets to source addresses 127.0.0.2, 127.0.0.3, … (`--per-source` connections per
//! address, ≤ 12,000). Once every stream has its first event it triggers a change through the
//! mock upstream's control surface (`PUT /control/flags/{key}`), records t0 (wall clock), and
//! collects every client's arrival time (wall clock, so processes agree). `sse-load trigger`
//! only makes changes (for runs where other tools measure).

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream as StdTcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "SSE load client for rollgate-proxy benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open the streams (through worker processes), trigger changes, print the figures.
    Run(RunArgs),
    /// One process's share of the streams (spawned by `run`; talks over stdin/stdout).
    Worker(WorkerArgs),
    /// Make `--count` changes through the mock's control surface, `--interval-ms` apart.
    Trigger(TriggerArgs),
}

#[derive(Debug, Clone, ClapArgs)]
struct Target {
    /// Stream URL(s), `http://127.0.0.1:PORT/path?query`; connections are spread round-robin
    /// (one per replica process).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Connections per source address (127.0.0.2, 127.0.0.3, …); keep ≤ 12,000.
    #[arg(long, default_value_t = 5000)]
    per_source: usize,
    /// Last octet of the first source address (127.0.0.N).
    #[arg(long, default_value_t = 2)]
    first_source: u32,
    /// Connection attempts in flight per worker process.
    #[arg(long, default_value_t = 1024)]
    connect_concurrency: usize,
    /// Never read anything (the server's send path fills up and stays full).
    #[arg(long)]
    no_read: bool,
}

#[derive(Debug, ClapArgs)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// Streams to open in all.
    #[arg(long)]
    clients: usize,
    /// Streams per worker process (a process holds at most ~19,900 files).
    #[arg(long, default_value_t = 12_000)]
    per_process: usize,
    /// Changes to trigger and time (0: only connect, measure memory, hold).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The mock upstream's control address (`http://127.0.0.1:PORT`).
    #[arg(long)]
    control: Option<String>,
    /// Flag key toggled per round (round r sets `{key}` to r % 2 == 0).
    #[arg(long, default_value = "bench-toggle")]
    flag: String,
    /// Server process ids whose RSS is sampled before and after connecting.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// With --rounds 0: keep the streams open this long after all connected.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Bound on connecting and on each round's delivery.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Pause after connecting before sampling RSS and triggering.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
}

#[derive(Debug, ClapArgs)]
struct WorkerArgs {
    #[command(flatten)]
    target: Target,
    /// First global connection index.
    #[arg(long)]
    start: usize,
    /// Connections in this process.
    #[arg(long)]
    count: usize,
    /// Changes recorded per client.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[derive(Debug, ClapArgs)]
struct TriggerArgs {
    /// The mock upstream's control address.
    #[arg(long)]
    control: String,
    #[arg(long, default_value = "bench-toggle")]
    flag: String,
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run(&args),
        Cmd::Worker(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, worker(args))
        }
        Cmd::Trigger(args) => {
            for i in 0..args.count {
                set_flag(&args.control, &args.flag, i % 2 == 0)?;
                std::thread::sleep(Duration::from_millis(args.interval_ms));
            }
            Ok(())
        }
    }
}

/// `PUT {control}/control/flags/{key}` with `{"value": value}` over a plain socket.
fn set_flag(control: &str, key: &str, value: bool) -> anyhow::Result<()> {
    let addr = control
        .strip_prefix("http://")
        .context("--control must be http://HOST:PORT")?
        .trim_end_matches('/');
    let body = format!("{{\"value\":{value}}}");
    let mut stream = StdTcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "PUT /control/flags/{key} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 2") {
        bail!(
            "control answered {}",
            answer.lines().next().unwrap_or_default()
        );
    }
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, in clock ticks (USER_HZ, 100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`, which may contain spaces: utime and stime are the
            // 12th and 13th of them.
            let rest = &s[s.rfind(')')? + 2..];
            let mut fields = rest.split_whitespace().skip(11);
            let utime: u64 = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0)
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("worker exited");
        }
        Ok(line.trim_end().to_owned())
    }
}

/// `key=value` fields of a worker's line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[allow(clippy::cast_precision_loss)]
fn per_sec(count: u64, nanos: u64) -> f64 {
    count as f64 / (nanos.max(1) as f64 / 1e9)
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let rss_before: Vec<u64> = args.pids.iter().map(|&p| rss_kib(p)).collect();
    let cpu_before: u64 = args.pids.iter().map(|&p| cpu_ticks(p)).sum();
    let mut workers = Vec::new();
    let mut start = 0;
    while start < args.clients {
        let count = args.per_process.min(args.clients - start);
        let mut command = Command::new(&exe);
        command
            .arg("worker")
            .args(["--start", &start.to_string(), "--count", &count.to_string()])
            .args(["--rounds", &args.rounds.to_string()])
            .args(["--timeout-secs", &args.timeout_secs.to_string()])
            .args(["--per-source", &args.target.per_source.to_string()])
            .args(["--first-source", &args.target.first_source.to_string()])
            .args([
                "--connect-concurrency",
                &args.target.connect_concurrency.to_string(),
            ]);
        for url in &args.target.urls {
            command.args(["--url", url]);
        }
        if args.target.no_read {
            command.arg("--no-read");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        workers.push(Worker {
            child,
            stdin,
            stdout,
        });
        start += count;
    }
    // Connect phase: each worker reports when all its streams are connected (and had their
    // first event, unless --no-read) or its timeout passed.
    let (mut connected, mut first, mut failed) = (0, 0, 0);
    let (mut t_start, mut t_connect, mut t_first) = (u64::MAX, 0, 0);
    for worker in &mut workers {
        let line = worker.line()?;
        connected += field(&line, "connected");
        first += field(&line, "first");
        failed += field(&line, "failed");
        t_start = t_start.min(field(&line, "start_ns"));
        t_connect = t_connect.max(field(&line, "last_connect_ns"));
        t_first = t_first.max(field(&line, "last_first_ns"));
    }
    println!(
        "streams: asked={} connected={connected} first_event={first} failed={failed} processes={}",
        args.clients,
        workers.len()
    );
    println!(
        "connect rate: connected {:.0}/s, first event {:.0}/s (all {} in {:.2} s)",
        per_sec(connected, t_connect.saturating_sub(t_start)),
        per_sec(first, t_first.saturating_sub(t_start)),
        first,
        t_first.saturating_sub(t_start) as f64 / 1e9,
    );
    let server_ticks = args
        .pids
        .iter()
        .map(|&p| cpu_ticks(p))
        .sum::<u64>()
        .saturating_sub(cpu_before);
    let client_ticks: u64 = workers.iter().map(|w| cpu_ticks(w.child.id())).sum();
    #[allow(clippy::cast_precision_loss)]
    let per_stream = |ticks: u64| (ticks * 10_000) as f64 / first.max(connected).max(1) as f64;
    if !args.pids.is_empty() {
        println!(
            "connect CPU: servers {:.1} us per stream, clients {:.1} us per stream",
            per_stream(server_ticks),
            per_stream(client_ticks)
        );
    }
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    for (i, &pid) in args.pids.iter().enumerate() {
        let after = rss_kib(pid);
        let streams = connected / args.pids.len().max(1) as u64;
        #[allow(clippy::cast_precision_loss)]
        let per = after.saturating_sub(rss_before[i]) as f64 / streams.max(1) as f64;
        println!(
            "rss pid={pid}: before={} KiB after={after} KiB, {per:.2} KiB per stream (~{streams} streams)",
            rss_before[i]
        );
    }
    if args.rounds == 0 {
        std::thread::sleep(Duration::from_secs(args.hold_secs));
    }
    for round in 0..args.rounds {
        let control = args
            .control
            .as_deref()
            .context("--control is needed for rounds")?;
        let cpu_before: u64 = args.pids.iter().map(|&p| cpu_ticks(p)).sum();
        let t0 = unix_ns();
        set_flag(control, &args.flag, round % 2 == 0)?;
        let mut latencies = Vec::with_capacity(args.clients);
        for worker in &mut workers {
            writeln!(worker.stdin, "collect {round}")?;
        }
        for worker in &mut workers {
            let line = worker.line()?;
            latencies.extend(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .map(|at| at.saturating_sub(t0)),
            );
        }
        let cpu_ticks_used = args
            .pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .sum::<u64>()
            .saturating_sub(cpu_before);
        latencies.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        if !args.pids.is_empty() {
            // 10 ms ticks: coarse, so read it over many clients.
            println!(
                "round {round}: server CPU {} ms in all, {:.1} us per delivery",
                cpu_ticks_used * 10,
                (cpu_ticks_used * 10_000) as f64 / latencies.len().max(1) as f64
            );
        }
        println!(
            "round {round}: delivered {}/{connected}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or(0)),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for worker in &mut workers {
        let _ = writeln!(worker.stdin, "quit");
    }
    for mut worker in workers {
        let _ = worker.child.wait();
    }
    Ok(())
}

/// One parsed stream URL.
#[derive(Clone)]
struct Url {
    addr: SocketAddr,
    request: Rc<[u8]>,
}

fn parse_url(url: &str) -> anyhow::Result<Url> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs (the lean path is plain TCP)")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr: SocketAddr = host.parse().with_context(|| format!("{host}: IP:PORT"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
         Cache-Control: no-cache\r\n\r\n"
    );
    Ok(Url {
        addr,
        request: request.into_bytes().into(),
    })
}

/// Shared counters of one worker (single-threaded runtime).
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    first: AtomicU64,
    failed: AtomicU64,
    last_connect_ns: AtomicU64,
    last_first_ns: AtomicU64,
}

const NEEDLE: &[u8] = b"\nevent: ";

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

/// Counts event starts in `bytes`, given the previous read's last bytes in `carry`.
fn count_events(carry: &mut Vec<u8>, bytes: &[u8]) -> usize {
    let n = NEEDLE.len();
    let mut count = bytes.windows(n).filter(|w| *w == NEEDLE).count();
    // Matches that start in the previous read and end in this one.
    let carried = carry.len();
    carry.extend_from_slice(&bytes[..bytes.len().min(n - 1)]);
    count += carry
        .windows(n)
        .enumerate()
        .filter(|(i, w)| *i < carried && *w == NEEDLE)
        .count();
    let keep = carry.len().min(n - 1);
    let tail: Vec<u8> = if bytes.len() >= n - 1 {
        bytes[bytes.len() - (n - 1)..].to_vec()
    } else {
        carry[carry.len() - keep..].to_vec()
    };
    *carry = tail;
    count
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let urls: Vec<Url> = args
        .target
        .urls
        .iter()
        .map(|u| parse_url(u))
        .collect::<anyhow::Result<_>>()?;
    let stats = Rc::new(Stats::default());
    // arrivals[round * count + i]: wall-clock ns of client i's (round+1)-th change.
    let arrivals: Rc<Vec<AtomicU64>> = Rc::new(
        (0..args.rounds * args.count)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let permits = Rc::new(Semaphore::new(args.target.connect_concurrency));
    let timeout = Duration::from_secs(args.timeout_secs);
    let start_ns = unix_ns();
    let mut tasks = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let global = args.start + i;
        let url = urls[global % urls.len()].clone();
        let octets =
            0x7f00_0000u32 + args.target.first_source + (global / args.target.per_source) as u32;
        let source = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(octets), 0));
        let (stats, arrivals, permits) =
            (Rc::clone(&stats), Rc::clone(&arrivals), Rc::clone(&permits));
        let (rounds, count, no_read) = (args.rounds, args.count, args.target.no_read);
        tasks.push(tokio::task::spawn_local(async move {
            let Ok(permit) = permits.acquire().await else {
                return;
            };
            let connect = async {
                let socket = TcpSocket::new_v4()?;
                socket.bind(source)?;
                let stream = socket.connect(url.addr).await?;
                stream.set_nodelay(true)?;
                let mut written = 0;
                while written < url.request.len() {
                    stream.writable().await?;
                    match stream.try_write(&url.request[written..]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, std::io::Error>(stream)
            };
            let Ok(Ok(stream)) = tokio::time::timeout(timeout, connect).await else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            stats.connected.fetch_add(1, Ordering::Relaxed);
            stats
                .last_connect_ns
                .fetch_max(unix_ns(), Ordering::Relaxed);
            if no_read {
                drop(permit);
                std::future::pending::<()>().await;
                return;
            }
            let mut permit = Some(permit);
            let mut carry = Vec::with_capacity(NEEDLE.len());
            let mut events = 0usize;
            loop {
                if stream.readable().await.is_err() {
                    return;
                }
                let read = READ_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    match stream.try_read(&mut buf[..]) {
                        Ok(0) => Err(()),
                        Ok(n) => Ok(count_events(&mut carry, &buf[..n])),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                        Err(_) => Err(()),
                    }
                });
                let Ok(seen) = read else {
                    return;
                };
                if seen == 0 {
                    continue;
                }
                let now = unix_ns();
                for _ in 0..seen {
                    events += 1;
                    if events == 1 {
                        stats.first.fetch_add(1, Ordering::Relaxed);
                        stats.last_first_ns.fetch_max(now, Ordering::Relaxed);
                        permit.take();
                    } else if events - 2 < rounds {
                        arrivals[(events - 2) * count + i].store(now, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Report once every stream is connected (and had its first event) or the bound passed.
    let deadline = Instant::now() + timeout;
    loop {
        let failed = stats.failed.load(Ordering::Relaxed);
        let done = if args.target.no_read {
            stats.connected.load(Ordering::Relaxed)
        } else {
            stats.first.load(Ordering::Relaxed)
        };
        if done + failed >= args.count as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "ready connected={} first={} failed={} start_ns={start_ns} last_connect_ns={} last_first_ns={}",
        stats.connected.load(Ordering::Relaxed),
        stats.first.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.last_connect_ns.load(Ordering::Relaxed),
        stats.last_first_ns.load(Ordering::Relaxed),
    );
    std::io::stdout().flush()?;
    // Commands from the coordinator, read on a blocking thread.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(command) = rx.recv().await {
        let Some(round) = command.strip_prefix("collect ") else {
            break;
        };
        let round: usize = round.trim().parse()?;
        let expected = stats.first.load(Ordering::Relaxed);
        let slice = &arrivals[round * args.count..(round + 1) * args.count];
        let deadline = Instant::now() + timeout;
        loop {
            let got = slice
                .iter()
                .filter(|a| a.load(Ordering::Relaxed) != 0)
                .count() as u64;
            if got >= expected || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut line = String::from("arrivals");
        for at in slice
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&a| a != 0)
        {
            line.push(' ');
            line.push_str(&at.to_string());
        }
        println!("{line}");
        std::io::stdout().flush()?;
    }
    for task in tasks {
        task.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_across_reads() {
        let mut carry = Vec::new();
        let stream = b"HTTP/1.1 200 OK\r\n\r\nD\r\nretry: 2000\n\n\r\n20\r\nevent: flags\ndata: {}\n\n\r\n20\r\nevent: flags\ndata: {}\n\n";
        let mut total = 0;
        for chunk in stream.chunks(5) {
            total += count_events(&mut carry, chunk);
        }
        assert_eq!(total, 2);
        let mut carry = Vec::new();
        assert_eq!(count_events(&mut carry, stream), 2);
    }
}

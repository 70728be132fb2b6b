// Load client for scripts/bench-edge.sh: SSE and WebSocket fan-out, per-user polling and change
// latency against the Worker under `wrangler dev`, with changes made on the Rust mock upstream.
//   node scripts/bench-edge.mjs sse     <worker> <mock-control> <clients> <flag-key> <rss-pids>
//   node scripts/bench-edge.mjs ws      <worker> <mock-control> <clients> <flag-key> <rss-pids>
//   node scripts/bench-edge.mjs poll    <worker> <users> <rounds> <concurrency>
//   node scripts/bench-edge.mjs latency <worker> <mock-control> <clients> <changes> <flag-key>
// Prints one JSON line of results. Every wait is bounded; every loop has a count.

import fs from 'node:fs';
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import zlib from 'node:zlib';

import WebSocket from 'ws';

const [mode, worker, ...rest] = process.argv.slice(2);
// What SSE clients accept: a browser's header by default (the stream is then gzip-coded for
// large flag sets); BENCH_ACCEPT_ENCODING=identity measures the uncompressed stream.
const acceptEncoding = process.env.BENCH_ACCEPT_ENCODING ?? 'gzip, deflate, br';
// Which gzip-coded SSE bodies the load client decodes: `all` (a browser's work, on the
// measured box's own cores), or `first` (the first three, to check them; the others count a
// frame when its member arrives, as the WebSocket clients do).
const sseDecode = process.env.BENCH_SSE_DECODE ?? 'all';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A short form of a process's command line, to tell wrangler dev's workerd processes apart. */
function processArgs(pid) {
  try {
    const args = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
    return args.slice(1).filter((a) => !a.startsWith('/')).join(' ').slice(0, 80);
  } catch {
    return 'gone';
  }
}

/** Resident memory (KiB) summed over `pids` (workerd processes): `VmRSS`, or one of its parts. */
function rssKiB(pids, field = 'VmRSS') {
  let total = 0;
  for (const pid of pids) {
    try {
      const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
      const match = new RegExp(`${field}:\\s+(\\d+) kB`).exec(status);
      if (match) total += Number(match[1]);
    } catch {
      // gone
    }
  }
  return total;
}

/** RSS split into anonymous memory, mapped files (the objects' storage) and shared memory, MiB. */
function rssParts(pids) {
  const mib = (field) => +(rssKiB(pids, field) / 1024).toFixed(1);
  return { anon: mib('RssAnon'), file: mib('RssFile'), shmem: mib('RssShmem') };
}

/**
 * The Worker isolates' own memory, from workerd's inspector (`BENCH_INSPECTOR`, the
 * `--inspector-port` of `wrangler dev`): V8's heap in use after a full garbage collection
 * (what is still referenced), summed over its isolates, in MiB, or `null` without it. Under
 * `wrangler dev` the front, the Relay and every shard share one isolate, and one wasm
 * instance: its memory (the objects' Rust heap, at its high-water mark) is the largest
 * `rollgate_proxy_wasm_memory_bytes` in `/api/metrics?objects`.
 */
async function isolateMemory() {
  const base = process.env.BENCH_INSPECTOR;
  if (!base) return null;
  const targets = await (await fetch(`${base}/json`)).json();
  let heap = 0;
  let heapTotal = 0;
  for (const target of targets) {
    const session = await inspectorSession(target.webSocketDebuggerUrl);
    try {
      // workerd collects when the isolate next runs: an idle one (the floor Worker between
      // changes) is woken by a request to the front's `/`, only if the answer is late.
      const collected = session.call('HeapProfiler.collectGarbage');
      const poke = setInterval(() => fetch(`${worker}/`).then((r) => r.text()).catch(() => {}), 500);
      try {
        await collected;
      } finally {
        clearInterval(poke);
      }
      const usage = await session.call('Runtime.getHeapUsage');
      heap += usage.usedSize;
      heapTotal += usage.totalSize;
    } finally {
      session.close();
    }
  }
  // The floor Worker has no metrics (404): no wasm there.
  const answer = await fetch(`${worker}/api/metrics?objects`);
  const metrics = answer.ok ? await answer.text() : '';
  const wasm = Math.max(
    0,
    ...metrics
      .split('\n')
      .filter((line) => line.startsWith('rollgate_proxy_wasm_memory_bytes{'))
      .map((line) => Number(line.trim().split(/\s+/).pop())),
  );
  // The stream clients the shards last reported (closed ones count until the runtime cancels
  // their bodies).
  const streamClients = metrics
    .split('\n')
    .filter((line) => line.startsWith('rollgate_proxy_sse_clients{'))
    .reduce((sum, line) => sum + Number(line.trim().split(/\s+/).pop()), 0);
  const mib = (bytes) => +(bytes / 1048576).toFixed(1);
  return {
    heap_after_gc_mib: mib(heap),
    heap_committed_mib: mib(heapTotal),
    wasm_memory_mib: mib(wasm),
    ...(answer.ok ? { stream_clients: streamClients } : {}),
  };
}

/** A DevTools protocol session: `call(method, params)` answers within 10 s or throws. */
async function inspectorSession(url) {
  const socket = new WebSocket(url);
  // wrangler's inspector proxy attaches to the runtime once a client connects, and drops what
  // is sent before that: wait for its first message (the execution context), 2 s at most.
  const attached = new Promise((resolve) => {
    socket.once('message', resolve);
    setTimeout(resolve, 2000);
  });
  await new Promise((resolve, reject) => {
    socket.once('open', resolve);
    socket.once('error', reject);
  });
  await attached;
  let next = 0;
  const waiting = new Map();
  socket.on('message', (data) => {
    const message = JSON.parse(data);
    const entry = waiting.get(message.id);
    if (!entry) return;
    waiting.delete(message.id);
    clearTimeout(entry.timer);
    if (message.error) entry.reject(new Error(`inspector: ${message.error.message}`));
    else entry.resolve(message.result);
  });
  return {
    call(method, params = {}) {
      next += 1;
      const id = next;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiting.delete(id);
          reject(new Error(`inspector: no answer to ${method} within 10 s`));
        }, 10_000);
        waiting.set(id, { resolve, reject, timer });
        socket.send(JSON.stringify({ id, method, params }));
      });
    },
    close: () => socket.close(),
  };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
}

/**
 * Opens one SSE client on `path`. A "frame" is what ends with a blank line; frames over 64
 * bytes are flag frames (the preamble and keepalives are small). Records when each flag frame
 * completes, from native Buffer searches only (2,000 clients × 129 KB must not be parsed in JS).
 * A gzip-coded body is decoded as it arrives (as a browser does); `wireBytes` counts what came
 * over the connection, `bytes` the decoded stream.
 */
let streamsToDecode = 3;
function openStream(path) {
  return new Promise((resolve, reject) => {
    const decode = sseDecode === 'all' || streamsToDecode > 0;
    streamsToDecode -= 1;
    const client = { frames: [], bytes: 0, wireBytes: 0, coding: 'identity', since: 0, lastNl: false, req: null };
    const headers = { accept: 'text/event-stream', 'accept-encoding': acceptEncoding };
    const req = http.get(`${worker}${path}`, { agent: false, headers }, (res) => {
      if (res.statusCode !== 200) {
        reject(new Error(`status ${res.statusCode}`));
        res.resume();
        return;
      }
      resolve(client);
      res.on('data', (chunk) => {
        client.wireBytes += chunk.length;
      });
      let body = res;
      if (res.headers['content-encoding'] === 'gzip' && !decode) {
        // Not decoded (BENCH_SSE_DECODE=first): each frame is one gzip member written as one
        // chunk, so a burst of wire bytes (chunks less than 20 ms apart) of 1,000 bytes or
        // more is a flag frame; keepalives and the preamble are a few dozen bytes.
        client.coding = 'gzip';
        let burst = 0;
        let lastAt = 0;
        res.on('data', (chunk) => {
          const at = performance.now();
          if (at - lastAt > 20) burst = 0;
          lastAt = at;
          const before = burst;
          burst += chunk.length;
          client.bytes += chunk.length;
          if (before < 1000 && burst >= 1000) client.frames.push(at);
        });
        res.on('error', () => {});
        return;
      }
      if (res.headers['content-encoding'] === 'gzip') {
        client.coding = 'gzip';
        body = res.pipe(zlib.createGunzip());
        body.on('error', () => {});
      }
      body.on('data', (chunk) => {
        client.bytes += chunk.length;
        let from = 0;
        if (client.lastNl && chunk[0] === 0x0a) {
          if (client.since > 64) client.frames.push(performance.now());
          client.since = 0;
          from = 1;
        }
        for (;;) {
          const at = chunk.indexOf('\n\n', from);
          if (at < 0) break;
          client.since += at + 2 - from;
          if (client.since > 64) client.frames.push(performance.now());
          client.since = 0;
          from = at + 2;
        }
        client.since += chunk.length - from;
        client.lastNl = chunk[chunk.length - 1] === 0x0a;
      });
      res.on('error', () => {});
    });
    req.on('error', reject);
    req.setTimeout(120_000, () => req.destroy());
    client.req = req;
  });
}

/**
 * Opens one WebSocket client on `path` (the stream's WebSocket transport): every message is one
 * frame; messages over 64 bytes are flag frames. With gzip in BENCH_ACCEPT_ENCODING (the
 * default) it asks `?coding=gzip`, as the JS client does: large frames then come as binary gzip
 * members. A frame counts when its message arrives (decoding is the client's own CPU); the
 * first sockets decode theirs, to check them and report the decoded size. Same
 * `frames`/`bytes`/`wireBytes`/`req.destroy()` shape as [`openStream`].
 */
let socketsToCheck = 3;
function openSocket(path) {
  return new Promise((resolve, reject) => {
    const check = socketsToCheck > 0;
    socketsToCheck -= 1;
    const client = { frames: [], bytes: 0, wireBytes: 0, coding: 'websocket', req: null };
    const coded = /gzip/.test(acceptEncoding) ? `${path}${path.includes('?') ? '&' : '?'}coding=gzip` : path;
    const socket = new WebSocket(`${worker.replace(/^http/, 'ws')}${coded}`, { perMessageDeflate: false });
    const timer = setTimeout(() => {
      socket.terminate();
      reject(new Error('no WebSocket within 120 s'));
    }, 120_000);
    socket.on('open', () => {
      clearTimeout(timer);
      resolve(client);
    });
    socket.on('unexpected-response', (_, res) => {
      clearTimeout(timer);
      reject(new Error(`status ${res.statusCode}`));
    });
    socket.on('message', (data, isBinary) => {
      client.wireBytes += data.length;
      if (isBinary) {
        client.coding = 'websocket-gzip';
        client.frames.push(performance.now());
        if (check) {
          const text = zlib.gunzipSync(data);
          if (!text.toString('latin1', 0, 6).startsWith('event:')) throw new Error('a binary message is not a gzip-coded frame');
          client.bytes += text.length;
        } else {
          client.bytes += data.length;
        }
        return;
      }
      client.bytes += data.length;
      if (data.length > 64) client.frames.push(performance.now());
    });
    socket.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    client.req = { destroy: () => socket.terminate() };
  });
}

async function openMany(count, pathOf, open = openStream) {
  const clients = [];
  for (let i = 0; i < count; i += 50) {
    const batch = [];
    for (let j = i; j < Math.min(count, i + 50); j += 1) batch.push(open(pathOf(j)));
    clients.push(...(await Promise.all(batch)));
  }
  return clients;
}

async function waitFor(predicate, timeoutMs) {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    if (predicate()) return true;
    await sleep(5);
  }
  return predicate();
}

async function control(base, method, path, body) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status}`);
  return res.json();
}

/**
 * Toggles `key` in the mock's rules (a `rules-full` event on the upstream stream). Resolves to
 * the mock's answer, whose `last_change_unix_us` is when the event was queued on its streams.
 */
async function flipRule(mock, rules, key) {
  rules.flags[key].enabled = !rules.flags[key].enabled;
  return control(mock, 'PUT', '/control/rules', rules);
}

/**
 * The wall clock minus `performance.now()`, in ms, to well under a millisecond: `Date.now()`
 * counts whole milliseconds, so its difference from `performance.now()` is at most the true
 * offset and reaches it within a millisecond's worth of samples. Taken afresh for each change,
 * so a clock the system slews during a run does not skew the figures.
 */
function wallClockOffset() {
  let best = -Infinity;
  const end = performance.now() + 1.5;
  for (let n = 0; n < 1_000_000 && performance.now() < end; n += 1) {
    best = Math.max(best, Date.now() - performance.now());
  }
  return best;
}

/**
 * Phase 1 (and 1b, and 5): `count` clients opened with `open`, then changes made by `publish`
 * (default: a rule flipped at the mock upstream), each measured.
 */
async function sse(open = openStream, publish = null, path = '/api/stream') {
  // BENCH_ROUNDS > 1: the whole phase again on the same `wrangler dev`, with new clients, to
  // tell what a process pays once (its first change ever) from what each connect costs.
  const [mock, , key] = rest;
  // Read once: the rule's state carries over from round to round, as upstream's does.
  const rules = publish ? null : JSON.parse(fs.readFileSync(process.env.BENCH_RULES_FILE, 'utf8'));
  const change = publish ?? (() => flipRule(mock, rules, key));
  const rounds = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 1));
  // BENCH_WARMUP_CHANGES: changes made before any client connects (each followed by 3 s), so
  // what a process pays once for its first change (the Relay's first compile, V8's tiering) is
  // paid before the baseline.
  for (let n = 0; n < Number(process.env.BENCH_WARMUP_CHANGES ?? 0); n += 1) {
    await change();
    await sleep(3000);
  }
  for (let round = 1; round <= rounds; round += 1) {
    if (round > 1) await sleep(3000);
    await sseRound(open, change, path, rounds > 1 ? round : undefined);
  }
}

/** One round of [`sse`], its changes made by `change`; `round` is printed when there are several. */
async function sseRound(open, change, path, round) {
  const [, count, , pidList] = rest;
  const pids = pidList.split(',').filter(Boolean).map(Number);
  const rssBefore = rssKiB(pids);
  streamsToDecode = 3;
  const clients = await openMany(Number(count), () => path, open);
  const initial = await waitFor(() => clients.every((c) => c.frames.length >= 1), 120_000);
  // BENCH_SETTLE_MS: how long the connected clients idle before the baseline is read (1 s by
  // default; more than the 15 s keepalive lets every stream carry its first keepalive).
  await sleep(Number(process.env.BENCH_SETTLE_MS ?? 1000));
  // After a full collection (isolateMemory), so the change's growth does not include
  // the connects' garbage being collected (or not) meanwhile.
  const isolateConnected = await isolateMemory();
  const rssConnected = rssKiB(pids);
  const byProcessConnected = pids.map((pid) => rssKiB([pid]));
  const partsConnected = rssParts(pids);
  const frameBytes = Math.round(clients[0].bytes);
  const wireBefore = clients.map((c) => c.wireBytes ?? c.bytes);
  const codings = {};
  for (const c of clients) codings[c.coding ?? 'websocket'] = (codings[c.coding ?? 'websocket'] ?? 0) + 1;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await change();
  const delivered = await waitFor(() => clients.every((c) => c.frames.length >= 2), 30_000);
  const wall = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  const lat = clients.filter((c) => c.frames.length >= 2).map((c) => c.frames[1] - t0).sort((a, b) => a - b);
  const settledPeak = async () => {
    let peak = rssKiB(pids);
    for (let i = 0; i < 10; i += 1) {
      await sleep(100);
      peak = Math.max(peak, rssKiB(pids));
    }
    return peak;
  };
  const rssPeak = await settledPeak();
  const rssAfter = rssKiB(pids);
  const isolateAfter = await isolateMemory();
  // What is left of the change once the isolate's garbage is collected.
  const rssAfterGc = rssKiB(pids);
  const byProcessAfterGc = pids.map((pid) => rssKiB([pid]));
  // BENCH_CHANGES > 1: further changes, one at a time, each measured the same way. The first
  // change's growth includes the high-water marks every later one reuses; these show whether a
  // publish keeps costing memory (it must not).
  const changes = Math.max(1, Number(process.env.BENCH_CHANGES ?? 1));
  const laterLastMs = [];
  const laterPeaksMib = [];
  const laterIsolate = [];
  for (let n = 2; n <= changes; n += 1) {
    await sleep(500);
    const t = performance.now();
    await change();
    await waitFor(() => clients.every((c) => c.frames.length >= n + 1), 30_000);
    laterLastMs.push(Math.round(Math.max(...clients.map((c) => (c.frames[n] ?? Infinity) - t))));
    laterPeaksMib.push(+((await settledPeak()) / 1024).toFixed(1));
    laterIsolate.push(await isolateMemory());
  }
  const partsEnd = rssParts(pids);
  const wireChange = clients.reduce((sum, c, i) => sum + (c.wireBytes ?? c.bytes) - wireBefore[i], 0);
  for (const c of clients) c.req.destroy();
  console.log(
    JSON.stringify({
      ...(round ? { round } : {}),
      clients: clients.length,
      initial_all: initial,
      delivered: lat.length,
      delivered_all: delivered,
      first_body_bytes: frameBytes,
      codings,
      // Bytes over all connections for the change (compressed when gzip-coded).
      change_wire_bytes: wireChange,
      first_ms: Math.round(lat[0] ?? -1),
      p10_ms: Math.round(percentile(lat, 10)),
      p50_ms: Math.round(percentile(lat, 50)),
      p99_ms: Math.round(percentile(lat, 99)),
      last_ms: Math.round(lat[lat.length - 1] ?? -1),
      // This load client's own CPU over the change (user+system ms): near wall_ms, it is the limit.
      client_cpu_ms: Math.round((cpu.user + cpu.system) / 1000),
      wall_ms: Math.round(wall),
      rss_before_mib: +(rssBefore / 1024).toFixed(1),
      rss_connected_mib: +(rssConnected / 1024).toFixed(1),
      rss_after_change_peak_mib: +(rssPeak / 1024).toFixed(1),
      rss_after_change_mib: +(rssAfter / 1024).toFixed(1),
      ...(isolateAfter ? { rss_after_change_gc_mib: +(rssAfterGc / 1024).toFixed(1) } : {}),
      // Each workerd process (wrangler dev runs its own proxy beside the Worker's): connected,
      // and after change 1 once collected.
      rss_by_process_mib: pids.map((pid, i) => [
        `${pid}:${processArgs(pid)}`,
        +(byProcessConnected[i] / 1024).toFixed(1),
        +(byProcessAfterGc[i] / 1024).toFixed(1),
      ]),
      rss_parts_connected_mib: partsConnected,
      rss_parts_end_mib: partsEnd,
      ...(isolateConnected ? { isolate_connected: isolateConnected, isolate_after_change: isolateAfter } : {}),
      ...(changes > 1
        ? {
            later_changes_last_ms: laterLastMs,
            later_changes_rss_peak_mib: laterPeaksMib,
            ...(isolateConnected ? { later_changes_isolate: laterIsolate } : {}),
          }
        : {}),
    }),
  );
}

/** `http_requests_total` samples of the flags route, from the relay's /api/metrics. */
async function relayFlagRequests() {
  const text = await (await fetch(`${worker}/api/metrics`)).text();
  let n = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('rollgate_proxy_http_requests_total{') || line.startsWith('http_requests_total{')) {
      if (/route="\/api\/flags"/.test(line)) n += Number(line.trim().split(/\s+/).pop());
    }
  }
  return n;
}

async function poll() {
  const [users, rounds, concurrency] = rest.map(Number);
  const before = await relayFlagRequests();
  const started = performance.now();
  let done = 0;
  let failed = 0;
  const failures = {};
  const lat = [];
  for (let round = 0; round < rounds; round += 1) {
    let next = 0;
    const workerLoop = async () => {
      while (next < users) {
        const i = next;
        next += 1;
        const t = performance.now();
        try {
          const res = await fetch(`${worker}/api/flags?user_id=user-${i}&attr.plan=pro`);
          await res.arrayBuffer();
          if (res.status !== 200) {
            failed += 1;
            failures[res.status] = (failures[res.status] ?? 0) + 1;
          }
        } catch (err) {
          failed += 1;
          const why = String(err?.cause?.code ?? err?.message ?? err);
          failures[why] = (failures[why] ?? 0) + 1;
        }
        lat.push(performance.now() - t);
        done += 1;
      }
    };
    await Promise.all(Array.from({ length: concurrency }, workerLoop));
  }
  const seconds = (performance.now() - started) / 1000;
  const after = await relayFlagRequests();
  lat.sort((a, b) => a - b);
  console.log(
    JSON.stringify({
      requests: done,
      failed,
      failures,
      seconds: +seconds.toFixed(1),
      relay_flag_requests: after - before,
      relay_share_pct: +((100 * (after - before)) / done).toFixed(2),
      // Revision checks: at most one per second (pointer TTL) per isolate, plus one to start.
      relay_checks_bound: Math.ceil(seconds) + 1,
      relay_share_bound_pct: +((100 * (after - before + Math.ceil(seconds) + 1)) / done).toFixed(2),
      p50_ms: +percentile(lat, 50).toFixed(1),
      p99_ms: +percentile(lat, 99).toFixed(1),
    }),
  );
}

async function latency() {
  const [mock, count, changes, key] = rest;
  const rules = JSON.parse(fs.readFileSync(process.env.BENCH_RULES_FILE, 'utf8'));
  // BENCH_STREAM_PATH: another stream to measure (the floor's chain).
  const path = process.env.BENCH_STREAM_PATH ?? '/api/stream';
  const clients = await openMany(Number(count), () => path);
  await waitFor(() => clients.every((c) => c.frames.length >= 1), 60_000);
  // From the control request that makes the change (`lat`), and from the moment the mock
  // queued the event on its upstream stream (`fromUpstream`: the target's "upstream → client",
  // without the control request's round trip and the mock's parse of the new rules).
  const lat = [];
  const fromUpstream = [];
  let outside = 0;
  for (let n = 0; n < Number(changes); n += 1) {
    await sleep(300);
    // Each client's next frame is this change's (counted from what it has, not from its
    // connect: a stream may start with more than one frame).
    const seen = clients.map((c) => c.frames.length);
    const offset = wallClockOffset();
    const t0 = performance.now();
    const answer = await flipRule(mock, rules, key);
    const answered = performance.now();
    const queued = answer.last_change_unix_us / 1000 - offset;
    // The event is queued while the control request is in flight: anything else is a clock
    // that moved, and that change's upstream figures are left out (and counted).
    const trusted = queued >= t0 - 0.5 && queued <= answered + 0.5;
    if (!trusted) outside += 1;
    await waitFor(() => clients.every((c, i) => c.frames.length > seen[i]), 10_000);
    clients.forEach((c, i) => {
      if (c.frames.length <= seen[i]) return;
      lat.push(c.frames[seen[i]] - t0);
      if (trusted) fromUpstream.push(c.frames[seen[i]] - queued);
    });
  }
  for (const c of clients) c.req.destroy();
  lat.sort((a, b) => a - b);
  fromUpstream.sort((a, b) => a - b);
  const figure = (values, p) => (values.length ? +percentile(values, p).toFixed(1) : null);
  console.log(
    JSON.stringify({
      clients: clients.length,
      changes: Number(changes),
      samples: lat.length,
      p50_ms: figure(lat, 50),
      p90_ms: figure(lat, 90),
      max_ms: +lat[lat.length - 1].toFixed(1),
      upstream_p50_ms: figure(fromUpstream, 50),
      upstream_p90_ms: figure(fromUpstream, 90),
      upstream_samples: fromUpstream.length,
      changes_clock_outside: outside,
    }),
  );
}

/**
 * Phase 5's change: the floor Worker pushes one frame of BENCH_FLOOR_FRAME_BYTES to all,
 * BENCH_FLOOR_BATCH at a time (25, as the shards; 0: all at once).
 */
async function floorPublish() {
  const bytes = Number(process.env.BENCH_FLOOR_FRAME_BYTES ?? 5700);
  const batch = Number(process.env.BENCH_FLOOR_BATCH ?? 25);
  const res = await fetch(`${worker}/publish?bytes=${bytes}&batch=${batch}`, { method: 'POST' });
  if (!res.ok) throw new Error(`publish: ${res.status}`);
  await res.text();
}

const modes = {
  sse: () => sse(openStream),
  ws: () => sse(openSocket),
  // BENCH_FLOOR_SOURCE=pull: pull-based streams (the shards' shape) instead of writers;
  // BENCH_FLOOR_CODING=gzip: gzip-coded streams (the shards' coding for these clients).
  floor: () =>
    sse(
      openStream,
      floorPublish,
      `/api/stream?source=${process.env.BENCH_FLOOR_SOURCE ?? 'writer'}` +
        (process.env.BENCH_FLOOR_CODING === 'gzip' ? '&coding=gzip' : '') +
        (process.env.BENCH_FLOOR_HEADERS === 'proxy' ? '&headers=proxy' : '') +
        (process.env.BENCH_FLOOR_HEAD === '1' ? '&head=1' : ''),
    ),
  poll,
  latency,
};
if (!modes[mode]) {
  console.error('usage: bench-edge.mjs sse|ws|floor|poll|latency <worker> ...');
  process.exit(2);
}
await modes[mode]();
process.exit(0);

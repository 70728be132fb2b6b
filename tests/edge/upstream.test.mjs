// Upstream mode against the mock: one upstream stream per environment, SSE fan-out through two
// shards, updates to every client, poll fallback, breaker, and recovery from storage after a restart.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { mockUpstream, control, startWorker, openStream, parseFrame, waitFor, sleep, getJson, DEFAULT_API_KEY } from "./harness.mjs";

let mock;
let worker;
let vars;

before(async () => {
  mock = await mockUpstream();
  vars = {
    ROLLGATE_API_KEY: DEFAULT_API_KEY,
    ROLLGATE_BASE_URL: mock.url,
    ROLLGATE_PROXY_SSE_SHARDS: "2",
    ROLLGATE_PROXY_REFRESH_INTERVAL: "500ms",
    ROLLGATE_PROXY_BREAKER_THRESHOLD: "3",
    ROLLGATE_PROXY_BREAKER_OPEN_TIMEOUT: "1500ms",
    ROLLGATE_PROXY_BREAKER_SUCCESS_THRESHOLD: "1",
    ROLLGATE_PROXY_SDK_KEEPALIVE: "500ms",
    ROLLGATE_PROXY_KEEPALIVE: "500ms",
  };
  worker = await startWorker({ vars });
});
after(async () => {
  await worker?.stop();
  await mock?.close();
});

const stats = () => control(mock, "GET", "/control/stats");
const flags = async () => (await getJson(worker.url + "/api/flags")).body.flags ?? {};

test("upstream data is served; many stream clients over two shards share ONE upstream stream", async () => {
  await waitFor(async () => (await flags())["new-checkout"] === true, 20_000);
  const clients = [];
  const shards = async () => {
    const text = await (await fetch(worker.url + "/api/metrics")).text();
    return [...text.matchAll(/^rollgate_proxy_sse_shard_clients\{shard="(\d+)"\} (\d+)$/gm)]
      .filter((m) => Number(m[2]) > 0).map((m) => m[1]);
  };
  // Random shard choice: open clients until both shards hold some (bounded).
  for (let i = 0; i < 24; i++) {
    clients.push(await openStream(worker.url + (i % 3 === 0 ? "/api/v1/sdk/stream" : "/api/stream")));
    if (i >= 3 && (await shards()).length === 2) break;
  }
  await waitFor(async () => (await shards()).length === 2, 5000, "clients did not spread over two shards");
  await waitFor(() => clients.every((c) => c.frames.length >= 2), 20_000);
  // Shards report their client counts to the relay on their keepalive tick.
  const health = await waitFor(async () => {
    const h = (await getJson(worker.url + "/api/health")).body;
    return h.sseClients === clients.length && h;
  }, 3000, "health.sseClients does not count every client");
  assert.equal(health.source, "upstream");
  assert.equal(health.upstream.stream, "connected");
  // The objects' wasm memory (Worker only: in `?objects`, never in the native families).
  const memory = await waitFor(async () => {
    const text = await (await fetch(worker.url + "/api/metrics?objects")).text();
    const samples = Object.fromEntries(
      [...text.matchAll(/^rollgate_proxy_wasm_memory_bytes\{object="(relay|shard)"(?:,shard="(\d+)")?\} (\d+)$/gm)]
        .map((m) => [m[2] === undefined ? m[1] : `shard-${m[2]}`, Number(m[3])]));
    return Object.keys(samples).length === 3 && samples;
  }, 5000, "no wasm memory for the relay and both shards");
  for (const [object, bytes] of Object.entries(memory)) {
    assert.ok(bytes >= 65536 && bytes % 65536 === 0, `${object}: ${bytes} is not a count of wasm pages`);
  }
  assert.doesNotMatch(await (await fetch(worker.url + "/api/metrics")).text(), /wasm_memory_bytes/);
  const s = await stats();
  assert.equal(s.open_streams, 1, "exactly one upstream stream for the environment");

  // An update reaches every client (a generous bound: the time is printed, not asserted).
  const t0 = Date.now();
  await control(mock, "PUT", "/control/flags/dark-mode", { value: true });
  await waitFor(() => clients.every((c) => c.frames.some((f) => f.includes('"dark-mode":true'))), 10_000, "update not delivered to every client");
  const latencies = clients.map((c) => c.times[c.frames.findIndex((f) => f.includes('"dark-mode":true'))] - t0);
  console.log(`# upstream->client latency over ${clients.length} clients: max ${Math.max(...latencies)} ms, mean ${(latencies.reduce((a, b) => a + b, 0) / latencies.length).toFixed(1)} ms`);
  const frame = parseFrame(clients[1].frames.at(-1).includes("dark-mode") ? clients[1].frames.at(-1) : clients[1].frames.find((f) => f.includes('"dark-mode":true')));
  assert.match(frame.id, /^\d+-[0-9a-f]{16}$/);
  // Polling follows within the edge cache TTL.
  await waitFor(async () => (await flags())["dark-mode"] === true, 20_000);

  // Keepalives flow, and clients that went away are pruned.
  await waitFor(() => clients[0].frames.some((f) => f === ": keepalive\n\n"), 20_000);
  for (const c of clients.slice(1)) c.close();
  await waitFor(async () => (await getJson(worker.url + "/api/health")).body.sseClients === 1, 5000, "dead clients not pruned");
  clients[0].close();
  assert.equal((await stats()).open_streams, 1);
});

test("stream failure falls back to polling; the stream comes back", async () => {
  await control(mock, "POST", "/control/faults", { route: "stream", status: 500 });
  await control(mock, "POST", "/control/streams/drop");
  await waitFor(async () => (await getJson(worker.url + "/api/health")).body.upstream.stream !== "connected", 20_000);
  await control(mock, "PUT", "/control/flags/beta-banner", { value: true });
  await waitFor(async () => (await flags())["beta-banner"] === true, 5000, "poll did not pick up the change");
  assert.equal((await stats()).open_streams, 0);
  await control(mock, "DELETE", "/control/faults");
  await waitFor(async () => (await stats()).open_streams === 1, 10_000, "stream not reopened");
});

test("breaker opens on an outage, data keeps being served, and it closes after recovery", async () => {
  const before = await flags();
  await control(mock, "PUT", "/control/down", { down: true });
  const open = await waitFor(async () => {
    const h = (await getJson(worker.url + "/api/health")).body;
    return h.circuit === "open" && h;
  }, 15_000, "breaker did not open");
  assert.ok(open.upstream.lastError);
  assert.equal(open.status, "degraded");
  assert.deepEqual(await flags(), before);
  const requests = (await stats()).flags_requests;
  await sleep(500);
  assert.ok((await stats()).flags_requests - requests <= 1, "an open breaker lets nothing through");
  await control(mock, "PUT", "/control/down", { down: false });
  await waitFor(async () => (await getJson(worker.url + "/api/health")).body.circuit === "closed", 15_000, "breaker did not close");
  await waitFor(async () => (await stats()).open_streams === 1, 20_000);
});

test("a restarted relay serves the persisted snapshot at once, even with upstream down", async () => {
  await control(mock, "PUT", "/control/flags", { flags: { "new-checkout": true, "dark-mode": true, "restored-flag": true } });
  await waitFor(async () => (await flags())["restored-flag"] === true, 20_000);
  const etag = (await fetch(worker.url + "/api/flags")).headers.get("etag");
  await worker.stop();
  await control(mock, "PUT", "/control/down", { down: true });
  worker = await startWorker({ vars, persistTo: worker.persistTo });
  const res = await fetch(worker.url + "/api/flags");
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("etag"), etag);
  assert.equal((await res.json()).flags["restored-flag"], true);
  const health = (await getJson(worker.url + "/api/health")).body;
  assert.equal(health.upstream.fresh, false, "restored data is stale until upstream confirms it");
  assert.equal((await fetch(worker.url + "/ready")).status, 200);
  await control(mock, "PUT", "/control/down", { down: false });
  await waitFor(async () => (await getJson(worker.url + "/api/health")).body.upstream.fresh === true, 20_000);
});

test("the API key never appears in responses", async () => {
  for (const p of ["/api/health", "/api/metrics", "/api/flags", "/nope"]) {
    const text = await (await fetch(worker.url + p)).text();
    assert.ok(!text.includes(DEFAULT_API_KEY), p);
  }
  assert.ok(!worker.log().includes(DEFAULT_API_KEY), "wrangler log");
});

test("a publish reaches every client of a shard past its first paced batch; the newer of two quick changes wins", async () => {
  // 80 clients over two shards: one shard holds at least 40, more than a batch (25) of the
  // shard's paced hand-out, so later batches are exercised whatever the random spread.
  const clients = [];
  for (let i = 0; i < 80; i++) clients.push(await openStream(worker.url + "/api/stream"));
  const lastFlags = (c) => c.frames.filter((f) => f.includes("event: flags")).at(-1) ?? "";
  await waitFor(() => clients.every((c) => lastFlags(c) !== ""), 20_000, "first flags frames");
  await control(mock, "PUT", "/control/flags/pace-check", { value: false });
  await control(mock, "PUT", "/control/flags/pace-check", { value: true });
  const newer = (c) => lastFlags(c).includes('"pace-check":true');
  const behind = () => clients.filter((c) => !newer(c)).map((c) => lastFlags(c).slice(0, 300));
  await waitFor(() => clients.every(newer), 20_000, "the newer change on every client");
  // An older hand-out still running must not follow with the older frame.
  await sleep(500);
  assert.deepEqual(behind(), [], "a client went back to the older change");
  for (const c of clients) c.close();
});

test("a WebSocket push reaches every socket of a shard past its first paced batch", async () => {
  // The same spread as above, over the hibernatable WebSocket transport (the relay's push).
  const sockets = [];
  for (let i = 0; i < 80; i++) {
    const socket = new WebSocket(worker.url.replace(/^http/, "ws") + "/api/stream");
    const client = { socket, messages: [] };
    socket.on("message", (data) => client.messages.push(String(data)));
    await new Promise((resolve, reject) => {
      socket.once("open", resolve);
      socket.once("error", reject);
    });
    sockets.push(client);
  }
  const last = (c) => c.messages.filter((m) => m.includes("event: flags")).at(-1) ?? "";
  await waitFor(() => sockets.every((c) => last(c) !== ""), 20_000, "first messages");
  await control(mock, "PUT", "/control/flags/pace-socket", { value: true });
  await waitFor(() => sockets.every((c) => last(c).includes('"pace-socket":true')), 20_000, "the change on every socket");
  for (const c of sockets) c.socket.terminate();
});

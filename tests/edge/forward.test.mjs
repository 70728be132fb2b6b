// Identify, events and telemetry are forwarded upstream by the stateless Worker, not by the relay
// object: the relay counts no such request (only the fronts' batched outcome reports), and each
// isolate holds at most core's bound of forwards of a kind in flight (the rest answered alike,
// counted busy, never sent).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { upstreamWorker, control, waitFor } from "./harness.mjs";

/** core's MAX_SIDE_REQUESTS_IN_FLIGHT. */
const BOUND = 32;

let setup;
let mock;
let worker;

before(async () => {
  // Held forwards must not time out while the test holds them.
  setup = await upstreamWorker({ ROLLGATE_PROXY_UPSTREAM_TIMEOUT: "60s" });
  ({ mock, worker } = setup);
});
after(async () => {
  await setup?.stop();
});

const stats = () => control(mock, "GET", "/control/stats");
// `?objects`: with the Worker-only rollgate_proxy_relay_requests_total.
const metrics = async () => (await fetch(worker.url + "/api/metrics?objects")).text();
/** `rollgate_proxy_upstream_requests_total{kind,outcome}` in `text`. */
const forwards = (text, kind, outcome) =>
  Number(text.match(new RegExp(`^rollgate_proxy_upstream_requests_total\\{kind="${kind}",outcome="${outcome}"\\} (\\d+)$`, "m"))?.[1] ?? 0);
/** `rollgate_proxy_relay_requests_total` by route label. */
const relayRequests = (text) =>
  Object.fromEntries([...text.matchAll(/^rollgate_proxy_relay_requests_total\{route="([^"]+)"\} (\d+)$/gm)].map((m) => [m[1], Number(m[2])]));

const event = JSON.stringify({ events: [{ flagKey: "new-checkout", eventName: "view", userId: "u-1", timestamp: "2026-01-01T00:00:00Z" }] });
const telemetry = JSON.stringify({ evaluations: { "new-checkout": { total: 1, true: 1, false: 0 } }, period_ms: 1000 });
const post = (path, body) =>
  fetch(worker.url + path, { method: "POST", headers: { "content-type": "application/json" }, body });

test("events and telemetry reach upstream from the Worker; the relay sees only batched reports", async () => {
  const before = relayRequests(await metrics());
  const base = await stats();
  const n = 20;
  for (let i = 0; i < n; i++) {
    assert.equal((await post("/api/v1/sdk/events", event)).status, 200);
    assert.equal((await post("/api/v1/sdk/telemetry", telemetry)).status, 200);
  }
  await waitFor(async () => {
    const s = await stats();
    return s.events_requests - base.events_requests === n && s.telemetry_requests - base.telemetry_requests === n;
  }, 20_000, "not every POST was forwarded");
  // The outcomes reach the relay's metrics through the fronts' reports.
  const text = await waitFor(async () => {
    const t = await metrics();
    return forwards(t, "events", "ok") === n && forwards(t, "telemetry", "ok") === n && t;
  }, 20_000, "forward outcomes not reported");
  const after = relayRequests(text);
  assert.equal(after["/api/v1/sdk/events"] ?? 0, 0, "an events POST reached the relay");
  assert.equal(after["/api/v1/sdk/telemetry"] ?? 0, 0, "a telemetry POST reached the relay");
  const reports = (after.forward_reports ?? 0) - (before.forward_reports ?? 0);
  assert.ok(reports >= 1 && reports <= 2 * n, `${reports} reports for ${2 * n} forwards`);
  console.log(`# ${2 * n} forwards reached the relay as ${reports} report(s)`);
  // Apart from the reports and this test's metrics scrapes, nothing reached the relay.
  for (const [route, count] of Object.entries(after)) {
    if (route === "forward_reports" || route === "/api/metrics") continue;
    assert.equal(count, before[route] ?? 0, `relay requests on ${route}`);
  }
});

test(`at most ${BOUND} forwards of a kind in flight per isolate; the rest answered alike, counted busy, never sent`, async () => {
  const base = await stats();
  const text0 = await metrics();
  const [ok0, busy0] = [forwards(text0, "events", "ok"), forwards(text0, "events", "busy")];
  // The mock holds every events request until the delay is removed.
  await control(mock, "PUT", "/control/delays/events", { ms: 3_600_000 });
  try {
    const extra = 8;
    let first;
    for (let i = 0; i < BOUND + extra; i++) {
      const res = await post("/api/v1/sdk/events", event);
      const body = await res.text();
      assert.equal(res.status, 200);
      first ??= body;
      assert.equal(body, first, "a busy forward changes nothing in the client's answer");
    }
    await waitFor(async () => (await stats()).events_requests - base.events_requests === BOUND, 20_000, "held forwards did not reach the mock");
    await waitFor(async () => forwards(await metrics(), "events", "busy") - busy0 === extra, 20_000, "busy forwards not counted");
    assert.equal((await stats()).events_requests - base.events_requests, BOUND, "a forward past the bound was sent");
  } finally {
    await control(mock, "DELETE", "/control/delays");
  }
  await waitFor(async () => forwards(await metrics(), "events", "ok") - ok0 === BOUND, 20_000, "released forwards not reported ok");
  assert.equal((await stats()).events_requests - base.events_requests, BOUND, "the busy forwards were never sent");
});

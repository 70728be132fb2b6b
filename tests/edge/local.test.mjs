// Local mode (no ROLLGATE_API_KEY): the rules of examples/flags.json (embedded in the Worker at
// build time); every route's bytes, CORS, client keys, limits, bad input.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { startWorker, openStream, parseFrame, waitFor, ROOT } from "./harness.mjs";

let worker;
const KEY = "client-key-1";

before(async () => {
  worker = await startWorker({
    vars: {
      ROLLGATE_PROXY_CLIENT_KEYS: `${KEY},other-key`,
      ROLLGATE_PROXY_CORS_ORIGINS: "https://app.example",
      ROLLGATE_PROXY_SSE_SHARDS: "2",
    },
  });
});
after(async () => worker?.stop());

const auth = { authorization: `Bearer ${KEY}` };
// examples/flags.json evaluated for an anonymous context: what the native server serves in
// local mode from the same file (sorted keys, as served).
const FLAGS = {
  "ai-assistant": false, "dark-mode": true, "experimental-editor": false, "free-shipping-banner": false,
  "holiday-theme": false, "legacy-dashboard": true, "maintenance-banner": false, "mobile-app-upsell": false,
  "new-checkout": false, "onboarding-checklist": false, "search-v2": false,
};
const EXAMPLE = JSON.parse(fs.readFileSync(path.join(ROOT, "examples/flags.json"), "utf8"));

test("the flags are examples/flags.json's", () => {
  assert.deepEqual(Object.keys(FLAGS), Object.keys(EXAMPLE.flags).sort(), "FLAGS above is stale: re-derive it from examples/flags.json");
});

test("GET /api/flags: bytes, ETag, Cache-Control, 304", async () => {
  const res = await fetch(worker.url + "/api/flags", { headers: auth });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "application/json");
  assert.equal(res.headers.get("cache-control"), "no-cache");
  const etag = res.headers.get("etag");
  assert.match(etag, /^"[0-9a-f]{16}"$/);
  const text = await res.text();
  const prefix = `{"flags":${JSON.stringify(FLAGS)},"_meta":{"cachedAt":"`;
  assert.ok(text.startsWith(prefix), text);
  assert.match(text.slice(prefix.length), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"\}\}$/);
  // Twice more: the edge cache answers with the same bytes.
  for (let i = 0; i < 2; i++) {
    const again = await fetch(worker.url + "/api/flags", { headers: auth });
    assert.equal(await again.text(), text);
    assert.equal(again.headers.get("etag"), etag);
  }
  const cond = await fetch(worker.url + "/api/flags", { headers: { ...auth, "if-none-match": etag } });
  assert.equal(cond.status, 304);
  assert.equal(cond.headers.get("etag"), etag);
  assert.equal(await cond.text(), "");
});

test("per-user evaluation, single flags, SDK and OFREP routes", async () => {
  const one = await fetch(worker.url + "/api/flags/ai-assistant?user_id=u1&attr.plan=enterprise&attr.seats=60", { headers: auth });
  assert.equal(await one.text(), '{"key":"ai-assistant","enabled":true}');
  const unknown = await fetch(worker.url + "/api/flags/nope", { headers: auth });
  assert.equal(await unknown.text(), '{"key":"nope","enabled":false}');
  const post = await fetch(worker.url + "/api/flags", {
    method: "POST", headers: auth, body: JSON.stringify({ user: { id: "u-123" } }),
  });
  assert.equal((await post.json()).flags["ai-assistant"], true, "u-123 is a target user");

  const sdk = await fetch(worker.url + "/api/v1/sdk/flags", { headers: auth });
  assert.equal(await sdk.text(), JSON.stringify({ flags: FLAGS }));
  const reasons = await (await fetch(worker.url + "/api/v1/sdk/flags?withReasons=true", { headers: auth })).json();
  assert.deepEqual(Object.keys(reasons), ["flags", "reasons"]);

  const single = await fetch(worker.url + "/ofrep/v1/evaluate/flags/dark-mode", {
    method: "POST", headers: { "x-api-key": KEY }, body: "{}",
  });
  assert.equal(await single.text(), '{"key":"dark-mode","value":true,"reason":"SPLIT","variant":"on","metadata":{}}');
  const missing = await fetch(worker.url + "/ofrep/v1/evaluate/flags/zz", { method: "POST", headers: auth, body: "{}" });
  assert.equal(missing.status, 404);
  assert.equal(await missing.text(), '{"key":"zz","errorCode":"FLAG_NOT_FOUND","errorDetails":"flag \\"zz\\" was not found"}');
  const bulk = await fetch(worker.url + "/ofrep/v1/evaluate/flags", { method: "POST", headers: auth, body: '{"context":{"targetingKey":"u-123"}}' });
  const bulkBody = await bulk.json();
  assert.equal(bulkBody.flags.find((f) => f.key === "ai-assistant").value, true);
  // With client keys the advertised stream carries the caller's key (EventSource sends no headers).
  assert.deepEqual(bulkBody.eventStreams, [{ type: "sse", endpoint: { requestUri: `/ofrep/v1/sse?token=${KEY}` } }]);
  const bulk304 = await fetch(worker.url + "/ofrep/v1/evaluate/flags", {
    method: "POST", headers: { ...auth, "if-none-match": bulk.headers.get("etag") }, body: '{"context":{"targetingKey":"u-123"}}',
  });
  assert.equal(bulk304.status, 304);
});

test("operations routes need no key: health shape, live, ready, metrics, /health", async () => {
  const health = await (await fetch(worker.url + "/api/health")).json();
  assert.deepEqual(Object.keys(health), ["status", "circuit", "cache", "source", "upstream", "revision", "etag", "dataAgeMs", "flags", "sseClients"]);
  assert.equal(health.status, "healthy");
  assert.equal(health.source, "local");
  assert.equal(health.flags, Object.keys(EXAMPLE.flags).length);
  assert.deepEqual(Object.keys(health.cache), ["hits", "misses", "staleHits"]);
  assert.equal((await fetch(worker.url + "/live")).status, 200);
  assert.equal((await fetch(worker.url + "/ready")).status, 200);
  assert.equal(await (await fetch(worker.url + "/health")).text(), '{"status":"ok"}');
  const metrics = await (await fetch(worker.url + "/api/metrics")).text();
  assert.match(metrics, /^rollgate_proxy_snapshot_revision 1$/m);
  assert.match(metrics, /^# TYPE rollgate_proxy_sse_clients gauge$/m);
});

test("client keys: 401 without or with a wrong key; bearer, X-API-Key and ?token= work", async () => {
  const none = await fetch(worker.url + "/api/flags");
  assert.equal(none.status, 401);
  assert.equal((await none.json()).error.code, "UNAUTHORIZED");
  assert.equal((await fetch(worker.url + "/api/flags", { headers: { authorization: "Bearer wrong" } })).status, 401);
  assert.equal((await fetch(worker.url + "/api/flags?token=other-key")).status, 200);
  assert.equal((await fetch(worker.url + "/api/flags", { headers: { "x-api-key": KEY } })).status, 200);
  const stream = await fetch(worker.url + "/api/stream");
  assert.equal(stream.status, 401);
});

test("CORS: preflight needs no key (204), allow-list echoes allowed origins only, ETag exposed", async () => {
  const pre = await fetch(worker.url + "/api/flags", {
    method: "OPTIONS",
    headers: { origin: "https://app.example", "access-control-request-method": "GET", "access-control-request-headers": "authorization" },
  });
  assert.equal(pre.status, 204);
  assert.equal(await pre.text(), "");
  assert.equal(pre.headers.get("access-control-allow-origin"), "https://app.example");
  assert.match(pre.headers.get("access-control-allow-headers"), /authorization/);
  assert.equal(pre.headers.get("access-control-max-age"), "600");
  const refused = await fetch(worker.url + "/api/flags", {
    method: "OPTIONS",
    headers: { origin: "https://evil.example", "access-control-request-method": "GET" },
  });
  assert.equal(refused.status, 204);
  assert.equal(refused.headers.get("access-control-allow-origin"), null);
  assert.equal(refused.headers.get("access-control-allow-methods"), null);
  assert.equal(refused.headers.get("vary"), "origin");
  const ok = await fetch(worker.url + "/api/flags", { headers: { ...auth, origin: "https://app.example" } });
  assert.equal(ok.headers.get("access-control-allow-origin"), "https://app.example");
  // The same exposed headers as the native server.
  assert.equal(ok.headers.get("access-control-expose-headers"), "etag,retry-after,x-request-id");
  assert.match(ok.headers.get("vary") ?? "", /(^|,\s*)origin(\s*,|$)/i);
  const denied = await fetch(worker.url + "/api/flags", { headers: { ...auth, origin: "https://evil.example" } });
  assert.equal(denied.headers.get("access-control-allow-origin"), null);
  // Internal headers never leak.
  assert.equal(ok.headers.get("x-rollgate-event-id"), null);
});

test("bad input: 404, 405, invalid key, invalid context, oversized body", async () => {
  const nf = await fetch(worker.url + "/nope", { headers: auth });
  assert.equal(nf.status, 404);
  assert.equal(await nf.text(), '{"error":{"code":"NOT_FOUND","message":"no route for \\"/nope\\""}}');
  const internal = await fetch(worker.url + "/__rollgate/subscribe", { headers: auth });
  assert.equal(internal.status, 404);
  const bad = await fetch(worker.url + "/api/flags", { method: "DELETE", headers: auth });
  assert.equal(bad.status, 405);
  assert.equal((await bad.json()).error.code, "METHOD_NOT_ALLOWED");
  const key = await fetch(worker.url + "/api/flags/bad%20key", { headers: auth });
  assert.equal(key.status, 400);
  assert.equal((await key.json()).error.code, "INVALID_FLAG_KEY");
  const ctx = await fetch(worker.url + "/api/flags", { method: "POST", headers: auth, body: "{" });
  assert.equal(ctx.status, 400);
  assert.equal((await ctx.json()).error.code, "INVALID_CONTEXT");
  const big = await fetch(worker.url + "/api/v1/sdk/events", { method: "POST", headers: auth, body: "x".repeat(70_000) });
  assert.equal(big.status, 413);
  assert.equal((await big.json()).error.code, "PAYLOAD_TOO_LARGE");
  const events = await fetch(worker.url + "/api/v1/sdk/events", { method: "POST", headers: auth, body: '{"events":[{},{}]}' });
  assert.equal(await events.text(), '{"received":2}');
});

test("streams: retry first, then the snapshot frame; Last-Event-ID suppresses a repeat", async () => {
  const s = await openStream(worker.url + "/api/stream?token=" + KEY);
  assert.equal(s.res.headers.get("content-type"), "text/event-stream");
  assert.equal(s.res.headers.get("cache-control"), "no-cache");
  assert.equal(s.res.headers.get("x-accel-buffering"), "no");
  await waitFor(() => s.frames.length >= 2, 20_000);
  // `retry:` is 2000 ms ±10 %, drawn per connection so reconnects spread out.
  const isRetry = (f) => /^retry: (\d+)\n\n$/.test(f) && Math.abs(Number(f.match(/\d+/)[0]) - 2000) <= 200;
  assert.ok(isRetry(s.frames[0]), s.frames[0]);
  const frame = parseFrame(s.frames[1]);
  assert.equal(frame.event, "flags");
  assert.match(frame.id, /^1-[0-9a-f]{16}$/);
  assert.deepEqual(JSON.parse(frame.data), FLAGS);
  s.close();

  const again = await openStream(worker.url + "/api/stream?token=" + KEY, { "last-event-id": frame.id });
  await waitFor(() => again.frames.length >= 1, 20_000);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(again.frames.length, 1, String(again.frames));
  assert.ok(isRetry(again.frames[0]), again.frames[0]);
  again.close();

  const sdk = await openStream(worker.url + "/api/v1/sdk/stream?user_id=u-123", auth);
  await waitFor(() => sdk.frames.length >= 2, 20_000);
  const init = parseFrame(sdk.frames[1]);
  assert.equal(init.event, "init");
  assert.equal(JSON.parse(init.data).flags["ai-assistant"], true);
  sdk.close();

  const ofrep = await openStream(worker.url + "/ofrep/v1/sse", auth);
  await waitFor(() => ofrep.frames.length >= 2, 20_000);
  const note = parseFrame(ofrep.frames[1]);
  assert.equal(note.event, "message");
  assert.equal(JSON.parse(note.data).type, "refetchEvaluation");
  ofrep.close();
});

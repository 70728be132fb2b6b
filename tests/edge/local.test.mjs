// Local mode (no ROLLGATE_API_KEY): every route's bytes, CORS, client keys, limits, bad input.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startWorker, openStream, parseFrame, waitFor } from "./harness.mjs";

let worker;
const KEY = "client-key-1";

before(async () => {
  worker = await startWorker({
    vars: { CLIENT_KEYS: `${KEY},other-key`, CORS_ORIGINS: "https://app.example", SSE_SHARDS: "2" },
  });
});
after(async () => worker?.stop());

const auth = { authorization: `Bearer ${KEY}` };
const FLAGS = { "beta-banner": false, "dark-mode": false, "new-checkout": true, "pro-dashboard": false };

test("GET /api/flags: bytes, ETag, Cache-Control, 304", async () => {
  const res = await fetch(worker.url + "/api/flags", { headers: auth });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "application/json");
  assert.equal(res.headers.get("cache-control"), "no-cache");
  const etag = res.headers.get("etag");
  assert.match(etag, /^"[0-9a-f]{16}"$/);
  const text = await res.text();
  assert.match(text, /^\{"flags":\{"beta-banner":false,"dark-mode":false,"new-checkout":true,"pro-dashboard":false\},"_meta":\{"cachedAt":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"\}\}$/);
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
  const one = await fetch(worker.url + "/api/flags/pro-dashboard?user_id=u1&attr.plan=pro", { headers: auth });
  assert.equal(await one.text(), '{"key":"pro-dashboard","enabled":true}');
  const unknown = await fetch(worker.url + "/api/flags/nope", { headers: auth });
  assert.equal(await unknown.text(), '{"key":"nope","enabled":false}');
  const post = await fetch(worker.url + "/api/flags", {
    method: "POST", headers: auth, body: JSON.stringify({ user: { id: "u-admin" } }),
  });
  assert.equal((await post.json()).flags["pro-dashboard"], true);

  const sdk = await fetch(worker.url + "/api/v1/sdk/flags", { headers: auth });
  assert.equal(await sdk.text(), JSON.stringify({ flags: FLAGS }));
  const reasons = await (await fetch(worker.url + "/api/v1/sdk/flags?withReasons=true", { headers: auth })).json();
  assert.deepEqual(Object.keys(reasons), ["flags", "reasons"]);

  const single = await fetch(worker.url + "/ofrep/v1/evaluate/flags/new-checkout", {
    method: "POST", headers: { "x-api-key": KEY }, body: "{}",
  });
  assert.equal(await single.text(), '{"key":"new-checkout","value":true,"reason":"SPLIT","variant":"on","metadata":{}}');
  const missing = await fetch(worker.url + "/ofrep/v1/evaluate/flags/zz", { method: "POST", headers: auth, body: "{}" });
  assert.equal(missing.status, 404);
  assert.equal(await missing.text(), '{"key":"zz","errorCode":"FLAG_NOT_FOUND","errorDetails":"flag \\"zz\\" was not found"}');
  const bulk = await fetch(worker.url + "/ofrep/v1/evaluate/flags", { method: "POST", headers: auth, body: '{"context":{"targetingKey":"u-admin"}}' });
  const bulkBody = await bulk.json();
  assert.equal(bulkBody.flags.find((f) => f.key === "pro-dashboard").value, true);
  // With client keys the advertised stream carries the caller's key (EventSource sends no headers).
  assert.deepEqual(bulkBody.eventStreams, [{ type: "sse", endpoint: { requestUri: `/ofrep/v1/sse?token=${KEY}` } }]);
  const bulk304 = await fetch(worker.url + "/ofrep/v1/evaluate/flags", {
    method: "POST", headers: { ...auth, "if-none-match": bulk.headers.get("etag") }, body: '{"context":{"targetingKey":"u-admin"}}',
  });
  assert.equal(bulk304.status, 304);
});

test("operations routes need no key: health shape, live, ready, metrics, /health", async () => {
  const health = await (await fetch(worker.url + "/api/health")).json();
  assert.deepEqual(Object.keys(health), ["status", "circuit", "cache", "source", "upstream", "revision", "etag", "dataAgeMs", "flags", "sseClients"]);
  assert.equal(health.status, "healthy");
  assert.equal(health.source, "local");
  assert.equal(health.flags, 4);
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

test("CORS: preflight needs no key, allow-list echoes allowed origins only, ETag exposed", async () => {
  const pre = await fetch(worker.url + "/api/flags", {
    method: "OPTIONS",
    headers: { origin: "https://app.example", "access-control-request-method": "GET", "access-control-request-headers": "authorization" },
  });
  assert.equal(pre.status, 200);
  assert.equal(pre.headers.get("access-control-allow-origin"), "https://app.example");
  assert.match(pre.headers.get("access-control-allow-headers"), /authorization/);
  const ok = await fetch(worker.url + "/api/flags", { headers: { ...auth, origin: "https://app.example" } });
  assert.equal(ok.headers.get("access-control-allow-origin"), "https://app.example");
  // The same exposed headers as the native server.
  assert.equal(ok.headers.get("access-control-expose-headers"), "etag,retry-after,x-request-id");
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
  await waitFor(() => s.frames.length >= 2, 5000);
  assert.equal(s.frames[0], "retry: 2000\n\n");
  const frame = parseFrame(s.frames[1]);
  assert.equal(frame.event, "flags");
  assert.match(frame.id, /^1-[0-9a-f]{16}$/);
  assert.deepEqual(JSON.parse(frame.data), FLAGS);
  s.close();

  const again = await openStream(worker.url + "/api/stream?token=" + KEY, { "last-event-id": frame.id });
  await waitFor(() => again.frames.length >= 1, 5000);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(again.frames, ["retry: 2000\n\n"]);
  again.close();

  const sdk = await openStream(worker.url + "/api/v1/sdk/stream?user_id=u-admin", auth);
  await waitFor(() => sdk.frames.length >= 2, 5000);
  const init = parseFrame(sdk.frames[1]);
  assert.equal(init.event, "init");
  assert.equal(JSON.parse(init.data).flags["pro-dashboard"], true);
  sdk.close();

  const ofrep = await openStream(worker.url + "/ofrep/v1/sse", auth);
  await waitFor(() => ofrep.frames.length >= 2, 5000);
  const note = parseFrame(ofrep.frames[1]);
  assert.equal(note.event, "message");
  assert.equal(JSON.parse(note.data).type, "refetchEvaluation");
  ofrep.close();
});

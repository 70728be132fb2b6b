// The client against a real node:http server on 127.0.0.1 (dev/mock-proxy.js): real fetch, real
// ETags and 304s, a real text/event-stream parsed by the `eventsource` package. Every wait is
// bounded.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { EventSource } from 'eventsource';

import { startMockProxy } from '../dev/mock-proxy.js';
import { createClient } from '../src/index.js';

/** Wait until `condition()` is true, checking every 10 ms, for at most `ms`. */
async function waitFor(/** @type {() => boolean} */ condition, ms = 4_000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${ms} ms: ${condition}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** @type {Awaited<ReturnType<typeof startMockProxy>>} */
let proxy;

before(async () => {
  proxy = await startMockProxy({
    flags: { a: true, b: false },
    evaluate: (all, context) => (context.id === 'beta-1' ? { ...all, beta: true } : all),
  });
});

after(async () => {
  await proxy.close();
});

test('poll mode: loads flags, revalidates with If-None-Match (304), picks up changes', { timeout: 10_000 }, async () => {
  proxy.setFlags({ a: true, b: false });
  const client = createClient({ url: proxy.url, mode: 'poll', pollIntervalMs: 30 });
  try {
    assert.equal(await client.ready, true);
    assert.deepEqual(client.getAll(), { a: true, b: false });
    const start = proxy.requests.length;
    await waitFor(() => proxy.requests.slice(start).some((r) => r.status === 304));
    const revalidation = proxy.requests.slice(start).find((r) => r.status === 304);
    assert.match(String(revalidation?.headers['if-none-match']), /^"\d+-[0-9a-f]{16}"$/);
    /** @type {string[][]} */
    const changes = [];
    client.subscribe((_, changed) => changes.push([...changed]));
    proxy.setFlags({ a: false, b: false });
    await waitFor(() => client.isEnabled('a', true) === false);
    assert.deepEqual(changes, [['a']]);
    assert.equal(client.state(), 'polling');
  } finally {
    client.close();
  }
});

test('stream mode: initial frame, pushed changes, per-user evaluation, reconnect', { timeout: 10_000 }, async () => {
  proxy.setFlags({ a: true, b: false });
  const client = createClient({
    url: proxy.url,
    mode: 'stream',
    context: { id: 'beta-1' },
    EventSource,
    pollIntervalMs: 60_000,
  });
  try {
    assert.equal(await client.ready, true);
    assert.equal(client.state(), 'open');
    assert.deepEqual(client.getAll(), { a: true, b: false, beta: true });
    const polls = proxy.requests.filter((r) => r.path === '/api/flags').length;
    proxy.setFlags({ a: true, b: true });
    await waitFor(() => client.isEnabled('b'));
    // The server restarts its streams: EventSource reconnects (the mock sends `retry: 1000`).
    proxy.dropStreams();
    await waitFor(() => client.state() === 'connecting');
    await waitFor(() => client.state() === 'open');
    proxy.setFlags({ a: false, b: true });
    await waitFor(() => !client.isEnabled('a', true));
    assert.equal(proxy.requests.filter((r) => r.path === '/api/flags').length, polls, 'no polling needed');
  } finally {
    client.close();
  }
  await waitFor(() => proxy.streamCount() === 0);
});

test('client keys: Bearer for fetch, ?token= for the stream, 401 falls back and reports', { timeout: 10_000 }, async () => {
  const guarded = await startMockProxy({ flags: { secret: true }, clientKey: 'ck_live' });
  const good = createClient({ url: guarded.url, mode: 'stream', clientKey: 'ck_live', EventSource });
  const polling = createClient({ url: guarded.url, mode: 'poll', clientKey: 'ck_live' });
  const bad = createClient({ url: guarded.url, mode: 'stream', clientKey: 'nope', EventSource, pollIntervalMs: 50 });
  try {
    assert.equal(await good.ready, true);
    assert.equal(good.state(), 'open');
    assert.equal(await polling.ready, true);
    assert.equal(polling.isEnabled('secret'), true);
    const stream = guarded.requests.find((r) => r.path === '/api/stream' && r.status === 200);
    assert.equal(stream?.query.get('token'), 'ck_live');
    const fetched = guarded.requests.find((r) => r.path === '/api/flags' && r.status === 200);
    assert.equal(fetched?.headers.authorization, 'Bearer ck_live');
    assert.equal(fetched?.query.get('token'), null);
    // The wrong key: the stream is refused (401), the client polls, and the poll says why.
    await waitFor(() => bad.state() === 'error');
    assert.equal(bad.lastError()?.code, 'unauthorized');
    assert.equal(bad.lastError()?.status, 401);
    assert.deepEqual(bad.getAll(), {});
  } finally {
    good.close();
    polling.close();
    bad.close();
    await guarded.close();
  }
});

// Stream mode: EventSource messages, reconnects, fallback to polling and back, client key token,
// close().

import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { createClient } from '../src/index.js';
import { useClock } from './clock.js';
import { FakeEventSource, fakeFetch, response } from './fakes.js';

const BASE = 'http://proxy.test';
const ok = (/** @type {Record<string, boolean>} */ flags) => response(200, { flags }, { ETag: '"p"' });

beforeEach(() => FakeEventSource.reset());

/** @param {Partial<import('../src/index.js').ClientOptions>} [extra] */
function streamClient(extra = {}) {
  const fake = fakeFetch(() => ok({ polled: true }));
  const client = createClient({
    url: BASE,
    mode: 'stream',
    EventSource: FakeEventSource,
    fetch: fake.fetch,
    pollIntervalMs: 1_000,
    streamRetryMs: 10_000,
    ...extra,
  });
  return { client, calls: fake.calls };
}

test('stream delivers flags, goes open, and notifies on changes only', async (t) => {
  const clock = useClock(t);
  const { client, calls } = streamClient({ context: { id: 'u1', email: 'u1@example.com' } });
  assert.equal(FakeEventSource.instances.length, 1);
  const es = FakeEventSource.latest();
  assert.equal(es.url, `${BASE}/api/stream?user_id=u1&email=u1%40example.com`);
  assert.equal(client.state(), 'connecting');
  /** @type {readonly string[][]} */
  const changes = [];
  client.subscribe((_, changed) => changes.push([...changed]));
  es.emit({ a: true, b: false });
  assert.equal(await client.ready, true);
  assert.equal(client.state(), 'open');
  assert.deepEqual(client.getAll(), { a: true, b: false });
  es.emit({ a: true, b: false });
  es.emit({ a: true, b: true });
  assert.deepEqual(changes, [['a', 'b'], ['b']]);
  es.emit('not json');
  es.emit({ a: 1 }, 'message'); // not an `event: flags` frame: ignored
  assert.deepEqual(client.getAll(), { a: true, b: true });
  await clock.advance(60_000);
  assert.equal(calls.length, 0, 'no polling while the stream works');
  client.close();
});

test('transient errors keep the flags and report connecting until the stream delivers again', async (t) => {
  const clock = useClock(t);
  const { client, calls } = streamClient();
  const es = FakeEventSource.latest();
  es.emit({ a: true });
  /** @type {string[]} */
  const states = [];
  client.onStateChange((state) => states.push(state));
  // Two errors, a message, two errors: the counter restarts on every message, so no fallback.
  es.fail();
  es.fail();
  assert.equal(client.state(), 'connecting');
  assert.deepEqual(client.getAll(), { a: true });
  es.emit({ a: false });
  es.fail();
  es.fail();
  es.emit({ a: false });
  assert.equal(FakeEventSource.instances.length, 1, 'EventSource reconnects by itself');
  assert.equal(es.closed, false);
  await clock.advance(30_000);
  assert.equal(calls.length, 0);
  assert.deepEqual(states, ['connecting', 'open', 'connecting', 'open']);
  client.close();
});

test('three errors without a message fall back to polling, then the stream is tried again', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0.5); // no jitter: exact delays
  const { client, calls } = streamClient();
  const first = FakeEventSource.latest();
  first.fail();
  first.fail();
  assert.equal(calls.length, 0);
  first.fail();
  assert.equal(first.closed, true, 'the failing EventSource is closed');
  assert.equal(client.lastError()?.code, 'stream_unavailable');
  await clock.advance(0);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].url, `${BASE}/api/flags`);
  assert.equal(client.state(), 'polling');
  assert.deepEqual(client.getAll(), { polled: true });
  assert.equal(await client.ready, true);
  // Polling every second until the stream is retried after streamRetryMs (10 s).
  await clock.advance(9_000);
  assert.equal(calls.length, 10);
  assert.equal(FakeEventSource.instances.length, 1);
  await clock.advance(1_000);
  assert.equal(FakeEventSource.instances.length, 2, 'stream retried');
  const second = FakeEventSource.latest();
  assert.equal(client.state(), 'polling', 'still polling until the new stream delivers');
  await clock.advance(1_000);
  const polled = calls.length;
  second.emit({ streamed: true });
  assert.equal(client.state(), 'open');
  assert.deepEqual(client.getAll(), { streamed: true });
  await clock.advance(30_000);
  assert.equal(calls.length, polled, 'polling stopped once the stream is back');
  client.close();
});

test('a stream that keeps failing is retried with doubling delays while polling goes on', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0.5); // no jitter: exact delays
  const { client } = streamClient({ pollIntervalMs: 60_000 });
  const failThrice = () => {
    const es = FakeEventSource.latest();
    es.fail();
    es.fail();
    es.fail();
  };
  failThrice();
  // Retries at +10 s, then +20 s, then +40 s after each failure.
  for (const delay of [10_000, 20_000, 40_000]) {
    const before = FakeEventSource.instances.length;
    await clock.advance(delay - 1);
    assert.equal(FakeEventSource.instances.length, before, `not before ${delay} ms`);
    await clock.advance(1);
    assert.equal(FakeEventSource.instances.length, before + 1, `retry after ${delay} ms`);
    failThrice();
  }
  assert.equal(client.state(), 'polling');
  client.close();
});

test('a refused stream (readyState CLOSED, e.g. 401) falls back at once; the poll shows the 401', async (t) => {
  const clock = useClock(t);
  const fake = fakeFetch(() => response(401, { error: { code: 'unauthorized', message: 'wrong client key' } }));
  const client = createClient({
    url: BASE,
    mode: 'stream',
    clientKey: 'k 1',
    EventSource: FakeEventSource,
    fetch: fake.fetch,
  });
  const es = FakeEventSource.latest();
  assert.equal(es.url, `${BASE}/api/stream?token=k+1`, 'EventSource cannot send headers: the key goes in ?token=');
  es.fail(false);
  assert.equal(es.closed, true);
  assert.equal(client.lastError()?.code, 'stream_unavailable');
  await clock.advance(0);
  assert.equal(fake.calls.length, 1);
  assert.equal(fake.calls[0].init.headers.Authorization, 'Bearer k 1');
  assert.equal(client.state(), 'error');
  assert.equal(client.lastError()?.code, 'unauthorized');
  client.close();
});

test('without EventSource, stream mode polls and never tries to stream', async (t) => {
  const clock = useClock(t);
  const { client, calls } = streamClient({ EventSource: null });
  assert.equal(client.lastError()?.code, 'stream_unavailable');
  await clock.advance(0);
  assert.equal(client.state(), 'polling');
  await clock.advance(600_000);
  assert.ok(calls.length > 100);
  assert.equal(FakeEventSource.instances.length, 0);
  client.close();
});

test('an EventSource constructor that throws falls back to polling', async (t) => {
  const clock = useClock(t);
  class Throwing {
    constructor() {
      throw new SyntaxError('bad URL');
    }
  }
  const { client, calls } = streamClient({ EventSource: /** @type {any} */ (Throwing) });
  assert.match(client.lastError()?.message ?? '', /bad URL/);
  await clock.advance(0);
  assert.equal(calls.length, 1);
  assert.equal(client.state(), 'polling');
  client.close();
});

test('setContext reopens the stream for the new user', async (t) => {
  useClock(t);
  const { client } = streamClient({ context: { id: 'u1' } });
  const first = FakeEventSource.latest();
  first.emit({ beta: false });
  const switched = client.setContext({ id: 'u2', attributes: { country: 'IT', admin: false, skip: undefined } });
  assert.equal(first.closed, true);
  assert.equal(client.state(), 'connecting');
  const second = FakeEventSource.latest();
  assert.equal(second.url, `${BASE}/api/stream?user_id=u2&attr.country=IT&attr.admin=false`);
  first.emit({ beta: 'stale' === 'stale' }); // a late frame from the old stream is ignored
  assert.deepEqual(client.getAll(), { beta: false });
  second.emit({ beta: true });
  assert.equal(await switched, true);
  assert.deepEqual(client.getAll(), { beta: true });
  client.close();
});

test('close() closes the stream, cancels the retry and stops fallback polling', async (t) => {
  const clock = useClock(t);
  const { client, calls } = streamClient();
  const es = FakeEventSource.latest();
  es.fail(false);
  await clock.advance(0);
  assert.equal(calls.length, 1);
  /** @type {string[]} */
  const states = [];
  client.onStateChange((state) => states.push(state));
  client.close();
  await clock.advance(600_000);
  assert.equal(calls.length, 1);
  assert.equal(FakeEventSource.instances.length, 1, 'no stream retry after close');
  assert.deepEqual(states, ['closed']);

  const { client: open } = streamClient();
  const live = FakeEventSource.latest();
  live.emit({ a: true });
  open.close();
  assert.equal(live.closed, true);
  live.emit({ a: false });
  assert.deepEqual(open.getAll(), { a: true }, 'frames after close are ignored');
  assert.equal(open.state(), 'closed');
});

test('a stream that had delivered is reopened after jittered backoff before any polling', async (t) => {
  const clock = useClock(t);
  let sample = 0;
  t.mock.method(Math, 'random', () => sample);
  const { client, calls } = streamClient({ pollIntervalMs: 30_000 });
  const first = FakeEventSource.latest();
  first.emit({ a: true }, 'flags', '3-x');
  assert.equal(client.state(), 'open');
  // The proxy was redeployed: the stream is refused (5xx) and the browser gives up.
  first.fail(false);
  assert.equal(first.closed, true);
  assert.equal(client.state(), 'connecting');
  assert.deepEqual(client.getAll(), { a: true }, 'flags kept');
  // 1 s × 0.5 with the lowest sample: reopened after 500 ms, and no poll meanwhile.
  await clock.advance(499);
  assert.equal(FakeEventSource.instances.length, 1);
  await clock.advance(1);
  assert.equal(FakeEventSource.instances.length, 2, 'reopened');
  assert.equal(calls.length, 0, 'no polling yet');
  // Refused again: 2 s × 1.5 with the highest sample.
  sample = 0.999_999;
  FakeEventSource.latest().fail(false);
  await clock.advance(2_999);
  assert.equal(FakeEventSource.instances.length, 2);
  await clock.advance(1);
  assert.equal(FakeEventSource.instances.length, 3);
  // A third refusal falls back to polling, its first poll at a random point of 5 s.
  sample = 0.5;
  FakeEventSource.latest().fail(false);
  assert.equal(client.lastError()?.code, 'stream_unavailable');
  await clock.advance(2_400);
  assert.equal(calls.length, 0);
  await clock.advance(200);
  assert.equal(calls.length, 1, 'first poll after 2.5 s');
  assert.equal(client.state(), 'polling');
  client.close();
});

test('a reopened stream that delivers resets the backoff', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0.5);
  const { client, calls } = streamClient();
  FakeEventSource.latest().emit({ a: true });
  for (let round = 0; round < 4; round += 1) {
    FakeEventSource.latest().fail(false);
    await clock.advance(1_000);
    FakeEventSource.latest().emit({ a: round % 2 === 0 });
    assert.equal(client.state(), 'open');
  }
  assert.equal(FakeEventSource.instances.length, 5);
  assert.equal(calls.length, 0, 'never polled');
  client.close();
});

test('the stream retry after a fallback is jittered', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0);
  streamClient();
  const es = FakeEventSource.latest();
  es.fail(false);
  // streamRetryMs 10 s × 0.8 with the lowest sample.
  await clock.advance(7_999);
  assert.equal(FakeEventSource.instances.length, 1);
  await clock.advance(1);
  assert.equal(FakeEventSource.instances.length, 2);
});

test('revisions only move forward across connections, unless the numbering restarted', async (t) => {
  useClock(t);
  t.mock.method(Math, 'random', () => 0.5);
  const { client } = streamClient();
  const first = FakeEventSource.latest();
  first.emit({ r5: true }, 'flags', '5-a');
  first.emit({ r4: true }, 'flags', '4-b'); // older on the same connection: ignored
  assert.deepEqual(client.getAll(), { r5: true });
  first.emit({ r6: true }, 'flags', '6-c');
  assert.deepEqual(client.getAll(), { r6: true });
  // A new connection (another replica, behind) begins older: ignored, then it catches up.
  client.setContext({ id: 'u' });
  const second = FakeEventSource.latest();
  second.emit({ r5: true }, 'flags', '5-a');
  assert.deepEqual(client.getAll(), { r6: true });
  second.emit({ r7: true }, 'flags', '7-d');
  assert.deepEqual(client.getAll(), { r7: true });
  // Two connections in a row begin older: the proxy's revisions restarted; take them.
  client.setContext({ id: 'v' });
  FakeEventSource.latest().emit({ r1: true }, 'flags', '1-e');
  assert.deepEqual(client.getAll(), { r7: true });
  client.setContext({ id: 'w' });
  FakeEventSource.latest().emit({ r2: true }, 'flags', '2-f');
  assert.deepEqual(client.getAll(), { r2: true });
  client.close();
});

// Stream mode over the WebSocket transport: the same frames as the event stream, the same
// forward-only revisions, reconnects and fallback rules, plus the client's pings.

import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';
import { gzipSync } from 'node:zlib';

import { createClient } from '../src/index.js';
import { useClock } from './clock.js';
import { FakeWebSocket, fakeFetch, response } from './fakes.js';

const BASE = 'https://proxy.test';
const ok = (/** @type {Record<string, boolean>} */ flags) => response(200, { flags }, { ETag: '"p"' });

beforeEach(() => FakeWebSocket.reset());

/** @param {Partial<import('../src/index.js').ClientOptions>} [extra] */
function socketClient(extra = {}) {
  const fake = fakeFetch(() => ok({ polled: true }));
  const client = createClient({
    url: BASE,
    mode: 'stream',
    transport: 'websocket',
    WebSocket: FakeWebSocket,
    EventSource: null,
    fetch: fake.fetch,
    pollIntervalMs: 1_000,
    streamRetryMs: 10_000,
    ...extra,
  });
  return { client, calls: fake.calls };
}

test('frames arrive over the socket; revisions only move forward', async (t) => {
  const clock = useClock(t);
  const { client, calls } = socketClient({ context: { id: 'u1' }, clientKey: 'ck_1' });
  assert.equal(FakeWebSocket.instances.length, 1);
  const ws = FakeWebSocket.latest();
  // Node has DecompressionStream: the client asks for large frames gzip-coded.
  assert.equal(ws.url, 'wss://proxy.test/api/stream?user_id=u1&token=ck_1&coding=gzip');
  ws.open();
  assert.equal(client.state(), 'connecting');
  ws.emit({ a: true, b: false }, '5-aa');
  assert.equal(await client.ready, true);
  assert.equal(client.state(), 'open');
  assert.deepEqual(client.getAll(), { a: true, b: false });
  ws.emit({ a: false, b: false }, '4-bb');
  assert.deepEqual(client.getAll(), { a: true, b: false }, 'an older revision is not applied');
  ws.emit({ a: true, b: true }, '6-cc');
  assert.deepEqual(client.getAll(), { a: true, b: true });
  // Comments, pongs and other events are not flags; two frames in one message both count.
  ws.message(': keepalive\n\n');
  ws.message('pong');
  ws.emit({ x: true }, '7-dd', 'message');
  ws.message('event: flags\nid: 7-ee\ndata: {"a":false,\ndata: "b":true}\n\nevent: flags\nid: 8-ff\ndata: {"a":false,"b":false}\n\n');
  assert.deepEqual(client.getAll(), { a: false, b: false });
  await clock.advance(10_000);
  assert.equal(calls.length, 0, 'no polling while the socket works');
  client.close();
  assert.equal(ws.closed, true);
});

test('pings keep the socket; silence drops it and it reconnects', async (t) => {
  const clock = useClock(t);
  const { client, calls } = socketClient();
  const ws = FakeWebSocket.latest();
  ws.open();
  ws.emit({ a: true }, '1-a');
  await clock.advance(30_000, 1_000);
  assert.deepEqual(ws.sent, ['ping']);
  ws.message('pong');
  await clock.advance(30_000, 1_000);
  assert.deepEqual(ws.sent, ['ping', 'ping']);
  // No pong this time: the next period finds the socket dead.
  await clock.advance(30_000, 1_000);
  assert.equal(ws.closed, true);
  assert.equal(client.state(), 'connecting');
  assert.deepEqual(client.getAll(), { a: true }, 'flags kept meanwhile');
  await clock.advance(2_500);
  assert.equal(FakeWebSocket.instances.length, 2, 'reconnected after ~2 s');
  const next = FakeWebSocket.latest();
  next.open();
  next.emit({ a: false }, '2-b');
  assert.equal(client.state(), 'open');
  assert.deepEqual(client.getAll(), { a: false });
  assert.equal(calls.length, 0);
  client.close();
});

test('a socket that closes after opening reconnects, spread out, and keeps revisions', async (t) => {
  const clock = useClock(t);
  const { client, calls } = socketClient();
  const ws = FakeWebSocket.latest();
  ws.open();
  ws.emit({ a: true }, '3-a');
  ws.drop();
  assert.equal(client.state(), 'connecting');
  await clock.advance(1_700);
  assert.equal(FakeWebSocket.instances.length, 1, 'not before the retry delay (2 s ±10 %)');
  await clock.advance(600);
  assert.equal(FakeWebSocket.instances.length, 2);
  const next = FakeWebSocket.latest();
  next.open();
  next.emit({ a: false }, '2-z');
  assert.deepEqual(client.getAll(), { a: true }, 'one connection beginning older is not applied');
  next.emit({ a: false }, '4-b');
  assert.deepEqual(client.getAll(), { a: false });
  assert.equal(calls.length, 0);
  client.close();
});

test('a refused socket falls back to polling, then tries the socket again later', async (t) => {
  const clock = useClock(t);
  const { client, calls } = socketClient();
  FakeWebSocket.latest().drop();
  await clock.advance(100);
  assert.equal(calls.length, 1, 'polls at once: no flags from the socket yet');
  assert.equal(await client.ready, true);
  assert.equal(client.state(), 'polling');
  assert.equal(FakeWebSocket.instances.length, 1, 'a refusal is not retried by the socket itself');
  await clock.advance(12_500);
  assert.equal(FakeWebSocket.instances.length, 2, 'the stream is tried again after streamRetryMs (±20 %)');
  const ws = FakeWebSocket.latest();
  ws.open();
  ws.emit({ streamed: true }, '1-a');
  assert.equal(client.state(), 'open');
  const polls = calls.length;
  await clock.advance(5_000);
  assert.equal(calls.length, polls, 'polling stopped');
  client.close();
});

test('no WebSocket available: polls; a bad transport throws', async (t) => {
  const clock = useClock(t);
  const { client, calls } = socketClient({ WebSocket: null, fetch: fakeFetch(() => 'hang').fetch });
  assert.equal(client.lastError()?.message, 'WebSocket is not available here');
  assert.equal(client.state(), 'connecting');
  client.close();
  const polling = socketClient({ WebSocket: null });
  await clock.advance(100);
  assert.equal(await polling.client.ready, true);
  assert.equal(polling.calls.length, 1);
  assert.equal(polling.client.state(), 'polling');
  assert.equal(FakeWebSocket.instances.length, 0);
  polling.client.close();
  assert.equal(calls.length, 0);
  assert.throws(
    () => createClient({ url: BASE, transport: /** @type {any} */ ('carrier-pigeon') }),
    /transport must be 'sse' or 'websocket'/,
  );
});

test('a same-origin client resolves the socket URL against the page', async (t) => {
  useClock(t);
  const location = { href: 'http://app.example/page' };
  Object.defineProperty(globalThis, 'location', { value: location, configurable: true });
  t.after(() => {
    delete (/** @type {any} */ (globalThis).location);
  });
  const { client } = socketClient({ url: '' });
  assert.equal(FakeWebSocket.latest().url, 'ws://app.example/api/stream?coding=gzip');
  client.close();
});

/** `frame` as the proxy sends a large one to a socket that asked `coding=gzip`. */
const member = (/** @type {Record<string, boolean>} */ flags, /** @type {string} */ id) =>
  new Uint8Array(gzipSync(`event: flags\nid: ${id}\ndata: ${JSON.stringify(flags)}\n\n`));

/** Waits (real time, bounded) until `check()` holds. */
async function until(/** @type {() => boolean} */ check, what = 'condition') {
  for (let i = 0; i < 400 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.ok(check(), what);
}

test('gzip-coded frames arrive as binary messages, decoded in order with text ones', async () => {
  const { client, calls } = socketClient();
  const ws = FakeWebSocket.latest();
  assert.match(ws.url, /[?&]coding=gzip$/);
  assert.equal(/** @type {any} */ (ws).binaryType, 'arraybuffer');
  ws.open();
  // A binary frame, then a text one right behind it: applied in that order.
  ws.message(member({ a: true, b: false }, '5-aa').buffer);
  ws.emit({ a: true, b: true }, '6-bb');
  assert.deepEqual(client.getAll(), {}, 'the text frame waits for the binary one before it');
  await until(() => client.getAll().b === true, 'both frames applied');
  assert.equal(client.state(), 'open');
  // A view and a Blob decode too; an older revision is still not applied.
  ws.message(member({ a: false, b: true }, '7-cc'));
  ws.message(new Blob([member({ a: false, b: false }, '4-dd')]));
  ws.message(new Blob([member({ a: false, b: false }, '8-ee')]));
  await until(() => client.getAll().b === false, 'the newest frame applied');
  assert.deepEqual(client.getAll(), { a: false, b: false });
  // Uncompressed binary text is read as UTF-8.
  ws.message(new TextEncoder().encode('event: flags\nid: 9-ff\ndata: {"a":true,"b":false}\n\n').buffer);
  await until(() => client.getAll().a === true, 'plain binary frame applied');
  // A member that does not decode: the socket is dropped and reopened, the flags kept.
  const bad = member({ a: false, b: false }, '10-gg');
  bad[bad.length - 5] ^= 0xff;
  ws.message(bad);
  await until(() => ws.closed, 'a corrupt message drops the socket');
  assert.deepEqual(client.getAll(), { a: true, b: false });
  assert.equal(calls.length, 0);
  client.close();
});

test('without DecompressionStream the client does not ask for gzip', async (t) => {
  const original = /** @type {any} */ (globalThis).DecompressionStream;
  delete (/** @type {any} */ (globalThis).DecompressionStream);
  t.after(() => {
    /** @type {any} */ (globalThis).DecompressionStream = original;
  });
  const { client } = socketClient();
  assert.equal(FakeWebSocket.latest().url, 'wss://proxy.test/api/stream');
  client.close();
});

// Poll mode: ETag/304, change notifications, error backoff, no overlapping requests, timeouts,
// client keys, context switches and close().

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createClient } from '../src/index.js';
import { useClock, START } from './clock.js';
import { fakeFetch, response, settle } from './fakes.js';

const BASE = 'http://proxy.test';

/** @param {Record<string, boolean>} flags @param {string} etag */
const ok = (flags, etag) => response(200, { flags, _meta: { cachedAt: '2026-11-24T20:40:57.123Z' } }, { ETag: etag });

test('first poll loads flags, resolves ready and reports polling', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => ok({ a: true, b: false }, '"1-x"'));
  const client = createClient({ url: `${BASE}/`, mode: 'poll', fetch });
  assert.equal(client.state(), 'connecting');
  assert.equal(client.lastUpdated(), null);
  await clock.advance(0);
  assert.equal(await client.ready, true);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].url, `${BASE}/api/flags`);
  assert.equal(calls[0].init.method, 'GET');
  assert.equal(calls[0].init.headers.Accept, 'application/json');
  assert.equal(calls[0].init.headers.Authorization, undefined);
  assert.equal(calls[0].init.headers['If-None-Match'], undefined);
  assert.deepEqual(client.getAll(), { a: true, b: false });
  assert.equal(Object.isFrozen(client.getAll()), true);
  assert.equal(client.isEnabled('a'), true);
  assert.equal(client.isEnabled('b', true), false);
  assert.equal(client.isEnabled('missing'), false);
  assert.equal(client.isEnabled('missing', true), true);
  assert.equal(client.isEnabled('toString'), false, 'prototype keys are not flags');
  assert.equal(client.state(), 'polling');
  assert.equal(client.lastUpdated()?.getTime(), START);
  client.close();
});

test('304 keeps the flags and the snapshot, confirms freshness, and does not notify', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch((call) =>
    call.init.headers['If-None-Match'] === '"1-x"' ? response(304) : ok({ a: true }, '"1-x"'),
  );
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 5_000, fetch });
  await clock.advance(0);
  const snapshot = client.getAll();
  let notified = 0;
  client.subscribe(() => notified++);
  await clock.advance(4_999);
  assert.equal(calls.length, 1, 'no poll before the interval');
  await clock.advance(1);
  assert.equal(calls.length, 2);
  assert.equal(calls[1].init.headers['If-None-Match'], '"1-x"');
  assert.equal(client.getAll(), snapshot, 'same object after a 304');
  assert.equal(notified, 0);
  assert.equal(client.state(), 'polling');
  assert.equal(client.lastUpdated()?.getTime(), START + 5_000);
  client.close();
});

test('subscribers hear real changes only, with the changed keys', async (t) => {
  const clock = useClock(t);
  const answers = [
    ok({ a: true, b: false }, '"1"'),
    ok({ a: true, b: false }, '"2"'), // new ETag, same flags
    ok({ a: false, b: false, c: true }, '"3"'),
    ok({ a: false, c: true }, '"4"'),
  ];
  const { fetch } = fakeFetch((_, n) => answers[Math.min(n, answers.length) - 1]);
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 1_000, fetch });
  /** @type {[Record<string, boolean>, readonly string[]][]} */
  const seen = [];
  const unsubscribe = client.subscribe((flags, changed) => seen.push([flags, changed]));
  await clock.advance(0);
  assert.deepEqual(seen, [[{ a: true, b: false }, ['a', 'b']]]);
  await clock.advance(1_000);
  assert.equal(seen.length, 1, 'unchanged flags under a new ETag do not notify');
  await clock.advance(1_000);
  assert.equal(seen.length, 2);
  assert.deepEqual(seen[1][0], { a: false, b: false, c: true });
  assert.deepEqual([...seen[1][1]].sort(), ['a', 'c']);
  unsubscribe();
  await clock.advance(1_000);
  assert.equal(seen.length, 2, 'no calls after unsubscribe');
  assert.deepEqual(client.getAll(), { a: false, c: true });
  client.close();
});

test('a throwing listener does not stop the others', async (t) => {
  const clock = useClock(t);
  const errors = t.mock.method(console, 'error', () => {});
  const { fetch } = fakeFetch(() => ok({ a: true }, '"1"'));
  const client = createClient({ url: BASE, mode: 'poll', fetch });
  let second = 0;
  client.subscribe(() => {
    throw new Error('boom');
  });
  client.subscribe(() => second++);
  await clock.advance(0);
  assert.equal(second, 1);
  assert.equal(errors.mock.callCount(), 1);
  client.close();
});

test('errors keep the flags, report error, and back off exponentially until a success', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0.5); // no jitter: factor 1.0
  let failing = false;
  const { fetch, calls } = fakeFetch(() =>
    failing
      ? response(503, { error: { code: 'upstream_unavailable', message: 'no data yet' } })
      : ok({ a: true }, '"1"'),
  );
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 10_000, fetch });
  /** @type {string[]} */
  const states = [];
  client.onStateChange((state) => states.push(state));
  await clock.advance(0);
  failing = true;
  await clock.advance(10_000);
  assert.equal(calls.length, 2);
  assert.equal(client.state(), 'error');
  assert.equal(client.lastError()?.code, 'upstream_unavailable');
  assert.equal(client.lastError()?.status, 503);
  assert.equal(client.lastError()?.message, 'no data yet');
  assert.deepEqual(client.getAll(), { a: true }, 'flags survive errors');
  // Retries after 1, 2, 4, 8, 16 s: doubling from 1 s, capped at max(interval, 60 s).
  const gaps = [1_000, 2_000, 4_000, 8_000, 16_000];
  for (const gap of gaps) {
    const before = calls.length;
    await clock.advance(gap - 1);
    assert.equal(calls.length, before, `no retry before ${gap} ms`);
    await clock.advance(1);
    assert.equal(calls.length, before + 1, `retry after ${gap} ms`);
  }
  failing = false;
  await clock.advance(32_000);
  assert.equal(client.state(), 'polling');
  assert.equal(client.lastError(), null);
  const before = calls.length;
  await clock.advance(10_000);
  assert.equal(calls.length, before + 1, 'back to the normal interval after a success');
  assert.deepEqual(states, ['polling', 'error', 'polling']);
  client.close();
});

test('backoff is capped at max(pollInterval, 60 s)', async (t) => {
  const clock = useClock(t);
  t.mock.method(Math, 'random', () => 0.5);
  const { fetch, calls } = fakeFetch(() => new TypeError('fetch failed'));
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 1_000, fetch });
  await clock.advance(0);
  assert.equal(client.lastError()?.code, 'network');
  // 1, 2, 4, 8, 16, 32 s, then capped at 60 s.
  for (const gap of [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]) await clock.advance(gap);
  assert.equal(calls.length, 9);
  await clock.advance(59_999);
  assert.equal(calls.length, 9);
  await clock.advance(1);
  assert.equal(calls.length, 10);
  client.close();
});

test('requests never overlap: the next poll waits for a slow answer', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => 'hang');
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 100, requestTimeoutMs: 60_000, fetch });
  await clock.advance(0);
  for (let i = 0; i < 20; i += 1) await clock.advance(100);
  assert.equal(calls.length, 1, 'one request in flight at most');
  calls[0].settled = true;
  calls[0].resolve(ok({ a: true }, '"1"'));
  await settle();
  assert.equal(client.state(), 'polling');
  await clock.advance(99);
  assert.equal(calls.length, 1);
  await clock.advance(1);
  assert.equal(calls.length, 2, 'next poll one interval after the answer');
  client.close();
});

test('a request that takes longer than requestTimeoutMs is aborted as a timeout', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => 'hang');
  const client = createClient({ url: BASE, mode: 'poll', requestTimeoutMs: 2_000, fetch });
  await clock.advance(0);
  await clock.advance(1_999);
  assert.equal(client.state(), 'connecting');
  await clock.advance(1);
  assert.equal(calls[0].init.signal.aborted, true);
  assert.equal(client.state(), 'error');
  assert.equal(client.lastError()?.code, 'timeout');
  client.close();
});

test('a wrong client key is a 401 error with the proxy code; the key goes in a Bearer header', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch((call) =>
    call.init.headers.Authorization === 'Bearer right'
      ? ok({ a: true }, '"1"')
      : response(401, { error: { code: 'unauthorized', message: 'missing or wrong client key' } }),
  );
  const wrong = createClient({ url: BASE, mode: 'poll', clientKey: 'wrong', fetch });
  await clock.advance(0);
  assert.equal(wrong.state(), 'error');
  assert.equal(wrong.lastError()?.code, 'unauthorized');
  assert.equal(wrong.lastError()?.status, 401);
  assert.equal(wrong.lastError()?.name, 'RollgateProxyError');
  wrong.close();
  const right = createClient({ url: BASE, mode: 'poll', clientKey: 'right', fetch });
  await clock.advance(0);
  assert.equal(right.state(), 'polling');
  assert.equal(calls[1].url, `${BASE}/api/flags`, 'no token in the fetch URL');
  right.close();
});

test('bad payloads are invalid_response errors and change nothing', async (t) => {
  const clock = useClock(t);
  const bodies = [
    ok({ a: true }, '"1"'),
    response(200, '{not json'),
    response(200, { flags: ['a'] }),
    response(200, { nope: 1 }),
    response(500, 'plain text'),
  ];
  const { fetch } = fakeFetch((_, n) => bodies[n - 1]);
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 1, fetch });
  t.mock.method(Math, 'random', () => 0.5);
  await clock.advance(0);
  const snapshot = client.getAll();
  const codes = [];
  for (let i = 0; i < 4; i += 1) {
    await clock.advance(10);
    codes.push(client.lastError()?.code);
  }
  assert.deepEqual(codes, ['invalid_response', 'invalid_response', 'invalid_response', 'http_500']);
  assert.equal(client.getAll(), snapshot);
  client.close();
});

test('non-boolean flag values are dropped', async (t) => {
  const clock = useClock(t);
  const { fetch } = fakeFetch(() => ok(/** @type {any} */ ({ a: true, b: 'yes', c: null, d: false }), '"1"'));
  const client = createClient({ url: BASE, mode: 'poll', fetch });
  await clock.advance(0);
  assert.deepEqual(client.getAll(), { a: true, d: false });
  client.close();
});

test('close() aborts the request in flight, stops polling and resolves ready false', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => 'hang');
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 100, fetch });
  /** @type {string[]} */
  const states = [];
  client.onStateChange((state) => states.push(state));
  let notified = 0;
  client.subscribe(() => notified++);
  await clock.advance(0);
  client.close();
  assert.equal(calls[0].init.signal.aborted, true);
  assert.equal(await client.ready, false);
  assert.equal(client.state(), 'closed');
  for (let i = 0; i < 10; i += 1) await clock.advance(1_000);
  assert.equal(calls.length, 1);
  assert.equal(notified, 0);
  assert.deepEqual(states, ['closed']);
  client.close(); // idempotent
  assert.equal(await client.setContext({ id: 'x' }), false);
});

test('close() after a successful poll cancels the next one', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => ok({ a: true }, '"1"'));
  const client = createClient({ url: BASE, mode: 'poll', pollIntervalMs: 100, fetch });
  await clock.advance(0);
  client.close();
  await clock.advance(10_000);
  assert.equal(calls.length, 1);
  assert.deepEqual(client.getAll(), { a: true }, 'flags stay readable after close');
});

test('setContext refetches for the new user without the old ETag', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch((call) => {
    const user = new URL(call.url).searchParams.get('user_id');
    return ok({ beta: user === 'beta-1' }, `"${user}"`);
  });
  const client = createClient({ url: BASE, mode: 'poll', context: { id: 'u1' }, fetch });
  await clock.advance(0);
  assert.equal(client.isEnabled('beta'), false);
  const switched = client.setContext({ id: 'beta-1', attributes: { plan: 'pro' } });
  assert.equal(client.state(), 'connecting');
  await clock.advance(0);
  assert.equal(await switched, true);
  assert.equal(calls.length, 2);
  assert.equal(calls[1].url, `${BASE}/api/flags?user_id=beta-1&attr.plan=pro`);
  assert.equal(calls[1].init.headers['If-None-Match'], undefined);
  assert.equal(client.isEnabled('beta'), true);
  client.close();
});

test('setContext while a request is in flight discards the stale answer', async (t) => {
  const clock = useClock(t);
  const { fetch, calls } = fakeFetch(() => 'hang');
  const client = createClient({ url: BASE, mode: 'poll', context: { id: 'old' }, fetch });
  await clock.advance(0);
  client.setContext({ id: 'new' });
  await clock.advance(0);
  assert.equal(calls.length, 2);
  calls[0].settled = true;
  calls[0].resolve(ok({ stale: true }, '"old"'));
  calls[1].settled = true;
  calls[1].resolve(ok({ fresh: true }, '"new"'));
  await settle();
  assert.deepEqual(client.getAll(), { fresh: true });
  client.close();
});

test('initialFlags are served before the first answer', async (t) => {
  const clock = useClock(t);
  const { fetch } = fakeFetch(() => ok({ a: false }, '"1"'));
  const client = createClient({ url: BASE, mode: 'poll', initialFlags: { a: true }, fetch });
  assert.equal(client.isEnabled('a'), true);
  await clock.advance(0);
  assert.equal(client.isEnabled('a'), false);
  client.close();
});

test('bad options are TypeErrors', () => {
  const { fetch } = fakeFetch();
  assert.throws(() => createClient({ mode: /** @type {any} */ ('ws'), fetch }), TypeError);
  assert.throws(() => createClient({ pollIntervalMs: 0, fetch }), TypeError);
  assert.throws(() => createClient({ pollIntervalMs: Number.NaN, fetch }), TypeError);
  assert.throws(() => createClient({ requestTimeoutMs: -1, fetch }), TypeError);
  assert.throws(() => createClient({ streamRetryMs: /** @type {any} */ ('1'), fetch }), TypeError);
});

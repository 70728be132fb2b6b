// Context → query string, and URL building from the base URL.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { contextToQuery, createClient } from '../src/index.js';
import { FakeEventSource, fakeFetch } from './fakes.js';

test('contextToQuery encodes user_id, email, attr.<name> and token', () => {
  /** @type {[Parameters<typeof contextToQuery>, string][]} */
  const cases = [
    [[undefined], ''],
    [[null, null], ''],
    [[{}], ''],
    [[{ id: 'u1' }], '?user_id=u1'],
    [[{ id: '' , email: '' }], ''],
    [[{ email: 'a+b@example.com' }], '?email=a%2Bb%40example.com'],
    [[{ id: 'u 1', email: 'x@y.z' }], '?user_id=u+1&email=x%40y.z'],
    [[{ attributes: { plan: 'pro', seats: 3, beta: true, ratio: 0.5 } }], '?attr.plan=pro&attr.seats=3&attr.beta=true&attr.ratio=0.5'],
    [[{ attributes: { gone: null, missing: undefined, nested: /** @type {any} */ ({ a: 1 }) } }], ''],
    [[{ attributes: { 'a&b=c': 'x&y' } }], '?attr.a%26b%3Dc=x%26y'],
    [[{ id: 'u1' }, 'ck_1'], '?user_id=u1&token=ck_1'],
    [[undefined, 'k/=+'], '?token=k%2F%3D%2B'],
  ];
  for (const [args, expected] of cases) {
    assert.equal(contextToQuery(...args), expected, JSON.stringify(args));
  }
});

test('the base URL may be absolute, have trailing slashes, or be empty (same origin)', () => {
  /** @type {[string | undefined, string][]} */
  const cases = [
    ['https://flags.example.com', 'https://flags.example.com/api/stream'],
    ['https://flags.example.com///', 'https://flags.example.com/api/stream'],
    ['https://example.com/flags/', 'https://example.com/flags/api/stream'],
    ['', '/api/stream'],
    [undefined, '/api/stream'],
  ];
  for (const [url, expected] of cases) {
    FakeEventSource.reset();
    const client = createClient({ url, EventSource: FakeEventSource, fetch: fakeFetch().fetch });
    assert.equal(FakeEventSource.latest().url, expected);
    client.close();
  }
});

test('the context is copied: changing the caller object later changes nothing', () => {
  FakeEventSource.reset();
  const context = { id: 'u1', attributes: { plan: 'free' } };
  const client = createClient({ url: 'http://p', context, EventSource: FakeEventSource, fetch: fakeFetch().fetch });
  context.id = 'u2';
  context.attributes.plan = 'pro';
  client.setContext(undefined);
  assert.equal(FakeEventSource.instances[0].url, 'http://p/api/stream?user_id=u1&attr.plan=free');
  assert.equal(FakeEventSource.latest().url, 'http://p/api/stream', 'setContext(undefined) is anonymous');
  client.close();
});

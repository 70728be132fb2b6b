// React bindings, server side: react-dom/server renders with the client's current snapshot.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createElement as h } from 'react';
import { renderToString } from 'react-dom/server';

import { createClient } from '../src/index.js';
import { FlagsProvider, useFlag, useFlags, useFlagsClient, useFlagsState } from '../src/react.js';
import { FakeEventSource, fakeFetch } from './fakes.js';

function newClient(extra = {}) {
  return createClient({ url: 'http://proxy.test', EventSource: FakeEventSource, fetch: fakeFetch().fetch, ...extra });
}

function Checkout() {
  const on = useFlag('new-checkout');
  return h('p', null, on ? 'new checkout' : 'old checkout');
}

function Everything() {
  const flags = useFlags();
  const state = useFlagsState();
  return h('ul', { 'data-state': state }, Object.entries(flags).map(([k, v]) => h('li', { key: k }, `${k}=${v}`)));
}

test('server rendering uses the current snapshot (initialFlags)', () => {
  const client = newClient({ initialFlags: { 'new-checkout': true, other: false } });
  const html = renderToString(h(FlagsProvider, { client }, h(Checkout), h(Everything)));
  assert.equal(
    html,
    '<p>new checkout</p><ul data-state="connecting"><li>new-checkout=true</li><li>other=false</li></ul>',
  );
  client.close();
});

test('a client passed to the hook works without a provider; neither is an error', async (t) => {
  const client = newClient({ initialFlags: { x: true } });
  function Direct() {
    return h('b', null, String(useFlag('x', false, client)) + String(useFlag('missing', true, client)));
  }
  assert.equal(renderToString(h(Direct)), '<b>truetrue</b>');
  function Orphan() {
    useFlagsClient();
    return null;
  }
  t.mock.method(console, 'error', () => {});
  assert.throws(() => renderToString(h(Orphan)), /FlagsProvider/);
  client.close();
});

// React bindings, live: react-test-renderer under act(), driven by a fake EventSource.
// (Server rendering is in react-ssr.test.js: one renderer per process avoids React's warning
// about two renderers sharing a context.)

import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { act, createElement as h } from 'react';
import TestRenderer from 'react-test-renderer';

import { createClient } from '../src/index.js';
import { FlagsProvider, useFlag, useFlags, useFlagsState } from '../src/react.js';
import { FakeEventSource, fakeFetch } from './fakes.js';

// Tell React this is a test environment, so act() is expected and warnings stay quiet.
/** @type {any} */ (globalThis).IS_REACT_ACT_ENVIRONMENT = true;

beforeEach(() => FakeEventSource.reset());

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

test('hooks re-render on stream updates; useFlag only when its own flag changes', async () => {
  const client = newClient();
  let checkoutRenders = 0;
  function CountingCheckout() {
    checkoutRenders += 1;
    const on = useFlag('new-checkout');
    return h('p', null, on ? 'new checkout' : 'old checkout');
  }
  /** @type {TestRenderer.ReactTestRenderer | undefined} */
  let root;
  await act(async () => {
    root = TestRenderer.create(h(FlagsProvider, { client }, h(CountingCheckout), h(Everything)));
  });
  const view = () => JSON.stringify(root?.toJSON());
  assert.match(view(), /old checkout/);
  assert.match(view(), /"data-state":"connecting"/);
  const es = FakeEventSource.latest();
  await act(async () => es.emit({ 'new-checkout': true, banner: false }));
  assert.match(view(), /new checkout/);
  assert.match(view(), /"data-state":"open"/);
  assert.match(view(), /banner=false/);
  const before = checkoutRenders;
  await act(async () => es.emit({ 'new-checkout': true, banner: true }));
  assert.match(view(), /banner=true/);
  assert.equal(checkoutRenders, before, 'useFlag("new-checkout") ignores other flags');
  await act(async () => es.emit({ 'new-checkout': false, banner: true }));
  assert.match(view(), /old checkout/);
  await act(async () => root?.unmount());
  client.close();
});

test('unmounting unsubscribes', async () => {
  const client = newClient();
  let active = 0;
  const counted = {
    ...client,
    subscribe(/** @type {import('../src/index.js').FlagsListener} */ fn) {
      active += 1;
      const off = client.subscribe(fn);
      return () => {
        active -= 1;
        off();
      };
    },
  };
  /** @type {TestRenderer.ReactTestRenderer | undefined} */
  let root;
  await act(async () => {
    root = TestRenderer.create(h(FlagsProvider, { client: counted }, h(Checkout), h(Checkout)));
  });
  assert.equal(active, 2);
  await act(async () => root?.unmount());
  assert.equal(active, 0);
  client.close();
});

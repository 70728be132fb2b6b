// The demo page (core/assets) in jsdom against the mock proxy: its script runs with the
// client library served beside it, real fetch and a real EventSource; the test drives it through
// the stable ids and data attributes a browser test would use. Every wait is bounded.

import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { pathToFileURL } from 'node:url';

import { EventSource } from 'eventsource';
import { JSDOM } from 'jsdom';

import { startMockProxy } from '../dev/mock-proxy.js';

const assets = new URL('../../../core/assets/', import.meta.url);
const clientFile = new URL('../src/index.js', import.meta.url);
const GLOBALS = ['window', 'document', 'location', 'history', 'fetch', 'EventSource', 'rollgateDemo'];
const saved = Object.fromEntries(GLOBALS.map((name) => [name, Object.getOwnPropertyDescriptor(globalThis, name)]));
/** @type {string[]} */
const tempDirs = [];

after(async () => {
  for (const name of GLOBALS) {
    const descriptor = saved[name];
    if (descriptor) Object.defineProperty(globalThis, name, descriptor);
    else delete (/** @type {any} */ (globalThis))[name];
  }
  for (const dir of tempDirs) await rm(dir, { recursive: true, force: true });
});

/** Wait until `condition()` is true, checking every 10 ms, for at most `ms`. */
async function waitFor(/** @type {() => unknown} */ condition, ms = 4_000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${ms} ms: ${condition}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/**
 * Open the page at `pageUrl` in jsdom and run demo.js as a browser would: module imports resolve
 * beside it (the client library is copied in as ./rollgate-proxy-client.js), relative URLs
 * resolve against the page.
 * @param {string} pageUrl
 */
async function openPage(pageUrl) {
  const html = await readFile(new URL('index.html', assets), 'utf8');
  const dom = new JSDOM(html, { url: pageUrl, pretendToBeVisual: true });
  const { window } = dom;
  const realFetch = saved.fetch?.value;
  const page = (/** @type {string | URL} */ url) => new URL(String(url), window.location.href);
  Object.assign(globalThis, {
    window,
    document: window.document,
    location: window.location,
    history: window.history,
    fetch: (/** @type {string} */ url, /** @type {any} */ init) => realFetch(page(url), init),
    EventSource: class PageEventSource extends EventSource {
      constructor(/** @type {string} */ url) {
        super(page(url));
      }
    },
  });
  const dir = await mkdtemp(join(tmpdir(), 'rollgate-demo-'));
  tempDirs.push(dir);
  await copyFile(new URL('demo.js', assets), join(dir, 'demo.js'));
  await copyFile(clientFile, join(dir, 'rollgate-proxy-client.js'));
  await import(pathToFileURL(join(dir, 'demo.js')).href);
  const demo = /** @type {any} */ (globalThis).rollgateDemo;
  const doc = window.document;
  const $ = (/** @type {string} */ selector) => /** @type {HTMLElement} */ (doc.querySelector(selector));
  return {
    window,
    demo,
    $,
    flag: (/** @type {string} */ key) => doc.querySelector(`[data-flag="${key}"]`)?.getAttribute('data-enabled') ?? null,
    keys: () => [...doc.querySelectorAll('#flags [data-flag]')].map((row) => row.getAttribute('data-flag')),
  };
}

test('the page shows every flag, flips them live, tracks state, age, health and users', { timeout: 15_000 }, async () => {
  const proxy = await startMockProxy({
    flags: { 'new-checkout': true, 'dark-mode': false },
    evaluate: (all, context) => (context.id?.startsWith('beta') ? { ...all, 'beta-dashboard': true } : all),
  });
  const page = await openPage(`${proxy.url}/`);
  try {
    await waitFor(() => page.flag('new-checkout') === 'true');
    assert.deepEqual(page.keys(), ['dark-mode', 'new-checkout'], 'alphabetical');
    assert.equal(page.flag('dark-mode'), 'false');
    assert.equal(page.$('[data-flag="dark-mode"] .flag-text').textContent, 'Off');
    assert.equal(page.$('#flag-count').textContent, '2');
    assert.equal(page.$('#flags-empty').hidden, true);
    await waitFor(() => page.$('#connection-state').dataset.state === 'streaming');
    assert.match(page.$('#connection-state').textContent ?? '', /streaming/i);

    // Health and the proxy's data age (a number of ms that ticks).
    await waitFor(() => page.$('#health').dataset.status === 'healthy');
    assert.match(page.$('#health').textContent ?? '', /healthy · circuit closed/);
    assert.match(page.$('#health-fields').textContent ?? '', /upstream\.mode/);
    await waitFor(() => page.$('#data-age').dataset.source === 'proxy');
    const age = Number(page.$('#data-age').dataset.ageMs);
    assert.ok(Number.isFinite(age) && age >= 0, `data-age-ms = ${age}`);
    assert.match(page.$('#data-age').textContent ?? '', /^\d+s$/);
    await waitFor(() => Number(page.$('#data-age').dataset.ageMs) >= age + 1_000, 3_000);

    // A change over SSE flips the row in place, flashes it and announces it.
    const row = page.$('[data-flag="dark-mode"]');
    proxy.setFlags({ 'new-checkout': true, 'dark-mode': true });
    await waitFor(() => page.flag('dark-mode') === 'true');
    assert.equal(page.$('[data-flag="dark-mode"]'), row, 'same element, updated');
    assert.equal(row.classList.contains('flash'), true);
    assert.equal(page.$('[data-flag="new-checkout"]').classList.contains('flash'), false);
    assert.equal(page.$('#announcer').textContent, 'dark-mode turned on');
    proxy.setFlags({ 'dark-mode': true });
    await waitFor(() => page.flag('new-checkout') === null);
    assert.equal(page.$('#flag-count').textContent, '1');

    // Per-user evaluation.
    /** @type {HTMLInputElement} */ (page.$('#user-id')).value = 'beta-7';
    /** @type {HTMLFormElement} */ (page.$('#user-form')).requestSubmit();
    await waitFor(() => page.flag('beta-dashboard') === 'true');
    assert.equal(page.$('#current-user').dataset.user, 'beta-7');
    assert.equal(page.window.location.search, '?user_id=beta-7');
    const stream = proxy.requests.filter((r) => r.path === '/api/stream').at(-1);
    assert.equal(stream?.query.get('user_id'), 'beta-7');
    page.$('#user-clear').click();
    await waitFor(() => page.flag('beta-dashboard') === null);
    assert.equal(page.$('#current-user').textContent, 'anonymous');

    // Filter.
    proxy.setFlags({ 'dark-mode': true, 'search-v2': false });
    await waitFor(() => page.flag('search-v2') === 'false');
    const filter = /** @type {HTMLInputElement} */ (page.$('#flag-filter'));
    filter.value = 'SEARCH';
    filter.dispatchEvent(new page.window.Event('input'));
    assert.equal(page.$('[data-flag="dark-mode"]').hidden, true);
    assert.equal(page.$('[data-flag="search-v2"]').hidden, false);
    assert.equal(page.$('#error').hidden, true);
  } finally {
    page.demo.stop();
    page.window.close();
    await proxy.close();
  }
});

test('the page reads ?token= as its client key, and explains a missing one', { timeout: 15_000 }, async () => {
  const proxy = await startMockProxy({ flags: { guarded: true }, clientKey: 'ck_demo' });
  const withoutKey = await openPage(`${proxy.url}/`);
  try {
    await waitFor(() => withoutKey.$('#connection-state').dataset.state === 'error');
    const banner = withoutKey.$('#error');
    assert.equal(banner.hidden, false);
    assert.match(banner.textContent ?? '', /unauthorized/);
    assert.match(banner.textContent ?? '', /\?token=/);
    assert.deepEqual(withoutKey.keys(), []);
  } finally {
    withoutKey.demo.stop();
    withoutKey.window.close();
  }
  const withKey = await openPage(`${proxy.url}/?token=ck_demo`);
  try {
    await waitFor(() => withKey.flag('guarded') === 'true');
    await waitFor(() => withKey.$('#connection-state').dataset.state === 'streaming');
    assert.equal(withKey.$('#error').hidden, true);
    const health = proxy.requests.filter((r) => r.path === '/api/health').at(-1);
    assert.equal(health?.headers.authorization, 'Bearer ck_demo');
  } finally {
    withKey.demo.stop();
    withKey.window.close();
    await proxy.close();
  }
});

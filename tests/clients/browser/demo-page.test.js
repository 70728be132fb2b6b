// A real browser against the proxy: Debian's Chromium, headless, driven by playwright-core.
// - the demo page served by the proxy (`/`) shows the flags and follows a change at Rollgate
//   (stable selectors: [data-flag][data-enabled], #connection-state[data-state]);
// - a page on a second origin (127.0.0.2) polls `/api/flags` over CORS (with If-None-Match, which
//   needs a preflight, and reading the exposed ETag), and streams with the proxy's own JS client,
//   over EventSource and over the browser's WebSocket (`transport: 'websocket'`);
// - with client keys, `/?token=<key>` works and a page without a key shows a 401 error state;
// - a large flag set streams gzip-coded, and the page follows a change on the same stream;
//   over the WebSocket its frames come as binary gzip messages that the client decompresses.
// Screenshots go to test-artifacts/ (not committed).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MOCK_API_KEY, Mock, Proxy } from '../lib/procs.js';
import { SCREENSHOTS, launchChromium, staticServer } from '../lib/browser.js';

const CLIENT_KEY = 'ck_browser_suite';

const POLLING_PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>other origin: polling</title></head>
<body><h1>Flags from another origin</h1><pre id="out" data-state="loading"></pre>
<script type="module">
const params = new URLSearchParams(location.search);
const proxy = params.get('proxy');
const out = document.getElementById('out');
let etag = null, polls = 0, notModified = 0;
async function poll() {
  const headers = {};
  if (etag) headers['If-None-Match'] = etag;
  try {
    const r = await fetch(proxy + '/api/flags', { headers, cache: 'no-store' });
    polls++;
    if (r.status === 304) notModified++;
    else if (r.ok) {
      etag = r.headers.get('ETag');
      const body = await r.json();
      out.textContent = JSON.stringify(body.flags);
      out.dataset.state = 'ok';
      out.dataset.etag = etag ?? '';
    } else out.dataset.state = 'http-' + r.status;
  } catch (e) {
    out.dataset.state = 'error';
    out.dataset.error = String(e);
  }
  out.dataset.polls = String(polls);
  out.dataset.notModified = String(notModified);
  setTimeout(poll, 250);
}
poll();
</script></body></html>`;

const CLIENT_PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>other origin: JS client</title></head>
<body><h1>JS client from another origin</h1><pre id="out" data-state="loading"></pre>
<script type="module">
const params = new URLSearchParams(location.search);
const proxy = params.get('proxy');
const out = document.getElementById('out');
try {
  const { createClient } = await import(proxy + '/rollgate-proxy-client.js');
  const flags = createClient({ url: proxy, mode: 'stream', transport: params.get('transport') ?? 'sse' });
  const render = () => {
    out.textContent = JSON.stringify(flags.getAll());
    out.dataset.state = flags.state();
  };
  flags.subscribe(render);
  flags.onStateChange(render);
  await flags.ready;
  render();
} catch (e) {
  out.dataset.state = 'import-error';
  out.textContent = String(e);
}
</script></body></html>`;

/** The flags a page shows, from the demo page's stable selectors. */
async function shownFlags(page) {
  return page.$$eval('[data-flag][data-enabled]', (rows) =>
    Object.fromEntries(rows.map((r) => [r.getAttribute('data-flag'), r.getAttribute('data-enabled') === 'true'])),
  );
}

/**
 * A mock upstream, a proxy on it (with `args`) and Chromium, for one `describe`: started in its
 * `before` (`prepare(mock)` runs before the proxy starts), stopped in its `after`.
 */
function stack(args = [], prepare = async () => {}) {
  const parts = { /** @type {Mock} */ mock: null, /** @type {Proxy} */ proxy: null, browser: null };
  before(async () => {
    parts.mock = await Mock.start();
    await prepare(parts.mock);
    parts.proxy = await Proxy.start(parts.mock, args);
    parts.browser = await launchChromium();
  });
  after(async () => {
    await parts.browser?.close();
    await parts.proxy?.stop();
    await parts.mock?.stop();
  });
  return parts;
}

describe('Chromium: demo page, second origin', () => {
  /** @type {Mock} */ let mock;
  /** @type {Proxy} */ let proxy;
  let browser;
  let other;

  before(async () => {
    mock = await Mock.start();
    proxy = await Proxy.start(mock);
    browser = await launchChromium();
    other = await staticServer('127.0.0.2', { '/poll.html': POLLING_PAGE, '/client.html': CLIENT_PAGE });
  });

  after(async () => {
    await browser?.close();
    await other?.close();
    await proxy?.stop();
    await mock?.stop();
  });

  test('the demo page shows the proxy’s flags live, and follows changes at Rollgate', async () => {
    const page = await browser.context.newPage();
    const consoleErrors = [];
    page.on('console', (m) => m.type() === 'error' && consoleErrors.push(m.text()));
    page.on('pageerror', (e) => consoleErrors.push(String(e)));
    await page.goto(`${proxy.url}/`);
    await page.waitForSelector('#connection-state[data-state="streaming"]', { timeout: 10_000 });
    await page.waitForSelector('[data-flag="enabled-flag"][data-enabled="true"]', { timeout: 5000 });
    const expected = (await proxy.json('/api/flags')).flags;
    assert.deepEqual(await shownFlags(page), expected);
    // Data age is the proxy's (from /api/health), rendered as text.
    await page.waitForFunction(() => document.querySelector('#data-age')?.textContent?.trim() !== '—', null, { timeout: 12_000 });
    await page.screenshot({ path: join(SCREENSHOTS, 'demo-page.png'), fullPage: true });

    for (const [key, value] of [
      ['enabled-flag', false],
      ['brand-new-flag', true],
      ['enabled-flag', true],
    ]) {
      const start = Date.now();
      await mock.setFlag(key, value);
      // A generous bound on the condition, never a timing assertion (a busy machine is slow);
      // the time is printed as a figure.
      await page.waitForSelector(`[data-flag="${key}"][data-enabled="${value}"]`, { timeout: 10_000 });
      console.log(`# ${key}=${value} shown after ${Date.now() - start} ms`);
    }
    await page.screenshot({ path: join(SCREENSHOTS, 'demo-page-after-changes.png'), fullPage: true });
    assert.equal(await page.getAttribute('#connection-state', 'data-state'), 'streaming');
    assert.deepEqual(consoleErrors, []);
    await page.close();
  });

  test('a page on another origin polls /api/flags over CORS (preflighted If-None-Match, exposed ETag)', async () => {
    const page = await browser.context.newPage();
    await page.goto(`${other.origin}/poll.html?proxy=${encodeURIComponent(proxy.url)}`);
    await page.waitForSelector('#out[data-state="ok"]', { timeout: 5000 });
    const expected = (await proxy.json('/api/flags')).flags;
    assert.deepEqual(JSON.parse(await page.textContent('#out')), expected);
    assert.match(await page.getAttribute('#out', 'data-etag'), /^(W\/)?".+"$/, 'ETag readable (Access-Control-Expose-Headers)');
    // Conditional polls come back 304 (the preflight for If-None-Match was allowed).
    await page.waitForFunction(() => Number(document.querySelector('#out')?.dataset.notModified) >= 2, null, { timeout: 5000 });
    await mock.setFlag('max-items', false);
    await page.waitForFunction(() => JSON.parse(document.querySelector('#out')?.textContent || '{}')['max-items'] === false, null, { timeout: 10_000 });
    assert.equal(await page.getAttribute('#out', 'data-state'), 'ok');
    await page.screenshot({ path: join(SCREENSHOTS, 'other-origin-poll.png') });
    await mock.setFlag('max-items', true);
    await page.close();
  });

  test('the proxy’s JS client, imported from the proxy by another origin, streams over CORS', async () => {
    const page = await browser.context.newPage();
    await page.goto(`${other.origin}/client.html?proxy=${encodeURIComponent(proxy.url)}`);
    await page.waitForSelector('#out[data-state="open"]', { timeout: 8000 });
    const expected = (await proxy.json('/api/flags')).flags;
    assert.deepEqual(JSON.parse(await page.textContent('#out')), expected);
    await mock.setFlag('config', false);
    await page.waitForFunction(() => JSON.parse(document.querySelector('#out')?.textContent || '{}').config === false, null, { timeout: 10_000 });
    assert.equal(await page.getAttribute('#out', 'data-state'), 'open');
    await mock.setFlag('config', true);
    await page.close();
  });

  test('the same client over the browser’s WebSocket (transport: websocket)', async () => {
    const page = await browser.context.newPage();
    const sockets = [];
    page.on('websocket', (ws) => sockets.push(ws.url()));
    await page.goto(`${other.origin}/client.html?transport=websocket&proxy=${encodeURIComponent(proxy.url)}`);
    await page.waitForSelector('#out[data-state="open"]', { timeout: 8000 });
    // Chromium has DecompressionStream: the client asks for large frames gzip-coded.
    assert.deepEqual(sockets, [`${proxy.url.replace(/^http/, 'ws')}/api/stream?coding=gzip`]);
    const expected = (await proxy.json('/api/flags')).flags;
    assert.deepEqual(JSON.parse(await page.textContent('#out')), expected);
    await mock.setFlag('config', false);
    await page.waitForFunction(() => JSON.parse(document.querySelector('#out')?.textContent || '{}').config === false, null, { timeout: 10_000 });
    assert.equal(await page.getAttribute('#out', 'data-state'), 'open');
    await mock.setFlag('config', true);
    await page.close();
  });
});

describe('Chromium: a large flag set', () => {
  const many = {};
  for (let i = 0; i < 400; i++) many[`bulk-experiment-${String(i).padStart(4, '0')}-checkout-flow`] = i % 2 === 0;
  const parts = stack([], (mock) => mock.control('PUT', 'flags', { flags: many }));

  test('the demo page streams it gzip-coded (the browser decodes each frame as it arrives)', async () => {
    const { mock, proxy, browser } = parts;
    const page = await browser.context.newPage();
    const codings = [];
    page.on('response', (r) => {
      if (new URL(r.url()).pathname === '/api/stream') codings.push(r.headers()['content-encoding'] ?? 'identity');
    });
    const consoleErrors = [];
    page.on('console', (m) => m.type() === 'error' && consoleErrors.push(m.text()));
    await page.goto(`${proxy.url}/`);
    await page.waitForSelector('#connection-state[data-state="streaming"]', { timeout: 20_000 });
    const last = 'bulk-experiment-0399-checkout-flow';
    await page.waitForSelector(`[data-flag="${last}"][data-enabled="false"]`, { timeout: 20_000 });
    assert.deepEqual(await shownFlags(page), (await proxy.json('/api/flags')).flags);
    // A change is one more gzip segment on the same stream.
    await mock.setFlag(last, true);
    await page.waitForSelector(`[data-flag="${last}"][data-enabled="true"]`, { timeout: 20_000 });
    assert.equal(await page.getAttribute('#connection-state', 'data-state'), 'streaming');
    assert.ok(codings.length >= 1 && codings.every((c) => c === 'gzip'), `stream codings: ${codings}`);
    assert.deepEqual(consoleErrors, []);
    await page.close();
  });

  // The client page on a second origin; closed after Chromium (the `after` above), whose
  // keep-alive connections would hold the server open.
  let other;
  before(async () => {
    other = await staticServer('127.0.0.2', { '/client.html': CLIENT_PAGE });
  });
  after(async () => {
    await other?.close();
  });

  test('the JS client over the WebSocket gets it as binary gzip messages and follows a change', async () => {
    const { mock, proxy, browser } = parts;
    const page = await browser.context.newPage();
    try {
      const frames = { binary: 0, text: 0 };
      page.on('websocket', (ws) =>
        ws.on('framereceived', (f) => (typeof f.payload === 'string' ? frames.text++ : frames.binary++)),
      );
      const consoleErrors = [];
      // The static server has no favicon: its 404 is not the client's.
      page.on('console', (m) => {
        if (m.type() === 'error' && !m.location().url.endsWith('/favicon.ico')) consoleErrors.push(m.text());
      });
      await page.goto(`${other.origin}/client.html?transport=websocket&proxy=${encodeURIComponent(proxy.url)}`);
      await page.waitForSelector('#out[data-state="open"]', { timeout: 20_000 });
      assert.deepEqual(JSON.parse(await page.textContent('#out')), (await proxy.json('/api/flags')).flags);
      const key = 'bulk-experiment-0001-checkout-flow';
      const before = (await proxy.json('/api/flags')).flags[key];
      await mock.setFlag(key, !before);
      await page.waitForFunction(
        ([k, v]) => JSON.parse(document.querySelector('#out')?.textContent || '{}')[k] === v,
        [key, !before],
        { timeout: 20_000 },
      );
      assert.equal(await page.getAttribute('#out', 'data-state'), 'open');
      assert.ok(frames.binary >= 2 && frames.text === 0, `frames received: ${JSON.stringify(frames)}`);
      assert.deepEqual(consoleErrors, []);
    } finally {
      await page.close();
    }
  });
});

describe('Chromium: demo page with client keys', () => {
  const parts = stack(['--client-keys', CLIENT_KEY]);

  test('/?token=<key> streams the flags', async () => {
    const { mock, proxy, browser } = parts;
    const page = await browser.context.newPage();
    await page.goto(`${proxy.url}/?token=${CLIENT_KEY}`);
    await page.waitForSelector('#connection-state[data-state="streaming"]', { timeout: 10_000 });
    await page.waitForSelector('[data-flag="enabled-flag"][data-enabled="true"]', { timeout: 5000 });
    assert.equal(await page.isVisible('#error'), false);
    await mock.setFlag('enabled-flag', false);
    await page.waitForSelector('[data-flag="enabled-flag"][data-enabled="false"]', { timeout: 10_000 });
    await page.screenshot({ path: join(SCREENSHOTS, 'demo-page-with-token.png'), fullPage: true });
    await page.close();
  });

  test('without a key the page shows a clear 401 error state and no flags', async () => {
    const { proxy, browser } = parts;
    const page = await browser.context.newPage();
    await page.goto(`${proxy.url}/`);
    await page.waitForSelector('#connection-state[data-state="error"]', { timeout: 10_000 });
    await page.waitForSelector('#error:not([hidden])', { timeout: 5000 });
    const message = await page.textContent('#error');
    assert.match(message, /unauthori[sz]ed/i);
    assert.match(message, /\?token=/);
    assert.equal(await page.$$eval('[data-flag]', (rows) => rows.length), 0);
    await page.screenshot({ path: join(SCREENSHOTS, 'demo-page-401.png'), fullPage: true });
    await page.close();
  });
});

describe('Chromium: demo page with several environments', () => {
  /** @type {Mock} */ let alpha;
  /** @type {Mock} */ let beta;
  /** @type {Proxy} */ let proxy;
  let browser;
  let dir;

  before(async () => {
    alpha = await Mock.start();
    beta = await Mock.start();
    await alpha.setFlag('only-alpha', true);
    await beta.setFlag('only-beta', true);
    dir = await mkdtemp(join(tmpdir(), 'rollgate-envs-'));
    const file = join(dir, 'environments.toml');
    const env = (name, mock) =>
      `[environments.${name}]\nserver_key = "${MOCK_API_KEY}"\nbase_url = "${mock.url}"\nclient_keys = ["ck-${name}"]\n`;
    await writeFile(file, env('alpha', alpha) + env('beta', beta));
    proxy = await Proxy.start(alpha, ['--config', file]);
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await proxy?.stop();
    await alpha?.stop();
    await beta?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('/env/<name>/ shows that environment, and the selector switches where the key allows', async () => {
    const page = await browser.context.newPage();
    await page.goto(`${proxy.url}/env/alpha/?token=ck-alpha`);
    await page.waitForSelector('#connection-state[data-state="streaming"]', { timeout: 10_000 });
    await page.waitForSelector('[data-flag="only-alpha"][data-enabled="true"]', { timeout: 5000 });
    assert.equal(await page.$$eval('[data-flag="only-beta"]', (rows) => rows.length), 0);
    await page.waitForSelector('#env-switch:not([hidden])', { timeout: 12_000 });
    assert.equal(await page.inputValue('#env-select'), 'alpha');
    await page.screenshot({ path: join(SCREENSHOTS, 'demo-page-environments.png'), fullPage: true });
    // alpha's key does not open beta: the page says so.
    await Promise.all([page.waitForURL(/\/env\/beta\//), page.selectOption('#env-select', 'beta')]);
    await page.waitForSelector('#connection-state[data-state="error"]', { timeout: 10_000 });
    // beta's key does.
    await page.goto(`${proxy.url}/env/beta/?token=ck-beta`);
    await page.waitForSelector('[data-flag="only-beta"][data-enabled="true"]', { timeout: 10_000 });
    assert.equal(await page.$$eval('[data-flag="only-alpha"]', (rows) => rows.length), 0);
    await page.waitForSelector('#env-switch:not([hidden])', { timeout: 12_000 });
    assert.equal(await page.inputValue('#env-select'), 'beta');
    await page.close();
  });
});

// A tiny stand-in for rollgate-proxy's client API (flags, ETag/304, SSE stream, health, client
// keys) on node:http. The real-server tests run the client against it, and `npm run demo` serves
// the demo page from ../../core/assets with flags that flip by themselves, so the page
// can be tried without building the Rust server. Binds 127.0.0.1 only.

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { pathToFileURL } from 'node:url';

// Paths relative to this file; the routes are the ones the Rust server serves.
const ASSETS = {
  '/': ['../../../core/assets/index.html', 'text/html; charset=utf-8'],
  '/demo.js': ['../../../core/assets/demo.js', 'text/javascript; charset=utf-8'],
  '/demo.css': ['../../../core/assets/demo.css', 'text/css; charset=utf-8'],
  '/rollgate-proxy-client.js': ['../src/index.js', 'text/javascript; charset=utf-8'],
};

/**
 * @typedef {{ id?: string, email?: string, attributes: Record<string, string> }} MockContext
 * @typedef {{ method: string, path: string, query: URLSearchParams, headers: import('node:http').IncomingHttpHeaders, status: number }} LoggedRequest
 */

/**
 * Start the mock proxy.
 * @param {{
 *   flags?: Record<string, boolean>,
 *   clientKey?: string,
 *   port?: number,
 *   keepaliveMs?: number,
 *   serveAssets?: boolean,
 *   evaluate?: (flags: Record<string, boolean>, context: MockContext) => Record<string, boolean>,
 * }} [options]
 */
export async function startMockProxy(options = {}) {
  let flags = { ...(options.flags ?? {}) };
  let revision = 1;
  let changedAt = Date.now();
  const evaluate = options.evaluate ?? ((all) => all);
  /** @type {LoggedRequest[]} */
  const requests = [];
  /** @type {Set<{ res: import('node:http').ServerResponse, context: MockContext }>} */
  const streams = new Set();

  /** @param {URLSearchParams} query */
  function contextOf(query) {
    /** @type {MockContext} */
    const context = { attributes: {} };
    const id = query.get('user_id');
    const email = query.get('email');
    if (id) context.id = id;
    if (email) context.email = email;
    for (const [name, value] of query) {
      if (name.startsWith('attr.')) context.attributes[name.slice(5)] = value;
    }
    return context;
  }

  /** @param {Record<string, boolean>} map */
  function tagOf(map) {
    const hash = createHash('sha256').update(JSON.stringify(map)).digest('hex').slice(0, 16);
    return `${revision}-${hash}`;
  }

  /** @param {{ res: import('node:http').ServerResponse, context: MockContext }} stream */
  function sendFlags(stream) {
    const map = evaluate(flags, stream.context);
    stream.res.write(`event: flags\nid: ${tagOf(map)}\ndata: ${JSON.stringify(map)}\n\n`);
  }

  /**
   * @param {import('node:http').ServerResponse} res
   * @param {number} status
   * @param {unknown} body
   * @param {Record<string, string>} [headers]
   */
  function json(res, status, body, headers = {}) {
    res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-cache', ...headers });
    res.end(JSON.stringify(body));
  }

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const log = { method: req.method ?? 'GET', path: url.pathname, query: url.searchParams, headers: req.headers, status: 0 };
    requests.push(log);
    const origWriteHead = res.writeHead.bind(res);
    // Record the status each response is sent with.
    res.writeHead = /** @type {any} */ ((/** @type {number} */ status, /** @type {any[]} */ ...rest) => {
      log.status = status;
      return origWriteHead(status, ...rest);
    });
    res.setHeader('Access-Control-Allow-Origin', '*');
    if (req.method === 'OPTIONS') {
      res.writeHead(204, {
        'Access-Control-Allow-Headers': 'Authorization, If-None-Match, Content-Type',
        'Access-Control-Allow-Methods': 'GET, POST',
      });
      res.end();
      return;
    }

    if (options.serveAssets && req.method === 'GET' && Object.hasOwn(ASSETS, url.pathname)) {
      const [file, type] = ASSETS[/** @type {keyof typeof ASSETS} */ (url.pathname)];
      try {
        const body = await readFile(new URL(file, import.meta.url));
        res.writeHead(200, { 'Content-Type': type, 'Cache-Control': 'no-cache' });
        res.end(body);
      } catch {
        json(res, 404, { error: { code: 'not_found', message: `${url.pathname} is missing` } });
      }
      return;
    }

    if (!url.pathname.startsWith('/api/')) {
      json(res, 404, { error: { code: 'not_found', message: 'no such route' } });
      return;
    }
    if (url.pathname !== '/api/health' && options.clientKey) {
      const auth = req.headers.authorization ?? '';
      const token = url.searchParams.get('token');
      if (auth !== `Bearer ${options.clientKey}` && token !== options.clientKey) {
        json(res, 401, { error: { code: 'unauthorized', message: 'missing or wrong client key' } });
        return;
      }
    }

    if (url.pathname === '/api/flags' && req.method === 'GET') {
      const map = evaluate(flags, contextOf(url.searchParams));
      const etag = `"${tagOf(map)}"`;
      if (req.headers['if-none-match'] === etag) {
        res.writeHead(304, { ETag: etag });
        res.end();
        return;
      }
      json(res, 200, { flags: map, _meta: { cachedAt: new Date(changedAt).toISOString() } }, { ETag: etag });
      return;
    }
    const single = /^\/api\/flags\/([^/]+)$/.exec(url.pathname);
    if (single && req.method === 'GET') {
      const key = decodeURIComponent(single[1]);
      const map = evaluate(flags, contextOf(url.searchParams));
      json(res, 200, { key, enabled: map[key] === true });
      return;
    }
    if (url.pathname === '/api/stream' && req.method === 'GET') {
      res.writeHead(200, {
        'Content-Type': 'text/event-stream',
        'Cache-Control': 'no-cache',
        'X-Accel-Buffering': 'no',
      });
      res.write('retry: 1000\n\n');
      const stream = { res, context: contextOf(url.searchParams) };
      streams.add(stream);
      sendFlags(stream);
      req.on('close', () => streams.delete(stream));
      return;
    }
    if (url.pathname === '/api/health' && req.method === 'GET') {
      json(res, 200, {
        status: 'healthy',
        circuit: 'closed',
        cache: { flags: Object.keys(flags).length, revision },
        upstream: { mode: 'mock', connected: true },
        dataAgeMs: Date.now() - changedAt,
      });
      return;
    }
    json(res, 404, { error: { code: 'not_found', message: 'no such route' } });
  });

  const keepalive = setInterval(() => {
    for (const { res } of streams) res.write(': keepalive\n\n');
  }, options.keepaliveMs ?? 15_000);
  keepalive.unref();

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => resolve(undefined));
  });
  const address = /** @type {import('node:net').AddressInfo} */ (server.address());

  return {
    url: `http://127.0.0.1:${address.port}`,
    requests,
    /** Replace every flag and push the new map to every stream. */
    setFlags(/** @type {Record<string, boolean>} */ next) {
      flags = { ...next };
      revision += 1;
      changedAt = Date.now();
      for (const stream of streams) sendFlags(stream);
    },
    /** Current flags (unevaluated). */
    flags: () => ({ ...flags }),
    /** Open stream connections. */
    streamCount: () => streams.size,
    /** Drop every open stream (as a restarting server would). */
    dropStreams() {
      for (const { res } of streams) res.destroy();
      streams.clear();
    },
    async close() {
      clearInterval(keepalive);
      for (const { res } of streams) res.destroy();
      streams.clear();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}

// `node dev/mock-proxy.js [port]`: serve the demo page with flags that change every few seconds.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const port = Number(process.argv[2] ?? process.env.PORT ?? 3001);
  const proxy = await startMockProxy({
    port,
    serveAssets: true,
    clientKey: process.env.CLIENT_KEY || undefined,
    keepaliveMs: 10_000,
    flags: {
      'new-checkout': true,
      'dark-mode': false,
      'beta-dashboard': false,
      'search-v2': true,
      'promo-banner': false,
      'fast-shipping': true,
    },
    // Users whose id starts with "beta" see the beta dashboard whatever its global value.
    evaluate: (all, context) => (context.id?.startsWith('beta') ? { ...all, 'beta-dashboard': true } : all),
  });
  console.log(`mock rollgate-proxy with the demo page on ${proxy.url}/ (Ctrl-C to stop)`);
  setInterval(() => {
    const current = proxy.flags();
    const keys = Object.keys(current);
    const key = keys[Math.floor(Math.random() * keys.length)];
    proxy.setFlags({ ...current, [key]: !current[key] });
    console.log(`flipped ${key} → ${!current[key]}`);
  }, 4_000);
}

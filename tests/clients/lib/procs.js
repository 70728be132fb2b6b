// Real processes for the Node client suites: the `mock-upstream` (Rollgate stand-in) and
// `rollgate-proxy`, the workspace's debug binaries (override with MOCK_UPSTREAM_BIN /
// ROLLGATE_PROXY_BIN). Each prints `listening on http://127.0.0.1:PORT` first; the rest of its
// output goes to a log under test-artifacts/logs/. Every wait here is bounded.

import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const ARTIFACTS = join(ROOT, 'test-artifacts');
export const MOCK_API_KEY = 'test-api-key';
const LOGS = join(ARTIFACTS, 'logs');
const START_TIMEOUT_MS = 20_000;
const LISTENING = /listening on (http:\/\/127\.0\.0\.1:\d+)/;

function binary(envName, name) {
  const path = process.env[envName] || join(ROOT, 'target', 'debug', name);
  if (!existsSync(path)) {
    throw new Error(
      `${path} is missing: run \`cargo build -p rollgate-proxy-server -p rollgate-proxy-tests --bins\``,
    );
  }
  return path;
}

let seq = 0;

/** A child process whose first stdout line announces its URL. */
export class Proc {
  /** @param {string} name @param {string[]} argv @param {Record<string,string>} [env] */
  static async start(name, argv, env = {}) {
    mkdirSync(LOGS, { recursive: true });
    const logPath = join(LOGS, `${name}-${process.pid}-${++seq}.log`);
    const log = createWriteStream(logPath);
    log.write(`$ ${argv.join(' ')}\n`);
    const child = spawn(argv[0], argv.slice(1), {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stderr.pipe(log, { end: false });
    const lines = createInterface({ input: child.stdout });
    const url = await new Promise((resolveUrl, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`${name} printed no 'listening on' line within ${START_TIMEOUT_MS} ms; log: ${logPath}`));
      }, START_TIMEOUT_MS);
      let found = false;
      lines.on('line', (line) => {
        log.write(line + '\n');
        const m = !found && LISTENING.exec(line);
        if (m) {
          found = true;
          clearTimeout(timer);
          resolveUrl(m[1]);
        }
      });
      child.once('exit', (code, signal) => {
        if (!found) {
          clearTimeout(timer);
          reject(new Error(`${name} exited (${code ?? signal}) before listening; log: ${logPath}`));
        }
      });
    });
    return new Proc(name, child, url, logPath, log);
  }

  constructor(name, child, url, logPath, log) {
    this.name = name;
    this.child = child;
    this.url = url;
    this.logPath = logPath;
    this.log = log;
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    this.log.end();
  }

  logText() {
    try {
      return readFileSync(this.logPath, 'utf8');
    } catch {
      return '';
    }
  }
}

/** The mock upstream, driven over `/control/*`. */
export class Mock {
  static async start(...args) {
    const proc = await Proc.start('mock-upstream', [binary('MOCK_UPSTREAM_BIN', 'mock-upstream'), '--port', '0', ...args]);
    return new Mock(proc);
  }

  constructor(proc) {
    this.proc = proc;
    this.url = proc.url;
  }

  async control(method, path, body) {
    const res = await fetch(`${this.url}/control/${path}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`mock ${method} /control/${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  setFlag(key, value) {
    return this.control('PUT', `flags/${encodeURIComponent(key)}`, { value });
  }

  setUserFlags(user, flags) {
    return this.control('PUT', `users/${encodeURIComponent(user)}`, { flags });
  }

  view(user) {
    return this.control('GET', 'flags' + (user ? `?user_id=${encodeURIComponent(user)}` : ''));
  }

  stats() {
    return this.control('GET', 'stats');
  }

  stop() {
    return this.proc.stop();
  }
}

/** rollgate-proxy in upstream mode against a `Mock`. */
export class Proxy {
  /** @param {Mock} mock @param {string[]} [args] */
  static async start(mock, args = []) {
    const proc = await Proc.start(
      'rollgate-proxy',
      [
        binary('ROLLGATE_PROXY_BIN', 'rollgate-proxy'),
        '--port',
        '0',
        '--bind',
        '127.0.0.1',
        '--snapshot-file',
        '',
        ...args,
      ],
      { ROLLGATE_API_KEY: MOCK_API_KEY, ROLLGATE_BASE_URL: mock.url, ROLLGATE_PROXY_LOG_LEVEL: 'info' },
    );
    const proxy = new Proxy(proc);
    await waitFor(async () => (await fetch(`${proxy.url}/ready`)).status === 200, 10_000, 'proxy /ready');
    return proxy;
  }

  constructor(proc) {
    this.proc = proc;
    this.url = proc.url;
  }

  async json(path, init = {}) {
    const res = await fetch(`${this.url}${path}`, { ...init, signal: AbortSignal.timeout(10_000) });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return res.json();
  }

  /** Raw OFREP bulk evaluation, as the reference for what the providers should report. */
  ofrepBulk(context, headers = {}) {
    return this.json('/ofrep/v1/evaluate/flags', {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify({ context }),
    });
  }

  stop() {
    return this.proc.stop();
  }
}

/** Polls `cond` until truthy; rejects after `timeoutMs`. */
export async function waitFor(cond, timeoutMs, what, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  while (Date.now() < deadline) {
    try {
      const v = await cond();
      if (v) return v;
    } catch (e) {
      lastError = e;
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? ` (last error: ${lastError})` : ''}`);
}

/** Resolves with the first event `name` from `emitter`-like `on`, or rejects after `timeoutMs`. */
export function nextEvent(subscribe, timeoutMs, what) {
  return new Promise((resolveEvent, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${what} within ${timeoutMs} ms`)), timeoutMs);
    subscribe((...args) => {
      clearTimeout(timer);
      resolveEvent(args);
    });
  });
}

// Test doubles injected into the client: a scripted fetch and a hand-driven EventSource.

/**
 * A fetch response the client can read.
 * @param {number} status
 * @param {unknown} [body]
 * @param {Record<string, string>} [headers]
 */
export function response(status, body, headers = {}) {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
  return {
    status,
    ok: status >= 200 && status < 300,
    headers: { get: (/** @type {string} */ name) => lower[name.toLowerCase()] ?? null },
    async json() {
      if (typeof body === 'string') return JSON.parse(body);
      if (body === undefined) throw new SyntaxError('Unexpected end of JSON input');
      return body;
    },
  };
}

/**
 * A fetch whose answers are decided per call by `handler`; every call is recorded. Calls whose
 * handler returns `'hang'` stay pending until aborted (or released with `call.resolve`).
 */
export function fakeFetch(handler = () => response(200, { flags: {} })) {
  /** @type {{ url: string, init: any, resolve: (r: any) => void, settled: boolean }[]} */
  const calls = [];
  /** @param {string} url @param {any} init */
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      const call = { url, init, resolve, settled: false };
      calls.push(call);
      init.signal.addEventListener('abort', () => {
        if (!call.settled) reject(new DOMException('This operation was aborted', 'AbortError'));
        call.settled = true;
      });
      Promise.resolve()
        .then(() => handler(call, calls.length))
        .then((answer) => {
          if (answer === 'hang' || call.settled) return;
          call.settled = true;
          if (answer instanceof Error) reject(answer);
          else resolve(answer);
        });
    });
  return { fetch, calls };
}

/** An EventSource driven by the test: `open()`, `emit()`, `fail()`. */
export class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  /** @type {FakeEventSource[]} */
  static instances = [];

  /** @param {string} url */
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.closed = false;
    /** @type {Map<string, Set<(event: any) => void>>} */
    this.listeners = new Map();
    FakeEventSource.instances.push(this);
  }

  /** @param {string} type @param {(event: any) => void} listener */
  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type)?.add(listener);
  }

  close() {
    this.closed = true;
    this.readyState = 2;
  }

  /** @param {string} type @param {any} event */
  dispatch(type, event) {
    for (const listener of this.listeners.get(type) ?? []) listener(event);
  }

  open() {
    this.readyState = 1;
    this.dispatch('open', {});
  }

  /** Deliver an `event: flags` frame (an object is JSON-encoded), with its `id:` if given. */
  emit(/** @type {unknown} */ data, type = 'flags', /** @type {string} */ lastEventId = '') {
    if (this.readyState !== 1) this.open();
    this.dispatch(type, { data: typeof data === 'string' ? data : JSON.stringify(data), lastEventId });
  }

  /** An error; `reconnecting` false means the browser gave up (readyState CLOSED, e.g. HTTP 401). */
  fail(reconnecting = true) {
    this.readyState = reconnecting ? 0 : 2;
    this.dispatch('error', {});
  }

  static reset() {
    FakeEventSource.instances = [];
  }

  static latest() {
    return FakeEventSource.instances[FakeEventSource.instances.length - 1];
  }
}

/** Let pending promises and fake-fetch answers settle (setImmediate is not mocked). */
export async function settle(rounds = 5) {
  for (let i = 0; i < rounds; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

/** A WebSocket driven by the test: `open()`, `emit()` (a whole SSE frame), `drop()`. */
export class FakeWebSocket {
  /** @type {FakeWebSocket[]} */
  static instances = [];

  /** @param {string} url */
  constructor(url) {
    this.url = url;
    this.closed = false;
    /** @type {string[]} */
    this.sent = [];
    /** @type {((event: any) => void) | null} */
    this.onopen = null;
    /** @type {((event: any) => void) | null} */
    this.onmessage = null;
    /** @type {((event: any) => void) | null} */
    this.onclose = null;
    /** @type {((event: any) => void) | null} */
    this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  /** @param {string} data */
  send(data) {
    this.sent.push(data);
  }

  close() {
    this.closed = true;
  }

  open() {
    this.onopen?.({});
  }

  /** A message: `event: flags` with `data` (an object is JSON-encoded) and `id:`. */
  emit(/** @type {unknown} */ data, lastEventId = '', type = 'flags') {
    const json = typeof data === 'string' ? data : JSON.stringify(data);
    const id = lastEventId ? `id: ${lastEventId}\n` : '';
    this.message(`event: ${type}\n${id}data: ${json}\n\n`);
  }

  /** @param {unknown} data */
  message(data) {
    this.onmessage?.({ data });
  }

  /** The connection ends (the server closed it, or it was refused before opening). */
  drop() {
    this.closed = true;
    this.onerror?.({});
    this.onclose?.({});
  }

  static reset() {
    FakeWebSocket.instances = [];
  }

  static latest() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }
}

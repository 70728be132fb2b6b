// @rollgate-proxy/client: feature flags from a rollgate-proxy, by ETag-aware polling or
// server-sent events (over EventSource, or the same frames over a WebSocket) with a polling
// fallback. One dependency-free ES module: it runs in
// browsers as is (the proxy serves this very file at /rollgate-proxy-client.js) and in Node >= 20.
// Types: index.d.ts beside this file.

/**
 * @typedef {import('./index.d.ts').ClientOptions} ClientOptions
 * @typedef {import('./index.d.ts').ClientState} ClientState
 * @typedef {import('./index.d.ts').FlagContext} FlagContext
 * @typedef {import('./index.d.ts').FlagMap} FlagMap
 * @typedef {import('./index.d.ts').FlagsClient} FlagsClient
 * @typedef {import('./index.d.ts').FlagsListener} FlagsListener
 * @typedef {import('./index.d.ts').StateListener} StateListener
 * @typedef {import('./index.d.ts').FetchLike} FetchLike
 * @typedef {import('./index.d.ts').FetchResponse} FetchResponse
 * @typedef {import('./index.d.ts').EventSourceLike} EventSourceLike
 * @typedef {import('./index.d.ts').EventSourceConstructor} EventSourceConstructor
 * @typedef {import('./index.d.ts').WebSocketLike} WebSocketLike
 * @typedef {import('./index.d.ts').WebSocketConstructor} WebSocketConstructor
 */

const DEFAULT_POLL_INTERVAL_MS = 30_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
const DEFAULT_STREAM_RETRY_MS = 30_000;
const MAX_STREAM_RETRY_MS = 600_000;
// The first error retry comes quickly (a blip should not cost a whole interval); later ones back
// off up to the larger of the poll interval and a minute.
const FIRST_ERROR_RETRY_MS = 1_000;
const MAX_ERROR_RETRY_MS = 60_000;
// EventSource reconnects by itself forever; this many errors in a row with no message in between
// means the stream is not going to work (a proxy without /api/stream, a broken middlebox), so we poll.
const STREAM_ERROR_LIMIT = 3;
// EventSource.CLOSED: the browser gave up (HTTP error such as 401, or not text/event-stream).
const EVENTSOURCE_CLOSED = 2;
// A stream that had delivered and then gave up (a deploy ended it, its shard answered 5xx) is
// reopened this many times, after 1 s then 2 s (each ×0.5–1.5 at random), before polling: a
// fleet of browsers dropped at one instant then comes back spread out, to the stream, instead
// of all polling the proxy at once.
const STREAM_REOPEN_ATTEMPTS = 2;
const STREAM_REOPEN_MS = 1_000;
// After such a stream, the first fallback poll waits a random part of this (at most the interval).
const FALLBACK_SPREAD_MS = 5_000;

// The WebSocket transport: the proxy sends no `retry:` there; a socket that had opened and
// then closed is reopened after this (±10 %), as EventSource would after the proxy's `retry:`.
const WEBSOCKET_RETRY_MS = 2_000;
// The client says `ping` this often (the proxy answers `pong`; on the Worker without waking
// the object that holds the socket); a socket that heard nothing for a whole period is dropped.
const WEBSOCKET_PING_MS = 30_000;
// The query parameter asking the proxy for large frames as binary gzip messages (its
// `?coding=gzip`), sent when this runtime can decompress them; older proxies ignore it.
const WEBSOCKET_CODING = 'coding=gzip';

/**
 * `ms` scaled by a uniform factor in [1 - spread, 1 + spread].
 * @param {number} ms
 * @param {number} spread
 */
function jittered(ms, spread) {
  return ms * (1 - spread + 2 * spread * Math.random());
}

/**
 * The revision of a stream frame's id (`<revision>-<hash>`), or null.
 * @param {unknown} id
 */
function revisionOf(id) {
  if (typeof id !== 'string') return null;
  const match = /^(\d+)-/.exec(id);
  return match ? Number(match[1]) : null;
}

/**
 * The `ws:`/`wss:` URL of a stream URL (a relative one resolved against the page, if any).
 * @param {string} url
 */
function webSocketUrl(url) {
  let absolute = url;
  try {
    absolute = new URL(url, /** @type {any} */ (globalThis).location?.href).href;
  } catch {
    // Not resolvable here: the WebSocket constructor reports it.
  }
  return absolute.replace(/^http(s?):/i, 'ws$1:');
}

/**
 * Whether this runtime can decode the proxy's binary gzip messages (`DecompressionStream`:
 * browsers since 2023, Node >= 18).
 */
function canGunzip() {
  const g = /** @type {any} */ (globalThis);
  return typeof g.DecompressionStream === 'function' && typeof g.Response === 'function' && typeof g.Blob === 'function';
}

/** `url` with `param` added to its query. @param {string} url @param {string} param */
function withQuery(url, param) {
  return url + (url.includes('?') ? '&' : '?') + param;
}

/**
 * A binary message's text: a gzip member (the proxy's `?coding=gzip` frames) decompressed,
 * anything else decoded as UTF-8.
 * @param {ArrayBuffer | ArrayBufferView | Blob} data
 * @returns {Promise<string>}
 */
async function binaryText(data) {
  const g = /** @type {any} */ (globalThis);
  const buffer =
    typeof g.Blob === 'function' && data instanceof g.Blob ? await /** @type {Blob} */ (data).arrayBuffer() : data;
  const bytes = ArrayBuffer.isView(buffer)
    ? new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength)
    : new Uint8Array(/** @type {ArrayBuffer} */ (buffer));
  if (bytes[0] !== 0x1f || bytes[1] !== 0x8b) return new TextDecoder().decode(bytes);
  const stream = new g.Blob([bytes]).stream().pipeThrough(new g.DecompressionStream('gzip'));
  return new g.Response(stream).text();
}

/**
 * Dispatch every event of a message holding whole SSE frames (`event:`, `id:`, `data:`;
 * comments and `retry:` skipped), as EventSource would.
 * @param {string} text
 * @param {(type: string, event: { data: string, lastEventId: string }) => void} dispatch
 */
function dispatchFrames(text, dispatch) {
  for (const block of text.split('\n\n')) {
    let type = 'message';
    let id = '';
    /** @type {string[]} */
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'id') id = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length > 0) dispatch(type, { data: data.join('\n'), lastEventId: id });
  }
}

/**
 * An EventSource over the proxy's WebSocket transport (same route, query and frames), so the
 * stream logic (backoff, fallback, forward-only revisions) is the SSE path's own. Where the
 * runtime can decompress gzip, it asks for large frames gzip-coded (`coding=gzip`): each comes
 * as a binary message holding the frame alone, decoded before the frames after it. Like an
 * EventSource it reconnects by itself after a socket that had opened closes (readyState 0 and an
 * `error` event); a socket that closes before opening is a refusal (readyState 2: browsers do
 * not tell a WebSocket why its handshake failed; the fallback poll then says it).
 * @param {WebSocketConstructor} WebSocketImpl
 * @returns {EventSourceConstructor}
 */
function webSocketSource(WebSocketImpl) {
  return class WebSocketSource {
    /** @param {string} url */
    constructor(url) {
      this.url = canGunzip() ? withQuery(webSocketUrl(url), WEBSOCKET_CODING) : webSocketUrl(url);
      this.readyState = 0;
      this.closed = false;
      /** @type {Map<string, Set<(event: { data: string, lastEventId?: string }) => void>>} */
      this.listeners = new Map();
      /** @type {WebSocketLike | null} */
      this.socket = null;
      /** @type {ReturnType<typeof setTimeout> | null} */
      this.timer = null;
      this.heard = false;
      this.connect();
    }

    /** @param {string} type @param {(event: { data: string, lastEventId?: string }) => void} listener */
    addEventListener(type, listener) {
      if (!this.listeners.has(type)) this.listeners.set(type, new Set());
      this.listeners.get(type)?.add(listener);
    }

    /** @param {string} type @param {{ data: string, lastEventId?: string }} event */
    dispatch(type, event) {
      for (const listener of [...(this.listeners.get(type) ?? [])]) listener(event);
    }

    connect() {
      this.clearTimer();
      /** @type {WebSocketLike} */
      let socket;
      try {
        socket = new WebSocketImpl(this.url);
      } catch {
        this.lost(null, false);
        return;
      }
      this.socket = socket;
      try {
        // Binary messages as bytes (browsers default to Blob; both are decoded).
        socket.binaryType = 'arraybuffer';
      } catch {
        // A socket implementation without it: Blob or Buffer data is decoded too.
      }
      let opened = false;
      // Binary messages decode asynchronously: later messages wait for them, in order.
      /** @type {Promise<void> | null} */
      let decoding = null;
      /** @param {string} text */
      const take = (text) => {
        if (this.socket !== socket || text === 'pong') return;
        dispatchFrames(text, (type, frame) => this.dispatch(type, frame));
      };
      socket.onopen = () => {
        if (this.socket !== socket) return;
        opened = true;
        this.readyState = 1;
        this.heard = true;
        this.schedulePing();
      };
      socket.onmessage = (event) => {
        if (this.socket !== socket) return;
        this.heard = true;
        const data = event.data;
        const g = /** @type {any} */ (globalThis);
        const binary =
          data instanceof ArrayBuffer || ArrayBuffer.isView(data) || (typeof g.Blob === 'function' && data instanceof g.Blob);
        if (typeof data !== 'string' && !binary) return;
        if (typeof data === 'string' && decoding === null) {
          take(data);
          return;
        }
        const text = typeof data === 'string' ? Promise.resolve(data) : binaryText(/** @type {ArrayBuffer | Blob} */ (data));
        // Handled in order below; not an unhandled rejection while earlier ones decode.
        text.catch(() => {});
        const step = (decoding ?? Promise.resolve())
          .then(() => text)
          .then(take, () => {
            // A message that does not decode: the connection is not to be trusted; reopen.
            if (this.socket === socket) this.lost(socket, true);
          })
          .finally(() => {
            if (decoding === step) decoding = null;
          });
        decoding = step;
      };
      socket.onclose = () => {
        if (this.socket === socket) this.lost(socket, opened);
      };
      // An error is followed by a close: handled there.
      socket.onerror = () => {};
    }

    /**
     * The socket closed or went silent: an `error` like EventSource's, then a reconnect after
     * one that had opened (unless the client closed this source meanwhile).
     * @param {WebSocketLike | null} socket
     * @param {boolean} opened
     */
    lost(socket, opened) {
      this.socket = null;
      this.clearTimer();
      if (socket) {
        try {
          socket.close();
        } catch {
          // Already closed.
        }
      }
      if (this.closed) return;
      this.readyState = opened ? 0 : 2;
      this.dispatch('error', { data: '' });
      if (this.closed || this.readyState !== 0) return;
      this.timer = setTimeout(() => {
        this.timer = null;
        if (!this.closed) this.connect();
      }, jittered(WEBSOCKET_RETRY_MS, 0.1));
    }

    schedulePing() {
      this.clearTimer();
      this.timer = setTimeout(() => {
        this.timer = null;
        const socket = this.socket;
        if (!socket || this.closed) return;
        if (!this.heard) {
          // Nothing since the last ping, not even its pong: the connection is dead.
          this.lost(socket, true);
          return;
        }
        this.heard = false;
        try {
          socket.send('ping');
        } catch {
          this.lost(socket, true);
          return;
        }
        this.schedulePing();
      }, WEBSOCKET_PING_MS);
    }

    clearTimer() {
      if (this.timer !== null) clearTimeout(this.timer);
      this.timer = null;
    }

    close() {
      this.closed = true;
      this.readyState = 2;
      this.clearTimer();
      const socket = this.socket;
      this.socket = null;
      if (socket) socket.close();
    }
  };
}

/** Why a request failed: the proxy's error code or one of the client's own. */
export class RollgateProxyError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number | null} [status]
   */
  constructor(code, message, status = null) {
    super(message);
    this.name = 'RollgateProxyError';
    /** @readonly */
    this.code = code;
    /** @readonly */
    this.status = status;
  }
}

/**
 * Build the query string for a context: `user_id`, `email`, `attr.<name>`, then `token`.
 * @param {FlagContext | null} [context]
 * @param {string | null} [token]
 * @returns {string} `''` or `?a=b&...`
 */
export function contextToQuery(context, token) {
  const params = new URLSearchParams();
  if (context) {
    if (context.id != null && context.id !== '') params.append('user_id', String(context.id));
    if (context.email != null && context.email !== '') params.append('email', String(context.email));
    const attributes = context.attributes;
    if (attributes && typeof attributes === 'object') {
      for (const [name, value] of Object.entries(attributes)) {
        if (value === null || value === undefined) continue;
        if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') continue;
        params.append(`attr.${name}`, String(value));
      }
    }
  }
  if (token) params.append('token', token);
  const query = params.toString();
  return query ? `?${query}` : '';
}

/**
 * Copy a context so later changes by the caller do not leak in.
 * @param {FlagContext | null | undefined} context
 * @returns {FlagContext}
 */
function copyContext(context) {
  if (!context) return {};
  return {
    id: context.id ?? undefined,
    email: context.email ?? undefined,
    attributes: context.attributes ? { ...context.attributes } : undefined,
  };
}

/**
 * Keep only boolean entries of a JSON object; anything else is an invalid payload.
 * @param {unknown} value
 * @returns {Record<string, boolean>}
 */
function toFlagMap(value) {
  if (!value || typeof value !== 'object' || Array.isArray(value)) {
    throw new RollgateProxyError('invalid_response', 'flags payload is not a JSON object');
  }
  /** @type {Record<string, boolean>} */
  const flags = {};
  for (const [key, enabled] of Object.entries(value)) {
    if (typeof enabled === 'boolean') flags[key] = enabled;
  }
  return flags;
}

/**
 * Keys added, removed or flipped between two flag maps.
 * @param {FlagMap} before
 * @param {FlagMap} after
 * @returns {string[]}
 */
function changedKeys(before, after) {
  const changed = [];
  for (const key of Object.keys(after)) {
    if (before[key] !== after[key]) changed.push(key);
  }
  for (const key of Object.keys(before)) {
    if (!(key in after)) changed.push(key);
  }
  return changed;
}

/**
 * Turn a non-2xx response into a typed error, using the proxy's `{"error":{code,message}}` body.
 * @param {FetchResponse} response
 * @returns {Promise<RollgateProxyError>}
 */
async function responseError(response) {
  let code = `http_${response.status}`;
  let message = `rollgate-proxy answered HTTP ${response.status}`;
  try {
    const body = /** @type {any} */ (await response.json());
    if (body && body.error && typeof body.error === 'object') {
      if (typeof body.error.code === 'string') code = body.error.code;
      if (typeof body.error.message === 'string') message = body.error.message;
    }
  } catch {
    // Not JSON: the status says enough.
  }
  return new RollgateProxyError(code, message, response.status);
}

/**
 * @param {string} name
 * @param {unknown} value
 * @param {number} fallback
 */
function positiveNumber(name, value, fallback) {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new TypeError(`${name} must be a positive number of milliseconds`);
  }
  return value;
}

/**
 * Create a client and start loading flags.
 * @param {ClientOptions} [options]
 * @returns {FlagsClient}
 */
export function createClient(options = {}) {
  const mode = options.mode ?? 'stream';
  if (mode !== 'stream' && mode !== 'poll') throw new TypeError(`mode must be 'stream' or 'poll'`);
  const transport = options.transport ?? 'sse';
  if (transport !== 'sse' && transport !== 'websocket') {
    throw new TypeError(`transport must be 'sse' or 'websocket'`);
  }
  const base = String(options.url ?? '').replace(/\/+$/, '');
  const clientKey = options.clientKey || null;
  const pollIntervalMs = positiveNumber('pollIntervalMs', options.pollIntervalMs, DEFAULT_POLL_INTERVAL_MS);
  const requestTimeoutMs = positiveNumber('requestTimeoutMs', options.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS);
  const streamRetryMs = positiveNumber('streamRetryMs', options.streamRetryMs, DEFAULT_STREAM_RETRY_MS);
  /** @type {FetchLike} */
  const fetchImpl = options.fetch ?? globalFetch();
  /** @type {WebSocketConstructor | null} */
  const WebSocketImpl =
    options.WebSocket !== undefined ? options.WebSocket : /** @type {any} */ (globalThis).WebSocket ?? null;
  // The WebSocket transport is an EventSource over a WebSocket: the stream logic below is one.
  /** @type {EventSourceConstructor | null} */
  const EventSourceImpl =
    transport === 'websocket'
      ? WebSocketImpl && webSocketSource(WebSocketImpl)
      : options.EventSource !== undefined
        ? options.EventSource
        : /** @type {any} */ (globalThis).EventSource ?? null;

  /** @type {FlagMap} */
  let flags = Object.freeze(options.initialFlags ? toFlagMap(options.initialFlags) : {});
  let context = copyContext(options.context);
  /** @type {ClientState} */
  let state = 'connecting';
  /** @type {RollgateProxyError | null} */
  let error = null;
  /** @type {number | null} */
  let updatedAt = null;
  let closed = false;
  /** @type {Set<FlagsListener>} */
  const flagListeners = new Set();
  /** @type {Set<StateListener>} */
  const stateListeners = new Set();
  /**
   * Resolved with `true` on the next data, `false` on close (behind `ready` and `setContext`).
   * @type {Array<(loaded: boolean) => void>}
   */
  let dataWaiters = [];

  // Polling: one timer, at most one request in flight; the next poll is scheduled only when the
  // previous one has finished, so requests never overlap.
  let polling = false;
  /** @type {ReturnType<typeof setTimeout> | null} */
  let pollTimer = null;
  /** @type {AbortController | null} */
  let inflight = null;
  let pollFailures = 0;
  /** @type {string | null} */
  let etag = null;

  // Streaming.
  /** @type {EventSourceLike | null} */
  let source = null;
  let streamErrors = 0;
  let streamRetryDelay = streamRetryMs;
  /** @type {ReturnType<typeof setTimeout> | null} */
  let streamRetryTimer = null;
  // Give-ups of a stream that had delivered, since its last frame (see STREAM_REOPEN_ATTEMPTS).
  let streamReopens = 0;
  // Whether any stream frame arrived since the client started (or its context changed).
  let streamDelivered = false;
  // The newest revision applied from a stream, and whether the last connection began with an
  // older one and never caught up (a second such connection in a row means the proxy's
  // numbering restarted: take it).
  /** @type {number | null} */
  let lastRevision = null;
  let olderFirstFrame = false;

  const ready = new Promise((resolve) => dataWaiters.push(resolve));

  /** @param {ClientState} next */
  function setState(next) {
    if (state === next) return;
    state = next;
    for (const listener of [...stateListeners]) {
      try {
        listener(state, error);
      } catch (err) {
        console.error('rollgate-proxy client: state listener threw', err);
      }
    }
  }

  /**
   * Take a flag map from the proxy: notify only if something changed.
   * @param {FlagMap} next
   */
  function receive(next) {
    updatedAt = Date.now();
    error = null;
    const changed = changedKeys(flags, next);
    if (changed.length > 0) {
      flags = Object.freeze(next);
      for (const listener of [...flagListeners]) {
        try {
          listener(flags, changed);
        } catch (err) {
          console.error('rollgate-proxy client: flags listener threw', err);
        }
      }
    }
    const waiters = dataWaiters;
    dataWaiters = [];
    for (const resolve of waiters) resolve(true);
  }

  function flagsUrl() {
    return `${base}/api/flags${contextToQuery(context)}`;
  }

  function streamUrl() {
    return `${base}/api/stream${contextToQuery(context, clientKey)}`;
  }

  // ---- polling ----

  function startPolling(delay = 0) {
    if (polling || closed) return;
    polling = true;
    pollFailures = 0;
    schedulePoll(delay);
  }

  function stopPolling() {
    polling = false;
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
    if (inflight) inflight.abort();
    inflight = null;
  }

  /** @param {number} delay */
  function schedulePoll(delay) {
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, delay);
  }

  function errorRetryDelay() {
    const first = Math.min(FIRST_ERROR_RETRY_MS, pollIntervalMs);
    const cap = Math.max(pollIntervalMs, MAX_ERROR_RETRY_MS);
    const delay = Math.min(first * 2 ** Math.min(pollFailures - 1, 30), cap);
    // ±20% so a fleet of browsers does not retry in lockstep after an outage.
    return delay * (0.8 + 0.4 * Math.random());
  }

  async function poll() {
    pollTimer = null;
    if (!polling || closed || inflight) return;
    const controller = new AbortController();
    inflight = controller;
    const timeout = setTimeout(() => controller.abort(), requestTimeoutMs);
    /** @type {Record<string, string>} */
    const headers = { Accept: 'application/json' };
    if (clientKey) headers.Authorization = `Bearer ${clientKey}`;
    if (etag) headers['If-None-Match'] = etag;
    /** @type {RollgateProxyError | null} */
    let failure = null;
    /** @type {Record<string, boolean> | null} */
    let fresh = null;
    try {
      const response = await fetchImpl(flagsUrl(), {
        method: 'GET',
        headers,
        signal: controller.signal,
        cache: 'no-store',
      });
      if (response.status === 304) {
        // Not modified: keep the flags we have.
      } else if (!response.ok) {
        failure = await responseError(response);
      } else {
        /** @type {any} */
        let body;
        try {
          body = await response.json();
        } catch {
          throw new RollgateProxyError('invalid_response', 'the flags response is not JSON', response.status);
        }
        fresh = toFlagMap(body && body.flags);
        etag = response.headers.get('etag');
      }
    } catch (err) {
      failure = controller.signal.aborted
        ? new RollgateProxyError('timeout', `no answer from rollgate-proxy within ${requestTimeoutMs} ms`)
        : err instanceof RollgateProxyError
          ? err
          : new RollgateProxyError('network', `cannot reach rollgate-proxy: ${errorMessage(err)}`);
    } finally {
      clearTimeout(timeout);
    }
    // Superseded: closed, polling stopped or the context changed while this request ran.
    if (inflight !== controller) return;
    inflight = null;
    if (failure) {
      pollFailures += 1;
      error = failure;
      setState('error');
      schedulePoll(errorRetryDelay());
      return;
    }
    pollFailures = 0;
    // A 304 changes nothing but still proves the flags are current.
    receive(fresh ?? flags);
    setState('polling');
    schedulePoll(pollIntervalMs);
  }

  // ---- streaming ----

  function openStream() {
    if (closed) return;
    closeStream();
    if (!EventSourceImpl) {
      const missing = transport === 'websocket' ? 'WebSocket' : 'EventSource';
      fallBackToPolling(new RollgateProxyError('stream_unavailable', `${missing} is not available here`));
      return;
    }
    /** @type {EventSourceLike} */
    let es;
    try {
      es = new EventSourceImpl(streamUrl());
    } catch (err) {
      fallBackToPolling(new RollgateProxyError('stream_unavailable', `cannot open the stream: ${errorMessage(err)}`));
      return;
    }
    source = es;
    streamErrors = 0;
    let firstFrame = true;
    if (!polling) setState('connecting');
    es.addEventListener('flags', (event) => {
      if (source !== es) return;
      let next;
      try {
        next = toFlagMap(JSON.parse(event.data));
      } catch {
        // A frame we cannot read is not a working stream; keep counting errors.
        return;
      }
      const revision = revisionOf(event.lastEventId);
      const first = firstFrame;
      firstFrame = false;
      if (revision !== null && lastRevision !== null && revision < lastRevision) {
        // Flags older than what we applied (a proxy replica behind another): never go back,
        // unless two connections in a row begin older (the proxy's numbering restarted).
        if (!first || !olderFirstFrame) {
          if (first) olderFirstFrame = true;
          return;
        }
      }
      // Applied: a connection that catches up shows the numbering did not restart.
      olderFirstFrame = false;
      if (revision !== null) lastRevision = revision;
      streamDelivered = true;
      streamReopens = 0;
      streamErrors = 0;
      streamRetryDelay = streamRetryMs;
      if (streamRetryTimer !== null) clearTimeout(streamRetryTimer);
      streamRetryTimer = null;
      // The stream works again: it supersedes the fallback polling.
      stopPolling();
      receive(next);
      setState('open');
    });
    es.addEventListener('error', () => {
      if (source !== es) return;
      streamErrors += 1;
      if (es.readyState === EVENTSOURCE_CLOSED || streamErrors >= STREAM_ERROR_LIMIT) {
        if (streamDelivered && !polling && streamReopens < STREAM_REOPEN_ATTEMPTS) {
          // A stream that worked: try it again, spread out, before polling.
          streamReopens += 1;
          closeStream();
          setState('connecting');
          if (streamRetryTimer !== null) clearTimeout(streamRetryTimer);
          streamRetryTimer = setTimeout(() => {
            streamRetryTimer = null;
            openStream();
          }, jittered(STREAM_REOPEN_MS * 2 ** (streamReopens - 1), 0.5));
          return;
        }
        fallBackToPolling(
          new RollgateProxyError(
            'stream_unavailable',
            es.readyState === EVENTSOURCE_CLOSED
              ? 'the stream was refused (check the client key)'
              : `the stream failed ${streamErrors} times in a row`,
          ),
        );
        return;
      }
      // EventSource reconnects by itself; until it delivers again we are not live.
      if (!polling) setState('connecting');
    });
  }

  function closeStream() {
    if (source) source.close();
    source = null;
  }

  /** @param {RollgateProxyError} reason */
  function fallBackToPolling(reason) {
    closeStream();
    error = reason;
    if (!polling) {
      // Right away when there are no flags from a stream yet; after a stream that had worked
      // (and was reopened in vain), at a random point of a short window, so a fleet of
      // browsers does not poll in one burst.
      startPolling(streamDelivered ? Math.random() * Math.min(FALLBACK_SPREAD_MS, pollIntervalMs) : 0);
      setState('connecting');
    }
    // No EventSource (or WebSocket) at all: never worth retrying. Otherwise try the stream again later.
    if (!EventSourceImpl) return;
    if (streamRetryTimer !== null) clearTimeout(streamRetryTimer);
    // ±20% so the browsers that fell back together do not all retry the stream together.
    const delay = jittered(streamRetryDelay, 0.2);
    streamRetryDelay = Math.min(streamRetryDelay * 2, MAX_STREAM_RETRY_MS);
    streamRetryTimer = setTimeout(() => {
      streamRetryTimer = null;
      // Polling goes on until the new stream delivers, so there is no gap if it fails again.
      openStream();
    }, delay);
  }

  function start() {
    if (mode === 'stream') openStream();
    else startPolling();
  }

  function stopAll() {
    stopPolling();
    closeStream();
    if (streamRetryTimer !== null) clearTimeout(streamRetryTimer);
    streamRetryTimer = null;
    streamRetryDelay = streamRetryMs;
    streamReopens = 0;
    streamDelivered = false;
  }

  start();

  return {
    ready,
    isEnabled(key, defaultValue = false) {
      return Object.prototype.hasOwnProperty.call(flags, key) ? flags[key] : defaultValue;
    },
    getAll() {
      return flags;
    },
    subscribe(listener) {
      flagListeners.add(listener);
      return () => {
        flagListeners.delete(listener);
      };
    },
    onStateChange(listener) {
      stateListeners.add(listener);
      return () => {
        stateListeners.delete(listener);
      };
    },
    state() {
      return state;
    },
    lastError() {
      return error;
    },
    lastUpdated() {
      return updatedAt === null ? null : new Date(updatedAt);
    },
    setContext(next) {
      if (closed) return Promise.resolve(false);
      context = copyContext(next);
      etag = null;
      stopAll();
      const loaded = new Promise((resolve) => dataWaiters.push(resolve));
      setState('connecting');
      start();
      return loaded;
    },
    close() {
      if (closed) return;
      closed = true;
      stopAll();
      setState('closed');
      const waiters = dataWaiters;
      dataWaiters = [];
      for (const resolve of waiters) resolve(false);
      flagListeners.clear();
      stateListeners.clear();
    },
  };
}

/** @returns {FetchLike} */
function globalFetch() {
  if (typeof globalThis.fetch !== 'function') throw new TypeError('no fetch available: pass options.fetch');
  return globalThis.fetch.bind(globalThis);
}

/** @param {unknown} err */
function errorMessage(err) {
  return err instanceof Error ? err.message : String(err);
}

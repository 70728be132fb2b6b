// Types for @rollgate-proxy/client: a dependency-free client for rollgate-proxy's HTTP API.
// Hand-written to match src/index.js; `npm test` type-checks both against each other.

/** A flag map: flag key → enabled. Frozen; the same object until a flag changes. */
export type FlagMap = Readonly<Record<string, boolean>>;

/**
 * Where the client's data comes from right now.
 * - `connecting`: no live source yet (first load, or the stream is reconnecting);
 * - `open`: the server-sent-events stream is delivering;
 * - `polling`: the last poll succeeded (poll mode, or stream mode fallen back to polling);
 * - `error`: the last poll failed; flags are kept and polling retries with backoff;
 * - `closed`: `close()` was called.
 */
export type ClientState = 'connecting' | 'open' | 'polling' | 'error' | 'closed';

/** `stream` uses server-sent events and falls back to polling; `poll` only polls. */
export type ClientMode = 'poll' | 'stream';

/** An attribute value; the proxy sees it as `String(value)`. */
export type AttributeValue = string | number | boolean;

/** The user flags are evaluated for. Sent as `user_id`, `email` and `attr.<name>` parameters. */
export interface FlagContext {
  id?: string | null;
  email?: string | null;
  attributes?: Readonly<Record<string, AttributeValue | null | undefined>>;
}

/** What the client passes to `fetch`. */
export interface FetchInit {
  method: 'GET';
  headers: Record<string, string>;
  signal: AbortSignal;
  cache: 'no-store';
}

/** What the client reads from a `fetch` response. */
export interface FetchResponse {
  readonly status: number;
  readonly ok: boolean;
  readonly headers: { get(name: string): string | null };
  json(): Promise<unknown>;
}

/** A `fetch` implementation (the global `fetch` fits). */
export type FetchLike = (url: string, init: FetchInit) => Promise<FetchResponse>;

/** The part of an `EventSource` the client uses. */
export interface EventSourceLike {
  readonly readyState: number;
  addEventListener(type: string, listener: (event: { data: string; lastEventId?: string }) => void): void;
  close(): void;
}

/** An `EventSource` constructor (the browser's global `EventSource` fits). */
export interface EventSourceConstructor {
  new (url: string): EventSourceLike;
}

/** The part of a `WebSocket` the client uses (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: unknown) => void) | null;
  onerror: ((event: unknown) => void) | null;
  /** Set to `'arraybuffer'` by the client (binary messages are gzip-coded frames). */
  binaryType?: string;
  send(data: string): void;
  close(): void;
}

/** A `WebSocket` constructor (the browser's global `WebSocket` fits). */
export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

/**
 * How stream mode connects: `sse` (default, an `EventSource`) or `websocket` (the same frames
 * over a WebSocket; on the Cloudflare Worker the sockets hibernate, see the proxy's README).
 */
export type StreamTransport = 'sse' | 'websocket';

export interface ClientOptions {
  /** The proxy's base URL, e.g. `https://flags.example.com`; `''` (default) means same origin. */
  url?: string;
  /** Default `stream`. */
  mode?: ClientMode;
  /** The user to evaluate flags for; anonymous when absent. */
  context?: FlagContext;
  /** Sent as `Authorization: Bearer <key>`, and as `?token=<key>` on the stream URL. */
  clientKey?: string;
  /** Poll interval in milliseconds (also used while stream mode has fallen back). Default 30000. */
  pollIntervalMs?: number;
  /** A poll request is aborted after this many milliseconds. Default 10000. */
  requestTimeoutMs?: number;
  /** After falling back to polling, try the stream again after this long (doubling, at most 10 min). Default 30000. */
  streamRetryMs?: number;
  /** Flags to serve before the first response (e.g. rendered by the server). */
  initialFlags?: Readonly<Record<string, boolean>>;
  /** Default: the global `fetch`. */
  fetch?: FetchLike;
  /** Default: the global `EventSource`; `null` means none (stream mode then polls). */
  EventSource?: EventSourceConstructor | null;
  /** Stream mode's transport. Default `sse`. */
  transport?: StreamTransport;
  /** For `transport: 'websocket'`. Default: the global `WebSocket`; `null` means none (stream mode then polls). */
  WebSocket?: WebSocketConstructor | null;
}

/** Called when at least one flag was added, removed or flipped. */
export type FlagsListener = (flags: FlagMap, changed: readonly string[]) => void;

/** Called when `state()` changes. */
export type StateListener = (state: ClientState, error: RollgateProxyError | null) => void;

export interface FlagsClient {
  /** Resolves `true` once the first flags arrived, or `false` if closed first. Never rejects. */
  readonly ready: Promise<boolean>;
  /** The flag's value, or `defaultValue` (default `false`) when the flag is unknown. */
  isEnabled(key: string, defaultValue?: boolean): boolean;
  /** Every flag. */
  getAll(): FlagMap;
  /** Listen for flag changes (not for unchanged refreshes); returns the unsubscribe function. */
  subscribe(listener: FlagsListener): () => void;
  /** Listen for connection state changes; returns the unsubscribe function. */
  onStateChange(listener: StateListener): () => void;
  state(): ClientState;
  /** Why the last request or stream failed, until the next success. */
  lastError(): RollgateProxyError | null;
  /** When flags were last received or confirmed (a 304 confirms), or `null` before that. */
  lastUpdated(): Date | null;
  /** Switch user: reconnects; resolves `true` when the new user's flags arrived, `false` if closed first. */
  setContext(context?: FlagContext | null): Promise<boolean>;
  /** Stop polling and streaming for good. */
  close(): void;
}

/** Why a request failed. `code` is the proxy's error code (e.g. `unauthorized`) or one of the client's. */
export class RollgateProxyError extends Error {
  constructor(code: string, message: string, status?: number | null);
  /** The proxy's `error.code`, `http_<status>`, `network`, `timeout`, `invalid_response` or `stream_unavailable`. */
  readonly code: string;
  /** The HTTP status, when there was a response. */
  readonly status: number | null;
}

/** Build the query string (with leading `?`, or `''`) for a context and optional stream token. */
export function contextToQuery(context?: FlagContext | null, token?: string | null): string;

/** Create a client and start loading flags. */
export function createClient(options?: ClientOptions): FlagsClient;

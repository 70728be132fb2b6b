// The floor under the Worker's SSE figures (`BENCH_PHASES=floor ./scripts/bench-edge.sh`): the
// least a Worker can do to hold event streams and push one frame to all of them. Every request
// goes to one Durable Object (a plain Worker may not write to another request's stream), which
// keeps each stream's writer and, on POST /publish, writes one shared frame of
// `?bytes=` bytes (default 5,700, about what the real stream carries per change of the 2,000-flag
// set, gzip-coded) to every stream, `?batch=` at a time. A stream opened with `?source=pull`
// is a pull-based ReadableStream instead of a TransformStream's readable side (the shards'
// shape). A stream opened with `?coding=gzip` is gzip-coded as the shards' are (each frame one
// gzip member, compressed once per publish, `Content-Encoding: gzip`, sent as is), and its
// frames' padding is random, so `?bytes=` is about what goes over the wire. No code of this
// project runs here.
//
// `/api/stream?chain=N&upstream=<base>&key=<key>` is the floor under the change latency
// (`BENCH_PHASES=floorlatency`): the proxy's topology with nothing but the hops. One `Relay`
// object holds one upstream stream (the mock's `/api/v1/sdk/stream`) and writes each event it
// completes, as is, to every subscriber; with N > 0 the clients are held by N `Shard` objects
// (round-robin), each subscribed to the relay by a streamed fetch as the proxy's shards are,
// and passing each chunk on to its clients; with N = 0 the relay holds the clients itself.

const encoder = new TextEncoder();

/** An SSE flags frame of about `bytes` bytes, numbered `n`. */
function frame(bytes, n) {
  const pad = 'x'.repeat(Math.max(0, bytes - 40));
  return encoder.encode(`event: flags\ndata: {"n":${n},"pad":"${pad}"}\n\n`);
}

/** A frame whose gzip member is about `bytes` bytes (random base64 padding), as one member. */
async function gzipFrame(bytes, n) {
  // Random bytes in base64: gzip takes it back to about the bytes' own size.
  const random = new Uint8Array(Math.max(0, bytes));
  for (let i = 0; i < random.length; i += 65536) crypto.getRandomValues(random.subarray(i, i + 65536));
  let binary = '';
  for (let i = 0; i < random.length; i += 8192) binary += String.fromCharCode(...random.subarray(i, i + 8192));
  const pad = btoa(binary);
  const plain = encoder.encode(`event: flags\ndata: {"n":${n},"pad":"${pad}"}\n\n`);
  const stream = new Blob([plain]).stream().pipeThrough(new CompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** The shards' stream preamble, `retry: 2000` and a blank line, as one chunk of the coding. */
async function preamble(gzip) {
  const plain = encoder.encode('retry: 2000\n\n');
  if (!gzip) return plain;
  const stream = new Blob([plain]).stream().pipeThrough(new CompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

export class Floor {
  constructor() {
    this.writers = new Set();
    this.n = 0;
    this.current = frame(5700, 0);
    /** The current frame as a gzip member, made on the first gzip-coded stream. */
    this.currentGzip = null;
  }

  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === '/publish') {
      this.n += 1;
      const bytes = Number(url.searchParams.get('bytes') ?? 5700);
      const current = frame(bytes, this.n);
      this.current = current;
      const gzip = [...this.writers].some((w) => w.gzip) ? await gzipFrame(bytes, this.n) : null;
      this.currentGzip = gzip;
      // `?batch=N`: N streams at a time, yielding to the runtime between batches (as the
      // shards pace their publish); 0 writes to all at once.
      const batch = Number(url.searchParams.get('batch') ?? 0);
      let written = 0;
      for (const writer of [...this.writers]) {
        if (batch > 0 && written > 0 && written % batch === 0) {
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
        if (this.current !== current) break; // a newer publish took over
        writer.write(writer.gzip ? gzip : current).catch(() => this.writers.delete(writer));
        written += 1;
      }
      return new Response(`published to ${written}\n`);
    }
    if (url.pathname !== '/api/stream') return new Response('not found\n', { status: 404 });
    const gzip = url.searchParams.get('coding') === 'gzip';
    const headers = { 'content-type': 'text/event-stream', ...(gzip ? { 'content-encoding': 'gzip' } : {}) };
    if (url.searchParams.get('headers') === 'proxy') {
      // The rest of what the proxy's streams carry.
      Object.assign(headers, {
        'access-control-allow-origin': '*',
        'access-control-expose-headers': 'etag,retry-after,x-request-id',
        'cache-control': 'no-cache',
        vary: 'accept-encoding',
        'x-accel-buffering': 'no',
        'x-request-id': crypto.randomUUID().slice(0, 16),
      });
    }
    // The bytes are gzip members already: the runtime must send them as they are.
    const init = gzip ? { headers, encodeBody: 'manual' } : { headers };
    const first = gzip ? (this.currentGzip ??= await gzipFrame(5700, this.n)) : this.current;
    // `?head=1`: a small first chunk before the first frame, as the shards send their
    // `retry:` preamble (a gzip member of its own when gzip-coded).
    const head = url.searchParams.get('head') === '1' ? await preamble(gzip) : null;
    if (url.searchParams.get('source') === 'pull') {
      // A pull source holding the newest frame, as the shards' Rust-made streams are: the
      // runtime asks for the next chunk, which waits until a publish offers one.
      const slot = { frame: first, wake: null, head };
      const source = {
        gzip,
        write: (frame) => {
          slot.frame = frame;
          if (slot.wake) slot.wake();
          return Promise.resolve();
        },
      };
      this.writers.add(source);
      const readable = new ReadableStream({
        pull: async (controller) => {
          if (slot.head) {
            controller.enqueue(slot.head);
            slot.head = null;
            return;
          }
          while (!slot.frame) await new Promise((resolve) => (slot.wake = resolve));
          slot.wake = null;
          controller.enqueue(slot.frame);
          slot.frame = null;
        },
        cancel: () => this.writers.delete(source),
      });
      return new Response(readable, init);
    }
    const { readable, writable } = new TransformStream();
    const writer = writable.getWriter();
    writer.gzip = gzip;
    this.writers.add(writer);
    if (head) writer.write(head).catch(() => this.writers.delete(writer));
    writer.write(first).catch(() => this.writers.delete(writer));
    return new Response(readable, init);
  }
}

const decoder = new TextDecoder();

/** A frame every chain stream starts with (over 64 bytes: the load client counts it). */
const HELLO = encoder.encode(`event: hello\ndata: {"pad":"${'x'.repeat(80)}"}\n\n`);

/** Chunks a chain stream's reader may fall behind by before it is dropped. */
const MAX_BEHIND = 64;

/**
 * A stream response and its writer, whose failed write removes it from `set`, as does a reader
 * `MAX_BEHIND` chunks behind. With `pull`, a pull-based stream with no queue of its own (a
 * high-water mark of 0), as the proxy's objects make theirs: chunks wait in its slot.
 */
function chainStream(set, first, pull) {
  if (pull) {
    const slot = { chunks: [first], controller: null, wanted: false };
    const deliver = () => {
      if (slot.wanted && slot.chunks.length > 0) {
        slot.wanted = false;
        slot.controller.enqueue(slot.chunks.shift());
      }
    };
    const entry = {
      write: (chunk) => {
        if (slot.chunks.length >= MAX_BEHIND) {
          set.delete(entry);
          slot.chunks = [];
          if (slot.controller) slot.controller.error(new Error('reader too far behind'));
          return;
        }
        slot.chunks.push(chunk);
        try {
          deliver();
        } catch {
          set.delete(entry);
        }
      },
    };
    set.add(entry);
    const readable = new ReadableStream(
      {
        pull: (controller) => {
          slot.controller = controller;
          slot.wanted = true;
          deliver();
        },
        cancel: () => set.delete(entry),
      },
      { highWaterMark: 0 },
    );
    return new Response(readable, { headers: { 'content-type': 'text/event-stream' } });
  }
  const { readable, writable } = new TransformStream();
  const writer = writable.getWriter();
  const entry = {
    write: (chunk) => {
      // The writer's queue: its high-water mark is 1, so this is how far the reader is behind.
      if (writer.desiredSize !== null && writer.desiredSize < -MAX_BEHIND) {
        set.delete(entry);
        writer.abort(new Error('reader too far behind')).catch(() => {});
        return;
      }
      writer.write(chunk).catch(() => set.delete(entry));
    },
  };
  set.add(entry);
  entry.write(first);
  return new Response(readable, { headers: { 'content-type': 'text/event-stream' } });
}

/** The chain's relay: one upstream stream, each completed event written to every subscriber. */
export class Relay {
  constructor() {
    this.subscribers = new Set();
    this.following = false;
    this.last = HELLO;
  }

  fetch(request) {
    const url = new URL(request.url);
    if (!this.following) {
      this.following = true;
      this.follow(url.searchParams.get('upstream'), url.searchParams.get('key'));
    }
    return chainStream(this.subscribers, this.last, url.searchParams.get('source') === 'pull');
  }

  async follow(upstream, key) {
    // Bounded: a bench run is minutes; the mock restarting is not part of it.
    for (let attempt = 0; attempt < 100; attempt += 1) {
      try {
        const response = await fetch(`${upstream}/api/v1/sdk/stream?token=${encodeURIComponent(key)}`, {
          headers: { authorization: `Bearer ${key}`, accept: 'text/event-stream' },
        });
        const reader = response.body.getReader();
        let pending = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          pending += decoder.decode(value, { stream: true });
          for (let at = pending.indexOf('\n\n'); at >= 0; at = pending.indexOf('\n\n')) {
            const event = encoder.encode(pending.slice(0, at + 2));
            pending = pending.slice(at + 2);
            this.last = event;
            for (const subscriber of this.subscribers) subscriber.write(event);
          }
        }
      } catch {
        // Followed again below.
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/** The chain's shard: its clients' streams, fed from one streamed fetch to the relay. */
export class Shard {
  constructor(state, env) {
    this.env = env;
    this.clients = new Set();
    this.following = false;
    this.last = HELLO;
  }

  fetch(request) {
    if (!this.following) {
      this.following = true;
      this.follow(request.url);
    }
    const pull = new URL(request.url).searchParams.get('source') === 'pull';
    return chainStream(this.clients, this.last, pull);
  }

  async follow(url) {
    const relay = this.env.RELAY.get(this.env.RELAY.idFromName('relay'));
    const response = await relay.fetch(url);
    const reader = response.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      this.last = value;
      for (const client of this.clients) client.write(value);
    }
  }
}

/** Round-robin over the chain's shards, per isolate. */
let nextShard = 0;

export default {
  fetch(request, env) {
    const url = new URL(request.url);
    if (url.pathname === '/') return new Response('ok');
    const chain = url.searchParams.get('chain');
    if (chain === '0') return env.RELAY.get(env.RELAY.idFromName('relay')).fetch(request);
    if (chain !== null) {
      const shard = nextShard % Math.max(1, Number(chain));
      nextShard += 1;
      return env.SHARD.get(env.SHARD.idFromName(`shard-${shard}`)).fetch(request);
    }
    return env.FLOOR.get(env.FLOOR.idFromName('floor')).fetch(request);
  },
};

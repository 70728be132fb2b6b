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

export default {
  fetch(request, env) {
    if (new URL(request.url).pathname === '/') return new Response('ok');
    return env.FLOOR.get(env.FLOOR.idFromName('floor')).fetch(request);
  },
};

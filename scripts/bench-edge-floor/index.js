// The floor under the Worker's SSE figures (`BENCH_PHASES=floor ./scripts/bench-edge.sh`): the
// least a Worker can do to hold event streams and push one frame to all of them. Every request
// goes to one Durable Object (a plain Worker may not write to another request's stream), which
// keeps each stream's writer and, on POST /publish, writes one shared frame of
// `?bytes=` bytes (default 17,000, what the real stream carries per change of the 2,000-flag
// set, gzip-coded) to every stream, `?batch=` at a time. A stream opened with `?source=pull`
// is a pull-based ReadableStream instead of a TransformStream's readable side (the shards'
// shape). No code of this project runs here.

const encoder = new TextEncoder();

/** An SSE flags frame of about `bytes` bytes, numbered `n`. */
function frame(bytes, n) {
  const pad = 'x'.repeat(Math.max(0, bytes - 40));
  return encoder.encode(`event: flags\ndata: {"n":${n},"pad":"${pad}"}\n\n`);
}

export class Floor {
  constructor() {
    this.writers = new Set();
    this.n = 0;
    this.current = frame(17000, 0);
  }

  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === '/publish') {
      this.n += 1;
      const current = frame(Number(url.searchParams.get('bytes') ?? 17000), this.n);
      this.current = current;
      // `?batch=N`: N streams at a time, yielding to the runtime between batches (as the
      // shards pace their publish); 0 writes to all at once.
      const batch = Number(url.searchParams.get('batch') ?? 0);
      let written = 0;
      for (const writer of [...this.writers]) {
        if (batch > 0 && written > 0 && written % batch === 0) {
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
        if (this.current !== current) break; // a newer publish took over
        writer.write(current).catch(() => this.writers.delete(writer));
        written += 1;
      }
      return new Response(`published to ${written}\n`);
    }
    if (url.pathname !== '/api/stream') return new Response('not found\n', { status: 404 });
    const headers = { 'content-type': 'text/event-stream' };
    if (url.searchParams.get('source') === 'pull') {
      // A pull source holding the newest frame, as the shards' Rust-made streams are: the
      // runtime asks for the next chunk, which waits until a publish offers one.
      const slot = { frame: this.current, wake: null };
      const source = {
        write: (frame) => {
          slot.frame = frame;
          if (slot.wake) slot.wake();
          return Promise.resolve();
        },
      };
      this.writers.add(source);
      const readable = new ReadableStream({
        pull: async (controller) => {
          while (!slot.frame) await new Promise((resolve) => (slot.wake = resolve));
          slot.wake = null;
          controller.enqueue(slot.frame);
          slot.frame = null;
        },
        cancel: () => this.writers.delete(source),
      });
      return new Response(readable, { headers });
    }
    const { readable, writable } = new TransformStream();
    const writer = writable.getWriter();
    this.writers.add(writer);
    writer.write(this.current).catch(() => this.writers.delete(writer));
    return new Response(readable, { headers });
  }
}

export default {
  fetch(request, env) {
    if (new URL(request.url).pathname === '/') return new Response('ok');
    return env.FLOOR.get(env.FLOOR.idFromName('floor')).fetch(request);
  },
};

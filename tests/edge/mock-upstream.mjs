// A small Rollgate-compatible upstream for the edge specs, with the same /control/* paths as the
// Rust mock (tests/src/mock, `mock-upstream` binary) for what these specs use: flags, faults,
// stream drops, stats. Run directly (`node tests/edge/mock-upstream.mjs`) it prints
// `listening on http://127.0.0.1:PORT` like the Rust binary; the specs start it in-process, or
// use the Rust binary when MOCK_UPSTREAM_BIN is set.
import http from "node:http";
import crypto from "node:crypto";

export const DEFAULT_API_KEY = "test-api-key";

export function startMock({ apiKey = DEFAULT_API_KEY, flags = { "new-checkout": true, "dark-mode": false } } = {}) {
  const state = {
    flags: { ...flags },
    reasons: {},
    version: 1,
    faults: new Map(), // route ("flags" | "stream") -> status
    down: false,
    streams: new Set(),
    stats: { flags_requests: 0, stream_requests: 0, streams_accepted: 0, flags_not_modified: 0 },
  };
  const body = () => JSON.stringify({ flags: sortKeys(state.flags), reasons: sortKeys(state.reasons) });
  const etag = () => `"${crypto.createHash("sha256").update(body()).digest("hex").slice(0, 16)}"`;
  const initFrame = () => `event: init\ndata: ${JSON.stringify({ flags: sortKeys(state.flags) })}\n\n`;
  const authorized = (req, url) =>
    req.headers.authorization === `Bearer ${apiKey}` || url.searchParams.get("token") === apiKey;
  const json = (res, status, value) => {
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(value));
  };
  const changed = () => {
    state.version += 1;
    for (const res of state.streams) res.write(initFrame());
  };

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://x");
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const text = Buffer.concat(chunks).toString();
    const path = url.pathname;
    if (path.startsWith("/control/")) return control(req.method, path, text, res);
    if (state.down) return req.socket.destroy();
    if (path === "/api/v1/sdk/flags") {
      state.stats.flags_requests += 1;
      if (state.faults.has("flags")) return json(res, state.faults.get("flags"), { error: "fault" });
      if (!authorized(req, url)) return json(res, 401, { error: "unauthorized" });
      const tag = etag();
      if (req.headers["if-none-match"] === tag) {
        state.stats.flags_not_modified += 1;
        res.writeHead(304, { etag: tag });
        return res.end();
      }
      res.writeHead(200, { "content-type": "application/json", etag: tag });
      return res.end(url.searchParams.get("withReasons") === "true" ? body() : JSON.stringify({ flags: sortKeys(state.flags) }));
    }
    if (path === "/api/v1/sdk/stream") {
      state.stats.stream_requests += 1;
      if (state.faults.has("stream")) return json(res, state.faults.get("stream"), { error: "fault" });
      if (!authorized(req, url)) return json(res, 401, { error: "unauthorized" });
      state.stats.streams_accepted += 1;
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
      res.write(initFrame());
      state.streams.add(res);
      res.on("close", () => state.streams.delete(res));
      return;
    }
    if (path === "/api/v1/sdk/events" || path === "/api/v1/sdk/telemetry" || path === "/api/v1/sdk/identify") {
      return json(res, 200, { received: 0 });
    }
    json(res, 404, { error: "not found" });
  });

  function control(method, path, text, res) {
    const input = text ? JSON.parse(text) : {};
    const done = () => json(res, 200, { ok: true, version: state.version });
    if (path === "/control/stats" && method === "GET") {
      return json(res, 200, { ...state.stats, version: state.version, open_streams: state.streams.size });
    }
    if (path === "/control/flags" && method === "PUT") {
      state.flags = { ...input.flags };
      state.reasons = { ...(input.reasons ?? {}) };
      changed();
      return done();
    }
    if (path.startsWith("/control/flags/") && method === "PUT") {
      state.flags[decodeURIComponent(path.slice("/control/flags/".length))] = input.value;
      changed();
      return done();
    }
    if (path === "/control/faults" && method === "POST") {
      state.faults.set(input.route, input.status ?? 500);
      return done();
    }
    if (path === "/control/faults" && method === "DELETE") {
      state.faults.clear();
      return done();
    }
    if (path === "/control/streams/drop" && method === "POST") {
      const n = state.streams.size;
      for (const s of state.streams) s.destroy();
      state.streams.clear();
      return json(res, 200, { ok: true, streams: n });
    }
    if (path === "/control/down" && method === "PUT") {
      state.down = input.down !== false;
      if (state.down) {
        for (const s of state.streams) s.destroy();
        state.streams.clear();
      }
      return done();
    }
    json(res, 404, { error: "unknown control" });
  }

  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      const url = `http://127.0.0.1:${server.address().port}`;
      resolve({
        url,
        close: () => {
          for (const s of state.streams) s.destroy();
          server.closeAllConnections?.();
          return new Promise((r) => server.close(r));
        },
      });
    });
  });
}

function sortKeys(obj) {
  return Object.fromEntries(Object.keys(obj).sort().map((k) => [k, obj[k]]));
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const mock = await startMock();
  console.log(`listening on ${mock.url}`);
}

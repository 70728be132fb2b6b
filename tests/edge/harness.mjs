// Shared helpers of the edge specs: the mock upstream, `wrangler dev` on the built Worker, an SSE
// reader, and bounded waits. Every process started here is killed by its own process group id.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import net from "node:net";
import { fileURLToPath } from "node:url";
import { startMock } from "./mock-upstream.mjs";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** The Rust mock when MOCK_UPSTREAM_BIN names its binary, else the in-process Node mock. */
export async function mockUpstream() {
  const bin = process.env.MOCK_UPSTREAM_BIN;
  if (!bin) return startMock();
  const child = spawn(bin, ["--port", "0"], { stdio: ["ignore", "pipe", "inherit"], detached: true });
  const url = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error("mock-upstream did not start")), 10_000);
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
  return { url, close: async () => killGroup(child) };
}

export async function control(mock, method, p, body) {
  const res = await fetch(mock.url + p, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return res.json();
}

async function freePort() {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts `wrangler dev` (no build step: run scripts/build-edge.sh first) with `vars` and a
 * state directory (`persistTo`, fresh by default). Resolves to { url, stop, log }.
 */
export async function startWorker({ vars = {}, persistTo, port } = {}) {
  port ??= await freePort();
  persistTo ??= fs.mkdtempSync(path.join(os.tmpdir(), "rollgate-edge-"));
  const args = [
    "dev", "-c", "wrangler.nobuild.toml", "--ip", "127.0.0.1", "--port", String(port),
    "--inspector-port", String(await freePort()),
    "--persist-to", persistTo, "--show-interactive-dev-session=false", "--log-level", "warn",
  ];
  for (const [k, v] of Object.entries(vars)) args.push("--var", `${k}:${v}`);
  const bin = path.join(ROOT, "node_modules/.bin");
  const child = spawn(path.join(bin, "wrangler"), args, {
    cwd: ROOT,
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PATH: `${bin}:${process.env.PATH}`, WRANGLER_SEND_METRICS: "false", CI: "true" },
  });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  await waitFor(async () => (await fetch(url + "/live").catch(() => null))?.ok, 30_000, () => `wrangler dev did not start:\n${log}`);
  return { url, persistTo, stop: () => killGroup(child), log: () => log };
}

function killGroup(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once("exit", () => resolve());
    try {
      process.kill(-child.pid, "SIGTERM");
    } catch {
      resolve();
    }
    setTimeout(() => {
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {}
    }, 3000).unref();
  });
}

/** Polls `check` until it returns a truthy value (returned) or `timeoutMs` passes (throws). */
export async function waitFor(check, timeoutMs = 5000, message = "condition not met") {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await sleep(50);
  }
  throw new Error(typeof message === "function" ? message() : `${message} (last: ${JSON.stringify(last)})`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** An SSE client: `frames` collects raw frames (text up to and including the blank line). */
export async function openStream(url, headers = {}) {
  const controller = new AbortController();
  const res = await fetch(url, { headers, signal: controller.signal });
  const client = { res, frames: [], times: [], closed: false, close: () => controller.abort() };
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let i;
        while ((i = buffer.indexOf("\n\n")) >= 0) {
          client.frames.push(buffer.slice(0, i + 2));
          client.times.push(Date.now());
          buffer = buffer.slice(i + 2);
        }
      }
    } catch {}
    client.closed = true;
  })();
  return client;
}

/** Parses a frame into { event, id, data, retry, comment }. */
export function parseFrame(frame) {
  const out = {};
  for (const line of frame.split("\n")) {
    if (!line) continue;
    if (line.startsWith(":")) out.comment = line.slice(1).trim();
    const [field, ...rest] = line.split(":");
    const value = rest.join(":").replace(/^ /, "");
    if (["event", "id", "data", "retry"].includes(field)) out[field] = value;
  }
  return out;
}

export async function getJson(url, init) {
  const res = await fetch(url, init);
  return { status: res.status, headers: res.headers, body: await res.json() };
}

// Shared helpers of the edge specs: the Rust mock upstream (`mock-upstream`, the same one the
// e2e suite uses), `wrangler dev` on the built Worker, an SSE reader, and bounded waits. Every
// process started here is killed by its own process group id.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** The key the mock requires (its default, `mock::DEFAULT_API_KEY`). */
export const DEFAULT_API_KEY = "test-api-key";

/**
 * The `mock-upstream` binary: MOCK_UPSTREAM_BIN when set, else built once with
 * `cargo build -p rollgate-proxy-tests --bin mock-upstream` (a no-op when fresh) in the
 * workspace target dir (CARGO_TARGET_DIR when set).
 */
function mockBinary() {
  if (process.env.MOCK_UPSTREAM_BIN) return process.env.MOCK_UPSTREAM_BIN;
  const build = spawnSync("cargo", ["build", "-p", "rollgate-proxy-tests", "--bin", "mock-upstream"], {
    cwd: ROOT,
    stdio: ["ignore", "ignore", "pipe"],
    encoding: "utf8",
  });
  if (build.status !== 0) throw new Error(`building mock-upstream failed:\n${build.stderr}`);
  const targetDir = process.env.CARGO_TARGET_DIR ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR) : path.join(ROOT, "target");
  return path.join(targetDir, "debug", "mock-upstream");
}

/**
 * Starts the Rust mock upstream (tests/src/mock) on a free port with `flags` as its default
 * map. Resolves to { url, controlUrl, close }: `url` is the protocol port (give it to the
 * Worker), `controlUrl` its own /control/* port, which `down` and `stop` never touch; drive it
 * with `control(mock, ...)`.
 */
export async function mockUpstream({ flags = { "new-checkout": true, "dark-mode": false } } = {}) {
  const args = ["--port", "0", "--control-port", "0", "--scenario", "empty", "--api-key", DEFAULT_API_KEY];
  const child = spawn(mockBinary(), args, { stdio: ["ignore", "pipe", "inherit"], detached: true });
  const [url, controlUrl] = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`mock-upstream did not start: ${out}`)), 10_000);
    child.once("exit", (code) => reject(new Error(`mock-upstream exited with ${code}`)));
    child.stdout.on("data", (d) => {
      out += d;
      const proto = out.match(/listening on (http:\/\/\S+)/);
      const ctl = out.match(/control on (http:\/\/\S+)/);
      if (proto && ctl) {
        clearTimeout(timer);
        resolve([proto[1], ctl[1]]);
      }
    });
  });
  const mock = { url, controlUrl, close: async () => killGroup(child) };
  await control(mock, "PUT", "/control/flags", { flags });
  return mock;
}

/** A /control/* request to the mock's control port; resolves to the JSON answer. */
export async function control(mock, method, p, body) {
  const res = await fetch(mock.controlUrl + p, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return res.json();
}

/**
 * A private copy of the built Worker and wrangler.nobuild.toml in `dir`, from which `wrangler
 * dev` runs: wrangler reloads the Worker (resetting every Durable Object) when its bundle or
 * config changes, so nothing written to the repository during a run may reach a running Worker.
 */
function isolatedProject(dir) {
  const project = path.join(dir, "project");
  if (!fs.existsSync(path.join(project, "edge-worker/build/index.js"))) {
    fs.cpSync(path.join(ROOT, "edge-worker/build"), path.join(project, "edge-worker/build"), { recursive: true });
    fs.copyFileSync(path.join(ROOT, "wrangler.nobuild.toml"), path.join(project, "wrangler.nobuild.toml"));
  }
  return project;
}

/**
 * Starts `wrangler dev` (no build step: run scripts/build-edge.sh first) with `vars` and a
 * state directory (`persistTo`, fresh by default). wrangler binds port 0 itself and its "Ready
 * on" line says where: a port picked free here and bound later could be taken in between by
 * another process. Resolves to { url, persistTo, stop, log }.
 */
export async function startWorker({ vars = {}, persistTo } = {}) {
  persistTo ??= fs.mkdtempSync(path.join(os.tmpdir(), "rollgate-edge-"));
  const project = isolatedProject(persistTo);
  const args = [
    "dev", "-c", "wrangler.nobuild.toml", "--ip", "127.0.0.1", "--port", "0",
    "--inspector-port", "0", "--persist-to", path.join(persistTo, "state"),
    "--show-interactive-dev-session=false", "--log-level", "info",
  ];
  for (const [k, v] of Object.entries(vars)) args.push("--var", `${k}:${v}`);
  const bin = path.join(ROOT, "node_modules/.bin");
  const child = spawn(path.join(bin, "wrangler"), args, {
    cwd: project,
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PATH: `${bin}:${process.env.PATH}`, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1" },
  });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  let url = null;
  await waitFor(
    async () => {
      url ??= log.match(/Ready on (http:\/\/127\.0\.0\.1:\d+)/)?.[1] ?? null;
      return url !== null && (await fetch(url + "/live").catch(() => null))?.ok;
    },
    60_000,
    () => `wrangler dev did not start:\n${log}`,
  );
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


/**
 * The mock upstream and a Worker in upstream mode against it (`vars` added to the key and the
 * base URL), once `/ready` answers 200; `stop()` ends both.
 */
export async function upstreamWorker(vars = {}) {
  const mock = await mockUpstream();
  const worker = await startWorker({
    vars: { ROLLGATE_API_KEY: DEFAULT_API_KEY, ROLLGATE_BASE_URL: mock.url, ...vars },
  });
  await waitFor(async () => (await fetch(worker.url + "/ready")).status === 200, 20_000, "not ready");
  return {
    mock,
    worker,
    stop: async () => {
      await worker.stop();
      await mock.close();
    },
  };
}
/** Polls `check` until it returns a truthy value (returned) or `timeoutMs` passes (throws). */
export async function waitFor(check, timeoutMs = 20_000, message = "condition not met") {
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

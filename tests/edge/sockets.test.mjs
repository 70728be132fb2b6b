// A shard holds at most ROLLGATE_PROXY_SOCKETS_PER_SHARD WebSocket clients: past that a connect
// is refused with core's 503 NOT_READY and counted, and the sockets it holds keep working; a
// place freed by a close is taken again. A shard whose last socket went away (the relay then
// stops pushing to it) registers again for its next socket.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { control, upstreamWorker, waitFor } from "./harness.mjs";

const LIMIT = 3;

let setup;
let worker;

before(async () => {
  // One shard, so every socket lands on it.
  setup = await upstreamWorker({
    ROLLGATE_PROXY_SSE_SHARDS: "1",
    ROLLGATE_PROXY_SOCKETS_PER_SHARD: String(LIMIT),
  });
  worker = setup.worker;
});
after(async () => {
  await setup?.stop();
});

/** Opens a WebSocket on the stream: `{ socket, messages }`, or `{ status, body }` if refused. */
function open() {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(worker.url.replace(/^http/, "ws") + "/api/stream");
    const messages = [];
    socket.on("message", (data) => messages.push(String(data)));
    socket.once("open", () => resolve({ socket, messages }));
    socket.once("unexpected-response", (_, res) => {
      let body = "";
      res.on("data", (chunk) => (body += chunk));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    socket.once("error", reject);
  });
}

const refused = async () => {
  const text = await (await fetch(worker.url + "/api/metrics")).text();
  return Number(text.match(/^rollgate_proxy_websocket_refused_total (\d+)$/m)?.[1] ?? -1);
};

test("past the limit a connect gets 503 NOT_READY, counted; a freed place is taken again", async () => {
  const held = [];
  for (let i = 0; i < LIMIT; i++) held.push(await open());
  for (const client of held) assert.ok(client.socket, "accepted within the limit");
  await waitFor(() => held.every((c) => c.messages.some((m) => m.includes("event: flags"))), 20_000, "first frames");

  const over = await open();
  assert.equal(over.status, 503);
  assert.equal(JSON.parse(over.body).error.code, "NOT_READY");
  await waitFor(async () => (await refused()) === 1, 10_000, "the refusal is not counted");

  // The sockets held still answer.
  held[0].socket.send("ping");
  await waitFor(() => held[0].messages.includes("pong"), 10_000, "no pong on a held socket");

  // A close frees a place (the runtime drops the socket once the close completes).
  held[0].socket.close();
  let again;
  await waitFor(async () => {
    const attempt = await open();
    if (attempt.socket) again = attempt;
    return Boolean(again);
  }, 20_000, "the freed place is not taken again");
  await waitFor(() => again.messages.some((m) => m.includes("event: flags")), 20_000, "no first frame");
  for (const client of [...held.slice(1), again]) client.socket.terminate();
});

/** Open WebSocket clients as the shard last reported them (the clients gauge). */
const openSockets = async () => {
  const text = await (await fetch(worker.url + "/api/metrics")).text();
  return [...text.matchAll(/^rollgate_proxy_sse_clients\{[^}]*\} (\d+)$/gm)].reduce((sum, m) => sum + Number(m[1]), 0);
};

test("a shard whose sockets all closed registers again, so its next socket gets every change", async () => {
  const first = await open();
  assert.ok(first.socket);
  await waitFor(() => first.messages.some((m) => m.includes("event: flags")), 20_000, "first frame");
  first.socket.close();
  await waitFor(async () => (await openSockets()) === 0, 20_000, "the closed socket still counted");

  // A change while the shard holds no socket: it answers the relay's push with 410 and the
  // relay stops pushing to it.
  await control(setup.mock, "PUT", "/control/flags/dark-mode", { value: true });
  const polled = async () => (await (await fetch(worker.url + "/api/flags")).json()).flags["dark-mode"];
  await waitFor(async () => (await polled()) === true, 20_000, "the change not served");

  // The next socket gets the current flags, and later changes.
  const next = await open();
  assert.ok(next.socket);
  await waitFor(() => next.messages.some((m) => m.includes('"dark-mode":true')), 20_000, "the new socket got stale flags");
  await control(setup.mock, "PUT", "/control/flags/dark-mode", { value: false });
  await waitFor(() => next.messages.some((m) => m.includes('"dark-mode":false')), 20_000, "a later change did not reach the new socket");
  next.socket.terminate();
});

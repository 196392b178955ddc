// Conformance check for a benchmark peer: node bench/peers/check.mjs NAME PORT
//
// Opens 3 connections in room A and 1 in room B, sends bursts and single messages (up to ~1 KiB)
// from every connection, and asserts that each connection got every message of its room exactly
// once, in each sender's order, and nothing from the other room. Frames may carry several messages
// separated by '\n' (gorilla). NAME "socketio" speaks Engine.IO 4 / Socket.IO 4 over the websocket
// transport; every other NAME uses GET /ws?room=ROOM. Finally one room-A connection is dropped
// without a close handshake and the server must go on serving the others and accept a new one.
//
// With --stall, one connection then stops reading while ~12 MB is broadcast to the room, more than
// the socket buffers hold, and must still get every message once it reads again (the server keeps
// what a socket does not take instead of dropping it or the connection). The floor, ws and
// Socket.IO pass this; gorilla (256-message send queue) and axum-broadcast (1024-message
// broadcast channel) drop by design.
import { WebSocket } from "ws";

const [name, portArg, flag] = process.argv.slice(2);
const stall = flag === "--stall";
if (!name || !portArg || (flag && !stall)) {
  console.error("usage: node check.mjs NAME PORT [--stall]");
  process.exit(2);
}
const port = Number(portArg);
const socketio = name === "socketio";
const tag = Math.random().toString(36).slice(2, 8);
const roomA = `check-a-${tag}`;
const roomB = `check-b-${tag}`;
const TIMEOUT_MS = 10_000;
const STALL_COUNT = 12_000;
const failures = [];

function url(room) {
  return socketio
    ? `ws://127.0.0.1:${port}/socket.io/?EIO=4&transport=websocket&room=${room}`
    : `ws://127.0.0.1:${port}/ws?room=${room}`;
}

/** One client: collects the chat messages it receives, in order. */
class Client {
  constructor(label, room) {
    this.label = label;
    this.room = room;
    this.got = [];
    this.frames = 0;
    this.waiters = [];
  }

  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url(this.room), { perMessageDeflate: false });
      this.ws = ws;
      let ready = false;
      const done = () => {
        ready = true;
        resolve();
      };
      ws.on("error", (err) => (ready ? failures.push(`${this.label}: ${err.message}`) : reject(err)));
      ws.on("open", () => {
        if (!socketio) done();
      });
      ws.on("message", (data, isBinary) => {
        const text = data.toString();
        if (isBinary) {
          failures.push(`${this.label}: got a binary frame`);
          return;
        }
        if (!socketio) {
          this.frames++;
          for (const m of text.split("\n")) this.receive(m);
          return;
        }
        // Engine.IO packet types: 0 open, 2 ping, 4 message; Socket.IO: 40 connect, 42 event.
        if (text.startsWith("0{")) ws.send("40");
        else if (text === "2") ws.send("3");
        else if (text.startsWith("40")) done();
        else if (text.startsWith("42")) {
          const [event, payload] = JSON.parse(text.slice(2));
          this.frames++;
          if (event === "msg") this.receive(payload);
          else failures.push(`${this.label}: unexpected event ${text.slice(0, 80)}`);
        } else if (!ready && text.startsWith("44")) reject(new Error(`connect refused: ${text}`));
      });
      ws.on("close", () => {
        if (!ready) reject(new Error(`${this.label}: closed before ready`));
      });
    });
  }

  send(message) {
    this.ws.send(socketio ? `42${JSON.stringify(["msg", message])}` : message);
  }

  receive(message) {
    this.got.push(message);
    this.waiters = this.waiters.filter((w) => !w());
  }

  /** Resolves when `pred()` holds (checked on every message) or the timeout passes. */
  until(pred, ms = TIMEOUT_MS) {
    return new Promise((resolve) => {
      if (pred()) return resolve(true);
      const timer = setTimeout(() => resolve(false), ms);
      this.waiters.push(() => {
        if (!pred()) return false;
        clearTimeout(timer);
        resolve(true);
        return true;
      });
    });
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Message body: ASCII, no '\n', '"' or '\\'; `size` pads it to roughly that many bytes. */
function message(sender, seq, size = 0) {
  const head = `${sender}:${seq}:`;
  return head + "x".repeat(Math.max(0, size - head.length));
}

/** Asserts every client got exactly `expected` (per-sender order kept, no extras, no dupes). */
function verify(clients, expected, phase) {
  for (const c of clients) {
    const want = expected.get(c.room) ?? [];
    const counts = new Map();
    for (const m of c.got) counts.set(m, (counts.get(m) ?? 0) + 1);
    const missing = want.filter((m) => !counts.has(m));
    const dupes = [...counts].filter(([, n]) => n > 1).map(([m]) => m);
    const wantSet = new Set(want);
    const extra = c.got.filter((m) => !wantSet.has(m));
    const problems = [];
    if (missing.length) problems.push(`${missing.length} missing (e.g. ${missing[0].slice(0, 40)})`);
    if (dupes.length) problems.push(`${dupes.length} duplicated (e.g. ${dupes[0].slice(0, 40)})`);
    if (extra.length) problems.push(`${extra.length} unexpected (e.g. ${extra[0].slice(0, 40)})`);
    // Each sender's messages must arrive in the order they were sent.
    const bySender = new Map();
    for (const m of c.got.filter((m) => wantSet.has(m))) {
      const [sender, seq] = m.split(":");
      const last = bySender.get(sender) ?? -1;
      if (Number(seq) < last) problems.push(`out of order from ${sender}: ${seq} after ${last}`);
      bySender.set(sender, Number(seq));
    }
    if (problems.length) failures.push(`${phase}: ${c.label}: ${problems.join("; ")}`);
    else console.log(`  ok  ${phase}: ${c.label} got all ${want.length} messages of its room once (${c.frames} frames)`);
  }
}

async function main() {
  const a = [0, 1, 2].map((i) => new Client(`a${i}`, roomA));
  const b = [new Client("b0", roomB)];
  const all = [...a, ...b];
  for (const c of all) await c.open();
  await sleep(200); // joins are asynchronous in some peers (hub goroutines, socket.join)
  console.log(`${name} on port ${port}: 3 connections in ${roomA}, 1 in ${roomB}`);

  const expected = new Map([
    [roomA, []],
    [roomB, []],
  ]);
  const send = (c, seq, size) => {
    const m = message(c.label, seq, size);
    expected.get(c.room).push(m);
    c.send(m);
  };

  // Phase 1: one message at a time from each connection.
  let seq = 0;
  for (const c of all) {
    send(c, seq++, 16);
    await sleep(20);
  }
  // Phase 2: bursts (queued messages may be packed or coalesced), including ~1 KiB payloads.
  for (let i = 0; i < 20; i++) for (const c of all) send(c, seq++, i % 5 === 0 ? 1000 : 64);

  const complete = (c) => () => c.got.length >= expected.get(c.room).length;
  await Promise.all(all.map((c) => c.until(complete(c))));
  await sleep(300); // let duplicates or strays show up
  verify(all, expected, "broadcast");

  // Phase 3: drop a0 without a close handshake, keep going with the others.
  a[0].ws.terminate();
  await sleep(200);
  for (const c of all) {
    c.got = [];
    c.frames = 0;
  }
  const survivors = [a[1], a[2], b[0]];
  expected.set(roomA, []);
  expected.set(roomB, []);
  for (let i = 0; i < 5; i++) for (const c of survivors) send(c, seq++, 64);
  await Promise.all(survivors.map((c) => c.until(complete(c))));
  await sleep(300);
  verify(survivors, expected, "after a drop");

  // Phase 4: a new connection joins room A and gets what is sent from then on.
  const late = new Client("a3", roomA);
  await late.open();
  await sleep(200);
  for (const c of [...survivors, late]) {
    c.got = [];
    c.frames = 0;
  }
  expected.set(roomA, []);
  expected.set(roomB, []);
  for (const c of [a[1], late]) send(c, seq++, 32);
  const joined = [a[1], a[2], late, b[0]];
  await Promise.all(joined.map((c) => c.until(complete(c))));
  await sleep(300);
  verify(joined, expected, "after a join");

  if (stall) {
    // Phase 5: a1 stops reading while late sends STALL_COUNT messages of ~1 KiB.
    for (const c of joined) {
      c.got = [];
      c.frames = 0;
    }
    expected.set(roomA, []);
    a[1].ws._socket.pause();
    for (let i = 0; i < STALL_COUNT; i++) send(late, seq++, 1000);
    const readers = [a[2], late];
    await Promise.all(readers.map((c) => c.until(complete(c), 3 * TIMEOUT_MS)));
    await sleep(1000);
    const before = a[1].got.length;
    a[1].ws._socket.resume();
    await a[1].until(complete(a[1]), 3 * TIMEOUT_MS);
    await sleep(300);
    console.log(`  (a1 had ${before} of ${STALL_COUNT} messages while it was not reading)`);
    verify([...readers, a[1]], expected, "stalled reader");
  }

  for (const c of [...survivors, late]) c.ws.close(1000);
  await sleep(100);
}

const guard = setTimeout(() => {
  console.error(`FAIL ${name}: the check did not finish in ${((stall ? 10 : 3) * TIMEOUT_MS) / 1000} s`);
  process.exit(1);
}, (stall ? 10 : 3) * TIMEOUT_MS);

main()
  .then(() => {
    clearTimeout(guard);
    if (failures.length) {
      for (const f of failures) console.error(`  FAIL ${f}`);
      console.error(`FAIL ${name}: ${failures.length} problem(s)`);
      process.exit(1);
    }
    console.log(`PASS ${name}`);
    process.exit(0);
  })
  .catch((err) => {
    console.error(`FAIL ${name}: ${err.message}`);
    process.exit(1);
  });

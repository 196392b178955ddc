// Capacity check for a /ws peer: node bench/peers/capacity.mjs PORT N [PID]
//
// Opens N connections spread over rooms of 100, sends one message per room once all are up,
// checks that every connection got its room's message, then drops half of them abruptly and
// closes the rest cleanly, and checks that the server still serves a new connection. With the
// server's PID it reports the server's RSS before and with the N connections. Bounded in time
// (120 s), loopback only. Not a benchmark: `confab bench` is the load generator.
import { readFileSync } from "node:fs";
import { WebSocket } from "ws";

const [port, n, pid] = process.argv.slice(2).map(Number);
if (!port || !n) {
  console.error("usage: node capacity.mjs PORT N [PID]");
  process.exit(2);
}
const ROOM_SIZE = 100;
const tag = Math.random().toString(36).slice(2, 8);
const rssKb = () => (pid ? Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) : NaN);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
setTimeout(() => {
  console.error("FAIL: did not finish in 120 s");
  process.exit(1);
}, 120_000).unref();

function open(room) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?room=${room}`, { perMessageDeflate: false });
    ws.got = [];
    ws.on("open", () => resolve(ws));
    ws.on("error", reject);
    ws.on("message", (data) => ws.got.push(...data.toString().split("\n")));
  });
}

const before = rssKb();
const started = Date.now();
const conns = [];
for (let i = 0; i < n; i += 500) {
  const batch = [];
  for (let j = i; j < Math.min(n, i + 500); j++) batch.push(open(`cap-${tag}-${Math.floor(j / ROOM_SIZE)}`));
  conns.push(...(await Promise.all(batch)));
}
const connectMs = Date.now() - started;
await sleep(500);
const held = rssKb();
console.log(`${n} connections up in ${connectMs} ms`);
if (pid) {
  console.log(`server RSS: ${before} KiB before, ${held} KiB with them: ${((held - before) / n).toFixed(2)} KiB per connection`);
}

for (let i = 0; i < n; i += ROOM_SIZE) conns[i].send(`hello-${i / ROOM_SIZE}`);
const deadline = Date.now() + 30_000;
const missing = () => conns.filter((ws, i) => !ws.got.includes(`hello-${Math.floor(i / ROOM_SIZE)}`)).length;
while (missing() > 0 && Date.now() < deadline) await sleep(100);
const lost = missing();
const extra = conns.filter((ws) => ws.got.length !== 1).length;
console.log(`one message per room: ${n - lost}/${n} delivered, ${extra} connections got other than exactly one`);

conns.forEach((ws, i) => (i % 2 ? ws.terminate() : ws.close(1000)));
await sleep(2000);
const probe = await open(`cap-${tag}-probe`);
probe.send("probe");
while (!probe.got.includes("probe") && Date.now() < deadline + 5000) await sleep(50);
const alive = probe.got.includes("probe");
probe.terminate();
console.log(alive ? "server still serves after the disconnects" : "server does not serve after the disconnects");
const ok = lost === 0 && extra === 0 && alive;
console.log(ok ? "PASS" : "FAIL");
process.exit(ok ? 0 : 1);

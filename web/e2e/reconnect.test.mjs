// The page survives the server going away: it reconnects by itself, shows every message it
// missed exactly once, and sends what was typed while offline exactly once.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Server, launch, signUp, openAs, WAIT, SHOTS } from "./harness.mjs";

let server;
let browser;
let ann;
let bobToken;

before(async () => {
  // bob posts hundreds of messages through REST below; lift the per-user rate limit for it.
  server = await Server.start({ CONFAB_MESSAGE_RATE: "100000", CONFAB_MESSAGE_BURST: "100000" });
  browser = await launch();
  ann = await signUp(browser, server, "ann");
  ({ token: bobToken } = await server.api("POST", "/api/register", { body: { username: "bob", password: "bob-password" } }));
  await server.api("POST", "/api/rooms/general/join", { token: bobToken });
});

after(async () => {
  await browser?.close();
  await server?.close();
  assert.deepEqual(ann?.problems ?? [], [], "ann's page");
});

async function bobSays(content) {
  await server.api("POST", "/api/rooms/general/messages", { token: bobToken, body: { content } });
}

/** The seqs of the confirmed messages on ann's page, in page order. */
async function shownSeqs(page) {
  return page.locator("#messages .msg[data-seq]").evaluateAll((nodes) => nodes.map((n) => Number(n.dataset.seq)));
}

async function sent(page, text) {
  const input = page.getByLabel("Message", { exact: true });
  await input.fill(text);
  await input.press("Enter");
}

for (const [signal, what] of [["SIGKILL", "a crash"], ["SIGTERM", "a graceful restart"]]) {
  test(`after ${what}: every missed message once, offline messages sent once`, async () => {
    const { page } = ann;
    const tag = signal.toLowerCase();
    await bobSays(`${tag}: before`);
    await page.locator("#messages .msg", { hasText: `${tag}: before` }).waitFor({ timeout: WAIT });

    await server.stop(signal);
    await page.locator("#offline-banner", { hasText: "Connection lost" }).waitFor({ timeout: WAIT });
    // Typed while offline: shown at once as pending, kept for later.
    await sent(page, `${tag}: typed offline 1`);
    await sent(page, `${tag}: typed offline 2`);
    await page.locator("#messages .msg.pending", { hasText: `${tag}: typed offline 2` }).waitFor({ timeout: WAIT });
    if (signal === "SIGKILL") await page.screenshot({ path: join(SHOTS, "reconnecting.png") });

    await server.boot();
    // Sent meanwhile by someone else, through the REST API.
    for (let i = 1; i <= 5; i++) await bobSays(`${tag}: missed ${i}`);

    await page.locator("#conn-status[data-state=online]").waitFor({ timeout: 40_000 });
    for (let i = 1; i <= 5; i++) {
      await page.locator("#messages .msg[data-seq]", { hasText: `${tag}: missed ${i}` }).waitFor({ timeout: WAIT });
    }
    for (const n of [1, 2]) {
      await page.locator("#messages .msg[data-seq]", { hasText: `${tag}: typed offline ${n}` }).waitFor({ timeout: WAIT });
    }
    assert.equal(await page.locator("#messages .msg.pending, #messages .msg.failed").count(), 0);
    await bobSays(`${tag}: live again`);
    await page.locator("#messages .msg", { hasText: `${tag}: live again` }).waitFor({ timeout: WAIT });

    // Once each, in order, with no gap: the page shows exactly what the server stored.
    const { messages } = await server.api("GET", "/api/rooms/general/messages?limit=500", { token: bobToken });
    const seqs = await shownSeqs(page);
    assert.deepEqual(seqs, messages.map((m) => m.seq));
    for (const m of messages) {
      assert.equal(await page.locator("#messages .msg", { hasText: m.content }).count(), 1, m.content);
    }
    // The offline messages were stored once each (the server saw each client_id once).
    assert.equal(messages.filter((m) => m.content.startsWith(`${tag}: typed offline`)).length, 2);
  });
}

test("messages queued offline survive a reload of the page", async () => {
  const { page } = ann;
  await server.stop("SIGKILL");
  await page.locator("#offline-banner", { hasText: "Connection lost" }).waitFor({ timeout: WAIT });
  await sent(page, "written before the reload");
  await page.locator("#messages .msg.pending", { hasText: "written before the reload" }).waitFor({ timeout: WAIT });
  await server.boot();
  await page.reload();
  await page.locator("#messages .msg[data-seq]", { hasText: "written before the reload" }).waitFor({ timeout: WAIT });
  const { messages } = await server.api("GET", "/api/rooms/general/messages?limit=500", { token: bobToken });
  assert.equal(messages.filter((m) => m.content === "written before the reload").length, 1);
});

test("more than a page missed (over 500 messages): all fetched, in order, once", async () => {
  const { page } = ann;
  await server.stop("SIGKILL");
  await page.locator("#offline-banner", { hasText: "Connection lost" }).waitFor({ timeout: WAIT });
  await server.boot();
  const before = (await shownSeqs(page)).length;
  await Promise.all(Array.from({ length: 4 }, async (_, worker) => {
    for (let i = worker; i < 620; i += 4) await bobSays(`bulk ${i}`);
  }));
  await page.locator("#conn-status[data-state=online]").waitFor({ timeout: 40_000 });
  await page.waitForFunction((n) => document.querySelectorAll("#messages .msg[data-seq]").length >= n, before + 620, { timeout: WAIT });
  const seqs = await shownSeqs(page);
  const first = seqs[0];
  assert.deepEqual(seqs, seqs.map((_, i) => first + i), "consecutive seqs, no duplicates");
  assert.equal(seqs.length, before + 620);
});

test("a fresh page shows the newest messages and loads older ones when scrolled to the top", async () => {
  const { context, page } = await openAs(browser, server, ann, { viewport: { width: 1000, height: 700 } });
  await page.locator("#messages .msg", { hasText: "bulk 619" }).waitFor({ timeout: WAIT });
  assert.equal((await shownSeqs(page)).length, 50, "one page to start with");
  const { messages } = await server.api("GET", "/api/rooms/general/messages?limit=1", { token: bobToken });
  const newest = messages[0].seq;
  // Scroll up until the start of the room.
  while (!(await page.locator("#messages .older", { hasText: "beginning" }).count())) {
    await page.locator("#messages").evaluate((box) => box.scrollTo(0, 0));
    await page.waitForTimeout(50);
  }
  const seqs = await shownSeqs(page);
  assert.deepEqual(seqs, Array.from({ length: newest }, (_, i) => i + 1));
  await context.close();
});

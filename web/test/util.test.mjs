// Unit tests for the browser client's pure helpers: `node --test web/test`.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay, linkify, continuesGroup, initials, dmPeerName, typingText, tokenPayload,
  contiguousTop, newClientId,
} from "../app/js/util.js";

test("backoff doubles from 1 s to a 30 s cap, with jitter in the upper half", () => {
  const low = (n) => backoffDelay(n, () => 0);
  const high = (n) => backoffDelay(n, () => 1);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 40].map(high), [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
  assert.deepEqual([0, 1, 5].map(low), [500, 1000, 15000]);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(3);
    assert.ok(d >= 4000 && d <= 8000, `${d}`);
  }
});

test("linkify makes only http(s) URLs links and keeps everything else as text", () => {
  assert.deepEqual(linkify("see https://example.com/a?b=1, then"), [
    { text: "see " }, { text: "https://example.com/a?b=1", href: "https://example.com/a?b=1" }, { text: ", then" },
  ]);
  assert.deepEqual(linkify("javascript:alert(1) <b>x</b>"), [{ text: "javascript:alert(1) <b>x</b>" }]);
  assert.deepEqual(linkify("(https://en.wikipedia.org/wiki/Rust_(language))."), [
    { text: "(" },
    { text: "https://en.wikipedia.org/wiki/Rust_(language)", href: "https://en.wikipedia.org/wiki/Rust_(language)" },
    { text: ")." },
  ]);
  assert.deepEqual(linkify('x "https://a.example/"><img src=x>'), [
    { text: 'x "' }, { text: "https://a.example/", href: "https://a.example/" }, { text: '"><img src=x>' },
  ]);
  assert.deepEqual(linkify("http://"), [{ text: "http://" }]);
});

test("messages group by author within five minutes", () => {
  const m = (id, t) => ({ user: { id }, timestamp: new Date(Date.UTC(2026, 0, 1, 12, 0, t)).toISOString() });
  assert.equal(continuesGroup(m("a", 0), m("a", 30)), true);
  assert.equal(continuesGroup(m("a", 0), m("b", 30)), false);
  assert.equal(continuesGroup(m("a", 0), { ...m("a", 0), timestamp: "2026-01-01T12:06:00.000Z" }), false);
  assert.equal(continuesGroup(undefined, m("a", 0)), false);
});

test("names, DM titles and typing lines", () => {
  assert.equal(initials("ann"), "AN");
  assert.equal(initials("ann lee"), "AL");
  assert.equal(dmPeerName("ann, bob", "ann"), "bob");
  assert.equal(dmPeerName("ann, bob", "bob"), "ann");
  assert.equal(typingText([]), "");
  assert.equal(typingText(["bob"]), "bob is typing…");
  assert.equal(typingText(["bob", "ann"]), "bob and ann are typing…");
  assert.equal(typingText(["a", "b", "c"]), "3 people are typing…");
});

test("token payloads and contiguous seqs", () => {
  const body = Buffer.from(JSON.stringify({ sub: "u1", exp: 42 })).toString("base64url");
  assert.deepEqual(tokenPayload(`x.${body}.y`), { sub: "u1", exp: 42 });
  assert.equal(tokenPayload("garbage"), null);
  assert.equal(contiguousTop(3, new Set([4, 5, 7])), 5);
  assert.equal(contiguousTop(0, new Set()), 0);
});

test("client ids are UUIDv7s that sort by time", () => {
  const shape = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
  assert.match(newClientId(), shape);
  // The millisecond timestamp leads: 0x018f_1c2d_3e4f.
  assert.ok(newClientId(0x018f1c2d3e4f).startsWith("018f1c2d-3e4f-7"));
  const ids = [];
  for (let ms = 1_700_000_000_000; ms < 1_700_000_000_000 + 5_000; ms += 7) ids.push(newClientId(ms));
  assert.deepEqual([...ids].sort(), ids);
  assert.equal(new Set(ids).size, ids.length);
});

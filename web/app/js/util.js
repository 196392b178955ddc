// Pure helpers with no DOM or network: unit-tested with `node --test web/test`.

/** Reconnect delay for the given attempt (0-based): 1 s doubling up to 30 s, with jitter so a
 * server restart is not met by every client at the same instant. "Equal jitter": half the
 * step is fixed, half random, so the delay still grows but clients spread out. */
export function backoffDelay(attempt, random = Math.random) {
  const step = Math.min(30_000, 1000 * 2 ** Math.min(attempt, 15));
  return Math.round(step / 2 + random() * (step / 2));
}

/** A fresh idempotency key, laid out as a UUIDv7: the time in milliseconds first, then random
 * bits. The server files a user's keys in `client_id` order, so keys that grow with time go
 * to the end of the user's part of its key table, a page or two for many messages; random
 * ones (UUIDv4) each land on a page of their own, and durable throughput fell 2.5-fold with
 * them (BENCHMARKS.md, 2026-12-02 evening). `getRandomValues` exists in every context, secure
 * or not (confab is often reached over plain http on a LAN). `now` is for tests. */
export function newClientId(now = Date.now()) {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  // 48-bit big-endian timestamp.
  let ms = Math.max(0, Math.floor(now));
  for (let i = 5; i >= 0; i--) {
    b[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

/** Splits message text into plain and link parts. Only http(s) URLs become links, so no
 * `javascript:` or `data:` URL can ever be made clickable; trailing punctuation that usually
 * ends a sentence stays text. The caller renders parts with textContent, never innerHTML. */
export function linkify(text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    let url = match[0];
    // Drop sentence punctuation and unbalanced closing brackets from the end.
    while (/[.,;:!?)\]}]$/.test(url)) {
      const close = url.at(-1);
      const open = { ")": "(", "]": "[", "}": "{" }[close];
      if (open && count(url, open) >= count(url, close)) break;
      url = url.slice(0, -1);
    }
    if (url.length < 9) continue;
    if (match.index > last) parts.push({ text: text.slice(last, match.index) });
    parts.push({ text: url, href: url });
    last = match.index + url.length;
  }
  if (last < text.length) parts.push({ text: text.slice(last) });
  return parts;
}

function count(s, ch) {
  let n = 0;
  for (const c of s) if (c === ch) n++;
  return n;
}

/** Messages from the same author within this window share one header. */
export const GROUP_WINDOW_MS = 5 * 60 * 1000;

/** Whether `msg` continues the group `prev` started (same author, same day, close in time). */
export function continuesGroup(prev, msg) {
  if (!prev || prev.user.id !== msg.user.id) return false;
  const a = Date.parse(prev.timestamp);
  const b = Date.parse(msg.timestamp);
  return sameDay(a, b) && b - a >= 0 && b - a < GROUP_WINDOW_MS;
}

/** Same calendar day in the viewer's time zone. */
export function sameDay(a, b) {
  const x = new Date(a);
  const y = new Date(b);
  return x.getFullYear() === y.getFullYear() && x.getMonth() === y.getMonth() && x.getDate() === y.getDate();
}

/** "14:05" in the viewer's locale. */
export function formatTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** "Today", "Yesterday" or a date, for day separators. */
export function formatDay(ms, now = Date.now()) {
  if (sameDay(ms, now)) return "Today";
  if (sameDay(ms, now - 86_400_000)) return "Yesterday";
  return new Date(ms).toLocaleDateString([], { weekday: "short", month: "short", day: "numeric", year: "numeric" });
}

/** Up to two letters for an avatar. */
export function initials(name) {
  const words = name.trim().split(/[\s._-]+/).filter(Boolean);
  const letters = words.length > 1 ? words[0][0] + words[1][0] : [...(words[0] ?? "?")].slice(0, 2).join("");
  return letters.toUpperCase();
}

/** A stable colour per user id, so the same person looks the same everywhere. */
export function colorFor(id) {
  let h = 0;
  for (const c of id) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 55% 45%)`;
}

/** A DM room's name is "<name>, <name>"; show the other person. */
export function dmPeerName(roomName, myName) {
  const names = roomName.split(", ");
  if (names.length !== 2) return roomName;
  return names[0] === myName ? names[1] : names[0];
}

/** "bob is typing…", "bob and ann are typing…", "3 people are typing…". */
export function typingText(names) {
  if (names.length === 0) return "";
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return `${names.length} people are typing…`;
}

/** Reads a JWT's payload without verifying it (the server verifies): used only to notice an
 * expired token before using it. */
export function tokenPayload(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

/** The highest seq S such that every seq from `from` to S is in `seqs` (a Set or Map), starting
 * from a known-contiguous `from`. What a reconnect resumes from with `since`. */
export function contiguousTop(from, seqs) {
  let top = from;
  while (seqs.has(top + 1)) top++;
  return top;
}

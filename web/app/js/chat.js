// The chat's state and everything that changes it: rooms, messages, members, typing, read
// positions and the outbox of messages not yet acknowledged. The view (view.js) only reads it.

import { call, roomPath, ApiError } from "./api.js";
import { Connection, CommandError, Disconnected } from "./connection.js";
import { contiguousTop, newClientId } from "./util.js";

/** Typing indicators we have not heard a refresh for are dropped after this (the server
 * clears them at 5 s and tells us; this only covers a lost `false`). */
const TYPING_STALE_MS = 7_000;
/** While typing we refresh the indicator this often; after this long without a key we stop. */
const TYPING_REFRESH_MS = 2_500;
const TYPING_IDLE_MS = 3_000;
/** Hidden this long, the tab reports itself away. */
const AWAY_AFTER_MS = 60_000;
/** The room list is re-read this often (and after every reconnect) to pick up rooms created
 * by others; rooms we are added to are also announced over the socket. */
const ROOMS_REFRESH_MS = 60_000;
/** Older history pages. */
const PAGE = 50;

/** One room as this tab knows it. */
export class Room {
  constructor(summary) {
    this.id = summary.id;
    this.info = summary;
    this.member = summary.member ?? true;
    this.lastSeq = summary.last_seq ?? 0;
    this.readSeq = summary.read_seq ?? 0;
    /** seq -> ChatMessage, as delivered (history pages and live events merged). */
    this.messages = new Map();
    /** Lowest seq loaded; older pages extend it downwards. */
    this.bottom = null;
    /** Highest seq up to which we hold every message from `bottom`: what `since` resumes from. */
    this.top = 0;
    this.hasOlder = false;
    this.loadingOlder = false;
    /** The `join` in flight, if any. */
    this.joining = null;
    /** Joined once in this tab (we have its recent history). */
    this.loaded = false;
    /** Joined on the current connection (we receive its live events). */
    this.subscribed = false;
    /** user id -> {id, name, readSeq} */
    this.members = new Map();
    /** user id -> {name, until} */
    this.typing = new Map();
    /** Inline join/leave notices: {afterSeq, text, at} */
    this.notices = [];
  }

  get unread() {
    return this.member ? Math.max(0, this.lastSeq - this.readSeq) : 0;
  }

  /** Messages oldest first. */
  sorted() {
    return [...this.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  insert(message) {
    this.messages.set(message.seq, message);
    if (this.bottom === null || message.seq < this.bottom) this.bottom = message.seq;
    if (message.seq > this.lastSeq) this.lastSeq = message.seq;
  }
}

/** The signed-in client: owns the connection and all state; calls `onChange(parts)` so the
 * view can redraw what changed. */
export class Chat {
  constructor({ token, user, onChange, onSignedOut }) {
    this.token = token;
    this.me = user;
    this.onChange = onChange;
    this.onSignedOut = onSignedOut;
    /** room id -> Room */
    this.rooms = new Map();
    /** user id -> "online" | "away" | "offline" */
    this.presence = new Map();
    this.active = null;
    this.connState = "connecting";
    this.retryAt = 0;
    this.everConnected = false;
    this.outboxKey = `confab.outbox.${user.id}`;
    /** client_id -> {clientId, room, content, at, state: queued|sending|failed, error} */
    this.outbox = new Map();
    for (const item of readJson(this.outboxKey, [])) {
      this.outbox.set(item.clientId, { ...item, state: "queued", error: null });
    }
    this.flushing = false;
    this.typingSentAt = 0;
    this.typingRoom = null;
    this.typingIdle = null;
    this.awayTimer = null;
    this.status = "online";
    this.timers = [];
    this.conn = new Connection({
      url: () => {
        const proto = location.protocol === "https:" ? "wss:" : "ws:";
        return `${proto}//${location.host}/ws?token=${encodeURIComponent(this.token)}`;
      },
      onEvent: (e) => this.handleEvent(e),
      onState: (state, retryAt) => {
        this.connState = state;
        this.retryAt = retryAt;
        this.changed("conn");
      },
      onOpen: () => this.connected(),
      onClose: () => this.disconnected(),
      checkAuth: () => this.tokenStillValid(),
    });
  }

  // ---- lifecycle ------------------------------------------------------------------------

  async start(initialRoom) {
    this.active = initialRoom;
    try {
      await this.refreshRooms();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return this.signOut();
    }
    if (!this.rooms.has(this.active)) this.active = this.defaultRoom();
    this.changed("all");
    this.conn.start();
    this.timers.push(setInterval(() => this.expireTyping(), 1000));
    this.timers.push(setInterval(() => this.refreshRooms().catch(() => {}), ROOMS_REFRESH_MS));
    this.onVisibility = () => this.visibilityChanged();
    document.addEventListener("visibilitychange", this.onVisibility);
    this.onOnline = () => this.conn.reconnectNow();
    window.addEventListener("online", this.onOnline);
    // Coming back to the tab is when a stale room list would be noticed.
    this.onFocus = () => this.refreshRooms().catch(() => {});
    window.addEventListener("focus", this.onFocus);
  }

  stop() {
    this.conn.stop();
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.typingIdle);
    clearTimeout(this.awayTimer);
    document.removeEventListener("visibilitychange", this.onVisibility);
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("focus", this.onFocus);
  }

  signOut() {
    this.stop();
    localStorage.removeItem(this.outboxKey);
    this.onSignedOut();
  }

  async tokenStillValid() {
    try {
      await this.api("GET", "/api/rooms");
      return true;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        this.signOut();
        return false;
      }
      return true;
    }
  }

  api(method, path, body) {
    return call(method, path, { token: this.token, body });
  }

  defaultRoom() {
    if (this.rooms.has("general") && this.rooms.get("general").member) return "general";
    const first = [...this.rooms.values()].find((r) => r.member);
    return first ? first.id : null;
  }

  changed(...parts) {
    this.onChange(new Set(parts));
  }

  // ---- rooms ----------------------------------------------------------------------------

  /** Re-reads the room list: new rooms, unread counts, memberships changed elsewhere. */
  async refreshRooms() {
    const { rooms } = await this.api("GET", "/api/rooms");
    const seen = new Set();
    for (const summary of rooms) {
      seen.add(summary.id);
      const room = this.rooms.get(summary.id);
      if (!room) {
        this.rooms.set(summary.id, new Room(summary));
        continue;
      }
      room.info = summary;
      room.member = summary.member;
      room.lastSeq = Math.max(room.lastSeq, summary.last_seq);
      room.readSeq = Math.max(room.readSeq, summary.read_seq);
    }
    for (const id of [...this.rooms.keys()]) {
      if (!seen.has(id)) this.forgetRoom(id);
    }
    // Rooms we became a member of elsewhere (another device, a DM opened by someone).
    if (this.conn.online) {
      for (const room of this.rooms.values()) {
        if (room.member && !room.subscribed) this.joinRoom(room).catch(() => {});
      }
    }
    this.changed("rooms", "header");
  }

  forgetRoom(id) {
    this.rooms.delete(id);
    if (this.active === id) {
      this.active = this.defaultRoom();
      this.changed("all");
    }
  }

  /** Subscribes the room on the current connection, resuming from what we already hold.
   * Concurrent calls (a reconnect and a room-list refresh) share one `join`. */
  joinRoom(room) {
    if (!room.joining) {
      room.joining = this.sendJoin(room).finally(() => {
        room.joining = null;
      });
    }
    return room.joining;
  }

  async sendJoin(room) {
    const since = room.loaded ? room.top : undefined;
    const reply = await this.conn.request({ type: "join", room: room.id, since });
    room.subscribed = true;
    room.member = true;
    room.info = { ...room.info, ...reply.room };
    room.readSeq = Math.max(room.readSeq, reply.read_seq);
    this.setMembers(room, reply.members);
    // A big room lists only its first members in `joined`; the rest come from REST.
    if ((reply.member_count ?? 0) > reply.members.length) {
      this.api("GET", `${roomPath(room.id)}/members`)
        .then(({ members }) => {
          this.setMembers(room, members);
          this.changed("members", "header", "messages");
        })
        .catch(() => {});
    }
    for (const message of reply.messages) this.receive(message, false);
    if (since === undefined) {
      const page = reply.messages;
      room.hasOlder = reply.has_more;
      room.bottom = page.length ? page[0].seq : room.lastSeq + 1;
      room.top = page.length ? page.at(-1).seq : room.lastSeq;
    } else if (reply.has_more) {
      // More than a page missed: fetch the rest in order (live messages beyond it are already
      // arriving and are merged by seq).
      let after = reply.messages.at(-1).seq;
      for (;;) {
        const page = await this.conn.request({ type: "history", room: room.id, after, limit: 500 });
        for (const message of page.messages) this.receive(message, false);
        if (!page.has_more || page.messages.length === 0) break;
        after = page.messages.at(-1).seq;
      }
    }
    room.top = contiguousTop(room.top, room.messages);
    room.loaded = true;
    this.changed("rooms", "messages", "members", "header");
    return reply;
  }

  setMembers(room, members) {
    room.members = new Map(members.map((m) => [m.id, { id: m.id, name: m.name, readSeq: m.read_seq ?? 0 }]));
    for (const m of members) this.presence.set(m.id, m.status ?? (m.online ? "online" : "offline"));
  }

  /** Opens a room from the list: joining it first if we are not a member (public rooms). */
  async openRoom(id) {
    this.setTyping(false);
    this.active = id;
    const room = this.rooms.get(id);
    this.changed("all");
    if (room && !room.subscribed && this.conn.online) {
      try {
        await this.joinRoom(room);
      } catch (err) {
        this.changed("all");
        throw err;
      }
    }
  }

  async createRoom(name, isPrivate) {
    const { room } = await this.api("POST", "/api/rooms", { name, private: isPrivate });
    this.rooms.set(room.id, new Room({ ...room, member: true, last_seq: 0, read_seq: 0 }));
    await this.openRoom(room.id);
  }

  async openDm(username) {
    const { room } = await this.api("POST", `/api/dm/${encodeURIComponent(username)}`);
    if (!this.rooms.has(room.id)) {
      this.rooms.set(room.id, new Room({ ...room, member: true, last_seq: 0, read_seq: 0 }));
    }
    await this.openRoom(room.id);
  }

  /** Ends membership (REST leave); the server tells every session with a `left`. */
  async leaveRoom(id) {
    await this.api("POST", `${roomPath(id)}/leave`);
    this.lostRoom(id);
  }

  /** Adds someone to the room (how private rooms get members). */
  async addMember(id, username) {
    await this.api("POST", `${roomPath(id)}/members`, { username });
  }

  lostRoom(id) {
    const room = this.rooms.get(id);
    if (!room) return;
    room.subscribed = false;
    room.member = false;
    room.typing.clear();
    if (room.info.private || room.info.dm) this.rooms.delete(id);
    if (this.active === id) this.active = this.defaultRoom();
    this.changed("all");
  }

  async loadOlder(room) {
    if (!room.hasOlder || room.loadingOlder || !this.conn.online) return;
    room.loadingOlder = true;
    try {
      const page = await this.conn.request({ type: "history", room: room.id, before: room.bottom, limit: PAGE });
      for (const message of page.messages) this.receive(message, false);
      room.hasOlder = page.has_more;
      if (page.messages.length) room.bottom = Math.min(room.bottom, page.messages[0].seq);
      else room.hasOlder = false;
      this.changed("older");
    } finally {
      room.loadingOlder = false;
    }
  }

  // ---- the connection -------------------------------------------------------------------

  async connected() {
    this.everConnected = true;
    if (this.status === "away") this.conn.send({ type: "status", status: "away" });
    try {
      await this.refreshRooms();
    } catch {
      // The socket works; the list will be refreshed later.
    }
    const joins = [...this.rooms.values()].filter((r) => r.member && !r.subscribed).map((r) => this.joinRoom(r).catch(() => {}));
    if (this.active && this.rooms.has(this.active) && !this.rooms.get(this.active).member) {
      joins.push(this.joinRoom(this.rooms.get(this.active)).catch(() => {}));
    }
    await Promise.all(joins);
    this.flushOutbox();
  }

  disconnected() {
    for (const room of this.rooms.values()) {
      room.subscribed = false;
      room.typing.clear();
    }
    for (const item of this.outbox.values()) if (item.state === "sending") item.state = "queued";
    this.typingSentAt = 0;
    this.changed("all");
  }

  handleEvent(e) {
    switch (e.type) {
      case "message":
        return this.receive(e, true);
      case "user_joined":
      case "user_left":
        return this.presenceNotice(e);
      case "typing":
        return this.typingEvent(e);
      case "read":
        return this.readEvent(e);
      case "presence":
        this.presence.set(e.user.id, e.status);
        return this.changed("members", "header");
      case "left":
        return this.lostRoom(e.room);
      case "room_added":
        return this.refreshRooms().catch(() => {});
      default:
        return undefined;
    }
  }

  receive(message, live) {
    const room = this.rooms.get(message.room);
    if (!room) return;
    const known = room.messages.has(message.seq);
    room.insert(message);
    if (message.user.id === this.me.id && message.client_id && this.outbox.has(message.client_id)) {
      this.outbox.delete(message.client_id);
      this.saveOutbox();
    }
    if (!live) return;
    room.top = contiguousTop(room.top, room.messages);
    room.typing.delete(message.user.id);
    if (!known && message.user.id === this.me.id) room.readSeq = Math.max(room.readSeq, message.seq);
    this.changed("messages", "rooms", "typing");
  }

  presenceNotice(e) {
    const room = this.rooms.get(e.room);
    if (!room) return;
    if (e.type === "user_joined") {
      if (!room.members.has(e.user.id)) room.members.set(e.user.id, { id: e.user.id, name: e.user.name, readSeq: 0 });
      this.presence.set(e.user.id, e.status);
    } else {
      room.typing.delete(e.user.id);
    }
    if (e.user.id !== this.me.id) {
      const verb = e.type === "user_joined" ? "joined" : "left";
      room.notices.push({ afterSeq: room.lastSeq, text: `${e.user.name} ${verb}`, at: Date.now() });
    }
    this.changed("messages", "members", "header", "typing");
  }

  typingEvent(e) {
    const room = this.rooms.get(e.room);
    if (!room || e.user.id === this.me.id) return;
    if (e.is_typing) room.typing.set(e.user.id, { name: e.user.name, until: Date.now() + TYPING_STALE_MS });
    else room.typing.delete(e.user.id);
    this.changed("typing");
  }

  expireTyping() {
    const now = Date.now();
    let any = false;
    for (const room of this.rooms.values()) {
      for (const [id, t] of room.typing) {
        if (t.until < now) {
          room.typing.delete(id);
          any = true;
        }
      }
    }
    if (any) this.changed("typing");
  }

  readEvent(e) {
    const room = this.rooms.get(e.room);
    if (!room) return;
    const member = room.members.get(e.user.id);
    if (member) member.readSeq = Math.max(member.readSeq, e.seq);
    if (e.user.id === this.me.id) room.readSeq = Math.max(room.readSeq, e.seq);
    this.changed("messages", "rooms");
  }

  // ---- sending ----------------------------------------------------------------------------

  /** Queues a message (shown at once as pending) and sends it when connected. */
  send(content) {
    const room = this.active;
    if (!room || !content.trim()) return;
    this.setTyping(false);
    const item = { clientId: newClientId(), room, content, at: Date.now(), state: "queued", error: null };
    this.outbox.set(item.clientId, item);
    this.saveOutbox();
    this.changed("messages");
    if (!this.flushing) this.flushOutbox();
  }

  retry(clientId) {
    const item = this.outbox.get(clientId);
    if (!item) return;
    item.state = "queued";
    item.error = null;
    this.changed("messages");
    if (!this.flushing) this.flushOutbox();
  }

  discard(clientId) {
    this.outbox.delete(clientId);
    this.saveOutbox();
    this.changed("messages");
  }

  /** Sends queued messages one after another, oldest first, each with its client_id: the
   * server stores a client_id once, so a message that reached it before a disconnect is not
   * stored twice. Waiting for each ack keeps order and stays under the rate limit. */
  async flushOutbox() {
    if (this.flushing) return;
    this.flushing = true;
    try {
      for (;;) {
        if (!this.conn.online) return;
        const item = [...this.outbox.values()].filter((i) => i.state === "queued").sort((a, b) => a.at - b.at)[0];
        if (!item) return;
        const room = this.rooms.get(item.room);
        if (!room || !room.member) {
          item.state = "failed";
          item.error = "you are not a member of this room";
          this.changed("messages");
          continue;
        }
        if (!room.subscribed) {
          try {
            await this.joinRoom(room);
          } catch (err) {
            if (err instanceof Disconnected) return;
          }
        }
        await this.transmit(item);
      }
    } finally {
      this.flushing = false;
    }
  }

  async transmit(item) {
    item.state = "sending";
    this.changed("messages");
    try {
      const ack = await this.conn.request({ type: "message", room: item.room, content: item.content, client_id: item.clientId });
      this.acked(item, ack);
    } catch (err) {
      if (err instanceof CommandError && err.code === "rate_limited") {
        item.state = "queued";
        await sleep(1000);
      } else if (err instanceof CommandError) {
        item.state = "failed";
        item.error = err.message;
      } else if (err instanceof Disconnected) {
        item.state = "queued";
      } else {
        item.state = "failed";
        item.error = "no answer from the server";
      }
      this.changed("messages");
    }
  }

  acked(item, ack) {
    const room = this.rooms.get(item.room);
    if (this.outbox.delete(item.clientId)) this.saveOutbox();
    if (room && !room.messages.has(ack.seq)) {
      // Shown confirmed at once; the broadcast that follows replaces it with the server's copy.
      room.insert({
        id: ack.id, seq: ack.seq, room: item.room, user: this.me, content: item.content,
        client_id: item.clientId, timestamp: new Date().toISOString(),
      });
      room.top = contiguousTop(room.top, room.messages);
    }
    if (room) room.readSeq = Math.max(room.readSeq, ack.seq);
    this.changed("messages", "rooms");
  }

  saveOutbox() {
    const items = [...this.outbox.values()].map(({ clientId, room, content, at }) => ({ clientId, room, content, at }));
    localStorage.setItem(this.outboxKey, JSON.stringify(items));
  }

  pendingFor(roomId) {
    return [...this.outbox.values()].filter((i) => i.room === roomId).sort((a, b) => a.at - b.at);
  }

  // ---- typing, reading, status ------------------------------------------------------------

  /** Called on every keystroke in the composer. */
  typed(hasText) {
    if (!hasText) return this.setTyping(false);
    const now = Date.now();
    if (now - this.typingSentAt > TYPING_REFRESH_MS || this.typingRoom !== this.active) this.setTyping(true);
    clearTimeout(this.typingIdle);
    this.typingIdle = setTimeout(() => this.setTyping(false), TYPING_IDLE_MS);
  }

  setTyping(on) {
    clearTimeout(this.typingIdle);
    const room = this.rooms.get(on ? this.active : this.typingRoom);
    if (!on && !this.typingSentAt) return;
    if (!room || !room.subscribed) {
      this.typingSentAt = 0;
      return;
    }
    if (this.conn.send({ type: "typing", room: room.id, is_typing: on })) {
      this.typingSentAt = on ? Date.now() : 0;
      this.typingRoom = on ? room.id : null;
    }
  }

  /** The view reports the newest seq the user has had on screen in the active room. */
  seen(roomId, seq) {
    const room = this.rooms.get(roomId);
    if (!room || !room.member || seq <= room.readSeq) return;
    room.readSeq = seq;
    this.conn.send({ type: "read", room: roomId, seq });
    this.changed("rooms");
  }

  visibilityChanged() {
    clearTimeout(this.awayTimer);
    if (document.visibilityState === "hidden") {
      this.awayTimer = setTimeout(() => this.setStatus("away"), AWAY_AFTER_MS);
    } else {
      this.setStatus("online");
      this.changed("messages");
    }
  }

  setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.conn.send({ type: "status", status });
  }

  get totalUnread() {
    let n = 0;
    for (const room of this.rooms.values()) n += room.unread;
    return n;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function readJson(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

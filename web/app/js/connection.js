// The WebSocket: one connection at a time, reconnecting by itself with backoff and jitter,
// request/reply matching by `ref`, and a liveness check the browser API does not give us.

import { backoffDelay } from "./util.js";

/** How often we ask the server for a `pong`, and how long we wait for it. A laptop waking
 * from sleep can hold a dead socket that the browser still calls open; this notices it. */
const PING_EVERY_MS = 30_000;
const PONG_WITHIN_MS = 10_000;

/** A command whose reply did not come in time (the socket is likely dead). */
export class RequestTimeout extends Error {}
/** The connection dropped before the reply came. */
export class Disconnected extends Error {}
/** The server answered the command with an `error` event. */
export class CommandError extends Error {
  constructor(reply) {
    super(reply.message);
    this.code = reply.code;
  }
}

/** States reported through `onState`: "connecting", "online", "waiting" (a retry is
 * scheduled at `retryAt`), "stopped". */
export class Connection {
  constructor({ url, onEvent, onState, onOpen, onClose, checkAuth }) {
    this.url = url;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onOpen = onOpen;
    this.onClose = onClose;
    this.checkAuth = checkAuth;
    this.ws = null;
    this.attempt = 0;
    this.nextRef = 1;
    this.pending = new Map();
    this.timer = null;
    this.pingTimer = null;
    this.stopped = true;
    this.state = "stopped";
    this.retryAt = 0;
  }

  /** Opens the socket (and keeps reopening it) until `stop`. */
  start() {
    this.stopped = false;
    this.open();
  }

  /** Closes for good: logging out. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
    this.failPending(new Disconnected("stopped"));
    this.setState("stopped");
  }

  /** Skips the backoff wait (the browser said the network is back). */
  reconnectNow() {
    if (this.state === "waiting") {
      clearTimeout(this.timer);
      this.open();
    }
  }

  get online() {
    return this.state === "online";
  }

  /** Sends a command that has no reply (typing, read, status). False if not connected. */
  send(command) {
    if (!this.online) return false;
    this.ws.send(JSON.stringify(command));
    return true;
  }

  /** Sends a command and resolves with its direct reply (matched by `ref`); rejects with
   * CommandError for an `error` reply, Disconnected or RequestTimeout. */
  request(command, timeoutMs = 20_000) {
    if (!this.online) return Promise.reject(new Disconnected("not connected"));
    const ref = this.nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new RequestTimeout(`no reply to ${command.type}`));
      }, timeoutMs);
      this.pending.set(ref, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...command, ref }));
    });
  }

  open() {
    if (this.stopped) return;
    this.setState("connecting");
    let greeted = false;
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onmessage = (e) => {
      if (ws !== this.ws) return;
      let event;
      try {
        event = JSON.parse(e.data);
      } catch {
        return;
      }
      if (event.type === "connected") {
        greeted = true;
        this.attempt = 0;
        this.setState("online");
        this.startPinging();
        this.onOpen(event);
        return;
      }
      if (event.ref != null && this.pending.has(event.ref)) {
        const waiter = this.pending.get(event.ref);
        this.pending.delete(event.ref);
        clearTimeout(waiter.timer);
        if (event.type === "error") waiter.reject(new CommandError(event));
        else waiter.resolve(event);
        return;
      }
      this.onEvent(event);
    };
    ws.onclose = (e) => this.dropped(ws, e.code, greeted);
  }

  /** The socket is gone (closed, or declared dead by the pong check): fail what waits on it,
   * tell the app, and schedule the next attempt. */
  async dropped(ws, code, greeted) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearInterval(this.pingTimer);
    this.failPending(new Disconnected(`closed (${code})`));
    if (this.stopped) return;
    this.onClose(code);
    // Refused before the greeting: maybe the token expired (the browser hides the 401).
    if (!greeted && this.checkAuth && !(await this.checkAuth())) return;
    this.scheduleRetry();
  }

  scheduleRetry() {
    if (this.stopped) return;
    const delay = backoffDelay(this.attempt++);
    this.retryAt = Date.now() + delay;
    this.setState("waiting");
    this.timer = setTimeout(() => this.open(), delay);
  }

  startPinging() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      const ws = this.ws;
      this.request({ type: "ping" }, PONG_WITHIN_MS).catch((err) => {
        if (err instanceof RequestTimeout && ws === this.ws) {
          ws.close(4000, "no pong");
          this.dropped(ws, 4000, true);
        }
      });
    }, PING_EVERY_MS);
  }

  failPending(err) {
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this.pending.clear();
  }

  setState(state) {
    this.state = state;
    this.onState(state, this.retryAt);
  }
}

// Shared helpers for the browser tests: a real `confab serve` process and Debian's Chromium
// driven by playwright-core.

import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** The binary under test: CONFAB_BIN, or the debug build `web/e2e/run.sh` makes. */
export const BINARY = process.env.CONFAB_BIN ?? join(repo, "target/debug/confab");

/** Where screenshots go: docs/screenshots when CONFAB_SCREENSHOTS=1 (to refresh the README's
 * pictures), a temporary folder otherwise so a test run leaves the tree clean. */
export const SHOTS = process.env.CONFAB_SCREENSHOTS === "1"
  ? join(repo, "docs/screenshots")
  : mkdtempSync(join(tmpdir(), "confab-shots-"));
mkdirSync(SHOTS, { recursive: true });

/** Everything we wait for in the page is event driven; this only bounds a broken run. */
export const WAIT = 15_000;

async function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.unref();
    s.on("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** A `confab serve` on its own port and data directory; `restart` keeps both. */
export class Server {
  static async start(env = {}) {
    const server = new Server(await freePort(), mkdtempSync(join(tmpdir(), "confab-e2e-")), env);
    await server.boot();
    return server;
  }

  constructor(port, dataDir, env) {
    this.port = port;
    this.dataDir = dataDir;
    this.env = env;
    this.base = `http://127.0.0.1:${port}`;
    this.proc = null;
    this.log = "";
  }

  async boot() {
    this.proc = spawn(BINARY, ["serve", "--data-dir", this.dataDir, "--addr", `127.0.0.1:${this.port}`], {
      env: { ...process.env, CONFAB_PRESENCE_GRACE_MS: "500", CONFAB_LOG: "warn", ...this.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc.stdout.on("data", (d) => (this.log += d));
    this.proc.stderr.on("data", (d) => (this.log += d));
    const deadline = Date.now() + WAIT;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`confab exited: ${this.log}`);
      try {
        const res = await fetch(`${this.base}/healthz`);
        if (res.ok) return;
      } catch {
        // not listening yet
      }
      await sleep(50);
    }
    throw new Error(`confab did not start: ${this.log}`);
  }

  /** Stops the process (SIGTERM: graceful, or SIGKILL: a crash) and waits for it to exit. */
  async stop(signal = "SIGTERM") {
    if (!this.proc || this.proc.exitCode !== null) return;
    const exited = new Promise((ok) => this.proc.once("exit", ok));
    this.proc.kill(signal);
    await exited;
  }

  async restart(signal = "SIGTERM") {
    await this.stop(signal);
    await this.boot();
  }

  async close() {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  /** A REST call as `token`. */
  async api(method, path, { token, body } = {}) {
    const res = await fetch(this.base + path, {
      method,
      headers: { ...(token ? { Authorization: `Bearer ${token}` } : {}), ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }
}

/** Debian's Chromium, never a downloaded one; flags as the machine notes require. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
  });
}

/** A person: their own browser context (own storage), signed up through the page itself. */
export async function signUp(browser, server, name, { viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" && !/WebSocket|ERR_CONNECTION_REFUSED|Failed to load resource/.test(msg.text())) {
      problems.push(`console: ${msg.text()}`);
    }
  });
  // The page must never reach outside its origin.
  page.on("request", (req) => {
    if (!req.url().startsWith(server.base) && !req.url().startsWith(server.base.replace("http", "ws"))) {
      problems.push(`external request: ${req.url()}`);
    }
  });
  await page.goto(server.base);
  const form = page.locator("#auth-form");
  await form.getByRole("tab", { name: "Create account" }).click();
  await form.getByLabel("Username").fill(name);
  await form.getByLabel("Password").fill(`${name}-password`);
  await form.getByRole("button", { name: "Create account", exact: true }).click();
  await page.locator("#conn-status[data-state=online]").waitFor({ timeout: WAIT });
  const token = await page.evaluate(() => localStorage.getItem("confab.token"));
  return { name, context, page, token, problems };
}

/** Another device of a signed-up person: a fresh browser context (its own storage) holding
 * that person's saved session, opened on the server's page. */
export async function openAs(browser, server, person, contextOptions) {
  const context = await browser.newContext(contextOptions);
  const user = await person.page.evaluate(() => localStorage.getItem("confab.user"));
  await context.addInitScript(([token, saved]) => {
    localStorage.setItem("confab.token", token);
    localStorage.setItem("confab.user", saved);
  }, [person.token, user]);
  const page = await context.newPage();
  await page.goto(server.base);
  return { context, page };
}

/** The message bubbles of the open room (confirmed ones carry their seq). */
export function messages(page) {
  return page.locator("#messages .msg");
}

export function sleep(ms) {
  return new Promise((ok) => setTimeout(ok, ms));
}

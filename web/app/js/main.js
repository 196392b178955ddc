// Entry point: sign-in screen, or the chat when a saved token is still valid.

import { call, ApiError } from "./api.js";
import { Chat } from "./chat.js";
import { View } from "./view.js";
import { tokenPayload } from "./util.js";

const TOKEN_KEY = "confab.token";
const USER_KEY = "confab.user";
const $ = (id) => document.getElementById(id);

const view = new View();
let chat = null;
let mode = "login";

function savedSession() {
  const token = localStorage.getItem(TOKEN_KEY);
  let user = null;
  try {
    user = JSON.parse(localStorage.getItem(USER_KEY));
  } catch {
    user = null;
  }
  const payload = token && tokenPayload(token);
  // Expired (or about to): sign in again rather than fail on the first request.
  if (!payload || !user || payload.exp * 1000 < Date.now() + 60_000) return null;
  return { token, user };
}

function showAuth(message = "") {
  $("app").hidden = true;
  $("auth").hidden = false;
  $("auth-error").textContent = message;
  $("auth-username").focus();
}

function startChat({ token, user }) {
  $("auth").hidden = true;
  $("app").hidden = false;
  chat = new Chat({
    token, user,
    onChange: (parts) => view.update(parts),
    onSignedOut: () => {
      forget();
      chat = null;
      showAuth("Your session has ended. Please sign in again.");
    },
  });
  view.attach(chat);
  const fromHash = decodeURIComponent(location.hash.slice(1));
  chat.start(fromHash || "general");
}

function forget() {
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(USER_KEY);
}

function setMode(next) {
  mode = next;
  $("tab-login").setAttribute("aria-selected", String(mode === "login"));
  $("tab-register").setAttribute("aria-selected", String(mode === "register"));
  $("auth-submit").textContent = mode === "login" ? "Sign in" : "Create account";
  $("auth-password").autocomplete = mode === "login" ? "current-password" : "new-password";
  $("auth-error").textContent = "";
}

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => setMode(tab.dataset.mode));
}

$("auth-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const username = $("auth-username").value.trim();
  const password = $("auth-password").value;
  if (!username || !password) {
    $("auth-error").textContent = "Enter a username and a password.";
    return;
  }
  $("auth-submit").disabled = true;
  try {
    const path = mode === "login" ? "/api/login" : "/api/register";
    const { token, user } = await call("POST", path, { body: { username, password } });
    localStorage.setItem(TOKEN_KEY, token);
    localStorage.setItem(USER_KEY, JSON.stringify(user));
    $("auth-password").value = "";
    startChat({ token, user });
  } catch (err) {
    $("auth-error").textContent = err instanceof ApiError ? err.message : String(err);
  } finally {
    $("auth-submit").disabled = false;
  }
});

$("logout").addEventListener("click", () => {
  chat?.signOut();
});

window.addEventListener("hashchange", () => {
  const id = decodeURIComponent(location.hash.slice(1));
  if (chat && id && id !== chat.active && chat.rooms.has(id)) chat.openRoom(id).catch(() => {});
});

const session = savedSession();
if (session) startChat(session);
else {
  forget();
  showAuth();
}

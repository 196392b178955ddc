// Drawing the chat and wiring the page's controls to it. Every piece of user text goes in
// with textContent (or as an attribute value), never as HTML.

import {
  linkify, continuesGroup, sameDay, formatTime, formatDay, initials, colorFor, dmPeerName,
  typingText,
} from "./util.js";

const $ = (id) => document.getElementById(id);

/** Creates an element: `el("div", {class: "x"}, child, "text")`. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v == null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** How close to the bottom (px) still counts as "at the newest message". */
const STICKY_PX = 60;

export class View {
  constructor() {
    this.chat = null;
    this.pending = new Set();
    this.scheduled = false;
    this.lastRenderedRoom = null;
    this.stickToBottom = true;
    this.membersOpen = window.matchMedia("(min-width: 1100px)").matches;
    this.wire();
  }

  attach(chat) {
    this.chat = chat;
    this.lastRenderedRoom = null;
    $("me-name").textContent = chat.me.name;
    const avatar = $("me-avatar");
    avatar.textContent = initials(chat.me.name);
    avatar.style.background = colorFor(chat.me.id);
    $("composer-input").value = "";
  }

  /** Collects what changed and redraws once per task (several events in a burst cost one
   * redraw). A timer, not requestAnimationFrame: background tabs must keep up too. */
  update(parts) {
    for (const p of parts) this.pending.add(p);
    if (this.scheduled) return;
    this.scheduled = true;
    setTimeout(() => {
      this.scheduled = false;
      const parts = this.pending;
      this.pending = new Set();
      this.render(parts);
    }, 0);
  }

  render(parts) {
    const chat = this.chat;
    if (!chat) return;
    const all = parts.has("all");
    const roomChanged = this.lastRenderedRoom !== chat.active;
    if (all || parts.has("conn")) this.renderConnection();
    if (all || parts.has("rooms")) this.renderRoomLists();
    if (all || roomChanged || parts.has("header") || parts.has("rooms")) this.renderHeader();
    if (all || roomChanged || parts.has("messages") || parts.has("older")) this.renderMessages(parts.has("older") && !roomChanged);
    if (all || roomChanged || parts.has("typing")) this.renderTyping();
    if (all || roomChanged || parts.has("members")) this.renderMembers();
    this.lastRenderedRoom = chat.active;
    const unread = chat.totalUnread;
    document.title = unread > 0 ? `(${unread}) confab` : "confab";
  }

  // ---- sidebar ----------------------------------------------------------------------------

  renderConnection() {
    const chat = this.chat;
    const status = $("conn-status");
    const banner = $("offline-banner");
    clearInterval(this.countdown);
    const show = () => {
      let text;
      let bannerText = "";
      switch (chat.connState) {
        case "online":
          text = "Connected";
          break;
        case "connecting":
          text = chat.everConnected ? "Reconnecting…" : "Connecting…";
          if (chat.everConnected) bannerText = "Connection lost. Reconnecting…";
          break;
        case "waiting": {
          const secs = Math.max(0, Math.ceil((chat.retryAt - Date.now()) / 1000));
          text = `Offline · retry in ${secs}s`;
          bannerText = `Connection lost. Retrying in ${secs} s. Messages you send now are kept and sent when it is back.`;
          break;
        }
        default:
          text = "Offline";
      }
      status.textContent = text;
      status.dataset.state = chat.connState;
      banner.hidden = !bannerText;
      if (bannerText) {
        banner.replaceChildren(bannerText, " ");
        if (chat.connState === "waiting") {
          banner.append(el("button", { class: "link-btn", type: "button", text: "Retry now", onclick: () => chat.conn.reconnectNow() }));
        }
      }
    };
    show();
    if (chat.connState === "waiting") this.countdown = setInterval(show, 1000);
  }

  renderRoomLists() {
    const chat = this.chat;
    const rooms = [...chat.rooms.values()];
    const item = (room, label, prefix) => {
      const unread = room.id === chat.active ? 0 : room.unread;
      return el("li", {},
        el("button", {
          type: "button", "aria-current": room.id === chat.active ? "true" : false,
          class: unread ? "unread" : false, "data-room": room.id,
          "aria-label": unread ? `${label}, ${unread} unread` : label,
          onclick: () => this.open(room.id),
        }, el("span", { class: "prefix", "aria-hidden": "true" }, prefix), el("span", { class: "label", text: label }),
        unread ? el("span", { class: "badge", "aria-hidden": "true", text: unread > 99 ? "99+" : String(unread) }) : null));
    };
    const mine = rooms.filter((r) => r.member && !r.info.dm).sort((a, b) => a.id.localeCompare(b.id));
    const dms = rooms.filter((r) => r.member && r.info.dm).sort((a, b) => this.roomLabel(a).localeCompare(this.roomLabel(b)));
    const browse = rooms.filter((r) => !r.member && !r.info.private).sort((a, b) => a.id.localeCompare(b.id));
    $("room-list").replaceChildren(...mine.map((r) => item(r, r.id, r.info.private ? lockIcon() : "#")));
    $("dm-list").replaceChildren(...(dms.length ? dms.map((r) => item(r, this.roomLabel(r), "@"))
      : [el("li", { class: "empty-note", text: "No conversations yet" })]));
    $("browse-list").replaceChildren(...browse.map((r) => item(r, r.id, "#")));
    $("browse-section").hidden = browse.length === 0;
  }

  roomLabel(room) {
    return room.info.dm ? dmPeerName(room.info.name, this.chat.me.name) : room.id;
  }

  // ---- conversation -----------------------------------------------------------------------

  renderHeader() {
    const chat = this.chat;
    const room = chat.rooms.get(chat.active);
    const input = $("composer-input");
    const canWrite = Boolean(room);
    input.disabled = !canWrite;
    $("send").disabled = !canWrite;
    $("leave-room").hidden = !room || !room.member || room.id === "general";
    $("toggle-members").hidden = !room;
    if (!room) {
      $("room-name").textContent = "confab";
      $("room-sub").textContent = "";
      input.placeholder = "";
      return;
    }
    const label = this.roomLabel(room);
    if (room.info.dm) $("room-name").replaceChildren(`@ ${label}`);
    else if (room.info.private) $("room-name").replaceChildren(lockIcon(), label);
    else $("room-name").replaceChildren(`# ${label}`);
    input.placeholder = room.member ? `Message ${room.info.dm ? label : "#" + label}` : `Join #${label} by sending a message`;
    let sub;
    if (room.info.dm) {
      const peer = [...room.members.values()].find((m) => m.id !== chat.me.id);
      sub = peer ? chat.presence.get(peer.id) ?? "offline" : "";
    } else {
      const online = [...room.members.keys()].filter((id) => (chat.presence.get(id) ?? "offline") !== "offline").length;
      const count = room.members.size;
      sub = count ? `${count} ${count === 1 ? "member" : "members"} · ${online} online` : "";
      if (room.info.private) sub = `Private room · ${sub}`;
    }
    $("room-sub").textContent = sub;
    $("toggle-members").textContent = room.members.size ? `Members (${room.members.size})` : "Members";
  }

  renderMessages(prepended) {
    const chat = this.chat;
    const box = $("messages");
    const room = chat.rooms.get(chat.active);
    const roomChanged = this.lastRenderedRoom !== chat.active;
    const fromBottom = box.scrollHeight - box.scrollTop - box.clientHeight;
    const stick = roomChanged || fromBottom < STICKY_PX;
    const oldTop = box.scrollTop;
    if (!room) {
      box.replaceChildren(el("p", { class: "empty", text: "Pick a room on the left, or create one." }));
      return;
    }
    const nodes = [];
    if (room.hasOlder) nodes.push(el("p", { class: "older", text: room.loadingOlder ? "Loading older messages…" : "Scroll up for older messages" }));
    else if (room.loaded) nodes.push(el("p", { class: "older", text: `This is the beginning of ${room.info.dm ? "your conversation with " + this.roomLabel(room) : "#" + room.id}.` }));
    else nodes.push(el("p", { class: "older", text: "Loading…" }));

    const messages = room.sorted();
    const notices = [...room.notices];
    const lastOwn = [...messages].reverse().find((m) => m.user.id === chat.me.id);
    let prev = null;
    let group = null;
    const flushNotices = (upToSeq) => {
      while (notices.length && notices[0].afterSeq < upToSeq) {
        nodes.push(el("p", { class: "notice", text: notices.shift().text }));
        prev = null;
      }
    };
    for (const message of messages) {
      flushNotices(message.seq);
      const at = Date.parse(message.timestamp);
      if (!prev || !sameDay(Date.parse(prev.timestamp), at)) {
        nodes.push(el("div", { class: "day", role: "separator", text: formatDay(at) }));
        prev = null;
      }
      if (!continuesGroup(prev, message)) {
        group = this.group(message.user, at);
        nodes.push(group);
      }
      group.append(this.messageNode(message, room));
      if (lastOwn && message.seq === lastOwn.seq) {
        const readers = [...room.members.values()].filter((m) => m.id !== chat.me.id && m.readSeq >= message.seq);
        if (readers.length) group.append(el("p", { class: "seen-by", text: `Seen by ${readers.map((m) => m.name).join(", ")}` }));
      }
      prev = message;
    }
    flushNotices(Infinity);
    const pending = chat.pendingFor(room.id);
    if (pending.length) {
      group = this.group(chat.me, pending[0].at);
      for (const item of pending) group.append(this.pendingNode(item));
      nodes.push(group);
    }
    box.replaceChildren(...nodes);
    if (stick || pending.some((p) => p.state !== "failed" && Date.now() - p.at < 1000)) box.scrollTop = box.scrollHeight;
    else if (prepended) box.scrollTop = box.scrollHeight - box.clientHeight - fromBottom;
    else box.scrollTop = oldTop;
    this.reportSeen();
  }

  group(user, at) {
    const mine = user.id === this.chat.me.id;
    const avatar = el("span", { class: "avatar", "aria-hidden": "true", text: initials(user.name) });
    // Through CSSOM, not a style attribute: the page's CSP forbids inline style attributes.
    avatar.style.background = colorFor(user.id);
    return el("div", { class: mine ? "group mine" : "group" }, avatar,
      el("div", { class: "group-head" }, el("span", { class: "author", text: user.name }),
        el("time", { class: "time", datetime: new Date(at).toISOString(), text: formatTime(at) })));
  }

  messageNode(message, room) {
    const chat = this.chat;
    const at = Date.parse(message.timestamp);
    const node = el("div", { class: "msg", "data-seq": message.seq, title: new Date(at).toLocaleString() });
    if (message.user.id === chat.me.id) {
      const readers = [...room.members.values()].filter((m) => m.id !== chat.me.id && m.readSeq >= message.seq);
      node.append(el("span", {
        class: readers.length ? "meta receipt seen" : "meta receipt",
        title: readers.length ? `Seen by ${readers.map((m) => m.name).join(", ")}` : "Sent",
        "aria-label": readers.length ? "seen" : "sent",
        text: readers.length ? "✓✓" : "✓",
      }));
    }
    appendText(node, message.content);
    return node;
  }

  pendingNode(item) {
    const node = el("div", { class: item.state === "failed" ? "msg failed" : "msg pending", "data-client-id": item.clientId });
    const label = { failed: "not sent", sending: "sending…" }[item.state] ?? (this.chat.conn.online ? "sending…" : "queued");
    node.append(el("span", { class: "meta", text: label }));
    appendText(node, item.content);
    if (item.state === "failed") {
      node.append(el("span", { class: "fail" }, `Not sent: ${item.error ?? "error"}`,
        el("button", { type: "button", text: "Retry", onclick: () => this.chat.retry(item.clientId) }),
        el("button", { type: "button", text: "Discard", onclick: () => this.chat.discard(item.clientId) })));
    }
    return node;
  }

  renderTyping() {
    const room = this.chat.rooms.get(this.chat.active);
    const names = room ? [...room.typing.values()].map((t) => t.name) : [];
    $("typing").textContent = typingText(names);
  }

  renderMembers() {
    const chat = this.chat;
    const panel = $("members");
    const room = chat.rooms.get(chat.active);
    panel.hidden = !this.membersOpen || !room;
    $("toggle-members").setAttribute("aria-expanded", String(this.membersOpen));
    this.updateScrim();
    if (!room) return;
    const rank = { online: 0, away: 1, offline: 2 };
    const members = [...room.members.values()]
      .map((m) => ({ ...m, status: chat.presence.get(m.id) ?? "offline" }))
      .sort((a, b) => rank[a.status] - rank[b.status] || a.name.localeCompare(b.name));
    $("member-list").replaceChildren(...members.map((m) => el("li", { class: m.status, "data-user": m.id },
      el("span", { class: `dot ${m.status}`, "aria-hidden": "true" }),
      el("span", { class: "name", text: m.id === chat.me.id ? `${m.name} (you)` : m.name }),
      el("span", { class: "state", text: m.status }))));
    if (!room.info.dm && room.member) {
      const form = el("form", { class: "add-member" },
        el("label", { for: "add-member-input", class: "visually-hidden", text: "Add a member by username" }),
        el("input", { id: "add-member-input", placeholder: "Add by username", autocomplete: "off", maxlength: "128" }),
        el("p", { class: "form-error", role: "alert" }));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const input = form.querySelector("input");
        const error = form.querySelector(".form-error");
        const name = input.value.trim();
        if (!name) return;
        try {
          await chat.addMember(room.id, name);
          input.value = "";
          error.textContent = "";
        } catch (err) {
          error.textContent = err.message;
        }
      });
      $("member-list").append(el("li", { class: "add" }, form));
    }
  }

  // ---- reading ------------------------------------------------------------------------------

  /** Tells the chat which messages the user has actually had on screen: the newest message
   * whose bottom edge is inside the visible part of the list, while the page is visible. */
  reportSeen() {
    const chat = this.chat;
    if (!chat || document.visibilityState !== "visible") return;
    const box = $("messages");
    const limit = box.getBoundingClientRect().bottom + 2;
    const nodes = box.querySelectorAll(".msg[data-seq]");
    for (let i = nodes.length - 1; i >= 0; i--) {
      if (nodes[i].getBoundingClientRect().bottom <= limit) {
        chat.seen(chat.active, Number(nodes[i].dataset.seq));
        return;
      }
    }
  }

  // ---- controls -----------------------------------------------------------------------------

  open(roomId) {
    this.setSidebar(false);
    location.hash = `#${encodeURIComponent(roomId)}`;
    this.chat.openRoom(roomId).catch((err) => this.flash(err.message));
    $("composer-input").focus({ preventScroll: true });
  }

  flash(text) {
    const banner = $("offline-banner");
    banner.hidden = false;
    banner.textContent = text;
    setTimeout(() => this.renderConnection(), 4000);
  }

  setSidebar(open) {
    document.getElementById("app").classList.toggle("sidebar-open", open);
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
    this.updateScrim();
  }

  updateScrim() {
    const narrow = window.matchMedia("(max-width: 760px)").matches;
    const sidebarOpen = document.getElementById("app").classList.contains("sidebar-open");
    $("scrim").hidden = !(narrow && (sidebarOpen || !$("members").hidden));
  }

  wire() {
    const input = $("composer-input");
    const resize = () => {
      input.style.height = "auto";
      input.style.height = `${Math.min(input.scrollHeight + 2, window.innerHeight * 0.4)}px`;
    };
    const submit = () => {
      const text = input.value;
      if (!text.trim() || !this.chat) return;
      this.chat.send(text);
      input.value = "";
      resize();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submit();
      }
    });
    input.addEventListener("input", () => {
      resize();
      this.chat?.typed(input.value.trim().length > 0);
    });
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      submit();
    });

    const box = $("messages");
    box.addEventListener("scroll", () => {
      const room = this.chat?.rooms.get(this.chat.active);
      if (room && box.scrollTop < 80) this.chat.loadOlder(room).catch(() => {});
      clearTimeout(this.seenTimer);
      this.seenTimer = setTimeout(() => this.reportSeen(), 200);
    });
    document.addEventListener("visibilitychange", () => this.reportSeen());
    window.addEventListener("focus", () => this.reportSeen());

    $("toggle-sidebar").addEventListener("click", () => this.setSidebar(!document.getElementById("app").classList.contains("sidebar-open")));
    $("scrim").addEventListener("click", () => {
      this.setSidebar(false);
      this.membersOpen = false;
      this.renderMembers();
    });
    $("toggle-members").addEventListener("click", () => {
      this.membersOpen = !this.membersOpen;
      this.renderMembers();
    });
    $("close-members").addEventListener("click", () => {
      this.membersOpen = false;
      this.renderMembers();
      $("toggle-members").focus();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      if (document.getElementById("app").classList.contains("sidebar-open")) this.setSidebar(false);
      else if (this.membersOpen && window.matchMedia("(max-width: 760px)").matches) {
        this.membersOpen = false;
        this.renderMembers();
      }
    });
    $("leave-room").addEventListener("click", async () => {
      const chat = this.chat;
      const room = chat?.rooms.get(chat.active);
      if (!room) return;
      if (room.info.private && !room.info.dm && !window.confirm(`Leave the private room ${room.id}? You cannot rejoin without being added again.`)) return;
      try {
        await chat.leaveRoom(room.id);
      } catch (err) {
        this.flash(err.message);
      }
    });

    this.dialog("room", async () => {
      const name = $("room-input").value.trim();
      await this.chat.createRoom(name, $("room-private").checked);
    });
    this.dialog("dm", async () => {
      await this.chat.openDm($("dm-input").value.trim());
    });
  }

  /** Wires one of the two small dialogs: "+" opens it, submit runs `action`, errors stay in it. */
  dialog(name, action) {
    const dialog = $(`${name}-dialog`);
    const form = $(`${name}-form`);
    const error = $(`${name}-error`);
    $(name === "room" ? "new-room" : "new-dm").addEventListener("click", () => {
      form.reset();
      error.textContent = "";
      dialog.showModal();
    });
    dialog.querySelector("[data-close]").addEventListener("click", () => dialog.close());
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!form.reportValidity()) return;
      try {
        await action();
        dialog.close();
        this.setSidebar(false);
        $("composer-input").focus();
      } catch (err) {
        error.textContent = err.message;
      }
    });
  }
}

/** A small padlock for private rooms (an SVG: emoji fonts are not everywhere). */
function lockIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("class", "lock");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M4.5 7V5a3.5 3.5 0 0 1 7 0v2H13v8H3V7zm1.5 0h4V5a2 2 0 0 0-4 0z");
  path.setAttribute("fill", "currentColor");
  svg.append(path);
  return svg;
}

/** Appends message text, with http(s) links as anchors that open in a new tab without giving
 * it access to this page. */
function appendText(node, text) {
  for (const part of linkify(text)) {
    if (part.href) node.append(el("a", { href: part.href, target: "_blank", rel: "noopener noreferrer nofollow", text: part.text }));
    else node.append(part.text);
  }
}

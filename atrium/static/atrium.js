/**
 * atrium.js: a dependency-free browser client for atrium's live workspaces (an ES module).
 *
 *   import { AtriumClient } from "/static/atrium.js";
 *   const client = new AtriumClient({ projectId, getToken: async (reason) => token });
 *   client.on("event", (event) => console.log(event.seq, event.type, event));
 *   client.connect();
 *   const { seq } = await client.edit("/src/app.py", { lines_added: 1, lines_removed: 0, change_type: "modification" });
 *
 * What it promises (the protocol is in docs/WEBSOCKET.md):
 * - It authenticates with an AUTH frame (browsers cannot set headers) and asks the token
 *   callback again when the token is about to expire (TOKEN_EXPIRING) or was refused (4001, 4007).
 * - It reconnects after a drop with exponential backoff and jitter, and resumes from the
 *   last `seq` it delivered: "event" listeners see every durable event once, in `seq` order.
 *   When the gap was too old to replay it emits "resync" (reload the state over REST).
 * - Every edit carries an id and stays pending until the server ACKs it; pending edits are
 *   sent again after a reconnect, and the server stores each id at most once. They are kept
 *   in the tab's sessionStorage (per project), so a reload sends them again too, under the
 *   same user only.
 * - It does not retry when retrying cannot help (4000, 4003, 4004, 4005, 4006, 1009).
 * - It asks for batched frames (`batch=1`) and keeps a presence map.
 */

/** Close codes after which a retry cannot succeed: the client stops. */
const FATAL_CODES = new Set([1009, 4000, 4003, 4004, 4005, 4006]);
/** Close codes that refuse the token: ask the token callback for a new one, then retry. */
const TOKEN_CODES = new Set([4001, 4007]);
/** Close codes that ask the client to hold back: retry, but not before `slowRetryMs`. */
const SLOW_CODES = new Set([4010, 4011]);

const CONNECTING = "connecting";
const OPEN = "open";
const RECONNECTING = "reconnecting";
const CLOSED = "closed";

/** Where pending edits of a project are kept in the tab (sessionStorage) across reloads. */
export function pendingKey(projectId) {
  return `atrium.pending:${projectId}`;
}

/** The tab's sessionStorage, or null where it is missing or forbidden (sandboxed frames). */
function tabStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null;
  }
}

/** The user a token names (its JWT `sub`), or null when it cannot be read. */
function tokenSubject(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const sub = JSON.parse(atob(padded)).sub;
    return typeof sub === "string" ? sub : null;
  } catch {
    return null;
  }
}

function ignore() {}

/** A client id for an edit: 32 hex digits (getRandomValues works outside secure contexts too). */
function newEditId() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The WebSocket base URL of the page's own server: ws(s)://host[:port]. */
function sameOriginBase() {
  const { protocol, host } = globalThis.location;
  return `${protocol === "https:" ? "wss:" : "ws:"}//${host}`;
}

/** An edit the server refused (an ERROR frame for its id) or could not take (a fatal close). */
export class EditRefused extends Error {
  constructor(code, message, id) {
    super(message);
    this.name = "EditRefused";
    this.code = code;
    this.id = id;
  }
}

export class AtriumClient {
  /**
   * @param {object} options
   * @param {string} options.projectId  the project to join
   * @param {(reason: "connect"|"expiring"|"rejected") => string|Promise<string>} options.getToken
   *   an access token: the current one for "connect", a fresh one for "expiring" (renew
   *   before it expires) and "rejected" (the server refused it: refresh, or log in again).
   *   A throw or rejection stops the client ("closed" with reason "token_unavailable").
   * @param {string} [options.url]  WebSocket base URL (default: the page's origin, ws: or wss:)
   * @param {boolean} [options.batch=true]  ask for batched frames (JSON arrays)
   * @param {number|null} [options.sinceSeq=null]  resume from this seq on the first connect
   * @param {number} [options.initialDelayMs=500]  first reconnect delay; doubles per failed try
   * @param {number} [options.maxDelayMs=30000]  cap of the reconnect delay
   * @param {number} [options.slowRetryMs=5000]  least delay after 4010 / 4011
   * @param {number} [options.idleTimeoutMs=70000]  a socket silent this long is dropped
   *   (the server pings every 25 s)
   * @param {number} [options.retryEditMs=1000]  delay before resending a rate-limited edit
   * @param {typeof WebSocket} [options.WebSocket]  the WebSocket class (tests, Node)
   * @param {Storage|null} [options.storage]  where pending edits survive a reload (default:
   *   the tab's sessionStorage; null: in memory only). One client per project per tab.
   */
  constructor(options) {
    if (!options || !options.projectId || typeof options.getToken !== "function") {
      throw new TypeError("AtriumClient needs { projectId, getToken }");
    }
    this.projectId = options.projectId;
    this._getToken = options.getToken;
    this._base = (options.url ?? sameOriginBase()).replace(/\/+$/, "");
    this._batch = options.batch ?? true;
    this._initialDelay = options.initialDelayMs ?? 500;
    this._maxDelay = options.maxDelayMs ?? 30000;
    this._slowRetry = options.slowRetryMs ?? 5000;
    this._idleTimeout = options.idleTimeoutMs ?? 70000;
    this._retryEdit = options.retryEditMs ?? 1000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;

    this._state = CLOSED;
    this._lastSeq = options.sinceSeq ?? null;
    this._presence = new Map();
    this._presenceSeq = null;
    this._emails = new Map();
    /**
     * id -> { frame, user, resolve, reject, timer }; a Map keeps the order edits were made
     * in. `user` made it (the subject of the last token; null before the first token).
     */
    this._pending = new Map();
    /** Stored edits of another user of this tab: kept, never sent by this one. */
    this._others = [];
    this._user = null;
    this._storage = options.storage === undefined ? tabStorage() : options.storage;
    this._restore();
    this._listeners = new Map();
    this._ws = null;
    this._generation = 0;
    this._attempt = 0;
    this._tokenReason = "connect";
    this._stopped = true;
    this._reconnectTimer = null;
    this._idleTimer = null;
    this._onOnline = () => {
      if (this._state === RECONNECTING) this._reconnectNow();
    };
  }

  /** "connecting" | "open" | "reconnecting" | "closed". */
  get state() {
    return this._state;
  }

  /** The seq of the last durable event delivered (null before the first). */
  get lastSeq() {
    return this._lastSeq;
  }

  /** Who is here: user_id -> { user_id, email, connections, status, last_seen } (a copy). */
  get presence() {
    return new Map(this._presence);
  }

  /** How many edits wait for their ACK. */
  get pendingEdits() {
    return this._pending.size;
  }

  /**
   * Listen to `name`: "event" (every durable event, once, in seq order), "cursor"
   * (CURSOR_UPDATE), "presence" (the presence map), "state" ({ state, code, reason,
   * delayMs }), "ack" ({ id, seq }), "resync" (RESUMED with recovered false), "error"
   * (ERROR frames and token failures), "frame" (every server message, raw).
   * @returns {() => void} a function that removes the listener
   */
  on(name, listener) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    return () => this._listeners.get(name)?.delete(listener);
  }

  /** Open the connection (and keep it open until close() or a fatal close code). */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    this._attempt = 0;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
  }

  /** Close for good. Pending edits stay pending and are sent after a later connect(). */
  close() {
    this._stopped = true;
    this._generation += 1;
    globalThis.removeEventListener?.("online", this._onOnline);
    clearTimeout(this._reconnectTimer);
    const ws = this._detach();
    ws?.close(1000, "client_closed");
    this._setState(CLOSED, { code: 1000, reason: "client_closed" });
  }

  /**
   * Send a FILE_CHANGE. It is queued while the client is not connected and sent again
   * after every reconnect until the server ACKs it (its id makes the server store it once).
   * @param {string} filePath
   * @param {object} changes  { lines_added, lines_removed, change_type, ... }
   * @param {{ id?: string }} [options]  your own id (1-64 characters, unique per user)
   * @returns {Promise<{ id: string, seq: number }>} the stored event's seq; rejects with
   *   EditRefused on an ERROR for this edit or when the workspace is gone for good
   */
  edit(filePath, changes, options = {}) {
    const id = options.id ?? newEditId();
    const frame = JSON.stringify({ type: "FILE_CHANGE", id, file_path: filePath, changes });
    return new Promise((resolve, reject) => {
      // Made by the user of the last token (null before the first): only they send it.
      this._pending.set(id, { frame, user: this._user, resolve, reject, timer: null });
      if (this._state === OPEN) this._ws.send(frame);
      this._save();
    });
  }

  /** Share a cursor position (ephemeral: dropped when not connected). Returns if sent. */
  cursor(file, line, column) {
    return this._send({ type: "CURSOR_UPDATE", position: { file, line, column } });
  }

  // -- the connection --------------------------------------------------------------------

  async _open() {
    const generation = ++this._generation;
    this._setState(CONNECTING);
    let token;
    try {
      token = await this._getToken(this._tokenReason);
    } catch (error) {
      this._emit("error", { code: "token_unavailable", message: String(error) });
      this._stop({ code: null, reason: "token_unavailable" });
      return;
    }
    if (this._stopped || generation !== this._generation) return;
    this._user = tokenSubject(token);
    const query = this._batch ? "?batch=1" : "";
    const ws = new this._WebSocket(`${this._base}/ws/${encodeURIComponent(this.projectId)}${query}`);
    this._ws = ws;
    this._resuming = this._lastSeq !== null;
    this._touch();
    ws.onopen = () => {
      const auth = { type: "AUTH", token };
      if (this._lastSeq !== null) auth.since_seq = this._lastSeq;
      ws.send(JSON.stringify(auth));
      this._touch();
    };
    ws.onmessage = (message) => {
      if (ws !== this._ws) return;
      this._touch();
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      for (const frame of Array.isArray(data) ? data : [data]) {
        if (ws !== this._ws) return; // a handler closed it
        this._emit("frame", frame);
        this._handle(frame);
      }
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._closed(event.code, event.reason);
    };
  }

  /** Forget the current socket (its late events are ignored); returns it. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    clearTimeout(this._idleTimer);
    return ws;
  }

  /** A frame arrived: restart the idle timer that detects a dead connection. */
  _touch() {
    clearTimeout(this._idleTimer);
    this._idleTimer = setTimeout(() => {
      const ws = this._detach();
      ws?.close(4000, "idle_timeout");
      this._closed(1006, "idle_timeout");
    }, this._idleTimeout);
  }

  _closed(code, reason) {
    this._detach();
    for (const edit of this._pending.values()) clearTimeout(edit.timer);
    if (this._stopped) return;
    if (FATAL_CODES.has(code)) {
      const message = `The workspace closed with ${code} ${reason}`;
      for (const [id, edit] of this._pending) {
        edit.reject(new EditRefused(`closed_${code}`, message, id));
      }
      this._pending.clear();
      this._save();
      this._stop({ code, reason });
      return;
    }
    this._tokenReason = TOKEN_CODES.has(code) ? "rejected" : "connect";
    const ceiling = Math.min(this._maxDelay, this._initialDelay * 2 ** this._attempt);
    this._attempt += 1;
    // "Equal jitter": at least half the exponential delay, so retries never bunch at zero.
    let delayMs = ceiling / 2 + Math.random() * (ceiling / 2);
    if (SLOW_CODES.has(code)) delayMs = Math.max(delayMs, this._slowRetry);
    this._setState(RECONNECTING, { code, reason, delayMs });
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
  }

  _reconnectNow() {
    clearTimeout(this._reconnectTimer);
    this._open();
  }

  _stop(detail) {
    this._stopped = true;
    globalThis.removeEventListener?.("online", this._onOnline);
    clearTimeout(this._reconnectTimer);
    this._setState(CLOSED, detail);
  }

  _send(frame) {
    if (this._state !== OPEN) return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  // -- server frames ---------------------------------------------------------------------

  _handle(frame) {
    switch (frame.type) {
      case "PRESENCE_STATE":
        return this._joined(frame);
      case "RESUMED":
        this._resuming = false;
        if (!frame.recovered) {
          this._lastSeq = Math.max(this._lastSeq ?? 0, frame.seq);
          this._emit("resync", frame);
        }
        return;
      case "ACK":
        return this._acked(frame);
      case "ERROR":
        return this._refused(frame);
      case "PING":
        this._send({ type: "PONG" });
        return;
      case "PONG":
      case "AUTH_OK":
        return;
      case "TOKEN_EXPIRING":
        return this._renew();
      case "CURSOR_UPDATE":
        this._emit("cursor", frame);
        return;
      default:
        if (typeof frame.seq === "number") this._event(frame);
    }
  }

  _joined(frame) {
    this._presence = new Map(
      frame.users.map((u) => [u.user_id, { ...u, email: this._emails.get(u.user_id) ?? null }]),
    );
    this._presenceSeq = frame.seq;
    if (!this._resuming) this._lastSeq = frame.seq;
    this._tokenReason = "connect";
    this._attempt = 0;
    // Edits restored from another user's session in this tab are not ours to send.
    for (const [id, edit] of this._pending) {
      if (edit.user !== null && this._user !== null && edit.user !== this._user) {
        this._pending.delete(id);
        this._others.push({ id, user: edit.user, frame: edit.frame });
      }
    }
    this._setState(OPEN);
    this._emit("presence", this.presence);
    for (const edit of this._pending.values()) {
      clearTimeout(edit.timer);
      edit.user ??= this._user;
      this._ws.send(edit.frame);
    }
    this._save();
  }

  _event(frame) {
    // Durable events arrive once and in order; this guards the listeners all the same.
    if (this._lastSeq !== null && frame.seq <= this._lastSeq) return;
    this._lastSeq = frame.seq;
    if (frame.email) this._emails.set(frame.user_id, frame.email);
    // Replayed joins and leaves are older than the presence snapshot: only later ones count.
    if (frame.seq > this._presenceSeq) {
      if (frame.type === "USER_JOIN") {
        this._presence.set(frame.user_id, {
          user_id: frame.user_id,
          email: frame.email ?? null,
          connections: 1,
          status: "active",
          last_seen: frame.timestamp,
        });
        this._emit("presence", this.presence);
      } else if (frame.type === "USER_LEAVE") {
        this._presence.delete(frame.user_id);
        this._emit("presence", this.presence);
      }
    }
    this._emit("event", frame);
  }

  _acked(frame) {
    const edit = this._pending.get(frame.id);
    if (edit === undefined) return;
    this._pending.delete(frame.id);
    this._save();
    clearTimeout(edit.timer);
    edit.resolve({ id: frame.id, seq: frame.seq });
    this._emit("ack", { id: frame.id, seq: frame.seq });
  }

  _refused(frame) {
    this._emit("error", frame);
    const edit = frame.id === undefined ? undefined : this._pending.get(frame.id);
    if (edit === undefined) return;
    if (frame.code === "rate_limited") {
      // Not stored: send it again a little later (and after any reconnect).
      clearTimeout(edit.timer);
      edit.timer = setTimeout(() => {
        if (this._pending.has(frame.id) && this._state === OPEN) this._ws.send(edit.frame);
      }, this._retryEdit);
      return;
    }
    this._pending.delete(frame.id);
    this._save();
    edit.reject(new EditRefused(frame.code, frame.message, frame.id));
  }

  async _renew() {
    try {
      const token = await this._getToken("expiring");
      this._send({ type: "AUTH", token });
    } catch (error) {
      // The server closes with 4007 when the time is up; that asks for a token once more.
      this._emit("error", { code: "token_unavailable", message: String(error) });
    }
  }

  // -- pending edits across reloads -----------------------------------------------------

  /** Take up the pending edits a previous page of this tab left for the project. */
  _restore() {
    let stored = [];
    try {
      stored = JSON.parse(this._storage?.getItem(pendingKey(this.projectId)) ?? "[]");
    } catch {
      return; // unreadable: nothing to restore
    }
    if (!Array.isArray(stored)) return;
    for (const entry of stored) {
      if (typeof entry?.id !== "string" || typeof entry.frame !== "string") continue;
      // Nobody awaits a restored edit: its ACK is seen through the "ack" listeners.
      this._pending.set(entry.id, {
        frame: entry.frame,
        user: typeof entry.user === "string" ? entry.user : null,
        resolve: ignore,
        reject: ignore,
        timer: null,
      });
    }
  }

  /** Keep the pending edits (and other users' stored ones) in the tab's storage. */
  _save() {
    if (!this._storage) return;
    const entries = [
      ...this._others,
      ...Array.from(this._pending, ([id, edit]) => ({ id, user: edit.user, frame: edit.frame })),
    ];
    try {
      if (entries.length === 0) this._storage.removeItem(pendingKey(this.projectId));
      else this._storage.setItem(pendingKey(this.projectId), JSON.stringify(entries));
    } catch {
      // Full or forbidden: the edits stay pending in memory, as without storage.
    }
  }

  // -- listeners -------------------------------------------------------------------------

  _setState(state, detail = {}) {
    this._state = state;
    this._emit("state", { state, ...detail });
  }

  _emit(name, value) {
    for (const listener of this._listeners.get(name) ?? []) {
      try {
        listener(value);
      } catch (error) {
        // One broken listener must not stop the client or the other listeners.
        console.error(error);
      }
    }
  }
}

// A textarea bound to a live document (docs/DOCUMENTS.md): the Y.Text named "content",
// synced by an unmodified y-websocket provider, with the other people's cursors and
// selections drawn over the textarea from awareness.
//
//   const editor = openSharedEditor({ textarea, overlay, getTicket, editable, on... })
//
// getTicket() resolves to the ticket endpoint's answer ({ url, room, ticket }); it is asked
// again on every closed connection (the refresh hook). The package code comes from
// editor.bundle.js (web/build.sh builds it from npm); this file is atrium's own.
import { WebsocketProvider, Y } from "/static/editor.bundle.js";

// Close codes after which reconnecting cannot help (docs/DOCUMENTS.md, Close codes).
const STOP = new Set([1009, 4003, 4004, 4005, 4006, 4012, 4013]);
const LOCAL = Symbol("local edit"); // the transaction origin of this textarea's edits
const CURSOR_MS = 80; // awareness frames at most this often (they count against the rate limit)

/**
 * The change that turns `before` into `after`, at one place: `{ at, remove, insert }`.
 * `caret` (the caret in `after`) picks the place when several would do: typing "l"
 * after "hel" in "hello" inserts at the caret, not at the end of the run of l's, so a
 * remote caret there stays where it was.
 */
export function diff(before, after, caret = after.length) {
  const most = Math.min(before.length, after.length);
  let start = 0;
  while (start < most && before[start] === after[start]) start++;
  let end = 0;
  while (end < most - start && before.at(-1 - end) === after.at(-1 - end)) end++;
  // Slide the change left towards the caret while the text it moves past is the same.
  while (start > 0 && after.length - end > caret && before.at(-1 - end) === after.at(-1 - end)) {
    start--;
    end++;
  }
  // Never split a surrogate pair: the halves are no characters on their own.
  while (start > 0 && isHighSurrogate(after.charCodeAt(start - 1))) start--;
  while (end > 0 && isLowSurrogate(after.charCodeAt(after.length - end))) end--;
  return {
    at: start,
    remove: before.length - end - start,
    insert: after.slice(start, after.length - end),
  };
}

const isHighSurrogate = (code) => code >= 0xd800 && code <= 0xdbff;
const isLowSurrogate = (code) => code >= 0xdc00 && code <= 0xdfff;

/** Where `index` is after a Y.Text `delta` made elsewhere (an insert at it stays after). */
function moved(index, delta) {
  let at = 0;
  let shift = 0;
  for (const op of delta) {
    if (op.retain !== undefined) {
      at += op.retain;
    } else if (op.insert !== undefined) {
      if (at < index) shift += typeof op.insert === "string" ? op.insert.length : 1;
    } else if (op.delete !== undefined) {
      if (at < index) shift -= Math.min(op.delete, index - at);
      at += op.delete;
    }
    if (at >= index) break;
  }
  return index + shift;
}

/** Line and column (both from 1) of `index` in `text`. */
function lineAndColumn(text, index) {
  const lines = text.slice(0, index).split("\n");
  return { line: lines.length, column: lines.at(-1).length + 1 };
}

/** A colour of its own for each user, the same on every page. */
function colourOf(userId) {
  let hash = 0;
  for (const c of String(userId)) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 70% 45%)`;
}

/**
 * Bind `textarea` to the document `getTicket` names; `overlay` (an element the page puts
 * over the textarea) shows the others' cursors. Callbacks, all optional:
 * `onStatus(state, code)` with state "connecting", "syncing", "synced", "reconnecting" or
 * "closed"; `onPeers(peers)` with `[{ clientId, userId, name, colour, line, column,
 * selected }]`; `onClose(code)` for every closed connection (4014: the role changed, so
 * the page may ask for it and call `setEditable`).
 * Returns `{ doc, text, provider, setEditable(bool), close() }`.
 */
export async function openSharedEditor({
  textarea,
  overlay,
  getTicket,
  editable = true,
  onStatus = () => {},
  onPeers = () => {},
  onClose = () => {},
}) {
  const { url, room, ticket } = await getTicket();
  const doc = new Y.Doc();
  const text = doc.getText("content");
  // disableBc: tabs of one browser would otherwise sync through a BroadcastChannel,
  // around the server's rules (a viewer's tab would edit a collaborator's replica).
  const provider = new WebsocketProvider(url, room, doc, { params: { ticket }, disableBc: true });
  const { awareness } = provider;
  let closed = false; // by close()
  let stopped = false; // by a close code after which retrying cannot help

  const setEditable = (yes) => {
    editable = yes;
    textarea.readOnly = !yes;
    textarea.dataset.mode = yes ? "edit" : "read-only";
  };
  setEditable(editable);
  textarea.value = "";

  // Status, and the refresh hook: a fresh ticket for the provider's next attempt.
  const status = (state, code) => {
    textarea.dataset.state = state;
    onStatus(state, code);
  };
  status("connecting");
  provider.on("status", ({ status: s }) => {
    if (closed || stopped) return;
    if (s === "connected") status(provider.synced ? "synced" : "syncing");
    else if (s === "disconnected") status("reconnecting");
  });
  provider.on("sync", (synced) => {
    if (!closed && !stopped && provider.wsconnected) status(synced ? "synced" : "syncing");
  });
  provider.on("connection-close", async (event) => {
    const code = event?.code ?? null;
    onClose(code);
    if (closed) return;
    if (STOP.has(code)) {
      stopped = true;
      provider.disconnect();
      textarea.readOnly = true; // what is typed now would reach nobody
      status("closed", code);
      return;
    }
    try {
      provider.params.ticket = (await getTicket()).ticket;
    } catch {
      // offline, or the server is restarting: the next close asks again
    }
  });

  // Local edits: the textarea's new value, diffed against the document's text.
  const onInput = () => {
    const before = text.toString();
    if (!editable) {
      render();
      return;
    }
    const change = diff(before, textarea.value, textarea.selectionEnd);
    doc.transact(() => {
      if (change.remove > 0) text.delete(change.at, change.remove);
      if (change.insert) text.insert(change.at, change.insert);
    }, LOCAL);
    shareCaret();
  };

  // Remote edits: the new text, with the local caret and selection carried along.
  const render = (delta = []) => {
    const { selectionStart, selectionEnd, selectionDirection, scrollTop } = textarea;
    const value = text.toString();
    if (textarea.value !== value) {
      textarea.value = value;
      textarea.setSelectionRange(
        moved(selectionStart, delta),
        moved(selectionEnd, delta),
        selectionDirection,
      );
      textarea.scrollTop = scrollTop;
    }
    drawPeers();
  };
  text.observe((event) => {
    if (event.transaction.origin !== LOCAL) render(event.delta);
    else drawPeers();
  });

  // The own caret and selection, as relative positions: they name the character after
  // the caret, so they follow everyone's edits, and typing at the caret leaves them as
  // they were (no awareness frame per keystroke: frames count against the rate limit).
  let caretTimer = null;
  let shared = "";
  const shareCaret = () => {
    if (caretTimer !== null || closed) return;
    caretTimer = setTimeout(() => {
      caretTimer = null;
      if (closed) return;
      const { selectionStart, selectionEnd, selectionDirection } = textarea;
      const [anchor, head] =
        selectionDirection === "backward"
          ? [selectionEnd, selectionStart]
          : [selectionStart, selectionEnd];
      const position = (index) =>
        Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(text, index));
      const cursor = { anchor: position(anchor), head: position(head) };
      if (JSON.stringify(cursor) === shared) return;
      shared = JSON.stringify(cursor);
      awareness.setLocalStateField("cursor", cursor);
    }, CURSOR_MS);
  };

  // The others: a list for the page, and carets and selections drawn over the textarea.
  const absolute = (json) => {
    const position = Y.createAbsolutePositionFromRelativePosition(
      Y.createRelativePositionFromJSON(json),
      doc,
    );
    return position && position.type === text ? position.index : null;
  };
  const peers = () => {
    const list = [];
    for (const [clientId, state] of awareness.getStates()) {
      if (clientId === doc.clientID || !state.cursor) continue;
      const anchor = absolute(state.cursor.anchor);
      const head = absolute(state.cursor.head);
      if (anchor === null || head === null) continue;
      const userId = state.user?.id ?? String(clientId);
      list.push({
        clientId,
        userId,
        name: state.user?.name ?? "someone",
        colour: colourOf(userId),
        head,
        from: Math.min(anchor, head),
        to: Math.max(anchor, head),
        ...lineAndColumn(text.toString(), head),
        selected: Math.abs(head - anchor),
      });
    }
    return list.sort((a, b) => a.name.localeCompare(b.name) || a.clientId - b.clientId);
  };
  const drawPeers = () => {
    const list = peers();
    onPeers(list.map(({ head, from, to, ...peer }) => peer));
    drawOverlay(overlay, textarea, text.toString(), list);
  };
  awareness.on("change", drawPeers);

  for (const name of ["keyup", "mouseup", "select", "focus"]) {
    textarea.addEventListener(name, shareCaret);
  }
  textarea.addEventListener("input", onInput);
  const follow = () => {
    overlay.scrollTop = textarea.scrollTop;
  };
  textarea.addEventListener("scroll", follow);
  const resized = new ResizeObserver(() => drawPeers());
  resized.observe(textarea);
  awareness.setLocalStateField("user", {}); // the server fills in who we are
  shareCaret();

  return {
    doc,
    text,
    provider,
    setEditable,
    close() {
      closed = true;
      clearTimeout(caretTimer);
      textarea.removeEventListener("input", onInput);
      for (const name of ["keyup", "mouseup", "select", "focus"]) {
        textarea.removeEventListener(name, shareCaret);
      }
      textarea.removeEventListener("scroll", follow);
      resized.disconnect();
      provider.destroy();
      doc.destroy();
      overlay.replaceChildren();
      textarea.dataset.state = "closed";
    },
  };
}

/**
 * Draw `peers`' selections and carets into `overlay`: a copy of the textarea's text, in
 * the same box, font and wrapping, whose text is invisible and whose marks are not.
 * Styles come from CSSOM properties (no inline style attributes: the page's CSP).
 */
function drawOverlay(overlay, textarea, value, peers) {
  const css = getComputedStyle(textarea);
  for (const property of [
    "font-family",
    "font-size",
    "font-weight",
    "line-height",
    "letter-spacing",
    "tab-size",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
  ]) {
    overlay.style.setProperty(property, css.getPropertyValue(property));
  }
  overlay.style.left = `${textarea.offsetLeft + textarea.clientLeft}px`;
  overlay.style.top = `${textarea.offsetTop + textarea.clientTop}px`;
  overlay.style.width = `${textarea.clientWidth}px`;
  overlay.style.height = `${textarea.clientHeight}px`;

  const cuts = new Set([0, value.length]);
  for (const p of peers) cuts.add(p.from).add(p.to).add(p.head);
  const points = [...cuts].sort((a, b) => a - b);
  const nodes = [];
  points.forEach((at, i) => {
    for (const p of peers.filter((peer) => peer.head === at)) {
      const caret = document.createElement("span");
      caret.className = "remote-caret";
      caret.dataset.name = p.name;
      caret.dataset.userId = p.userId;
      caret.style.setProperty("--peer", p.colour);
      nodes.push(caret);
    }
    const next = points[i + 1];
    if (next === undefined || next === at) return;
    const run = value.slice(at, next);
    const owner = peers.find((p) => p.from <= at && next <= p.to);
    if (owner) {
      const mark = document.createElement("mark");
      mark.className = "remote-selection";
      mark.style.setProperty("--peer", owner.colour);
      mark.textContent = run;
      nodes.push(mark);
    } else {
      nodes.push(document.createTextNode(run));
    }
  });
  nodes.push(document.createTextNode("\n")); // a last empty line keeps its height
  overlay.replaceChildren(...nodes);
  overlay.scrollTop = textarea.scrollTop;
}
